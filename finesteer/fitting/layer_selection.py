"""Choosing where a gate reads, from fit and calibration rows only: per-source prompt pools, seeded per-source
splits, a gate fitted without some sources, its held-out rates, and the layer ranked best by the source-held-out
calibration AUC. The recipes (``layer="auto"``) and `finesteer transfer` (`finesteer.studies.transfer`) both use it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from . import data as datasets
from .gates import fit_gate, roc_auc

SOURCE_CAP = 250  # prompts per source at most (seeded, stratified draw): bounds the one pass over the model


def source_pools(sharegpt: int = SOURCE_CAP, cap: Optional[int] = SOURCE_CAP, seed: int = 0,
                 exclude: Sequence[str] = ()) -> tuple:
    """``({harmful source: PromptSet}, {benign source: PromptSet})``: every harmful and benign source of the
    safety recipe without the prompts of ``exclude`` (compared after `data.normalize`), each drawn down to
    ``cap`` prompts, disjoint across sources (a prompt in two sources is kept in the first)."""
    harmful = datasets.harmful_prompts()
    benign = datasets.benign_prompts(sharegpt, exclude=[harmful])
    banned = {datasets.normalize(p) for p in exclude}
    sides = []
    for pool in (harmful, benign):
        by_source = {}
        for label in pool.sources:
            ps = pool.select([i for i, (s, p) in enumerate(zip(pool.source_of, pool.prompts))
                              if s == label and datasets.normalize(p) not in banned], label)
            if len(ps):
                by_source[label] = datasets.subsample(ps, cap, seed) if cap else ps
        sides.append(by_source)
    return tuple(sides)


def split_indices(n: int, seed: int, fractions=(0.5, 0.25, 0.25)) -> tuple:
    """Seeded fit / calibration / test row indices of one source."""
    order = np.random.default_rng(seed).permutation(n)
    n_fit, n_cal = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    return order[:n_fit], order[n_fit:n_fit + n_cal], order[n_fit + n_cal:]


def split_rows(side: dict, splits: dict, k: int, without: Sequence[str] = ()) -> torch.Tensor:
    """The rows of split ``k`` (0 fit, 1 calibration, 2 test) of every source of one side not in ``without``."""
    return torch.cat([rows[splits[s][k]] for s, rows in side.items() if s not in without])


def fit_without(kind: str, harmful: dict, benign: dict, splits: dict, without: Sequence[str] = (),
                per_source: bool = False, **gate_options):
    """A gate fitted and calibrated on every source except those in ``without`` (``harmful`` / ``benign``:
    source -> (N, d) rows at one layer; ``splits``: source -> (fit, calibration, test) indices). ``per_source``:
    a ``max_fpr`` threshold holds on every benign calibration source, not only on their pool (`gates.calibrate`)."""
    sources = [s for s in benign for _ in splits[s][1] if s not in without] if per_source else None
    return fit_gate(kind, split_rows(harmful, splits, 0, without), split_rows(benign, splits, 0, without),
                    split_rows(harmful, splits, 1, without), split_rows(benign, splits, 1, without),
                    benign_cal_sources=sources, **gate_options)


def source_held_out_auc(kind: str, harmful: dict, benign: dict, splits: dict, without: Sequence[str] = (),
                        **gate_options) -> float:
    """The layer-selection criterion: mean over the sources not in ``without`` of the calibration AUC of that
    source (its calibration rows against the other class's calibration rows) for a gate fitted without it. A side
    with a single source keeps it (nothing would be left to fit on); with one source on each side this is the plain
    calibration AUC. Uses fit and calibration rows only."""
    aucs = []
    for side, other in ((harmful, benign), (benign, harmful)):
        for source in held_out_candidates(side, without):
            if len(splits[source][1]) == 0:
                continue
            gate = fit_without(kind, harmful, benign, splits, (*without, source), **gate_options)
            own = gate.scores(side[source][splits[source][1]])
            rest = gate.scores(split_rows(other, splits, 1, without))
            aucs.append(roc_auc(own, rest) if side is harmful else roc_auc(rest, own))
    if not aucs:
        return fit_without(kind, harmful, benign, splits, without, **gate_options).calibration.auc
    return float(np.mean(aucs))


def held_out_candidates(side: dict, without: Sequence[str] = ()) -> list:
    """The sources of one side that can be left out: all of them unless only one would remain."""
    left = [s for s in side if s not in without]
    return left if len(left) > 1 else []


def by_side(rows: dict, harmful_sources: Sequence[str]) -> tuple:
    """``({harmful source: rows}, {benign source: rows})`` from one layer's ``{source: rows}``."""
    return ({s: r for s, r in rows.items() if s in harmful_sources},
            {s: r for s, r in rows.items() if s not in harmful_sources})


def candidate_layers(n_layers: int) -> list:
    """The layers ``layer="auto"`` searches: every tenth of the depth, first and last layer excluded (for 30
    layers: 3, 6, ..., 27)."""
    step = max(1, n_layers // 10)
    return list(range(step, n_layers - 1, step)) or [n_layers // 2]


def select_layer(kind: str, rows_by_layer: dict, splits: dict, harmful_sources: Sequence[str],
                 without: Sequence[str] = (), **gate_options) -> tuple:
    """``(best layer, {layer: criterion})``: `source_held_out_auc` per layer of ``rows_by_layer`` (layer ->
    {source: rows}); ties go to the earlier layer (cheaper to reach)."""
    scores = {}
    for layer, rows in rows_by_layer.items():
        scores[layer] = source_held_out_auc(kind, *by_side(rows, harmful_sources), splits, without, **gate_options)
    best = max(scores, key=lambda layer: (scores[layer], -layer))
    return best, scores


def held_out_rates(gate, harmful: dict, benign: dict, splits: dict, held_out: str) -> dict:
    """TPR (held-out harmful source) or FPR (held-out benign source) on all its rows, with the in-distribution
    test rates of the other class and the AUC of the held-out rows against them."""
    if held_out in harmful:
        own, other = harmful[held_out], split_rows(benign, splits, 2)
        s_own, s_other = gate.scores(own), gate.scores(other)
        return {"side": "harmful", "tpr": float((s_own >= gate.tau).float().mean()),
                "fpr_in_distribution": float((s_other >= gate.tau).float().mean()),
                "auc": roc_auc(s_own, s_other), "n": len(own)}
    own, other = benign[held_out], split_rows(harmful, splits, 2)
    s_own, s_other = gate.scores(own), gate.scores(other)
    return {"side": "benign", "fpr": float((s_own >= gate.tau).float().mean()),
            "tpr_in_distribution": float((s_other >= gate.tau).float().mean()),
            "auc": roc_auc(s_other, s_own), "n": len(own)}


def macro(per_source: dict) -> dict:
    tprs = [r["tpr"] for r in per_source.values() if r["side"] == "harmful"]
    fprs = [r["fpr"] for r in per_source.values() if r["side"] == "benign"]
    return {"tpr": float(np.mean(tprs)), "fpr": float(np.mean(fprs)),
            "auc": float(np.mean([r["auc"] for r in per_source.values()]))}
