"""Fitting steerers from cached activations (no LLM backprop): the MoSE experts and the CAA / CAST baselines, all
producing `finesteer_kernels.SteerParams` for the one unified op.

Gates (*when* to steer: the paper's SCS and the contrastive and linear variants) live in `gates`; their
names are re-exported here.

MoSE (*how* to steer), `fit_mose`: a seeded train/validation split of the (anchor, Delta) pairs; K-means on the
L2-normalised training Deltas with K chosen by the Calinski-Harabasz index; experts = raw-scale cluster means;
residual basis = top principal directions of ``Delta - V_assigned``; router ``softmax(A^T h + c)`` and residual MLP
``W2 relu(W1 h + b1) + b2`` and the scale ``gamma`` trained by MSE with AdamW on standardised inputs (folded back
into raw-input weights afterwards, so the op reads raw ``h``), gradient clipping after ``backward()``, and early
stopping on the *validation* loss, restoring the best epoch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
import torch

from finesteer_kernels import SteerParams

from .gates import GateFit, as_rows, energy_ratio, gate_report

# ---- MoSE ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MoSEReport:
    num_experts: int
    calinski_harabasz: dict  # K -> index on the training Deltas
    cluster_sizes: list
    res_rank: int
    hidden: int
    n_train: int
    n_val: int
    train_mse: list  # per epoch
    val_mse: list  # per epoch
    best_epoch: int
    best_val_mse: float
    stopped_early: bool
    caa_train_mse: float  # single mean vector (CAA), fitted on the training split
    caa_val_mse: float
    constant_inputs: int = 0  # anchor dimensions (nearly) constant in training, ignored by router and MLP

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["calinski_harabasz"] = {str(k): v for k, v in self.calinski_harabasz.items()}
        return out


@dataclasses.dataclass
class MoSEFit:
    """Fitted MoSE parts, with input weights already in raw-``h`` units."""

    experts: torch.Tensor  # (K, d)
    router_weight: Optional[torch.Tensor]  # (d, K)
    router_bias: Optional[torch.Tensor]  # (K,)
    res_in_weight: Optional[torch.Tensor]  # (m, d)
    res_in_bias: Optional[torch.Tensor]
    res_out_weight: Optional[torch.Tensor]  # (k, m)
    res_out_bias: Optional[torch.Tensor]
    res_basis: Optional[torch.Tensor]  # (k, d)
    gamma: float
    activation: str
    report: MoSEReport

    def params(self, gate: Optional[GateFit] = None, alpha: float = 1.0) -> SteerParams:
        """The op's parameters: these experts, gated by ``gate`` (or always on)."""
        gate = dict(basis=gate.basis, mean=gate.mean, tau=gate.tau) if gate is not None else {}
        return SteerParams(experts=self.experts, router_weight=self.router_weight, router_bias=self.router_bias,
                           res_in_weight=self.res_in_weight, res_in_bias=self.res_in_bias,
                           res_out_weight=self.res_out_weight, res_out_bias=self.res_out_bias,
                           res_basis=self.res_basis, activation=self.activation, gamma=self.gamma, alpha=alpha,
                           **gate)

    def predict(self, H: torch.Tensor) -> torch.Tensor:
        """The synthesised vector v(h) per row (no gate, alpha = 1), through the reference op."""
        from finesteer_kernels import reference

        p = self.params()
        return reference.coefficients(H.float(), p) @ reference.output_basis(p)


