"""The bank kernel: token mode (and `synthesize_bank`) for a batch whose rows belong to different steerers, in one
launch.

Grouped like a multi-LoRA (SGMV) or MoE kernel: `bank.plan_rows` sorts the row indices by steerer on the device and
counts each group; each program takes one row tile of ONE group, so it reads only that steerer's columns of W_in
and rows of W_out (sizes and offsets from the bank's metadata table, at run time: r, K, m, k differ per steerer).
The grid is an upper bound, ``cdiv(N, BLOCK_T) + G`` for G groups (each group adds at most one partial tile);
a program finds its group from the counts (a cumulative sum over G values) and programs past the last tile do
nothing, so nothing is read back to the host. Group 0 holds the rows to leave alone (-1): copied when out of
place, never touched in place; the last group holds indices outside the bank, which come out as NaN rows (they
cannot raise without a host read).

Per tile of steerer s: pass 1 over d accumulates ``(h - mu_s) @ W_in_s`` and ``||h - mu_s||^2`` (the accumulator is
as wide as the bank's widest steerer; columns past ``cols_s`` are masked, never fetched), the epilogue (gate,
router softmax, MLP middle: `bank_coefficients`, the run-time-size twin of `coef_tile.coefficients_from_projections`)
gives the coefficients, and pass 2 writes ``h + coef @ W_out_s`` (`steer_kernel.add_coef_times_w_out` on the
steerer's rows of W_out). In place, rows whose gate is off are not written. ``STORE_COEF``: store the coefficient
rows instead (query mode's `synthesize_bank`; rows of width ``NC``, each steerer's K + k then zeros).

Three layouts of the work (issue 24), chosen by the bytes model (`bank_launch`, `bank_perf_model.predict_bank`):
one program per row tile; ``PERSISTENT``, a bounded grid whose programs loop over the tiles so that the tiles in
flight between the two passes fit in half of L2 (the second read of h then comes from L2); ``SPLIT > 1``, split-d
as `steer_kernel` runs it (`bank_split_items`: decode, and d = 8192 at prefill). docs/kernels.md, "The bank
kernel's bytes", has the predictions. Readable equivalent: `bank_reference`.
"""
import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .bank import META, META_FIELDS, BankLayout, PackedBank
from .coef_tile import add_squares, gate_open
from .heuristics import INTERPRETER_CONFIG, split_d_allowed
from .kernel_common import INTERPRETING, card_for, config_kwargs, device_guard, native_dot
from .bank_perf_model import bounded_programs, predict_bank
from .pdl import launch_options, wait_for_previous_kernel
from .perf_model import Card, Config, Shape, split_plan
from .split_state import SPIN_LIMIT, launch_buffers
from .steer_kernel import add_coef_times_w_out, count_out_and_reset, wait_until_set


# columns of the bank's metadata table (`bank.META_NAMES`), as constexprs the kernel can index with
META_COL_OFF = tl.constexpr(META["COL_OFF"])
META_COLS = tl.constexpr(META["COLS"])
META_R = tl.constexpr(META["R"])
META_K = tl.constexpr(META["K"])
META_M = tl.constexpr(META["M"])
META_KR = tl.constexpr(META["KR"])
META_HAS_GATE = tl.constexpr(META["HAS_GATE"])
META_HAS_MEAN = tl.constexpr(META["HAS_MEAN"])
META_HAS_ROUTER = tl.constexpr(META["HAS_ROUTER"])
META_RELU = tl.constexpr(META["RELU"])
META_ROUTER_COL = tl.constexpr(META["ROUTER_COL"])
META_RES_COL = tl.constexpr(META["RES_COL"])
META_RB_OFF = tl.constexpr(META["RB_OFF"])
META_B1_OFF = tl.constexpr(META["B1_OFF"])
META_W2_OFF = tl.constexpr(META["W2_OFF"])
META_B2_OFF = tl.constexpr(META["B2_OFF"])
META_MEAN_OFF = tl.constexpr(META["MEAN_OFF"])
META_OUT_OFF = tl.constexpr(META["OUT_OFF"])
META_NC = tl.constexpr(META["NC"])
META_HAS_PASS1 = tl.constexpr(META["HAS_PASS1"])


