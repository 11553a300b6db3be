"""Public entry points: pick a backend per call and run the op.

Backends: ``torch`` (the reference, any device) and ``triton`` (fused kernels; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``). Without ``FINESTEER_BACKEND`` the Triton kernels run wherever they can and the reference
elsewhere; ``FINESTEER_BACKEND=triton|torch`` forces one, and forcing triton where it cannot run raises.

The kernels have no backward: when autograd is on and an input requires grad, the reference runs instead (it is
differentiable). The Triton path goes through the torch.library ops of `custom_ops` (so torch.compile can trace
it). Only metadata (shape, dtype, device, requires_grad, env) is inspected on the way: no host synchronisation.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from . import reference
from .norm import RMSNormParams, pack_steer_norm
from .params import SteerParams
from .validation import check_coef, check_delta, check_hidden, check_row_mask, check_row_to_seq

BACKENDS = ("triton", "torch")


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (import blocked)
        return False


_TRITON_INSTALLED = _triton_installed()


def _triton_problem(h: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot run on ``h``, or None when they can."""
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if h.device.type == "cuda":
        return None
    if h.device.type != "cpu":
        return f"h is on {h.device}; the kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"
    from . import kernel_common  # imports triton; the kernels' interpreter mode is fixed when they are imported

    if not kernel_common.INTERPRETING:
        return ("h is a CPU tensor and the kernels were not built for the Triton interpreter; set "
                "TRITON_INTERPRET=1 before triton is first imported to run them on CPU")
    return None


def _autograd_problem(inputs) -> Optional[str]:
    """Why the kernels cannot serve these inputs because a gradient is wanted, or None."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return ("an input requires grad and the Triton kernels have no backward; run under torch.no_grad() "
                "(or torch.inference_mode()) to use them")
    return None


def select_backend(h: torch.Tensor, *inputs: Optional[torch.Tensor]) -> str:
    """The backend that runs for a hidden-state tensor ``h``: ``"triton"`` or ``"torch"``.

    Gradients: when autograd is on and ``h`` (or another tensor input, e.g. ``coef``) requires grad, the torch
    reference runs, since the kernels have no backward; forcing ``FINESTEER_BACKEND=triton`` then raises.
    """
    forced = os.environ.get("FINESTEER_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"FINESTEER_BACKEND: expected one of {BACKENDS}, got {forced!r}")
    if forced == "torch":
        return "torch"
    problem = _triton_problem(h) or _autograd_problem((h,) + inputs)
    if forced == "triton" and problem:
        raise RuntimeError(f"FINESTEER_BACKEND=triton, but the Triton kernels cannot run: {problem}")
    return "torch" if problem else "triton"


def _writes_in_place(h: torch.Tensor, *inputs: Optional[torch.Tensor]) -> bool:
    """Whether an in-place form can hand ``h`` itself to a kernel: the Triton backend and rows viewable as
    ``(N, d)``. Otherwise it computes out of place and copies back."""
    return select_backend(h, *inputs) == "triton" and h.is_contiguous()


def _kernel_args(h: torch.Tensor, params: SteerParams):
    """The custom ops' packed operands for ``h``'s dtype and device (packing is cached on ``params``)."""
    from . import custom_ops  # noqa: F401  (registers the torch.ops.finesteer ops)
    from .kernel_common import layout_of
    from .perf_model import W_IN_ALIGN

    packed = params.pack_centred(h.dtype, h.device, W_IN_ALIGN)
    return packed, list(layout_of(packed, params.activation))


def steer(h: torch.Tensor, params: SteerParams, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token mode: returns ``h`` steered row by row (a new tensor, same shape and dtype).

    ``row_mask`` (optional, keyword): a bool tensor of shape ``h.shape[:-1]`` (or the row count); rows marked False
    come back unchanged (e.g. padding), in the same single launch.
    """
    check_hidden(h, params)
    keep = check_row_mask(row_mask, h)
    if select_backend(h) == "torch":
        return reference.steer(h, params, row_mask)
    packed, layout = _kernel_args(h, params)
    rows = h.reshape(-1, params.d).contiguous()
    out = torch.ops.finesteer.steer(rows, packed.w_in, packed.w_out, packed.mean, packed.consts, layout,
                                    params.tau, params.eps, params.alpha * params.gamma,
                                    None if keep is None else keep.contiguous())
    return out.view(h.shape)


