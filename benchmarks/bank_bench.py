"""``python -m benchmarks.bank_bench``: what a mixed batch costs against a uniform one (issue 13).

The same T rows steered in token mode by a bank of 4 FineSteer steerers (r = 64, K = 8, residual m = 32, k = 8 at
d >= 1024; r = min(64, d / 2) below), once with the rows spread evenly over the 4 steerers ("mixed") and once with
every row on steerer 0 ("uniform"). Per row of the table:

* **predicted** (GPU, bf16): the bank kernel's HBM bytes and time from the bytes model
  (`bank_perf_model.predict_bank`, the launch `bank_kernel.bank_launch` picks) on the H100 SXM and H200, mixed
  over uniform;
* **measured** (this device, fp32 on CPU): median time of the grouped eager implementation (`grouped_eager`: rows
  sorted by steerer, the byte-frugal eager op on each group's slice; on CPU the counts are read on the host, which
  costs nothing there) mixed and uniform, and of the bank reference (`bank_reference`, every steerer on every row:
  the readable spec, S times the work by construction).

On a GPU, `benchmarks/gpu_check.py` runs the same comparison with the bank kernel (its ``bank`` section).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from .cases import random_params, random_rows
from .implementations import frugal_steer
from .timing import measure

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STEERERS = 4


def make_bank(d: int, device, seed: int = 0):
    from finesteer_kernels import SteerBank

    r = min(64, d // 2)
    return SteerBank([random_params(d, r, 8, residual="relu", m=32, k=8, seed=seed + s).to(device)
                      for s in range(STEERERS)])


def assignments(T: int, device) -> dict:
    return {"mixed": (torch.arange(T) % STEERERS).to(device), "uniform": torch.zeros(T, dtype=torch.long, device=device)}


def grouped_eager(h: torch.Tensor, bank, index: torch.Tensor) -> torch.Tensor:
    """The eager analogue of the bank kernel on a CPU: one sort, then the byte-frugal op per steerer on its rows
    (the group sizes are read on the host: free on a CPU, a sync on a GPU, where the kernel needs none)."""
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index + 1, minlength=len(bank) + 1).tolist()
    out = h.clone()
    start = counts[0]
    for s, n in enumerate(counts[1:]):
        rows = order[start:start + n]
        if n:
            out[rows] = frugal_steer(h[rows], bank.params[s])
        start += n
    return out


def predictions(T: int, d: int, bank) -> dict:
    """Bytes-model figures of the bank kernel for both assignments, bf16, both cards."""
    from finesteer_kernels.bank_kernel import bank_launch
    from finesteer_kernels.bank_perf_model import predict_bank
    from finesteer_kernels.perf_model import CARDS, Shape

    layout = bank.pack(torch.bfloat16).layout
    out = {}
    for card in CARDS.values():
        config, programs = bank_launch(T, d, layout, 2, card, interpreting=False)  # the GPU's launch
        shapes = [Shape.of(T, d, 2, p.r, p.num_experts, p.m, p.k) for p in bank.params]
        per = {"mixed": [dataclasses.replace(s, rows=T // STEERERS + (i < T % STEERERS)) for i, s in enumerate(shapes)],
               "uniform": [shapes[0]] + [dataclasses.replace(s, rows=0) for s in shapes[1:]]}
        preds = {k: predict_bank(v, config, card, programs=programs) for k, v in per.items()}
        label = config.short() + (f", persistent {programs}" if programs else "")
        out[card.name] = {"config": label, **{k: {"time_us": p.time_us, "hbm_mb": p.hbm_bytes / 1e6,
                                                  "l2_mb": p.l2_bytes / 1e6, "bound": p.bound}
                                              for k, p in preds.items()},
                          "time_ratio": preds["mixed"].time_us / preds["uniform"].time_us,
                          "hbm_ratio": preds["mixed"].hbm_bytes / preds["uniform"].hbm_bytes}
    return out


def run(rows=(16, 512, 4096), widths=(576, 4096), device="cpu", budget_s: float = 0.3, timed: bool = True) -> list:
    from finesteer_kernels import bank_reference

    device = torch.device(device)
    results = []
    for d in widths:
        bank = make_bank(d, device)
        for T in rows:
            h = random_rows(bank.params[0].to("cpu"), T, seed=T).to(device)
            row = {"T": T, "d": d, "predicted": predictions(T, d, bank)}
            for name, index in assignments(T, device).items():
                expected = bank_reference.steer_bank(h, bank, index)
                err = (grouped_eager(h, bank, index) - expected).abs().max().item() / expected.abs().max().item()
                row[f"{name}_ok"] = err <= 1e-5
                if timed:
                    with torch.inference_mode():
                        row[f"{name}_grouped_us"] = measure(lambda: grouped_eager(h, bank, index), device,
                                                            budget_s).median * 1e6
                        row[f"{name}_reference_us"] = measure(lambda: bank_reference.steer_bank(h, bank, index),
                                                              device, budget_s).median * 1e6
            results.append(row)
    return results


def table(results: list) -> str:
    lines = ["| T | d | H100 SXM mixed/uniform (time, HBM) | H200 mixed/uniform (time, HBM) | predicted bound "
             "(mixed, H100) | CPU grouped eager mixed / uniform (us) | CPU bank reference mixed (us) |",
             "|" + " --- |" * 7]
    for r in results:
        p = r["predicted"]
        cells = [f"{p[c]['time_ratio']:.3f}x, {p[c]['hbm_ratio']:.3f}x" for c in ("H100 SXM", "H200")]
        cpu = (f"{r['mixed_grouped_us']:.0f} / {r['uniform_grouped_us']:.0f} "
               f"({r['mixed_grouped_us'] / r['uniform_grouped_us']:.2f}x)") if "mixed_grouped_us" in r else "-"
        ref = f"{r['mixed_reference_us']:.0f}" if "mixed_reference_us" in r else "-"
        lines.append(f"| {r['T']} | {r['d']} | {cells[0]} | {cells[1]} | {p['H100 SXM']['mixed']['bound']} | {cpu} | "
                     f"{ref} |")
    return "\n".join(lines)


# issue 24's mixes: S steerers of these sizes (r, K, m, k) in turn, the rows spread evenly
MIX_SIZES = ((64, 8, 32, 8), (16, 4, 0, 0), (0, 1, 0, 0), (32, 8, 16, 4))


def mix_shapes(T: int, d: int, S: int, elem: int = 2) -> list:
    """One `Shape` per steerer of an S-steerer mix (`MIX_SIZES`), each with its share of the T rows."""
    from finesteer_kernels.perf_model import Shape

    return [Shape.of(T // S + (i < T % S), d, elem, *MIX_SIZES[i % len(MIX_SIZES)]) for i in range(S)]


def mix_layout(shapes):
    """The `BankLayout` fields the launch heuristic reads, for a bank of these steerers (`mix_shapes`)."""
    from finesteer_kernels.bank import BankLayout
    from finesteer_kernels.perf_model import padded

    cols, n_coef = max(s.w_in_cols for s in shapes), max(s.n_coef for s in shapes)
    return BankLayout(G=len(shapes) + 2, NP=padded(cols), MP=0, NC=n_coef, NCP=padded(n_coef), W_IN_STRIDE=0,
                      ANY_GATE=1, ANY_ROUTER=1, ANY_RES=1, W_IN_COLS=cols)


def designs(T: int, d: int, S: int, card) -> dict:
    """Predicted (bf16) best launch of each bank-kernel design for an S-steerer mix (issue 24 item 7): one
    program per tile ("plain", `BANK_CONFIGS`), the bounded persistent grid ("bounded", also `DEEP_CONFIGS`),
    split-d ("split", `SPLIT_CONFIGS`), and what `bank_launch` picks ("pick": chosen for the bank's widest
    steerer, as the host knows no counts)."""
    from finesteer_kernels.bank_kernel import BANK_CONFIGS, DEEP_CONFIGS, SPLIT_CONFIGS, bank_launch
    from finesteer_kernels.bank_perf_model import bounded_programs, predict_bank

    shapes = mix_shapes(T, d, S)
    fits = [c for c in BANK_CONFIGS[2] + DEEP_CONFIGS[2] if c.BLOCK_T <= max(16, T)]
    options = {"plain": [predict_bank(shapes, c, card) for c in fits if c in BANK_CONFIGS[2]],
               "bounded": [predict_bank(shapes, c, card, programs=bounded_programs(c.BLOCK_T, d, 2, card))
                           for c in fits],
               "split": [predict_bank(shapes, c, card) for c in SPLIT_CONFIGS[2]]}
    # the fastest that reads at most 1.1x the ideal HBM bytes (the target), else the fastest
    best = {name: min(preds, key=lambda p: (p.hbm_bytes > 1.1 * p.ideal_bytes, p.time_us))
            for name, preds in options.items()}
    launch = bank_launch(T, d, mix_layout(shapes), 2, card, interpreting=False)
    best["pick"] = predict_bank(shapes, launch.config, card, programs=launch.programs)
    return best


def design_table(rows=(4096, 16384), widths=(4096, 8192), mixes=(1, 4, 16)) -> str:
    """`designs` as a markdown table: predicted time in us and HBM bytes over the ideal, per card."""
    from finesteer_kernels.perf_model import CARDS

    names = ("plain", "bounded", "split", "pick")
    head = " | ".join(f"{c} {n}" for c in CARDS for n in names)
    lines = [f"| T | d | steerers | {head} |", "|" + " --- |" * (3 + len(CARDS) * len(names))]
    for d in widths:
        for T in rows:
            for S in mixes:
                cells = []
                for card in CARDS.values():
                    best = designs(T, d, S, card)
                    cells += [f"{best[n].time_us:.1f} ({best[n].hbm_bytes / best[n].ideal_bytes:.2f}x)" for n in names]
                lines.append(f"| {T} | {d} | {S} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bank_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=0.3, help="seconds per timed measurement")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "bank-cpu.json"))
    p.add_argument("--designs", action="store_true", help="print the predicted table of the bank kernel's designs "
                   "(issue 24) and stop")
    args = p.parse_args(argv)
    if args.designs:
        print(design_table())
        return 0
    torch.set_num_threads(1)
    results = run(budget_s=args.budget)
    print(table(results))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
    return 0 if all(r["mixed_ok"] and r["uniform_ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
