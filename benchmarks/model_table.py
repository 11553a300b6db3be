"""The bytes-and-occupancy model's predictions as the markdown tables of benchmarks/RESULTS.md, generated so that
they cannot drift from the model (tests/test_benchmarks_dry_run.py checks that RESULTS.md holds exactly this).

    python -m benchmarks.model_table           # print the tables
    python -m benchmarks.model_table --write   # replace them in benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import dataclasses
import os

from finesteer_kernels.heuristics import best_design, best_steer, best_unbuilt, design_name, steer_candidates
from finesteer_kernels.perf_model import (CARDS, Shape, predict_apply_delta, predict_apply_delta_norm, predict_rmsnorm,
                                          predict_steer, predict_v1, round_trips, v1_config)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
BEGIN, END = "<!-- model-table:begin -->", "<!-- model-table:end -->"
PREFILL = [(T, d) for T in (4096, 8192) for d in (4096, 8192)]
LAYOUTS = {"no residual": (64, 8, 0, 0), "residual m=16 k=8": (64, 8, 16, 8)}


def _pct(pred) -> str:
    return f"{100 / pred.ratio:.0f} %"


def prefill_table() -> list[str]:
    lines = ["| card | layout | T | d | v1: % of copy (us) | v2: % of copy (us) | v2 config | bound | HBM MB (ideal) | "
             "L2 MB | in-flight MiB |", "|" + " --- |" * 11]
    for card in CARDS.values():
        for name, sizes in LAYOUTS.items():
            for T, d in PREFILL:
                shape = Shape.of(T, d, 2, *sizes)
                v1, v2 = predict_v1(shape, card), best_steer(shape, card)
                lines.append(f"| {card.name} | {name} | {T} | {d} | {_pct(v1)} ({v1.time_us:.0f}) | {_pct(v2)} "
                             f"({v2.time_us:.1f}) | {v2.config.short()} | {v2.bound} | {v2.hbm_bytes / 1e6:.0f} "
                             f"({v2.ideal_bytes / 1e6:.0f}) | {v2.l2_bytes / 1e6:.0f} | "
                             f"{v2.working_set / 2 ** 20:.1f} |")
    return lines


def ladder_table() -> list[str]:
    """What each design choice buys, one step at a time, at T = 8192 with the residual MLP."""
    steps = [
        ("v1: 64-row tiles, pass 2 synchronous", lambda s, c: predict_v1(s, c)),
        ("+ pass 2 pipelined (v1 tiles)", lambda s, c: predict_steer(s, v1_config(s.rows, s), c)),
        ("+ tiles chosen by the model, no split", lambda s, c: min(
            (predict_steer(s, cfg, c) for cfg, _ in steer_candidates(s, c) if cfg.SPLIT == 1),
            key=lambda p: p.time_us)),
        ("+ split-d, persistent (v2, shipped)", lambda s, c: best_steer(s, c)),
        ("not in Triton 3.6: + W_in multicast over 2-SM clusters", lambda s, c: best_design(s, c, multicast=2)),
        ("not in Triton 3.6: + partial sums in distributed shared memory", lambda s, c: best_design(
            s, c, multicast=2, partials_on_chip=True)),
        ("bound: + no dependent round trips (not what PDL gives)", lambda s, c: best_design(
            s, c, multicast=2, partials_on_chip=True, hide_ramp=True)),
        ("alternative: row tile kept on chip + no round trips", lambda s, c: best_design(
            s, c, tile_on_chip=True, hide_ramp=True)),
    ]
    shapes = [(card, d) for card in CARDS.values() for d in (4096, 8192)]
    header = "| design (T = 8192, residual m=16 k=8) | " + " | ".join(f"{c.name} d={d}" for c, d in shapes) + " |"
    lines = [header, "|" + " --- |" * (len(shapes) + 1)]
    for label, fn in steps:
        cells = []
        for card, d in shapes:
            pred = fn(Shape.of(8192, d, 2, *LAYOUTS["residual m=16 k=8"]), card)
            cells.append(f"{_pct(pred)} ({pred.bound})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def bar_table() -> list[str]:
    """Issue 24's bar (>= 90 % of copy at T >= 4096): the ceiling the dependent round trips alone put on a launch
    (`round_trips` x the assumed loaded latency, nothing else counted), split-d and one program per row tile, beside
    the shipped pick and the best the model knows of among designs the kernels do not implement."""
    lines = ["| card | T | d | ideal us | ceiling, split-d (5 trips) | ceiling, one program per tile (2 trips) | "
             "shipped | best modelled design | its config |", "|" + " --- |" * 9]
    for card in CARDS.values():
        for T, d in PREFILL:
            shape = Shape.of(T, d, 2, *LAYOUTS["residual m=16 k=8"])
            shipped = best_steer(shape, card)
            best, design = best_unbuilt(shape, card)
            ideal, trip = shipped.ideal_us, card.latency_ns / 1e3
            ceilings = [f"{100 * ideal / (ideal + round_trips(split) * trip):.0f} %" for split in (2, 1)]
            lines.append(f"| {card.name} | {T} | {d} | {ideal:.1f} | {' | '.join(ceilings)} | {_pct(shipped)} | "
                         f"{_pct(best)} ({design_name(design)}) | {best.config.short()} |")
    return lines


def decode_table() -> list[str]:
    lines = ["| card | d | token mode v1 (us) | token mode v2 (us) | v2 config | query decode: apply_delta (us) |",
             "|" + " --- |" * 6]
    for card in CARDS.values():
        for d in (576, 4096, 8192):
            shape = Shape.of(1, d, 2, *LAYOUTS["residual m=16 k=8"])
            v1 = predict_steer(shape, v1_config(1, shape), card, pipelined_pass2=False)
            v2 = best_steer(shape, card)
            delta = predict_apply_delta(1, d, 2, 1, card)
            lines.append(f"| {card.name} | {d} | {v1.time_us:.1f} | {v2.time_us:.1f} | {v2.config.short()} | "
                         f"{delta.time_us:.2f} |")
    return lines


def fused_norm_table() -> list[str]:
    """Issue 14: the steering edit fused with the next RMSNorm against the steering kernel, a one-launch RMSNorm and
    the launch gap between them (every row steered; query mode: the cached delta, 64 sequences at most)."""
    lines = ["| card | T | d | token: separate MB / us | token: fused MB / us | fused config | token speed-up | "
             "query: separate MB / us | query: fused MB / us |", "|" + " --- |" * 9]
    for card in CARDS.values():
        for T, d in PREFILL + [(1, 576), (1, 4096), (16, 4096)]:
            sizes = LAYOUTS["residual m=16 k=8"]
            norm = predict_rmsnorm(T, d, 2, card)
            steer = best_steer(Shape.of(T, d, 2, *sizes), card)
            fused = best_steer(Shape.of(T, d, 2, *sizes, norm_out=2), card)
            separate_us = steer.time_us + norm.time_us + card.launch_us
            apply = predict_apply_delta(T, d, 2, min(T, 64), card)
            query = predict_apply_delta_norm(T, d, 2, min(T, 64), card)
            # query-mode times at decode sizes only: predict_apply_delta's feed term (one 512-element tile in
            # flight per SM) is meant for a decode step and is far too slow for a prefill
            query_us = (f"{apply.time_us + norm.time_us + card.launch_us:.1f}", f"{query.time_us:.1f}") \
                if T <= 64 else ("-", "-")
            lines.append(
                f"| {card.name} | {T} | {d} | {(steer.hbm_bytes + norm.hbm_bytes) / 1e6:.2f} / {separate_us:.1f} | "
                f"{fused.hbm_bytes / 1e6:.2f} / {fused.time_us:.1f} | {fused.config.short()} | "
                f"{separate_us / fused.time_us:.2f}x | {(apply.hbm_bytes + norm.hbm_bytes) / 1e6:.2f} / "
                f"{query_us[0]} | {query.hbm_bytes / 1e6:.2f} / {query_us[1]} |")
    return lines


def tall_tile_table() -> list[str]:
    """Issue 24 item 6: what the tall tile (`heuristics.TALL_TILE`, 128 rows: W_in and W_out re-read through L2 once
    per 128 rows instead of 64) changes, against the best layout of at most 64 rows, at the L2 bandwidth assumed
    (8.4 TB/s) and 30 % either side (the H200 prediction rests on it), and under the ``hide_ramp`` bound (no
    dependent round trips; not what programmatic dependent launch gives) at the assumed L2 bandwidth. The heuristic counts predictions
    within 2 % as equal and then takes fewer L2 bytes, so its pick may show a point under the fastest layout."""
    lines = ["| card | layout | T | d | best of <= 64 rows | L2 MB | % of copy, L2 x0.7 / x1 / x1.3 | pick | L2 MB | "
             "% of copy, L2 x0.7 / x1 / x1.3 | pick, bound: no round trips |", "|" + " --- |" * 11]
    for card in CARDS.values():
        for name, sizes in LAYOUTS.items():
            for T, d in PREFILL:
                shape = Shape.of(T, d, 2, *sizes)
                short, picked = [], []
                for factor in (0.7, 1.0, 1.3):
                    c = dataclasses.replace(card, l2_gbps=card.l2_gbps * factor)
                    low = min((predict_steer(shape, cfg, c) for cfg, _ in steer_candidates(shape, c)
                               if cfg.BLOCK_T <= 64), key=lambda p: p.time_us)
                    pick = best_steer(shape, c)
                    short.append(_pct(low))
                    picked.append(_pct(pick))
                    if factor == 1.0:
                        base_low, base = low, pick
                ramp = predict_steer(shape, base.config, card, hide_ramp=True)
                lines.append(f"| {card.name} | {name} | {T} | {d} | {base_low.config.short()} | "
                             f"{base_low.l2_bytes / 1e6:.0f} | {' / '.join(short)} | {base.config.short()} | "
                             f"{base.l2_bytes / 1e6:.0f} | {' / '.join(picked)} | {_pct(ramp)} |")
    return lines


def cards_table() -> list[str]:
    lines = ["| card | SMs | L2 | HBM data sheet | HBM achievable (copy) | L2 (assumed) | one SM (assumed) | "
             "latency (assumed) |", "|" + " --- |" * 8]
    for card in CARDS.values():
        lines.append(f"| {card.name} | {card.sms} | {card.l2_bytes // 2 ** 20} MiB | {card.peak_gbps:.0f} GB/s | "
                     f"{card.hbm_gbps:.0f} GB/s | {card.l2_gbps:.0f} GB/s | {card.sm_gbps:.0f} GB/s | "
                     f"{card.latency_ns:.0f} ns |")
    return lines


def tables() -> str:
    parts = ["#### Cards (perf_model.CARDS)", "", *cards_table(), "",
             "#### Token-mode prefill, bf16, r = 64, K = 8: v1 against v2 (predicted)", "", *prefill_table(), "",
             "#### What each design choice buys (predicted % of copy bandwidth, and the bound)", "", *ladder_table(),
             "", "#### The bar (issue 24: >= 90 % of copy at T >= 4096), residual m=16 k=8, bf16: what the dependent "
             "round trips leave, and the best the model knows of (predicted)", "", *bar_table(), "",
             "#### Decode, one row, bf16 (predicted device time; launch overhead not included)", "",
             *decode_table(), "",
             "#### Fused with the next RMSNorm (issue 14), bf16, r = 64, K = 8, m = 16, k = 8, every row steered "
             "(predicted; separate = the steering kernel + a one-launch RMSNorm + one launch gap)", "",
             *fused_norm_table(), "",
             "#### 128-row tiles (issue 24 item 6): the L2 bytes and the H200's L2-bandwidth uncertainty, bf16 "
             "(predicted)", "", *tall_tile_table()]
    return "\n".join(parts)


def replaced(text: str) -> str:
    """``text`` (RESULTS.md) with the generated block between the markers replaced by the current tables."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + tables() + "\n" + text[end:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"replace the tables in {RESULTS}")
    args = parser.parse_args(argv)
    if args.write:
        with open(RESULTS) as f:
            text = f.read()
        with open(RESULTS, "w") as f:
            f.write(replaced(text))
    else:
        print(tables())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