def steer_(h: torch.Tensor, params: SteerParams, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In-place token mode for hooks; returns ``h``. The kernel leaves rows whose gate is off (and rows that
    ``row_mask`` marks False) unwritten."""
    check_hidden(h, params)
    keep = check_row_mask(row_mask, h)
    if not _writes_in_place(h):
        return h.copy_(steer(h, params, row_mask))
    packed, layout = _kernel_args(h, params)
    torch.ops.finesteer.steer_(h.view(-1, params.d), packed.w_in, packed.w_out, packed.mean, packed.consts, layout,
                               params.tau, params.eps, params.alpha * params.gamma,
                               None if keep is None else keep.contiguous())
    return h


def synthesize(h_anchor: torch.Tensor, params: SteerParams) -> torch.Tensor:
    """Query mode step 1: ``(B, d)`` anchor rows -> ``(B, K+k)`` fp32 coefficients."""
    check_hidden(h_anchor, params, name="h_anchor", ndim=2)
    if select_backend(h_anchor) == "torch":
        return reference.synthesize(h_anchor, params)
    packed, layout = _kernel_args(h_anchor, params)
    return torch.ops.finesteer.synthesize(h_anchor.contiguous(), packed.w_in, packed.mean, packed.consts, layout,
                                          params.tau, params.eps, params.alpha * params.gamma)


def _apply_operands(h: torch.Tensor, coef: torch.Tensor, params: SteerParams, row_to_seq: torch.Tensor):
    """fp32 contiguous ``coef`` and flat int64 ``row_to_seq``, checked (``h`` already is)."""
    check_coef(coef, params, h.device)
    seq = check_row_to_seq(row_to_seq, h).reshape(-1).contiguous()
    return coef.float().contiguous(), seq


def apply_coef(h: torch.Tensor, coef: torch.Tensor, params: SteerParams, row_to_seq: torch.Tensor) -> torch.Tensor:
    """Query mode step 2: ``h + coef[row_to_seq] @ W_out``; rows mapped to -1 stay as they are.

    A ``row_to_seq`` entry >= B cannot raise without a host sync: on both backends its row becomes NaN.
    """
    check_hidden(h, params)
    check_coef(coef, params, h.device)  # before select_backend reads coef.requires_grad
    if select_backend(h, coef) == "torch":
        return reference.apply_coef(h, coef, params, row_to_seq)
    coef32, seq = _apply_operands(h, coef, params, row_to_seq)
    packed, _ = _kernel_args(h, params)
    out = torch.ops.finesteer.apply_coef(h.reshape(-1, params.d).contiguous(), coef32, seq, packed.w_out)
    return out.view(h.shape)


def apply_coef_(h: torch.Tensor, coef: torch.Tensor, params: SteerParams, row_to_seq: torch.Tensor) -> torch.Tensor:
    """In-place `apply_coef` for hooks; returns ``h``. Rows mapped to -1 are not written."""
    check_hidden(h, params)
    check_coef(coef, params, h.device)
    if not _writes_in_place(h, coef):
        return h.copy_(apply_coef(h, coef, params, row_to_seq))
    coef32, seq = _apply_operands(h, coef, params, row_to_seq)
    packed, _ = _kernel_args(h, params)
    torch.ops.finesteer.apply_coef_(h.view(-1, params.d), coef32, seq, packed.w_out)
    return h


def coef_delta(coef: torch.Tensor, params: SteerParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Query mode: the per-sequence edit ``coef @ W_out`` as ``(B, d)``, computed in fp32 from the fp32 weights and
    stored in ``dtype`` (fp32, or the activation dtype: a decode step then reads 2 bytes per element of delta
    instead of 4, and adds it in fp32 all the same). Computed once per prefill; each decode step then adds it with
    `apply_delta_` (one launch, no dot)."""
    check_coef(coef, params, coef.device)
    return (coef.float() @ params.pack_centred(torch.float32, coef.device).w_out).to(dtype)  # fp32 W_out, cached


def _delta_operands(h: torch.Tensor, delta: torch.Tensor, row_to_seq: Optional[torch.Tensor]):
    """(flat int64 row_to_seq or None, rows per sequence) for the delta ops; ``h`` and ``delta`` checked."""
    from . import custom_ops  # noqa: F401  (registers the torch.ops.finesteer ops)

    check_delta(delta, h, row_to_seq)
    if row_to_seq is None:
        return None, (h.numel() // h.shape[-1]) // max(delta.shape[0], 1)
    return check_row_to_seq(row_to_seq, h).reshape(-1).contiguous(), 1


def apply_delta(h: torch.Tensor, delta: torch.Tensor, row_to_seq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Query mode at decode: ``h + delta[seq]`` (``delta`` from `coef_delta`). ``row_to_seq`` None: ``h`` is
    ``(B, ..., d)`` and every row of ``h[b]`` gets ``delta[b]``; else per row as in `apply_coef` (-1: unchanged;
    on both backends an index >= B gives a NaN row)."""
    if select_backend(h, delta) == "torch":
        return reference.apply_delta(h, delta, row_to_seq)
    seq, per_seq = _delta_operands(h, delta, row_to_seq)
    return torch.ops.finesteer.apply_delta(h.contiguous(), delta.contiguous(), seq, per_seq)


def apply_delta_(h: torch.Tensor, delta: torch.Tensor, row_to_seq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In-place `apply_delta` for hooks; returns ``h``. One op: the Triton kernel, or on the torch backend (no map)
    one in-place add."""
    if select_backend(h, delta) == "torch":
        return reference.apply_delta_(h, delta, row_to_seq)
    if not h.is_contiguous():
        return h.copy_(apply_delta(h, delta, row_to_seq))
    seq, per_seq = _delta_operands(h, delta, row_to_seq)
    torch.ops.finesteer.apply_delta_(h, delta.contiguous(), seq, per_seq)
    return h


# ---- steerer banks: a different steerer per row (docs/serving.md) ------------------------------------------------
def _bank_kernel_args(h: torch.Tensor, bank, index: torch.Tensor, plan):
    from . import custom_ops  # noqa: F401  (registers the torch.ops.finesteer ops)
    from .bank import check_plan, plan_rows

    check_plan(plan, index.numel(), bank)
    plan = plan or plan_rows(index, len(bank))
    packed = bank.pack(h.dtype, h.device)
    return plan, packed, list(packed.layout)


def _bank_operands(packed):
    return packed.w_in, packed.w_out, packed.mean, packed.consts, packed.meta, packed.scalars


def steer_bank(h: torch.Tensor, bank, index: torch.Tensor, plan=None) -> torch.Tensor:
    """Token mode over a mixed batch: row ``i`` of ``h`` (``(..., d)``) steered by ``bank.params[index[i]]``, rows
    with index -1 unchanged, one launch. ``index``: signed ints, ``h.shape[:-1]`` or flat; ``plan``: an optional
    `bank.plan_rows(index, len(bank))` to reuse across layers. An index outside ``[-1, S)`` gives a NaN row."""
    from . import bank_reference
    from .bank import check_bank_rows

    index = check_bank_rows(h, bank, index)
    if select_backend(h) == "torch":
        return bank_reference.steer_bank(h, bank, index)
    plan, packed, layout = _bank_kernel_args(h, bank, index, plan)
    out = torch.ops.finesteer.steer_bank(h.reshape(-1, bank.d).contiguous(), plan.order, plan.counts,
                                         *_bank_operands(packed), layout)
    return out.view(h.shape)


def steer_bank_(h: torch.Tensor, bank, index: torch.Tensor, plan=None) -> torch.Tensor:
    """In-place `steer_bank` for hooks; returns ``h``. Rows with index -1 and rows whose gate is off are not
    written."""
    from .bank import check_bank_rows

    index = check_bank_rows(h, bank, index)
    if not _writes_in_place(h):
        return h.copy_(steer_bank(h, bank, index, plan))
    plan, packed, layout = _bank_kernel_args(h, bank, index, plan)
    torch.ops.finesteer.steer_bank_(h.view(-1, bank.d), plan.order, plan.counts, *_bank_operands(packed), layout)
    return h


def synthesize_bank(h_anchor: torch.Tensor, bank, index: torch.Tensor, plan=None) -> torch.Tensor:
    """Query mode step 1 over a mixed batch: ``(B, d)`` anchor rows -> ``(B, bank.n_coef)`` fp32, row ``b`` the
    K + k coefficients of steerer ``index[b]`` (zero-padded to the bank's widest), zeros for -1."""
    from . import bank_reference
    from .bank import check_bank_rows

    index = check_bank_rows(h_anchor, bank, index, name="h_anchor", ndim=2)
    if select_backend(h_anchor) == "torch":
        return bank_reference.synthesize_bank(h_anchor, bank, index)
    plan, packed, layout = _bank_kernel_args(h_anchor, bank, index, plan)
    w_in, _, mean, consts, meta, scalars = _bank_operands(packed)
    return torch.ops.finesteer.synthesize_bank(h_anchor.contiguous(), plan.order, plan.counts, w_in, mean, consts,
                                               meta, scalars, layout)


def bank_coef_delta(coef: torch.Tensor, bank, index: torch.Tensor) -> torch.Tensor:
    """Query mode: each sequence's edit ``coef[b, :K_s + k_s] @ W_out_s`` (``s = index[b]``) as fp32 ``(B, d)``,
    zeros for -1; one matmul with the bank's fp32 W_out (the coefficients scattered to their steerer's rows). The
    decode step then adds it with `apply_delta_` as for a single steerer."""
    from .bank import SteerBank, group_of

    if not isinstance(bank, SteerBank):
        raise TypeError(f"bank: expected finesteer_kernels.SteerBank, got {type(bank).__name__}")
    if not isinstance(coef, torch.Tensor) or coef.dim() != 2 or coef.shape[1] != bank.n_coef:
        shape = tuple(coef.shape) if isinstance(coef, torch.Tensor) else type(coef).__name__
        raise ValueError(f"coef: expected shape (B, {bank.n_coef}) (from synthesize_bank), got {shape}")
    if not isinstance(index, torch.Tensor) or index.reshape(-1).shape != (coef.shape[0],):
        raise ValueError(f"index: expected one bank index per coefficient row ({coef.shape[0]})")
    packed = bank.pack(torch.float32, coef.device)
    groups = group_of(index.reshape(-1), len(bank))
    steerer = (groups - 1).clamp(0, len(bank) - 1)
    j = torch.arange(bank.n_coef, device=coef.device)
    total = packed.w_out.shape[0]
    live = ((groups >= 1) & (groups <= len(bank)))[:, None] & (j < packed.n_coef[steerer][:, None])
    cols = torch.where(live, packed.out_off[steerer][:, None] + j, total)  # dead entries go to a spare column
    wide = coef.new_zeros(coef.shape[0], total + 1, dtype=torch.float32)
    wide.scatter_(1, cols, torch.where(live, coef.float(), 0.0))
    delta = wide[:, :total] @ packed.w_out
    return torch.where((groups == len(bank) + 1)[:, None], float("nan"), delta)


# ---- fused with the next RMSNorm (issue 14): the edit and the norm that reads it, in one launch ------------------
def _check_norm(norm: RMSNormParams, h: torch.Tensor) -> None:
    if not isinstance(norm, RMSNormParams):
        raise TypeError(f"norm: expected finesteer_kernels.RMSNormParams, got {type(norm).__name__}")
    norm.check(h)


def _norm_args(h: torch.Tensor, norm: RMSNormParams) -> tuple:
    """The fused ops' norm operands: the module's weight itself (read by the kernel at every call, so it follows the
    module across devices and edits), eps, the offset and rounding rules, the output dtype."""
    return norm.weight.contiguous(), norm.eps, norm.unit_offset, norm.weight_in_fp32, norm.out_dtype(h.dtype)


def _steer_norm_args(h: torch.Tensor, params: SteerParams, norm: RMSNormParams, keep) -> tuple:
    """The fused token-mode op's operands after ``h``: the centred pack with the fused ``W_in`` and layout."""
    from .kernel_common import Layout

    packed, layout = _kernel_args(h, params)
    fused = pack_steer_norm(params, h.dtype, h.device)
    layout = list(Layout(*layout)._replace(W_IN_STRIDE=fused.w_in.shape[1]))
    weight, eps, unit_offset, weight_in_fp32, y_dtype = _norm_args(h, norm)
    return (fused.w_in, packed.w_out, packed.mean, packed.consts, layout, params.tau, params.eps,
            params.alpha * params.gamma, None if keep is None else keep.contiguous(), weight, fused.consts,
            fused.out_col, eps, unit_offset, weight_in_fp32, y_dtype)


def steer_rmsnorm(h: torch.Tensor, params: SteerParams, norm: RMSNormParams,
                  row_mask: Optional[torch.Tensor] = None) -> tuple:
    """Token mode fused with the RMSNorm that reads the steered rows next: ``(steered, normed)``, where
    ``normed = norm(steered)`` for every row (rows ``row_mask`` leaves unsteered are normalised too)."""
    check_hidden(h, params)
    _check_norm(norm, h)
    keep = check_row_mask(row_mask, h)
    if select_backend(h, norm.weight) == "torch":
        return reference.steer_rmsnorm(h, params, norm, row_mask)
    args = _steer_norm_args(h, params, norm, keep)  # registers the custom ops on first use
    out, y = torch.ops.finesteer.steer_rmsnorm(h.reshape(-1, params.d).contiguous(), *args)
    return out.view(h.shape), y.view(h.shape)


def steer_rmsnorm_(h: torch.Tensor, params: SteerParams, norm: RMSNormParams,
                   row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In-place `steer_rmsnorm`: steers ``h`` (rows whose gate is off are not written) and returns the normalised
    rows. In a pre-norm decoder this replaces the next layer's input norm: the residual it later adds to is ``h``
    itself, edited."""
    check_hidden(h, params)
    _check_norm(norm, h)
    keep = check_row_mask(row_mask, h)
    if not _writes_in_place(h, norm.weight):
        steered, y = steer_rmsnorm(h, params, norm, row_mask)
        h.copy_(steered)
        return y
    args = _steer_norm_args(h, params, norm, keep)
    return torch.ops.finesteer.steer_rmsnorm_(h.view(-1, params.d), *args).view(h.shape)


def apply_delta_rmsnorm(h: torch.Tensor, delta: torch.Tensor, norm: RMSNormParams,
                        row_to_seq: Optional[torch.Tensor] = None) -> tuple:
    """Query mode fused with the next RMSNorm: ``(h + delta[seq], norm(h + delta[seq]))``; ``delta`` and
    ``row_to_seq`` as in `apply_delta` (rows mapped to -1 are not edited but are normalised)."""
    _check_norm(norm, h)
    if select_backend(h, delta, norm.weight) == "torch":
        return reference.apply_delta_rmsnorm(h, delta, norm, row_to_seq)
    seq, per_seq = _delta_operands(h, delta, row_to_seq)
    return torch.ops.finesteer.apply_delta_rmsnorm(h.contiguous(), delta.contiguous(), seq, per_seq,
                                                   *_norm_args(h, norm))


def apply_delta_rmsnorm_(h: torch.Tensor, delta: torch.Tensor, norm: RMSNormParams,
                         row_to_seq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In-place `apply_delta_rmsnorm`: edits ``h`` and returns the normalised rows. The query-mode decode step of a
    steered layer whose next norm is fused: one op (the Triton kernel) in place of the edit and the norm."""
    _check_norm(norm, h)
    if select_backend(h, delta, norm.weight) == "torch":
        return reference.apply_delta_rmsnorm_(h, delta, norm, row_to_seq)
    if not h.is_contiguous():
        steered, y = apply_delta_rmsnorm(h, delta, norm, row_to_seq)
        h.copy_(steered)
        return y
    seq, per_seq = _delta_operands(h, delta, row_to_seq)
    return torch.ops.finesteer.apply_delta_rmsnorm_(h, delta.contiguous(), seq, per_seq, *_norm_args(h, norm))
