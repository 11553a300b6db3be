"""Token-mode kernel: every row gates and routes on itself, in one launch.

One program per tile of BLOCK_T rows: pass 1 and the epilogue (`coef_tile.tile_coefficients`) give each row its
coefficients, then pass 2 sweeps d again and writes ``h + coef @ W_out``. In place, rows whose gate is off are not
written, and a tile whose gates are all off skips pass 2. Readable equivalent: `reference.steer`.
Block sizes: `kernel_common.coef_config`.
"""
import torch
import triton
import triton.language as tl

from .coef_tile import tile_coefficients
from .kernel_common import Layout, coef_config, native_dot


@triton.jit
def add_coef_times_w_out(x_ptr, out_ptr, rows, write, d, coef, w_out_ptr, NC: tl.constexpr, NCP: tl.constexpr,
                         NATIVE_DOT: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 2: ``out[rows] = x[rows] + coef @ W_out`` over all of d, for the rows in ``write``."""
    coef_rows = tl.arange(0, NCP)
    row_base = rows.to(tl.int64) * d
    if NATIVE_DOT:
        # tensor cores take 16-bit operands: split the fp32 coefficients into a high and a low part so they keep
        # ~16 mantissa bits; the weights already are in the activation dtype.
        coef_hi = coef.to(x_ptr.dtype.element_ty)
        coef_lo = (coef - coef_hi.to(tl.float32)).to(x_ptr.dtype.element_ty)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d
        mask = write[:, None] & d_mask[None, :]
        x = tl.load(x_ptr + row_base[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_out_ptr + coef_rows[:, None] * d + offs_d[None, :],
                    mask=(coef_rows < NC)[:, None] & d_mask[None, :], other=0.0)
        if NATIVE_DOT:
            delta = tl.dot(coef_hi, w)
            delta = tl.dot(coef_lo, w, delta)
        else:
            delta = tl.dot(coef, w.to(tl.float32), input_precision="ieee")
        tl.store(out_ptr + row_base[:, None] + offs_d[None, :], (x + delta).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def steer_kernel(h_ptr, out_ptr, w_in_ptr, w_out_ptr, consts_ptr, n_rows, d, tau, eps, scale,
                 R: tl.constexpr, K: tl.constexpr, M: tl.constexpr, KR: tl.constexpr,
                 HAS_GATE: tl.constexpr, HAS_ROUTER: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                 MEAN_COL: tl.constexpr, ROUTER_COL: tl.constexpr, RES_COL: tl.constexpr,
                 W_IN_STRIDE: tl.constexpr, S_MU_OFF: tl.constexpr, MU_SQ_OFF: tl.constexpr,
                 RB_OFF: tl.constexpr, B1_OFF: tl.constexpr, W2_OFF: tl.constexpr, B2_OFF: tl.constexpr,
                 NP: tl.constexpr, MP: tl.constexpr, NC: tl.constexpr, NCP: tl.constexpr, NATIVE_DOT: tl.constexpr,
                 IN_PLACE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < n_rows
    coef, g = tile_coefficients(h_ptr, rows, row_mask, d, w_in_ptr, consts_ptr, tau, eps, scale,
                                R, K, M, KR, HAS_GATE, HAS_ROUTER, HAS_RES, RELU, MEAN_COL, ROUTER_COL, RES_COL,
                                W_IN_STRIDE, S_MU_OFF, MU_SQ_OFF, RB_OFF, B1_OFF, W2_OFF, B2_OFF,
                                NP, MP, NCP, NATIVE_DOT, BLOCK_T, BLOCK_D)
    if IN_PLACE and HAS_GATE:
        write = row_mask & (g != 0.0)
        if tl.max(write.to(tl.int32), axis=0) > 0:
            add_coef_times_w_out(h_ptr, out_ptr, rows, write, d, coef, w_out_ptr, NC, NCP, NATIVE_DOT, BLOCK_D)
    else:
        add_coef_times_w_out(h_ptr, out_ptr, rows, row_mask, d, coef, w_out_ptr, NC, NCP, NATIVE_DOT, BLOCK_D)


def launch_steer(h2d: torch.Tensor, out2d: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                 consts: torch.Tensor, layout: Layout, tau: float, eps: float, scale: float, config=None) -> None:
    """Run the kernel on contiguous ``(N, d)`` rows; ``out2d`` may be ``h2d`` itself (in place)."""
    n_rows, d = h2d.shape
    if n_rows == 0:
        return
    config = config or coef_config(n_rows, layout)
    grid = (triton.cdiv(n_rows, config.BLOCK_T),)
    steer_kernel[grid](h2d, out2d, w_in, w_out, consts, n_rows, d, tau, eps, scale,
                       **layout.constexprs(), NATIVE_DOT=native_dot(h2d.dtype),
                       IN_PLACE=out2d.data_ptr() == h2d.data_ptr(), **config.launch_kwargs())
