"""The implementations of the steering op that are compared.

- ``reference``: `finesteer_kernels.reference`, the readable eager spec (unpacked weights, ~a dozen kernels).
- ``frugal``: the fair eager baseline: one matmul of ``h`` with the packed ``W_in``, a small fp32 epilogue on the
  ``(T, n_in)`` projections, and one ``addmm`` with ``W_out`` (see `frugal_coefficients`).
- ``compiled``: ``torch.compile`` of the reference (dynamic shapes, so one compile serves every T > 1).
- ``triton``: the public ops with ``FINESTEER_BACKEND=triton`` (the fused kernels on CUDA tensors; on CPU they run
  under the Triton interpreter, which is for correctness only and never timed).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

import finesteer_kernels
from finesteer_kernels import SteerParams, reference
from finesteer_kernels.validation import check_coef, check_hidden, check_row_to_seq

IMPLEMENTATIONS = ("reference", "frugal", "compiled", "triton")


@contextlib.contextmanager
def forced_backend(name: str):
    """Run the public ops on one backend (``FINESTEER_BACKEND``), restoring the previous setting after."""
    previous = os.environ.get("FINESTEER_BACKEND")
    os.environ["FINESTEER_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("FINESTEER_BACKEND", None)
        else:
            os.environ["FINESTEER_BACKEND"] = previous


# ---- byte-frugal eager ------------------------------------------------------------------------------------------
def frugal_coefficients(x: torch.Tensor, params: SteerParams) -> torch.Tensor:
    """``(N, d)`` rows -> ``(N, K+k)`` fp32 coefficients from ONE matmul with the packed ``W_in``.

    The centred gate comes from uncentred sums: ``S^T(h-mu) = S^T h - S^T mu`` and
    ``||h-mu||^2 = ||h||^2 - 2 h.mu + ||mu||^2`` (the constants live in ``pack().consts``).
    """
    packed = params.pack(dtype=x.dtype, device=x.device)
    proj = (x @ packed.w_in).float()
    consts = packed.consts
    rows = x.shape[0]
    if packed.has_router:
        logits = proj[:, packed.router_col:packed.router_col + packed.num_experts]
        bias = consts[packed.router_bias_off:packed.router_bias_off + packed.num_experts]
        coef = torch.softmax(logits + bias, dim=-1)
    else:
        coef = proj.new_ones(rows, 1)
    if packed.k:
        m, k = packed.m, packed.k
        hidden = proj[:, packed.res_col:packed.res_col + m] + consts[packed.res_in_bias_off:packed.res_in_bias_off + m]
        if params.activation == "relu":
            hidden = torch.relu(hidden)
        w2 = consts[packed.res_out_weight_off:packed.res_out_weight_off + k * m].view(k, m)
        b2 = consts[packed.res_out_bias_off:packed.res_out_bias_off + k]
        coef = torch.cat([coef, torch.addmm(b2, hidden, w2.T)], dim=-1)
    scale = params.alpha * params.gamma
    if packed.has_gate:
        r = packed.r
        inside = (proj[:, :r] - consts[packed.s_mu_off:packed.s_mu_off + r]).square().sum(-1)
        norm_sq = x.float().square().sum(-1)
        energy = (norm_sq - 2 * proj[:, packed.mean_col] + consts[packed.mu_sq_off]).clamp_min(params.eps)
        return coef * (scale * (inside / energy >= params.tau).float())[:, None]
    return coef * scale


def frugal_steer(h: torch.Tensor, params: SteerParams) -> torch.Tensor:
    check_hidden(h, params)
    x = h.reshape(-1, params.d)
    w_out = params.pack(dtype=h.dtype, device=h.device).w_out
    coef = frugal_coefficients(x, params).to(h.dtype)
    return torch.addmm(x, coef, w_out).reshape(h.shape)


def frugal_apply(h: torch.Tensor, coef: torch.Tensor, params: SteerParams, row_to_seq: torch.Tensor) -> torch.Tensor:
    """``h + coef[row_to_seq] @ W_out`` as one gather and one ``addmm``; rows mapped to -1 get a zero row."""
    check_hidden(h, params)
    check_coef(coef, params, h.device)
    seq = check_row_to_seq(row_to_seq, h).reshape(-1)
    x = h.reshape(-1, params.d)
    w_out = params.pack(dtype=h.dtype, device=h.device).w_out
    padded = torch.cat([coef.to(h.dtype), coef.new_zeros(1, coef.shape[1], dtype=h.dtype)])  # row -1 -> zeros
    return torch.addmm(x, padded[seq], w_out).reshape(h.shape)


def _allow_recompiles() -> None:
    """Every (width, residual) case and T = 1 compiles its own graph of the same code; past dynamo's default limit
    of 8 it would silently run the rest eagerly and the 'compiled' rows would time eager code. Raise the limit,
    and make hitting it an error rather than a silent fallback."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 64)
    config.fail_on_recompile_limit_hit = True


# ---- the table of callables --------------------------------------------------------------------------------------
_EAGER = {
    ("reference", "steer"): reference.steer,
    ("reference", "apply"): reference.apply_coef,
    ("frugal", "steer"): frugal_steer,
    ("frugal", "apply"): frugal_apply,
}


def op_function(impl: str, op: str, compile_backend: str = "inductor") -> Callable:
    """``fn(params, **inputs)`` for one implementation of one op (``steer`` or ``apply``)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl: expected one of {IMPLEMENTATIONS}, got {impl!r}")
    if op not in ("steer", "apply"):
        raise ValueError(f"op: expected 'steer' or 'apply', got {op!r}")
    if impl in ("reference", "frugal"):
        eager = _EAGER[(impl, op)]
        if op == "steer":
            return lambda params, h: eager(h, params)
        return lambda params, h, coef, row_to_seq: eager(h, coef, params, row_to_seq)
    if impl == "compiled":
        _allow_recompiles()
        ref = _EAGER[("reference", op)]
        if op == "steer":
            fn = torch.compile(lambda h, params: ref(h, params), dynamic=True, backend=compile_backend)
            return lambda params, h: fn(h, params)
        fn = torch.compile(lambda h, coef, params, row_to_seq: ref(h, coef, params, row_to_seq), dynamic=True,
                           backend=compile_backend)
        return lambda params, h, coef, row_to_seq: fn(h, coef, params, row_to_seq)

    def triton_op(params, h, coef=None, row_to_seq=None):
        with forced_backend("triton"):
            if op == "steer":
                return finesteer_kernels.steer(h, params)
            return finesteer_kernels.apply_coef(h, coef, params, row_to_seq)

    return triton_op


def backend_for(impl: str, h: torch.Tensor) -> str:
    """The backend that actually runs for ``impl`` (tells a wired Triton path from a fallback to torch)."""
    if impl != "triton":
        return "torch"
    with forced_backend("triton"):
        return finesteer_kernels.select_backend(h)
