"""`SteerBank`: any number of steerers (different r, K, residual sizes and activations) packed once into one set
of buffers, so that one launch steers a batch whose rows belong to different steerers, or to none.

Packing is by **offsets**, not padding: the steerers' centred packs (`SteerParams.pack_centred`) are concatenated,

* ``w_in``: ``(d, W_IN_STRIDE)`` in the activation dtype, steerer ``s`` in columns ``[col_off_s, col_off_s + cols_s)``
  (``cols_s = max(8, ceil8(r_s + K_s [K_s > 1] + m_s))``, so every offset is a multiple of 8: 16-byte rows), then
  up to 8 zero columns so that the row stride ``W_IN_STRIDE`` is a multiple of 16 (see `BankLayout`);
* ``w_out``: ``(sum_s (K_s + k_s), d)``, steerer ``s`` in rows ``[out_off_s, out_off_s + K_s + k_s)``;
* ``mean``: fp32, one ``d``-vector per steerer whose gate has a mean;
* ``consts``: fp32, each steerer's epilogue constants one after the other;
* ``meta`` (int32, ``S x META_FIELDS``) and ``scalars`` (fp32, ``S x 3``: tau, eps, alpha * gamma): the per-steerer
  sizes and offsets the kernel reads at run time.

Memory of a bank in an activation dtype of ``e`` bytes (`SteerBank.memory_bytes`)::

    sum_s [ d * cols_s * e  +  (K_s + k_s) * d * e  +  4 * d * [s has a mean]  +  4 * |consts_s| ]
        +  d * (W_IN_STRIDE - sum_s cols_s) * e  +  4 * S * (META_FIELDS + 3)

i.e. the sum of the steerers' own packs, at most 8 zero columns and 92 bytes of metadata per steerer; padding every
steerer to the
widest would cost ``S * d * (max_s cols_s + max_s (K_s + k_s)) * e`` instead. The kernels read only the columns and
rows of the steerer a row tile belongs to, so a tile never pays for the other steerers' weights; the price of mixing
is in registers (the accumulator is as wide as the bank's widest steerer) and in one partial row tile per steerer.

Row assignment: a per-row index into the bank, ``-1`` for rows to leave unchanged. `plan_rows` groups the rows by
steerer on the device (a stable sort and a scatter-add, no host synchronisation); the plan depends only on the
index, so a model steered at several layers plans once per forward and every layer reuses it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Optional

import torch

from .params import SteerParams, check_not_capturing
from .perf_model import W_IN_ALIGN, padded, stored_w_in_cols

W_IN_STRIDE_ALIGN = 16  # the bank's W_in row stride: a multiple of 16 elements (the JIT's alignment specialisation)

# columns of the int32 metadata table, one row per steerer (consts offsets are absolute in the bank's consts)
META_NAMES = ("COL_OFF", "COLS", "R", "K", "M", "KR", "HAS_GATE", "HAS_MEAN", "HAS_ROUTER", "RELU", "ROUTER_COL",
              "RES_COL", "RB_OFF", "B1_OFF", "W2_OFF", "B2_OFF", "MEAN_OFF", "OUT_OFF", "NC", "HAS_PASS1")
META = {name: i for i, name in enumerate(META_NAMES)}
META_FIELDS = len(META_NAMES)
SCALAR_FIELDS = 3  # tau, eps, alpha * gamma


class BankLayout(NamedTuple):
    """The bank-wide sizes the bank kernel takes. Only the padded widths and the parts present are compile-time
    constants (NP, MP, NCP, ANY_* and G padded to a power of two); the group count, the coefficient width and W_in's
    stride are run-time arguments, so a bank re-packed with one more steerer no wider than the widest (in powers of
    two), with no part that no steerer had and S + 2 under the same power of two reuses the compiled kernel."""

    G: int  # groups: S steerers + "unsteered" (-1) + "invalid index" (run time)
    NP: int  # accumulator width: the widest steerer's W_in columns, padded to a power of two (>= 16)
    MP: int  # widest residual MLP (m), padded
    NC: int  # widest coefficient row (K + k): the stride of synthesize's output (run time)
    NCP: int  # NC padded
    W_IN_STRIDE: int  # W_in's row stride: all steerers' columns, rounded up to a multiple of 16 (run time)
    ANY_GATE: int
    ANY_ROUTER: int
    ANY_RES: int
    W_IN_COLS: int  # the widest steerer's stored W_in columns: what the launch heuristic counts (not a kernel argument)


class PackedBank(NamedTuple):
    """What the bank kernels read (see the module docstring)."""

    w_in: torch.Tensor
    w_out: torch.Tensor
    mean: torch.Tensor
    consts: torch.Tensor
    meta: torch.Tensor
    scalars: torch.Tensor
    out_off: torch.Tensor  # (S,) int64: first W_out row of each steerer (for `coef_delta`)
    n_coef: torch.Tensor  # (S,) int64: K + k of each steerer
    layout: BankLayout


class BankPlan(NamedTuple):
    """Rows grouped by steerer: ``order`` (N,) int32 row indices sorted by group (stable), ``counts`` (S + 2,) int32
    rows per group; group 0 = unsteered (-1), group s + 1 = steerer s, group S + 1 = an index outside [-1, S)."""

    order: torch.Tensor
    counts: torch.Tensor


def w_in_stride(params) -> int:
    """The bank's W_in row stride: every steerer's stored columns (`SteerParams.pack_centred`), rounded up to a
    multiple of `W_IN_STRIDE_ALIGN`."""
    cols = sum(stored_w_in_cols(p.r, p.num_experts, p.m, W_IN_ALIGN) for p in params)
    return -(-cols // W_IN_STRIDE_ALIGN) * W_IN_STRIDE_ALIGN


class SteerBank:
    """Several `SteerParams` of one hidden size, packed together for mixed batches.

    Args:
        steerers: a sequence of `SteerParams`, or a mapping name -> `SteerParams` (names are then accepted wherever
            an index is, e.g. `index_of`). Row index ``s`` means ``steerers[s]`` (mapping order for a mapping).
    """

    def __init__(self, steerers):
        if isinstance(steerers, SteerBank):
            steerers = dict(zip(steerers.names, steerers.params))
        if isinstance(steerers, Mapping):
            names, params = [str(k) for k in steerers], list(steerers.values())
        elif isinstance(steerers, Sequence) and not isinstance(steerers, (str, bytes)):
            params = list(steerers)
            names = [str(i) for i in range(len(params))]
        else:
            raise TypeError(f"steerers: expected a sequence or a mapping of SteerParams, got {type(steerers).__name__}")
        if not params:
            raise ValueError("steerers: a bank needs at least one steerer")
        for name, p in zip(names, params):
            if not isinstance(p, SteerParams):
                raise TypeError(f"steerers[{name!r}]: expected finesteer_kernels.SteerParams, got {type(p).__name__}")
        d, device = params[0].d, params[0].device
        for name, p in zip(names, params):
            if p.d != d:
                raise ValueError(f"steerers[{name!r}]: hidden size {p.d}, but steerers[{names[0]!r}] has {d}; a bank "
                                 "holds steerers of one hidden size (one layer)")
            if p.device != device:
                raise ValueError(f"steerers[{name!r}]: on {p.device}, but steerers[{names[0]!r}] is on {device}; "
                                 "move them with bank.to(device)")
        if len(set(names)) != len(names):
            raise ValueError(f"steerers: names must be unique, got {names}")
        self.names = tuple(names)
        self.params = tuple(params)
        self._pack_cache: dict = {}

    # ---- sizes ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.params)

    @property
    def d(self) -> int:
        return self.params[0].d

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def n_coef(self) -> int:
        """Width of a coefficient row of `synthesize_bank`: the widest steerer's K + k (narrower ones zero-padded)."""
        return max(p.n_coef for p in self.params)

    def index_of(self, name) -> int:
        """The row index of a steerer by name (or its index itself); None -> -1 (no steering)."""
        if name is None:
            return -1
        if isinstance(name, int) and not isinstance(name, bool):
            if not -1 <= name < len(self):
                raise IndexError(f"steerer index {name} out of range for a bank of {len(self)} (-1 = none)")
            return name
        if name not in self.names:
            raise KeyError(f"steerer {name!r} is not in the bank (names: {list(self.names)})")
        return self.names.index(name)

    def memory_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the packed bank in ``dtype`` (the formula of the module docstring)."""
        e = torch.finfo(dtype).bits // 8
        total = 4 * len(self) * (META_FIELDS + SCALAR_FIELDS) + self.d * w_in_stride(self.params) * e
        for p in self.params:
            total += p.n_coef * self.d * e + (4 * self.d if p.mean is not None else 0) + 4 * self._consts_len(p)
        return total

    @staticmethod
    def _consts_len(p: SteerParams) -> int:
        n = (p.num_experts if p.num_experts > 1 else 0) + p.m + p.k * p.m + p.k
        return max(n, 1)

    # ---- copies --------------------------------------------------------------------------------------------
    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "SteerBank":
        return SteerBank(dict(zip(self.names, (p.to(device, dtype) for p in self.params))))

    def replace(self, **changes) -> "SteerBank":
        """Every steerer with some fields changed (e.g. ``bank.replace(alpha=2.0)``)."""
        return SteerBank(dict(zip(self.names, (p.replace(**changes) for p in self.params))))

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: K={p.num_experts} r={p.r}" + (f" m={p.m} k={p.k}" if p.has_residual else "")
                          for n, p in zip(self.names, self.params))
        return f"SteerBank(d={self.d}, {{{parts}}}, device={self.device})"

    # ---- packed form ---------------------------------------------------------------------------------------
    def pack(self, dtype: Optional[torch.dtype] = None, device=None) -> PackedBank:
        """The bank kernels' buffers in ``dtype`` on ``device`` (cached)."""
        dtype = dtype or self.params[0].dtype
        device = torch.device(device) if device is not None else self.device
        key = (dtype, device)
        if key not in self._pack_cache:
            check_not_capturing(repr(self), dtype, device)
            self._pack_cache[key] = self._build(dtype, device)
        return self._pack_cache[key]

    def _build(self, dtype: torch.dtype, device: torch.device) -> PackedBank:
        packs = [p.pack_centred(dtype, device, W_IN_ALIGN) for p in self.params]
        meta, scalars, means = [], [], []
        col_off = out_off = const_off = mean_off = 0
        for p, pk in zip(self.params, packs):
            cols = pk.w_in.shape[1]
            has_pass1 = int(pk.has_gate or pk.has_router or pk.k > 0)
            row = dict(COL_OFF=col_off, COLS=cols, R=pk.r, K=pk.num_experts, M=pk.m, KR=pk.k,
                       HAS_GATE=int(pk.has_gate), HAS_MEAN=int(pk.has_mean), HAS_ROUTER=int(pk.has_router),
                       RELU=int(p.activation == "relu"), ROUTER_COL=pk.router_col, RES_COL=pk.res_col,
                       RB_OFF=const_off + pk.router_bias_off, B1_OFF=const_off + pk.res_in_bias_off,
                       W2_OFF=const_off + pk.res_out_weight_off, B2_OFF=const_off + pk.res_out_bias_off,
                       MEAN_OFF=mean_off, OUT_OFF=out_off, NC=p.n_coef, HAS_PASS1=has_pass1)
            meta.append([row[n] for n in META_NAMES])
            scalars.append([p.tau, p.eps, p.alpha * p.gamma])
            if pk.has_mean:
                means.append(pk.mean)
                mean_off += p.d
            col_off += cols
            out_off += p.n_coef
            const_off += pk.consts.numel()
        widest_cols = max(pk.w_in.shape[1] for pk in packs)
        stride = w_in_stride(self.params)
        layout = BankLayout(
            G=len(self) + 2, NP=padded(widest_cols), MP=padded(max(p.m for p in self.params)), NC=self.n_coef,
            NCP=padded(self.n_coef), W_IN_STRIDE=stride,
            ANY_GATE=int(any(p.has_gate for p in self.params)),
            ANY_ROUTER=int(any(p.num_experts > 1 for p in self.params)),
            ANY_RES=int(any(p.has_residual for p in self.params)), W_IN_COLS=widest_cols)
        f32 = dict(dtype=torch.float32, device=device)
        return PackedBank(
            w_in=torch.cat([pk.w_in for pk in packs] + [packs[0].w_in.new_zeros(self.d, stride - col_off)],
                           dim=1).contiguous(),
            w_out=torch.cat([pk.w_out for pk in packs], dim=0).contiguous(),
            mean=torch.cat(means) if means else torch.zeros(1, **f32),
            consts=torch.cat([pk.consts for pk in packs]).contiguous(),
            meta=torch.tensor(meta, dtype=torch.int32, device=device),
            scalars=torch.tensor(scalars, **f32),
            out_off=torch.tensor([m[META["OUT_OFF"]] for m in meta], dtype=torch.long, device=device),
            n_coef=torch.tensor([p.n_coef for p in self.params], dtype=torch.long, device=device),
            layout=layout)