def choose_num_experts(unit_deltas: np.ndarray, k_range: Sequence[int], seed: int) -> tuple:
    """K-means for every K in ``k_range`` (that leaves >= 2 points per cluster on average); the K with the
    highest Calinski-Harabasz index. Returns (K, labels, {K: index})."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import calinski_harabasz_score

    n = len(unit_deltas)
    scores, labels = {}, {}
    for K in k_range:
        if K < 2 or K > n // 2:
            continue
        km = KMeans(n_clusters=K, n_init=10, random_state=seed).fit(unit_deltas)
        if len(np.unique(km.labels_)) < K:
            continue
        scores[K] = float(calinski_harabasz_score(unit_deltas, km.labels_))
        labels[K] = km.labels_
    if not scores:
        raise ValueError(f"Delta: too few training pairs ({n}) to cluster into any K in {tuple(k_range)}")
    best = max(scores, key=lambda K: (scores[K], -K))
    return best, labels[best], scores


def _check_training_options(*, res_rank, hidden, epochs, batch_size, lr, weight_decay, patience,
                            max_grad_norm) -> None:
    """Checked before any work, so a bad option fails at once instead of after a full training run."""
    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_finite_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not is_int(res_rank) or res_rank < 0:
        raise ValueError(f"res_rank: expected an int >= 0 (0: no residual MLP), got {res_rank!r}")
    if res_rank > 0 and (not is_int(hidden) or hidden < 1):
        raise ValueError(f"hidden: expected an int >= 1 (the residual MLP's width) when res_rank > 0, got "
                         f"{hidden!r}; pass res_rank=0 for no residual MLP")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("patience", patience)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    for name, value in (("lr", lr), ("max_grad_norm", max_grad_norm)):
        if not is_finite_number(value) or value <= 0:
            raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    if not is_finite_number(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay: expected a finite number >= 0, got {weight_decay!r}")


def _standardisation(H: torch.Tensor, relative_floor: float = 1e-3) -> tuple:
    """Per-dimension ``(mean, scale, informative)`` for standardising anchor rows. A dimension is informative when
    its std is at least ``relative_floor`` times the median std (the typical spread; the largest std if over half
    the dimensions are constant): below that it is treated as constant and its scale is set to 1."""
    mean, std = H.mean(0), H.std(0)
    typical = std.median()
    if typical == 0:
        typical = std.max()
    informative = std >= relative_floor * typical if typical > 0 else torch.zeros_like(std, dtype=torch.bool)
    return mean, torch.where(informative, std, torch.ones_like(std)), informative


def fit_mose(H_anchor: torch.Tensor, Delta: torch.Tensor, *, num_experts: Optional[int] = None,
             k_range: Sequence[int] = range(2, 11), res_rank: int = 8, hidden: int = 32,
             activation: str = "relu", epochs: int = 400, batch_size: int = 64, lr: float = 1e-2,
             weight_decay: float = 1e-2, val_fraction: float = 0.2, patience: int = 40,
             max_grad_norm: float = 1.0, seed: int = 0, ignore_inputs: Sequence[int] = ()) -> MoSEFit:
    """Fit the mixture of steering experts to ``(H_anchor[i], Delta[i])`` pairs.

    Args:
        num_experts: fixed K; default: Calinski-Harabasz over ``k_range`` (2..10).
        res_rank: k, rank of the residual basis (0: no residual MLP). hidden: m, the MLP width.
        activation: ``"relu"`` or ``"identity"``.
        epochs, batch_size, lr, weight_decay: AdamW training; patience: epochs without a better validation MSE
            before stopping; max_grad_norm: gradient clipping (after ``backward()``).
        val_fraction: share of pairs held out for early stopping and the report.
        seed: seeds the split, K-means, initialisation and batch order; equal seeds give equal tensors.
        ignore_inputs: anchor dimensions the router and residual MLP must not read (their input weights are exactly
            zero), e.g. the linear gate's apex coordinate, where ``h - mu`` is huge (`finesteer.fitting.gates`).
    """
    H = as_rows("H_anchor", H_anchor, min_rows=4)
    D = as_rows("Delta", Delta, H.shape[1])
    if D.shape[0] != H.shape[0]:
        raise ValueError(f"Delta: expected one row per anchor ({H.shape[0]}), got {D.shape[0]}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a share in (0, 1), got {val_fraction}")
    if activation not in ("relu", "identity"):
        raise ValueError(f"activation: expected 'relu' or 'identity', got {activation!r}")
    _check_training_options(res_rank=res_rank, hidden=hidden, epochs=epochs, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, patience=patience, max_grad_norm=max_grad_norm)
    n, d = H.shape
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(val_fraction * n)))
    if n - n_val < 3:
        raise ValueError(f"H_anchor: {n} pairs leave too few ({n - n_val}) for training after the validation split")
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    Ht, Dt, Hv, Dv = H[train_idx], D[train_idx], H[val_idx], D[val_idx]

    # experts: clusters of the directions of Delta, with raw-scale means
    unit = torch.nn.functional.normalize(Dt, dim=1).numpy()
    if num_experts is None:
        K, labels, ch = choose_num_experts(unit, k_range, seed)
    else:
        if not isinstance(num_experts, int) or not 1 <= num_experts <= len(Dt):
            raise ValueError(f"num_experts: expected an int in [1, {len(Dt)}], got {num_experts!r}")
        K, ch = num_experts, {}
        if K == 1:
            labels = np.zeros(len(Dt), dtype=np.int64)
        else:
            from sklearn.cluster import KMeans

            labels = KMeans(n_clusters=K, n_init=10, random_state=seed).fit(unit).labels_
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    sizes = torch.bincount(labels_t, minlength=K)
    experts = torch.stack([Dt[labels_t == j].mean(0) if sizes[j] else torch.zeros(d, dtype=Dt.dtype)
                           for j in range(K)])

    # residual basis: what the assigned experts leave unexplained
    k = min(res_rank, len(Dt) - 1, d)
    if k > 0:
        _, _, vt = torch.linalg.svd(Dt - experts[labels_t], full_matrices=False)
        res_basis = vt[:k]
    m = hidden if k > 0 else 0

    # train on standardised inputs (float32), fold the standardisation into the input weights afterwards.
    # (Nearly) constant anchor dimensions carry nothing to learn from; dividing by their tiny std would fold into
    # huge raw-input weights that turn any deviation at inference into wild logits (and overflow fp16 packing), so
    # they are zeroed in Z and get zero input weights: the router and MLP ignore them.
    in_mean, in_scale, informative = _standardisation(Ht)
    if len(ignore_inputs):
        bad = [i for i in ignore_inputs if not 0 <= int(i) < d]
        if bad:
            raise ValueError(f"ignore_inputs: indices {bad} outside the hidden size {d}")
        informative[list(ignore_inputs)] = False
    Zt = torch.where(informative, (Ht - in_mean) / in_scale, 0.0).float()
    Zv = torch.where(informative, (Hv - in_mean) / in_scale, 0.0).float()
    keep = informative.float()
    Dt32, Dv32, V = Dt.float(), Dv.float(), experts.float()
    U = res_basis.float() if k > 0 else None
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    weights = {"gamma": torch.ones(())}
    if K > 1:  # zero rows/columns for ignored inputs get zero gradients, and weight decay keeps them at zero
        weights["A"] = 0.01 * rand(d, K) * keep[:, None]
        weights["c"] = torch.log(sizes.float().clamp_min(1) / len(Dt))
    if k > 0:
        weights.update(W1=rand(m, d) / math.sqrt(d) * keep[None, :], b1=torch.zeros(m), W2=torch.zeros(k, m),
                       b2=torch.zeros(k))
    for t in weights.values():
        t.requires_grad_(True)
    decayed = [weights[n_] for n_ in ("A", "W1", "W2") if n_ in weights]
    plain = [weights[n_] for n_ in ("gamma", "c", "b1", "b2") if n_ in weights]
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                             {"params": plain, "weight_decay": 0.0}], lr=lr)

    def predict(Z: torch.Tensor) -> torch.Tensor:
        mix = torch.softmax(Z @ weights["A"] + weights["c"], -1) @ V if K > 1 else V.expand(len(Z), d)
        if k > 0:
            inner = Z @ weights["W1"].T + weights["b1"]
            if activation == "relu":
                inner = torch.relu(inner)
            mix = mix + (inner @ weights["W2"].T + weights["b2"]) @ U
        return weights["gamma"] * mix

    def mse(Z, target) -> float:
        with torch.no_grad():
            return float(torch.mean((predict(Z) - target) ** 2))

    best = {n_: t.detach().clone() for n_, t in weights.items()}
    best_val, best_epoch = mse(Zv, Dv32), 0
    train_curve, val_curve = [mse(Zt, Dt32)], [best_val]
    stale, stopped_early = 0, False
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(Zt), generator=gen)
        for start in range(0, len(Zt), batch_size):
            batch = order[start:start + batch_size]
            opt.zero_grad()
            loss = torch.mean((predict(Zt[batch]) - Dt32[batch]) ** 2)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(weights.values()), max_grad_norm)  # after backward, before step
            opt.step()
        train_curve.append(mse(Zt, Dt32))
        val_curve.append(mse(Zv, Dv32))
        if val_curve[-1] < best_val * (1 - 1e-6):
            best_val, best_epoch, stale = val_curve[-1], epoch, 0
            best = {n_: t.detach().clone() for n_, t in weights.items()}
        else:
            stale += 1
            if stale >= patience:
                stopped_early = True
                break

    # fold standardisation: A^T ((h - m) / s) + c == (A / s)^T h + (c - (m / s) @ A)
    inv = (1.0 / in_scale).float()
    shift = (in_mean / in_scale).float()
    router_weight = router_bias = res_in_weight = res_in_bias = res_out_weight = res_out_bias = None
    if K > 1:
        router_weight = best["A"] * inv[:, None]
        router_bias = best["c"] - shift @ best["A"]
    if k > 0:
        res_in_weight = best["W1"] * inv[None, :]
        res_in_bias = best["b1"] - best["W1"] @ shift
        res_out_weight, res_out_bias = best["W2"], best["b2"]
    caa = Dt.mean(0)
    report = MoSEReport(
        num_experts=K, calinski_harabasz=ch, cluster_sizes=[int(x) for x in sizes], res_rank=k, hidden=m,
        n_train=len(Dt), n_val=len(Dv), train_mse=train_curve, val_mse=val_curve, best_epoch=best_epoch,
        best_val_mse=best_val, stopped_early=stopped_early, constant_inputs=int((~informative).sum()),
        caa_train_mse=float(torch.mean((Dt - caa) ** 2)), caa_val_mse=float(torch.mean((Dv - caa) ** 2)))
    return MoSEFit(experts=experts.float(), router_weight=router_weight, router_bias=router_bias,
                   res_in_weight=res_in_weight, res_in_bias=res_in_bias, res_out_weight=res_out_weight,
                   res_out_bias=res_out_bias, res_basis=res_basis.float() if k > 0 else None,
                   gamma=float(best["gamma"]), activation=activation, report=report)


def remove_group_means(Delta: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    """``Delta - mean(Delta of its group) + mean(Delta)``: removes a per-group offset (e.g. which completion
    template a prompt was paired with) that no function of the anchor can predict, keeping the overall mean and
    the variation within groups."""
    D = as_rows("Delta", Delta)
    if len(groups) != len(D):
        raise ValueError(f"groups: expected one group id per row of Delta ({len(D)}), got {len(groups)}")
    ids = torch.as_tensor(list(groups), dtype=torch.long)
    _, ids = torch.unique(ids, return_inverse=True)
    counts = torch.bincount(ids).double()
    means = torch.zeros(len(counts), D.shape[1], dtype=D.dtype).index_add_(0, ids, D) / counts[:, None]
    return (D - means[ids] + D.mean(0)).to(Delta.dtype)


# ---- baselines ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BaselineFit:
    """A baseline in the op's format, with its report."""

    params: SteerParams
    report: dict


