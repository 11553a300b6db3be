"""Shared test material for the steering op: random parameters, rows away from the gate threshold, and an
independent float64 per-row implementation (loops, no packing) that the reference and the kernels are checked
against."""
from __future__ import annotations

import math

import torch

from finesteer_kernels import SteerParams

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
THRESHOLD_MARGIN = 0.05  # no test row scores within this distance of tau


def random_params(d: int, r: int, K: int, residual: str | None = None, m: int = 6, k: int = 3, seed: int = 0,
                  tau: float = 0.5, with_mean: bool = True, **scalars) -> SteerParams:
    """Random parameters at the scale of unit-variance hidden states (so the edit is as large as h)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    kw: dict = dict(experts=rand(K, d), tau=tau, gamma=scalars.pop("gamma", 0.8), alpha=scalars.pop("alpha", 1.3),
                    **scalars)
    if r:
        kw["basis"] = torch.linalg.qr(rand(d, r))[0]
        if with_mean:
            kw["mean"] = 0.3 * rand(d)
    if K > 1:
        kw["router_weight"] = rand(d, K) / math.sqrt(d) * 2
        kw["router_bias"] = rand(K)
    if residual:
        kw.update(res_in_weight=rand(m, d) / math.sqrt(d), res_in_bias=rand(m),
                  res_out_weight=rand(k, m) / math.sqrt(m), res_out_bias=rand(k),
                  res_basis=rand(k, d), activation=residual)
    return SteerParams(**kw)


def far_mean_params(d: int, r: int, K: int, residual: str | None = None, ratio: float = 40.0, seed: int = 0,
                    **kw) -> SteerParams:
    """`random_params` with the gate's mean pushed out to about ``ratio`` times the distance of `random_rows` rows
    from it. Real residual streams look like this (SmolLM2 layer-15 anchors lie 13-15 % of ||mu|| from the mean);
    there the expanded gate ``||h||^2 - 2 h.mu + ||mu||^2`` cancels and a 16-bit mu is off by more than h - mu."""
    p = random_params(d, r, K, residual, seed=seed, **kw)
    direction = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1))
    offset = max(3.5 * math.sqrt(r), 1.1 * math.sqrt(d))  # about the largest ||h - mu|| of random_rows
    return p.replace(mean=direction / direction.norm() * ratio * offset)


def gate_scores64(h: torch.Tensor, p: SteerParams) -> torch.Tensor:
    """Energy ratio per row in float64 (rows of a 2-D ``h``)."""
    x = h.double()
    c = x - (p.mean.double() if p.mean is not None else 0)
    return (c @ p.basis.double()).square().sum(-1) / c.square().sum(-1).clamp_min(p.eps)


def random_rows(p: SteerParams, n: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    """``(n, d)`` rows in ``dtype``. With a gate, even rows lie near the gate subspace (gate on) and odd rows
    nearly orthogonal to it (gate off, unless r == d), and no row scores within THRESHOLD_MARGIN of tau after
    rounding to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, p.d, generator=g)
    if not p.has_gate:
        return rows.to(dtype)
    S = p.basis
    mu = p.mean if p.mean is not None else torch.zeros(p.d)
    inside = torch.randn(n, p.r, generator=g) * 3 @ S.T
    outside = rows - rows @ S @ S.T
    on = torch.arange(n) % 2 == 0
    rows = mu + torch.where(on[:, None], inside + 0.05 * rows, outside + 0.05 * inside)
    rounded = rows.to(dtype)
    if ((gate_scores64(rounded, p) - p.tau).abs() < THRESHOLD_MARGIN).any():
        raise RuntimeError("test rows too close to the gate threshold; pick another seed or tau")
    return rounded


