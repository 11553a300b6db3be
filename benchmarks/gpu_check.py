"""One-shot GPU check for FineSteer: fits in ~5 minutes of an H100/H200.

    python benchmarks/gpu_check.py                 # on a GPU machine; writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --dry-run       # CPU: the same logic at tiny sizes, kernels interpreted

Sections, each recorded in the JSON (a failing section is recorded with its error and the rest still run):
  1. device: the card, its data-sheet peak bandwidth, a measured device-to-device copy bandwidth;
  2. empty kernel: the launch latency of a Triton kernel that does nothing (the floor for T = 1);
  3. correctness: the Triton kernels (steer, steer_, synthesize, apply_coef, apply_coef_) against the reference in
     fp32, fp16 and bf16, for FineSteer parameters with and without the residual MLP, a CAA vector (no gate,
     K = 1) and a width that is not a multiple of 16;
  4. op timing: every implementation (eager reference, byte-frugal eager, torch.compile, Triton) over
     T in {1, 16, 64, 512, 4096}, d in {576, 4096}, with and without residual, bf16, plus a decoder layer of the
     same width (see benchmarks/op_bench.py);
  5. CUDA graph: a decode step of a SmolLM2-shaped model (random weights, bf16, static cache) captured in a CUDA
     graph unpatched and patched (query / token mode, 1 and 3 layers), replayed and timed, ratios in one run.
The table is printed last. Exit status 1 when a correctness check fails or a section could not run.

``--dry-run`` (no GPU needed) sets TRITON_INTERPRET=1, shrinks every size, traces torch.compile with the 'eager'
backend and runs the CUDA-graph section eagerly; the interpreter is never timed. CI runs it
(tests/test_benchmarks_dry_run.py).
"""
from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", default=None, help=f"JSON path (default {RESULTS_DIR}/gpu_check[-dry-run].json)")
    p.add_argument("--time-budget", type=float, default=270.0,
                   help="seconds for the whole run (default 270); op timing starts no new case after 70 %% of it "
                        "(the skipped rows say so), leaving time for the CUDA-graph section")
    p.add_argument("--compile-ops", default="steer", help="ops timed under torch.compile: steer, apply or both "
                                                          "(each compile costs ~10-20 s)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


class Sizes:
    def __init__(self, dry: bool):
        self.dry = dry
        # correctness: (d, rows) per case; the second width is not a multiple of 16
        self.check_widths = (64, 40) if dry else (4096, 1000)
        self.check_rows = (1, 5) if dry else (1, 77, 1024)
        self.rows = (1, 6) if dry else (1, 16, 64, 512, 4096)
        self.widths = (64,) if dry else (576, 4096)
        self.copy_bytes = (8 << 20) if dry else (1 << 30)
        self.model = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128) if dry else \
            dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True)
        self.prompt = 6 if dry else 64
        self.replays = 0 if dry else 200


def run_section(results: dict, name: str, fn, *args):
    start = time.perf_counter()
    try:
        out = fn(*args)
        results["sections"][name] = {"status": "ok", "seconds": time.perf_counter() - start, **(out or {})}
    except Exception as e:  # record and go on: one broken section must not hide the others' numbers
        results["sections"][name] = {"status": "failed", "seconds": time.perf_counter() - start,
                                     "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print(f"[gpu_check] section {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr)


# ---- 1. device ----------------------------------------------------------------------------------------------------
def device_section(device, sizes: Sizes) -> dict:
    import torch

    from benchmarks import timing

    copy = timing.copy_bandwidth_gbps(device, nbytes=sizes.copy_bytes)
    out = {"device": str(device), "copy": copy, "peak_gbps": timing.card_peak_gbps(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}")
    else:
        out["name"] = "CPU (dry run: copy bandwidth of host memory, not a GPU figure)"
    return out


# ---- 2. empty kernel ----------------------------------------------------------------------------------------------
def empty_kernel_section(device, interpreted: bool) -> dict:
    import torch

    from benchmarks import timing
    from benchmarks.empty_kernel import empty_kernel

    x = torch.empty(1, device=device)
    launch = lambda: empty_kernel[(1,)](x)  # noqa: E731
    launch()
    if interpreted:
        return {"note": "launched once under the Triton interpreter; not timed"}
    stats = timing.measure(launch, device, budget_s=0.2, flush_l2=False)
    # back-to-back launches from Python: the host-side cost per launch
    n = 2000
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        launch()
    torch.cuda.synchronize(device)
    return {**stats.as_us(), "host_us_per_launch": (time.perf_counter() - t0) / n * 1e6}


# ---- 3. correctness -----------------------------------------------------------------------------------------------
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
    from benchmarks.cases import DTYPE_NAMES, REL_TOL, random_rows, rel_error
    from benchmarks.implementations import forced_backend
    from finesteer_kernels import reference

    checks, failed = [], 0
    for name, factory in _check_cases(sizes):
        params_cpu = factory()
        params = params_cpu.to(device)
        for dtype_name, dtype in DTYPE_NAMES.items():
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


# ---- 4. op timing -------------------------------------------------------------------------------------------------
def op_timing_section(device, sizes: Sizes, results: dict, args, deadline: float) -> dict:
    import torch

    from benchmarks.implementations import IMPLEMENTATIONS
    from benchmarks.op_bench import OpBenchConfig, op_groups, run_op_bench, speedups

    dev = results["sections"].get("device", {})
    copy = (dev.get("copy") or {}).get("gbps") if device.type == "cuda" else None
    compile_ops = tuple(o.strip() for o in args.compile_ops.split(",") if o.strip())
    dtype = torch.float32 if sizes.dry else torch.bfloat16
    # the widest first: the targets are at d = 4096, and a tight time budget skips the last cases
    common = dict(rows=sizes.rows, widths=sizes.widths[::-1], residual=(False, True), dtypes=(dtype,),
                  device=str(device), budget_s=0.01 if sizes.dry else 0.15, layer=True,
                  layer_limit_s=1.0 if sizes.dry else 1e9, compile_backend="eager" if sizes.dry else "inductor",
                  copy_gbps=copy, peak_gbps=dev.get("peak_gbps"), deadline=deadline)
    rows = []
    for ops, impls in op_groups(("steer", "apply"), IMPLEMENTATIONS, compile_ops):
        rows += run_op_bench(OpBenchConfig(ops=ops, impls=impls, **common), progress=args.progress)
    bad = [r for r in rows if r["ok"] is False]
    if bad:
        raise AssertionError(f"{len(bad)} timed results disagree with the reference: "
                             + "; ".join(f"{r['op']} {r['impl']} T={r['T']} d={r['d']} err={r['max_rel_err']}"
                                         for r in bad)[:2000])
    return {"rows": rows, "speedups": speedups(rows)}


# ---- 5. CUDA graph of a patched decode step -----------------------------------------------------------------------
def _decode_model(sizes: Sizes, device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, **sizes.model)
    torch.manual_seed(0)  # every configuration gets the same weights
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype=dtype).eval()


def cuda_graph_section(device, sizes: Sizes) -> dict:
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
            handle = (patch_model(model, {layer: params for layer in config["layers"]}, mode=config["mode"])
                      if config["layers"] else None)
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
            "note": "" if gpu else "CPU dry run: steps ran eagerly once, no CUDA graph, not timed", "rows": out}


