"""The fused RMSNorm's device functions in token mode (`steer_kernel` with ``NORM``): the epilogue's ``1 / rms`` of
the edited row, from pass 1's sums alone, and pass 2 writing the edited row and its normalised form together.

Pass 1 accumulated ``W_out xc`` in the same dot as the other projections (``W_out^T`` packed into W_in at column
``OUT_COL``, `norm.NormPack`) and the uncentred ``||h||^2``. With ``delta = coef @ W_out``,

    ||h + delta||^2 = ||h||^2 + 2 coef . (W_out xc + W_out mu) + coef^T G coef,     G = W_out W_out^T,

so the row's scale is known before pass 2 writes anything, and pass 2 reads h once more (from L2, as the plain
steering kernel does) instead of a third pass over the edited rows. Readable equivalent: `reference.rms_norm` of
`reference.steer`.
"""
import triton
import triton.language as tl

from .w_out_dot import coef_times_w_out


@triton.jit
def w_out_columns(acc, OUT_COL: tl.constexpr, NP: tl.constexpr, NCP: tl.constexpr, BLOCK_T: tl.constexpr):
    """The accumulator's ``W_out xc`` columns ``[OUT_COL, OUT_COL + NCP)`` as ``(BLOCK_T, NCP)`` (one program per
    row tile; the split-d layout reads them from its partial sums instead)."""
    pick = tl.minimum(OUT_COL + tl.arange(0, NCP), NP - 1)
    return tl.gather(acc, tl.broadcast_to(pick[None, :], (BLOCK_T, NCP)), axis=1)


@triton.jit
def edited_rstd(w_out_xc, sq_h, coef, norm_consts_ptr, d, norm_eps, NC: tl.constexpr, NCP: tl.constexpr):
    """``1 / sqrt(mean((h + coef @ W_out)^2) + eps)`` per row, fp32 ``(BLOCK_T,)``, from pass 1's sums alone:
    ``w_out_xc`` ``(BLOCK_T, NCP)``, ``||h||^2`` and ``norm_consts = [W_out mu (NCP) | G (NCP x NCP)]``, zero past
    NC (`norm.NormPack`)."""
    coef_cols = tl.arange(0, NCP)
    live = coef_cols < NC
    w_out_h = tl.where(live[None, :], w_out_xc, 0.0) + tl.load(norm_consts_ptr + coef_cols)[None, :]
    gram = tl.load(norm_consts_ptr + NCP + coef_cols[:, None] * NCP + coef_cols[None, :])
    coef_gram = tl.dot(coef, gram, input_precision="ieee")
    sq = sq_h + tl.sum(coef * (2.0 * w_out_h + coef_gram), axis=1)
    return tl.rsqrt(tl.maximum(sq, 0.0) / d + norm_eps)


@triton.jit
def norm_scale(weight_ptr, offs_d, d_mask, UNIT_OFFSET: tl.constexpr, WEIGHT_IN_FP32: tl.constexpr):
    """The norm's multiplier for columns ``offs_d`` in fp32, read from the module's weight itself: ``w``, or
    ``1 + w`` (Gemma), which Llama-style rounding (not ``WEIGHT_IN_FP32``) forms in the weight's dtype, as
    `reference.rms_norm` does."""
    w = tl.load(weight_ptr + offs_d, mask=d_mask, other=0.0)
    scale = w.to(tl.float32)
    if UNIT_OFFSET:
        scale = scale + 1.0
        if not WEIGHT_IN_FP32:
            scale = scale.to(w.dtype).to(tl.float32)
    return scale


@triton.jit
def add_and_normalise(x_ptr, out_ptr, y_ptr, weight_ptr, rows, row_mask, edit, write, d, d_start, d_stop, coef,
                      rstd, w_out_ptr, NC: tl.constexpr, NCP: tl.constexpr, NATIVE_DOT: tl.constexpr,
                      UNIT_OFFSET: tl.constexpr, WEIGHT_IN_FP32: tl.constexpr, BLOCK_D: tl.constexpr,
                      NUM_STAGES: tl.constexpr):
    """Pass 2 over ``[d_start, d_stop)``: ``h' = h + coef @ W_out`` where ``edit`` (stored where ``write``) and
    ``y = norm(h')`` for every row in ``row_mask``, from h' as stored (rounded to h's dtype), as the model's own
    norm would see it (`norm_scale`). Pipelined; h read ``evict_first`` (its last use)."""
    coef_rows = tl.arange(0, NCP)
    row_base = rows.to(tl.int64) * d
    for d0 in tl.range(d_start, d_stop, BLOCK_D, num_stages=NUM_STAGES):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d_stop
        x = tl.load(x_ptr + row_base[:, None] + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0, eviction_policy="evict_first")
        w = tl.load(w_out_ptr + coef_rows[:, None] * d + offs_d[None, :],
                    mask=(coef_rows < NC)[:, None] & d_mask[None, :], other=0.0)
        scale = norm_scale(weight_ptr, offs_d, d_mask, UNIT_OFFSET, WEIGHT_IN_FP32)
        delta = coef_times_w_out(coef, w, NATIVE_DOT)
        steered = tl.where(edit[:, None], (x.to(tl.float32) + delta).to(x.dtype), x)
        normed = steered.to(tl.float32) * rstd[:, None]
        if not WEIGHT_IN_FP32:  # Llama: round the normalised row to h's dtype, then scale
            normed = normed.to(x.dtype).to(tl.float32)
        # the store addresses are formed here, not shared with the load: a pipelined loop would carry them
        tl.store(out_ptr + row_base[:, None] + offs_d[None, :], steered, mask=write[:, None] & d_mask[None, :])
        tl.store(y_ptr + row_base[:, None] + offs_d[None, :], (normed * scale[None, :]).to(y_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & d_mask[None, :])
