"""The bytes model of the bank kernel (`bank_kernel`, issue 13): `perf_model`'s rules applied to a mixed batch.

Plain Python, like `perf_model`, whose cards, `Shape`, `Config`, `resources` and `Prediction` it uses.

One program per row tile keeps the tile in flight between its two passes over d; the second read of h comes from
L2 only while the tiles in flight (programs resident at once x BLOCK_T x d x bytes) fit in half of L2
(`perf_model`'s rule). Issue 24 asked for <= 1.1x the ideal HBM bytes at T >= 4096. `predict_bank` counts the
three layouts the kernel has (docs/kernels.md, "The bank kernel's bytes", has the table):

* one program per tile (``programs=None``): at T >= 4096 all of h is in flight, so h is read twice from HBM
  (~1.5x the ideal bytes);
* the **bounded persistent grid** (``programs``, `bounded_programs`): the tiles in flight fit half of L2. Fewer
  programs mean fewer bytes in flight per SM, which a deeper pipeline makes up for; it leaves SMs idle when a
  tile is large against L2 (32-row tiles at d = 8192: 50 programs on a 132-SM H100). Its loop over tiles costs
  registers, so its occupancy is ptxas's (`PERSISTENT_REGISTERS`).
* **split-d** (``config.SPLIT > 1``, counted as `perf_model.predict_steer` counts the token kernel's): partial
  sums through L2, the last slice runs the epilogue, pass 2 LAG tiles behind.
"""
from __future__ import annotations

from typing import Optional

from .perf_model import Card, Config, Prediction, Shape, _sm_rate, lag_tiles, resources, round_trips


# Registers per thread of the persistent variant (the loop over tiles), ptxas's for the configurations
# `bank_kernel` may launch that way (sm_90a, NP = 128, the larger of bf16 and fp16; tests/test_bank_kernels.py
# checks the programs per SM that follow), keyed by (bytes per element, BLOCK_T, BLOCK_D, warps, stages); one program per tile they are
# 76-136. Elsewhere the model takes the ceiling, 255.
PERSISTENT_REGISTERS = {(2, 16, 128, 4, 3): 255, (2, 32, 128, 8, 3): 180, (2, 32, 128, 8, 4): 183,
                        (4, 16, 64, 8, 3): 128, (4, 16, 64, 8, 4): 180}


