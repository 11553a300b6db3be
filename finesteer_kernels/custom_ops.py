"""The Triton kernels registered as torch.library custom ops, each with a fake (shape-only) implementation, so that
``torch.compile(fullgraph=True)`` traces through a call as one opaque node:

    finesteer::steer(h, w_in, w_out, mean, consts, layout, tau, eps, scale, keep) -> Tensor    token mode
    finesteer::steer_(h!, w_in, w_out, mean, consts, layout, tau, eps, scale, keep) -> ()      token mode, in place
    finesteer::synthesize(h, w_in, mean, consts, layout, tau, eps, scale) -> Tensor           (B, K+k) fp32
    finesteer::apply_coef(h, coef, row_to_seq, w_out) -> Tensor                                query-mode apply
    finesteer::apply_coef_(h!, coef, row_to_seq, w_out) -> ()                                  the same, in place
    finesteer::apply_delta(h, delta, row_to_seq, rows_per_seq) -> Tensor                      decode: h + delta[seq]
    finesteer::apply_delta_(h!, delta, row_to_seq, rows_per_seq) -> ()                        the same, in place
    finesteer::steer_rmsnorm(h, ..., keep, norm_weight, norm_consts, out_col, norm_eps, unit_offset,
                             weight_in_fp32, y_dtype) -> (out, y)   w_in, layout: `norm.NormPack`'s
    finesteer::steer_rmsnorm_(h!, ...) -> y                            token mode fused with the next RMSNorm
    finesteer::apply_delta_rmsnorm(h, delta, row_to_seq, rows_per_seq, norm_weight, norm_eps, unit_offset,
                                   weight_in_fp32, y_dtype) -> (out, y)
    finesteer::apply_delta_rmsnorm_(h!, ...) -> y                      query mode (decode) fused with the next RMSNorm

``h`` is contiguous ``(N, d)`` (the delta ops take any contiguous ``(..., d)``); ``w_in``/``w_out``/``mean``/``consts`` come from `SteerParams.pack_centred`;
``layout`` is a `kernel_common.Layout` as a list of ints; ``scale`` is ``alpha * gamma``; ``keep`` is None or a
contiguous ``(N,)`` bool (False: leave the row unchanged). Each launch runs with ``h``'s GPU as the current device
(`kernel_common.device_guard`). `finesteer_kernels.ops` prepares these from a `SteerParams`; other libraries
should call `finesteer_kernels.steer` etc., not these ops directly. The ops have no autograd formula: `ops` runs
the torch reference when gradients are wanted.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .apply_kernel import launch_apply
from .delta_kernel import launch_apply_delta
from .delta_norm_kernel import launch_apply_delta_norm
from .kernel_common import Layout
from .norm import NormOperands
from .steer_kernel import launch_steer
from .synthesize_kernel import launch_synthesize


@torch.library.custom_op("finesteer::steer", mutates_args=())
def steer(h: Tensor, w_in: Tensor, w_out: Tensor, mean: Tensor, consts: Tensor, layout: list[int], tau: float,
          eps: float, scale: float, keep: Optional[Tensor] = None) -> Tensor:
    out = torch.empty_like(h)
    launch_steer(h, out, w_in, w_out, mean, consts, Layout(*layout), tau, eps, scale, keep)
    return out


@steer.register_fake
def _steer_fake(h, w_in, w_out, mean, consts, layout, tau, eps, scale, keep=None):
    return torch.empty_like(h)


@torch.library.custom_op("finesteer::steer_", mutates_args=("h",))
def steer_(h: Tensor, w_in: Tensor, w_out: Tensor, mean: Tensor, consts: Tensor, layout: list[int], tau: float,
           eps: float, scale: float, keep: Optional[Tensor] = None) -> None:
    launch_steer(h, h, w_in, w_out, mean, consts, Layout(*layout), tau, eps, scale, keep)


@steer_.register_fake
def _steer_inplace_fake(h, w_in, w_out, mean, consts, layout, tau, eps, scale, keep=None):
    return None


@torch.library.custom_op("finesteer::synthesize", mutates_args=())
def synthesize(h: Tensor, w_in: Tensor, mean: Tensor, consts: Tensor, layout: list[int], tau: float, eps: float,
               scale: float) -> Tensor:
    layout = Layout(*layout)
    coef = torch.empty(h.shape[0], layout.n_coef, dtype=torch.float32, device=h.device)
    launch_synthesize(h, coef, w_in, mean, consts, layout, tau, eps, scale)
    return coef


@synthesize.register_fake
def _synthesize_fake(h, w_in, mean, consts, layout, tau, eps, scale):
    return h.new_empty(h.shape[0], Layout(*layout).n_coef, dtype=torch.float32)


@torch.library.custom_op("finesteer::apply_coef", mutates_args=())
def apply_coef(h: Tensor, coef: Tensor, row_to_seq: Tensor, w_out: Tensor) -> Tensor:
    out = torch.empty_like(h)
    launch_apply(h, out, coef, row_to_seq, w_out)
    return out


@apply_coef.register_fake
def _apply_coef_fake(h, coef, row_to_seq, w_out):
    return torch.empty_like(h)


@torch.library.custom_op("finesteer::apply_coef_", mutates_args=("h",))
def apply_coef_(h: Tensor, coef: Tensor, row_to_seq: Tensor, w_out: Tensor) -> None:
    launch_apply(h, h, coef, row_to_seq, w_out)


@apply_coef_.register_fake
def _apply_coef_inplace_fake(h, coef, row_to_seq, w_out):
    return None


@torch.library.custom_op("finesteer::apply_delta", mutates_args=())
def apply_delta(h: Tensor, delta: Tensor, row_to_seq: Optional[Tensor], rows_per_seq: int) -> Tensor:
    out = torch.empty_like(h)
    launch_apply_delta(h, out, delta, row_to_seq, rows_per_seq)
    return out


@apply_delta.register_fake
def _apply_delta_fake(h, delta, row_to_seq, rows_per_seq):
    return torch.empty_like(h)


@torch.library.custom_op("finesteer::apply_delta_", mutates_args=("h",))
def apply_delta_(h: Tensor, delta: Tensor, row_to_seq: Optional[Tensor], rows_per_seq: int) -> None:
    launch_apply_delta(h, h, delta, row_to_seq, rows_per_seq)


@apply_delta_.register_fake
def _apply_delta_inplace_fake(h, delta, row_to_seq, rows_per_seq):
    return None


# ---- steerer banks (finesteer_kernels.bank): one launch over rows of different steerers -------------------------
#   finesteer::steer_bank(h, order, counts, w_in, w_out, mean, consts, meta, scalars, layout) -> Tensor
#   finesteer::steer_bank_(h!, ...) -> ()
#   finesteer::synthesize_bank(h, order, counts, w_in, mean, consts, meta, scalars, layout) -> Tensor (B, NC) fp32
# order/counts: `bank.plan_rows`; w_in ... scalars: `SteerBank.pack`; layout: a `bank.BankLayout` as ints.
def _launch_bank(h, out, order, counts, w_in, w_out, mean, consts, meta, scalars, layout, coef_out=None):
    from .bank import BankLayout, PackedBank
    from .bank_kernel import launch_bank

    packed = PackedBank(w_in, w_out, mean, consts, meta, scalars, None, None, BankLayout(*layout))
    launch_bank(h, out, packed, order, counts, coef_out=coef_out)


def _bank_n_coef(layout: list[int]) -> int:
    from .bank import BankLayout

    return BankLayout(*layout).NC


@torch.library.custom_op("finesteer::steer_bank", mutates_args=())
def steer_bank(h: Tensor, order: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor, mean: Tensor, consts: Tensor,
               meta: Tensor, scalars: Tensor, layout: list[int]) -> Tensor:
    out = torch.empty_like(h)
    _launch_bank(h, out, order, counts, w_in, w_out, mean, consts, meta, scalars, layout)
    return out


@steer_bank.register_fake
def _steer_bank_fake(h, order, counts, w_in, w_out, mean, consts, meta, scalars, layout):
    return torch.empty_like(h)


@torch.library.custom_op("finesteer::steer_bank_", mutates_args=("h",))
def steer_bank_(h: Tensor, order: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor, mean: Tensor, consts: Tensor,
                meta: Tensor, scalars: Tensor, layout: list[int]) -> None:
    _launch_bank(h, h, order, counts, w_in, w_out, mean, consts, meta, scalars, layout)


@steer_bank_.register_fake
def _steer_bank_inplace_fake(h, order, counts, w_in, w_out, mean, consts, meta, scalars, layout):
    return None


@torch.library.custom_op("finesteer::synthesize_bank", mutates_args=())
def synthesize_bank(h: Tensor, order: Tensor, counts: Tensor, w_in: Tensor, mean: Tensor, consts: Tensor,
                    meta: Tensor, scalars: Tensor, layout: list[int]) -> Tensor:
    coef = torch.empty(h.shape[0], _bank_n_coef(layout), dtype=torch.float32, device=h.device)
    _launch_bank(h, None, order, counts, w_in, w_in, mean, consts, meta, scalars, layout, coef_out=coef)
    return coef


@synthesize_bank.register_fake
def _synthesize_bank_fake(h, order, counts, w_in, mean, consts, meta, scalars, layout):
    return h.new_empty(h.shape[0], _bank_n_coef(layout), dtype=torch.float32)


# ---- fused with the next RMSNorm (issue 14): the steered rows and their norm ``y`` (``y_dtype``, the module's) --
# ``norm_weight``: the norm module's own weight, contiguous (d,), any float dtype (see `norm.NormOperands`).
@torch.library.custom_op("finesteer::steer_rmsnorm", mutates_args=())
def steer_rmsnorm(h: Tensor, w_in: Tensor, w_out: Tensor, mean: Tensor, consts: Tensor, layout: list[int], tau: float,
                  eps: float, scale: float, keep: Optional[Tensor], norm_weight: Tensor, norm_consts: Tensor,
                  out_col: int, norm_eps: float, unit_offset: bool, weight_in_fp32: bool,
                  y_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    out, y = torch.empty_like(h), torch.empty(h.shape, dtype=y_dtype, device=h.device)
    launch_steer(h, out, w_in, w_out, mean, consts, Layout(*layout), tau, eps, scale, keep,
                 norm=NormOperands(y, norm_weight, norm_consts, out_col, norm_eps, unit_offset, weight_in_fp32))
    return out, y


@steer_rmsnorm.register_fake
def _steer_rmsnorm_fake(h, w_in, w_out, mean, consts, layout, tau, eps, scale, keep, norm_weight, norm_consts,
                        out_col, norm_eps, unit_offset, weight_in_fp32, y_dtype):
    return torch.empty_like(h), h.new_empty(h.shape, dtype=y_dtype)


@torch.library.custom_op("finesteer::steer_rmsnorm_", mutates_args=("h",))
def steer_rmsnorm_(h: Tensor, w_in: Tensor, w_out: Tensor, mean: Tensor, consts: Tensor, layout: list[int],
                   tau: float, eps: float, scale: float, keep: Optional[Tensor], norm_weight: Tensor,
                   norm_consts: Tensor, out_col: int, norm_eps: float, unit_offset: bool, weight_in_fp32: bool,
                   y_dtype: torch.dtype) -> Tensor:
    y = torch.empty(h.shape, dtype=y_dtype, device=h.device)
    launch_steer(h, h, w_in, w_out, mean, consts, Layout(*layout), tau, eps, scale, keep,
                 norm=NormOperands(y, norm_weight, norm_consts, out_col, norm_eps, unit_offset, weight_in_fp32))
    return y


@steer_rmsnorm_.register_fake
def _steer_rmsnorm_inplace_fake(h, w_in, w_out, mean, consts, layout, tau, eps, scale, keep, norm_weight,
                                norm_consts, out_col, norm_eps, unit_offset, weight_in_fp32, y_dtype):
    return h.new_empty(h.shape, dtype=y_dtype)


@torch.library.custom_op("finesteer::apply_delta_rmsnorm", mutates_args=())
def apply_delta_rmsnorm(h: Tensor, delta: Tensor, row_to_seq: Optional[Tensor], rows_per_seq: int,
                        norm_weight: Tensor, norm_eps: float, unit_offset: bool, weight_in_fp32: bool,
                        y_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    out, y = torch.empty_like(h), torch.empty(h.shape, dtype=y_dtype, device=h.device)
    launch_apply_delta_norm(h, out, y, delta, row_to_seq, rows_per_seq, norm_weight, norm_eps, unit_offset,
                            weight_in_fp32)
    return out, y


@apply_delta_rmsnorm.register_fake
def _apply_delta_rmsnorm_fake(h, delta, row_to_seq, rows_per_seq, norm_weight, norm_eps, unit_offset, weight_in_fp32,
                              y_dtype):
    return torch.empty_like(h), h.new_empty(h.shape, dtype=y_dtype)


@torch.library.custom_op("finesteer::apply_delta_rmsnorm_", mutates_args=("h",))
def apply_delta_rmsnorm_(h: Tensor, delta: Tensor, row_to_seq: Optional[Tensor], rows_per_seq: int,
                         norm_weight: Tensor, norm_eps: float, unit_offset: bool, weight_in_fp32: bool,
                         y_dtype: torch.dtype) -> Tensor:
    y = torch.empty(h.shape, dtype=y_dtype, device=h.device)
    launch_apply_delta_norm(h, h, y, delta, row_to_seq, rows_per_seq, norm_weight, norm_eps, unit_offset,
                            weight_in_fp32)
    return y


@apply_delta_rmsnorm_.register_fake
def _apply_delta_rmsnorm_inplace_fake(h, delta, row_to_seq, rows_per_seq, norm_weight, norm_eps, unit_offset,
                                      weight_in_fp32, y_dtype):
    return h.new_empty(h.shape, dtype=y_dtype)
