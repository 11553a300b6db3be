"""Token-mode kernel (and `synthesize`, its first half): every row gates and routes on itself, in one launch.

Two layouts of the work, chosen per shape by the bytes-and-occupancy model (`heuristics.steer_config`):

* ``SPLIT == 1``: one program per tile of BLOCK_T rows runs pass 1 and the epilogue
  (`coef_tile.tile_coefficients`), then pass 2 writes ``h + coef @ W_out``. Both passes are software-pipelined
  (``tl.range(..., num_stages)``); pass 1 loads h ``evict_last`` and pass 2 ``evict_first``, so the second read
  comes from L2 when the tiles in flight fit there.
* ``SPLIT > 1`` (split-d): each row tile's d is cut into SPLIT slices, one program per slice, so a tile's
  in-flight bytes are spread over SPLIT SMs and the tile can be tall (few W_in re-reads) while the bytes between
  a row's two reads stay L2-sized. Program ``v`` (taken from a ticket counter in arrival order, so that it only
  ever waits on programs that are already running) computes pass 1 of slice ``v % SPLIT`` of tile
  ``v // SPLIT`` and stores the fp32 partial sums; the last slice to arrive (an atomic counter) adds the SPLIT
  partials in slice order (deterministic), runs the epilogue and publishes the tile's coefficients. The same
  program then runs pass 2 of its slice for tile ``v // SPLIT - LAG``, whose coefficients were published by
  programs that started earlier; LAG tiles of distance let that wait be rare. The grid is persistent (at most the
  programs that fit at once), each program taking tickets until the work (``(n_tiles + LAG) * SPLIT`` items) is
  done. With one row tile this is the decode path: W_in is read by SPLIT SMs, not one. Tiles taller than
  `EPILOGUE_ROWS` (128 rows: W_in and W_out re-read half as often) are summed and finished in chunks of that
  many rows (`sum_partials`). Under the Triton interpreter programs run one by one, so no wait ever spins there.

In place, rows whose gate is off are not written, and a tile (slice) with no edit skips pass 2. An optional
per-row ``keep`` mask marks rows to leave exactly as they are. ``coef_out``: store the coefficients instead of
pass 2 (`synthesize`). Readable equivalent: `reference.steer`, `reference.synthesize`.
"""
import torch
import triton
import triton.language as tl

from .coef_tile import centred_projections, coefficients_from_projections, tile_coefficients
from .norm_tile import add_and_normalise, edited_rstd, w_out_columns
from .kernel_common import (DTYPE_NAMES, INTERPRETING, Layout, card_for, config_kwargs, device_guard, native_dot,
                            shape_of)
from .norm import NormOperands
from .pdl import launch_options, wait_for_previous_kernel
from .heuristics import steer_config
from . import perf_model
from .perf_model import split_plan
from .split_state import SPIN_LIMIT, launch_buffers
from .w_out_dot import coef_times_w_out


EPILOGUE_ROWS = tl.constexpr(perf_model.EPILOGUE_ROWS)  # tiles up to this tall are finished at once


@triton.jit
def add_coef_times_w_out(x_ptr, out_ptr, rows, write, edit, d, d_start, d_stop, coef, w_out_ptr, NC,
                         NCP: tl.constexpr, NATIVE_DOT: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_STAGES: tl.constexpr):
    """Pass 2 over ``[d_start, d_stop)``: for the rows in ``write``, ``out = x + coef @ W_out`` where ``edit``,
    else ``x``; W_out's first ``NC`` rows are read (a constant here, a steerer's run-time width in the bank
    kernel). Pipelined; h is read ``evict_first`` (its last use)."""
    coef_rows = tl.arange(0, NCP)
    row_base = rows.to(tl.int64) * d
    for d0 in tl.range(d_start, d_stop, BLOCK_D, num_stages=NUM_STAGES):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d_stop
        mask = write[:, None] & d_mask[None, :]
        x = tl.load(x_ptr + row_base[:, None] + offs_d[None, :], mask=mask, other=0.0,
                    eviction_policy="evict_first")
        w = tl.load(w_out_ptr + coef_rows[:, None] * d + offs_d[None, :],
                    mask=(coef_rows < NC)[:, None] & d_mask[None, :], other=0.0)
        delta = coef_times_w_out(coef, w, NATIVE_DOT)
        out = tl.where(edit[:, None], (x.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), x)
        tl.store(out_ptr + row_base[:, None] + offs_d[None, :], out, mask=mask)


