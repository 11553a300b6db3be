"""Section ``decode``: a SmolLM2-shaped decode step (random weights, bf16) in a CUDA graph, unpatched and with 1 and
3 steered layers in both modes and 3 with ``fuse_norm``, each configuration captured on its own (one that fails
leaves the others' rows) and the replays timed in interleaved rounds; then the decode ops alone against the empty
kernel.

The decode ops edit ``h`` in place. Timed as many calls on one ``h``, the edit would compound and, once the gate
turned off, token mode would skip its second pass and look faster than it is. So each captured call edits its own
copy of a fresh row, the copies are restored before every replay (outside the timed region), and one replay is
checked afterwards: every copy must equal one application of the reference. Token mode is timed on a row whose
gate is open (the rows the goal is about) and on one whose gate is closed (pass 2 skipped), each row's gate state
read from the reference and recorded.
"""
from __future__ import annotations

NAME, DEADLINE = "decode", 0.67
MODEL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True)
DRY_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128)
PROMPT, DRY_PROMPT = 64, 6
REPLAYS = 200
OP_WIDTHS, DRY_OP_WIDTHS = (576, 4096), (64,)
CALLS_PER_GRAPH, DRY_CALLS_PER_GRAPH = 100, 3
MODEL_KEY = "model_pdl_speedup"  # on a PDL row: the model's off / on speed-up (finesteer_kernels.pdl_model)


def run(sec, ctx) -> dict:
    """Capture one decode step per configuration (`benchmarks.e2e.capture_decode_step`: each on its own copy of the
    model, same weights, each in its own try), then time the replays in interleaved rounds."""
    import torch

    from benchmarks import timing
    from benchmarks.cases import make_params
    from benchmarks.e2e import capture_decode_step, e2e_configs, replay_rounds
    from benchmarks.gpu.record import error_fields

    model = DRY_MODEL if ctx.dry else MODEL
    dtype = torch.bfloat16 if ctx.gpu else torch.float32
    params = make_params(model["hidden_size"], residual=True, device=ctx.device).replace(tau=0.0, alpha=0.1)
    prompt = torch.randint(3, model["vocab_size"], (1, DRY_PROMPT if ctx.dry else PROMPT),
                           generator=torch.Generator().manual_seed(0)).to(ctx.device)
    token = prompt[:, -1:].clone()
    configs = e2e_configs(model["num_hidden_layers"])
    runs, rows = [], {}
    with torch.inference_mode():
        for config in configs:
            row = {"config": config["config"], "mode": config["mode"], "layers": config["layers"]}
            if sec.out_of_time():
                rows[config["config"]] = sec.skip(row)
                continue
            sec.starting(config["config"])
            try:
                runs.append(capture_decode_step(config, model, ctx.device, dtype, params, prompt, token))
            except Exception as e:
                rows[config["config"]] = sec.add({**row, **error_fields(e)})
        if runs:
            sec.starting("timing the captured steps")
            samples = replay_rounds(runs, ctx.reps(REPLAYS), rounds=ctx.reps(10))
    base = next((r for r in runs if not r["layers"]), None)
    for r in runs:
        row = {"config": r["config"], "mode": r["mode"], "layers": r["layers"],
               "finite": bool(torch.isfinite(r["logits"]).all())}
        if base is not None:
            row["differs_from_unpatched"] = bool((r["logits"].float() - base["logits"].float()).abs().max() > 0)
        row["ok"] = row["finite"] and (not r["layers"] or row.get("differs_from_unpatched") is not False)
        stats = timing.stats_of(samples[r["config"]])
        row.update(median_us=stats.median * 1e6, p20_us=stats.p20 * 1e6, p80_us=stats.p80 * 1e6)
        if base is not None:
            row["ratio"] = stats.median / timing.stats_of(samples[base["config"]]).median
        rows[r["config"]] = sec.add(row)
        if r["handle"] is not None:
            r["handle"].remove()
    order = [c["config"] for c in configs]
    sec.record["rows"] = sorted(rows.values(), key=lambda row: order.index(row["config"]))
    decode_ops(sec, ctx)
    return {"graphs": ctx.gpu, "model": model, "dtype": str(dtype).replace("torch.", ""),
            "context": prompt.shape[1] + (3 if ctx.gpu else 0),
            "note": "" if ctx.gpu else "CPU dry run: steps ran eagerly, no CUDA graph"}


