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

`study` runs all of it on cached anchor rows (`finesteer.activation_cache`) of every source at every layer, for
every gate variant: `finesteer transfer --out results` writes ``transfer.json``, ``transfer.md`` and
``transfer.png``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as datasets
from .gates import GATES, fit_gate, roc_auc
from .report_files import pyplot, write_report

SOURCE_CAP = 250  # prompts per source at most (seeded, stratified draw): bounds the one pass over the model
POOLS = (1, 4, 8, 16)  # anchor poolings collected: the last prompt token, and means of the last n prompt tokens
FPR_TARGETS = (0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)  # Neyman-Pearson targets of the trade-off curve


def source_pools(sharegpt: int = SOURCE_CAP, cap: Optional[int] = SOURCE_CAP, seed: int = 0,
                 exclude: Sequence[str] = ()) -> tuple:
    """``({harmful source: PromptSet}, {benign source: PromptSet})``: every harmful and benign source of the
    safety recipe without the prompts of ``exclude`` (compared after `finesteer.data.normalize`), each drawn down to
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


def _part(side: dict, splits: dict, k: int, without: Sequence[str] = ()) -> torch.Tensor:
    return torch.cat([rows[splits[s][k]] for s, rows in side.items() if s not in without])


def fit_without(kind: str, harmful: dict, benign: dict, splits: dict, without: Sequence[str] = (), **gate_options):
    """A gate fitted and calibrated on every source except those in ``without`` (``harmful`` / ``benign``:
    source -> (N, d) rows at one layer; ``splits``: source -> (fit, calibration, test) indices)."""
    return fit_gate(kind, _part(harmful, splits, 0, without), _part(benign, splits, 0, without),
                    _part(harmful, splits, 1, without), _part(benign, splits, 1, without), **gate_options)


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
            rest = gate.scores(_part(other, splits, 1, without))
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
        own, other = harmful[held_out], _part(benign, splits, 2)
        s_own, s_other = gate.scores(own), gate.scores(other)
        return {"side": "harmful", "tpr": float((s_own >= gate.tau).float().mean()),
                "fpr_in_distribution": float((s_other >= gate.tau).float().mean()),
                "auc": roc_auc(s_own, s_other), "n": len(own)}
    own, other = benign[held_out], _part(harmful, splits, 2)
    s_own, s_other = gate.scores(own), gate.scores(other)
    return {"side": "benign", "fpr": float((s_own >= gate.tau).float().mean()),
            "tpr_in_distribution": float((s_other >= gate.tau).float().mean()),
            "auc": roc_auc(s_other, s_own), "n": len(own)}


def macro(per_source: dict) -> dict:
    tprs = [r["tpr"] for r in per_source.values() if r["side"] == "harmful"]
    fprs = [r["fpr"] for r in per_source.values() if r["side"] == "benign"]
    return {"tpr": float(np.mean(tprs)), "fpr": float(np.mean(fprs)),
            "auc": float(np.mean([r["auc"] for r in per_source.values()]))}


# ---- the study ----------------------------------------------------------------------------------------------------
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
    """LOSO for every gate variant, each with its layer chosen per fold by `select_layer` (and at the fixed
    ``fixed_layer`` for reference), with the logistic and the Neyman-Pearson (``max_fpr``) thresholds; the layer
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
            test_auc = roc_auc(gate.scores(_part(harmful, splits, 2)), gate.scores(_part(benign, splits, 2)))
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
            for rule, options in (("logistic", {}), ("max_fpr", {"max_fpr": max_fpr})):
                gate = fit_without(kind, harmful, benign, splits, [held_out], **options)
                fold[rule] = held_out_rates(gate, harmful, benign, splits, held_out)
            harmful, benign = by_side(by_layer[fixed_layer], harmful_sources)
            gate = fit_without(kind, harmful, benign, splits, [held_out])
            fold["fixed_layer_logistic"] = held_out_rates(gate, harmful, benign, splits, held_out)
            folds[held_out] = fold
            bar.update()
        out["gates"][kind] = {
            "selected_layer": best, "layer_curves": {str(k): v for k, v in curves.items()}, "folds": folds,
            "macro": {rule: macro({s: f[rule] for s, f in folds.items()})
                      for rule in ("logistic", "max_fpr", "fixed_layer_logistic")}}
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
    Neyman-Pearson FPR target moves."""
    points = []
    for target in targets:
        folds = {}
        for held_out, layer in layers.items():
            harmful, benign = by_side(by_layer[layer], harmful_sources)
            gate = fit_without(kind, harmful, benign, splits, [held_out], max_fpr=target)
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
    rules = (("logistic", "logistic", "auto"), ("max_fpr", f"max FPR {results['max_fpr']:g}", "auto"),
             ("fixed_layer_logistic", "logistic", str(results["fixed_layer"])))
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
        for rule, marker in (("logistic", "o"), ("max_fpr", "s")):
            m = g["macro"][rule]
            right.scatter(100 * m["fpr"], 100 * m["tpr"], color=colour, marker=marker, s=50,
                          label=f"{kind} ({'logistic' if rule == 'logistic' else 'max FPR'})")
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


# ---- command line -------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="'smollm2', a local Hugging Face folder or a .gguf file")
    parser.add_argument("--gates", default=",".join(GATES), help=f"comma-separated subset of {','.join(GATES)}")
    parser.add_argument("--cap", type=int, default=SOURCE_CAP, help="prompts per source at most")
    parser.add_argument("--max-fpr", type=float, default=0.03, help="the Neyman-Pearson rule's calibration FPR")
    parser.add_argument("--seed", type=int, default=0, help="seeds the per-source draws and splits")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--cache-dir", default=None,
                        help="activation cache folder (default: $FINESTEER_CACHE/activations or "
                             "~/.cache/finesteer/activations)")
    parser.add_argument("--out", default="results", help="folder for transfer.json, transfer.md, transfer.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from .activation_cache import cached_anchor_activations
    from .layers import num_layers
    from .models import load_model
    from .workflow import exit_on_missing_package, model_identity, scored_prompts

    gates = [g.strip() for g in args.gates.split(",") if g.strip()]  # checked by `finesteer.preflight.transfer`
    started = time.perf_counter()
    try:
        # the study picks demo's and eval's default gate and layer: it never sees the prompts they score
        harmful, benign = source_pools(sharegpt=args.cap, cap=args.cap, seed=args.seed, exclude=scored_prompts())
        model, tokenizer = load_model(args.model, progress=not args.quiet)
    except FileNotFoundError as e:
        raise exit_on_missing_package("transfer", e) from None
    sizes = [(s, len(ps)) for side in (harmful, benign) for s, ps in side.items()]
    prompts = [p for side in (harmful, benign) for ps in side.values() for p in ps.prompts]
    name = model_identity(args.model)
    depth = num_layers(model)
    acts = cached_anchor_activations(model, tokenizer, prompts, range(depth), model_name=name, pools=POOLS,
                                     batch_size=args.batch_size, cache=args.cache_dir, progress=not args.quiet)
    collected = time.perf_counter()
    searched = candidate_layers(depth)
    results = study(acts, sizes, list(harmful), gates=gates, candidate_layers=searched,
                    fixed_layer=depth // 2, max_fpr=args.max_fpr, seed=args.seed, progress=not args.quiet)
    results.update(model=name, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command="finesteer transfer " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                            vars(args).items() if k not in ("func", "command", "quiet", "debug")
                                                            and v is not None),
                   provenance={s: ps.provenance() for side in (harmful, benign) for s, ps in side.items()},
                   timings_s={"activations": collected - started, "study": time.perf_counter() - collected})
    paths = write_outputs(results, args.out)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
