"""Pass 2's product ``coef @ W_out`` for one d-tile, shared by the token-mode and the apply kernels."""
import triton
import triton.language as tl


@triton.jit
def coef_times_w_out(coef, w, NATIVE_DOT: tl.constexpr):
    """fp32 ``(BLOCK_T, NCP) @ (NCP, BLOCK_D)`` with ``coef`` fp32 and ``w`` a tile of W_out.

    Tensor cores take 16-bit operands: with NATIVE_DOT the fp32 coefficients are split into a high and a low
    16-bit part (two dots), so they keep ~16 mantissa bits; the weights already are in the activation dtype.
    Otherwise an fp32 'ieee' dot (TF32 would miss the fp32 tolerance).
    """
    if NATIVE_DOT:
        coef_hi = coef.to(w.dtype)
        coef_lo = (coef - coef_hi.to(tl.float32)).to(w.dtype)
        delta = tl.dot(coef_hi, w)
        delta = tl.dot(coef_lo, w, delta)
    else:
        delta = tl.dot(coef, w.to(tl.float32), input_precision="ieee")
    return delta
