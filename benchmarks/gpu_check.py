"""One call that settles the kernels' performance on the first lent GPU (v2): at most ~7 minutes on one H100/H200,
every compile included, the most important measurements first.

    python benchmarks/gpu_check.py                 # on a GPU; writes benchmarks/results/gpu_check.{json,md}
    python benchmarks/gpu_check.py --dry-run       # CPU: the same logic at tiny sizes, kernels interpreted

Sections, in order (each recorded in the JSON as it finishes, so a run cut short keeps what it measured; a
failing section is recorded with its error and the rest still run):

1. ``bandwidth``: the card, a device-to-device copy (the 100 % of every "% of copy" figure), the L2 read bandwidth
   (every SM re-reading a buffer of a quarter of L2) and one SM's read bandwidth (8 programs streaming from HBM),
   the three figures the bytes model assumes (finesteer_kernels/perf_model.py); the model is re-run with them.
2. ``empty_kernel``: a Triton kernel that does nothing, launched inside a CUDA graph (the decode floor).
3. ``prefill``: token-mode ``steer`` at T in {4096, 8192} x d in {4096, 8192}, bf16, r = 64, K = 8 with the
   residual MLP, for the eager reference, the byte-frugal eager version, torch.compile and the Triton kernels, each
   captured in a CUDA graph and replayed with a cold L2; % of measured copy bandwidth beside the model's prediction
   (as shipped, and with this run's measured bandwidths).
4. ``sweep``: at T = 8192, d = 4096, the model's best candidates and a few others (row tile x d block x warps x
   stages x split) timed the same way: how far the heuristic's pick is from the best measured, and whether the
   model ranks them right.
5. ``decode``: a SmolLM2-shaped decode step (random weights, bf16) captured in a CUDA graph, unpatched and with
   3 steered layers in query and token mode (ratio to unpatched); and the decode ops alone (query mode's
   ``apply_delta_``, token mode's split-d ``steer_``) against the empty kernel, in graphs.
6. ``correctness``: every op against the reference in bf16 and fp16, with and without the residual MLP, a CAA
   vector, a width that is not a multiple of 16, the split-d path at prefill and decode sizes.
7. ``bank``: a steerer bank (issue 13): a mixed batch of 4 steerers against the same batch on one steerer, token
   mode, T in {16, 4096}, d = 4096, bf16, in CUDA graphs, beside the bytes model's prediction (a few seconds).
8. ``fused_norm`` (issue 14): the steering edit fused with the next RMSNorm against the edit followed by the
   model's own RMSNorm module, token mode (``steer_rmsnorm_``) and query mode (``apply_delta_rmsnorm_``), bf16, at
   prefill (T in {4096, 8192}, d = 4096, CUDA graph, cold L2) and decode (T = 1, d in {576, 4096}, 100 calls a
   graph), checked and set beside the bytes model (`benchmarks/fused_norm_bench.py`). The decode section above
   also steps SmolLM2-shaped models patched with ``fuse_norm=True`` (3 layers, both modes).

The goals the issue holds the run to are printed last (>= 80 % of copy bandwidth at T >= 4096, >= 1.3x
torch.compile, decode op <= 1.5x an empty kernel, <= 0.5 % decode overhead with 3 steered layers). Exit status 1
when a section failed.

Needs torch with CUDA and Triton >= 3.2 (``tl.range(num_stages=)``, ``tl.gather``, atomics with ``sem``); written
for the lent machines' torch 2.11 and Triton 3.6, and nothing newer. ``--dry-run`` (no GPU) sets
TRITON_INTERPRET=1, shrinks every size, uses torch.compile's 'eager' backend, runs graphs eagerly once and times
nothing; CI runs it (tests/test_benchmarks_dry_run.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _early_env(argv) -> None:
    """TRITON_INTERPRET must be set before triton is first imported."""
    dry = "--dry-run" in (sys.argv[1:] if argv is None else argv)
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1" if dry else "8")


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# share of the time budget after which each section starts nothing new (the rest is left to later sections)
SECTION_DEADLINES = {"prefill": 0.45, "sweep": 0.70, "decode": 0.88, "fused_norm": 0.95}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", default=None, help=f"JSON path (default {RESULTS_DIR}/gpu_check[-dry-run].json); the "
                                               "markdown table goes beside it (.md)")
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds for the whole run (default 420); sections start nothing new past their share")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


class Sizes:
    def __init__(self, dry: bool):
        self.dry = dry
        # prefill shapes (T, d); the dry run keeps the structure at interpreter sizes
        self.prefill = [(20, 64), (40, 96)] if dry else [(4096, 4096), (8192, 4096), (4096, 8192), (8192, 8192)]
        self.sweep_shape = (40, 96) if dry else (8192, 4096)
        self.sweep_size = 3 if dry else 14
        self.reps = 0 if dry else 20
        self.check_widths = (64, 40) if dry else (4096, 1000)
        self.check_rows = (1, 5) if dry else (1, 77, 4096)
        self.copy_bytes = (8 << 20) if dry else (1 << 30)
        self.model = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128) if dry else \
            dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True)
        self.prompt = 6 if dry else 64
        self.replays = 0 if dry else 200
        self.decode_widths = (64,) if dry else (576, 4096)
        self.fused_norm = [(20, 64), (1, 40)] if dry else [(4096, 4096), (8192, 4096), (1, 576), (1, 4096)]


def run_section(results: dict, name: str, out_path: str, fn, *args):
    start = time.perf_counter()
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        out = fn(*args)
        results["sections"][name] = {"status": "ok", "seconds": time.perf_counter() - start, **(out or {})}
    except Exception as e:  # record and go on: one broken section must not hide the others' numbers
        results["sections"][name] = {"status": "failed", "seconds": time.perf_counter() - start,
                                     "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print(f"[gpu_check] section {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
    from benchmarks import report

    report.write_json(out_path, results)  # after every section: a run cut short keeps what it measured


# ---- 1. bandwidth -------------------------------------------------------------------------------------------------
def bandwidth_section(device, sizes: Sizes) -> dict:
    import torch

    from benchmarks import timing
    from finesteer_kernels.perf_model import DEFAULT_CARD, card_for_device

    copy = timing.copy_bandwidth_gbps(device, nbytes=sizes.copy_bytes)
    out = {"device": str(device), "copy": copy, "peak_gbps": timing.card_peak_gbps(device)}
    if device.type != "cuda":
        l2 = timing.l2_read_bandwidth_gbps(device, 1 << 20, interpreted=True)
        return {**out, "name": "CPU (dry run: host copy bandwidth, not a GPU figure)", "l2": l2,
                "card": dataclasses.asdict(DEFAULT_CARD)}
    props = torch.cuda.get_device_properties(device)
    card = card_for_device(device)
    l2 = timing.l2_read_bandwidth_gbps(device, card.l2_bytes)
    per_sm = timing.per_sm_bandwidth_gbps(device)
    measured = dataclasses.replace(card, hbm_gbps=copy["gbps"], l2_gbps=l2["gbps"],
                                   sm_gbps=per_sm["gbps_per_sm"])
    return {**out, "name": props.name, "sm_count": props.multi_processor_count,
            "l2_bytes_reported": getattr(props, "L2_cache_size", None), "capability": f"{props.major}.{props.minor}",
            "l2": l2, "per_sm": per_sm, "card": dataclasses.asdict(card),
            "card_measured": dataclasses.asdict(measured)}


def _cards(results: dict):
    """(the model's card as shipped, the card with this run's measured bandwidths) for predictions; the default
    card when the bandwidth section could not run."""
    from finesteer_kernels.perf_model import DEFAULT_CARD, Card

    bw = results["sections"].get("bandwidth", {})
    shipped = Card(**bw["card"]) if "card" in bw else DEFAULT_CARD
    measured = Card(**bw["card_measured"]) if "card_measured" in bw else shipped
    return shipped, measured


# ---- 2. empty kernel ----------------------------------------------------------------------------------------------
def empty_kernel_section(device, sizes: Sizes) -> dict:
    import torch

    from benchmarks import timing
    from benchmarks.empty_kernel import empty_kernel

    x = torch.empty(1, device=device)
    launch = lambda: empty_kernel[(1,)](x)  # noqa: E731
    launch()
    if sizes.dry:
        return {"note": "launched once under the Triton interpreter; not timed"}
    graph = timing.time_graph(launch, device, reps=20, cold_l2=False, calls_per_graph=100)
    eager = timing.measure(launch, device, budget_s=0.2, flush_l2=False)
    return {**graph.as_us(), "eager_median_us": eager.median * 1e6}


# ---- 3. prefill ---------------------------------------------------------------------------------------------------
def _shape_of(T: int, d: int, params):
    from finesteer_kernels.perf_model import Shape

    return Shape.of(T, d, 2, params.r, params.num_experts, params.m, params.k)


def _prediction(results: dict, shape, config=None) -> dict:
    """The model's time for ``shape`` (its own pick, or ``config``) on the shipped and on the measured card."""
    from finesteer_kernels.heuristics import best_steer
    from finesteer_kernels.perf_model import predict_steer, predict_v1

    out = {}
    for name, card in zip(("shipped", "measured"), _cards(results)):
        if card is None:
            continue
        pred = predict_steer(shape, config, card) if config else best_steer(shape, card)
        out[name] = {"time_us": pred.time_us, "pct_copy": 100 / pred.ratio, "config": pred.config.short(),
                     "bound": pred.bound}
        if name == "shipped" and config is None:
            out["v1_pct_copy"] = 100 / predict_v1(shape, card).ratio
    return out