def decode_ops(sec, ctx) -> None:
    """The decode ops alone at one row (rows under ``ops``): query mode's ``apply_delta_`` and token mode's
    ``steer_`` on a row whose gate is open and on one whose gate is closed, and ``steer_bank_`` (the bank kernel,
    a bank of that one steerer) on the open one, each call on a fresh row (`time_on_fresh_rows`), each checked
    against the reference. The gate-open ops run twice, with programmatic dependent launch off and on
    (`finesteer_kernels.pdl`: its gain only shows between back-to-back launches, as in the graph here);
    ``pdl_launched`` says whether the launches really used it (never when interpreted)."""
    import torch

    import finesteer_kernels as fk
    from benchmarks.cases import REL_TOL, make_params, random_rows
    from benchmarks.gpu.steer_case import launched_config, shape_of
    from finesteer_kernels import pdl, reference
    from finesteer_kernels.bank_kernel import bank_launch, bank_shape
    from finesteer_kernels.bank_perf_model import predict_bank
    from finesteer_kernels.kernel_common import Layout, card_for
    from finesteer_kernels.pdl_model import pdl_gain as pdl_gain_predicted
    from finesteer_kernels.perf_model import predict_apply_delta, predict_steer
    from finesteer_kernels.ops import _kernel_args

    for d in DRY_OP_WIDTHS if ctx.dry else OP_WIDTHS:
        params = make_params(d, residual=True, device=ctx.device)
        candidates = random_rows(params.to("cpu"), 8, seed=3, dtype=torch.bfloat16).to(ctx.device)
        gate = reference.gate(candidates.float(), params).bool()  # the rows sit clearly on either side of tau
        if gate.all() or not gate.any():
            raise AssertionError(f"d={d}: the candidate rows are all on one side of the gate; pick another seed")
        rows = {True: candidates[gate.nonzero()[0, 0]].reshape(1, 1, d),
                False: candidates[(~gate).nonzero()[0, 0]].reshape(1, 1, d)}
        with torch.inference_mode():
            delta = fk.coef_delta(fk.synthesize(rows[True][0], params), params)
        _, layout = _kernel_args(candidates, params)
        row = rows[True].reshape(1, d)
        token_config = launched_config(row, Layout(*layout))
        card = card_for(row)
        bank, to_steerer = fk.SteerBank({"open": params}), torch.zeros(1, dtype=torch.long, device=ctx.device)
        bank_plan, bank_layout = fk.plan_rows(to_steerer, 1), bank.pack(row.dtype, row.device).layout
        bank_config, programs = bank_launch(1, d, bank_layout, row.element_size(), card)
        predicted = {"query: apply_delta_": predict_apply_delta(1, d, row.element_size(), 1, card),
                     "token: steer_": predict_steer(shape_of(row, Layout(*layout)), token_config, card),
                     "bank: steer_bank_": predict_bank([bank_shape(1, d, bank_layout, row.element_size())],
                                                       bank_config, card, in_place=True, programs=programs)}
        ops = [("query: apply_delta_", True, lambda h: fk.apply_delta_(h, delta),
                lambda h0: reference.apply_delta(h0, delta), {})]
        ops += [("token: steer_", gate_open, lambda h: fk.steer_(h, params), lambda h0: reference.steer(h0, params),
                 {"config": token_config.short()}) for gate_open in (True, False)]
        ops.append(("bank: steer_bank_", True, lambda h: fk.steer_bank_(h, bank, to_steerer, bank_plan),
                    lambda h0: reference.steer(h0, params), {"config": bank_config.short()}))
        for name, gate_open, op, expected, extra in ops:
            h0 = rows[gate_open]
            for use_pdl in (False, True) if gate_open else (False,):
                def measure(op=op, h0=h0, expected=expected, use_pdl=use_pdl):
                    with pdl.forced(use_pdl):
                        return {"pdl_launched": pdl.pdl_enabled(h0),
                                **time_on_fresh_rows(op, h0, expected(h0), ctx, REL_TOL[torch.bfloat16])}

                model = {MODEL_KEY: pdl_gain_predicted(predicted[name])["speedup"]} if use_pdl else {}
                sec.measure({"op": name, "d": d, "gate_open": gate_open, "pdl": use_pdl, **extra, **model}, measure,
                            f"{name} d={d} gate {'open' if gate_open else 'closed'}{' PDL' if use_pdl else ''}",
                            key="ops")