@triton.jit
def bank_projections(h_ptr, rows, edit, d, d_start, d_stop, w_in_ptr, w_in_stride, col_off, cols_s, mean_ptr,
                     mean_off, has_mean, NP: tl.constexpr, NATIVE_DOT: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Pass 1 over columns ``[d_start, d_stop)`` (whole d blocks) for one steerer's tile:
    ``((h - mu) @ W_in[:, col_off:col_off + cols_s], sq, sq_big)`` in fp32, with
    ``||h - mu||^2`` plain and scaled (`coef_tile.add_squares`: no overflow for any finite row). W_in offsets are
    64-bit: ``d x w_in_stride`` (every steerer's columns) may pass 2^31 elements."""
    cols = tl.arange(0, NP)
    col_mask = cols < cols_s
    acc = tl.zeros((BLOCK_T, NP), tl.float32)
    sq = tl.zeros((BLOCK_T,), tl.float32)
    sq_big = tl.zeros((BLOCK_T,), tl.float32)
    row_base = rows.to(tl.int64) * d
    mean_stop = d * (has_mean != 0).to(tl.int32)  # no mean: every load of mu masked off (zero)
    for d0 in tl.range(d_start, d_stop, BLOCK_D, num_stages=NUM_STAGES):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d
        x = tl.load(h_ptr + row_base[:, None] + offs_d[None, :], mask=edit[:, None] & d_mask[None, :], other=0.0,
                    eviction_policy="evict_last")
        w = tl.load(w_in_ptr + offs_d.to(tl.int64)[:, None] * w_in_stride + col_off + cols[None, :],
                    mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        mu = tl.load(mean_ptr + mean_off + offs_d, mask=offs_d < mean_stop, other=0.0)
        xc32 = x.to(tl.float32) - mu[None, :]
        sq, sq_big = add_squares(xc32, sq, sq_big)
        if NATIVE_DOT:
            acc = tl.dot(xc32.to(x.dtype), w, acc)
        else:
            acc = tl.dot(xc32, w.to(tl.float32), acc, input_precision="ieee")
    return acc, sq, sq_big


@triton.jit
def bank_coefficients(acc, sq, sq_big, edit, consts_ptr, tau, eps, scale, r, K, m, kr, has_gate, has_router, relu,
                      router_col, res_col, rb_off, b1_off, w2_off, b2_off, ANY_GATE: tl.constexpr,
                      ANY_ROUTER: tl.constexpr, ANY_RES: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
                      NCP: tl.constexpr, BLOCK_T: tl.constexpr):
    """The epilogue with run-time sizes: ``(coef, g)`` as in `coef_tile.coefficients_from_projections`. The
    ``ANY_*`` flags drop the parts no steerer of the bank has; the rest is selected per steerer with masks."""
    cols = tl.arange(0, NP)
    coef_cols = tl.arange(0, NCP)
    g = tl.where(edit, 1.0, 0.0)
    if ANY_GATE:
        open_ = gate_open(tl.where(cols[None, :] < r, acc, 0.0), sq, sq_big, tau, eps)
        g = tl.where(open_ | (has_gate == 0), g, 0.0)
    coef = tl.broadcast_to(tl.where(coef_cols == 0, 1.0, 0.0)[None, :], (BLOCK_T, NCP))  # one expert: weight 1
    if ANY_ROUTER:
        is_router = (cols >= router_col) & (cols < router_col + K * has_router)  # empty without a router
        bias = tl.load(consts_ptr + rb_off + cols - router_col, mask=is_router, other=0.0)
        # without a router, column 0 stands in (a finite softmax, discarded below) so no row is all -inf
        logits = tl.where((is_router | (cols < 1 - has_router))[None, :], acc + bias[None, :], float("-inf"))
        e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        weights = e / tl.sum(e, axis=1)[:, None]
        pick = tl.minimum(router_col + coef_cols, NP - 1)
        weights = tl.gather(weights, tl.broadcast_to(pick[None, :], (BLOCK_T, NCP)), axis=1)
        coef = tl.where((has_router != 0) & (coef_cols < K)[None, :], weights, coef)
    if ANY_RES:  # a steerer without the MLP has m = kr = 0: every load below is masked off and adds 0
        m_cols = tl.arange(0, MP)
        pick = tl.minimum(res_col + m_cols, NP - 1)
        hidden = tl.gather(acc, tl.broadcast_to(pick[None, :], (BLOCK_T, MP)), axis=1)
        hidden += tl.load(consts_ptr + b1_off + m_cols, mask=m_cols < m, other=0.0)[None, :]
        hidden = tl.where(relu != 0, tl.maximum(hidden, 0.0), hidden)
        hidden = tl.where((m_cols < m)[None, :], hidden, 0.0)
        is_beta = (coef_cols >= K) & (coef_cols < K + kr)
        w2_t = tl.load(consts_ptr + w2_off + (coef_cols[None, :] - K) * m + m_cols[:, None],
                       mask=(m_cols < m)[:, None] & is_beta[None, :], other=0.0)
        b2 = tl.load(consts_ptr + b2_off + coef_cols - K, mask=is_beta, other=0.0)
        coef += tl.dot(hidden, w2_t, input_precision="ieee") + b2[None, :]
    coef = tl.where((g != 0.0)[:, None], coef * scale, 0.0)  # selected: inf * 0 would be NaN
    return coef, g


@triton.jit
def fill_rows(h_ptr, out_ptr, rows, live, d, d_start, d_stop, NAN: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns ``[d_start, d_stop)`` of rows copied unchanged from h (``NAN`` = 0) or set to NaN (an index outside
    the bank)."""
    row_base = rows.to(tl.int64) * d
    for d0 in range(d_start, d_stop, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = live[:, None] & (offs_d < d)[None, :]
        x = tl.load(h_ptr + row_base[:, None] + offs_d[None, :], mask=mask, other=0.0)
        if NAN:
            x = tl.full(x.shape, float("nan"), x.dtype)
        tl.store(out_ptr + row_base[:, None] + offs_d[None, :], x, mask=mask)


@triton.jit
def tile_rows(tile_id, order_ptr, counts_ptr, n_groups, GP: tl.constexpr, BLOCK_T: tl.constexpr):
    """``(group, rows, live)`` of row tile ``tile_id``: the group whose tiles hold it (``n_groups`` past the last
    tile), its row indices and which of its BLOCK_T lanes hold one."""
    groups = tl.arange(0, GP)
    counts = tl.load(counts_ptr + groups, mask=groups < n_groups, other=0)
    tiles = (counts + BLOCK_T - 1) // BLOCK_T
    ends = tl.cumsum(tiles, axis=0)
    group = tl.sum((ends <= tile_id).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(groups == group, ends - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(groups < group, counts, 0), axis=0)
    count = tl.sum(tl.where(groups == group, counts, 0), axis=0)
    pos = (tile_id - first_tile) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = pos < count
    rows = tl.load(order_ptr + row_start + pos, mask=live, other=0)
    return group, rows, live


@triton.jit
def bank_tile(tile_id, h_ptr, out_ptr, order_ptr, counts_ptr, meta_ptr, scalars_ptr, w_in_ptr, w_out_ptr, mean_ptr,
              consts_ptr, coef_out_ptr, n_rows, d, n_groups, NC, w_in_stride, GP: tl.constexpr, NP: tl.constexpr,
              MP: tl.constexpr, NCP: tl.constexpr, ANY_GATE: tl.constexpr, ANY_ROUTER: tl.constexpr,
              ANY_RES: tl.constexpr, MF: tl.constexpr, NATIVE_DOT: tl.constexpr, IN_PLACE: tl.constexpr,
              STORE_COEF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Row tile ``tile_id`` of the launch: the group (steerer) whose tiles hold it, then its rows."""
    group, rows, live = tile_rows(tile_id, order_ptr, counts_ptr, n_groups, GP, BLOCK_T)
    if group < n_groups:
        coef_cols = tl.arange(0, NCP)
        coef_mask = live[:, None] & (coef_cols < NC)[None, :]
        coef_ptrs = coef_out_ptr + rows.to(tl.int64)[:, None] * NC + coef_cols[None, :]
        if (group == 0) | (group == n_groups - 1):  # unsteered rows, or indices outside the bank (NaN)
            invalid = group == n_groups - 1
            if STORE_COEF:
                tl.store(coef_ptrs, tl.where(invalid, float("nan"), tl.zeros((BLOCK_T, NCP), tl.float32)),
                         mask=coef_mask)
            elif invalid:
                fill_rows(h_ptr, out_ptr, rows, live, d, 0, d, 1, BLOCK_D)
            elif not IN_PLACE:
                fill_rows(h_ptr, out_ptr, rows, live, d, 0, d, 0, BLOCK_D)
        else:
            meta = meta_ptr + (group - 1) * MF
            col_off = tl.multiple_of(tl.load(meta + META_COL_OFF), 8)
            nc = tl.load(meta + META_NC)
            out_off = tl.load(meta + META_OUT_OFF)
            has_gate = tl.load(meta + META_HAS_GATE)
            sc = scalars_ptr + (group - 1) * 3
            tau, eps, scale = tl.load(sc), tl.load(sc + 1), tl.load(sc + 2)
            d_stop = tl.where(tl.load(meta + META_HAS_PASS1) != 0, d, 0)  # CAA-like: nothing to read in pass 1
            # cols_s is a multiple of 8 (the pack pads every steerer's W_in columns to one, `bank`): saying so lets
            # the column mask be constant over 8 columns, so the W_in tile loads as 16-byte cp.async copies
            # instead of 2-byte synchronous loads (issue 24; tests/test_bank_kernels.py checks the TTGIR). Not in
            # the coefficient-storing variant, where the pipelined loads made ptxas spill 48 bytes.
            cols_s = tl.load(meta + META_COLS)
            if not STORE_COEF:
                cols_s = tl.multiple_of(cols_s, 8)
            acc, sq, sq_big = bank_projections(h_ptr, rows, live, d, 0, d_stop, w_in_ptr, w_in_stride, col_off, cols_s,
                                               mean_ptr, tl.load(meta + META_MEAN_OFF),
                                               tl.load(meta + META_HAS_MEAN), NP, NATIVE_DOT, BLOCK_T, BLOCK_D,
                                               NUM_STAGES)
            coef, g = bank_coefficients(acc, sq, sq_big, live, consts_ptr, tau, eps, scale, tl.load(meta + META_R),
                                        tl.load(meta + META_K), tl.load(meta + META_M), tl.load(meta + META_KR),
                                        has_gate, tl.load(meta + META_HAS_ROUTER), tl.load(meta + META_RELU),
                                        tl.load(meta + META_ROUTER_COL), tl.load(meta + META_RES_COL),
                                        tl.load(meta + META_RB_OFF), tl.load(meta + META_B1_OFF),
                                        tl.load(meta + META_W2_OFF), tl.load(meta + META_B2_OFF),
                                        ANY_GATE, ANY_ROUTER, ANY_RES, NP, MP, NCP, BLOCK_T)
            if STORE_COEF:
                tl.store(coef_ptrs, coef, mask=coef_mask)
            else:
                edit = g != 0.0
                write = edit if IN_PLACE else live  # in place: rows whose gate is off are not written
                if tl.max(write.to(tl.int32), axis=0) > 0:  # pass 2 over this steerer's rows of W_out
                    add_coef_times_w_out(h_ptr, out_ptr, rows, write, edit, d, 0, d, coef,
                                         w_out_ptr + out_off.to(tl.int64) * d, nc, NCP, NATIVE_DOT, BLOCK_D,
                                         NUM_STAGES)


@triton.jit
def bank_split_items(h_ptr, out_ptr, order_ptr, counts_ptr, meta_ptr, scalars_ptr, w_in_ptr, w_out_ptr, mean_ptr,
                     consts_ptr, ws_ptr, flags_ptr, error_ptr, n_rows, d, n_groups, w_in_stride, lag, ring,
                     spin_limit, GP: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, NCP: tl.constexpr,
                     ANY_GATE: tl.constexpr, ANY_ROUTER: tl.constexpr, ANY_RES: tl.constexpr, MF: tl.constexpr,
                     NATIVE_DOT: tl.constexpr, IN_PLACE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                     NUM_STAGES: tl.constexpr, SPLIT: tl.constexpr):
    """Split-d, as `steer_kernel` runs it (its docstring says how the tickets, the partials' ring and LAG work),
    over the bank's tiles: item v is pass 1 of slice v % SPLIT of tile v // SPLIT (the slice's partial sums of the
    tile's steerer, only its ``cols_s`` columns), the last slice to arrive summing the partials in slice order and
    publishing the tile's coefficients; then pass 2 of the same slice for tile v // SPLIT - lag (the copy or NaN
    fill for the -1 and invalid groups). Counters and workspace as `split_state` and `perf_model.split_plan`."""
    PART_W: tl.constexpr = NP + 2
    COEF_W: tl.constexpr = NCP + 1
    n_tiles = tl.cdiv(n_rows, BLOCK_T) + n_groups
    ticket_ptr = flags_ptr + 1
    arrived_ptr = flags_ptr + 2
    ready_ptr = flags_ptr + 2 + n_tiles
    part_size = BLOCK_T * PART_W
    coef_ws_ptr = ws_ptr + ring.to(tl.int64) * SPLIT * part_size
    slice_d = tl.cdiv(tl.cdiv(d, SPLIT), BLOCK_D) * BLOCK_D
    lanes = tl.arange(0, BLOCK_T)
    cols = tl.arange(0, NP)
    coef_cols = tl.arange(0, NCP)
    n_items = (n_tiles + lag) * SPLIT
    v = tl.atomic_add(ticket_ptr, 1)
    while v < n_items:
        tile = v // SPLIT
        s = v % SPLIT
        d_start = s * slice_d
        d_stop = tl.minimum(d, d_start + slice_d)
        if tile < n_tiles:  # pass 1 of this slice; the last slice to arrive finishes the tile
            group, rows, live = tile_rows(tile, order_ptr, counts_ptr, n_groups, GP, BLOCK_T)
            steered = (group > 0) & (group < n_groups - 1)
            meta = meta_ptr + tl.minimum(tl.maximum(group - 1, 0), n_groups - 3) * MF  # a steerer's row, always
            cols_s = tl.multiple_of(tl.load(meta + META_COLS), 8)
            own = live[:, None] & (cols < cols_s)[None, :]
            part_ptr = ws_ptr + ((tile % ring) * SPLIT).to(tl.int64) * part_size
            if tile >= ring:  # the slot's previous tile must have summed its partials
                wait_until_set(ready_ptr + tile - ring, error_ptr, spin_limit)
            if steered:
                slice_stop = tl.where(tl.load(meta + META_HAS_PASS1) != 0, d_stop, d_start)
                acc, sq, sq_big = bank_projections(h_ptr, rows, live, d, d_start, slice_stop, w_in_ptr, w_in_stride,
                                                   tl.multiple_of(tl.load(meta + META_COL_OFF), 8), cols_s, mean_ptr,
                                                   tl.load(meta + META_MEAN_OFF), tl.load(meta + META_HAS_MEAN), NP,
                                                   NATIVE_DOT, BLOCK_T, BLOCK_D, NUM_STAGES)
                tl.store(part_ptr + s * part_size + lanes[:, None] * PART_W + cols[None, :], acc, mask=own)
                tl.store(part_ptr + s * part_size + lanes * PART_W + NP, sq, mask=live)
                tl.store(part_ptr + s * part_size + lanes * PART_W + NP + 1, sq_big, mask=live)
            tl.debug_barrier()  # every thread's partials are stored before the release below
            if tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel") == SPLIT - 1:
                if steered:
                    acc = tl.zeros((BLOCK_T, NP), tl.float32)
                    sq = tl.zeros((BLOCK_T,), tl.float32)
                    sq_big = tl.zeros((BLOCK_T,), tl.float32)
                    for j in range(SPLIT):  # slice order, whichever slice finishes: deterministic sums
                        acc += tl.load(part_ptr + j * part_size + lanes[:, None] * PART_W + cols[None, :], mask=own,
                                       other=0.0, cache_modifier=".cg")
                        sq += tl.load(part_ptr + j * part_size + lanes * PART_W + NP, mask=live, other=0.0,
                                      cache_modifier=".cg")
                        sq_big += tl.load(part_ptr + j * part_size + lanes * PART_W + NP + 1, mask=live, other=0.0,
                                          cache_modifier=".cg")
                    sc = scalars_ptr + (group - 1) * 3
                    coef, g = bank_coefficients(acc, sq, sq_big, live, consts_ptr, tl.load(sc), tl.load(sc + 1),
                                                tl.load(sc + 2), tl.load(meta + META_R), tl.load(meta + META_K),
                                                tl.load(meta + META_M), tl.load(meta + META_KR),
                                                tl.load(meta + META_HAS_GATE), tl.load(meta + META_HAS_ROUTER),
                                                tl.load(meta + META_RELU), tl.load(meta + META_ROUTER_COL),
                                                tl.load(meta + META_RES_COL), tl.load(meta + META_RB_OFF),
                                                tl.load(meta + META_B1_OFF), tl.load(meta + META_W2_OFF),
                                                tl.load(meta + META_B2_OFF), ANY_GATE, ANY_ROUTER, ANY_RES, NP, MP,
                                                NCP, BLOCK_T)
                    tile_ptr = coef_ws_ptr + tile.to(tl.int64) * BLOCK_T * COEF_W
                    tl.store(tile_ptr + lanes[:, None] * COEF_W + coef_cols[None, :], coef)
                    tl.store(tile_ptr + lanes * COEF_W + NCP, g)
                tl.debug_barrier()
                tl.atomic_xchg(ready_ptr + tile, 1, sem="release")
        done = tile - lag  # pass 2 of this slice for a tile whose coefficients started earlier
        if (done >= 0) & (done < n_tiles):
            wait_until_set(ready_ptr + done, error_ptr, spin_limit)
            group, rows, live = tile_rows(done, order_ptr, counts_ptr, n_groups, GP, BLOCK_T)
            if group == n_groups - 1:  # indices outside the bank
                fill_rows(h_ptr, out_ptr, rows, live, d, d_start, d_stop, 1, BLOCK_D)
            elif group == 0:
                if not IN_PLACE:
                    fill_rows(h_ptr, out_ptr, rows, live, d, d_start, d_stop, 0, BLOCK_D)
            elif group < n_groups:
                tile_ptr = coef_ws_ptr + done.to(tl.int64) * BLOCK_T * COEF_W
                coef = tl.load(tile_ptr + lanes[:, None] * COEF_W + coef_cols[None, :], cache_modifier=".cg")
                edit = tl.load(tile_ptr + lanes * COEF_W + NCP, cache_modifier=".cg") != 0.0  # 0 past the rows
                write = edit if IN_PLACE else live  # in place: rows whose gate is off are not written
                if tl.max(write.to(tl.int32), axis=0) > 0:
                    meta = meta_ptr + (group - 1) * MF
                    add_coef_times_w_out(h_ptr, out_ptr, rows, write, edit, d, d_start, d_stop, coef,
                                         w_out_ptr + tl.load(meta + META_OUT_OFF).to(tl.int64) * d,
                                         tl.load(meta + META_NC), NCP, NATIVE_DOT, BLOCK_D, NUM_STAGES)
        v = tl.atomic_add(ticket_ptr, 1)
    count_out_and_reset(flags_ptr, n_tiles)


# The group count, the coefficient width and W_in's stride are run-time arguments (`bank.BankLayout`): a bank
# re-packed with another steerer keeps its compiled kernel. The first two are never specialised (a count or width
# that happens to be 1 or a multiple of 16 would compile another copy); the stride is always a multiple of 16, which
# the JIT's alignment specialisation then knows (16-byte loads of W_in).
@triton.jit(do_not_specialize=["n_groups", "NC", "lag", "ring", "spin_limit"])
def bank_kernel(h_ptr, out_ptr, order_ptr, counts_ptr, meta_ptr, scalars_ptr, w_in_ptr, w_out_ptr, mean_ptr,
                consts_ptr, coef_out_ptr, ws_ptr, flags_ptr, error_ptr, n_rows, d, n_groups, NC, w_in_stride, lag,
                ring, spin_limit, GP: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, NCP: tl.constexpr,
                ANY_GATE: tl.constexpr, ANY_ROUTER: tl.constexpr, ANY_RES: tl.constexpr, MF: tl.constexpr,
                NATIVE_DOT: tl.constexpr, IN_PLACE: tl.constexpr, STORE_COEF: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr, PERSISTENT: tl.constexpr, SPLIT: tl.constexpr,
                PDL: tl.constexpr = False):
    # fewer programs than tiles (PERSISTENT, `bank_perf_model.bounded_programs`): program p takes tiles p, p + P,
    # ..., so the P programs in flight hold about P consecutive tiles between their two passes over d and the
    # second read of h comes from L2. A variant of its own: the loop costs registers (114 -> 255 at 16 x 128, bf16)
    # PDL: before the first ticket (split-d) and every load, of the row plan too (`plan_rows` writes it just before)
    wait_for_previous_kernel(PDL)
    if SPLIT > 1:  # token mode only (`bank_launch`)
        bank_split_items(h_ptr, out_ptr, order_ptr, counts_ptr, meta_ptr, scalars_ptr, w_in_ptr, w_out_ptr, mean_ptr,
                         consts_ptr, ws_ptr, flags_ptr, error_ptr, n_rows, d, n_groups, w_in_stride, lag, ring,
                         spin_limit, GP, NP, MP, NCP, ANY_GATE, ANY_ROUTER, ANY_RES, MF, NATIVE_DOT, IN_PLACE,
                         BLOCK_T, BLOCK_D, NUM_STAGES, SPLIT)
    elif PERSISTENT:
        for tile_id in tl.range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_T) + n_groups, tl.num_programs(0),
                                num_stages=1):
            bank_tile(tile_id, h_ptr, out_ptr, order_ptr, counts_ptr, meta_ptr, scalars_ptr, w_in_ptr, w_out_ptr,
                      mean_ptr, consts_ptr, coef_out_ptr, n_rows, d, n_groups, NC, w_in_stride, GP, NP, MP, NCP,
                      ANY_GATE, ANY_ROUTER, ANY_RES, MF, NATIVE_DOT, IN_PLACE, STORE_COEF, BLOCK_T, BLOCK_D,
                      NUM_STAGES)
    else:
        bank_tile(tl.program_id(0), h_ptr, out_ptr, order_ptr, counts_ptr, meta_ptr, scalars_ptr, w_in_ptr,
                  w_out_ptr, mean_ptr, consts_ptr, coef_out_ptr, n_rows, d, n_groups, NC, w_in_stride, GP, NP, MP,
                  NCP, ANY_GATE, ANY_ROUTER, ANY_RES, MF, NATIVE_DOT, IN_PLACE, STORE_COEF, BLOCK_T, BLOCK_D,
                  NUM_STAGES)


# Launch configurations the bank kernel may take: compiled for sm_90a without spills (tests/test_bank_kernels.py);
# its epilogue keeps the router and MLP paths of every steerer (run-time sizes), so 32-row tiles need 8 warps and
# 64-row tiles or 256-column d blocks spilled; since W_in loads as cp.async copies (issue 24), 16 x 64 with 4 warps
# spilled 4-8 bytes in 16-bit dtypes (ptxas kept it at 96 registers) and was dropped. Every one may also run on the
# bounded persistent grid (issue 24), and so may the deeper pipelines of `DEEP_CONFIGS`, with which one program per
# SM keeps enough bytes in flight; one program per tile, they spilled (8 bytes, bf16, ptxas held 128 registers for
# two programs per SM), and 5 stages spilled 16 bytes either way.
BANK_CONFIGS = {2: (Config(16, 128, 4, 3), Config(32, 128, 8, 3)),
                4: (Config(16, 64, 8, 3),)}
DEEP_CONFIGS = {2: (Config(32, 128, 8, 4),), 4: (Config(16, 64, 8, 4),)}
SPLIT_CONFIGS = {2: tuple(Config(16, 128, 4, 3, split) for split in (2, 4, 8))
                 + tuple(Config(32, 128, 8, 3, split) for split in (4, 8)),  # split in 2, 32 x 128 spilled 24 bytes
                 4: tuple(Config(16, 64, 8, 3, split) for split in (2, 4, 8))}


HBM_FIRST = 0.05  # `bank_launch` trades up to 5 % of predicted time for fewer HBM bytes


class BankLaunch(NamedTuple):
    """How a bank launch runs: ``config``, and ``programs``, a persistent grid of at most that many programs
    (`bank_perf_model.bounded_programs`: the tiles in flight fit half of L2), or None: one program per tile."""

    config: Config
    programs: Optional[int] = None


def bank_shape(n_rows: int, d: int, layout: BankLayout, elem: int) -> Shape:
    """The model's view of a bank launch with every row on the widest steerer (configurations are chosen on the
    host, which does not know the counts): its stored W_in columns (what the kernel reads), the accumulator and
    coefficient widths padded as compiled."""
    return Shape(n_rows, d, elem, layout.W_IN_COLS, layout.NCP, has_pass1=True, has_mean=bool(layout.ANY_GATE))


@functools.lru_cache(maxsize=1024)
def _bank_launch(shape: Shape, card: Card, store_coef: bool, allow_split: bool) -> BankLaunch:
    group = 4 if shape.elem == 4 else 2
    fits = [c for c in BANK_CONFIGS[group] + DEEP_CONFIGS[group] if c.BLOCK_T <= max(16, shape.rows)]
    options = [BankLaunch(c) for c in fits if c in BANK_CONFIGS[group]]
    if not store_coef:  # `synthesize_bank` reads h once: nothing for a bounded grid or a split to keep in L2
        bounded = [BankLaunch(c, bounded_programs(c.BLOCK_T, shape.d, shape.elem, card)) for c in fits]
        options += [o for o in bounded if o.programs < -(-shape.rows // o.config.BLOCK_T)]  # else: no bound
        if allow_split:  # every slice at least one d block
            options += [BankLaunch(c) for c in SPLIT_CONFIGS[group]
                        if c.BLOCK_T <= max(16, shape.rows) and -(-shape.d // c.SPLIT) >= c.BLOCK_D]
    preds = {o: predict_bank([shape], o.config, card, store_coef=store_coef, programs=o.programs) for o in options}
    # Within `HBM_FIRST` of the fastest prediction, the fewest HBM bytes (in steps of 2 % of the ideal, so that a
    # few bytes of row counts decide nothing): bytes are counted, while the L2 and per-SM rates that decide most
    # close calls are assumptions (+-30-50 %, `perf_model.CARDS`).
    fastest = min(p.time_us for p in preds.values())
    near = [o for o in options if preds[o].time_us <= fastest * (1 + HBM_FIRST)]
    return min(near, key=lambda o: (round(preds[o].hbm_bytes / preds[o].ideal_bytes / 0.02), preds[o].time_us))


def bank_launch(n_rows: int, d: int, layout: BankLayout, elem: int, card: Card, store_coef: bool = False,
                interpreting: bool = INTERPRETING) -> BankLaunch:
    """The model's fastest (`bank_perf_model.predict_bank`) for the widest steerer of `BANK_CONFIGS` with one
    program per row tile, of those and `DEEP_CONFIGS` on the bounded persistent grid, and of `SPLIT_CONFIGS`
    (split-d, unless `heuristics.split_d_allowed` says no; token mode only)."""
    if interpreting:
        return BankLaunch(INTERPRETER_CONFIG)
    rows = 1 << max(0, (n_rows - 1).bit_length())
    return _bank_launch(bank_shape(rows, d, layout, elem), card, store_coef, split_d_allowed())


def launch_bank(h2d: torch.Tensor, out2d, packed: PackedBank, order: torch.Tensor, counts: torch.Tensor,
                coef_out: torch.Tensor | None = None, launch: BankLaunch | None = None,
                spin_limit: int = SPIN_LIMIT) -> None:
    """Run the bank kernel on contiguous ``(N, d)`` rows grouped by ``order``/``counts`` (`bank.plan_rows`);
    ``out2d`` may be ``h2d`` (in place). ``coef_out`` (fp32 ``(N, NC)``): store coefficients instead (synthesize).
    ``launch`` overrides the model's choice (tests). A split-d launch (``SPLIT > 1``) runs as
    `perf_model.split_plan` plans it on the stream's persistent counters (`split_state`); ``spin_limit``: polls
    before a wait gives up."""
    n_rows, d = h2d.shape
    if n_rows == 0:
        return
    layout = packed.layout
    store_coef = coef_out is not None
    card = card_for(h2d)
    config, programs = launch or bank_launch(n_rows, d, layout, h2d.element_size(), card, store_coef)
    tiles = triton.cdiv(n_rows, config.BLOCK_T) + layout.G  # an upper bound (see the kernel's docstring)
    grid = tiles if programs is None else min(tiles, programs)
    out = h2d if store_coef else out2d
    with device_guard(h2d):
        ws, flags, error = packed.scalars, packed.meta, packed.meta  # never read without SPLIT (same dtypes)
        lag = ring = 1
        if config.SPLIT > 1:
            if store_coef:
                raise ValueError("launch: synthesize_bank runs with one program per row tile (SPLIT = 1)")
            plan = split_plan(bank_shape(tiles * config.BLOCK_T, d, layout, h2d.element_size()), config, card)
            grid, lag, ring = plan.grid, plan.lag, plan.ring
            flags, error = launch_buffers(h2d.device, tiles)
            ws = torch.empty(plan.workspace, dtype=torch.float32, device=h2d.device)
        bank_kernel[(grid,)](h2d, out, order, counts, packed.meta, packed.scalars, packed.w_in, packed.w_out,
                             packed.mean, packed.consts, coef_out if store_coef else packed.scalars, ws, flags, error,
                             n_rows, d, layout.G, layout.NC, layout.W_IN_STRIDE, lag, ring, spin_limit,
                             **bank_constexprs(layout), NATIVE_DOT=native_dot(h2d.dtype),
                             IN_PLACE=out.data_ptr() == h2d.data_ptr(), STORE_COEF=store_coef,
                             PERSISTENT=programs is not None, **config_kwargs(config), **launch_options(h2d))


def bank_constexprs(layout: BankLayout) -> dict:
    """The layout's compile-time constants (the rest of `BankLayout` goes in as run-time arguments): a bank of
    S steerers compiles for the power of two above S + 2 groups, the widths padded."""
    return dict(GP=max(2, triton.next_power_of_2(layout.G)), NP=layout.NP, MP=layout.MP, NCP=layout.NCP,
                ANY_GATE=layout.ANY_GATE, ANY_ROUTER=layout.ANY_ROUTER, ANY_RES=layout.ANY_RES, MF=META_FIELDS)
