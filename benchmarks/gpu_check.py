"""One call that settles the kernels' performance on the first lent GPU (v3): about 6 minutes on one H100/H200 with
a cold Triton cache, every compile included, the most important measurements first.

On a lent machine (only what is written under $OUT comes back; run it under an outer ``timeout``, unbuffered, so
that a hang still leaves the JSON of every finished row)::

    PYTHONUNBUFFERED=1 timeout 540 python benchmarks/gpu_check.py --out "$OUT/gpu_check.json"

    python benchmarks/gpu_check.py --dry-run       # CPU: the same logic at tiny sizes, kernels interpreted

Without ``--out`` the JSON goes to ``$OUT/gpu_check.json`` when ``$OUT`` is set, else to
``benchmarks/results/gpu_check.json``; the markdown tables are written beside it (``.md``). The JSON is rewritten
after every row, with the item in progress named, so a run cut short (a hang, the outer timeout) keeps every
finished row and says where it stopped.

Sections, in order; each has a deadline (a share of ``--time-budget``, 420 s) past which it starts nothing new, and
a section whose deadline has passed is recorded as skipped. A failing row or section is recorded with its error
and the rest still run. Cold-cache estimates: one steering-kernel variant takes ~4 s to compile (Triton 3.9's
passes and ptxas for sm_90a, timed on this project's CPU machine), the small kernels ~0.3 s, torch.compile ~20 s
for its first graph:

==============  =====================================================================  ==========  ========
section         what                                                                    compiles    estimate
==============  =====================================================================  ==========  ========
bandwidth       the card; device-to-device copy (the 100 % of every "% of copy"); L2   2 small     10 s
                read bandwidth (every SM re-reading a quarter of L2); one SM's read
                bandwidth (8 programs streaming HBM): the model's inputs, re-run
split_d_smoke   the split-d token-mode kernel against the reference at a prefill       4           20 s
                (T = 4096) and a decode (T = 1) shape, d = 4096, bf16, in place and
                out of place, in the configurations the heuristic picks (the later
                sections reuse them): the spin waits' first run, before anything else
empty_kernel    a Triton kernel that does nothing, in a CUDA graph (the decode floor)  1 small     3 s
prefill         token-mode steer at T in {4096, 8192} x d in {4096, 8192}, bf16,       1 + 4 tc    70 s
                r = 64, K = 8, residual MLP: eager reference, byte-frugal eager,
                torch.compile, Triton, each in a CUDA graph with a cold L2; % of copy
                beside the model (as shipped and with the measured bandwidths)
sweep           T = 8192, d = 4096: the model's best candidates and a few others        ~11         50 s
                (pick first): pick / best measured, and the model's ranking
decode          a SmolLM2-shaped decode step (random weights, bf16) in a CUDA graph,   ~18         65 s
                unpatched and with 1 and 3 steered layers in both modes and with
                ``fuse_norm``, each configuration on its own (one that fails leaves
                the others' rows); the decode ops alone against the empty kernel
correctness     every op against the reference: the four layouts (relu and identity    ~20         60 s
                MLP, CAA, a width not a multiple of 16) in bf16 at 77 rows, the full
                layout also in fp16 and at one row, in place on the first
bank            a mixed batch of 4 steerers against one steerer, T in {16, 4096},       2           12 s
                d = 4096, in CUDA graphs, beside the model
fused_norm      the edit fused with the next RMSNorm against the edit then the         ~8          30 s
                model's LlamaRMSNorm, both modes, prefill and decode shapes
==============  =====================================================================  ==========  ========

About 320 s in all (tc: torch.compile graphs); the deadlines leave the rest of the 420 s for a slower compile. The
goals the issue holds the run to are printed last (>= 80 % of copy bandwidth at T >= 4096, >= 1.3x torch.compile,
decode op <= 1.5x an empty kernel, <= 0.5 % decode overhead with 3 steered layers). Exit status 1 when a section
failed (skipped ones are reported, not failed).

Needs torch with CUDA and Triton >= 3.2 (``tl.range(num_stages=)``, ``tl.gather``, atomics with ``sem``); written
for the lent machines' torch 2.11, Triton 3.6 and transformers 5.17 (whose models take ``past_key_values``, where
5.24 takes ``cache``: `benchmarks.e2e.cache_kwarg`), and nothing newer. ``--dry-run`` (no GPU) sets
TRITON_INTERPRET=1, shrinks every size, passes the split-d configurations explicitly (the interpreter's launches
otherwise pin one unsplit configuration), uses torch.compile's 'eager' backend, runs graphs eagerly once and
times nothing; CI runs it (tests/test_benchmarks_dry_run.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.report import Section

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
# (section, share of the time budget after which it starts nothing new), in the order they run
SECTIONS = (("bandwidth", 0.05), ("split_d_smoke", 0.12), ("empty_kernel", 0.13), ("prefill", 0.38),
            ("sweep", 0.50), ("decode", 0.66), ("correctness", 0.80), ("bank", 0.86), ("fused_norm", 0.95))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json when $OUT is set, else "
                                               f"{RESULTS_DIR}/gpu_check[-dry-run].json); the markdown tables go "
                                               "beside it (.md)")
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds for the whole run (default 420); sections start nothing new past their share")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def default_out(dry: bool) -> str:
    if os.environ.get("OUT") and not dry:
        return os.path.join(os.environ["OUT"], "gpu_check.json")
    return os.path.join(RESULTS_DIR, "gpu_check-dry-run.json" if dry else "gpu_check.json")


class Sizes:
    def __init__(self, dry: bool):
        self.dry = dry
        # prefill shapes (T, d); the dry run keeps the structure at interpreter sizes
        self.prefill = [(20, 64), (40, 96)] if dry else [(4096, 4096), (8192, 4096), (4096, 8192), (8192, 8192)]
        # split-d smoke: (T, d, the configuration under the interpreter; on a GPU the heuristic's pick)
        from finesteer_kernels.perf_model import Config

        self.smoke = [(40, 96, Config(16, 32, 4, 1, SPLIT=2)), (1, 96, Config(16, 32, 4, 1, SPLIT=3))] if dry else \
            [(4096, 4096, None), (1, 4096, None)]
        self.sweep_shape = (40, 96) if dry else (8192, 4096)
        self.sweep_size = 3 if dry else 12
        self.reps = 0 if dry else 20
        self.check_widths = (64, 40) if dry else (4096, 1000)
        self.check_rows = 5 if dry else 77
        self.copy_bytes = (8 << 20) if dry else (1 << 30)
        self.model = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128) if dry else \
            dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True)
        self.prompt = 6 if dry else 64
        self.replays = 0 if dry else 200
        self.decode_widths = (64,) if dry else (576, 4096)
        self.bank = [(20, 64)] if dry else [(16, 4096), (4096, 4096)]
        self.fused_norm = [(20, 64), (1, 40)] if dry else [(4096, 4096), (8192, 4096), (1, 576), (1, 4096)]


# ---- 1. bandwidth -------------------------------------------------------------------------------------------------
def bandwidth_section(sec: Section, device, sizes: Sizes) -> dict:
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


def _copy_gbps(results: dict):
    return (results["sections"].get("bandwidth", {}).get("copy") or {}).get("gbps")


# ---- 2. split-d smoke ---------------------------------------------------------------------------------------------
def _steer_case(d: int, T: int, device, seed: int = 0):
    """(params with the residual MLP, bf16 rows, the reference output, the packed operands, the layout)."""
    import torch

    from benchmarks.cases import make_params, random_rows
    from finesteer_kernels import ops, reference
    from finesteer_kernels.kernel_common import Layout

    params = make_params(d, residual=True, device=device, seed=seed)
    h = random_rows(params.to("cpu"), T, seed=T, dtype=torch.bfloat16).to(device)
    packed, layout = ops._kernel_args(h, params)
    return params, h, reference.steer(h, params), packed, Layout(*layout)


def _launch(h, out, params, packed, layout, config):
    from finesteer_kernels.steer_kernel import launch_steer

    launch_steer(h, out, packed.w_in, packed.w_out, packed.mean, packed.consts, layout, params.tau, params.eps,
                 params.alpha * params.gamma, config=config)


def split_d_smoke_section(sec: Section, device, sizes: Sizes) -> dict:
    """The split-d layout (programs waiting on each other's flags) against the reference, in place and out of
    place, before any other section launches it: if a wait never ends, this is where, and the rows before it are
    in the JSON."""
    import torch

    from benchmarks.cases import REL_TOL, rel_error
    from finesteer_kernels.heuristics import steer_config
    from finesteer_kernels.kernel_common import card_for, shape_of

    for T, d, dry_config in sizes.smoke:
        params, h, expected, packed, layout = _steer_case(d, T, device)
        config = dry_config or steer_config(shape_of(T, d, layout, 2), card_for(h))
        for variant in ("out of place", "in place"):
            row = {"T": T, "d": d, "variant": variant, "config": config.short()}
            if sec.out_of_time():
                sec.skip(row)
                continue
            sec.starting(f"T={T} d={d} {variant} {config.short()}")
            with torch.inference_mode():
                # out of place into NaN (a row the kernel fails to write shows); in place on a copy of h
                out = h.clone() if variant == "in place" else torch.full_like(h, float("nan"))
                _launch(out if variant == "in place" else h, out, params, packed, layout, config)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            err = rel_error(out, expected)
            sec.add({**row, "max_rel_err": err, "ok": err <= REL_TOL[torch.bfloat16],
                     **({} if config.SPLIT > 1 else {"note": "the heuristic did not split d (FINESTEER_SPLIT_D=0?)"})})
    bad = [r for r in sec.record["rows"] if r.get("ok") is False]
    if bad:
        raise AssertionError(f"split-d smoke: results disagree with the reference: {bad}")


# ---- 3. empty kernel ----------------------------------------------------------------------------------------------
def empty_kernel_section(sec: Section, device, sizes: Sizes) -> dict:
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


# ---- 4. prefill ---------------------------------------------------------------------------------------------------
def _shape_of(T: int, d: int, params):
    from finesteer_kernels.perf_model import Shape

    return Shape.of(T, d, 2, params.r, params.num_experts, params.m, params.k)


def _prediction(results: dict, shape, config=None) -> dict:
    """The model's time for ``shape`` (its own pick, or ``config``) on the shipped and on the measured card."""
    from finesteer_kernels.heuristics import best_steer
    from finesteer_kernels.perf_model import predict_steer, predict_v1

    out = {}
    for name, card in zip(("shipped", "measured"), _cards(results)):
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


def prefill_section(sec: Section, device, sizes: Sizes, results: dict) -> dict:
    import torch

    from benchmarks.cases import REL_TOL, rel_error
    from benchmarks.implementations import op_function

    copy = _copy_gbps(results)
    impls = ("reference", "frugal", "compiled", "triton")
    fns = {impl: op_function(impl, "steer", compile_backend="eager" if sizes.dry else "inductor") for impl in impls}
    for T, d in sizes.prefill:
        params, h, expected, _, _ = _steer_case(d, T, device)
        ideal = 2 * h.numel() * 2
        for impl in impls:
            row = {"T": T, "d": d, "impl": impl}
            if sec.out_of_time():
                sec.skip(row)
                continue
            sec.starting(f"T={T} d={d} {impl}")
            with torch.inference_mode():
                row["max_rel_err"] = rel_error(fns[impl](params, h), expected)
                row["ok"] = row["max_rel_err"] <= REL_TOL[torch.bfloat16]
                seconds = _time_or_run(lambda: fns[impl](params, h), device, sizes)
            if seconds is not None:
                row.update(median_us=seconds * 1e6, gbps=ideal / seconds / 1e9)
                row["pct_copy"] = 100 * row["gbps"] / copy if copy else None
            if impl == "triton":
                row["model"] = _prediction(results, _shape_of(T, d, params))
            sec.add(row)
    bad = [r for r in sec.record["rows"] if r.get("ok") is False]
    if bad:
        raise AssertionError(f"prefill results disagree with the reference: {bad}")
    return {"note": "bytes counted: read and write h once (the ideal); CUDA graphs, cold L2"}


# ---- 5. config sweep ----------------------------------------------------------------------------------------------
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


def sweep_section(sec: Section, device, sizes: Sizes, results: dict) -> dict:
    import torch

    from benchmarks.cases import REL_TOL, rel_error

    T, d = sizes.sweep_shape
    params, h, expected, packed, layout = _steer_case(d, T, device)
    shape = _shape_of(T, d, params)
    shipped, _ = _cards(results)
    copy = _copy_gbps(results)
    for i, config in enumerate(sweep_configs(shape, shipped, sizes.sweep_size)):
        row = {"config": config.short(), "picked": i == 0}
        if sec.out_of_time():
            sec.skip(row)
            continue
        sec.starting(config.short())
        out = torch.empty_like(h)
        try:
            with torch.inference_mode():
                seconds = _time_or_run(lambda c=config: _launch(h, out, params, packed, layout, c), device, sizes)
                _launch(h, out, params, packed, layout, config)
        except Exception as e:  # one configuration that fails to compile or launch must not end the sweep
            sec.add({**row, "note": f"failed: {type(e).__name__}: {str(e)[:200]}"})
            continue
        row.update(ok=rel_error(out, expected) <= REL_TOL[torch.bfloat16], model=_prediction(results, shape, config))
        if seconds is not None:
            row.update(median_us=seconds * 1e6, pct_copy=100 * 2 * h.numel() * 2 / seconds / 1e9 / copy)
        sec.add(row)
    rows = sec.record["rows"]
    timed = [r for r in rows if "median_us" in r]
    summary = {"T": T, "d": d}
    if timed:
        best = min(timed, key=lambda r: r["median_us"])
        pick = next((r for r in timed if r["picked"]), None)
        summary.update(best=best["config"], pick_over_best=pick["median_us"] / best["median_us"] if pick else None)
        order_measured = [r["config"] for r in sorted(timed, key=lambda r: r["median_us"])]
        order_model = [r["config"] for r in sorted(timed, key=lambda r: r["model"]["shipped"]["time_us"])]
        summary["model_rank_agreement"] = sum(a == b for a, b in zip(order_measured, order_model)) / len(timed)
    if any(r.get("ok") is False for r in rows):
        raise AssertionError(f"sweep: a configuration disagrees with the reference: {rows}")
    return summary


# ---- 6. decode under CUDA graphs: a patched model step, and the op against an empty kernel --------------------
def decode_section(sec: Section, device, sizes: Sizes) -> dict:
    """Capture one decode step per configuration (`benchmarks.e2e.capture_decode_step`: each on its own copy of the
    model, same weights, each in its own try, so one that fails leaves the others' rows), then time the replays in
    interleaved rounds."""
    import torch

    from benchmarks import timing
    from benchmarks.cases import make_params
    from benchmarks.e2e import capture_decode_step, e2e_configs, replay_rounds

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    params = make_params(sizes.model["hidden_size"], residual=True, device=device).replace(tau=0.0, alpha=0.1)
    prompt = torch.randint(3, sizes.model["vocab_size"], (1, sizes.prompt),
                           generator=torch.Generator().manual_seed(0)).to(device)
    token = prompt[:, -1:].clone()
    configs = e2e_configs(sizes.model["num_hidden_layers"])
    runs, rows = [], {}
    with torch.inference_mode():
        for config in configs:
            row = {"config": config["config"], "mode": config["mode"], "layers": config["layers"]}
            if sec.out_of_time():
                rows[config["config"]] = sec.skip(row)
                continue
            sec.starting(config["config"])
            try:
                runs.append(capture_decode_step(config, sizes.model, device, dtype, params, prompt, token))
            except Exception as e:
                rows[config["config"]] = sec.add({**row, "error": f"{type(e).__name__}: {str(e)[:300]}",
                                                  "traceback": traceback.format_exc()[-2000:]})
        if gpu and runs:
            sec.starting("timing the captured steps")
            samples = replay_rounds(runs, sizes.replays)
    base = next((r for r in runs if not r["layers"]), None)
    for r in runs:
        row = {"config": r["config"], "mode": r["mode"], "layers": r["layers"],
               "finite": bool(torch.isfinite(r["logits"]).all())}
        if base is not None:
            row["differs_from_unpatched"] = bool((r["logits"].float() - base["logits"].float()).abs().max() > 0)
        if gpu:
            stats = timing.stats_of(samples[r["config"]])
            row.update(median_us=stats.median * 1e6, p20_us=stats.p20 * 1e6, p80_us=stats.p80 * 1e6)
            if base is not None:
                row["ratio"] = stats.median / timing.stats_of(samples[base["config"]]).median
        rows[r["config"]] = sec.add(row)
        if r["handle"] is not None:
            r["handle"].remove()
    order = [c["config"] for c in configs]
    sec.record["rows"] = sorted(rows.values(), key=lambda row: order.index(row["config"]))
    decode_ops(sec, device, sizes)
    problems = [r["config"] for r in sec.record["rows"] if "error" in r or r.get("finite") is False
                or (r["layers"] and r.get("differs_from_unpatched") is False)]
    if problems:
        raise AssertionError(f"decode step: failed, non-finite logits or no visible edit in {problems}")
    return {"graphs": gpu, "model": sizes.model, "dtype": str(dtype).replace("torch.", ""),
            "context": sizes.prompt + (3 if gpu else 0),
            "note": "" if gpu else "CPU dry run: steps ran eagerly once, no CUDA graph, not timed"}


def decode_ops(sec: Section, device, sizes: Sizes) -> None:
    """The decode ops alone in CUDA graphs (100 calls a graph) against the empty kernel: query mode's
    ``apply_delta_`` on one sequence's row, token mode's split-d ``steer_`` at T = 1 (rows under ``ops``)."""
    import torch

    from benchmarks import timing
    from benchmarks.cases import make_params, random_rows
    import finesteer_kernels as fk

    for d in sizes.decode_widths:
        params = make_params(d, residual=True, device=device)
        h = random_rows(params.to("cpu"), 1, seed=3, dtype=torch.bfloat16).to(device).reshape(1, 1, d)
        with torch.inference_mode():
            delta = fk.coef_delta(fk.synthesize(h[:, 0], params), params)
        for name, fn in (("query: apply_delta_", lambda: fk.apply_delta_(h, delta)),
                         ("token: steer_ (split-d)", lambda: fk.steer_(h, params))):
            if sec.out_of_time():
                sec.skip({"op": name, "d": d}, key="ops")
                continue
            sec.starting(f"{name} d={d}")
            with torch.inference_mode():
                fn()
                if device.type == "cuda":
                    stats = timing.time_graph(fn, device, reps=10, cold_l2=False, calls_per_graph=100)
                    sec.add({"op": name, "d": d, **stats.as_us()}, key="ops")
                else:
                    sec.add({"op": name, "d": d, "note": "interpreted once, not timed"}, key="ops")


# ---- 7. correctness (compact) -------------------------------------------------------------------------------------
def _check_cases(sizes: Sizes) -> list:
    """(name, params factory, dtype name, rows, in place too): every layout (relu and identity MLP, CAA, a width
    that is not a multiple of 16) in bf16 at a multi-tile row count; the full layout also in fp16 and at one row,
    and in place. One steering-kernel compile costs ~4 s: each check adds its layout's variants, the most important
    first, so a deadline cuts the least."""
    from benchmarks.cases import random_params

    wide, odd, rows = *sizes.check_widths, sizes.check_rows
    full = ("finesteer+res(relu) d=%d" % wide, lambda: random_params(wide, min(64, wide // 2), 8, residual="relu",
                                                                     m=32, k=8, seed=4))
    return [
        (*full, "bf16", rows, True),
        ("finesteer d=%d" % wide, lambda: random_params(wide, min(64, wide // 2), 8, seed=3), "bf16", rows, False),
        ("finesteer+res(identity) d=%d" % odd, lambda: random_params(odd, 8, 3, residual="identity", seed=5), "bf16",
         rows, False),
        ("caa d=%d" % odd, lambda: random_params(odd, 0, 1, seed=6), "bf16", rows, False),
        (*full, "fp16", rows, False),
        (*full, "bf16", 1, False),
    ]


def correctness_section(sec: Section, device, sizes: Sizes) -> dict:
    import torch

    import finesteer_kernels as fk
    from benchmarks.cases import REL_TOL, random_rows, rel_error
    from benchmarks.implementations import forced_backend
    from finesteer_kernels import reference

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    for name, factory, dtype_name, rows, in_place in _check_cases(sizes):
        where = {"case": name, "dtype": dtype_name, "rows": rows}
        if sec.out_of_time():
            sec.skip({**where, "op": "all"})
            continue
        sec.starting(f"{name} {dtype_name} T={rows}")
        params_cpu = factory()
        params = params_cpu.to(device)
        dtype = dtypes[dtype_name]
        h = random_rows(params_cpu, rows, seed=rows, dtype=dtype).to(device)
        seq = torch.arange(rows) % 3  # three sequences ...
        seq[1:2] = -1  # ... and row 1 left alone
        seq = seq.to(device)
        coef_ref = reference.synthesize(h, params)
        expected = {"steer": reference.steer(h, params), "synthesize": coef_ref,
                    "apply_coef": reference.apply_coef(h, coef_ref[:3], params, seq)}
        with torch.inference_mode(), forced_backend("triton"):
            got = {"steer": fk.steer(h, params), "synthesize": fk.synthesize(h, params),
                   "apply_coef": fk.apply_coef(h, coef_ref[:3], params, seq)}
            if in_place:
                got.update(steer_=fk.steer_(h.clone(), params),
                           apply_coef_=fk.ops.apply_coef_(h.clone(), coef_ref[:3], params, seq))
                expected.update(steer_=expected["steer"], apply_coef_=expected["apply_coef"])
        for op, out in got.items():
            ref = expected[op]
            # coefficients are fp32 whatever h is; their tolerance is the input's (they come from h)
            err = rel_error(out, ref) if out.shape == ref.shape and out.dtype == ref.dtype else float("inf")
            sec.add({**where, "op": op, "max_rel_err": err, "tol": REL_TOL[dtype], "ok": err <= REL_TOL[dtype]})
        if rows > 1 and params.has_gate:  # the gate must really switch: some rows on, some off
            on = reference.gate(h.float(), params)
            sec.add({**where, "op": "gate mix", "max_rel_err": None, "tol": None, "ok": bool(0 < on.sum() < rows)})
    checks = sec.record["rows"]
    failed = [c for c in checks if c.get("ok") is False]
    if failed:
        raise AssertionError(f"{len(failed)} of {len(checks)} correctness checks failed: "
                             + "; ".join(f"{c['case']} {c['dtype']} T={c['rows']} {c['op']} err={c['max_rel_err']}"
                                         for c in failed)[:2000])
    return {"passed": sum(c.get("ok") is True for c in checks)}


# ---- 8. steerer bank (issue 13) -----------------------------------------------------------------------------------
def bank_section(sec: Section, device, sizes: Sizes) -> dict:
    """A mixed batch of 4 steerers against the same batch on one steerer, token mode, bf16, the bank kernel in a CUDA
    graph with a cold L2, beside the bytes model (`benchmarks.bank_bench`); checked against the bank reference."""
    import torch

    from benchmarks.bank_bench import assignments, make_bank, predictions
    from benchmarks.cases import random_rows, rel_error
    from finesteer_kernels import bank_reference, plan_rows, steer_bank

    for T, d in sizes.bank:
        row = {"T": T, "d": d}
        if sec.out_of_time():
            sec.skip(row)
            continue
        sec.starting(f"T={T} d={d}")
        bank = make_bank(d, device)
        h = random_rows(bank.params[0].to("cpu"), T, seed=T, dtype=torch.bfloat16).to(device)
        row["predicted"] = predictions(T, d, bank)
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
        sec.add(row)
    bad = [r for r in sec.record["rows"] if "note" not in r and not (r["mixed_ok"] and r["uniform_ok"])]
    if bad:
        raise AssertionError(f"bank results disagree with the reference: {bad}")


# ---- 9. the edit fused with the next RMSNorm (issue 14) -------------------------------------------------------------
def fused_norm_section(sec: Section, device, sizes: Sizes) -> dict:
    import torch

    from benchmarks.fused_norm_bench import fused_norm_rows

    for T, d in sizes.fused_norm:
        if sec.out_of_time():
            sec.skip({"T": T, "d": d})
            continue
        sec.starting(f"T={T} d={d}")
        for row in fused_norm_rows(device, [(T, d)], torch.bfloat16, timed=not sizes.dry):
            sec.add(row)
    bad = [r for r in sec.record["rows"] if r.get("ok") is False]
    if bad:
        raise AssertionError(f"fused norm: results disagree with the separate edit and norm: {bad}")
    return {"note": "separate = the steering op then transformers' LlamaRMSNorm module (eager); model "
                    "figures: the steering kernel + a one-launch RMSNorm + a launch gap vs the fused kernel "
                    "(predicted)"}


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
    out_path = args.out or default_out(args.dry_run)
    results = {"dry_run": args.dry_run, "environment": report.environment(str(device)), "sections": {}}
    run = report.Run(out_path, results, started, args.time_budget)
    print(f"[gpu_check] writing {out_path}", flush=True)
    functions = {"bandwidth": bandwidth_section, "split_d_smoke": split_d_smoke_section,
                 "empty_kernel": empty_kernel_section, "prefill": prefill_section, "sweep": sweep_section,
                 "decode": decode_section, "correctness": correctness_section, "bank": bank_section,
                 "fused_norm": fused_norm_section}
    with_results = ("prefill", "sweep")  # sections that set the model's predictions beside their rows
    for name, share in SECTIONS:
        extra = (results,) if name in with_results else ()
        run.section(name, share, functions[name], device, sizes, *extra)
    lines = report.gpu_check_markdown(results)
    results["goals"] = [] if args.dry_run else report.gpu_check_goals(results)
    results["elapsed_s"] = time.perf_counter() - started
    run.save()
    with open(os.path.splitext(out_path)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out_path} in {results['elapsed_s']:.0f} s")
    failed = [n for n, s in results["sections"].items() if s["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