def time_on_fresh_rows(op, h0, expected, ctx, tol: float) -> dict:
    """``op`` (in place) on ``calls`` copies of ``h0``, one copy per call, captured in one CUDA graph; the copies
    are restored from ``h0`` before each replay (outside the timed region; L2 stays warm, as a decode step's row
    is). The last replay started from restored copies, so afterwards every copy must equal ``expected`` (one
    application, nothing compounded). On a CPU (the dry run) a loop of eager calls stands in for the graph."""
    import torch

    from benchmarks import timing
    from benchmarks.cases import rel_error

    calls = CALLS_PER_GRAPH if ctx.gpu else DRY_CALLS_PER_GRAPH
    copies = h0.expand(calls, *h0.shape).clone()
    restore = lambda: copies.copy_(h0.expand_as(copies))  # noqa: E731
    turn = [0]

    def each_copy_once():  # consecutive turns cover every copy once, wherever the count starts
        for _ in range(calls):
            op(copies[turn[0] % calls])
            turn[0] += 1

    with torch.inference_mode():
        stats = timing.time_graph(each_copy_once, ctx.device, reps=ctx.reps(10), cold_l2=False, before_each=restore)
    err = max(rel_error(copies[i], expected) for i in range(calls))
    return {"median_us": stats.median / calls * 1e6, "p20_us": stats.p20 / calls * 1e6,
            "p80_us": stats.p80 / calls * 1e6, "reps": stats.reps, "calls_per_graph": calls,
            "max_rel_err": err, "ok": err <= tol}


def markdown(results: dict) -> list:
    from benchmarks.gpu.launch_floor import empty_us
    from benchmarks.report import fmt

    dec = results["sections"].get(NAME, {})
    lines = []
    if dec.get("rows"):
        how = "CUDA graph replay" if dec.get("graphs") else dec.get("note", "")
        lines += ["", f"**Decode step** ({dec.get('dtype', '-')}, {how})", "",
                  "| config | us | ratio to unpatched |", "| --- | --- | --- |"]
        lines += [f"| {r['config']} | {fmt(r.get('median_us'), '.1f', r.get('note') or r.get('error', '-')[:80])} | "
                  f"{fmt(r.get('ratio'), '.4f')} |" for r in dec["rows"]]
    if dec.get("ops"):
        empty = empty_us(results)
        lines += ["", "| decode op (each call on a fresh row) | d | gate | PDL | us per call (graph) | / empty kernel "
                  "| PDL off / on (model) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in dec["ops"]:
            ratio = r["median_us"] / empty if "median_us" in r and empty else None
            gain = pdl_gain(dec["ops"], r)
            lines.append(f"| {r['op']}{' ' + r['config'] if r.get('config') else ''} | {r['d']} | "
                         f"{'open' if r['gate_open'] else 'closed'} | {pdl_label(r)} | "
                         f"{fmt(r.get('median_us'), '.2f', r.get('note') or r.get('error', '-')[:80])} | "
                         f"{fmt(ratio, '.2f')} | "
                         f"{'-' if gain is None else f'{gain:.2f}x ({r[MODEL_KEY]:.2f}x predicted)'} |")
    return lines


def pdl_label(row: dict) -> str:
    """``on``, ``off``, or ``asked, not launched`` (the interpreter, or a card older than sm_90)."""
    if not row.get("pdl"):
        return "off"
    return "on" if row.get("pdl_launched") else "asked, not launched"


def pdl_gain(ops: list, row: dict):
    """For a row whose launches used PDL: its PDL-off twin's time over its own (None otherwise)."""
    if not row.get("pdl_launched") or "median_us" not in row:
        return None
    twin = next((r for r in ops if not r.get("pdl") and all(r.get(k) == row.get(k) for k in ("op", "d", "gate_open"))
                 and "median_us" in r), None)
    return None if twin is None else twin["median_us"] / row["median_us"]


def goals(results: dict) -> list:
    """A decode op <= 1.5x an empty kernel (gate open: the op's full work), <= 0.5 % with 3 steered layers. The
    goal is the single-steerer ops': the bank's row is there for its PDL off / on, its ratio is in the table."""
    from benchmarks.gpu.launch_floor import empty_us

    dec, empty, out = results["sections"].get(NAME, {}), empty_us(results), []
    for r in dec.get("ops", []):
        if "median_us" in r and empty and r["gate_open"] and not r["op"].startswith("bank"):
            ratio = r["median_us"] / empty
            pdl = f" (PDL {pdl_label(r)})" if r.get("pdl") else ""
            out.append(f"{r['op']}{pdl} d={r['d']}: {ratio:.2f}x an empty kernel (goal <= 1.5x: "
                       f"{'met' if ratio <= 1.5 else 'NOT met'})")
    for r in dec.get("rows", []):
        if r.get("layers") and len(r["layers"]) == 3 and r.get("ratio"):
            slow = 100 * (r["ratio"] - 1)
            out.append(f"decode, {r['config']}: +{slow:.2f} % (goal <= 0.5 %: {'met' if slow <= 0.5 else 'NOT met'})")
    return out
