"""The bank ops in plain PyTorch: the executable spec of the bank kernels.

A row assigned to steerer ``s`` gets exactly the single-steerer op (`reference`) with ``bank.params[s]``; a row
assigned ``-1`` comes back unchanged; an index outside ``[-1, S)`` gives a NaN row (raising would need a host read
of the index). Readable on purpose: every steerer is applied to every row and `torch.where` keeps the assigned
result, so nothing depends on the index's values on the host.
"""
from __future__ import annotations

import torch

from . import reference
from .bank import SteerBank, group_of


def steer_bank(h: torch.Tensor, bank: SteerBank, index: torch.Tensor) -> torch.Tensor:
    """Token mode: row ``i`` of ``h`` (``(..., d)``) steered by ``bank.params[index[i]]``; a new tensor."""
    rows = h.reshape(-1, bank.d)
    groups = group_of(index.reshape(-1), len(bank))[:, None]
    out = rows
    for s, p in enumerate(bank.params):
        out = torch.where(groups == s + 1, reference.steer(rows, p), out)
    out = torch.where(groups == len(bank) + 1, torch.full_like(rows, float("nan")), out)
    return out.reshape(h.shape)


def synthesize_bank(h_anchor: torch.Tensor, bank: SteerBank, index: torch.Tensor) -> torch.Tensor:
    """Query mode step 1: ``(B, d)`` anchor rows -> ``(B, bank.n_coef)`` fp32; row ``b`` holds the K + k coefficients
    of steerer ``index[b]`` then zeros; zeros for -1."""
    groups = group_of(index.reshape(-1), len(bank))[:, None]
    coef = h_anchor.new_zeros(h_anchor.shape[0], bank.n_coef, dtype=torch.float32)
    for s, p in enumerate(bank.params):
        own = torch.nn.functional.pad(reference.synthesize(h_anchor, p), (0, bank.n_coef - p.n_coef))
        coef = torch.where(groups == s + 1, own, coef)
    return torch.where(groups == len(bank) + 1, float("nan"), coef)


def bank_coef_delta(coef: torch.Tensor, bank: SteerBank, index: torch.Tensor) -> torch.Tensor:
    """Query mode: ``delta[b] = coef[b, :K_s + k_s] @ W_out_s`` for ``s = index[b]`` as fp32 ``(B, d)``; zeros for -1."""
    groups = group_of(index.reshape(-1), len(bank))[:, None]
    delta = coef.new_zeros(coef.shape[0], bank.d, dtype=torch.float32)
    for s, p in enumerate(bank.params):
        delta = torch.where(groups == s + 1, coef[:, :p.n_coef].float() @ reference.output_basis(p), delta)
    return torch.where(groups == len(bank) + 1, float("nan"), delta)
