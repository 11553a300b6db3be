"""Checks of the ``finesteer`` command's options that run before any expensive work (loading weights, fitting,
generating), so that a bad option costs a second rather than a fit: output paths are writable, the layer exists in
the model's config, sizes split into non-empty parts, lists parse. Each check raises an exception naming the
option; `finesteer.cli` prints it as one line.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from ..fitting import data as datasets
from ..patching.layers import check_layer_index


# ---- output paths --------------------------------------------------------------------------------------------------
def _probe_writable(folder: Path, option: str, path: str) -> None:
    """Create and delete a file in ``folder``: the one test of writability that also holds for root, read-only
    mounts and ACLs."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".finesteer-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"{option}: cannot write {path!r}: {folder} is not writable ({e.strerror or e})") \
            from None


def writable_file(path: str, option: str) -> None:
    """``path`` can be written as a file: its folder exists and is writable, and it is not a folder itself."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{option}: {path!r} is a folder; give the path of a file to write")
    folder = target.parent
    if not folder.is_dir():
        existing = next(p for p in folder.parents if p.exists()) if not folder.exists() else folder
        if not existing.is_dir():
            raise NotADirectoryError(f"{option}: cannot write {path!r}: {str(existing)!r} is a file, not a folder")
        raise FileNotFoundError(f"{option}: cannot write {path!r}: the folder {str(folder)!r} does not exist")
    if target.exists() and not os.access(target, os.W_OK):
        raise PermissionError(f"{option}: {path!r} exists and is not writable")
    _probe_writable(folder, option, path)


def writable_folder(path: str, option: str) -> None:
    """``path`` is a writable folder or can be created as one."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{option}: {path!r} is a file; give a folder")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{option}: cannot create the folder {path!r}: {str(existing)!r} is a file")
    _probe_writable(existing, option, path)


# ---- numbers and lists ---------------------------------------------------------------------------------------------
def at_least(value: Optional[int], minimum: int, option: str) -> None:
    """``value`` (when given) is an int >= ``minimum``."""
    if value is not None and value < minimum:
        raise ValueError(f"{option}: expected an integer >= {minimum}, got {value}")


def finite(value: float, option: str) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{option}: expected a finite number, got {value}")


def optional_strength(value: Optional[float], option: str) -> None:
    """None (the steerer's own strength) or a positive finite number."""
    if value is None:
        return
    finite(value, option)
    if value <= 0:
        raise ValueError(f"{option}: expected a positive strength, got {value}")


def strengths(text: str, option: str = "--alphas") -> list:
    """Comma-separated positive finite numbers."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{option}: expected comma-separated positive finite strengths, got {text!r}")
    return values


def choices(text: str, known: Sequence[str], required: str, option: str = "--methods") -> list:
    """A comma-separated subset of ``known`` that includes ``required``."""
    picked = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in picked if x not in known]
    if unknown:
        raise ValueError(f"{option}: unknown {', '.join(map(repr, unknown))}; expected a comma-separated subset of "
                         f"{','.join(known)}")
    if required not in picked:
        raise ValueError(f"{option}: must include {required!r} (the unsteered reference the other rows are compared "
                         f"with), got {text!r}")
    return picked


# ---- the model ---------------------------------------------------------------------------------------------------
def model_and_layer(model: str, layer) -> tuple:
    """``(decoder layers, hidden size)`` of ``--model`` from its config (no weights loaded), after checking that
    it exists, has a tokenizer, and that ``--layer`` (when given) is one of its layers."""
    from ..fitting.models import check_tokenizer, model_dimensions

    n_layers, width = model_dimensions(model, "--model")
    check_tokenizer(model, "--model")
    if layer is not None and layer != "auto":  # auto: the search picks one of the model's layers
        check_layer_index(layer, n_layers, "--layer")
    return n_layers, width


def steerer_for(path: str, model: str, n_layers: Optional[int], width: int):
    """The steerer file of ``--steerer``, loaded (it is small) and checked against the model's config."""
    from ..steerer import Steerer

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--steerer: no such file {path!r}")
    steerer = Steerer.load(path)
    if steerer.hidden_size != width:
        raise ValueError(f"--steerer: {path} was fitted for hidden size {steerer.hidden_size}, but {model!r} has "
                         f"hidden size {width}")
    if n_layers is not None and steerer.layer >= n_layers:
        raise ValueError(f"--steerer: {path} steers layer {steerer.layer}, but {model!r} has layers "
                         f"0..{n_layers - 1}")
    return steerer