def _time_or_run(fn, device, sizes: Sizes):
    """Median seconds of ``fn`` in a CUDA graph with a cold L2; on the dry run one eager call, untimed."""
    from benchmarks import timing

    if sizes.dry:
        fn()
        return None
    return timing.time_graph(fn, device, reps=sizes.reps).median


def prefill_section(device, sizes: Sizes, results: dict, deadline: float) -> dict:
    import torch

    from benchmarks.cases import REL_TOL, make_params, random_rows, rel_error
    from benchmarks.implementations import op_function
    from finesteer_kernels import reference

    copy = (results["sections"].get("bandwidth", {}).get("copy") or {}).get("gbps")
    rows = []
    impls = ("reference", "frugal", "compiled", "triton")
    fns = {impl: op_function(impl, "steer", compile_backend="eager" if sizes.dry else "inductor") for impl in impls}
    for T, d in sizes.prefill:
        params = make_params(d, residual=True, device=device)
        h = random_rows(params.to("cpu"), T, seed=T, dtype=torch.bfloat16).to(device)
        expected = reference.steer(h, params)
        ideal = 2 * h.numel() * 2
        shape = _shape_of(T, d, params)
        for impl in impls:
            row = {"T": T, "d": d, "impl": impl}
            if time.perf_counter() > deadline:
                rows.append({**row, "note": "skipped: time budget"})
                continue
            with torch.inference_mode():
                out = fns[impl](params, h)
                row["max_rel_err"] = rel_error(out, expected)
                row["ok"] = row["max_rel_err"] <= REL_TOL[torch.bfloat16]
                seconds = _time_or_run(lambda: fns[impl](params, h), device, sizes)
            if seconds is not None:
                row.update(median_us=seconds * 1e6, gbps=ideal / seconds / 1e9)
                row["pct_copy"] = 100 * row["gbps"] / copy if copy else None
            if impl == "triton":
                row["model"] = _prediction(results, shape)
            rows.append(row)
    bad = [r for r in rows if r.get("ok") is False]
    if bad:
        raise AssertionError(f"prefill results disagree with the reference: {bad}")
    return {"rows": rows, "note": "bytes counted: read and write h once (the ideal); CUDA graphs, cold L2"}