def spread_rows(p: SteerParams, n: int, seed: int = 1, dtype=torch.float32, radius: float | None = None
                ) -> torch.Tensor:
    """``(n, d)`` rows at distance ``radius`` (default sqrt(d)) from the gate's mean whose gate scores spread over
    [0, 1], up to THRESHOLD_MARGIN from tau on either side (after rounding to ``dtype``): the rows where a gate
    that is slightly off decides differently. Needs a gate with 0 < r < d."""
    if not 0 < p.r < p.d:
        raise ValueError("spread_rows: needs a gate basis with 0 < r < d")
    g = torch.Generator().manual_seed(seed)
    S = p.basis.double()
    mu = p.mean.double() if p.mean is not None else torch.zeros(p.d, dtype=torch.float64)
    radius = math.sqrt(p.d) if radius is None else radius
    m = 4 * n
    target = torch.rand(m, generator=g, dtype=torch.float64)
    inside = torch.randn(m, p.r, generator=g, dtype=torch.float64) @ S.T
    outside = torch.randn(m, p.d, generator=g, dtype=torch.float64)
    outside = outside - outside @ S @ S.T
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    delta = target.sqrt()[:, None] * unit(inside) + (1 - target).sqrt()[:, None] * unit(outside)
    rows = (mu + radius * delta).to(dtype)
    clear = (gate_scores64(rows, p) - p.tau).abs() >= THRESHOLD_MARGIN
    if int(clear.sum()) < n:
        raise RuntimeError("spread_rows: too few rows clear of the gate threshold; pick another seed")
    return rows[clear][:n]


def loop_coefficients(h: torch.Tensor, p: SteerParams) -> torch.Tensor:
    """float64 ``(N, K+k)`` coefficients, one row and one expert at a time."""
    f = lambda t: None if t is None else t.double()  # noqa: E731
    S, mu, A, c = f(p.basis), f(p.mean), f(p.router_weight), f(p.router_bias)
    W1, b1, W2, b2 = f(p.res_in_weight), f(p.res_in_bias), f(p.res_out_weight), f(p.res_out_bias)
    K, k, m = p.num_experts, p.k, p.m
    out = torch.zeros(h.shape[0], K + k, dtype=torch.float64)
    for i, x in enumerate(h.double()):
        g = 1.0
        if S is not None:
            cx = x - mu if mu is not None else x
            inside = sum(float(torch.dot(S[:, j], cx)) ** 2 for j in range(S.shape[1]))
            g = float(inside / max(float(torch.dot(cx, cx)), p.eps) >= p.tau)
        if K == 1:
            a = [1.0]
        else:
            logits = [float(torch.dot(A[:, j], x)) + (float(c[j]) if c is not None else 0.0) for j in range(K)]
            top = max(logits)
            e = [math.exp(v - top) for v in logits]
            a = [v / sum(e) for v in e]
        beta = []
        if k:
            hid = [float(torch.dot(W1[t], x)) + (float(b1[t]) if b1 is not None else 0.0) for t in range(m)]
            if p.activation == "relu":
                hid = [max(v, 0.0) for v in hid]
            beta = [sum(float(W2[q, t]) * hid[t] for t in range(m)) + (float(b2[q]) if b2 is not None else 0.0)
                    for q in range(k)]
        scale = p.alpha * p.gamma * g
        out[i] = torch.tensor([scale * v for v in a + beta], dtype=torch.float64)
    return out


def loop_steer(h: torch.Tensor, p: SteerParams) -> torch.Tensor:
    """float64 output rows of the op for 2-D ``h``."""
    coef = loop_coefficients(h, p)
    rows = [p.experts.double()] + ([p.res_basis.double()] if p.has_residual else [])
    W_out = torch.cat(rows)
    out = h.double().clone()
    for i in range(h.shape[0]):
        for j in range(W_out.shape[0]):
            out[i] += coef[i, j] * W_out[j]
    return out


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest elementwise error over the largest reference magnitude (every element counts; NaN -> inf)."""
    err = (out.double() - ref.double()).abs().max()
    if not torch.isfinite(err):
        return math.inf
    return float(err / ref.double().abs().max().clamp_min(1e-30))
