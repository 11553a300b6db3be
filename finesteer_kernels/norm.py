"""The RMSNorm that a fused op applies after the steering edit (`RMSNormParams`), and what the fused token-mode
kernel reads besides the steering pack (`NormPack`, `NormOperands`).

transformers writes RMSNorm in two ways, both with fp32 statistics, ``n = x32 * rsqrt(mean(x32^2) + eps)``:

* Llama, Qwen2/3, Mistral, Phi3: ``weight * n.to(x.dtype)`` (rounded to the input dtype first, then scaled in the
  weight's dtype);
* Gemma 2/3: ``(n * (1 + weight.float())).to(x.dtype)`` (a unit offset, scaled in fp32, rounded last); OLMo2
  scales by ``weight`` in fp32 the same way.

`RMSNormParams` says which (``unit_offset``, ``weight_in_fp32``); `reference.rms_norm` is the readable form.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from .params import _CAST_BY_PACK_CENTRED, SteerParams
from .perf_model import padded
from .validation import HIDDEN_DTYPES


@dataclasses.dataclass(frozen=True, eq=False)
class RMSNormParams:
    """An RMSNorm as the fused ops apply it.

    Args:
        weight: ``(d,)`` the norm module's weight (kept as given: the module's own tensor).
        eps: the module's epsilon (``variance_epsilon`` or ``eps`` in transformers).
        unit_offset: scale by ``1 + weight`` (Gemma) instead of ``weight``.
        weight_in_fp32: scale in fp32 and round to the input dtype last (Gemma, OLMo2) instead of rounding the
            normalised row first and scaling in the weight's dtype (Llama).
    """

    weight: torch.Tensor
    eps: float
    unit_offset: bool = False
    weight_in_fp32: bool = False

    def __post_init__(self) -> None:
        w = self.weight
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or not w.is_floating_point():
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"weight: expected a 1-D floating-point tensor (d,), got {got}")
        if w.dtype not in HIDDEN_DTYPES:
            raise TypeError(f"weight: expected float32, float16 or bfloat16, got {w.dtype}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) \
                or self.eps < 0:
            raise ValueError(f"eps: expected a finite number >= 0, got {self.eps!r}")
        object.__setattr__(self, "eps", float(self.eps))
        # Nothing is derived from the weight here: the kernels read the module's tensor itself at every call, so a
        # model moved to another device, an edit of the weights or a CUDA graph replay always sees the weights as
        # they are (a copy made here would go stale, and built inside a graph capture would never be written).

    def __repr__(self) -> str:
        return (f"RMSNormParams(d={self.d}, eps={self.eps:g}, unit_offset={self.unit_offset}, "
                f"weight_in_fp32={self.weight_in_fp32}, dtype={self.weight.dtype}, device={self.device})")

    @property
    def d(self) -> int:
        return self.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the normalised rows for input rows in ``dtype`` (as the module's own forward gives)."""
        return dtype if self.weight_in_fp32 else torch.promote_types(self.weight.dtype, dtype)

    def check(self, h: torch.Tensor) -> None:
        """``h`` (``(..., d)``, checked against the steerer already) against this norm; metadata only."""
        if h.shape[-1] != self.d:
            raise ValueError(f"norm: weight of size {self.d} does not match h of shape {tuple(h.shape)}")
        if self.device != h.device:
            raise ValueError(f"norm: weight on {self.device} but h on {h.device}")


class NormPack(NamedTuple):
    """What the fused token-mode kernel reads in place of `CentredPack`'s ``w_in`` (the rest of that pack as is).

    * ``w_in``: the centred ``W_in`` with ``W_out^T`` appended at column ``out_col`` (``d x stride``, columns
      zero-padded to a multiple of 8), so pass 1's one dot also gives ``W_out xc``. A second dot over W_out itself
      would save this copy's bytes (``(K+k) x d`` per call, under 0.1 % of a prefill's traffic), but on sm_90a
      its accumulator in another layout pushed fp32 and the widest layouts past 255 registers.
    * ``consts`` (fp32): ``[W_out mu (NCP) | G = W_out W_out^T (NCP x NCP, row-major)]``, zero past K+k (NCP the
      kernel's padded coefficient width), with ``W_out`` as rounded to the activation dtype (the edit the kernel
      adds). Then ``||h + coef W_out||^2 = ||h||^2 + 2 coef.(W_out xc + W_out mu) + coef^T G coef`` needs no
      pass over the edited row.
    """

    w_in: torch.Tensor
    out_col: int
    consts: torch.Tensor


def pack_steer_norm(params: SteerParams, dtype: torch.dtype, device, align: int = 8) -> NormPack:
    """The fused pack of ``params`` for activations in ``dtype``, cached on ``params`` beside its other packs."""
    ncp = padded(params.n_coef)

    def build(dtype: torch.dtype, device: torch.device) -> NormPack:
        centred = params.pack_centred(dtype, device, align)
        out_col, n_coef = centred.w_in.shape[1], params.n_coef
        stride = -(-(out_col + n_coef) // align) * align
        w_in = torch.zeros(params.d, stride, dtype=dtype, device=device)
        w_in[:, :out_col] = centred.w_in
        w_in[:, out_col:out_col + n_coef] = centred.w_out.T
        w_out = centred.w_out.double()
        mu = centred.mean.double() if centred.has_mean else torch.zeros(params.d, dtype=torch.float64, device=device)
        consts = torch.zeros(ncp + ncp * ncp, dtype=torch.float64, device=device)
        consts[:n_coef] = w_out @ mu
        consts[ncp:].view(ncp, ncp)[:n_coef, :n_coef] = w_out @ w_out.T
        return NormPack(w_in.contiguous(), out_col, consts.float())

    return params._cached_pack(("norm", align), dtype, device, _CAST_BY_PACK_CENTRED, build)


class NormOperands(NamedTuple):
    """What the fused token-mode launch (`steer_kernel.launch_steer`) takes for the norm: the output rows ``y``
    (contiguous ``(N, d)``), the norm's ``weight`` (contiguous ``(d,)``, any float dtype; the kernel scales by it,
    or by ``1 + weight`` with ``unit_offset``), `NormPack`'s ``consts`` and ``out_col``, eps and the rounding
    rule."""

    y: torch.Tensor
    weight: torch.Tensor
    consts: torch.Tensor
    out_col: int
    eps: float
    unit_offset: bool
    weight_in_fp32: bool
