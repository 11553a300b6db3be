"""Hot-path input checks: metadata only (shape, dtype, device), never data, so no host synchronisation."""
from __future__ import annotations

import torch

from .params import SteerParams

HIDDEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIGNED_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)  # -1 marks rows to skip


def check_hidden(h: torch.Tensor, params, name: str = "h", ndim: int | None = None) -> None:
    if not isinstance(params, SteerParams):
        raise TypeError(f"params: expected finesteer_kernels.SteerParams, got {type(params).__name__}")
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(h).__name__}")
    if h.dtype not in HIDDEN_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {h.dtype}")
    if ndim is not None and h.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor (rows, d), got shape {tuple(h.shape)}")
    if h.dim() < 1 or h.shape[-1] != params.d:
        raise ValueError(f"{name}: expected shape (..., {params.d}) for a steerer of hidden size {params.d}, "
                         f"got {tuple(h.shape)}")
    if h.device != params.device:
        raise ValueError(f"{name}: on {h.device} but the steering parameters are on {params.device}; "
                         "move them once with params.to(device)")


def check_coef(coef: torch.Tensor, params, device: torch.device) -> None:
    if not isinstance(coef, torch.Tensor) or coef.dim() != 2 or coef.shape[1] != params.n_coef:
        shape = tuple(coef.shape) if isinstance(coef, torch.Tensor) else type(coef).__name__
        raise ValueError(f"coef: expected shape (B, {params.n_coef}) (K + k coefficients per sequence), got {shape}")
    if not coef.is_floating_point():
        raise TypeError(f"coef: expected a floating-point tensor, got {coef.dtype}")
    if coef.device != device:
        raise ValueError(f"coef: on {coef.device}, expected {device}")


def check_row_shape(name: str, t: torch.Tensor, h: torch.Tensor, h_name: str = "h") -> None:
    """A per-row tensor ``t`` (a map or a mask) against the rows of ``h``: shape ``h.shape[:-1]`` or the row
    count, and ``h``'s device."""
    rows = h.numel() // h.shape[-1] if h.shape[-1] else 0
    if tuple(t.shape) not in (tuple(h.shape[:-1]), (rows,)):
        raise ValueError(f"{name}: expected shape {tuple(h.shape[:-1])} or ({rows},) to match {h_name} "
                         f"{tuple(h.shape)}, got {tuple(t.shape)}")
    if t.device != h.device:
        raise ValueError(f"{name}: on {t.device}, expected {h.device}")


def check_row_to_seq(row_to_seq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Returns ``row_to_seq`` as int64; its shape must be ``h.shape[:-1]`` or the flattened row count. Its values
    are not read (that would be a host sync): an index >= B gives a NaN row on both backends."""
    if not isinstance(row_to_seq, torch.Tensor) or row_to_seq.dtype not in SIGNED_INT_DTYPES:
        got = row_to_seq.dtype if isinstance(row_to_seq, torch.Tensor) else type(row_to_seq).__name__
        raise TypeError("row_to_seq: expected an integer tensor of a signed dtype (int8/16/32/64; sequence index "
                        f"per row, -1 to skip), got {got}")
    check_row_shape("row_to_seq", row_to_seq, h)
    return row_to_seq.long()


def check_row_mask(row_mask, h: torch.Tensor):
    """``None`` or a bool tensor of shape ``h.shape[:-1]`` (or the flattened row count); returned flat."""
    if row_mask is None:
        return None
    if not isinstance(row_mask, torch.Tensor) or row_mask.dtype != torch.bool:
        got = row_mask.dtype if isinstance(row_mask, torch.Tensor) else type(row_mask).__name__
        raise TypeError(f"row_mask: expected a bool tensor (True = steer the row, False = leave it), got {got}")
    check_row_shape("row_mask", row_mask, h)
    return row_mask.reshape(-1)


def check_delta(delta: torch.Tensor, h: torch.Tensor, row_to_seq) -> None:
    """``delta`` (``(B, d)`` from `coef_delta`: fp32, or h's dtype) against the rows ``h`` it is added to."""
    if not isinstance(h, torch.Tensor) or h.dtype not in HIDDEN_DTYPES or h.dim() < 1:
        got = h.dtype if isinstance(h, torch.Tensor) else type(h).__name__
        raise TypeError(f"h: expected a float32, float16 or bfloat16 tensor (..., d), got {got}")
    if not isinstance(delta, torch.Tensor) or delta.dim() != 2 or delta.shape[1] != h.shape[-1]:
        shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"delta: expected shape (B, {h.shape[-1]}) (one row per sequence, h's width), got {shape}")
    if delta.dtype not in (torch.float32, h.dtype):
        raise TypeError(f"delta: expected float32 or h's dtype {h.dtype} (from coef_delta), got {delta.dtype}")
    if delta.device != h.device:
        raise ValueError(f"delta: on {delta.device}, expected {h.device}")
    if row_to_seq is None and (h.dim() < 2 or h.shape[0] != delta.shape[0]):
        raise ValueError(f"delta: without row_to_seq, h must be (B, ..., d) with B = {delta.shape[0]} sequences "
                         f"(one delta row each), got h of shape {tuple(h.shape)}")
