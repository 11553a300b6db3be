"""Launch configurations, chosen with the bytes-and-occupancy model (`perf_model`), not with thresholds.

For a shape and a card, `steer_config` predicts every candidate configuration (row tile, d block, warps, pipeline
stages, split of d over programs) and keeps the fastest prediction among those that leave at least two programs
resident per SM, so one program's epilogue or wait overlaps another's loads, or run a persistent grid on every SM
(split-d launches are persistent); the issue's rule, broken only when nothing else fits. Ties go to fewer L2 bytes, then to more
resident programs. Under the Triton interpreter one configuration is pinned (only fewer, larger numpy steps
matter there); tests pass the GPU configurations explicitly to exercise their code paths.

Plain Python: no torch, no triton.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

from .perf_model import (DEFAULT_CARD, MIN_DOT, Card, Config, Prediction, Shape, predict_apply, predict_steer,
                         resources)

INTERPRETER_CONFIG = Config(BLOCK_T=32, BLOCK_D=128, num_warps=4, num_stages=1)  # every kernel, interpreted

# The search space is kept small on purpose: every configuration the heuristic can pick on the grid is
# compiled for sm_90a by tests/test_kernel_compile.py, and these rules come from what spilled there: warps follow
# the row tile (4 up to 32 rows, 8 from 64 rows, where wgmma takes over, and for 256-column accumulators); fp32
# (no tensor cores: 'ieee' dots on FMA units) takes 8 warps and <= 32 rows, and with a 256-column accumulator
# 32-column d blocks and no split; 256-column d blocks only with 16-row tiles; 128-row tiles only as `TALL_TILE`.
# Fused with the next RMSNorm (issue 14, ``shape.norm_out``) the epilogue also holds W_out's columns of the
# accumulator and pass 2 the normalised tile, and ptxas spilled (or, near a register-count boundary, chose to spill a
# few bytes) in these layouts, now excluded: 256-column accumulators with d blocks over 64 columns (fp32: over 16,
# the fallback), and those `_norm_spills` lists.
#
# The tall tile (issue 24 item 6): 128 rows halve the re-reads of W_in and W_out through L2 per row of h. What
# compiled without spills on sm_90a, plain and fused with the norm: 16-bit, split d, 8 warps, 64-column d blocks and
# 4 stages (three 128 x 64 tiles in flight, about the bytes of the 64 x 128 picks' two); at 16 warps ptxas's
# 128-register cap spilled, and so did 128-column d blocks (fp32 not tried). Picked only where ptxas's own registers
# are in `ptxas_table`. Its splits include 6 and 12: fewer slices write fewer partial sums, but each halving of the
# split doubles the bytes between a row's two reads, so the best split is the smallest that keeps those under half
# of L2, and at 128 rows it often falls between two powers of two (the last slice is then the shorter one).
TALL_TILE = Config(128, 64, 8, 4)
TALL_SPLITS = (2, 4, 6, 8, 12, 16, 32)
BLOCK_TS = (16, 32, 64, TALL_TILE.BLOCK_T)
BLOCK_DS = (64, 128, 256)
STAGES = (3,)  # two tiles in flight while one is used: ~40-80 KiB per SM at the picked tiles
SPLITS = (1, 2, 4, 8, 16, 32)
MAX_REGS = 232  # keep clear of 255 where the formula estimates (ptxas's own counts, `ptxas_table`, are exact)


def _split_ok(d: int, block_d: int, split: int) -> bool:
    """Each program of a split row tile owns ``d / split`` columns, a whole number of d blocks."""
    if split == 1:
        return True
    return d % (split * block_d) == 0 or (-(-d // split) >= block_d and split * block_d <= d)


def _norm_spills(elem: int, c: Config) -> bool:
    """Layouts of the kernel fused with the next RMSNorm in which ptxas spilled (8-32 bytes: near a register-count
    boundary it trades a few spills for one more resident program), found by tests/test_kernel_compile.py and
    excluded. fp32: split over more than 8 programs with d blocks over 32 columns, 32-row tiles split over 8,
    split 16-row tiles with 128-column d blocks; 16-bit (reading the norm's own 16-bit weight, `norm_tile.norm_scale`):
    4 warps with 128-column d blocks on 32-row tiles or unsplit."""
    if elem == 4:
        return (c.SPLIT > 8 and c.BLOCK_D > 32) or (c.SPLIT == 8 and c.BLOCK_T == 32) or \
            (c.SPLIT > 1 and c.BLOCK_T == 16 and c.BLOCK_D == 128)
    return c.num_warps == 4 and c.BLOCK_D == 128 and (c.BLOCK_T == 32 or c.SPLIT == 1)


def split_d_allowed() -> bool:
    """Whether token mode and `synthesize` may split a row tile's d over several programs. The split-d layout's
    programs wait on each other (spin waits on flags, see `steer_kernel`), which the Triton interpreter cannot
    exercise (it runs programs one by one), so until a GPU run has checked it, ``FINESTEER_SPLIT_D=0`` keeps every
    launch at one program per row tile, whose programs never wait."""
    return os.environ.get("FINESTEER_SPLIT_D", "1").strip().lower() not in ("0", "off", "false", "no")


def steer_candidates(shape: Shape, card: Card, block_ds=BLOCK_DS, splits=SPLITS):
    rows_cap = max(MIN_DOT, 1 << max(0, (shape.rows - 1).bit_length()))
    for bt in BLOCK_TS:
        if bt > rows_cap and bt > MIN_DOT:
            continue
        for bd in block_ds:
            if bd > max(32, 1 << (shape.d - 1).bit_length()):
                continue
            if (bd == 256 and bt > 16) or (shape.elem == 4 and bt > 32):
                continue
            tall = bt == TALL_TILE.BLOCK_T
            if tall and bd != TALL_TILE.BLOCK_D:
                continue
            if shape.elem == 4 and shape.np > 128 and bd > 32:  # wide fp32: only the 32-column fallback fits
                continue
            if shape.norm_out and shape.np > 128 and bd > (16 if shape.elem == 4 else 64):
                continue
            for warps in ((8,) if bt >= 64 or shape.np > 128 or shape.elem == 4 else (4,)):
                for stages in (TALL_TILE.num_stages,) if tall else STAGES:
                    for split in TALL_SPLITS if tall and max(splits) > 1 else splits:
                        if split > 1 and (not shape.has_pass1 or (shape.elem == 4 and shape.np > 128)):
                            continue
                        if (tall and split == 1) or not _split_ok(shape.d, bd, split):
                            continue
                        config = Config(bt, bd, warps, stages, split)
                        if shape.norm_out and _norm_spills(shape.elem, config):
                            continue
                        res = resources(shape, config, card)
                        unmeasured_risk = not res.measured and (tall or res.regs > MAX_REGS)
                        if res.ctas_per_sm == 0 or res.spill_bytes or unmeasured_risk:
                            continue
                        yield config, res


def _rank(prediction: Prediction, ctas: int) -> tuple:
    # predictions within 2 % count as equal: then fewer L2 bytes, more resident programs, fewer programs
    return (round(prediction.time_us / max(prediction.ideal_us, 1e-9) / 0.02), prediction.l2_bytes, -ctas,
            prediction.grid)


def best_steer(shape: Shape, card: Card = DEFAULT_CARD, store_coef: bool = False,
               allow_split: bool = True) -> Prediction:
    """The model's best configuration for token mode (or `synthesize` with ``store_coef``); ``allow_split=False``
    keeps to one program per row tile."""
    scored = []
    splits = SPLITS if allow_split else (1,)
    # 32-column (fused norm: 16-column) d blocks only when nothing else fits (wide fp32 layouts)
    candidates = list(steer_candidates(shape, card, splits=splits)) or \
        list(steer_candidates(shape, card, block_ds=(16 if shape.norm_out else 32,), splits=splits))
    for config, res in candidates:
        pred = predict_steer(shape, config, card, store_coef=store_coef)
        persistent_full = config.SPLIT > 1 and pred.grid >= card.sms  # a persistent grid on every SM
        scored.append((res.ctas_per_sm >= 2 or persistent_full, pred, res))
    if not scored:
        raise ValueError(f"no launch configuration fits {shape} on {card.name}")
    preferred = [s for s in scored if s[0]] or scored
    return min(preferred, key=lambda s: _rank(s[1], s[2].ctas_per_sm))[1]


def best_design(shape: Shape, card: Card = DEFAULT_CARD, **design) -> Prediction:
    """The fastest candidate configuration under designs the kernels do not implement (`predict_steer`'s
    ``multicast``, ``partials_on_chip``, ``tile_on_chip``, ``hide_ramp``), among those the design fits: a row tile
    kept on chip takes shared memory, so tall tiles of wide rows drop out."""
    preds = []
    for config, _ in steer_candidates(shape, card):
        try:
            preds.append(predict_steer(shape, config, card, **design))
        except ValueError:  # the tile does not fit on chip beside this configuration's buffers
            continue
    if not preds:
        raise ValueError(f"no launch configuration fits {shape} on {card.name} under {design}")
    return min(preds, key=lambda p: p.time_us)


# every combination of the designs `predict_steer` can price but the kernels do not implement (without the bound)
UNBUILT_DESIGNS = tuple(dict(multicast=mc, partials_on_chip=po, tile_on_chip=to)
                        for mc in (1, 2, 4) for po in (False, True) for to in (False, True))


def design_name(design: dict) -> str:
    """One of `UNBUILT_DESIGNS` in words."""
    parts = [f"W_in multicast x{design['multicast']}" if design["multicast"] > 1 else "",
             "partials in DSMEM" if design["partials_on_chip"] else "",
             "tile on chip" if design["tile_on_chip"] else ""]
    return " + ".join(p for p in parts if p) or "as shipped"


def best_unbuilt(shape: Shape, card: Card = DEFAULT_CARD) -> tuple:
    """(prediction, design): the fastest the model knows of for ``shape``, dependent round trips included, over
    the candidate configurations and `UNBUILT_DESIGNS` (the shipped kernel is the design with none of them)."""
    return min(((best_design(shape, card, **design), design) for design in UNBUILT_DESIGNS),
               key=lambda pair: pair[0].time_us)


@functools.lru_cache(maxsize=4096)
def _cached_steer(shape: Shape, card: Card, store_coef: bool, allow_split: bool) -> Config:
    return best_steer(shape, card, store_coef, allow_split).config


def _bucket(rows: int) -> int:
    """Rows rounded up to a power of two: configurations are cached per bucket, not per row count."""
    return 1 << max(0, (rows - 1).bit_length())


def steer_config(shape: Shape, card: Optional[Card] = None, interpreting: bool = False,
                 store_coef: bool = False) -> Config:
    if interpreting:
        return INTERPRETER_CONFIG
    return _cached_steer(dataclasses.replace(shape, rows=_bucket(shape.rows)), card or DEFAULT_CARD, store_coef,
                         split_d_allowed())


APPLY_CONFIGS = (Config(16, 64, 4, 1), Config(16, 128, 4, 1), Config(32, 128, 4, 1), Config(64, 128, 4, 1),
                 Config(64, 256, 8, 1))


@functools.lru_cache(maxsize=4096)
def _cached_apply(shape: Shape, card: Card, sequences: int) -> Config:
    configs = [c for c in APPLY_CONFIGS if c.BLOCK_T <= max(MIN_DOT, shape.rows)]
    preds = [predict_apply(shape, c, card, sequences) for c in configs]
    return min(preds, key=lambda p: (round(p.time_us / p.ideal_us / 0.02), p.l2_bytes)).config


def apply_config(shape: Shape, sequences: int, card: Optional[Card] = None, interpreting: bool = False) -> Config:
    """Query-mode `apply_coef`: grid over row tiles and d blocks (no reduction over d)."""
    if interpreting:
        return INTERPRETER_CONFIG
    return _cached_apply(dataclasses.replace(shape, rows=_bucket(shape.rows)), card or DEFAULT_CARD,
                         min(_bucket(sequences), 64))
