"""Leave-one-source-out (LOSO) transfer of gates: does a gate fitted on some harmful and benign sources fire on
harmful prompts of a source it never saw, and stay off on benign prompts of a source it never saw?

Every source is split 50/25/25 into fit / calibration / test rows (seeded). For a held-out harmful source the gate
is fitted on the fit rows and calibrated on the calibration rows of all *other* sources, and its TPR is measured on
*every* row of the held-out source; the same for a held-out benign source and its FPR. The macro averages over
held-out sources are the transfer numbers; the in-distribution test rows give the usual held-out split numbers.

Layer choice (`select_layer`, ``--layer auto``) never sees the test rows or the held-out source: it ranks the
candidate layers by the *source-held-out calibration AUC* of the fold's own sources (each remaining source in turn is
left out of fitting and calibration and scored on its calibration rows against the other class's calibration rows;
the mean over sources), because the plain calibration AUC rewards gates that separate the sources they were fitted
on and says little about new ones. The plain calibration AUC is reported beside it.

`study` runs all of it on cached anchor rows (`finesteer.fitting.activation_cache`) of every source at every layer, for
every gate variant: `finesteer transfer --out results` writes ``transfer.json``, ``transfer.md`` and
``transfer.png``.
"""
from __future__ import annotations

import os
from typing import Sequence

from tqdm.auto import tqdm

from ..fitting.gates import GATES, roc_auc
from ..fitting.layer_selection import (by_side, fit_without, held_out_rates, macro, select_layer, split_indices,
                                       split_rows)
from .report_files import pyplot, write_report

POOLS = (1, 4, 8, 16)  # anchor poolings collected: the last prompt token, and means of the last n prompt tokens
FPR_TARGETS = (0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)  # Neyman-Pearson targets of the trade-off curve
# Threshold rules compared, as (name, per_source): the paper's logistic fit (None), and the Neyman-Pearson bound (the
# study's max_fpr) on the pooled benign calibration rows (False) or on every benign source (True; `gates.calibrate`).
RULES = (("logistic", None), ("max_fpr", False), ("max_fpr_per_source", True))


def _rows_by_layer(acts: dict, sizes: list, pool: int) -> dict:
    out = {}
    for layer, tensor in acts.items():
        rows, start = {}, 0
        for source, n in sizes:
            rows[source] = tensor[start:start + n, pool].double()
            start += n
        out[layer] = rows
    return out


def study(acts: dict, sizes: list, harmful_sources: Sequence[str], *, gates: Sequence[str] = GATES,
          candidate_layers: Sequence[int], fixed_layer: int = 15, max_fpr: float = 0.03,
          seed: int = 0, progress: bool = True) -> dict:
    """LOSO for every gate variant, each with its layer chosen per fold by `select_layer` and at the fixed
    ``fixed_layer`` (the steered layer), with the logistic and the Neyman-Pearson (``max_fpr``) thresholds, the
    latter on the pooled benign calibration rows and on every benign calibration source (`RULES`); the layer
    curves (plain and source-held-out calibration AUC, in-distribution test AUC); and the FPR-target trade-off
    curve of the variant the calibration criterion picks. ``acts``: layer -> (N, len(POOLS), d) rows in the order
    of ``sizes`` (``[(source, n), ...]``)."""
    splits = {source: split_indices(n, seed) for source, n in sizes}
    by_layer = _rows_by_layer(acts, sizes, 0)
    sources = [s for s, _ in sizes]
    candidates = {layer: by_layer[layer] for layer in candidate_layers}
    out: dict = {"sources": dict(sizes), "harmful_sources": list(harmful_sources), "max_fpr": max_fpr,
                 "candidate_layers": list(candidate_layers), "fixed_layer": fixed_layer, "gates": {}}
    total = len(gates) * (len(by_layer) + len(sources) + len(candidate_layers))
    bar = tqdm(total=total, desc="transfer study", unit="fit", disable=not progress)
    for kind in gates:
        curves = {}
        for layer in sorted(by_layer):
            harmful, benign = by_side(by_layer[layer], harmful_sources)
            gate = fit_without(kind, harmful, benign, splits)
            test_auc = roc_auc(gate.scores(split_rows(harmful, splits, 2)), gate.scores(split_rows(benign, splits, 2)))
            curves[layer] = {"calibration_auc": gate.calibration.auc, "test_auc": test_auc}
            bar.update()
        best, criterion = select_layer(kind, candidates, splits, harmful_sources)
        bar.update(len(candidate_layers))
        for layer, value in criterion.items():
            curves[layer]["source_held_out_calibration_auc"] = value
        folds = {}
        for held_out in sources:
            layer, _ = select_layer(kind, candidates, splits, harmful_sources, without=[held_out])
            harmful, benign = by_side(by_layer[layer], harmful_sources)
            fold = {"layer": layer}
            for prefix, at in (("", layer), ("fixed_layer_", fixed_layer)):
                harmful, benign = by_side(by_layer[at], harmful_sources)
                for rule, per_source in RULES:
                    options = {} if per_source is None else {"max_fpr": max_fpr, "per_source": per_source}
                    gate = fit_without(kind, harmful, benign, splits, [held_out], **options)
                    fold[prefix + rule] = held_out_rates(gate, harmful, benign, splits, held_out)
            folds[held_out] = fold
            bar.update()
        out["gates"][kind] = {
            "selected_layer": best, "layer_curves": {str(k): v for k, v in curves.items()}, "folds": folds,
            "macro": {prefix + rule: macro({s: f[prefix + rule] for s, f in folds.items()})
                      for prefix in ("", "fixed_layer_") for rule, _ in RULES}}
    bar.close()
    chosen = max(gates, key=lambda k: out["gates"][k]["layer_curves"][str(out["gates"][k]["selected_layer"])]
                 ["source_held_out_calibration_auc"])
    out["chosen"] = {"gate": chosen, "layer": out["gates"][chosen]["selected_layer"],
                     "by": "source-held-out calibration AUC (fit and calibration rows only)"}
    fold_layers = {s: f["layer"] for s, f in out["gates"][chosen]["folds"].items()}
    out["tradeoff"] = tradeoff(chosen, by_layer, splits, harmful_sources, fold_layers)
    out["pooling"] = pooling(chosen, acts, sizes, splits, harmful_sources, fold_layers)
    return out


