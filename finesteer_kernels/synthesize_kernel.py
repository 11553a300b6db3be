"""Query-mode step 1: anchor rows -> fp32 coefficients ``(B, K+k)``, gate and ``alpha * gamma`` folded in.

Pass 1 and the epilogue of the token-mode kernel (`coef_tile.tile_coefficients`), then a store of the
coefficient row instead of pass 2. Readable equivalent: `reference.synthesize`. Block sizes:
`kernel_common.coef_config` (B is small in practice, so usually one or a few 16-row programs).
"""
import torch
import triton
import triton.language as tl

from .coef_tile import tile_coefficients
from .kernel_common import Layout, coef_config, device_guard, native_dot


@triton.jit
def synthesize_kernel(h_ptr, coef_ptr, w_in_ptr, mean_ptr, consts_ptr, n_rows, d, tau, eps, scale,
                      R: tl.constexpr, K: tl.constexpr, M: tl.constexpr, KR: tl.constexpr,
                      HAS_GATE: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_ROUTER: tl.constexpr,
                      HAS_RES: tl.constexpr, RELU: tl.constexpr, ROUTER_COL: tl.constexpr, RES_COL: tl.constexpr,
                      W_IN_STRIDE: tl.constexpr, RB_OFF: tl.constexpr, B1_OFF: tl.constexpr,
                      W2_OFF: tl.constexpr, B2_OFF: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
                      NC: tl.constexpr, NCP: tl.constexpr, NATIVE_DOT: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < n_rows
    coef, g = tile_coefficients(h_ptr, rows, row_mask, d, w_in_ptr, mean_ptr, consts_ptr, tau, eps, scale,
                                R, K, M, KR, HAS_GATE, HAS_MEAN, HAS_ROUTER, HAS_RES, RELU, ROUTER_COL, RES_COL,
                                W_IN_STRIDE, RB_OFF, B1_OFF, W2_OFF, B2_OFF, NP, MP, NCP, NATIVE_DOT, BLOCK_T,
                                BLOCK_D)
    coef_cols = tl.arange(0, NCP)
    tl.store(coef_ptr + rows.to(tl.int64)[:, None] * NC + coef_cols[None, :], coef,
             mask=row_mask[:, None] & (coef_cols < NC)[None, :])


def launch_synthesize(h2d: torch.Tensor, coef: torch.Tensor, w_in: torch.Tensor, mean: torch.Tensor,
                      consts: torch.Tensor, layout: Layout, tau: float, eps: float, scale: float,
                      config=None) -> None:
    """Fill ``coef`` (``(B, K+k)`` fp32, contiguous) from contiguous anchor rows ``(B, d)``."""
    n_rows, d = h2d.shape
    if n_rows == 0:
        return
    config = config or coef_config(n_rows, layout)
    grid = (triton.cdiv(n_rows, config.BLOCK_T),)
    with device_guard(h2d):
        synthesize_kernel[grid](h2d, coef, w_in, mean, consts, n_rows, d, tau, eps, scale, **layout.constexprs(),
                                NATIVE_DOT=native_dot(h2d.dtype), **config.launch_kwargs())