def persistent_ctas_per_sm(config: Config, elem: int, card: Card, ctas_per_sm: int) -> int:
    """Resident programs per SM of the persistent variant: ``ctas_per_sm`` (shared memory, warps) capped by its
    registers (allocated per warp in 256-register chunks)."""
    key = (elem, config.BLOCK_T, config.BLOCK_D, config.num_warps, config.num_stages)
    per_warp = -(-PERSISTENT_REGISTERS.get(key, 255) * 32 // 256) * 256
    return min(ctas_per_sm, card.regs_per_sm // (per_warp * config.num_warps))


def bounded_programs(block_t: int, d: int, elem: int, card: Card) -> int:
    """The most programs whose row tiles (``block_t x d`` elements of ``elem`` bytes each) fit in half of L2: the
    persistent grid that keeps the second read of h in L2."""
    return max(1, (card.l2_bytes // 2) // (block_t * d * elem))


def predict_bank(steerers, config: Config, card: Card, unsteered_rows: int = 0, in_place: bool = False,
                 store_coef: bool = False, programs: Optional[int] = None) -> Prediction:
    """The bank kernel on a mixed batch: ``steerers`` holds one `Shape` per steerer of the bank, its ``rows`` the
    rows assigned to it (0 for a steerer no row uses), ``unsteered_rows`` the rows with index -1 (copied out of
    place, untouched in place). ``programs``: a persistent grid of at most that many programs (`bounded_programs`);
    None: one program per tile. ``config.SPLIT > 1``: split-d (the kernel's `bank_split_items`).

    Each steerer's weights are read from HBM once and re-read from L2 once per row tile of *its* rows, so mixing S
    steerers costs their weights once each plus up to one partial tile per steerer, not S times the batch. Also
    counted: the row order (4 bytes a row) and the group counts each tile's program reads. The plan (a sort of the
    row indices) runs once per forward, before the first steered layer, and is not part of a layer's launch."""
    shapes = [s for s in steerers if s.rows > 0]
    if not shapes:
        raise ValueError("steerers: no rows assigned to any steerer")
    e, d, bt, split = shapes[0].elem, shapes[0].d, config.BLOCK_T, config.SPLIT
    widest = Shape(sum(s.rows for s in shapes) + unsteered_rows, d, e, max(s.w_in_cols for s in steerers),
                   max(s.n_coef for s in steerers), has_mean=any(s.has_mean for s in steerers))
    tiles = [-(-s.rows // bt) for s in shapes]
    copy_tiles = 0 if in_place or store_coef else -(-unsteered_rows // bt)
    n_tiles = sum(tiles) + copy_tiles
    ctas_per_sm = resources(widest, config, card).ctas_per_sm
    if split == 1 and programs is not None:
        ctas_per_sm = persistent_ctas_per_sm(config, e, card, ctas_per_sm)
    occ = max(ctas_per_sm, 1)
    n_rows = widest.rows
    h = sum(s.h_bytes for s in shapes)
    u = unsteered_rows * d * e
    slots = card.sms * occ
    if split > 1:  # as `perf_model.predict_steer` counts the token kernel's split-d
        concurrent = min(n_tiles * split, slots)
        lag = 0 if store_coef else max(1, min(lag_tiles(concurrent, split), n_tiles))
        grid = min((n_tiles + lag) * split, slots)
        working_set = (lag + 1) * bt * d * e
        partial_bytes = sum(s.rows * split * (s.w_in_cols + 2) * 4 for s in shapes)  # written, then read back
        coef_bytes = 0 if store_coef else n_tiles * bt * (widest.ncp + 1) * 4 * (1 + split)
    else:
        grid = n_tiles if programs is None else min(n_tiles, programs)
        concurrent = min(grid, slots)
        working_set = concurrent * bt * d * e
        partial_bytes = coef_bytes = 0
    working_set = 0 if store_coef else working_set
    second_l2 = working_set <= card.l2_bytes // 2
    index_bytes = n_rows * 4 + n_tiles * split * (len(steerers) + 2) * 4
    pass1_l2 = sum((s.h_bytes if s.has_pass1 else 0) + t * s.w_in_bytes for s, t in zip(shapes, tiles)) \
        + 2 * partial_bytes
    pass2_l2 = 0 if store_coef else sum(2 * s.h_bytes + t * s.w_out_bytes for s, t in zip(shapes, tiles)) + coef_bytes
    copy = 0 if in_place or store_coef else 2 * u
    l2 = pass1_l2 + pass2_l2 + copy + index_bytes
    weights = sum(s.w_in_bytes + (0 if store_coef else s.w_out_bytes) for s in shapes)
    out_bytes = n_rows * widest.n_coef * 4 if store_coef else h + (0 if in_place else u)
    unsteered_read = 0 if in_place or store_coef else u
    hbm = h + unsteered_read + out_bytes + weights + (0 if second_l2 else h) + index_bytes + partial_bytes // 2
    ideal = h + unsteered_read + out_bytes + weights
    # multiprocessor feed: pass 1 and pass 2 one after the other in a program, `buffers` stages of each in flight
    active = max(1, min(card.sms, grid))
    per_sm = concurrent / active
    buffers = max(1, config.num_stages - 1)
    rows = min(bt, max(s.rows for s in shapes))
    rate1 = _sm_rate(card, per_sm * buffers * (rows * config.BLOCK_D * e + config.BLOCK_D * widest.w_in_cols * e))
    rate2 = _sm_rate(card, per_sm * buffers * (rows * config.BLOCK_D * e + widest.n_coef * config.BLOCK_D * e))
    sm_us = (pass1_l2 / (active * rate1) + (pass2_l2 + copy) / (active * rate2)) / 1e3
    return Prediction("synthesize_bank" if store_coef else "bank", card.name, config, grid, ctas_per_sm, concurrent,
                      working_set, second_l2, hbm, l2, ideal, hbm / card.hbm_gbps / 1e3, l2 / card.l2_gbps / 1e3,
                      sm_us, ideal / card.hbm_gbps / 1e3, 1, card.launch_us,
                      # the token kernel's round trips, after one more: the group counts and row order are read
                      # before the first loads of h
                      (round_trips(split) + 1) * card.latency_ns / 1e3)
