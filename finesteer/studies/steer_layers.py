"""`finesteer layers`: which layer to steer, judged on the safety recipe's calibration split.

`finesteer transfer` ranks layers by how well the *gate* separates sources it never saw. That is half of the
question: a gate is of no use at a layer where adding the steering vector hardly changes the reply, and on SmolLM2
the gate criterion is nearly flat over the second half of the network (linear gate: 0.835-0.857 at layers 15-27)
while steering there is not. This study fits the recipe's FineSteer steerer at each candidate layer (the same fit
`finesteer eval` makes, cached under the same key) and measures, on the recipe's **calibration** split only (never
its test split, which `finesteer eval` scores):

- the gate's TPR on harmful and FPR on benign calibration prompts (in query mode a prompt whose gate stays shut is
  generated bit-identically, so ``1 - FPR`` is the share of benign replies left unchanged);
- the refusal rate of greedy replies to the harmful calibration prompts, unsteered and steered (query mode, the
  given alpha).

The layer with the highest steered refusal rate is the choice (ties: the earlier layer). Outputs: ``layers.json``,
``layers.md`` and ``layers.png``.
"""
from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Optional, Sequence

from tqdm.auto import tqdm

from ..fitting.held_out import anchor_activations, gate_scores, held_out_prompts
from ..fitting.layer_selection import candidate_layers
from ..fitting.models import model_identity
from ..fitting.steerer_cache import fitted_steerer
from .generation import encode_batches, generate
from .refusal import is_refusal
from .report_files import pyplot, write_report

DEFAULT_ALPHA = 2.0


def default_layers(n_layers: int) -> list:
    """The gate study's candidate layers (`transfer.candidate_layers`) in the second half of the network."""
    return [layer for layer in candidate_layers(n_layers) if layer >= n_layers // 2]


def study(model, tokenizer, *, model_name: str, options, layers: Sequence[int], alpha: float = DEFAULT_ALPHA,
          max_new_tokens: int = 24, gen_batch_size: int = 16, cache: Optional[str] = None, refit: bool = False,
          progress: bool = True) -> dict:
    """Per layer: gate TPR / FPR and steered refusal on the calibration split; the chosen layer (the content of
    ``layers.json``)."""
    from .. import patching

    started = time.perf_counter()
    harmful, benign = held_out_prompts(options, split="calibration")
    batches = encode_batches(tokenizer, harmful.prompts, gen_batch_size, options.max_prompt_tokens)
    unsteered = generate(model, tokenizer, batches, len(harmful), max_new_tokens)
    baseline = sum(map(is_refusal, unsteered.texts)) / len(harmful)
    rows = []
    for layer in tqdm(layers, desc="layers", unit="layer", disable=not progress):
        steerer, from_cache = fitted_steerer(model, tokenizer, "finesteer", layer, options, model_name, cache, refit,
                                             progress)
        gate_on = {side: gate_scores(steerer, anchor_activations(model, tokenizer, ps.prompts, layer, options,
                                                                 progress))[1].float().mean().item()
                   for side, ps in (("harmful", harmful), ("benign", benign))}
        with patching.patch_model(model, steerer, mode="query", alpha=alpha):
            steered = generate(model, tokenizer, batches, len(harmful), max_new_tokens)
        rows.append({"layer": layer, "from_cache": from_cache, "gate_tpr": gate_on["harmful"],
                     "gate_fpr": gate_on["benign"],
                     "refusal_steered": sum(map(is_refusal, steered.texts)) / len(harmful),
                     "refusal_unsteered": baseline})
    best = max(rows, key=lambda r: (r["refusal_steered"], -r["layer"]))
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model_identity(model_name),
        "alpha": alpha, "mode": "query", "max_new_tokens": max_new_tokens,
        "fit_options": {**dataclasses.asdict(options), "fractions": list(options.fractions)},
        "data": {"harmful": {"n": len(harmful), "sources": harmful.counts()},
                 "benign": {"n": len(benign), "sources": benign.counts()}, "split": "calibration"},
        "rows": rows,
        "chosen": {"layer": best["layer"], "by": "steered refusal on the harmful calibration prompts"},
        "timings_s": {"total": time.perf_counter() - started},
    }


def markdown(results: dict) -> str:
    lines = [f"{results['model']}, query mode, alpha {results['alpha']:g}, greedy, {results['max_new_tokens']} new "
             f"tokens; the safety recipe's calibration split ({results['data']['harmful']['n']} harmful, "
             f"{results['data']['benign']['n']} benign prompts).", "",
             "| layer | gate TPR (harmful) | gate FPR (benign) | refusal unsteered | refusal steered |",
             "|--:|--:|--:|--:|--:|"]
    for r in results["rows"]:
        mark = "**" if r["layer"] == results["chosen"]["layer"] else ""
        lines.append(f"| {mark}{r['layer']}{mark} | {r['gate_tpr']:.0%} | {r['gate_fpr']:.0%} | "
                     f"{r['refusal_unsteered']:.0%} | {mark}{r['refusal_steered']:.0%}{mark} |")
    lines += ["", f"Chosen: layer **{results['chosen']['layer']}** ({results['chosen']['by']})."]
    return "\n".join(lines).replace("%", " %") + "\n"


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