# ---- 4. config sweep ----------------------------------------------------------------------------------------------
def sweep_configs(shape, card, count: int) -> list:
    """The model's ``count`` best candidates, plus the best unsplit and a v1-like tile, the pick first."""
    from finesteer_kernels.heuristics import best_steer, steer_candidates
    from finesteer_kernels.perf_model import Config, predict_steer

    ranked = sorted(((predict_steer(shape, c, card).time_us, c) for c, _ in steer_candidates(shape, card)),
                    key=lambda pair: pair[0])
    chosen = [best_steer(shape, card).config]
    for extra in [c for _, c in ranked if c.SPLIT == 1][:1] + [Config(64, 64, 8, 3), Config(32, 64, 4, 2)]:
        if extra not in chosen:
            chosen.append(extra)
    for _, config in ranked:
        if len(chosen) >= count:
            break
        if config not in chosen:
            chosen.append(config)
    return chosen[:max(count, 2)]


def sweep_section(device, sizes: Sizes, results: dict, deadline: float) -> dict:
    import torch

    from benchmarks.cases import REL_TOL, make_params, random_rows, rel_error
    from finesteer_kernels import ops, reference
    from finesteer_kernels.kernel_common import Layout
    from finesteer_kernels.steer_kernel import launch_steer

    T, d = sizes.sweep_shape
    params = make_params(d, residual=True, device=device)
    h = random_rows(params.to("cpu"), T, seed=T, dtype=torch.bfloat16).to(device)
    expected = reference.steer(h, params)
    packed, layout = ops._kernel_args(h, params)
    shape = _shape_of(T, d, params)
    shipped, _ = _cards(results)
    copy = (results["sections"].get("bandwidth", {}).get("copy") or {}).get("gbps")
    rows = []
    for i, config in enumerate(sweep_configs(shape, shipped, sizes.sweep_size)):
        row = {"config": config.short(), "picked": i == 0}
        if time.perf_counter() > deadline:
            rows.append({**row, "note": "skipped: time budget"})
            continue
        out = torch.empty_like(h)
        run = lambda c=config: launch_steer(h, out, packed.w_in, packed.w_out, packed.mean, packed.consts,  # noqa
                                            Layout(*layout), params.tau, params.eps, params.alpha * params.gamma,
                                            config=c)
        try:
            with torch.inference_mode():
                seconds = _time_or_run(run, device, sizes)
                run()
        except Exception as e:  # one configuration that fails to compile or launch must not end the sweep
            rows.append({**row, "note": f"failed: {type(e).__name__}: {str(e)[:200]}"})
            continue
        row.update(ok=rel_error(out, expected) <= REL_TOL[torch.bfloat16], model=_prediction(results, shape, config))
        if seconds is not None:
            row.update(median_us=seconds * 1e6, pct_copy=100 * 2 * h.numel() * 2 / seconds / 1e9 / copy)
        rows.append(row)
    timed = [r for r in rows if "median_us" in r]
    summary = {}
    if timed:
        best = min(timed, key=lambda r: r["median_us"])
        pick = next((r for r in timed if r["picked"]), None)
        summary = {"best": best["config"], "pick_over_best": pick["median_us"] / best["median_us"] if pick else None}
        order_measured = [r["config"] for r in sorted(timed, key=lambda r: r["median_us"])]
        order_model = [r["config"] for r in sorted(timed, key=lambda r: r["model"]["shipped"]["time_us"])]
        summary["model_rank_agreement"] = sum(a == b for a, b in zip(order_measured, order_model)) / len(timed)
    if any(r.get("ok") is False for r in rows):
        raise AssertionError(f"sweep: a configuration disagrees with the reference: {rows}")
    return {"T": T, "d": d, "rows": rows, **summary}


