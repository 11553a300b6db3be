"""The steering op in plain PyTorch: the executable spec every kernel is tested against.

Readable on purpose: it works from the unpacked `SteerParams`, accumulates in fp32 whatever the input dtype, and
returns the input dtype. Needs no GPU and no triton.
"""
from __future__ import annotations

import torch

from .norm import RMSNormParams
from .params import SteerParams
from .validation import check_coef, check_delta, check_hidden, check_row_mask, check_row_to_seq


# Smallest scale the gate divides a row by: below it a row is scaled by this floor instead, so 1 / scale stays finite
# and only subnormal entries (whose squares underflow anyway) are lost.
GATE_SCALE_FLOOR = 2.0 ** -64


def gate(h32: torch.Tensor, p: SteerParams) -> torch.Tensor:
    """``(N, d)`` fp32 -> ``(N,)`` fp32 in {0, 1}: energy ratio of the centred row inside span(S) >= tau.

    The ratio is formed on the row divided by its largest centred entry, ``||S^T u||^2 / max(||u||^2, eps / m^2)``
    with ``u = (h - mu) / m``: the same number as ``||S^T(h-mu)||^2 / max(||h-mu||^2, eps)``, but no finite row
    overflows fp32 (the plain squared norm does from entries of ~1e19: inf / inf = NaN, which closed the gate). The
    kernels reach the same number another way (`coef_tile.gate_open`)."""
    if p.basis is None:
        return h32.new_ones(h32.shape[0])
    centred = h32 - p.mean.float() if p.mean is not None else h32
    inv = 1.0 / centred.abs().amax(-1, keepdim=True).clamp_min(GATE_SCALE_FLOOR)
    unit = centred * inv
    inside = (unit @ p.basis.float()).square().sum(-1)
    energy = torch.maximum(unit.square().sum(-1), p.eps * inv[:, 0] * inv[:, 0])
    return (inside / energy >= p.tau).float()


def coefficients(h32: torch.Tensor, p: SteerParams) -> torch.Tensor:
    """``(N, d)`` fp32 -> ``(N, K+k)`` fp32: router weights then residual coefficients, times alpha*gamma, for the
    rows whose gate is on; exactly 0 for the others (selected, not multiplied by the gate: an overflowing router or
    MLP would give inf * 0 = NaN)."""
    return _coefficients_and_gate(h32, p)[0]


def _coefficients_and_gate(h32: torch.Tensor, p: SteerParams) -> tuple:
    """``(coef, open)``: `coefficients` and the ``(N,)`` bool gate."""
    if p.num_experts == 1:
        weights = h32.new_ones(h32.shape[0], 1)
    else:
        logits = h32 @ p.router_weight.float()
        if p.router_bias is not None:
            logits = logits + p.router_bias.float()
        weights = torch.softmax(logits, dim=-1)
    if p.has_residual:
        hidden = h32 @ p.res_in_weight.float().T
        if p.res_in_bias is not None:
            hidden = hidden + p.res_in_bias.float()
        if p.activation == "relu":
            hidden = torch.relu(hidden)
        beta = hidden @ p.res_out_weight.float().T
        if p.res_out_bias is not None:
            beta = beta + p.res_out_bias.float()
        weights = torch.cat([weights, beta], dim=-1)
    open_ = gate(h32, p) > 0
    return torch.where(open_[:, None], weights * (p.alpha * p.gamma), 0.0), open_


def output_basis(p: SteerParams) -> torch.Tensor:
    """``(K+k, d)`` fp32: the experts, then the residual basis rows."""
    rows = [p.experts] + ([p.res_basis] if p.has_residual else [])
    return torch.cat(rows, dim=0).float()


