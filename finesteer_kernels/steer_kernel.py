"""Token-mode kernel: every row gates and routes on itself, in one launch.

One program per tile of BLOCK_T rows: pass 1 and the epilogue (`coef_tile.tile_coefficients`) give each row its
coefficients, then pass 2 sweeps d again and writes ``h + coef @ W_out``. In place, rows whose gate is off are not
written, and a tile whose gates are all off skips pass 2. An optional per-row ``keep`` mask (e.g. padding) marks
rows to leave exactly as they are: not written in place, copied out of place. Readable equivalent:
`reference.steer`. Block sizes: `kernel_common.coef_config`.
"""
import torch
import triton
import triton.language as tl

from .coef_tile import tile_coefficients
from .kernel_common import Layout, coef_config, device_guard, native_dot
from .w_out_dot import coef_times_w_out


@triton.jit
def add_coef_times_w_out(x_ptr, out_ptr, rows, write, edit, d, coef, w_out_ptr, NC: tl.constexpr,
                         NCP: tl.constexpr, NATIVE_DOT: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 2 over all of d: for the rows in ``write``, ``out = x + coef @ W_out`` where ``edit``, else ``x``."""
    coef_rows = tl.arange(0, NCP)
    row_base = rows.to(tl.int64) * d
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d
        mask = write[:, None] & d_mask[None, :]
        x = tl.load(x_ptr + row_base[:, None] + offs_d[None, :], mask=mask, other=0.0)
        w = tl.load(w_out_ptr + coef_rows[:, None] * d + offs_d[None, :],
                    mask=(coef_rows < NC)[:, None] & d_mask[None, :], other=0.0)
        delta = coef_times_w_out(coef, w, NATIVE_DOT)
        out = tl.where(edit[:, None], (x.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), x)
        tl.store(out_ptr + row_base[:, None] + offs_d[None, :], out, mask=mask)


@triton.jit
def steer_kernel(h_ptr, out_ptr, w_in_ptr, w_out_ptr, mean_ptr, consts_ptr, keep_ptr, n_rows, d, tau, eps, scale,
                 R: tl.constexpr, K: tl.constexpr, M: tl.constexpr, KR: tl.constexpr,
                 HAS_GATE: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_ROUTER: tl.constexpr, HAS_RES: tl.constexpr,
                 RELU: tl.constexpr, ROUTER_COL: tl.constexpr, RES_COL: tl.constexpr, W_IN_STRIDE: tl.constexpr,
                 RB_OFF: tl.constexpr, B1_OFF: tl.constexpr, W2_OFF: tl.constexpr, B2_OFF: tl.constexpr,
                 NP: tl.constexpr, MP: tl.constexpr, NC: tl.constexpr, NCP: tl.constexpr, NATIVE_DOT: tl.constexpr,
                 IN_PLACE: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < n_rows
    edit = row_mask
    if HAS_KEEP:
        edit = edit & (tl.load(keep_ptr + rows, mask=row_mask, other=0) != 0)
    coef, g = tile_coefficients(h_ptr, rows, edit, d, w_in_ptr, mean_ptr, consts_ptr, tau, eps, scale,
                                R, K, M, KR, HAS_GATE, HAS_MEAN, HAS_ROUTER, HAS_RES, RELU, ROUTER_COL, RES_COL,
                                W_IN_STRIDE, RB_OFF, B1_OFF, W2_OFF, B2_OFF, NP, MP, NCP, NATIVE_DOT, BLOCK_T,
                                BLOCK_D)
    if IN_PLACE:
        if HAS_GATE:
            edit = g != 0.0
        if HAS_GATE or HAS_KEEP:
            if tl.max(edit.to(tl.int32), axis=0) > 0:  # a tile with nothing to edit skips pass 2
                add_coef_times_w_out(h_ptr, out_ptr, rows, edit, edit, d, coef, w_out_ptr, NC, NCP, NATIVE_DOT,
                                     BLOCK_D)
        else:
            add_coef_times_w_out(h_ptr, out_ptr, rows, edit, edit, d, coef, w_out_ptr, NC, NCP, NATIVE_DOT,
                                 BLOCK_D)
    else:
        add_coef_times_w_out(h_ptr, out_ptr, rows, row_mask, edit, d, coef, w_out_ptr, NC, NCP, NATIVE_DOT,
                             BLOCK_D)


def launch_steer(h2d: torch.Tensor, out2d: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                 mean: torch.Tensor, consts: torch.Tensor, layout: Layout, tau: float, eps: float, scale: float,
                 keep: torch.Tensor | None = None, config=None) -> None:
    """Run the kernel on contiguous ``(N, d)`` rows; ``out2d`` may be ``h2d`` itself (in place). ``keep``: optional
    contiguous ``(N,)`` bool, False for rows to leave unchanged."""
    n_rows, d = h2d.shape
    if n_rows == 0:
        return
    config = config or coef_config(n_rows, layout)
    grid = (triton.cdiv(n_rows, config.BLOCK_T),)
    with device_guard(h2d):
        keep_ptr = consts if keep is None else keep.view(torch.uint8)  # never read without HAS_KEEP
        steer_kernel[grid](h2d, out2d, w_in, w_out, mean, consts, keep_ptr, n_rows, d,
                           tau, eps, scale, **layout.constexprs(), NATIVE_DOT=native_dot(h2d.dtype),
                           IN_PLACE=out2d.data_ptr() == h2d.data_ptr(), HAS_KEEP=keep is not None,
                           **config.launch_kwargs())
