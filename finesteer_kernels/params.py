"""`SteerParams`: the parameters of the unified steering op (docs/method.md), validated and packable.

Per row ``h`` (a ``d``-vector) the op computes::

    g = 1 if basis is None else [ ||S^T(h-mu)||^2 / max(||h-mu||^2, eps) >= tau ]
    a = softmax(A^T h + c)            (K == 1 -> a = 1)
    b = W2 act(W1 h + b1) + b2        (optional residual MLP)
    out = h + alpha * g * gamma * (a^T V + b^T U_res)

Tensors are kept as fp32 masters (unless `.to(dtype=...)` asks otherwise). Two packed forms:
`pack` gives the ``W_in = [S | mu | A | W1^T]`` (d x n_in) and ``W_out = [V ; U_res]`` ((K+k) x d),
see `PackedSteerParams`; `pack_centred` is the form the fused kernels read (the gate centred inside pass 1, mu
kept in fp32), see `CentredPack`. Validation happens once here, at construction, so the hot path only checks shapes,
dtypes and devices; packing needs no host synchronisation.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple, Optional

import torch

from .perf_model import stored_w_in_cols

ACTIVATIONS = ("relu", "identity")
STORABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FP32_MAX = torch.finfo(torch.float32).max

# Names of the tensor fields, in packing order; `Steerer` files use them as tensor names.
TENSOR_FIELDS = (
    "basis", "mean", "router_weight", "router_bias", "experts",
    "res_in_weight", "res_in_bias", "res_out_weight", "res_out_bias", "res_basis",
)
SCALAR_FIELDS = ("tau", "gamma", "alpha", "eps", "activation")
_RESIDUAL_REQUIRED = ("res_in_weight", "res_out_weight", "res_basis")
_RESIDUAL_OPTIONAL = ("res_in_bias", "res_out_bias")
# the fields each packed form casts to the activation dtype (the rest stay fp32)
_CAST_BY_PACK = ("basis", "mean", "router_weight", "res_in_weight", "experts", "res_basis")
_CAST_BY_PACK_CENTRED = ("basis", "router_weight", "res_in_weight", "experts", "res_basis")
# the axis of each tensor that runs over the hidden size d
HIDDEN_AXIS = {"basis": 0, "mean": 0, "router_weight": 0, "experts": 1, "res_in_weight": 1, "res_basis": 1}


class PackedSteerParams(NamedTuple):
    """The packed form the fused kernels read.

    ``w_in`` columns: ``[0, r)`` basis S, ``r`` the mean mu (only with a gate), then K router columns (only when
    K > 1), then the m rows of W1 transposed. ``w_out`` rows: the K experts, then the k residual basis rows.
    ``consts`` (fp32) holds the per-row epilogue's small operands, see `SteerParams.pack`.
    """

    w_in: torch.Tensor
    w_out: torch.Tensor
    consts: torch.Tensor
    r: int
    num_experts: int
    m: int
    k: int
    has_gate: bool
    has_router: bool
    mean_col: int
    router_col: int
    res_col: int
    # offsets into `consts`
    s_mu_off: int  # S^T mu, r values
    mu_sq_off: int  # ||mu||^2, 1 value
    router_bias_off: int  # c, K values
    res_in_bias_off: int  # b1, m values
    res_out_weight_off: int  # W2 row-major, k*m values
    res_out_bias_off: int  # b2, k values

    @property
    def n_in(self) -> int:
        return self.w_in.shape[1]

    @property
    def n_out(self) -> int:
        return self.w_out.shape[0]


class CentredPack(NamedTuple):
    """The packed form the fused kernels read (`SteerParams.pack_centred`).

    The kernels centre each row inside pass 1, ``xc = h - mu`` with mu in fp32, and run one dot over ``xc``:

    * ``w_in`` (activation dtype, ``d x n_in``, columns zero-padded to a multiple of ``align``):
      ``[S (r) | A (K, only when K > 1) | W1^T (m) | 0...]``; no mu column.
    * ``mean``: mu in fp32 ``(d,)``; one zero when the gate has no mean (or there is no gate): ``has_mean`` says.
    * ``consts`` (fp32): ``[c + A^T mu (K) | b1 + W1 mu (m) | W2 (k*m, row-major) | b2 (k)]`` (each part only where
      its layer is; at least one element, so no kernel gets an empty buffer). The folds use the fp32 masters, so
      ``A^T h = A^T xc + A^T mu`` loses nothing to the rounding of A applied to mu.
    * ``w_out``: ``[V ; U_res]`` in the activation dtype, as in `pack`.
    """

    w_in: torch.Tensor
    w_out: torch.Tensor
    mean: torch.Tensor
    consts: torch.Tensor
    r: int
    num_experts: int
    m: int
    k: int
    has_gate: bool
    has_mean: bool
    has_router: bool
    router_col: int
    res_col: int
    router_bias_off: int
    res_in_bias_off: int
    res_out_weight_off: int
    res_out_bias_off: int


def cuda_graph_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_not_capturing(what: str, dtype: torch.dtype, device: torch.device) -> None:
    """Packed weights are built on first use and cached. Built inside a CUDA graph capture, the copies would only be
    recorded, not run: the cache would hold unwritten memory until the first replay. Refuse that, clearly."""
    if cuda_graph_capturing():
        raise RuntimeError(f"{what}: the packed weights for {dtype} on {device} do not exist yet, and building them "
                           "inside a CUDA graph capture would cache memory that is only written when the graph "
                           "replays; call the op once on this dtype and device before capturing (patch_model does "
                           "so for every steered layer)")


def _check_fits(name: str, amax: float, dtype: torch.dtype, what: str) -> None:
    """Raise if a tensor whose largest magnitude is ``amax`` would overflow to inf when cast to ``dtype``."""
    limit = torch.finfo(dtype).max
    if amax > limit:
        raise ValueError(f"{name}: largest magnitude {amax:.4g} overflows {dtype} (max {limit:.4g}) when cast "
                         f"for {what}; rescale it or use a wider dtype")


def _check_storable(name: str, dtype: torch.dtype) -> None:
    if dtype not in STORABLE_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor of dtype float32, float16, bfloat16 or float64, "
                        f"got {dtype}")


def _as_float_tensor(name: str, value, ndim: int) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(value).__name__}")
    _check_storable(name, value.dtype)
    if value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
    return value


def _as_scalar(name: str, value) -> float:
    """A finite Python float from a number, a numpy scalar or a one-element tensor/array (construction time, so
    reading a tensor's value here is not on the hot path)."""
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, numbers.Number):  # a tensor or an array
        if math.prod(shape) != 1:
            raise TypeError(f"{name}: expected a number, got a {type(value).__name__} of shape {tuple(shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    return value


def _check_hidden_sizes(tensors: dict) -> None:
    """Every tensor's hidden-size axis must agree. When they do not, name the tensors that disagree with the size
    most of them share (or every group, on a tie) rather than whichever one happens to be checked first."""
    by_d: dict = {}
    for name, axis in HIDDEN_AXIS.items():
        if tensors.get(name) is not None:
            by_d.setdefault(tensors[name].shape[axis], []).append(name)
    if len(by_d) < 2:
        return
    shapes = lambda names: ", ".join(f"{n} {tuple(tensors[n].shape)}" for n in names)  # noqa: E731
    groups = sorted(by_d.items(), key=lambda item: -len(item[1]))
    if len(groups[0][1]) == len(groups[1][1]):
        raise ValueError("hidden size: the tensors disagree (" +
                         "; ".join(f"d={d}: {shapes(names)}" for d, names in groups) +
                         "); every tensor must have the same hidden size d")
    (d, agreeing), odd = groups[0], [n for _, names in groups[1:] for n in names]
    raise ValueError(f"{', '.join(odd)}: hidden size of {shapes(odd)} disagrees with d={d} of {shapes(agreeing)}; "
                     "every tensor must have the same hidden size d")


def _orthonormal_span(name: str, basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (QR) of span(basis), refusing a rank-deficient one: QR would fill the missing
    directions with arbitrary columns, i.e. invent gate directions."""
    b = basis.double()
    singular = torch.linalg.svdvals(b)
    tol = float(singular.max()) * max(b.shape) * torch.finfo(basis.dtype).eps
    rank = int((singular > tol).sum())
    if rank < b.shape[1]:
        raise ValueError(f"{name}: rank-deficient ({b.shape[1]} columns spanning only {rank} dimension(s)); "
                         "orthonormalize=True cannot invent the missing directions: pass linearly independent "
                         "columns, or fewer of them")
    return torch.linalg.qr(b)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class SteerParams:
    """Parameters of the steering op. ``None`` marks a part that is absent.

    Args:
        experts: ``(K, d)`` expert vectors V (K >= 1). The only required tensor.
        basis: ``(d, r)`` orthonormal columns S of the gate subspace; ``None`` = gate always on.
        mean: ``(d,)`` centre mu of the gate; ``None`` = zero. Only meaningful with a basis.
        tau: gate threshold in [0, 1] on the energy ratio.
        router_weight, router_bias: ``(d, K)`` and ``(K,)``; required (weight) when K > 1, absent when K == 1.
        res_in_weight, res_in_bias, res_out_weight, res_out_bias, res_basis: the optional residual MLP
            ``(m, d)``, ``(m,)``, ``(k, m)``, ``(k,)`` and the residual basis ``(k, d)``; weights and basis come
            together, biases default to zero.
        activation: ``"relu"`` or ``"identity"`` (the residual MLP's nonlinearity).
        gamma: learned scale of the synthesised vector. alpha: user strength.
        eps: floor of the centred energy in the gate's denominator.
        orthonormalize: replace ``basis`` by an orthonormal basis of its span (QR) instead of checking it.
        storage_dtype: dtype of the stored tensors (default fp32 masters).
    """

    experts: torch.Tensor
    basis: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None
    tau: float = 0.5
    router_weight: Optional[torch.Tensor] = None
    router_bias: Optional[torch.Tensor] = None
    res_in_weight: Optional[torch.Tensor] = None
    res_in_bias: Optional[torch.Tensor] = None
    res_out_weight: Optional[torch.Tensor] = None
    res_out_bias: Optional[torch.Tensor] = None
    res_basis: Optional[torch.Tensor] = None
    activation: str = "relu"
    gamma: float = 1.0
    alpha: float = 1.0
    eps: float = 1e-12
    orthonormalize: dataclasses.InitVar[bool] = False
    storage_dtype: dataclasses.InitVar[Optional[torch.dtype]] = None

    def __post_init__(self, orthonormalize: bool, storage_dtype: Optional[torch.dtype]) -> None:
        ndims = dict(basis=2, mean=1, router_weight=2, router_bias=1, experts=2, res_in_weight=2,
                     res_in_bias=1, res_out_weight=2, res_out_bias=1, res_basis=2)
        if self.experts is None:
            raise ValueError("experts: required, a (K, d) tensor of expert vectors")
        device = _as_float_tensor("experts", self.experts, 2).device  # checked first: it fixes device and d
        store_dtype = torch.float32 if storage_dtype is None else storage_dtype
        if not isinstance(store_dtype, torch.dtype):
            raise TypeError(f"storage_dtype: expected a torch.dtype, got {type(store_dtype).__name__}")
        _check_storable("storage_dtype", store_dtype)
        amax: dict = {}
        for name in TENSOR_FIELDS:
            t = _as_float_tensor(name, getattr(self, name), ndims[name])
            if t is not None:
                if t.device != device:
                    raise ValueError(f"{name}: on device {t.device}, but experts are on {device}; "
                                     "put all tensors on one device")
                if not torch.isfinite(t).all():
                    raise ValueError(f"{name}: contains NaN or infinite values")
                # largest magnitude, kept so that packing can check the range of a dtype without a host sync
                amax[name] = float(t.detach().abs().amax()) if t.numel() else 0.0
                _check_fits(name, amax[name], store_dtype, "storage_dtype")
                t = t.detach().to(store_dtype).contiguous()
            object.__setattr__(self, name, t)

        for name in ("tau", "gamma", "alpha", "eps"):
            object.__setattr__(self, name, _as_scalar(name, getattr(self, name)))
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau: the gate threshold is an energy ratio and must lie in [0, 1], got {self.tau}")
        if not torch.finfo(torch.float32).tiny <= self.eps <= FP32_MAX:
            raise ValueError(f"eps: must be a positive normal float32 number (1.2e-38 .. 3.4e38), got {self.eps}")
        # The kernels multiply the coefficients by alpha * gamma * g in float32: a scale that overflows to inf
        # would turn rows whose gate is off (g = 0) into NaN (inf * 0) instead of leaving them unchanged.
        for name, value in (("alpha", self.alpha), ("gamma", self.gamma), ("alpha * gamma", self.alpha * self.gamma)):
            if abs(value) > FP32_MAX:
                raise ValueError(f"{name}: {value:.4g} overflows float32 (max {FP32_MAX:.4g}); the op scales by "
                                 "alpha * gamma in float32, so keep |alpha|, |gamma| and |alpha * gamma| below that")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.activation!r}")

        _check_hidden_sizes(self.tensors())
        K, d = self.experts.shape
        if K < 1 or d < 1:
            raise ValueError(f"experts: expected shape (K, d) with K >= 1 and d >= 1, got {tuple(self.experts.shape)}")

        def expect(name: str, shape: tuple, why: str = "") -> None:
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape} ({why or f'd={d}, K={K}'}), got {tuple(t.shape)}")

        # gate
        if self.basis is None:
            if self.mean is not None:
                raise ValueError("mean: given without basis; with no basis the gate is always on and mean "
                                 "would be ignored")
        else:
            r = self.basis.shape[1]
            if not 1 <= r <= d:
                raise ValueError(f"basis: expected 1 <= r <= d={d} columns, got r={r}")
            if orthonormalize:
                object.__setattr__(self, "basis", _orthonormal_span("basis", self.basis).to(store_dtype).contiguous())
            else:
                gram = self.basis.double().T @ self.basis.double()
                err = (gram - torch.eye(r, dtype=gram.dtype, device=gram.device)).abs().max().item()
                tol = 1e-4 if store_dtype in (torch.float32, torch.float64) else 2e-2
                if err > tol:
                    raise ValueError(f"basis: columns must be orthonormal (max |S^T S - I| = {err:.2e} > {tol:g}); "
                                     "pass orthonormalize=True to orthonormalise them")
        # router
        if K == 1:
            for name in ("router_weight", "router_bias"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: K == 1 needs no router (softmax over one expert is 1); pass None")
        else:
            if self.router_weight is None:
                raise ValueError(f"router_weight: required when K > 1 (K={K}), a (d, K) tensor")
            expect("router_weight", (d, K))
            expect("router_bias", (K,))
        # residual: W1 (m, d) -> W2 (k, m) -> U_res (k, d); m comes from W1 and k from W2, so each mismatch is
        # reported on the tensor whose size disagrees with the one feeding it
        present = [n for n in _RESIDUAL_REQUIRED if getattr(self, n) is not None]
        if present and len(present) != len(_RESIDUAL_REQUIRED):
            missing = [n for n in _RESIDUAL_REQUIRED if n not in present]
            raise ValueError(f"residual: {', '.join(missing)} missing; res_in_weight, res_out_weight and "
                             "res_basis come together")
        if not present:
            for n in _RESIDUAL_OPTIONAL:
                if getattr(self, n) is not None:
                    raise ValueError(f"{n}: given without the residual MLP weights")
        else:
            m, k = self.res_in_weight.shape[0], self.res_out_weight.shape[0]
            if m < 1 or k < 1:
                raise ValueError(f"residual: need m >= 1 and k >= 1, got m={m} (res_in_weight rows), k={k} "
                                 "(res_out_weight rows)")
            expect("res_in_bias", (m,), f"m={m} rows of res_in_weight")
            expect("res_out_weight", (k, m), f"one column per row of res_in_weight, m={m}")
            expect("res_basis", (k, d), f"one row per output of res_out_weight, k={k}, and d={d}")
            expect("res_out_bias", (k,), f"k={k} rows of res_out_weight")
        if orthonormalize and self.basis is not None:
            amax["basis"] = 1.0  # orthonormal columns
        object.__setattr__(self, "_amax", amax)
        object.__setattr__(self, "_pack_cache", {})

    # ---- sizes ---------------------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return self.experts.shape[1]

    @property
    def num_experts(self) -> int:
        return self.experts.shape[0]

    @property
    def r(self) -> int:
        return 0 if self.basis is None else self.basis.shape[1]

    @property
    def m(self) -> int:
        return 0 if self.res_in_weight is None else self.res_in_weight.shape[0]

    @property
    def k(self) -> int:
        return 0 if self.res_basis is None else self.res_basis.shape[0]

    @property
    def has_gate(self) -> bool:
        return self.basis is not None

    @property
    def has_residual(self) -> bool:
        return self.res_basis is not None

    @property
    def n_coef(self) -> int:
        """Length of a coefficient row: K expert weights then k residual coefficients."""
        return self.num_experts + self.k

    @property
    def device(self) -> torch.device:
        return self.experts.device

    @property
    def dtype(self) -> torch.dtype:
        return self.experts.dtype

    # ---- copies --------------------------------------------------------------------------------------------
    def tensors(self) -> dict:
        """The present tensors by field name."""
        return {n: getattr(self, n) for n in TENSOR_FIELDS if getattr(self, n) is not None}

    def scalars(self) -> dict:
        return {n: getattr(self, n) for n in SCALAR_FIELDS}

    def replace(self, **changes) -> "SteerParams":
        """A copy with some fields changed (e.g. ``params.replace(alpha=4.0)``), validated again."""
        fields = {**self.tensors(), **self.scalars(), **changes}
        return SteerParams(storage_dtype=self.dtype, **fields)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "SteerParams":
        """A copy on ``device`` with tensors stored in ``dtype`` (default: keep the current dtype)."""
        tensors = {n: t.to(device) for n, t in self.tensors().items()}
        return SteerParams(storage_dtype=dtype or self.dtype, **tensors, **self.scalars())

    # ---- packed form ---------------------------------------------------------------------------------------
    def pack(self, dtype: Optional[torch.dtype] = None, device=None) -> PackedSteerParams:
        """``W_in``/``W_out`` in ``dtype`` on ``device`` plus fp32 epilogue constants; cached per (dtype, device).

        ``consts`` = ``[S^T mu (r) | ||mu||^2 (1) | c (K) | b1 (m) | W2 (k*m, row-major) | b2 (k)]``, each part
        present only where its layer is. Subtracting ``S^T mu`` and using
        ``||h-mu||^2 = ||h||^2 - 2 h.mu + ||mu||^2`` lets one pass over h serve the centred gate.
        """
        return self._cached_pack((), dtype, device, _CAST_BY_PACK, self._build_pack)

    def _cached_pack(self, key_extra: tuple, dtype, device, cast_fields: tuple, build):
        """One cache for every packed form: ``build(dtype, device)`` runs once per key, after the overflow check."""
        dtype = dtype or self.dtype
        device = torch.device(device) if device is not None else self.device
        key = (dtype, device, *key_extra)
        packed = self._pack_cache.get(key)
        if packed is None:
            check_not_capturing(repr(self), dtype, device)
            self._check_cast(cast_fields, dtype)
            packed = self._pack_cache[key] = build(dtype, device)
        return packed

    def _build_pack(self, dtype: torch.dtype, device: torch.device) -> PackedSteerParams:
        f32 = {n: t.to(device=device, dtype=torch.float32) for n, t in self.tensors().items()}
        d, K, r, m, k = self.d, self.num_experts, self.r, self.m, self.k
        zeros = lambda n: torch.zeros(n, dtype=torch.float32, device=device)  # noqa: E731
        cols, consts = [], []
        if self.has_gate:
            mu = f32.get("mean", zeros(d))
            cols += [f32["basis"], mu[:, None]]
            consts += [f32["basis"].T @ mu, (mu @ mu).reshape(1)]
        has_router = K > 1
        if has_router:
            cols.append(f32["router_weight"])
            consts.append(f32.get("router_bias", zeros(K)))
        if self.has_residual:
            cols.append(f32["res_in_weight"].T)
            consts += [f32.get("res_in_bias", zeros(m)), f32["res_out_weight"].reshape(-1),
                       f32.get("res_out_bias", zeros(k))]
        rows = [f32["experts"]] + ([f32["res_basis"]] if self.has_residual else [])
        w_in = torch.cat(cols, dim=1) if cols else torch.zeros(d, 0, device=device)
        gate_cols = r + 1 if self.has_gate else 0
        s_mu_off = 0
        mu_sq_off = s_mu_off + (r if self.has_gate else 0)
        router_bias_off = mu_sq_off + (1 if self.has_gate else 0)
        res_in_bias_off = router_bias_off + (K if has_router else 0)
        res_out_weight_off = res_in_bias_off + m
        res_out_bias_off = res_out_weight_off + k * m
        return PackedSteerParams(
            w_in=w_in.to(dtype).contiguous(),
            w_out=torch.cat(rows, dim=0).to(dtype).contiguous(),
            consts=torch.cat(consts) if consts else zeros(0),
            r=r, num_experts=K, m=m, k=k, has_gate=self.has_gate, has_router=has_router,
            mean_col=r, router_col=gate_cols, res_col=gate_cols + (K if has_router else 0),
            s_mu_off=s_mu_off, mu_sq_off=mu_sq_off, router_bias_off=router_bias_off,
            res_in_bias_off=res_in_bias_off, res_out_weight_off=res_out_weight_off,
            res_out_bias_off=res_out_bias_off,
        )

    def _check_cast(self, names: tuple, dtype: torch.dtype) -> None:
        """Packing casts these fields to ``dtype``: raise, naming the field, if one would overflow (no host sync:
        the magnitudes were measured at construction)."""
        for name in names:
            if name in self._amax:
                _check_fits(name, self._amax[name], dtype, f"packing in {dtype}")

    def pack_centred(self, dtype: Optional[torch.dtype] = None, device=None, align: int = 8) -> CentredPack:
        """The fused kernels' packed form (`CentredPack`), cached per (dtype, device, align).

        ``W_in`` holds ``[S | A | W1^T]`` with columns zero-padded to a multiple of ``align`` (at least ``align``):
        the kernels read it in ``(BLOCK_D, n_in)`` tiles, and a row stride of 8 elements starts every row on a
        16-byte boundary in 16-bit dtypes, so the loads vectorise. mu stays fp32 and is subtracted from each row
        before the dot, so rows close to a large mu keep their digits (the expansion
        ``||h||^2 - 2 h.mu + ||mu||^2`` of `pack` cancels there, and a 16-bit mu is off by more than ``h - mu``).
        """
        if align < 1:
            raise ValueError(f"align: expected a positive column multiple, got {align}")
        return self._cached_pack(("centred", align), dtype, device, _CAST_BY_PACK_CENTRED,
                                 lambda dtype, device: self._build_centred(dtype, device, align))

    def _build_centred(self, dtype: torch.dtype, device: torch.device, align: int) -> CentredPack:
        f64 = {n: t.to(device=device, dtype=torch.float64) for n, t in self.tensors().items()}
        d, K, r, m, k = self.d, self.num_experts, self.r, self.m, self.k
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        has_mean = self.mean is not None
        mu = f64["mean"] if has_mean else zeros(d)
        has_router = K > 1
        cols, consts = [], []
        if self.has_gate:
            cols.append(f64["basis"])
        if has_router:
            cols.append(f64["router_weight"])
            consts.append(f64.get("router_bias", zeros(K)) + f64["router_weight"].T @ mu)
        if self.has_residual:
            cols.append(f64["res_in_weight"].T)
            consts += [f64.get("res_in_bias", zeros(m)) + f64["res_in_weight"] @ mu,
                       f64["res_out_weight"].reshape(-1), f64.get("res_out_bias", zeros(k))]
        n_in = r + (K if has_router else 0) + m
        padded_cols = stored_w_in_cols(r, K, m, align)
        w_in = torch.cat(cols + [zeros((d, padded_cols - n_in))], dim=1)
        rows = [f64["experts"]] + ([f64["res_basis"]] if self.has_residual else [])
        router_bias_off = 0
        res_in_bias_off = router_bias_off + (K if has_router else 0)
        res_out_weight_off = res_in_bias_off + m
        res_out_bias_off = res_out_weight_off + k * m
        return CentredPack(
            w_in=w_in.to(dtype).contiguous(),
            w_out=torch.cat(rows, dim=0).to(dtype).contiguous(),
            mean=(mu if has_mean else zeros(1)).to(torch.float32).contiguous(),
            consts=torch.cat(consts).to(torch.float32) if consts else torch.zeros(1, device=device),
            r=r, num_experts=K, m=m, k=k, has_gate=self.has_gate, has_mean=has_mean, has_router=has_router,
            router_col=r, res_col=r + (K if has_router else 0), router_bias_off=router_bias_off,
            res_in_bias_off=res_in_bias_off, res_out_weight_off=res_out_weight_off,
            res_out_bias_off=res_out_bias_off,
        )

    def __repr__(self) -> str:
        parts = [f"d={self.d}", f"K={self.num_experts}", f"r={self.r}"]
        if self.has_residual:
            parts += [f"m={self.m}", f"k={self.k}", f"activation={self.activation!r}"]
        parts += [f"tau={self.tau:g}", f"gamma={self.gamma:g}", f"alpha={self.alpha:g}",
                  f"dtype={self.dtype}", f"device={self.device}"]
        return f"SteerParams({', '.join(parts)})"
