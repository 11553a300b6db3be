"""Public entry points: pick a backend per call and run the op.

Backends: ``torch`` (the reference, any device) and ``triton`` (fused kernels; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``). ``FINESTEER_BACKEND=triton|torch`` forces one.
"""
from __future__ import annotations

import os

import torch

from . import reference
from .params import SteerParams

BACKENDS = ("triton", "torch")


def select_backend(h: torch.Tensor) -> str:
    """The backend that runs for a hidden-state tensor ``h``."""
    forced = os.environ.get("FINESTEER_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"FINESTEER_BACKEND: expected one of {BACKENDS}, got {forced!r}")
    if forced:
        return forced
    return "torch"


def steer(h: torch.Tensor, params: SteerParams) -> torch.Tensor:
    """Token mode: returns ``h`` steered row by row (a new tensor, same shape and dtype)."""
    return reference.steer(h, params)


def steer_(h: torch.Tensor, params: SteerParams) -> torch.Tensor:
    """In-place token mode for hooks; returns ``h``."""
    return reference.steer_(h, params)


def synthesize(h_anchor: torch.Tensor, params: SteerParams) -> torch.Tensor:
    """Query mode step 1: ``(B, d)`` anchor rows -> ``(B, K+k)`` fp32 coefficients."""
    return reference.synthesize(h_anchor, params)


def apply_coef(h: torch.Tensor, coef: torch.Tensor, params: SteerParams, row_to_seq: torch.Tensor) -> torch.Tensor:
    """Query mode step 2: ``h + coef[row_to_seq] @ W_out``; rows mapped to -1 stay as they are."""
    return reference.apply_coef(h, coef, params, row_to_seq)