@triton.jit
def write_tile(h_ptr, out_ptr, rows, row_mask, edit, g, d, d_start, d_stop, coef, w_out_ptr,
               HAS_GATE: tl.constexpr, HAS_KEEP: tl.constexpr, IN_PLACE: tl.constexpr, NC: tl.constexpr,
               NCP: tl.constexpr, NATIVE_DOT: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Pass 2: rows whose gate is off come back as they are (bit for bit); in place only edited rows are stored,
    and a tile with no edit stores nothing."""
    if HAS_GATE:
        edit = g != 0.0  # g is 0 where `edit` (keep) already said no
    if IN_PLACE:
        if HAS_GATE or HAS_KEEP:
            if tl.max(edit.to(tl.int32), axis=0) > 0:
                add_coef_times_w_out(h_ptr, out_ptr, rows, edit, edit, d, d_start, d_stop, coef, w_out_ptr, NC,
                                     NCP, NATIVE_DOT, BLOCK_D, NUM_STAGES)
        else:
            add_coef_times_w_out(h_ptr, out_ptr, rows, edit, edit, d, d_start, d_stop, coef, w_out_ptr, NC, NCP,
                                 NATIVE_DOT, BLOCK_D, NUM_STAGES)
    else:
        add_coef_times_w_out(h_ptr, out_ptr, rows, row_mask, edit, d, d_start, d_stop, coef, w_out_ptr, NC, NCP,
                             NATIVE_DOT, BLOCK_D, NUM_STAGES)


@triton.jit
def wait_until_set(flag_ptr, error_ptr, spin_limit):
    """Spin until ``*flag_ptr != 0`` (acquire): only ever called on flags that earlier-started programs set. Bounded
    (issue 24): after ``spin_limit`` polls it gives up and sets ``*error_ptr`` (`split_state`), and once that word
    is set a wait that is not satisfied at once gives up at once, so a launch with a broken wait ends quickly (with
    wrong outputs) instead of hanging the GPU."""
    flag = tl.atomic_add(flag_ptr, 0, sem="acquire")
    if flag == 0:
        limit = tl.where(tl.atomic_add(error_ptr, 0, sem="relaxed") == 0, spin_limit, 0)
        spins = 0
        while (flag == 0) & (spins < limit):
            flag = tl.atomic_add(flag_ptr, 0, sem="acquire")
            spins += 1
        if flag == 0:
            tl.atomic_xchg(error_ptr, 1, sem="relaxed")


@triton.jit
def count_out_and_reset(flags_ptr, n_tiles):
    """A split-d program leaving the launch. Every program has taken its last ticket before it counts itself out, so
    the last one out may put the counters (``[exits | ticket | arrived x n_tiles | ready x n_tiles]``) back to zero
    for the next launch (no memset per call)."""
    if tl.atomic_add(flags_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        used = 2 + 2 * n_tiles
        for start in range(0, used, 1024):
            offs = start + tl.arange(0, 1024)
            tl.store(flags_ptr + offs, tl.zeros((1024,), tl.int32), mask=offs < used)


@triton.jit
def sum_partials(part_ptr, part_size, lanes, edit, row_mask, W_IN_STRIDE: tl.constexpr, NP: tl.constexpr,
                 NC: tl.constexpr, NCP: tl.constexpr, OUT_COL: tl.constexpr, SPLIT: tl.constexpr,
                 HAS_GATE: tl.constexpr, NORM: tl.constexpr):
    """Split-d: the rows ``lanes`` of a tile's SPLIT partial sums (`steer_kernel`'s workspace, NP + 2 + NORM words a
    row), added in slice order whichever slice finishes (deterministic): ``(xc @ W_in, ||xc||^2 plain and scaled,
    ||h||^2, W_out xc)`` over all of d; the last two with NORM only (W_out xc as narrow loads: no gather from the
    wide accumulator), else zeros."""
    PART_W: tl.constexpr = NP + 2 + NORM
    cols = tl.arange(0, NP)
    coef_cols = tl.arange(0, NCP)
    live = edit[:, None] & (cols < W_IN_STRIDE)[None, :]
    acc = tl.zeros((lanes.shape[0], NP), tl.float32)
    sq = tl.zeros((lanes.shape[0],), tl.float32)
    sq_big = tl.zeros((lanes.shape[0],), tl.float32)
    sq_h = tl.zeros((lanes.shape[0],), tl.float32)
    w_out_xc = tl.zeros((lanes.shape[0], NCP), tl.float32)
    for j in range(SPLIT):
        row_ptr = part_ptr + j * part_size + lanes * PART_W
        acc += tl.load(row_ptr[:, None] + cols[None, :], mask=live, other=0.0, cache_modifier=".cg")
        if HAS_GATE:
            sq += tl.load(row_ptr + NP, mask=edit, other=0.0, cache_modifier=".cg")
            sq_big += tl.load(row_ptr + NP + 1, mask=edit, other=0.0, cache_modifier=".cg")
        if NORM:
            sq_h += tl.load(row_ptr + NP + 2, mask=row_mask, other=0.0, cache_modifier=".cg")
            w_out_xc += tl.load(row_ptr[:, None] + OUT_COL + coef_cols[None, :],
                                mask=edit[:, None] & (coef_cols < NC)[None, :], other=0.0, cache_modifier=".cg")
    return acc, sq, sq_big, sq_h, w_out_xc


# The JIT makes an int argument equal to 1 a constexpr. ``ring`` is 1 whenever a launch has one row tile (decode,
# synthesize) and ``ring.to(...)`` below needs a tensor; ``n_rows`` and ``lag`` of 1 at decode changed the code
# enough to spill (tests/test_kernel_compile.py compiles what the JIT really gets). None of the three is worth a
# specialised copy.
@triton.jit(do_not_specialize=["n_rows", "lag", "ring", "spin_limit"])
def steer_kernel(h_ptr, out_ptr, w_in_ptr, w_out_ptr, mean_ptr, consts_ptr, keep_ptr, coef_out_ptr, ws_ptr,
                 flags_ptr, error_ptr, n_rows, d, tau, eps, scale, lag, ring, spin_limit,
                 R: tl.constexpr, K: tl.constexpr, M: tl.constexpr, KR: tl.constexpr,
                 HAS_GATE: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_ROUTER: tl.constexpr, HAS_RES: tl.constexpr,
                 RELU: tl.constexpr, ROUTER_COL: tl.constexpr, RES_COL: tl.constexpr, W_IN_STRIDE: tl.constexpr,
                 RB_OFF: tl.constexpr, B1_OFF: tl.constexpr, W2_OFF: tl.constexpr, B2_OFF: tl.constexpr,
                 NP: tl.constexpr, MP: tl.constexpr, NC: tl.constexpr, NCP: tl.constexpr, NATIVE_DOT: tl.constexpr,
                 IN_PLACE: tl.constexpr, HAS_KEEP: tl.constexpr, STORE_COEF: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr, SPLIT: tl.constexpr,
                 y_ptr=None, norm_weight_ptr=None, norm_consts_ptr=None, norm_eps=0.0, NORM: tl.constexpr = False,
                 OUT_COL: tl.constexpr = 0, UNIT_OFFSET: tl.constexpr = False, WEIGHT_IN_FP32: tl.constexpr = False,
                 PDL: tl.constexpr = False):
    # NORM (issue 14): also write y = RMSNorm(out) for every row (`norm_tile`); W_in's columns from OUT_COL hold
    # W_out^T. Without NORM the code is exactly the plain kernel's. PDL: before the first ticket and every load.
    wait_for_previous_kernel(PDL)
    coef_cols = tl.arange(0, NCP)
    if SPLIT == 1:
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_mask = rows < n_rows
        edit = row_mask
        if HAS_KEEP:
            edit = edit & (tl.load(keep_ptr + rows, mask=row_mask, other=0) != 0)
        if NORM:  # every row is read (its norm is needed), only rows in `edit` are steered
            acc, sq, sq_big, sq_h = centred_projections(h_ptr, rows, row_mask, d, w_in_ptr, mean_ptr, 0, d,
                                                          HAS_GATE, HAS_MEAN, W_IN_STRIDE, NP, NATIVE_DOT, BLOCK_T,
                                                          BLOCK_D, NUM_STAGES, NORM)
            coef, g = coefficients_from_projections(acc, sq, sq_big, edit, consts_ptr, tau, eps, scale, R, K, M, KR,
                                                    HAS_GATE, HAS_ROUTER, HAS_RES, RELU, ROUTER_COL, RES_COL,
                                                    RB_OFF, B1_OFF, W2_OFF, B2_OFF, NP, MP, NCP, BLOCK_T)
            rstd = edited_rstd(w_out_columns(acc, OUT_COL, NP, NCP, BLOCK_T), sq_h, coef, norm_consts_ptr, d,
                               norm_eps, NC, NCP)
            edit = g != 0.0
            add_and_normalise(h_ptr, out_ptr, y_ptr, norm_weight_ptr, rows, row_mask, edit,
                              edit if IN_PLACE else row_mask, d, 0, d, coef, rstd, w_out_ptr, NC, NCP, NATIVE_DOT,
                              UNIT_OFFSET, WEIGHT_IN_FP32, BLOCK_D, NUM_STAGES)
        else:
            coef, g = tile_coefficients(h_ptr, rows, edit, d, w_in_ptr, mean_ptr, consts_ptr, tau, eps, scale,
                                        R, K, M, KR, HAS_GATE, HAS_MEAN, HAS_ROUTER, HAS_RES, RELU, ROUTER_COL,
                                        RES_COL, W_IN_STRIDE, RB_OFF, B1_OFF, W2_OFF, B2_OFF, NP, MP, NCP, NATIVE_DOT,
                                        BLOCK_T, BLOCK_D, NUM_STAGES)
            if STORE_COEF:
                tl.store(coef_out_ptr + rows.to(tl.int64)[:, None] * NC + coef_cols[None, :], coef,
                         mask=row_mask[:, None] & (coef_cols < NC)[None, :])
            else:
                write_tile(h_ptr, out_ptr, rows, row_mask, edit, g, d, 0, d, coef, w_out_ptr, HAS_GATE, HAS_KEEP,
                           IN_PLACE, NC, NCP, NATIVE_DOT, BLOCK_D, NUM_STAGES)
    else:
        # flags (int32, zero at entry and put back to zero by the last program out, `split_state`):
        # [exits | ticket | arrived[n_tiles] | ready[n_tiles]]; ws (fp32): the partials' ring of `ring`
        # slots, each SPLIT x BLOCK_T x PART_W (projections, then ||xc||^2 plain and scaled (`add_squares`),
        # with NORM then ||h||^2), then the
        # coefficients and gates (with NORM then 1/rms) of every row tile, n_tiles x BLOCK_T x COEF_W
        # (`perf_model.split_plan` sizes it).
        PART_W: tl.constexpr = NP + 2 + NORM
        COEF_W: tl.constexpr = NCP + 1 + NORM
        EPI_T: tl.constexpr = BLOCK_T if BLOCK_T < EPILOGUE_ROWS else EPILOGUE_ROWS
        n_tiles = tl.cdiv(n_rows, BLOCK_T)
        ticket_ptr = flags_ptr + 1
        arrived_ptr = flags_ptr + 2
        ready_ptr = flags_ptr + 2 + n_tiles
        part_size = BLOCK_T * PART_W
        coef_ws_ptr = ws_ptr + ring.to(tl.int64) * SPLIT * part_size
        # A persistent loop over work items in ticket order: item v is pass 1 of slice v % SPLIT of tile
        # v // SPLIT, then pass 2 of that slice for tile v // SPLIT - lag. An item only ever waits on items with
        # lower tickets, taken by programs that are running or done, so the waits always end.
        n_items = (n_tiles + lag) * SPLIT
        v = tl.atomic_add(ticket_ptr, 1)
        while v < n_items:
            tile = v // SPLIT
            s = v % SPLIT
            slice_d = tl.cdiv(tl.cdiv(d, SPLIT), BLOCK_D) * BLOCK_D
            d_start = s * slice_d
            d_stop = tl.minimum(d, d_start + slice_d)
            lanes = tl.arange(0, BLOCK_T)
            cols = tl.arange(0, NP)
            if tile < n_tiles:  # pass 1 of this slice; the last slice to arrive finishes the tile
                rows = tile * BLOCK_T + lanes
                row_mask = rows < n_rows
                edit = row_mask
                if HAS_KEEP:
                    edit = edit & (tl.load(keep_ptr + rows, mask=row_mask, other=0) != 0)
                slot = tile % ring
                if tile >= ring:  # the slot's previous tile must have summed its partials
                    wait_until_set(ready_ptr + tile - ring, error_ptr, spin_limit)
                acc, sq, sq_big, sq_h = centred_projections(h_ptr, rows, row_mask if NORM else edit, d, w_in_ptr,
                                                              mean_ptr, d_start, d_stop, HAS_GATE, HAS_MEAN,
                                                              W_IN_STRIDE, NP, NATIVE_DOT, BLOCK_T, BLOCK_D,
                                                              NUM_STAGES, NORM)
                part_ptr = ws_ptr + (slot * SPLIT).to(tl.int64) * part_size
                part_cols = part_ptr + s * part_size + lanes[:, None] * PART_W + cols[None, :]
                if BLOCK_T > EPILOGUE_ROWS:  # a (BLOCK_T, NP) mask spilled: rows the sums skip are stored, not read
                    tl.store(part_cols, acc, mask=(cols < W_IN_STRIDE)[None, :])
                else:
                    tl.store(part_cols, acc, mask=edit[:, None] & (cols < W_IN_STRIDE)[None, :])
                tl.store(part_ptr + s * part_size + lanes * PART_W + NP, sq, mask=edit)
                tl.store(part_ptr + s * part_size + lanes * PART_W + NP + 1, sq_big, mask=edit)
                if NORM:
                    tl.store(part_ptr + s * part_size + lanes * PART_W + NP + 2, sq_h, mask=row_mask)
                tl.debug_barrier()  # every thread's partials are stored before the release below
                if tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel") == SPLIT - 1:
                    # Tiles taller than EPILOGUE_ROWS are summed and finished EPILOGUE_ROWS rows at a time: a whole
                    # 128-row tile spilled (ptxas, sm_90a).
                    for chunk in tl.static_range(BLOCK_T // EPI_T):
                        if BLOCK_T > EPILOGUE_ROWS:
                            sub = chunk * EPI_T + tl.arange(0, EPI_T)
                            sub_rows = tile * BLOCK_T + sub
                            sub_mask = sub_rows < n_rows
                            sub_edit = sub_mask
                            if HAS_KEEP:
                                sub_edit = sub_edit & (tl.load(keep_ptr + sub_rows, mask=sub_mask, other=0) != 0)
                        else:
                            sub, sub_rows, sub_mask, sub_edit = lanes, rows, row_mask, edit
                        proj, energy, energy_big, norm_sq, w_out_xc = sum_partials(part_ptr, part_size, sub, sub_edit,
                                                                                sub_mask, W_IN_STRIDE, NP, NC, NCP,
                                                                                OUT_COL, SPLIT, HAS_GATE, NORM)
                        coef, g = coefficients_from_projections(proj, energy, energy_big, sub_edit, consts_ptr, tau,
                                                                eps, scale, R, K, M, KR, HAS_GATE, HAS_ROUTER, HAS_RES,
                                                                RELU, ROUTER_COL, RES_COL, RB_OFF, B1_OFF, W2_OFF,
                                                                B2_OFF, NP, MP, NCP, EPI_T)
                        if STORE_COEF:
                            tl.store(coef_out_ptr + sub_rows.to(tl.int64)[:, None] * NC + coef_cols[None, :], coef,
                                     mask=sub_mask[:, None] & (coef_cols < NC)[None, :])
                        else:
                            tile_ptr = coef_ws_ptr + tile.to(tl.int64) * BLOCK_T * COEF_W
                            tl.store(tile_ptr + sub[:, None] * COEF_W + coef_cols[None, :], coef)
                            tl.store(tile_ptr + sub * COEF_W + NCP, g)
                            if NORM:
                                rstd = edited_rstd(w_out_xc, norm_sq, coef, norm_consts_ptr, d, norm_eps, NC, NCP)
                                tl.store(tile_ptr + sub * COEF_W + NCP + 1, rstd)
                    tl.debug_barrier()
                    tl.atomic_xchg(ready_ptr + tile, 1, sem="release")
            if not STORE_COEF:
                done = tile - lag  # pass 2 of this slice for a tile whose coefficients started earlier
                if (done >= 0) & (done < n_tiles):
                    wait_until_set(ready_ptr + done, error_ptr, spin_limit)
                    rows = done * BLOCK_T + lanes
                    row_mask = rows < n_rows
                    tile_ptr = coef_ws_ptr + done.to(tl.int64) * BLOCK_T * COEF_W
                    coef = tl.load(tile_ptr + lanes[:, None] * COEF_W + coef_cols[None, :], cache_modifier=".cg")
                    g = tl.load(tile_ptr + lanes * COEF_W + NCP, cache_modifier=".cg")
                    edit = g != 0.0  # g is 0 where keep said no, the gate is off, or past the last row
                    if NORM:
                        rstd = tl.load(tile_ptr + lanes * COEF_W + NCP + 1, cache_modifier=".cg")
                        add_and_normalise(h_ptr, out_ptr, y_ptr, norm_weight_ptr, rows, row_mask, edit,
                                          edit if IN_PLACE else row_mask, d, d_start, d_stop, coef, rstd, w_out_ptr,
                                          NC, NCP, NATIVE_DOT, UNIT_OFFSET, WEIGHT_IN_FP32, BLOCK_D, NUM_STAGES)
                    else:
                        write_tile(h_ptr, out_ptr, rows, row_mask, edit, g, d, d_start, d_stop, coef, w_out_ptr,
                                   HAS_GATE, HAS_KEEP, IN_PLACE, NC, NCP, NATIVE_DOT, BLOCK_D, NUM_STAGES)
            v = tl.atomic_add(ticket_ptr, 1)
        count_out_and_reset(flags_ptr, n_tiles)


def launch_steer(h2d: torch.Tensor, out2d, w_in: torch.Tensor, w_out: torch.Tensor, mean: torch.Tensor,
                 consts: torch.Tensor, layout: Layout, tau: float, eps: float, scale: float,
                 keep: torch.Tensor | None = None, config=None, coef_out: torch.Tensor | None = None,
                 lag: int | None = None, norm: NormOperands | None = None, spin_limit: int = SPIN_LIMIT) -> None:
    """Run the kernel on contiguous ``(N, d)`` rows; ``out2d`` may be ``h2d`` itself (in place). ``keep``: optional
    contiguous ``(N,)`` bool, False for rows to leave unchanged. ``coef_out`` (fp32 ``(N, K+k)``): store the
    coefficients instead of writing rows (`synthesize`; ``out2d`` is then ignored). ``norm``: also write the
    edited rows' RMSNorm into ``norm.y`` (every row, steered or not); ``w_in`` and ``layout`` are then the fused
    pack's (`norm.NormPack`). ``config``/``lag`` override the model's choice (tests). A split-d launch runs as
    `perf_model.split_plan` says, the plan the model predicts with, on the stream's persistent counters
    (`split_state`); ``spin_limit``: polls before a wait gives up (tests make it small)."""
    n_rows, d = h2d.shape
    if n_rows == 0:
        return
    store_coef = coef_out is not None
    card = card_for(h2d)
    shape = shape_of(n_rows, d, layout, h2d.element_size(), DTYPE_NAMES[h2d.dtype])
    norm_kw = {}
    if norm is not None:
        shape = shape.with_norm(norm.y.element_size(), norm.weight.element_size())
        norm_kw = dict(y_ptr=norm.y, norm_weight_ptr=norm.weight, norm_consts_ptr=norm.consts, norm_eps=norm.eps,
                       NORM=True, OUT_COL=norm.out_col, UNIT_OFFSET=norm.unit_offset,
                       WEIGHT_IN_FP32=norm.weight_in_fp32)
    config = config or steer_config(shape, card, INTERPRETING, store_coef)
    with device_guard(h2d):
        if config.SPLIT == 1:
            grid, lag, ring = triton.cdiv(n_rows, config.BLOCK_T), 0, 1
            ws = flags = error = consts  # never read
        else:
            plan = split_plan(shape, config, card, store_coef, lag)
            grid, lag, ring = plan.grid, plan.lag, plan.ring
            flags, error = launch_buffers(h2d.device, plan.n_tiles)
            ws = torch.empty(plan.workspace, dtype=torch.float32, device=h2d.device)
        keep_ptr = consts if keep is None else keep.view(torch.uint8)  # never read without HAS_KEEP
        out_ptr = h2d if store_coef else out2d
        steer_kernel[(grid,)](h2d, out_ptr, w_in, w_out, mean, consts, keep_ptr,
                              coef_out if store_coef else consts, ws, flags, error, n_rows, d, tau, eps, scale, lag,
                              ring, spin_limit,
                              **layout.constexprs(), NATIVE_DOT=native_dot(h2d.dtype),
                              IN_PLACE=out_ptr.data_ptr() == h2d.data_ptr() and not store_coef,
                              HAS_KEEP=keep is not None, STORE_COEF=store_coef, **config_kwargs(config), **norm_kw,
                              **launch_options(h2d))
