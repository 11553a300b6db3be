"""One call that settles the kernels' performance on the first lent GPU: about 6 minutes on one H100/H200 with a
cold Triton cache, every compile included, the most important measurements first.

On a lent machine (only what is written under $OUT comes back; run it under an outer ``timeout``, unbuffered, so
that a hang still leaves the JSON of every finished row)::

    PYTHONUNBUFFERED=1 timeout 540 python benchmarks/gpu_check.py --out "$OUT/gpu_check.json"

    python benchmarks/gpu_check.py --dry-run       # CPU: the same code at tiny sizes, kernels interpreted

Without ``--out`` the JSON goes to ``$OUT/gpu_check.json`` when ``$OUT`` is set, else to
``benchmarks/results/gpu_check.json``; the markdown tables are written beside it (``.md``). The JSON is rewritten
after every row, with the item in progress named, so a run cut short (a hang, the outer timeout) keeps every
finished row and says where it stopped.

Sections, in order, one module each in ``benchmarks/gpu/``; each has a deadline (a share of ``--time-budget``,
420 s) past which it starts nothing new (one whose deadline has passed is recorded as skipped). Each configuration
runs on its own: one that fails is recorded with its error, the others still run, and the section is marked
failed. Cold-cache estimates: one steering-kernel variant takes ~4 s to compile (Triton's passes and ptxas for
sm_90a, timed on this project's CPU machine), the small kernels ~0.3 s, torch.compile ~20 s for its first graph:

==============  =====================================================================  ==========  ========
section         what                                                                    compiles    estimate
==============  =====================================================================  ==========  ========
split_d_smoke   in a child process with its own 90 s timeout, first: the split-d       4           30 s
                token-mode kernel against the reference at T = 4096 and T = 1,
                d = 4096, bf16, in and out of place (its spin waits' first run); if it
                fails or hangs, the rest runs with FINESTEER_SPLIT_D=0
bandwidth       copy (the 100 % of every "% of copy"); an L2 flush check (a copy that   5 small     12 s
                fits in L2 after no flush, a read flush, the old zero_ flush); L2
                read bandwidth; one SM's read bandwidth at 16-128 KiB in flight
empty_kernel    a Triton kernel that does nothing, in a CUDA graph (the decode floor),  2 small     4 s
                without and with programmatic dependent launch (PDL)
prefill         token-mode steer at T in {4096, 8192} x d in {4096, 8192}, bf16,       1 + 4 tc    70 s
                r = 64, K = 8, residual MLP: reference, byte-frugal eager,
                torch.compile, Triton, each in a CUDA graph with a cold L2; % of copy
                beside the model (as shipped and with the measured bandwidths); per d,
                the fixed cost per launch, 2 t(4096) - t(8192), beside the model's
                dependent round trips
sweep           T = 8192, d = 4096: the model's best candidates and a few others        ~11         50 s
                (pick first): pick / best measured, and the model's ranking
decode          a SmolLM2-shaped decode step (random weights, bf16) in a CUDA graph,   ~26         90 s
                unpatched, 1 and 3 steered layers in both modes and with fuse_norm;
                the decode ops alone, each call on a fresh row, token mode with the
                gate open and closed, the bank kernel with it open, against the
                empty kernel; the gate-open ops also with PDL (off / on: the launch
                gap it hides)
correctness     every op against the reference: four layouts in bf16 at 77 rows, the   ~20         60 s
                full layout also in fp16 and at one row, in place on the first
bank            a mixed batch of 4 steerers against one steerer, T in {16, 4096}       2           12 s
fused_norm      the edit fused with the next RMSNorm against the edit then the         ~8          30 s
                model's LlamaRMSNorm, both modes, prefill and decode shapes
vllm            when vllm and the FineSteer plugin are importable, in a child:         -           60 s
                generated tokens/s of vllm.LLM on SmolLM2, unsteered and steered
==============  =====================================================================  ==========  ========

About 360 s in all without vLLM (tc: torch.compile graphs); the deadlines leave the rest of the 420 s for a slower
compile. The goals the issue holds the run to are printed last (>= 80 % of copy bandwidth at T >= 4096, >= 1.3x
torch.compile, decode op <= 1.5x an empty kernel, <= 0.5 % decode overhead with 3 steered layers). Exit status 1
when a section failed (skipped ones are reported, not failed).

Needs torch with CUDA and Triton >= 3.2 (``tl.range(num_stages=)``, ``tl.gather``, atomics with ``sem``); written
for the lent machines' torch 2.11, Triton 3.6 and transformers 5.17 (whose models take ``past_key_values``, where
5.24 takes ``cache``: `benchmarks.e2e.cache_kwarg`), and nothing newer. ``--dry-run`` (no GPU) sets
TRITON_INTERPRET=1, shrinks every size, passes the split-d configurations explicitly (the interpreter's launches
otherwise pin one unsplit configuration), uses torch.compile's 'eager' backend, runs graphs eagerly once and
times nothing; CI runs it (tests/test_benchmarks_dry_run.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu import (bandwidth, bank, correctness, decode, fused_norm, launch_floor,  # noqa: E402
                            prefill, split_d_smoke, sweep, vllm_throughput)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# in the order they run; each module's DEADLINE is the share of the budget after which it starts nothing new
SECTIONS = (split_d_smoke, bandwidth, launch_floor, prefill, sweep, decode, correctness, bank, fused_norm,
            vllm_throughput)


def _early_env(argv) -> None:
    """TRITON_INTERPRET must be set before triton is first imported."""
    dry = "--dry-run" in (sys.argv[1:] if argv is None else argv)
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1" if dry else "8")


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


def main(argv=None) -> int:
    _early_env(argv)
    args = build_parser().parse_args(argv)
    import torch

    from benchmarks import report
    from benchmarks.cases import interpreting
    from benchmarks.gpu.markdown import goals, run_markdown
    from benchmarks.gpu.record import Context, Run

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
    out_path = args.out or default_out(args.dry_run)
    results = {"dry_run": args.dry_run, "environment": report.environment(str(device)), "sections": {}}
    if args.dry_run:
        from benchmarks.gpu.markdown import DRY_RUN_TIMES

        results["times"] = DRY_RUN_TIMES
    run = Run(out_path, results, started, args.time_budget)
    context = Context(device, args.dry_run, results, started + args.time_budget)
    print(f"[gpu_check] writing {out_path}", flush=True)
    for section in SECTIONS:
        run.section(section.NAME, section.DEADLINE, section.run, context)
    results["goals"] = goals(results, SECTIONS)
    lines = run_markdown(results, SECTIONS)
    results["elapsed_s"] = time.perf_counter() - started
    run.save()
    with open(os.path.splitext(out_path)[0] + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out_path} in {results['elapsed_s']:.0f} s")
    return 1 if any(s["status"] == "failed" for s in results["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