# ---- split sizes -------------------------------------------------------------------------------------------------
def _splits(pool: datasets.PromptSet, n: int, fractions, seed: int) -> bool:
    try:
        datasets.split_prompts(datasets.subsample(pool, n, seed), fractions, seed)
    except ValueError:
        return False
    return True


def split_size(pool: datasets.PromptSet, n: int, fractions, seed: int, option: str) -> None:
    """``n`` prompts drawn from ``pool`` split into non-empty fit / calibration / test parts, exactly as the
    recipes draw and split them (stratified by source, so small sizes can leave a part empty, and not only the
    smallest: with three sources 7 and 8 work where 9 does not). Otherwise say which sizes work."""
    if _splits(pool, n, fractions, seed):
        return
    sizes = range(1, len(pool) + 1)
    smallest = next((k for k in sizes if _splits(pool, k, fractions, seed)), None)
    shares = "/".join(f"{100 * f:g}" for f in fractions)
    what = (f"{option}: {n} prompts cannot be split into non-empty fit / calibration / test parts ({shares} per "
            f"source of {', '.join(f'{s} ({c})' for s, c in pool.counts().items())})")
    if smallest is None:
        raise ValueError(f"{what}, and neither can all {len(pool)}; add prompts")
    nearest = next(k for k in range(max(n + 1, smallest), len(pool) + 1) if _splits(pool, k, fractions, seed))
    advice = f"use at least {smallest}" if nearest == smallest else \
        f"use {nearest} (the nearest size that works; the smallest is {smallest})"
    raise ValueError(f"{what}; {advice}")


def prompt_pools(recipe: str, sharegpt: int, targets_file: Optional[str] = None,
                 benign_file: Optional[str] = None, field: str = "prompt", qa_file: Optional[str] = None) -> tuple:
    """``(targets, benign)`` prompt sets exactly as the recipe would build them (the user's files or the packaged
    pools), so their split sizes can be checked before the model loads and the recipe can reuse them."""
    if recipe == "truthfulness":
        items, source = datasets.load_qa_jsonl(qa_file, argument="--qa")
        questions = list(dict.fromkeys(item.question for item in items))  # as recipes.truthfulness_steerer
        targets = datasets.PromptSet("questions", questions, [source.name] * len(questions), {source.name: source})
    else:
        targets = datasets.load_jsonl(targets_file, field=field, argument="--targets") if targets_file else \
            datasets.harmful_prompts()
    benign = datasets.load_jsonl(benign_file, field=field, argument="--benign") if benign_file else \
        datasets.benign_prompts(sharegpt, exclude=[targets])
    return targets, benign


def split_sizes(options, targets: datasets.PromptSet, benign: datasets.PromptSet) -> None:
    split_size(targets, options.n_target, options.fractions, options.seed, "--n-target")
    split_size(benign, options.n_benign, options.fractions, options.seed, "--n-benign")