def tradeoff(kind: str, by_layer: dict, splits: dict, harmful_sources, layers: dict,
             targets: Sequence[float] = FPR_TARGETS) -> list:
    """Macro LOSO TPR / FPR of ``kind`` (at each fold's own layer, ``layers``: held-out source -> layer) as the
    Neyman-Pearson FPR target (held on every benign calibration source) moves."""
    points = []
    for target in targets:
        folds = {}
        for held_out, layer in layers.items():
            harmful, benign = by_side(by_layer[layer], harmful_sources)
            gate = fit_without(kind, harmful, benign, splits, [held_out], max_fpr=target, per_source=True)
            folds[held_out] = held_out_rates(gate, harmful, benign, splits, held_out)
        points.append({"max_fpr": target, **macro(folds)})
    return points


def pooling(kind: str, acts: dict, sizes: list, splits: dict, harmful_sources, layers: dict) -> dict:
    """Macro LOSO AUC of ``kind`` for each anchor pooling (mean of the last n prompt tokens), each fold at its own
    layer (``layers``: held-out source -> layer, chosen without that source)."""
    out = {}
    for index, n in enumerate(POOLS):
        by_layer = _rows_by_layer({layer: acts[layer] for layer in set(layers.values())}, sizes, index)
        folds = {}
        for held_out, layer in layers.items():
            harmful, benign = by_side(by_layer[layer], harmful_sources)
            gate = fit_without(kind, harmful, benign, splits, [held_out])
            folds[held_out] = held_out_rates(gate, harmful, benign, splits, held_out)
        out[str(n)] = macro(folds)
    return out


