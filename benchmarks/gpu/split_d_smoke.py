"""Section ``split_d_smoke``, run first and in a child process: the split-d token-mode kernel (programs that wait
on each other's flags, `finesteer_kernels.steer_kernel`) against the reference at a prefill (T = 4096) and a decode
(T = 1) shape, d = 4096, bf16, out of place (into NaN: a row the kernel fails to write shows) and in place, in the
configurations the heuristic picks (the later sections reuse their compiled kernels from Triton's cache); then the
bank kernel's split-d (issue 24 item 7: the model picks it for 16 rows of 4 steerers mixed, d = 4096) against the
bank reference, so its waits too first run here rather than in the ``bank`` section.

The spin waits have never run on a GPU (the interpreter runs programs one at a time), so this is their first run.
In a child with its own timeout, a wait that never ends costs that timeout, not the run: the parent kills the
child, records split-d as failed (with the rows finished and the item it hung on) and sets
``FINESTEER_SPLIT_D=0`` for every later section, which then launch one program per row tile (no waits).

``python -m benchmarks.gpu.split_d_smoke --record FILE [--dry-run]`` is the child (`benchmarks.gpu.child`).
"""
from __future__ import annotations

import os
import sys

NAME, DEADLINE = "split_d_smoke", 0.12
TIMEOUT_S = {False: 90.0, True: 300.0}  # GPU: ~10 s start-up + 4 compiles of ~4 s; the dry run: a shared CPU
# (T, d, configuration): on a GPU the heuristic's pick; the interpreter's launches would pin an unsplit one
SHAPES = [(4096, 4096, None), (1, 4096, None)]
DRY_SHAPES = [(40, 96, dict(BLOCK_T=16, BLOCK_D=32, num_warps=4, num_stages=1, SPLIT=2)),
              (1, 96, dict(BLOCK_T=16, BLOCK_D=32, num_warps=4, num_stages=1, SPLIT=3))]
BANK_SHAPE, BANK_DRY_SHAPE = (16, 4096), (20, 64)  # (T, d): the `bank` section's decode shape and its dry run's


def run(sec, ctx) -> dict:
    """The parent's side: the smoke in a child; when it fails or hangs, split-d is off for the rest of the run."""
    from benchmarks.gpu.child import run_in_child

    try:
        out = run_in_child(sec, __name__, TIMEOUT_S[ctx.dry], ["--dry-run"] if ctx.dry else [])
        bad = sec.bad_rows()
        if bad:
            raise AssertionError("split-d disagrees with the reference: " + "; ".join(bad)[:1000])
    except Exception as e:
        os.environ["FINESTEER_SPLIT_D"] = "0"
        ctx.results["split_d"] = {"ok": False, "why": f"{type(e).__name__}: {str(e)[:300]}",
                                  "later_sections": "run with FINESTEER_SPLIT_D=0 (one program per row tile)"}
        raise
    ctx.results["split_d"] = {"ok": True}
    return out


def measure(sec, ctx) -> None:
    """The child's side: one row per (shape, in place or not)."""
    import torch

    from benchmarks.cases import REL_TOL, rel_error
    from benchmarks.gpu.steer_case import launch, launched_config, steer_case
    from finesteer_kernels.perf_model import Config

    for T, d, dry_config in DRY_SHAPES if ctx.dry else SHAPES:
        params, h, expected, packed, layout = steer_case(d, T, ctx.device)
        config = Config(**dry_config) if dry_config else launched_config(h, layout)
        for variant in ("out of place", "in place"):
            def check(variant=variant) -> dict:
                with torch.inference_mode():
                    out = h.clone() if variant == "in place" else torch.full_like(h, float("nan"))
                    launch(out if variant == "in place" else h, out, params, packed, layout, config)
                    if ctx.gpu:
                        torch.cuda.synchronize(ctx.device)
                err = rel_error(out, expected)
                spin = spin_cap_report(out.device)
                return {"max_rel_err": err, "ok": err <= REL_TOL[torch.bfloat16] and not spin["gave_up"],
                        "spin_cap": spin,
                        **({} if config.SPLIT > 1 else {"note": "the heuristic did not split d "
                                                                "(FINESTEER_SPLIT_D=0?)"})}

            sec.measure({"T": T, "d": d, "variant": variant, "config": config.short()}, check,
                        f"T={T} d={d} {variant} {config.short()}")
    T, d = BANK_DRY_SHAPE if ctx.dry else BANK_SHAPE
    sec.measure({"T": T, "d": d, "variant": "bank, 4 steerers mixed", "config": "the bank's pick"},
                lambda: bank_check(T, d, ctx), f"bank T={T} d={d}")


def bank_check(T: int, d: int, ctx) -> dict:
    """One mixed launch of the bank kernel (the `bank` section's steerers and rows) against the bank reference."""
    import torch

    from benchmarks.cases import REL_TOL, rel_error
    from benchmarks.gpu.bank import bank_case
    from finesteer_kernels import bank_reference, plan_rows, steer_bank

    bank, h, indices = bank_case(T, d, ctx.device)
    index = indices["mixed"]
    with torch.inference_mode():
        out = steer_bank(h, bank, index, plan_rows(index, len(bank)))
        if ctx.gpu:
            torch.cuda.synchronize(ctx.device)
        err = rel_error(out, bank_reference.steer_bank(h, bank, index))
    spin = spin_cap_report(out.device)
    return {"max_rel_err": err, "ok": err <= REL_TOL[torch.bfloat16] and not spin["gave_up"], "spin_cap": spin}


def spin_cap_report(device) -> dict:
    """What the split-d spin-loop guard reported: the device's error word (`finesteer_kernels.split_d_error_flag`,
    set once a bounded wait gave up). Read after the launch (a host sync, outside the timed region), then cleared so
    the next row starts clean. A set flag fails the row."""
    import finesteer_kernels

    gave_up = bool(finesteer_kernels.split_d_error_flag(device).item())
    if gave_up:
        finesteer_kernels.clear_split_d_error(device)
    return {"gave_up": gave_up}


def markdown(results: dict) -> list:
    from benchmarks.report import fmt

    smoke = results["sections"].get(NAME, {})
    lines = []
    split_d = results.get("split_d", {})
    if split_d.get("ok") is False:
        lines += ["", f"**split-d FAILED** ({split_d['why']}); {split_d['later_sections']}"]
    if smoke.get("rows"):
        lines += ["", "**Split-d smoke** (steer vs the reference, bf16, in a child process)", "",
                  "| T | d | variant | config | max rel err | ok |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['T']} | {r['d']} | {r['variant']} | {r['config']} | "
                  f"{fmt(r.get('max_rel_err'), '.2e', r.get('note') or r.get('error', '-'))} | {fmt(r.get('ok'))} |"
                  for r in smoke["rows"]]
    return lines


if __name__ == "__main__":
    from benchmarks.gpu.child import child_main

    sys.exit(child_main(NAME, measure))
