"""Query mode fused with the next RMSNorm: ``h' = h + delta[seq(row)]`` (the per-sequence edit cached at prefill,
`ops.coef_delta`) written back, and ``y = RMSNorm(h')`` written for every row, in one launch that reads h once.

This is the decode step of a steered layer when the next layer's input norm is fused (`finesteer.patching`): the
separate edit and the norm's own pass become one kernel. The row's sum of squares is taken from h' as stored
(rounded to h's dtype), as the model's own norm would take it. A program owns whole rows (`perf_model.row_blocks`):
up to `ONE_PASS_MAX_D` columns the row stays in registers between its sum of squares and the writes (one read of
h); wider rows are read twice (both loops pipelined, cp.async), the second time from L2. Rows map to sequences as in `delta_kernel` (``row_to_seq``,
-1: no edit, but still normalised; or ``row // rows_per_seq``). Readable equivalent: `reference.apply_delta_rmsnorm`.
"""
import torch
import triton
import triton.language as tl

from .delta_kernel import row_sequences
from .kernel_common import INTERPRETING, device_guard
from .norm_tile import norm_scale
from .pdl import launch_options, wait_for_previous_kernel
from .perf_model import ONE_PASS_MAX_D, WIDE_BLOCK_D, row_blocks


@triton.jit
def _edited(h_ptr, delta_ptr, offs, delta_offs, mask, active, in_range, EVICT: tl.constexpr):
    """``(x, h')`` for one tile: ``h' = x + delta`` (fp32, rounded to x's dtype) on active rows, NaN for a
    sequence index past the end of delta, ``x`` elsewhere."""
    x = tl.load(h_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT)
    delta = tl.load(delta_ptr + delta_offs, mask=in_range[:, None] & mask, other=0.0).to(tl.float32)
    delta = tl.where((active & ~in_range)[:, None], float("nan"), delta)
    return tl.where(active[:, None], (x.to(tl.float32) + delta).to(x.dtype), x)


@triton.jit
def _store_both(out_ptr, y_ptr, weight_ptr, steered, rstd, offs, offs_d, mask, write, d_mask,
                UNIT_OFFSET: tl.constexpr, WEIGHT_IN_FP32: tl.constexpr):
    """Store a tile of the edited rows (where ``write``) and of their norm (every row in ``mask``)."""
    tl.store(out_ptr + offs, steered, mask=write[:, None] & d_mask[None, :])
    normed = steered.to(tl.float32) * rstd[:, None]
    if not WEIGHT_IN_FP32:  # Llama: round the normalised row to h's dtype, then scale
        normed = normed.to(steered.dtype).to(tl.float32)
    scale = norm_scale(weight_ptr, offs_d, d_mask, UNIT_OFFSET, WEIGHT_IN_FP32)
    tl.store(y_ptr + offs, (normed * scale[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "n_seq", "rows_per_seq"])  # a decode step's 1s spilled the wide-row loop
def apply_delta_norm_kernel(h_ptr, out_ptr, y_ptr, delta_ptr, seq_ptr, weight_ptr, n_rows, n_seq, d, rows_per_seq,
                            norm_eps, HAS_MAP: tl.constexpr, IN_PLACE: tl.constexpr, UNIT_OFFSET: tl.constexpr,
                            WEIGHT_IN_FP32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                            ONE_PASS: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_previous_kernel(PDL)
    rows, row_mask, seq, active, in_range = row_sequences(seq_ptr, n_rows, n_seq, rows_per_seq, HAS_MAP, BLOCK_T)
    write = active if IN_PLACE else row_mask  # in place, rows without an edit are not stored
    row_base = rows.to(tl.int64) * d
    seq_base = seq.to(tl.int64) * d
    if ONE_PASS:  # the row in registers between its sum of squares and the stores
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < d
        offs = row_base[:, None] + offs_d[None, :]
        mask = row_mask[:, None] & d_mask[None, :]
        steered = _edited(h_ptr, delta_ptr, offs, seq_base[:, None] + offs_d[None, :], mask, active, in_range,
                          "evict_first")
        s32 = steered.to(tl.float32)
        _store_both(out_ptr, y_ptr, weight_ptr, steered, tl.rsqrt(tl.sum(s32 * s32, axis=1) / d + norm_eps), offs,
                    offs_d, mask, write, d_mask, UNIT_OFFSET, WEIGHT_IN_FP32)
    else:  # wide rows: the sum of squares, then the edit and the norm again from L2
        sq = tl.zeros((BLOCK_T,), tl.float32)
        for d0 in tl.range(0, d, BLOCK_D, num_stages=3):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (offs_d < d)[None, :]
            s32 = _edited(h_ptr, delta_ptr, row_base[:, None] + offs_d[None, :], seq_base[:, None] + offs_d[None, :],
                          mask, active, in_range, "evict_last").to(tl.float32)
            sq += tl.sum(s32 * s32, axis=1)
        rstd = tl.rsqrt(sq / d + norm_eps)
        for d0 in tl.range(0, d, BLOCK_D, num_stages=3):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < d
            offs = row_base[:, None] + offs_d[None, :]
            mask = row_mask[:, None] & d_mask[None, :]
            steered = _edited(h_ptr, delta_ptr, offs, seq_base[:, None] + offs_d[None, :], mask, active, in_range,
                              "evict_first")
            _store_both(out_ptr, y_ptr, weight_ptr, steered, rstd, offs, offs_d, mask, write, d_mask, UNIT_OFFSET,
                        WEIGHT_IN_FP32)


def launch_apply_delta_norm(h: torch.Tensor, out: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, row_to_seq,
                            rows_per_seq: int, weight: torch.Tensor, eps: float, unit_offset: bool,
                            weight_in_fp32: bool, one_pass_max_d: int = ONE_PASS_MAX_D) -> None:
    """Contiguous ``h``/``out``/``y`` (``(..., d)``; ``out`` may be ``h`` itself), contiguous fp32 ``delta``
    ``(B, d)``, ``row_to_seq`` None or contiguous int64 ``(N,)``, the norm's contiguous ``weight`` ``(d,)``.
    ``one_pass_max_d``: tests lower it to reach the two-pass layout at small d."""
    d = h.shape[-1]
    n_rows = h.numel() // d if d else 0
    if n_rows == 0:
        return
    block_t, block_d, one_pass, warps = row_blocks(d)
    if d > one_pass_max_d:  # tests: the wide-row layout at a small d
        block_t, block_d, one_pass = 1, min(block_d, WIDE_BLOCK_D), False
    launch = {} if INTERPRETING else dict(num_warps=warps)
    with device_guard(h):
        apply_delta_norm_kernel[(triton.cdiv(n_rows, block_t),)](
            h, out, y, delta, delta if row_to_seq is None else row_to_seq, weight, n_rows, delta.shape[0], d,
            max(rows_per_seq, 1), eps, HAS_MAP=row_to_seq is not None, IN_PLACE=out.data_ptr() == h.data_ptr(),
            UNIT_OFFSET=unit_offset, WEIGHT_IN_FP32=weight_in_fp32, BLOCK_T=block_t, BLOCK_D=block_d,
            ONE_PASS=one_pass, **launch, **launch_options(h))
