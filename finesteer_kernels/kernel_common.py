"""What the Triton kernels share on the host side: the packed layout as compile-time constants, whether the
interpreter runs them, how dot products are done per dtype, which card a tensor lives on, and the model's view of
a call (`shape_of`). Launch configurations come from `heuristics` (the bytes-and-occupancy model of `perf_model`).

Imports triton; `ops` imports this module lazily, so the package itself needs neither triton nor a GPU.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from triton import knobs

from .params import CentredPack
from .perf_model import DEFAULT_CARD, Card, Shape, card_for_device, padded

# Under TRITON_INTERPRET=1, `triton.jit` builds interpreted functions at import time of the kernel modules; this
# records which kind they are.
INTERPRETING = bool(knobs.runtime.interpret)


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


def card_for(t: torch.Tensor) -> Card:
    """The card the model plans for: ``t``'s GPU, or the default card (no GPU: the interpreter, or compiling)."""
    return card_for_device(t.device) if t.is_cuda else DEFAULT_CARD


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def shape_of(n_rows: int, d: int, layout: Layout, elem: int, dtype: str = "") -> Shape:
    """The model's view of a call on ``n_rows`` rows of width ``d`` with the packed ``layout`` (``dtype``: h's, as
    in `DTYPE_NAMES`)."""
    has_pass1 = bool(layout.HAS_GATE or layout.HAS_ROUTER or layout.HAS_RES)
    return Shape(n_rows, d, elem, layout.W_IN_STRIDE, layout.n_coef, has_pass1=has_pass1,
                 has_mean=bool(layout.HAS_MEAN), has_router=bool(layout.HAS_ROUTER), has_residual=bool(layout.HAS_RES),
                 dtype=dtype)


def config_kwargs(config, pipelined: bool = True) -> dict:
    """Launch keywords of a `perf_model.Config` (num_warps and num_stages only when compiling for a GPU)."""
    kw = dict(BLOCK_T=config.BLOCK_T, BLOCK_D=config.BLOCK_D)
    if pipelined:
        kw.update(NUM_STAGES=config.num_stages, SPLIT=config.SPLIT)
    if not INTERPRETING:
        kw.update(num_warps=config.num_warps, num_stages=config.num_stages)
    return kw