def steer(h: torch.Tensor, params: SteerParams, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token mode: every row of ``h`` (``(..., d)``) gates and routes on itself; returns a new tensor.

    ``row_mask`` (optional bool, shape ``h.shape[:-1]`` or the row count): rows marked False come back unchanged
    (padding)."""
    check_hidden(h, params)
    keep = check_row_mask(row_mask, h)
    rows = h.reshape(-1, params.d)
    h32 = rows.float()
    coef, edit = _coefficients_and_gate(h32, params)
    out = (h32 + coef @ output_basis(params)).to(h.dtype)
    if keep is not None:
        edit = edit & keep
    return torch.where(edit[:, None], out, rows).reshape(h.shape)  # rows left alone keep their bits (-0.0 too)


def steer_(h: torch.Tensor, params: SteerParams, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """In-place `steer` (for hooks); returns ``h``."""
    return h.copy_(steer(h, params, row_mask))


def synthesize(h_anchor: torch.Tensor, params: SteerParams) -> torch.Tensor:
    """Query mode, step 1: anchor rows ``(B, d)`` -> ``(B, K+k)`` fp32 coefficients, gate and scale folded in."""
    check_hidden(h_anchor, params, name="h_anchor", ndim=2)
    return coefficients(h_anchor.float(), params)


def apply_coef(h: torch.Tensor, coef: torch.Tensor, params: SteerParams,
               row_to_seq: torch.Tensor) -> torch.Tensor:
    """Query mode, step 2: ``h + coef[row_to_seq] @ W_out``; rows mapped to a negative index are returned unchanged.

    ``row_to_seq`` has the leading shape of ``h`` (or is its flattening) and holds, per row, the index of its
    sequence in ``coef`` (``(B, K+k)``), or -1 for rows to leave alone (padding). An index >= B makes its row NaN,
    as in the kernel: raising would need a host read of ``row_to_seq``.
    """
    check_hidden(h, params)
    check_coef(coef, params, h.device)
    seq = check_row_to_seq(row_to_seq, h).reshape(-1)
    h32 = h.reshape(-1, params.d).float()
    out = h32 + _per_row(coef, seq) @ output_basis(params)
    out = torch.where((seq >= 0)[:, None], out.to(h.dtype), h.reshape(-1, params.d))
    return out.reshape(h.shape)


def _per_row(table: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """fp32 ``table[seq]`` (``table`` ``(B, n)``, one row per sequence) with the kernels' rule for the indices that
    pick no row: zeros for a negative index (a row left alone), NaN for one >= B (outside the table: it cannot
    raise without a host read)."""
    batch, n = table.shape
    # after the B rows: a zero row (index B), even when B == 0, and a NaN row (index B + 1)
    extended = torch.cat([table.float(), table.new_zeros(1, n, dtype=torch.float32),
                          table.new_full((1, n), float("nan"), dtype=torch.float32)])
    return extended[torch.where(seq < 0, batch, torch.where(seq >= batch, batch + 1, seq))]


def coef_delta(coef: torch.Tensor, params: SteerParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Query mode, the per-sequence edit: ``coef @ W_out`` in fp32, returned as ``(B, d)`` in ``dtype`` (fp32 or
    the activation dtype); computed once at prefill, a decode step then only adds it (`apply_delta`, in fp32)."""
    check_coef(coef, params, coef.device)
    return (coef.float() @ output_basis(params).to(coef.device)).to(dtype)


def _delta_rows(h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` viewed to broadcast over ``h`` (``(B, ..., d)``): row ``b`` of delta for every row of ``h[b]``."""
    return delta.view(delta.shape[0], *([1] * (h.dim() - 2)), delta.shape[1])


def apply_delta(h: torch.Tensor, delta: torch.Tensor, row_to_seq: torch.Tensor | None = None) -> torch.Tensor:
    """Query mode at decode: ``h + delta[seq]`` in fp32, returned in h's dtype.

    ``row_to_seq`` None: ``h`` is ``(B, ..., d)`` and every row of ``h[b]`` gets ``delta[b]``; else as in
    `apply_coef` (per row, the index of its sequence, -1 to leave the row alone, an index >= B gives a NaN row)."""
    check_delta(delta, h, row_to_seq)
    if row_to_seq is None:
        return (h.float() + _delta_rows(h, delta.float())).to(h.dtype)
    seq = check_row_to_seq(row_to_seq, h).reshape(-1)
    rows = h.reshape(-1, h.shape[-1])
    out = (rows.float() + _per_row(delta, seq)).to(h.dtype)
    return torch.where((seq >= 0)[:, None], out, rows).reshape(h.shape)


def apply_delta_(h: torch.Tensor, delta: torch.Tensor, row_to_seq: torch.Tensor | None = None) -> torch.Tensor:
    """In-place `apply_delta`; returns ``h``. Without ``row_to_seq`` it is one add (the CPU decode step)."""
    if row_to_seq is None:
        check_delta(delta, h, None)
        return h.add_(_delta_rows(h, delta))  # computed in fp32 (type promotion), stored in h's dtype
    return h.copy_(apply_delta(h, delta, row_to_seq))


# ---- fused with the next RMSNorm (issue 14): the edit, then the model's own norm ----------------------------------
def rms_norm(x: torch.Tensor, norm: RMSNormParams) -> torch.Tensor:
    """RMSNorm as transformers' modules write it, fp32 statistics: Llama-style rounds the normalised row to x's
    dtype and scales by the weight in the weight's dtype; ``weight_in_fp32`` (Gemma, OLMo2) scales in fp32 and
    rounds last; ``unit_offset`` (Gemma) scales by ``1 + weight``."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)
    if norm.weight_in_fp32:
        scale = 1.0 + norm.weight.float() if norm.unit_offset else norm.weight.float()
        return (normed * scale).to(x.dtype)
    scale = 1.0 + norm.weight if norm.unit_offset else norm.weight
    return scale * normed.to(x.dtype)


def steer_rmsnorm(h: torch.Tensor, params: SteerParams, norm: RMSNormParams,
                  row_mask: torch.Tensor | None = None) -> tuple:
    """Token mode, then the norm of the steered rows: ``(steer(h), rms_norm(steer(h)))``."""
    norm.check(h)
    steered = steer(h, params, row_mask)
    return steered, rms_norm(steered, norm)


def steer_rmsnorm_(h: torch.Tensor, params: SteerParams, norm: RMSNormParams,
                   row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`steer_` on ``h`` in place, then returns ``rms_norm(h)``."""
    norm.check(h)
    return rms_norm(steer_(h, params, row_mask), norm)


def apply_delta_rmsnorm(h: torch.Tensor, delta: torch.Tensor, norm: RMSNormParams,
                        row_to_seq: torch.Tensor | None = None) -> tuple:
    """Query mode, then the norm: ``(apply_delta(h), rms_norm(apply_delta(h)))``; rows mapped to -1 are not
    edited but are normalised."""
    norm.check(h)
    steered = apply_delta(h, delta, row_to_seq)
    return steered, rms_norm(steered, norm)


def apply_delta_rmsnorm_(h: torch.Tensor, delta: torch.Tensor, norm: RMSNormParams,
                         row_to_seq: torch.Tensor | None = None) -> torch.Tensor:
    """`apply_delta_` on ``h`` in place, then returns ``rms_norm(h)``."""
    norm.check(h)
    return rms_norm(apply_delta_(h, delta, row_to_seq), norm)