# ---- outputs ------------------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def markdown_table(results: dict) -> str:
    """Per gate variant and threshold rule: TPR / FPR per held-out source and the macro averages."""
    harmful = results["harmful_sources"]
    benign = [s for s in results["sources"] if s not in harmful]
    head = ("| gate | threshold | layer | " + " | ".join(f"TPR {s}" for s in harmful) + " | **macro TPR** | "
            + " | ".join(f"FPR {s}" for s in benign) + " | **macro FPR** | macro AUC |")
    lines = [head, "|" + "|".join(["---"] * 3 + ["--:"] * (len(harmful) + len(benign) + 3)) + "|"]
    labels = {"logistic": "logistic", "max_fpr": f"max FPR {results['max_fpr']:g}, pooled",
              "max_fpr_per_source": f"max FPR {results['max_fpr']:g} per source"}
    rules = [(prefix + rule, labels[rule], layer) for prefix, layer in (("", "auto"),
                                                                         ("fixed_layer_", str(results["fixed_layer"])))
             for rule, _ in RULES]
    for kind, g in results["gates"].items():
        for rule, label, layer in rules:
            folds, m = g["folds"], g["macro"][rule]
            layers = sorted({f["layer"] for f in folds.values()}) if layer == "auto" else [int(layer)]
            shown = "auto: " + "/".join(map(str, layers)) if layer == "auto" else layer
            cells = ([_pct(folds[s][rule]["tpr"]) for s in harmful] + [f"**{_pct(m['tpr'])}**"]
                     + [_pct(folds[s][rule]["fpr"]) for s in benign] + [f"**{_pct(m['fpr'])}**", f"{m['auc']:.3f}"])
            lines.append(f"| {kind} | {label} | {shown} | " + " | ".join(cells) + " |")
    c = results["chosen"]
    lines += ["", f"Chosen by {c['by']}: **{c['gate']}** at layer {c['layer']}.", "",
              "Trade-off of the chosen gate (Neyman-Pearson threshold at each calibration FPR target; macro over "
              "held-out sources):", "", "| calibration FPR target | macro TPR (held-out harmful) | "
              "macro FPR (held-out benign) |", "|--:|--:|--:|"]
    lines += [f"| {p['max_fpr']:g} | {_pct(p['tpr'])} | {_pct(p['fpr'])} |" for p in results["tradeoff"]]
    lines += ["", "Anchor pooling (chosen gate at each fold's own layer, logistic threshold; mean of the last n prompt "
              "tokens):", "",
              "| n | macro TPR | macro FPR | macro AUC |", "|--:|--:|--:|--:|"]
    lines += [f"| {n} | {_pct(m['tpr'])} | {_pct(m['fpr'])} | {m['auc']:.3f} |" for n, m in results["pooling"].items()]
    if "timings_s" in results:  # the command's run, on a machine that may be shared
        load = results.get("load_average") or {}
        lines += ["", f"{results.get('model', '')}, {results.get('created', '')[:10]}: anchor rows "
                      f"{results['timings_s']['activations']:.0f} s, study {results['timings_s']['study']:.0f} s; "
                      f"load average {load.get('start')} at the start, {load.get('end')} at the end."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str | os.PathLike) -> None:
    """Left: layer curves per gate (source-held-out calibration AUC, the selection criterion; plain calibration
    AUC). Right: held-out macro TPR vs FPR, the chosen gate's trade-off curve and each variant's points."""
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    for i, (kind, g) in enumerate(results["gates"].items()):
        colour = f"C{i}"
        curves = {int(k): v for k, v in g["layer_curves"].items()}
        layers = sorted(curves)
        left.plot(layers, [curves[k]["calibration_auc"] for k in layers], color=colour, alpha=0.45, ls="--",
                  label=f"{kind}: calibration AUC")
        chosen = sorted(k for k in layers if "source_held_out_calibration_auc" in curves[k])
        left.plot(chosen, [curves[k]["source_held_out_calibration_auc"] for k in chosen], color=colour, marker="o",
                  label=f"{kind}: source-held-out calibration AUC")
        for rule, marker, label in (("logistic", "o", "logistic"), ("max_fpr", "s", "max FPR, pooled"),
                                    ("fixed_layer_max_fpr_per_source", "^",
                                     f"max FPR per source, layer {results['fixed_layer']}")):
            m = g["macro"][rule]
            right.scatter(100 * m["fpr"], 100 * m["tpr"], color=colour, marker=marker, s=50,
                          label=f"{kind} ({label})")
    left.set_xlabel("decoder layer")
    left.set_ylabel("ROC AUC")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    points = results["tradeoff"]
    right.plot([100 * p["fpr"] for p in points], [100 * p["tpr"] for p in points], color="black", marker=".",
               label=f"{results['chosen']['gate']}: FPR targets {points[0]['max_fpr']:g}-{points[-1]['max_fpr']:g}")
    right.axvline(3, color="grey", lw=0.8, ls=":")
    right.axhline(95, color="grey", lw=0.8, ls=":")
    right.set_xlabel("held-out benign sources: macro FPR (%)")
    right.set_ylabel("held-out harmful sources: macro TPR (%)")
    right.set_xlim(-2, 102)
    right.set_ylim(-2, 102)
    right.grid(alpha=0.3)
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{results['model']}: gate transfer, leave one source out", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(results: dict, out_dir: str | os.PathLike) -> dict:
    return write_report(out_dir, "transfer", results, markdown_table(results), lambda path: plot(results, path))
