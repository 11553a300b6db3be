"""``python -m benchmarks.run``: the op-level table and the end-to-end generation overhead, printed and written
as JSON (``benchmarks/results/run-<device>.json``) with a plot of op time vs rows (``op_times-<device>.png``).

Defaults fit a few minutes on a 2-core CPU (``--quick``, the default there): every T and width for the eager
implementations, torch.compile only for token-mode ``steer`` (each compile costs ~20 s of CPU), decoder layers only
where one call is estimated under ``--layer-limit`` seconds, and 96 greedy tokens per configuration end to end.
``--full`` runs the whole grid (on a GPU it is the default). See benchmarks/README.md for every column.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # parallel compile workers are slower on 2 cores
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

from . import e2e, fused_norm_bench, report, targets, timing  # noqa: E402
from .cases import DTYPE_NAMES, OPS, default_device, interpreting, parse_dtype  # noqa: E402
from .implementations import IMPLEMENTATIONS  # noqa: E402
from .op_bench import OpBenchConfig, op_groups, run_op_bench, speedups  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _ints(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choices(allowed):
    def parse(text: str) -> tuple:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {list(allowed)}, got {text!r}")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=str(default_device()), help="cpu or cuda[:i] (default: cuda if present)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="full", action="store_false", help="CPU-sized defaults (default on CPU)")
    size.add_argument("--full", dest="full", action="store_true",
                      help="the whole grid: compile every op, time every decoder layer (default on GPU)")
    p.set_defaults(full=None)  # neither flag: quick on CPU, full on GPU
    p.add_argument("--T", type=_ints, default=(1, 16, 64, 512, 4096), help="rows per call (default 1,16,64,512,4096)")
    p.add_argument("--d", type=_ints, default=(576, 4096), help="hidden sizes (default 576,4096)")
    p.add_argument("--residual", type=_choices(("n", "y")), default=("n", "y"), help="residual MLP: n,y")
    p.add_argument("--ops", type=_choices(OPS), default=OPS, help="steer (token mode), apply (query-mode step)")
    p.add_argument("--impls", type=_choices(IMPLEMENTATIONS), default=None,
                   help=f"subset of {','.join(IMPLEMENTATIONS)} (default: all)")
    p.add_argument("--compile-ops", type=_choices(OPS), default=None,
                   help="ops that get the torch.compile variant (default: steer with --quick, all with --full)")
    p.add_argument("--dtype", type=_choices(tuple(DTYPE_NAMES)), default=None,
                   help="fp32 on CPU (default), bf16 on GPU (default); bf16 on CPU is emulated, never time it")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default 1: on a shared machine a second OpenMP thread waiting for a "
                        "busy core turns microseconds into milliseconds)")
    p.add_argument("--budget", type=float, default=0.3, help="seconds per timed measurement (min 5 calls)")
    p.add_argument("--no-layer", dest="layer", action="store_false", help="do not time decoder layers")
    p.add_argument("--layer-limit", type=float, default=None,
                   help="CPU: skip decoder layers estimated slower than this many s a call (quick 1.5, full 10)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' for dry runs)")
    p.add_argument("--no-ops", dest="op_bench", action="store_false", help="skip the op-level benchmark")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end generation benchmark")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="skip the steering op fused with the next RMSNorm against the op and the norm (issue 14)")
    p.add_argument("--new-tokens", type=int, default=96,
                   help="end to end: greedy decode steps per configuration, interleaved token by token")
    p.add_argument("--out", default=RESULTS_DIR, help=f"folder for JSON and PNG (default {RESULTS_DIR})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        print("run: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    full = gpu if args.full is None else args.full
    if not gpu:
        torch.set_num_threads(args.threads or 1)
    dtypes = tuple(parse_dtype(n) for n in (args.dtype or (("bf16",) if gpu else ("fp32",))))
    if not gpu and any(dt != torch.float32 for dt in dtypes):
        print("run: note: half precision on this CPU is emulated; its timings mean nothing", file=sys.stderr)
    impls = args.impls or IMPLEMENTATIONS
    compile_ops = args.compile_ops or (OPS if full else ("steer",))
    layer_limit = args.layer_limit if args.layer_limit is not None else (10.0 if full else 1.5)
    started = time.perf_counter()

    env = report.environment(str(device))
    peak = timing.card_peak_gbps(device)
    copy = timing.copy_bandwidth_gbps(device) if gpu else None
    print(f"FineSteer benchmarks on {env.get('gpu', 'CPU')} ({env['cpu_threads']} CPU threads), torch {env['torch']}"
          f", {'full' if full else 'quick'} grid" + (", TRITON_INTERPRET=1" if interpreting() else ""))
    if gpu:
        print(f"copy bandwidth {copy['gbps']:.0f} GB/s measured; card peak {peak or 'unknown'} GB/s")

    rows = []
    for ops, group_impls in (op_groups(args.ops, impls, compile_ops) if args.op_bench else []):
        cfg = OpBenchConfig(ops=ops, rows=args.T, widths=args.d, residual=tuple(v == "y" for v in args.residual),
                            dtypes=dtypes, impls=group_impls, device=str(device), budget_s=args.budget,
                            layer=args.layer, layer_limit_s=layer_limit, compile_backend=args.compile_backend,
                            copy_gbps=copy["gbps"] if copy else None, peak_gbps=peak)
        rows += run_op_bench(cfg, progress=args.progress)
    rows.sort(key=lambda r: (r["op"], r["dtype"], r["d"], r["residual"], r["T"], IMPLEMENTATIONS.index(r["impl"])))

    fused_rows = []
    if args.fused:
        fused_rows = fused_norm_bench.fused_norm_rows(device, [(T, d) for d in args.d for T in args.T], dtypes[0],
                                                      budget_s=args.budget, timed=not interpreting())

    e2e_result = None
    if args.e2e:
        e2e_result = _run_e2e(device, gpu, args)

    payload = {"environment": env, "grid": "full" if full else "quick", "argv": sys.argv[1:] if argv is None else argv,
               "copy_bandwidth": copy, "card_peak_gbps": peak, "ops": rows, "speedups": speedups(rows),
               "fused_norm": fused_rows, "e2e": e2e_result, "elapsed_s": None}
    os.makedirs(args.out, exist_ok=True)
    tag = "gpu" if gpu else "cpu"
    plot = report.plot_op_times(rows, os.path.join(args.out, f"op_times-{tag}.png"),
                                title=f"FineSteer op time vs rows ({env.get('gpu', 'CPU')}, {env['date'][:10]})")
    payload["plot"] = plot
    entries = targets.op_targets(rows, empty_kernel_us=None) if gpu else []
    if not gpu and e2e_result and "rows" in e2e_result:
        entries += targets.cpu_e2e_targets(e2e_result["rows"])
    payload["targets"] = entries
    payload["elapsed_s"] = time.perf_counter() - started
    json_path = os.path.join(args.out, f"run-{tag}.json")
    report.write_json(json_path, payload)

    if rows:
        print()
        print(report.op_table(rows, gpu))
    if fused_rows:
        print(f"\nsteering op fused with the next RMSNorm (issue 14): {'measured' if gpu else 'CPU, torch backend'} "
              "times; the model's figures are predicted")
        print(fused_norm_bench.fused_norm_table(fused_rows))
    if e2e_result is not None:
        print()
        if "rows" in e2e_result:
            print(f"end to end: {e2e_result['model']} {e2e_result['dtype']}, prompt {e2e_result['prompt_tokens']} "
                  f"tokens, {e2e_result['new_tokens']} greedy tokens per configuration interleaved token by token, "
                  f"op backend {e2e_result['backend']}; step times and ratios in {e2e_result['clock']}")
            print(report.e2e_table(e2e_result["rows"]))
        else:
            print(f"end to end: skipped: {e2e_result['skipped']}")
    if entries:
        print(targets.format_targets(entries))
    bad = [r for r in rows + fused_rows if r["ok"] is False]
    print(f"\nwrote {json_path}" + (f" and {plot}" if plot else "") + f" in {payload['elapsed_s']:.0f} s")
    if bad:
        print(f"{len(bad)} results disagree with the reference beyond tolerance (column ok = NO)", file=sys.stderr)
        return 1
    return 0


def _run_e2e(device: torch.device, gpu: bool, args) -> dict:
    missing = e2e.missing_parts()
    if missing:
        return {"skipped": missing}
    from finesteer.fitting.models import load_smollm2

    model, tokenizer = load_smollm2(dtype=torch.bfloat16 if gpu else torch.float32)
    model.to(device)
    return e2e.run_e2e(model, tokenizer, new_tokens=args.new_tokens, progress=args.progress)


if __name__ == "__main__":
    sys.exit(main())
