"""Query-mode step 2: ``h + coef[row_to_seq] @ W_out``; rows mapped to -1 are left as they are.

No reduction over d, so the grid splits both rows and d, ``(cdiv(N, BLOCK_T), cdiv(d, BLOCK_D))``: at decode
(one row per sequence) the d/BLOCK_D programs each read a slice of W_out instead of one program streaming it all.
A row index past the end of ``coef`` cannot raise without a host sync; such rows come out as NaN instead of reading
out of bounds. Readable equivalent: `reference.apply_coef`. Block sizes: `heuristics.apply_config` (the bytes model).
"""
import torch
import triton
import triton.language as tl

from .heuristics import apply_config
from .kernel_common import INTERPRETING, card_for, config_kwargs, device_guard, native_dot, padded
from .pdl import launch_options, wait_for_previous_kernel
from .perf_model import Shape
from .w_out_dot import coef_times_w_out


@triton.jit
def apply_kernel(h_ptr, out_ptr, coef_ptr, seq_ptr, w_out_ptr, n_rows, n_seq, d,
                 NC: tl.constexpr, NCP: tl.constexpr, NATIVE_DOT: tl.constexpr, IN_PLACE: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_previous_kernel(PDL)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < n_rows
    seq = tl.load(seq_ptr + rows, mask=row_mask, other=-1)
    active = row_mask & (seq >= 0)
    in_range = active & (seq < n_seq)
    coef_cols = tl.arange(0, NCP)
    coef = tl.load(coef_ptr + seq[:, None] * NC + coef_cols[None, :],
                   mask=in_range[:, None] & (coef_cols < NC)[None, :], other=0.0)
    coef = tl.where((active & ~in_range)[:, None], float("nan"), coef)

    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < d
    write = active if IN_PLACE else row_mask
    if tl.max(write.to(tl.int32), axis=0) > 0:
        mask = write[:, None] & d_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * d + offs_d[None, :]
        x = tl.load(h_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        w = tl.load(w_out_ptr + coef_cols[:, None] * d + offs_d[None, :],
                    mask=(coef_cols < NC)[:, None] & d_mask[None, :], other=0.0)
        delta = coef_times_w_out(coef, w, NATIVE_DOT)
        out = tl.where(active[:, None], (x.to(tl.float32) + delta).to(x.dtype), x)
        tl.store(out_ptr + offs, out, mask=mask)


def launch_apply(h2d: torch.Tensor, out2d: torch.Tensor, coef: torch.Tensor, row_to_seq: torch.Tensor,
                 w_out: torch.Tensor, config=None) -> None:
    """Contiguous ``(N, d)`` rows, fp32 contiguous ``coef`` ``(B, K+k)``, int64 ``row_to_seq`` ``(N,)``;
    ``out2d`` may be ``h2d`` itself (in place)."""
    n_rows, d = h2d.shape
    n_seq, n_coef = coef.shape
    if n_rows == 0:
        return
    shape = Shape(n_rows, d, h2d.element_size(), 8, n_coef, has_pass1=False)
    config = config or apply_config(shape, n_seq, card_for(h2d), INTERPRETING)
    grid = (triton.cdiv(n_rows, config.BLOCK_T), triton.cdiv(d, config.BLOCK_D))
    with device_guard(h2d):
        apply_kernel[grid](h2d, out2d, coef, row_to_seq, w_out, n_rows, n_seq, d,
                           NC=n_coef, NCP=padded(n_coef), NATIVE_DOT=native_dot(h2d.dtype),
                           IN_PLACE=out2d.data_ptr() == h2d.data_ptr(), **config_kwargs(config, pipelined=False),
                           **launch_options(h2d))