def fit_caa(Delta: torch.Tensor, alpha: float = 1.0) -> BaselineFit:
    """CAA / control vector: the mean Delta, no gate, one expert."""
    D = as_rows("Delta", Delta)
    vector = D.mean(0)
    return BaselineFit(SteerParams(experts=vector[None].float(), alpha=alpha),
                       {"train_mse": float(torch.mean((D - vector) ** 2)), "vector_norm": float(vector.norm()),
                        "n": len(D)})


def _best_f1_threshold(s_target: np.ndarray, s_benign: np.ndarray) -> tuple:
    """``(F1, threshold)``: the gate (on when score >= threshold) with the best F1 on calibration data; among equal
    F1s the lowest cut (the higher recall). The threshold lies midway between the lowest score the cut keeps on and
    the highest it leaves off (half the lowest score when it keeps all on): a threshold on a calibration score
    itself would let the stored steerer's own rounding of that score flip it, and the reported F1 with it."""
    candidates = np.unique(np.r_[s_target, s_benign])
    best = (-1.0, 0)
    for i, t in enumerate(candidates):
        tp = float((s_target >= t).sum())
        fp = float((s_benign >= t).sum())
        fn = len(s_target) - tp
        f1 = 2 * tp / max(2 * tp + fp + fn, 1.0)
        if f1 > best[0]:
            best = (f1, i)
    f1, i = best
    below = float(candidates[i - 1]) if i > 0 else 0.0
    return f1, (below + float(candidates[i])) / 2