# ---- 5. decode under CUDA graphs: a patched model step, and the op against an empty kernel --------------------
def _decode_model(sizes: Sizes, device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, **sizes.model)
    torch.manual_seed(0)  # every configuration gets the same weights
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype=dtype).eval()


def decode_section(device, sizes: Sizes) -> dict:
    """Capture one decode step per configuration (each on its own copy of the model, same weights), then time the
    replays in interleaved rounds.

    The cache is transformers' DynamicCache: its length is a Python int, so the patch's hooks know a decode step
    without reading the device (a StaticCache keeps its length in a device tensor, which query mode cannot read
    outside ``generate`` without a sync). The cache tensors the captured step reads are kept alive, so every replay
    recomputes the same step at a fixed context length.
    """
    import torch

    from benchmarks import timing
    from benchmarks.cases import make_params
    from benchmarks.e2e import e2e_configs
    from finesteer.patching import patch_model

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    n_layers = sizes.model["num_hidden_layers"]
    params = make_params(sizes.model["hidden_size"], residual=True, device=device).replace(tau=0.0, alpha=0.1)
    prompt = torch.randint(3, sizes.model["vocab_size"], (1, sizes.prompt),
                           generator=torch.Generator().manual_seed(0)).to(device)
    token = prompt[:, -1:].clone()
    runs = []
    with torch.inference_mode():
        for config in e2e_configs(n_layers):
            model = _decode_model(sizes, device, dtype)
            handle = (patch_model(model, {layer: params for layer in config["layers"]}, mode=config["mode"],
                                  fuse_norm=config["fuse_norm"]) if config["layers"] else None)
            prefill = model(input_ids=prompt, use_cache=True)  # query mode caches its coefficients here
            cache = prefill.cache
            run = {**config, "handle": handle, "model": model}

            def step(m=model, c=cache):
                position = torch.full((1, 1), c.get_seq_length(), device=device)
                return m(input_ids=token, position_ids=position, cache=c, use_cache=True).logits

            if gpu:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        step()
                torch.cuda.current_stream().wait_stream(side)
                run["keep_alive"] = [(layer.keys, layer.values) for layer in cache.layers]
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = step()
                graph.replay()
                torch.cuda.synchronize(device)
                run.update(graph=graph, logits=logits)
            else:
                run["logits"] = step()  # CPU: no CUDA graphs; the step runs eagerly once, untimed
            runs.append(run)
        samples = {r["config"]: [] for r in runs}
        if gpu:  # interleaved rounds over the graphs, as in the end-to-end benchmark
            per_sample = max(1, sizes.replays // 10)
            for _ in range(10):
                for r in runs:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(per_sample):
                        r["graph"].replay()
                    end.record()
                    end.synchronize()
                    samples[r["config"]].append(start.elapsed_time(end) * 1e-3 / per_sample)
    base_logits = runs[0]["logits"].float()
    out = []
    for r in runs:
        row = {"config": r["config"], "mode": r["mode"], "layers": r["layers"],
               "finite": bool(torch.isfinite(r["logits"]).all()),
               "differs_from_unpatched": bool((r["logits"].float() - base_logits).abs().max() > 0)}
        if gpu:
            stats = timing.stats_of(samples[r["config"]])
            row.update(median_us=stats.median * 1e6, p20_us=stats.p20 * 1e6, p80_us=stats.p80 * 1e6)
        out.append(row)
        if r["handle"] is not None:
            r["handle"].remove()
    if gpu:
        base = out[0]["median_us"]
        for row in out:
            row["ratio"] = row["median_us"] / base
    problems = [r["config"] for r in out if not r["finite"] or (r["layers"] and not r["differs_from_unpatched"])]
    if problems:
        raise AssertionError(f"decode step: non-finite logits or no visible edit in {problems}")
    return {"graphs": gpu, "model": sizes.model, "dtype": str(dtype).replace("torch.", ""),
            "context": sizes.prompt + (3 if gpu else 0),
            "note": "" if gpu else "CPU dry run: steps ran eagerly once, no CUDA graph, not timed", "rows": out,
            "ops": decode_ops_section(device, sizes)}


def decode_ops_section(device, sizes: Sizes) -> list:
    """The decode ops alone in CUDA graphs (100 calls a graph) against the empty kernel: query mode's
    ``apply_delta_`` on one sequence's row, token mode's split-d ``steer_`` at T = 1."""
    import torch

    from benchmarks import timing
    from benchmarks.cases import make_params, random_rows
    import finesteer_kernels as fk

    rows = []
    for d in sizes.decode_widths:
        params = make_params(d, residual=True, device=device)
        h = random_rows(params.to("cpu"), 1, seed=3, dtype=torch.bfloat16).to(device).reshape(1, 1, d)
        delta = fk.coef_delta(fk.synthesize(h[:, 0], params), params)
        for name, fn in (("query: apply_delta_", lambda: fk.apply_delta_(h, delta)),
                         ("token: steer_ (split-d)", lambda: fk.steer_(h, params))):
            with torch.inference_mode():
                fn()
                if device.type == "cuda":
                    stats = timing.time_graph(fn, device, reps=10, cold_l2=False, calls_per_graph=100)
                    rows.append({"op": name, "d": d, **stats.as_us()})
                else:
                    rows.append({"op": name, "d": d, "note": "interpreted once, not timed"})
    return rows


# ---- 6. correctness (compact: bf16 and fp16) ---------------------------------------------------------------------
def _check_cases(sizes: Sizes):
    """(name, params factory) covering the op's parts: full FineSteer with/without residual (relu and identity),
    CAA (no gate, one expert), and a width that is not a multiple of 16."""
    from benchmarks.cases import random_params

    wide, odd = sizes.check_widths
    return [
        ("finesteer d=%d" % wide, lambda: random_params(wide, min(64, wide // 2), 8, seed=3)),
        ("finesteer+res(relu) d=%d" % wide, lambda: random_params(wide, min(64, wide // 2), 8, residual="relu",
                                                                  m=32, k=8, seed=4)),
        ("finesteer+res(identity) d=%d" % odd, lambda: random_params(odd, 8, 3, residual="identity", seed=5)),
        ("caa d=%d" % odd, lambda: random_params(odd, 0, 1, seed=6)),
    ]


def correctness_section(device, sizes: Sizes) -> dict:
    import torch

    import finesteer_kernels as fk
    from benchmarks.cases import REL_TOL, random_rows, rel_error
    from benchmarks.implementations import forced_backend
    from finesteer_kernels import reference

    checks, failed = [], 0
    for name, factory in _check_cases(sizes):
        params_cpu = factory()
        params = params_cpu.to(device)
        for dtype_name, dtype in (('bf16', torch.bfloat16), ('fp16', torch.float16)):
            for rows in sizes.check_rows:
                h = random_rows(params_cpu, rows, seed=rows, dtype=dtype).to(device)
                seq = torch.arange(rows) % 3  # three sequences ...
                seq[1:2] = -1  # ... and row 1 left alone
                seq = seq.to(device)
                coef_ref = reference.synthesize(h, params)
                expected = {"steer": reference.steer(h, params), "synthesize": coef_ref,
                            "apply_coef": reference.apply_coef(h, coef_ref[:3], params, seq)}
                with forced_backend("triton"):
                    got = {"steer": fk.steer(h, params), "synthesize": fk.synthesize(h, params),
                           "apply_coef": fk.apply_coef(h, coef_ref[:3], params, seq),
                           "steer_": fk.steer_(h.clone(), params),
                           "apply_coef_": fk.ops.apply_coef_(h.clone(), coef_ref[:3], params, seq)}
                expected["steer_"], expected["apply_coef_"] = expected["steer"], expected["apply_coef"]
                for op, out in got.items():
                    ref = expected[op]
                    # coefficients are fp32 whatever h is; their tolerance is the input's (they come from h)
                    err = rel_error(out, ref) if out.shape == ref.shape and out.dtype == ref.dtype else float("inf")
                    ok = err <= REL_TOL[dtype]
                    failed += not ok
                    checks.append({"case": name, "dtype": dtype_name, "rows": rows, "op": op, "max_rel_err": err,
                                   "tol": REL_TOL[dtype], "ok": ok})
                if rows > 1 and params.has_gate:  # the gate must really switch: half the rows on, half off
                    on = reference.gate(h.float(), params)
                    checks.append({"case": name, "dtype": dtype_name, "rows": rows, "op": "gate mix",
                                   "max_rel_err": None, "tol": None, "ok": bool(0 < on.sum() < rows)})
                    failed += not checks[-1]["ok"]
    if failed:
        raise AssertionError(f"{failed} of {len(checks)} correctness checks failed: "
                             + "; ".join(f"{c['case']} {c['dtype']} T={c['rows']} {c['op']} err={c['max_rel_err']}"
                                         for c in checks if not c["ok"])[:2000])
    return {"checks": checks, "passed": len(checks)}


# ---- 7. the edit fused with the next RMSNorm (issue 14) -------------------------------------------------------------
def fused_norm_section(device, sizes: Sizes, deadline: float) -> dict:
    import torch

    from benchmarks.fused_norm_bench import fused_norm_rows

    rows = []
    for shape in sizes.fused_norm:
        if time.perf_counter() > deadline:
            rows.append({"T": shape[0], "d": shape[1], "note": "skipped: time budget"})
            continue
        rows += fused_norm_rows(device, [shape], torch.bfloat16, timed=not sizes.dry)
    bad = [r for r in rows if r.get("ok") is False]
    if bad:
        raise AssertionError(f"fused norm: results disagree with the separate edit and norm: {bad}")
    return {"rows": rows, "note": "separate = the steering op then transformers' LlamaRMSNorm module (eager); model "
                                  "figures: the steering kernel + a one-launch RMSNorm + a launch gap vs the fused "
                                  "kernel (predicted)"}


# ---- summary ------------------------------------------------------------------------------------------------------
# ---- 7. steerer bank (issue 13) -------------------------------------------------------------------------------------
def bank_section(device, sizes: Sizes) -> dict:
    """A mixed batch of 4 steerers against the same batch on one steerer, token mode, bf16, the bank kernel in a CUDA
    graph with a cold L2, beside the bytes model (`benchmarks.bank_bench`); checked against the bank reference."""
    import torch

    from benchmarks.bank_bench import assignments, make_bank, predictions
    from benchmarks.cases import random_rows, rel_error
    from finesteer_kernels import bank_reference, plan_rows, steer_bank

    rows = []
    for T, d in ([(20, 64)] if sizes.dry else [(16, 4096), (4096, 4096)]):
        bank = make_bank(d, device)
        h = random_rows(bank.params[0].to("cpu"), T, seed=T, dtype=torch.bfloat16).to(device)
        row = {"T": T, "d": d, "predicted": predictions(T, d, bank)}
        for name, index in assignments(T, device).items():
            plan = plan_rows(index, len(bank))
            with torch.inference_mode():
                err = rel_error(steer_bank(h, bank, index, plan), bank_reference.steer_bank(h, bank, index))
                seconds = _time_or_run(lambda: steer_bank(h, bank, index, plan), device, sizes)
            row[f"{name}_ok"] = err <= 1e-2
            if seconds is not None:
                row[f"{name}_us"] = seconds * 1e6
        if "mixed_us" in row:
            row["measured_ratio"] = row["mixed_us"] / row["uniform_us"]
        rows.append(row)
    bad = [r for r in rows if not (r["mixed_ok"] and r["uniform_ok"])]
    if bad:
        raise AssertionError(f"bank results disagree with the reference: {bad}")
    return {"rows": rows}


def _pct(value) -> str:
    from benchmarks.report import fmt

    return fmt(value, ".0f") + (" %" if value is not None else "")


def markdown_lines(results: dict) -> list[str]:
    """The run as markdown tables (also printed): every measured row beside the model's prediction."""
    from benchmarks.report import fmt

    s = results["sections"]
    env = results["environment"]
    lines = [f"## gpu_check {'(dry run) ' if results['dry_run'] else ''}{env.get('gpu', 'CPU')}, {env['date']}",
             f"torch {env['torch']}, triton {env['triton']}", ""]
    lines += ["| section | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {n} | {v['status']}{' ' + v['error'][:120] if v['status'] != 'ok' else ''} | {v['seconds']:.1f} |"
              for n, v in s.items()]
    bw = s.get("bandwidth", {})
    if bw.get("status") == "ok":
        l2, per_sm = bw.get("l2", {}), bw.get("per_sm", {})
        lines += ["", f"**Bandwidth** ({bw['name']}): copy {bw['copy']['gbps']:.0f} GB/s (peak {bw['peak_gbps']}), "
                  f"L2 read {fmt(l2.get('gbps'), '.0f')} GB/s, one SM {fmt(per_sm.get('gbps_per_sm'), '.1f')} GB/s; "
                  f"model assumed L2 {bw['card']['l2_gbps']:.0f}, one SM {bw['card']['sm_gbps']:.0f} GB/s"]
    empty = s.get("empty_kernel", {})
    if "median_us" in empty:
        lines.append(f"**Empty kernel** in a graph: {empty['median_us']:.2f} us per launch")
    pre = s.get("prefill", {})
    if pre.get("rows"):
        lines += ["", "**Prefill** (steer, bf16, r=64 K=8 m=32 k=8; CUDA graph, cold L2; % of measured copy)", "",
                  "| T | d | impl | us | % copy | model % copy (shipped / measured bw) | model config | v1 model |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in pre["rows"]:
            m = r.get("model", {})
            model = (f"{_pct(m.get('shipped', {}).get('pct_copy'))} / {_pct(m.get('measured', {}).get('pct_copy'))}"
                     if m else "")
            lines.append(f"| {r['T']} | {r['d']} | {r['impl']} | {fmt(r.get('median_us'), '.1f', r.get('note', '-'))}"
                         f" | {_pct(r.get('pct_copy'))} | {model} | {m.get('shipped', {}).get('config', '')} | "
                         f"{_pct(m.get('v1_pct_copy')) if m else ''} |")
    sw = s.get("sweep", {})
    if sw.get("rows"):
        lines += ["", f"**Config sweep** T={sw['T']} d={sw['d']} (pick first; pick / best measured = "
                  f"{fmt(sw.get('pick_over_best'), '.2f')}, best {sw.get('best', '-')})", "",
                  "| config | us | % copy | model us (shipped / measured bw) |", "| --- | --- | --- | --- |"]
        for r in sw["rows"]:
            m = r.get("model", {})
            lines.append(f"| {r['config']}{' (pick)' if r['picked'] else ''} | "
                         f"{fmt(r.get('median_us'), '.1f', r.get('note', '-'))} | {_pct(r.get('pct_copy'))} | "
                         f"{fmt(m.get('shipped', {}).get('time_us'), '.1f')} / "
                         f"{fmt(m.get('measured', {}).get('time_us'), '.1f')} |")
    dec = s.get("decode", {})
    if dec.get("rows"):
        lines += ["", f"**Decode step** ({dec['dtype']}, {'CUDA graph replay' if dec['graphs'] else dec['note']})",
                  "", "| config | us | ratio to unpatched |", "| --- | --- | --- |"]
        lines += [f"| {r['config']} | {fmt(r.get('median_us'), '.1f')} | {fmt(r.get('ratio'), '.4f')} |"
                  for r in dec["rows"]]
        lines += ["", "| decode op | d | us per call (graph) | / empty kernel |", "| --- | --- | --- | --- |"]
        for r in dec.get("ops", []):
            ratio = r["median_us"] / empty["median_us"] if "median_us" in r and "median_us" in empty else None
            lines.append(f"| {r['op']} | {r['d']} | {fmt(r.get('median_us'), '.2f', r.get('note', '-'))} | "
                         f"{fmt(ratio, '.2f')} |")
    fused = s.get("fused_norm", {})
    if fused.get("rows"):
        lines += ["", "**Fused with the next RMSNorm** (bf16; separate = op + LlamaRMSNorm module; model: H200 "
                  "predicted)", "", "| mode | T | d | separate us | fused us | separate / fused | model MB sep / fused "
                  "| model us sep / fused |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in fused["rows"]:
            m = r.get("model", {}).get("H200")
            model = (f"{m['separate_mb']:.2f} / {m['fused_mb']:.2f} | {m['separate_us']:.1f} / {m['fused_us']:.1f}"
                     if m else "- | -")
            lines.append(f"| {r.get('mode', '-')} | {r['T']} | {r['d']} | {fmt(r.get('separate_us'), '.1f', r.get('note', '-'))}"
                         f" | {fmt(r.get('fused_us'), '.1f')} | {fmt(r.get('ratio'), '.2f')} | {model} |")
    corr = s.get("correctness", {})
    if corr.get("status") == "ok":
        lines.append(f"\n**Correctness**: {corr['passed']} checks passed (bf16, fp16)")
    if not results["dry_run"]:
        lines += ["", "**Goals**"] + [f"- {g}" for g in goals(results)]
    return lines


def goals(results: dict) -> list[str]:
    """The issue's goals for this run, each with its measured value."""
    s = results["sections"]
    out = []
    pre = {(r["T"], r["d"], r["impl"]): r for r in s.get("prefill", {}).get("rows", [])}
    for (T, d, impl), r in pre.items():
        if impl != "triton" or "median_us" not in r:
            continue
        comp = pre.get((T, d, "compiled"), {})
        speed = comp["median_us"] / r["median_us"] if "median_us" in comp else None
        out.append(f"T={T} d={d}: {r['pct_copy']:.0f} % of copy (goal >= 80 %: "
                   f"{'met' if r['pct_copy'] >= 80 else 'NOT met'}); vs torch.compile "
                   f"{'-' if speed is None else f'{speed:.2f}x'} (goal >= 1.3x)")
    empty = s.get("empty_kernel", {}).get("median_us")
    for r in s.get("decode", {}).get("ops", []):
        if "median_us" in r and empty:
            ratio = r["median_us"] / empty
            out.append(f"{r['op']} d={r['d']}: {ratio:.2f}x an empty kernel (goal <= 1.5x: "
                       f"{'met' if ratio <= 1.5 else 'NOT met'})")
    for r in s.get("decode", {}).get("rows", []):
        if r.get("layers") and len(r["layers"]) == 3 and r.get("ratio"):
            slow = 100 * (r["ratio"] - 1)
            out.append(f"decode, {r['config']}: +{slow:.2f} % (goal <= 0.5 %: {'met' if slow <= 0.5 else 'NOT met'})")
    return out


def main(argv=None) -> int:
    _early_env(argv)
    args = build_parser().parse_args(argv)
    import torch

    from benchmarks import report
    from benchmarks.cases import interpreting

    started = time.perf_counter()
    if args.dry_run:
        if not interpreting():
            print("gpu_check: --dry-run needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
            return 2
        device = torch.device("cpu")
        torch.set_num_threads(1)  # a shared CPU: a second OpenMP thread waiting for a busy core costs milliseconds
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --dry-run to check the logic on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    sizes = Sizes(args.dry_run)
    out_path = args.out or os.path.join(RESULTS_DIR, "gpu_check-dry-run.json" if args.dry_run else "gpu_check.json")
    results = {"dry_run": args.dry_run, "environment": report.environment(str(device)), "sections": {}}
    deadline = {k: started + share * args.time_budget for k, share in SECTION_DEADLINES.items()}
    run_section(results, "bandwidth", out_path, bandwidth_section, device, sizes)
    run_section(results, "empty_kernel", out_path, empty_kernel_section, device, sizes)
    run_section(results, "prefill", out_path, prefill_section, device, sizes, results, deadline["prefill"])
    run_section(results, "sweep", out_path, sweep_section, device, sizes, results, deadline["sweep"])
    run_section(results, "decode", out_path, decode_section, device, sizes)
    run_section(results, "correctness", out_path, correctness_section, device, sizes)
    run_section(results, "bank", out_path, bank_section, device, sizes)
    run_section(results, "fused_norm", out_path, fused_norm_section, device, sizes, deadline["fused_norm"])
    lines = markdown_lines(results)
    results["goals"] = [] if args.dry_run else goals(results)
    results["elapsed_s"] = time.perf_counter() - started
    report.write_json(out_path, results)
    with open(os.path.splitext(out_path)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out_path} in {results['elapsed_s']:.0f} s")
    failed = [n for n, s in results["sections"].items() if s["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
