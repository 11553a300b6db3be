"""Gates: *when* to steer. Every variant produces the op's gate, ``s(h) = ||S^T(h-mu)||^2 / ||h-mu||^2 >= tau``
(a mean, an orthonormal basis and a threshold), so the kernels never change; they differ in how ``mu`` and ``S``
are chosen on the fit split and how ``tau`` is set on the calibration split.

Variants (`GATES`, ``--gate``):

- ``scs``: the paper's. ``mu`` = mean of the targets, ``S`` = their top-``r`` principal directions (``r`` explains
  90 % of the target variance, at most 32). It never looks at benign data, so it fails whenever the targets vary
  most along directions that benign prompts share.
- ``contrastive``: ``mu`` = mean of the benign fit rows, ``S`` = the top-``r`` generalised eigenvectors of the
  target second moment about ``mu`` against the (Ledoit-Wolf shrunk) benign covariance, orthonormalised: the
  directions where targets carry the most energy *relative to* benign rows. Benign rows sit around ``mu`` with
  little energy in ``S``; targets are displaced along it. ``r`` is chosen by calibration AUC.
- ``linear``: a one-direction gate that decides like a linear classifier. ``w`` = the shrinkage-LDA direction
  (Ledoit-Wolf), ``S = w``, and the cone's apex ``mu = m - c w - C u`` is put far from the data: ``c`` behind the
  midpoint ``m`` of the class means along ``w`` (beyond every fit row, so none reaches the mirrored half of the
  double cone) and ``C`` aside along a coordinate axis ``e_k`` whose weight in ``w`` is set to exactly zero. Then
  ``||h - mu||^2 = C^2 (1 + O(1e-4))`` for every row and ``s(h) ~ (w.(h - m) + c)^2 / C^2``, monotone in ``w.h``: the
  threshold on ``s`` is a threshold on the linear score. (With the apex on ``w`` alone, the norm of ``h`` off ``w``
  dominates the ratio and most of the direction's AUC is lost.) The steering experts must ignore input ``k`` too
  (`finesteer.fitting.fit.fit_mose`'s ``ignore_inputs``): the op's router and residual MLP read the same ``h - mu``.

Thresholds (`calibrate`): by default the paper's rule (start at the score keeping 90 % of calibration targets, then
a class-balanced, L2-regularised one-feature logistic fit; ``tau`` = its boundary). With ``max_fpr`` a
Neyman-Pearson rule instead: the lowest ``tau`` whose false-positive rate on the benign calibration rows is at most
``max_fpr`` (placed midway in the gap above the last benign score it must exclude). Given the source of each benign
calibration row, the rule holds on *every* source (``tau`` = the highest of the per-source thresholds) rather than
on the pool: a pool with easy sources (math problems score far below any harmful request) would otherwise spend
the whole allowance on the hard ones, and a new benign source resembles the hardest ones seen more than the pool's
average (results/transfer.md).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
import torch

GATES = ("scs", "contrastive", "linear")
RANKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # searched by calibration AUC where the variant picks its own rank
# The linear gate's apex: c = APEX_BEHIND x the largest |w.(h - m)| of the fit rows behind the boundary (so no row
# reaches the mirrored half of the double cone), C = APEX_ASIDE x the largest ||h - m|| aside, along a coordinate
# axis with zero weight in w (so ||h - mu||^2 is C^2 up to a relative 1e-4 and the score is monotone in w.h).
APEX_BEHIND, APEX_ASIDE = 10.0, 100.0


def as_rows(name: str, value, d: Optional[int] = None, min_rows: int = 1) -> torch.Tensor:
    """``value`` checked as a finite 2-D (N, d) floating-point tensor, returned in float64 on the CPU."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2 or not value.is_floating_point():
        raise ValueError(f"{name}: expected a 2-D floating-point (N, d) tensor, got shape {tuple(value.shape)} "
                         f"dtype {value.dtype}")
    if d is not None and value.shape[1] != d:
        raise ValueError(f"{name}: expected {d} columns (the hidden size), got {value.shape[1]}")
    if value.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} rows, got {value.shape[0]}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return value.detach().to("cpu", torch.float64)