# ---- summary ------------------------------------------------------------------------------------------------------
def summary_lines(results: dict) -> list[str]:
    from benchmarks import report, targets

    s = results["sections"]
    lines = [f"FineSteer gpu_check ({'dry run, ' if results['dry_run'] else ''}{results['environment']['date']})"]
    for name, sec in s.items():
        lines.append(f"  {name:12s} {sec['status']:6s} {sec['seconds']:6.1f} s" +
                     (f"  {sec['error'][:150]}" if sec["status"] == "failed" else ""))
    dev = s.get("device", {})
    if dev.get("status") == "ok":
        lines.append(f"device {dev['name']}: copy {dev['copy']['gbps']:.0f} GB/s, peak {dev['peak_gbps'] or '?'} GB/s")
    empty = s.get("empty_kernel", {})
    if empty.get("status") == "ok" and "median_us" in empty:
        lines.append(f"empty Triton kernel: {empty['median_us']:.1f} us (device), "
                     f"{empty['host_us_per_launch']:.1f} us host per launch")
    corr = s.get("correctness", {})
    if corr.get("status") == "ok":
        lines.append(f"correctness: {corr['passed']} checks passed")
    ops = s.get("op_timing", {})
    if ops.get("status") == "ok":
        lines.append(report.op_table(ops["rows"], gpu=not results["dry_run"]))
    graph = s.get("cuda_graph", {})
    if graph.get("status") == "ok":
        lines.append(f"decode step ({graph['dtype']}, {'CUDA graph replay' if graph['graphs'] else graph['note']}):")
        cols = [("config", lambda r: r["config"]), ("median us", lambda r: report.fmt(r.get("median_us"), ".1f")),
                ("ratio", lambda r: report.fmt(r.get("ratio"), ".4f")),
                ("edits", lambda r: report.fmt(r["differs_from_unpatched"]) if r["layers"] else "-")]
        lines.append(report.table(graph["rows"], cols))
    if not results["dry_run"]:
        entries = targets.op_targets(ops.get("rows", []), empty.get("median_us"))
        entries += targets.graph_targets(graph.get("rows", []))
        results["targets"] = entries
        lines.append(targets.format_targets(entries))
    return lines


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
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --dry-run to check the logic on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    sizes = Sizes(args.dry_run)
    if args.dry_run:
        torch.set_num_threads(1)  # a shared CPU: a second OpenMP thread waiting for a busy core costs milliseconds
    out_path = args.out or os.path.join(RESULTS_DIR, "gpu_check-dry-run.json" if args.dry_run else "gpu_check.json")
    results = {"dry_run": args.dry_run, "environment": report.environment(str(device)), "sections": {}}
    deadline = started + 0.7 * args.time_budget
    run_section(results, "device", device_section, device, sizes)
    run_section(results, "empty_kernel", empty_kernel_section, device, args.dry_run)
    run_section(results, "correctness", correctness_section, device, sizes)
    run_section(results, "op_timing", op_timing_section, device, sizes, results, args, deadline)
    run_section(results, "cuda_graph", cuda_graph_section, device, sizes)
    if "rows" in results["sections"].get("op_timing", {}):
        where = results["environment"].get("gpu", "CPU dry run")
        results["plot"] = report.plot_op_times(results["sections"]["op_timing"]["rows"],
                                               os.path.splitext(out_path)[0] + ".png",
                                               title=f"FineSteer op time vs rows ({where})")
    lines = summary_lines(results)  # also evaluates the targets into results
    results["elapsed_s"] = time.perf_counter() - started
    report.write_json(out_path, results)
    print("\n".join(lines))
    print(f"wrote {out_path} in {results['elapsed_s']:.0f} s")
    failed = [n for n, s in results["sections"].items() if s["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