# ---- per command -------------------------------------------------------------------------------------------------
def fit_sizes_and_model(args: argparse.Namespace, options) -> tuple:
    """What `finesteer fit` checks before loading the model; returns the ``(targets, benign)`` pools to fit on."""
    if args.recipe == "truthfulness" and args.qa is None:
        raise ValueError("--qa: required with --recipe truthfulness (a question/answer JSONL)")
    for option, path in (("--qa", args.qa), ("--targets", args.targets), ("--benign", args.benign)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{option}: no such file {path!r}")
    writable_file(args.out, "--out")
    if args.report:
        writable_file(args.report, "--report")
    for option, value, minimum in (("--r", args.r, 1), ("--num-experts", args.num_experts, 1),
                                   ("--res-rank", args.res_rank, 0), ("--hidden", args.hidden, 1),
                                   ("--sharegpt", args.sharegpt, 0)):
        at_least(value, minimum, option)
    finite(args.alpha, "--alpha")
    model_and_layer(args.model, args.layer)
    targets, benign = prompt_pools(args.recipe, args.sharegpt, args.targets, args.benign, args.field, args.qa)
    split_sizes(options, targets, benign)
    return targets, benign


def demo(args: argparse.Namespace) -> None:
    """What `finesteer demo` checks before loading the model."""
    at_least(args.show, 1, "--show")
    at_least(args.max_new_tokens, 1, "--max-new-tokens")
    optional_strength(args.alpha, "--alpha")
    n_layers, width = model_and_layer(args.model, args.layer)
    if args.steerer:
        steerer_for(args.steerer, args.model, n_layers, width)
        return
    _shared_fit_options(args)


def evaluation(args: argparse.Namespace, methods: Sequence[str]) -> None:
    """What `finesteer eval` checks before loading the model; ``methods``: the names ``--methods`` may list."""
    choices(args.methods, methods, "none")
    strengths(args.alphas)
    for option, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens),
                          ("--gen-batch-size", args.gen_batch_size)):
        at_least(value, 1, option)
    writable_folder(args.out, "--out")
    model_and_layer(args.model, args.layer)
    _shared_fit_options(args)


def layers(args: argparse.Namespace) -> list:
    """What `finesteer layers` checks before loading the model; returns the layers to compare."""
    from ..patching.layers import check_layer_index
    from ..studies.steer_layers import default_layers

    optional_strength(args.alpha, "--alpha")
    for option, value in (("--max-new-tokens", args.max_new_tokens), ("--gen-batch-size", args.gen_batch_size)):
        at_least(value, 1, option)
    writable_folder(args.out, "--out")
    n_layers, _ = model_and_layer(args.model, None)
    _shared_fit_options(args)
    if args.layers is None:
        return default_layers(n_layers)
    try:
        chosen = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers: expected comma-separated decoder layer indices, got {args.layers!r}") from None
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"--layers: expected distinct decoder layer indices, got {args.layers!r}")
    return [check_layer_index(layer, n_layers, "--layers") for layer in chosen]


def transfer(args: argparse.Namespace) -> list:
    """What `finesteer transfer` checks before loading the model; returns the gate variants."""
    from ..fitting.gates import GATES

    gates = [g.strip() for g in args.gates.split(",") if g.strip()]
    unknown = [g for g in gates if g not in GATES]
    if unknown or not gates:
        raise ValueError(f"--gates: expected a comma-separated subset of {','.join(GATES)}, got {args.gates!r}")
    at_least(args.cap, 1, "--cap")
    at_least(args.batch_size, 1, "--batch-size")
    if not 0 <= args.max_fpr < 1:
        raise ValueError(f"--max-fpr: expected a share in [0, 1), got {args.max_fpr}")
    writable_folder(args.out, "--out")
    if args.cache_dir:
        writable_folder(args.cache_dir, "--cache-dir")
    model_and_layer(args.model, None)
    return gates


def _shared_fit_options(args: argparse.Namespace) -> None:
    """demo and eval fit (or reuse) steerers with the safety recipe's pools: their sizes, and the cache folder."""
    from .options import fit_options

    at_least(args.sharegpt, 0, "--sharegpt")
    options = fit_options(args)
    if args.cache_dir:
        writable_folder(args.cache_dir, "--cache-dir")
    split_sizes(options, *prompt_pools("safety", options.sharegpt))