def energy_ratio(H: torch.Tensor, basis: torch.Tensor, mean: Optional[torch.Tensor], eps: float = 1e-12):
    """The gate score of SPEC section 1 per row, in float64: share of the centred energy inside span(basis)."""
    X = H.double() - (mean.double() if mean is not None else 0.0)
    return (X @ basis.double()).square().sum(-1) / X.square().sum(-1).clamp_min(eps)


@dataclasses.dataclass
class GateReport:
    """How a gate separates targets from benign rows at threshold ``tau``."""

    tpr: float
    fpr: float
    auc: float
    tau: float
    n_target: int
    n_benign: int
    median_target: float  # the scores' medians: reference points that make a single score readable (the demo's)
    median_benign: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def roc_auc(scores_target, scores_benign) -> float:
    from sklearn.metrics import roc_auc_score

    st, sb = np.asarray(scores_target, dtype=np.float64), np.asarray(scores_benign, dtype=np.float64)
    return float(roc_auc_score(np.r_[np.ones(len(st)), np.zeros(len(sb))], np.r_[st, sb]))


def gate_report(scores_target, scores_benign, tau: float) -> GateReport:
    """TPR / FPR at ``tau`` (gate on when score >= tau) and the threshold-free ROC AUC."""
    st, sb = np.asarray(scores_target, dtype=np.float64), np.asarray(scores_benign, dtype=np.float64)
    return GateReport(tpr=float((st >= tau).mean()), fpr=float((sb >= tau).mean()), auc=roc_auc(st, sb),
                      tau=float(tau), n_target=len(st), n_benign=len(sb), median_target=float(np.median(st)),
                      median_benign=float(np.median(sb)))


# ---- thresholds ---------------------------------------------------------------------------------------------------
def _balanced_logistic_boundary(s_target: np.ndarray, s_benign: np.ndarray, start: float, l2: float,
                                iterations: int = 100) -> tuple:
    """Newton's method for the class-balanced, L2-regularised (on the slope) logistic regression of the label on
    the standardised score, started with its boundary at ``start``. Returns (boundary in score units, w, b,
    converged)."""
    s = np.r_[s_target, s_benign]
    y = np.r_[np.ones(len(s_target)), np.zeros(len(s_benign))]
    weight = np.r_[np.full(len(s_target), 0.5 / len(s_target)), np.full(len(s_benign), 0.5 / len(s_benign))]
    centre, scale = s.mean(), max(s.std(), 1e-12)
    z = (s - centre) / scale
    w, b = 1.0, -(start - centre) / scale  # boundary -b/w == start
    converged = False
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(w * z + b)))
        grad = np.array([np.sum(weight * (p - y) * z) + l2 * w, np.sum(weight * (p - y))])
        curv = weight * p * (1 - p)
        hess = np.array([[np.sum(curv * z * z) + l2, np.sum(curv * z)], [np.sum(curv * z), np.sum(curv) + 1e-12]])
        step = np.linalg.solve(hess, grad)
        w, b = w - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            converged = True
            break
    boundary = centre - scale * b / w if w > 0 else float("nan")
    return boundary, float(w), float(b), converged


def neyman_pearson_threshold(s_target: np.ndarray, s_benign: np.ndarray, max_fpr: float) -> float:
    """The lowest threshold that lets at most ``floor(max_fpr * n_benign)`` benign scores through, placed midway
    between the highest benign score it excludes and the next higher score of either class."""
    allowed = int(math.floor(max_fpr * len(s_benign) + 1e-9))
    ranked = np.sort(s_benign)[::-1]
    if allowed >= len(ranked):
        return 0.0
    excluded = ranked[allowed]
    above = np.r_[s_target, s_benign]
    above = above[above > excluded]
    upper = above.min() if len(above) else 1.0
    return float((excluded + upper) / 2)


