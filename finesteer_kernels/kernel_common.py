"""What the three Triton kernels share on the host side: the packed layout as compile-time constants, whether the
interpreter runs them, how dot products are done per dtype, and the block-size heuristics.

Imports triton; `ops` imports this module lazily, so the package itself needs neither triton nor a GPU.

Block sizes (GPU; one pinned config under the interpreter, where only fewer, larger numpy steps matter):

* token mode and `synthesize` (pass 1 reads a ``(BLOCK_T, BLOCK_D)`` tile of h and a ``(BLOCK_D, NP)`` tile of
  W_in per step, NP = padded r+K+m): ``BLOCK_D = 64`` keeps a W_in stage at 64 x 128 x 2 B = 16 KiB of shared
  memory. ``BLOCK_T`` trades weight re-reads (W_in and W_out are read once per row tile, from L2) against
  parallelism and registers (the fp32 accumulator is BLOCK_T x NP): 64 rows (wgmma on Hopper, 8 warps) once there
  are enough rows to fill the SMs, else 32 (4 warps), and 16, the smallest tl.dot tile, for decode-size inputs.
  With NP = 256 (e.g. r = 128, K = 32) the 32-row tile spills on sm_90, so wide layouts use 64 rows and 8 warps.
* `apply_coef` has no reduction over d, so its grid splits d as well as rows: ``(cdiv(N, BLOCK_T),
  cdiv(d, BLOCK_D))``. For decode (a few rows) ``BLOCK_D = 64`` gives d/64 programs (64 at d = 4096) instead of one
  program streaming all of W_out; for prefill ``BLOCK_T = 64, BLOCK_D = 128``.

These are heuristics keyed on (rows, d, padded widths, dtype), chosen from the arithmetic in docs/kernels.md and
checked for spills by tests/test_kernel_compile.py; they have not been tuned on a GPU.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
from triton import knobs

from .params import CentredPack

# Under TRITON_INTERPRET=1, `triton.jit` builds interpreted functions at import time of the kernel modules; this
# records which kind they are.
INTERPRETING = bool(knobs.runtime.interpret)

MIN_DOT = 16  # smallest M, N, K that tl.dot accepts on the GPU
W_IN_ALIGN = 8  # W_in columns padded to 8 elements: 16-byte rows in 16-bit dtypes


class Layout(NamedTuple):
    """The packed form's sizes and offsets; every field becomes a tl.constexpr of the kernels."""

    R: int
    K: int
    M: int
    KR: int
    HAS_GATE: int
    HAS_MEAN: int
    HAS_ROUTER: int
    HAS_RES: int
    RELU: int
    ROUTER_COL: int
    RES_COL: int
    W_IN_STRIDE: int
    RB_OFF: int
    B1_OFF: int
    W2_OFF: int
    B2_OFF: int

    @property
    def n_coef(self) -> int:
        return self.K + self.KR

    def constexprs(self) -> dict:
        """Keyword arguments for a kernel launch: the layout plus the padded widths tl.dot needs."""
        return dict(self._asdict(), NP=padded(self.W_IN_STRIDE), MP=padded(self.M), NC=self.n_coef,
                    NCP=padded(self.n_coef))


def padded(n: int) -> int:
    """Width of a tl.dot operand holding ``n`` columns: a power of two, at least 16."""
    return max(MIN_DOT, triton.next_power_of_2(n))


def layout_of(packed: CentredPack, activation: str) -> Layout:
    """The layout of a `SteerParams.pack_centred` result (``w_in`` columns already padded)."""
    return Layout(
        R=packed.r, K=packed.num_experts, M=packed.m, KR=packed.k, HAS_GATE=int(packed.has_gate),
        HAS_MEAN=int(packed.has_mean), HAS_ROUTER=int(packed.has_router), HAS_RES=int(packed.k > 0),
        RELU=int(activation == "relu"), ROUTER_COL=packed.router_col, RES_COL=packed.res_col,
        W_IN_STRIDE=packed.w_in.shape[1], RB_OFF=packed.router_bias_off, B1_OFF=packed.res_in_bias_off,
        W2_OFF=packed.res_out_weight_off, B2_OFF=packed.res_out_bias_off,
    )


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current device while a kernel launches: Triton launches on the current device and its
    current stream, and with a model spread over GPUs (device_map) a layer on cuda:1 runs while cuda:0 is current.
    Sets the device only (no synchronisation); a no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def native_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot runs on the activation dtype (tensor cores) rather than on fp32 copies.

    fp32 inputs use fp32 'ieee' dots (TF32 would miss the 1e-5 tolerance). The interpreter computes bf16 on raw
    bit patterns, so there bf16 tiles are cast to fp32 right after loading; fp16 is exact there and keeps the
    GPU's code path.
    """
    if dtype == torch.float32:
        return False
    return not (INTERPRETING and dtype == torch.bfloat16)


class Config(NamedTuple):
    BLOCK_T: int
    BLOCK_D: int
    num_warps: int
    num_stages: int

    def launch_kwargs(self) -> dict:
        if INTERPRETING:
            return dict(BLOCK_T=self.BLOCK_T, BLOCK_D=self.BLOCK_D)
        return self._asdict()


INTERPRETER_CONFIG = Config(BLOCK_T=32, BLOCK_D=128, num_warps=4, num_stages=1)


def coef_config(n_rows: int, layout: Layout, interpreting: bool = INTERPRETING) -> Config:
    """Token mode and synthesize: one program per row tile, pass 1 over d then (token mode) pass 2."""
    if interpreting:
        return INTERPRETER_CONFIG
    # 256 accumulator columns: 8 warps, and 32-row tiles (mma.sync on Hopper) spill where 64-row tiles (wgmma) fit
    wide = padded(layout.W_IN_STRIDE) > 128
    if n_rows <= MIN_DOT:
        return Config(BLOCK_T=16, BLOCK_D=64, num_warps=8 if wide else 4, num_stages=3)
    if n_rows >= 4096 or wide:
        return Config(BLOCK_T=64, BLOCK_D=64, num_warps=8, num_stages=3)
    return Config(BLOCK_T=32, BLOCK_D=64, num_warps=4, num_stages=3)


def apply_config(n_rows: int, d: int, interpreting: bool = INTERPRETING) -> Config:
    """Query-mode apply: the grid splits rows and d."""
    if interpreting:
        return INTERPRETER_CONFIG
    if n_rows <= 64:
        return Config(BLOCK_T=16, BLOCK_D=64, num_warps=4, num_stages=2)
    return Config(BLOCK_T=64, BLOCK_D=128, num_warps=4, num_stages=2)
