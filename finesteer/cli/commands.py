"""The study commands (`finesteer demo`, `eval`, `layers`, `transfer`): their flags, and the glue from parsed flags
to the study functions in `finesteer.studies` (checks before expensive work, the model, the missing-wheel error,
the files written)."""
from __future__ import annotations

import argparse
import datetime
import os
import time

from ..fitting.activation_cache import cached_anchor_activations
from ..fitting.defaults import DEFAULT_ALPHA, DEMO_SIZES, EVAL_SIZES
from ..fitting.gates import GATES
from ..fitting.held_out import scored_prompts
from ..fitting.layer_selection import SOURCE_CAP, candidate_layers, source_pools
from ..fitting import models
from ..fitting.models import exit_on_missing_package, model_identity
from ..patching.layers import num_layers
from ..studies import demo, evaluate, steer_layers, transfer
from ..studies.report_files import load_average
from . import preflight
from .options import add_fit_arguments, fit_options


# ---- demo ----------------------------------------------------------------------------------------------------------
def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_fit_arguments(parser, *DEMO_SIZES)
    parser.add_argument("--steerer", default=None,
                        help="use this safety steerer file (written by finesteer fit) instead of fitting or the cache")
    parser.add_argument("--alpha", type=float, default=None,
                        help=f"steering strength (default: the steerer's own; a fit stores {DEFAULT_ALPHA:g})")
    parser.add_argument("--mode", choices=("query", "token"), default="query",
                        help="query: gate and route once per prompt (the paper's); token: every token on its own")
    parser.add_argument("--show", type=int, default=5,
                        help="held-out harmful prompts shown, and as many benign ones (one on an edgy topic)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens generated per reply")


def run_demo(args: argparse.Namespace) -> int:
    preflight.demo(args)
    try:
        return demo.run(args.model, options=fit_options(args), steerer_path=args.steerer, layer=args.layer,
                        cache_dir=args.cache_dir, refit=args.refit, mode=args.mode, alpha=args.alpha, show=args.show,
                        max_new_tokens=args.max_new_tokens, progress=not args.quiet)
    except FileNotFoundError as e:
        raise exit_on_missing_package("demo", e) from None


# ---- eval ----------------------------------------------------------------------------------------------------------
def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_fit_arguments(parser, *EVAL_SIZES)
    parser.add_argument("--methods", default=",".join(evaluate.METHODS),
                        help=f"comma-separated subset of {','.join(evaluate.METHODS)} ('none' is always needed)")
    parser.add_argument("--alphas", default=",".join(f"{a:g}" for a in evaluate.DEFAULT_ALPHAS),
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


def run_eval(args: argparse.Namespace) -> int:
    preflight.evaluation(args, evaluate.METHODS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    alphas = _floats("alphas", args.alphas)
    try:
        options = fit_options(args)
        model, tokenizer = models.load_model(args.model, progress=not args.quiet)
        results = evaluate.run_evaluation(model, tokenizer, model_name=args.model, options=options,
                                          layer=args.layer, methods=methods, alphas=alphas,
                                          max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size,
                                          limit=args.limit, cache=args.cache_dir, refit=args.refit,
                                          progress=not args.quiet)
    except FileNotFoundError as e:
        raise exit_on_missing_package("eval", e) from None
    paths = evaluate.write_outputs(results, args.out)
    print(evaluate.markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ---- layers --------------------------------------------------------------------------------------------------------
def add_layers_arguments(parser: argparse.ArgumentParser) -> None:
    add_fit_arguments(parser, *EVAL_SIZES, layer_flag=False)
    parser.add_argument("--layers", default=None,
                        help="comma-separated decoder layers to compare (default: the gate study's candidate layers "
                             "in the second half of the network; 15,18,21,24,27 on SmolLM2)")
    parser.add_argument("--alpha", type=float, default=None,
                        help=f"steering strength (default: the fitted steerer's own, {DEFAULT_ALPHA:g})")
    parser.add_argument("--max-new-tokens", type=int, default=steer_layers.JUDGE_NEW_TOKENS,
                        help="greedy tokens per reply")
    parser.add_argument("--gen-batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--out", default="results", help="folder for layers.json, layers.md and layers.png")


def run_layers(args: argparse.Namespace) -> int:
    layers = preflight.layers(args)
    try:
        options = fit_options(args)
        model, tokenizer = models.load_model(args.model, progress=not args.quiet)
        results = steer_layers.study(model, tokenizer, model_name=args.model, options=options, layers=layers,
                                     alpha=args.alpha, max_new_tokens=args.max_new_tokens,
                                     gen_batch_size=args.gen_batch_size, cache=args.cache_dir, refit=args.refit,
                                     progress=not args.quiet)
    except FileNotFoundError as e:
        raise exit_on_missing_package("layers", e) from None
    paths = steer_layers.write_outputs(results, args.out)
    print(steer_layers.markdown(results))
    print("wrote " + ", ".join(os.fspath(p) for p in paths.values()))
    return 0


# ---- transfer ------------------------------------------------------------------------------------------------------
def add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="'smollm2', a local Hugging Face folder or a .gguf file")
    parser.add_argument("--gates", default=",".join(GATES), help=f"comma-separated subset of {','.join(GATES)}")
    parser.add_argument("--cap", type=int, default=SOURCE_CAP, help="prompts per source at most")
    parser.add_argument("--max-fpr", type=float, default=0.03, help="the Neyman-Pearson rule's calibration FPR")
    parser.add_argument("--seed", type=int, default=0, help="seeds the per-source draws and splits")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--cache-dir", default=None,
                        help="activation cache folder (default: $FINESTEER_CACHE/activations or "
                             "~/.cache/finesteer/activations)")
    parser.add_argument("--out", default="results", help="folder for transfer.json, transfer.md, transfer.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_transfer(args: argparse.Namespace) -> int:
    gates = preflight.transfer(args)
    started, load_start = time.perf_counter(), load_average()
    try:
        # the study picks demo's and eval's default gate and layer: it never sees the prompts they score
        harmful, benign = source_pools(sharegpt=args.cap, cap=args.cap, seed=args.seed, exclude=scored_prompts())
        model, tokenizer = models.load_model(args.model, progress=not args.quiet)
    except FileNotFoundError as e:
        raise exit_on_missing_package("transfer", e) from None
    sizes = [(s, len(ps)) for side in (harmful, benign) for s, ps in side.items()]
    prompts = [p for side in (harmful, benign) for ps in side.values() for p in ps.prompts]
    name = model_identity(args.model)
    depth = num_layers(model)
    acts = cached_anchor_activations(model, tokenizer, prompts, range(depth), model_name=name, pools=transfer.POOLS,
                                     batch_size=args.batch_size, cache=args.cache_dir, progress=not args.quiet)
    collected = time.perf_counter()
    searched = candidate_layers(depth)
    results = transfer.study(acts, sizes, list(harmful), gates=gates, candidate_layers=searched,
                             fixed_layer=depth // 2, max_fpr=args.max_fpr, seed=args.seed, progress=not args.quiet)
    results.update(model=name, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command="finesteer transfer " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                            vars(args).items()
                                                            if k not in ("func", "command", "quiet", "debug")
                                                            and v is not None),
                   provenance={s: ps.provenance() for side in (harmful, benign) for s, ps in side.items()},
                   timings_s={"activations": collected - started, "study": time.perf_counter() - collected},
                   load_average={"start": load_start, "end": load_average()})
    paths = transfer.write_outputs(results, args.out)
    print(transfer.markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