def calibrate(s_target: np.ndarray, s_benign: np.ndarray, *, max_fpr: Optional[float] = None, recall: float = 0.9,
              l2: float = 0.1, benign_sources: Optional[Sequence] = None) -> tuple:
    """``(tau, rule)``: the threshold on calibration scores and how it was set (a JSON-ready dict).
    ``benign_sources``: the source of each benign score; with ``max_fpr``, the FPR bound then holds per source."""
    if max_fpr is not None and benign_sources is not None:
        labels = np.asarray(benign_sources)
        if labels.shape != (len(s_benign),):
            raise ValueError(f"benign_sources: expected one label per benign calibration row ({len(s_benign)}), got "
                             f"{labels.shape[0] if labels.ndim else 'a scalar'}")
        per_source = {str(g): neyman_pearson_threshold(s_target, s_benign[labels == g], max_fpr)
                      for g in dict.fromkeys(labels.tolist())}
        binding = max(per_source, key=per_source.get)
        return float(np.clip(per_source[binding], 0.0, 1.0)), {"method": "max_fpr", "max_fpr": max_fpr,
                                                                "per_source": True, "binding_source": binding}
    if max_fpr is not None:
        tau = neyman_pearson_threshold(s_target, s_benign, max_fpr)
        return float(np.clip(tau, 0.0, 1.0)), {"method": "max_fpr", "max_fpr": max_fpr, "per_source": False}
    start = float(np.quantile(s_target, 1 - recall))
    boundary, w, b, converged = _balanced_logistic_boundary(s_target, s_benign, start, l2)
    used = bool(np.isfinite(boundary))
    tau = float(np.clip(boundary if used else start, 0.0, 1.0))
    return tau, {"method": "logistic", "recall": recall, "start": start, "w": w, "b": b, "converged": converged,
                 "used": used}


# ---- the fitted gate ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GateFit:
    """A fitted gate in the op's form. ``basis`` has orthonormal columns; ``tau`` is in [0, 1]."""

    kind: str
    mean: torch.Tensor  # (d,)
    basis: torch.Tensor  # (d, r)
    tau: float
    rule: dict  # how tau was set (`calibrate`)
    details: dict  # what the variant chose on the way (rank search, explained variance, apex distance, ...)
    calibration: GateReport
    test: Optional[GateReport] = None

    @property
    def r(self) -> int:
        return self.basis.shape[1]

    def scores(self, H: torch.Tensor) -> torch.Tensor:
        return energy_ratio(H, self.basis, self.mean).float()

    def gate(self, H: torch.Tensor) -> torch.Tensor:
        return self.scores(H) >= self.tau

    def report(self) -> dict:
        return {"kind": self.kind, "r": self.r, "tau": self.tau, "rule": self.rule, **self.details,
                "calibration": self.calibration.as_dict(),
                "test": self.test.as_dict() if self.test is not None else None}


