"""Which layer to steer: the one layer criterion of ``--layer auto`` (`finesteer fit`, `demo`, `eval`) and of
`finesteer layers`, judged on the recipe's calibration split.

`finesteer transfer` ranks layers by how well the *gate* separates sources it never saw. That is half of the
question: a gate is of no use at a layer where adding the steering vector hardly changes the reply, and on SmolLM2
the gate criterion is nearly flat over the second half of the network (linear gate: 0.835-0.857 at layers 15-27)
while steering there is not (the gate criterion alone picked layer 27, where steered refusal stays near 20 %).
So `steering_judge` fits the recipe's steerer at each candidate layer (`finesteer.fitting.recipes.fit_recipe` with
``layer="auto"``: one pass over the prompts for all of them) and measures, on the recipe's **calibration** split
only (never its test split, which `finesteer eval` scores):

- the gate's TPR on harmful and FPR on benign calibration prompts (in query mode a prompt whose gate stays shut is
  generated bit-identically, so ``1 - FPR`` is the share of benign replies left unchanged);
- the refusal rate (`finesteer.studies.refusal.is_refusal`, the eval's detector) of greedy replies to the harmful
  calibration prompts, unsteered and steered (query mode, the steerer's own alpha unless given). Only prompts whose
  gate opens are generated again: the others reply exactly as unsteered.

Rule: among the layers whose benign calibration FPR meets the fit's target (all of them with the default
Neyman-Pearson threshold), the highest steered refusal; ties go to the higher source-held-out calibration AUC of
the gate, then to the earlier layer. ``layers.json``, ``layers.md`` and ``layers.png`` show the evidence.
"""
from __future__ import annotations

import datetime
import time
from typing import Optional, Sequence

from tqdm.auto import tqdm

from ..fitting.defaults import DEFAULT_MAX_FPR
from ..fitting.held_out import gate_scores
from ..fitting.models import model_identity
from ..fitting.recipes import steering_candidates
from ..fitting.steerer_cache import fitted_steerer
from .generation import encode_batches, generate
from .refusal import is_refusal
from .report_files import pyplot, write_report

JUDGE_NEW_TOKENS = 16  # greedy tokens per judged reply: refusals announce themselves in the first few words
CRITERION = "steered refusal on the harmful calibration prompts (query mode), benign calibration FPR within target"


def default_layers(n_layers: int) -> list:
    """The layers compared by default (`finesteer.fitting.recipes.steering_candidates`)."""
    return steering_candidates(n_layers)


def measure(model, tokenizer, candidates, *, alpha: Optional[float] = None, max_new_tokens: int = JUDGE_NEW_TOKENS,
            gen_batch_size: int = 16, max_prompt_tokens: int = 256, progress: bool = True) -> list:
    """One row per candidate layer (`finesteer.fitting.recipes.LayerCandidates`): gate TPR / FPR on the calibration
    prompts and the refusal rate of the harmful ones' greedy replies, unsteered and steered."""
    from ..patching import patch_model

    harmful = candidates.target_calibration
    batches = encode_batches(tokenizer, harmful.prompts, gen_batch_size, max_prompt_tokens)
    unsteered = generate(model, tokenizer, batches, len(harmful), max_new_tokens)
    refused_unsteered = [is_refusal(t) for t in unsteered.texts]
    rows = []
    for layer in tqdm(sorted(candidates.steerers), desc="layers", unit="layer", disable=not progress):
        steerer = candidates.steerers[layer]
        on_target, on_benign = (gate_scores(steerer, anchors)[1] for anchors in candidates.anchors[layer])
        opened = [i for i in range(len(harmful)) if on_target[i]]
        refused = list(refused_unsteered)  # a prompt whose gate stays shut replies exactly as unsteered
        if opened:
            strength = steerer.params.alpha if alpha is None else alpha
            with patch_model(model, steerer, mode="query", alpha=strength):
                steered = generate(model, tokenizer, encode_batches(tokenizer, [harmful.prompts[i] for i in opened],
                                                                    gen_batch_size, max_prompt_tokens),
                                   len(opened), max_new_tokens)
            for i, text in zip(opened, steered.texts):
                refused[i] = is_refusal(text)
        rows.append({"layer": layer, "gate_tpr": float(on_target.float().mean()),
                     "gate_fpr": float(on_benign.float().mean()),
                     "refusal_unsteered": sum(refused_unsteered) / len(harmful),
                     "refusal_steered": sum(refused) / len(harmful),
                     "gate_criterion": candidates.gate_criterion.get(layer)})
    return rows


def choose(rows: Sequence[dict], max_fpr: Optional[float]) -> dict:
    """The row `steering_judge`'s rule picks: among rows whose benign FPR is within ``max_fpr`` (the default
    target when the threshold rule has none; all rows if none is), the highest steered refusal, then the higher
    gate criterion, then the earlier layer."""
    limit = DEFAULT_MAX_FPR if max_fpr is None else max_fpr
    eligible = [r for r in rows if r["gate_fpr"] <= limit + 1e-9] or list(rows)
    return max(eligible, key=lambda r: (r["refusal_steered"], r["gate_criterion"] or 0.0, -r["layer"]))