def group_of(index: torch.Tensor, n_steerers: int) -> torch.Tensor:
    """int64 group per row: 0 for -1 (unsteered), s + 1 for steerer s, S + 1 for anything else (invalid)."""
    index = index.long()
    valid = (index >= -1) & (index < n_steerers)
    return torch.where(valid, index + 1, n_steerers + 1)


def plan_rows(index: torch.Tensor, n_steerers: int) -> BankPlan:
    """Group rows by steerer on the device: a stable sort of the group ids and a scatter-add of the counts. No
    host synchronisation (``bincount`` would read the maximum back)."""
    groups = group_of(index.reshape(-1), n_steerers)
    order = torch.argsort(groups, stable=True).to(torch.int32)
    counts = torch.zeros(n_steerers + 2, dtype=torch.int32, device=index.device)
    counts.scatter_add_(0, groups, torch.ones_like(groups, dtype=torch.int32))
    return BankPlan(order, counts)


def check_bank_rows(h: torch.Tensor, bank: SteerBank, index: torch.Tensor, name: str = "h",
                    ndim: Optional[int] = None) -> torch.Tensor:
    """Metadata checks of a bank call (no host sync); returns ``index`` flat. ``index`` has ``h``'s leading shape
    (or is its flattening) and a signed integer dtype; its values are not read."""
    from .validation import SIGNED_INT_DTYPES, check_hidden, check_row_shape

    if not isinstance(bank, SteerBank):
        raise TypeError(f"bank: expected finesteer_kernels.SteerBank, got {type(bank).__name__}")
    check_hidden(h, bank.params[0], name=name, ndim=ndim)
    if not isinstance(index, torch.Tensor) or index.dtype not in SIGNED_INT_DTYPES:
        got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError("index: expected an integer tensor of a signed dtype (a bank index per row, -1 = no "
                        f"steering), got {got}")
    check_row_shape("index", index, h, name)
    return index.reshape(-1)


def check_plan(plan: Optional[BankPlan], rows: int, bank: SteerBank) -> None:
    if plan is None:
        return
    if not isinstance(plan, BankPlan) or plan.order.shape != (rows,) or plan.counts.shape != (len(bank) + 2,):
        raise ValueError(f"plan: expected a BankPlan from plan_rows(index, {len(bank)}) for {rows} rows")