def default_rank(singular_values: torch.Tensor, n_target: int, variance: float, max_r: int) -> int:
    """SCS's documented default r: the fewest principal directions that explain ``variance`` of the target
    variance, at most ``max_r`` and at most half the number of fit targets (so held-out targets, not the fit
    set's own directions, decide the gate)."""
    energy = singular_values.double().square()
    cumulative = torch.cumsum(energy, 0) / energy.sum().clamp_min(1e-300)
    r = int(torch.searchsorted(cumulative, torch.tensor(variance, dtype=cumulative.dtype)).item()) + 1
    return max(1, min(r, max_r, max(1, n_target // 2), len(singular_values)))


def _check_rank(r, limit: int) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= limit:
        raise ValueError(f"r: expected an int in [1, {limit}] (at most min(N_target, d)), got {r!r}")


def _scs_subspace(Ht: torch.Tensor, r: Optional[int], variance: float, max_r: int) -> tuple:
    mean = Ht.mean(0)
    _, sv, vt = torch.linalg.svd(Ht - mean, full_matrices=False)
    if r is None:
        r = default_rank(sv, Ht.shape[0], variance, max_r)
    _check_rank(r, len(sv))
    explained = float(sv[:r].square().sum() / sv.square().sum().clamp_min(1e-300))
    return mean, vt[:r].T.contiguous(), {"explained_variance": explained}


def contrastive_directions(Ht: torch.Tensor, Hb: torch.Tensor, r: int) -> tuple:
    """``(mu, V, eigenvalues)``: ``mu`` = benign mean; the columns of ``V`` (orthonormalised, most contrastive
    first) span the top-``r`` generalised eigenvectors of ``E_t[(h-mu)(h-mu)^T] v = lambda Sigma_b v``, with
    ``Sigma_b`` the Ledoit-Wolf shrunk benign covariance."""
    import scipy.linalg
    from sklearn.covariance import ledoit_wolf

    mu = Hb.mean(0)
    X = (Ht - mu).numpy()
    target_moment = X.T @ X / len(X)
    benign_cov, _ = ledoit_wolf((Hb - mu).numpy(), assume_centered=True)
    d = target_moment.shape[0]
    values, vectors = scipy.linalg.eigh(target_moment, benign_cov, subset_by_index=[d - r, d - 1])
    order = np.argsort(values)[::-1]
    q, _ = np.linalg.qr(vectors[:, order])
    return mu, torch.from_numpy(np.ascontiguousarray(q)), [float(v) for v in values[order]]


def _linear_direction(Ht: torch.Tensor, Hb: torch.Tensor) -> tuple:
    """``(w, m)``: the unit shrinkage-LDA direction (targets on its positive side) and the midpoint of the
    class means."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    X = torch.cat([Ht, Hb]).numpy()
    y = np.r_[np.ones(len(Ht)), np.zeros(len(Hb))]
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(X, y)
    w = torch.from_numpy(lda.coef_[0].copy())
    w = w / w.norm()
    return w, (Ht.mean(0) + Hb.mean(0)) / 2


def _linear_gate(Ht: torch.Tensor, Hb: torch.Tensor) -> tuple:
    """``(mu, S, details)`` of the linear gate: ``S = w`` (shrinkage LDA with one coordinate ``k`` zeroed),
    ``mu = m - c w - C e_k``."""
    w, m = _linear_direction(Ht, Hb)
    X = torch.cat([Ht, Hb]) - m
    # The apex sits aside along a coordinate axis e_k whose weight in w is exactly zero, so the huge component of
    # h - mu there meets exact zeros in every dot product of the op, even when the kernels round h - mu and the
    # basis to 16 bits (a tilted axis would leak C x rounding error into the score). k: the coordinate that
    # contributes least to w.h.
    k = int(torch.argmin(w.abs() * X.std(0)))
    w[k] = 0.0
    w = w / w.norm()
    c = APEX_BEHIND * float((X @ w).abs().max())
    C = APEX_ASIDE * float(X.norm(dim=1).max() + c)
    mean = m - c * w
    mean[k] -= C
    return mean, w[:, None].contiguous(), {"apex_behind": c, "apex_aside": C, "apex_coordinate": k}


def fit_gate(kind: str, H_target: torch.Tensor, H_benign: torch.Tensor, H_target_cal: torch.Tensor,
             H_benign_cal: torch.Tensor, *, r: Optional[int] = None, max_fpr: Optional[float] = None,
             recall: float = 0.9, l2: float = 0.1, variance: float = 0.9, max_r: int = 32,
             test: Optional[Sequence[torch.Tensor]] = None, benign_cal_sources: Optional[Sequence] = None) -> GateFit:
    """Fit a gate of the given ``kind`` (`GATES`): subspace and mean on the fit split (``H_target``, and
    ``H_benign`` for the variants that use benign data), threshold on the calibration split.

    Args:
        r: subspace rank; default: the variant's own rule (``scs``: explained ``variance`` capped at ``max_r``;
            ``contrastive``: the best calibration AUC over `RANKS`; ``linear``: 1).
        max_fpr: Neyman-Pearson threshold for at most this calibration FPR; default the logistic rule
            (``recall`` start, ``l2`` penalty).
        benign_cal_sources: the source of each row of ``H_benign_cal``: with ``max_fpr``, at most that FPR on every
            source (`calibrate`).
        test: optional ``(H_target_test, H_benign_test)`` for a held-out report.
    """
    if kind not in GATES:
        raise ValueError(f"gate: expected one of {GATES}, got {kind!r}")
    Ht = as_rows("H_target", H_target, min_rows=2)
    d = Ht.shape[1]
    Htc = as_rows("H_target_cal", H_target_cal, d)
    Hbc = as_rows("H_benign_cal", H_benign_cal, d)
    if not 0 < recall < 1:
        raise ValueError(f"recall: expected a share in (0, 1), got {recall}")
    if not 0 < variance <= 1:
        raise ValueError(f"variance: expected a share in (0, 1], got {variance}")
    if max_fpr is not None and not (isinstance(max_fpr, (int, float)) and 0 <= max_fpr < 1):
        raise ValueError(f"max_fpr: expected a share in [0, 1), got {max_fpr!r}")

    if kind == "scs":
        mean, basis, details = _scs_subspace(Ht, r, variance, max_r)
    else:
        Hb = as_rows("H_benign", H_benign, d, min_rows=2)
        if kind == "linear":
            if r not in (None, 1):
                raise ValueError(f"r: the linear gate has rank 1, got {r!r}")
            mean, basis, details = _linear_gate(Ht, Hb)
        else:
            limit = min(len(Ht), d)
            candidates = [r] if r is not None else [k for k in RANKS if k <= min(limit, max(1, len(Ht) // 2))]
            if r is not None:
                _check_rank(r, limit)
            mu, V, eigenvalues = contrastive_directions(Ht, Hb, max(candidates))
            aucs = {k: roc_auc(energy_ratio(Htc, V[:, :k], mu), energy_ratio(Hbc, V[:, :k], mu))
                    for k in candidates}
            chosen = max(candidates, key=lambda k: (aucs[k], -k))
            mean, basis = mu, V[:, :chosen].contiguous()
            details = {"eigenvalues": eigenvalues[:chosen],
                       "rank_search": {str(k): a for k, a in aucs.items()} if r is None else None}

    st, sb = energy_ratio(Htc, basis, mean).numpy(), energy_ratio(Hbc, basis, mean).numpy()
    tau, rule = calibrate(st, sb, max_fpr=max_fpr, recall=recall, l2=l2, benign_sources=benign_cal_sources)
    fit = GateFit(kind=kind, mean=mean.float(), basis=basis.float(), tau=tau, rule=rule, details=details,
                  calibration=gate_report(st, sb, tau))
    if test is not None:
        Htt, Hbt = as_rows("test[0]", test[0], d), as_rows("test[1]", test[1], d)
        fit.test = gate_report(energy_ratio(Htt, basis, mean).numpy(), energy_ratio(Hbt, basis, mean).numpy(), tau)
    return fit


def fit_scs(H_target: torch.Tensor, H_target_cal: torch.Tensor, H_benign_cal: torch.Tensor, *,
            r: Optional[int] = None, variance: float = 0.9, max_r: int = 32, recall: float = 0.9, l2: float = 0.1,
            max_fpr: Optional[float] = None, test: Optional[Sequence[torch.Tensor]] = None) -> GateFit:
    """The paper's SCS gate (`fit_gate` with ``kind="scs"``; it needs no benign fit rows)."""
    return fit_gate("scs", H_target, None, H_target_cal, H_benign_cal, r=r, max_fpr=max_fpr, recall=recall, l2=l2,
                    variance=variance, max_r=max_r, test=test)