def fit_cast(H_target: torch.Tensor, H_benign: torch.Tensor, Delta: torch.Tensor, H_target_cal: torch.Tensor,
             H_benign_cal: torch.Tensor, *, test: Optional[Sequence[torch.Tensor]] = None,
             alpha: float = 1.0) -> BaselineFit:
    """CAST: condition direction ``u`` = normalised difference of the target and benign means (fit split); the
    condition ``cos(h, u u^T h) = |u.h| / ||h|| >= theta`` is the op's gate with ``mean=None``, ``basis=u`` and
    ``tau = theta^2``; theta is the best-F1 threshold on the calibration split (between two calibration scores,
    `_best_f1_threshold`). Behaviour vector: the mean Delta."""
    Ht = as_rows("H_target", H_target)
    d = Ht.shape[1]
    Hb = as_rows("H_benign", H_benign, d)
    D = as_rows("Delta", Delta, d)
    Htc, Hbc = as_rows("H_target_cal", H_target_cal, d), as_rows("H_benign_cal", H_benign_cal, d)
    direction = Ht.mean(0) - Hb.mean(0)
    if direction.norm() == 0:
        raise ValueError("H_target, H_benign: equal means, no condition direction")
    basis = (direction / direction.norm())[:, None]
    st, sb = energy_ratio(Htc, basis, None).numpy(), energy_ratio(Hbc, basis, None).numpy()
    f1, tau = _best_f1_threshold(st, sb)
    tau = float(np.clip(tau, 0.0, 1.0))
    report = {"theta": math.sqrt(tau), "tau": tau, "calibration_f1": f1,
              "calibration": gate_report(st, sb, tau).as_dict(), "test": None}
    if test is not None:
        Htt, Hbt = as_rows("test[0]", test[0], d), as_rows("test[1]", test[1], d)
        report["test"] = gate_report(energy_ratio(Htt, basis, None).numpy(),
                                     energy_ratio(Hbt, basis, None).numpy(), tau).as_dict()
    params = SteerParams(experts=D.mean(0)[None].float(), basis=basis.float(), tau=tau, alpha=alpha,
                         orthonormalize=True)
    return BaselineFit(params, report)