def steering_judge(model, tokenizer, *, alpha: Optional[float] = None, max_new_tokens: int = JUDGE_NEW_TOKENS,
                   gen_batch_size: int = 16, max_prompt_tokens: int = 256, progress: bool = True):
    """The ``choose_layer`` callable of `finesteer.fitting.recipes.fit_recipe` for ``layer="auto"``: `measure` the
    candidates and `choose`; the evidence (every row, the rule, the settings) goes into the steerer's metadata."""
    def judge(candidates) -> tuple:
        started = time.perf_counter()
        rows = measure(model, tokenizer, candidates, alpha=alpha, max_new_tokens=max_new_tokens,
                       gen_batch_size=gen_batch_size, max_prompt_tokens=max_prompt_tokens, progress=progress)
        best = choose(rows, candidates.max_fpr)
        pct = lambda share: f"{100 * share:.0f} %"  # noqa: E731
        why = (f"layer {best['layer']}: {pct(best['refusal_steered'])} of {len(candidates.target_calibration)} "
               f"harmful calibration prompts refused when steered ({pct(best['refusal_unsteered'])} unsteered), "
               f"gate FPR {pct(best['gate_fpr'])} on {len(candidates.benign_calibration)} benign calibration "
               "prompts; steered refusal per layer: "
               + ", ".join(f"{r['layer']}: {pct(r['refusal_steered'])}" for r in rows))
        return best["layer"], {"criterion": CRITERION, "why": why, "chosen": best["layer"], "rows": rows,
                               "alpha": alpha, "mode": "query", "max_new_tokens": max_new_tokens,
                               "data": {"harmful": {"n": len(candidates.target_calibration),
                                                    "sources": candidates.target_calibration.counts()},
                                        "benign": {"n": len(candidates.benign_calibration),
                                                   "sources": candidates.benign_calibration.counts()},
                                        "split": "calibration"},
                               "seconds": time.perf_counter() - started}
    return judge


def layer_judge(model, tokenizer, layer, options, progress: bool = True, **settings) -> dict:
    """The keyword arguments of `finesteer.fitting.steerer_cache.fitted_steerer` that make ``layer="auto"`` use
    `steering_judge` (with ``settings``, which also key the cache); nothing for any other ``layer``."""
    if layer != "auto":
        return {}
    return {"choose_layer": steering_judge(model, tokenizer, max_prompt_tokens=options.max_prompt_tokens,
                                           progress=progress, **settings), "judge": settings}


def study(model, tokenizer, *, model_name: str, options, layers: Sequence[int], alpha: Optional[float] = None,
          max_new_tokens: int = JUDGE_NEW_TOKENS, gen_batch_size: int = 16, cache: Optional[str] = None,
          refit: bool = False, progress: bool = True) -> dict:
    """`fitted_steerer` with ``layer="auto"`` over ``layers``: the judge's evidence and choice (the content of
    ``layers.json``)."""
    started = time.perf_counter()
    settings = {"alpha": alpha, "max_new_tokens": max_new_tokens, "gen_batch_size": gen_batch_size}
    steerer, _ = fitted_steerer(model, tokenizer, "finesteer", "auto", options, model_name, cache, refit, progress,
                                candidates=layers, **layer_judge(model, tokenizer, "auto", options, progress,
                                                                 **settings))
    choice = steerer.metadata["layer_choice"]
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model_identity(model_name),
        "alpha": steerer.params.alpha if alpha is None else alpha, "mode": "query",
        "max_new_tokens": max_new_tokens,
        "fit_options": steerer.metadata["options"],
        "data": choice["data"], "rows": choice["rows"],
        "chosen": {"layer": choice["chosen"], "by": choice["criterion"], "why": choice["why"]},
        "gate_criterion": choice["gate_criterion"],
        "timings_s": {"total": time.perf_counter() - started, "judge": choice["seconds"],
                      "fit": steerer.metadata["timings"]},
    }


def markdown(results: dict) -> str:
    lines = [f"{results['model']}, query mode, alpha {results['alpha']:g}, greedy, {results['max_new_tokens']} new "
             f"tokens; the safety recipe's calibration split ({results['data']['harmful']['n']} harmful, "
             f"{results['data']['benign']['n']} benign prompts).", "",
             "| layer | gate TPR (harmful) | gate FPR (benign) | refusal unsteered | refusal steered | "
             "gate criterion (tie-breaker) |",
             "|--:|--:|--:|--:|--:|--:|"]
    for r in results["rows"]:
        mark = "**" if r["layer"] == results["chosen"]["layer"] else ""
        criterion = "—" if r["gate_criterion"] is None else f"{r['gate_criterion']:.3f}"
        pct = {k: f"{100 * r[k]:.0f} %" for k in ("gate_tpr", "gate_fpr", "refusal_unsteered", "refusal_steered")}
        lines.append(f"| {mark}{r['layer']}{mark} | {pct['gate_tpr']} | {pct['gate_fpr']} | "
                     f"{pct['refusal_unsteered']} | {mark}{pct['refusal_steered']}{mark} | {criterion} |")
    lines += ["", f"Chosen: layer **{results['chosen']['layer']}** ({results['chosen']['by']}; the gate criterion is "
              f"{results['gate_criterion']['name']}). {results['chosen']['why']}. The same judge picks the layer of "
              "`--layer auto` in finesteer fit, demo and eval."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path) -> None:
    plt = pyplot()

    layers = [r["layer"] for r in results["rows"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label in (("refusal_steered", f"refusal, steered (alpha {results['alpha']:g})"),
                       ("refusal_unsteered", "refusal, unsteered"), ("gate_tpr", "gate TPR (harmful)"),
                       ("gate_fpr", "gate FPR (benign)")):
        ax.plot(layers, [100 * r[key] for r in results["rows"]], marker="o", label=label)
    ax.axvline(results["chosen"]["layer"], color="grey", linestyle=":")
    ax.set_xlabel("steered layer")
    ax.set_ylabel("% of calibration prompts")
    ax.set_title(f"{results['model']}: which layer to steer (calibration split)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, out_dir) -> dict:
    return write_report(out_dir, "layers", results, markdown(results), lambda path: plot(results, path))
