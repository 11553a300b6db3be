"""Query-mode decode fast path: ``h + delta[seq(row)]``, with ``delta = coef @ W_out`` computed once per sequence
at prefill (`ops.coef_delta`) and cached, so a decode step reads h and one fp32 row per sequence and does no dot.

Rows map to sequences either through ``row_to_seq`` (-1: leave the row alone; an index past the end of ``delta``
gives NaN rows rather than an out-of-bounds read) or, without a map, as ``row // rows_per_seq`` (h laid out
``(B, T, d)``). The grid splits rows and d, so a decode step of a few rows still spreads over many SMs. Issue 14's
fused RMSNorm reads the same cached delta. Readable equivalent: `reference.apply_delta`.
"""
import torch
import triton
import triton.language as tl

from .kernel_common import device_guard
from .pdl import launch_options, wait_for_previous_kernel

DELTA_BLOCK_D = 512


@triton.jit
def row_sequences(seq_ptr, n_rows, n_seq, rows_per_seq, HAS_MAP: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's rows and their sequences: ``(rows, row_mask, seq, active, in_range)``; ``active``: the row
    gets an edit (its sequence index is >= 0), ``in_range``: that index is within ``delta``."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < n_rows
    if HAS_MAP:
        seq = tl.load(seq_ptr + rows, mask=row_mask, other=-1)
    else:
        seq = rows // rows_per_seq
    active = row_mask & (seq >= 0)
    return rows, row_mask, seq, active, active & (seq < n_seq)


@triton.jit
def apply_delta_kernel(h_ptr, out_ptr, delta_ptr, seq_ptr, n_rows, n_seq, d, rows_per_seq,
                       HAS_MAP: tl.constexpr, IN_PLACE: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_previous_kernel(PDL)
    rows, row_mask, seq, active, in_range = row_sequences(seq_ptr, n_rows, n_seq, rows_per_seq, HAS_MAP, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < d
    write = active if IN_PLACE else row_mask
    mask = write[:, None] & d_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * d + offs_d[None, :]
    x = tl.load(h_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
    delta = tl.load(delta_ptr + seq.to(tl.int64)[:, None] * d + offs_d[None, :],
                    mask=in_range[:, None] & d_mask[None, :], other=0.0)
    delta = tl.where((active & ~in_range)[:, None], float("nan"), delta.to(tl.float32))
    out = tl.where(active[:, None], (x.to(tl.float32) + delta).to(x.dtype), x)
    tl.store(out_ptr + offs, out, mask=mask)


def delta_block_t(n_rows: int) -> int:
    """Rows per program: a decode step's few rows in one row block (the grid then splits d only)."""
    return min(16, triton.next_power_of_2(max(n_rows, 1)))


def launch_apply_delta(h: torch.Tensor, out: torch.Tensor, delta: torch.Tensor, row_to_seq, rows_per_seq: int
                       ) -> None:
    """Contiguous ``h`` (``(..., d)``, any leading shape), contiguous ``delta`` ``(B, d)``; ``row_to_seq``: None or
    a contiguous int64 ``(N,)``; ``out`` may be ``h`` itself (in place)."""
    d = h.shape[-1]
    n_rows = h.numel() // d if d else 0
    if n_rows == 0:
        return
    block_t = delta_block_t(n_rows)
    grid = (triton.cdiv(n_rows, block_t), triton.cdiv(d, DELTA_BLOCK_D))
    with device_guard(h):
        apply_delta_kernel[grid](h, out, delta, delta if row_to_seq is None else row_to_seq, n_rows,
                                 delta.shape[0], d, max(rows_per_seq, 1), HAS_MAP=row_to_seq is not None,
                                 IN_PLACE=out.data_ptr() == h.data_ptr(), BLOCK_T=block_t, BLOCK_D=DELTA_BLOCK_D,
                                 **launch_options(h))
