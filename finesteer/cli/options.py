"""Command-line options shared by `finesteer fit`, `demo` and `eval`: the layer, the gate variant and its threshold
rule, with their parsers. (The defaults themselves live with the recipes: `finesteer.recipes`.)"""
from __future__ import annotations

import argparse
from typing import Optional

from .gates import GATES
from .recipes import DEFAULT_GATE, DEFAULT_MAX_FPR, STUDIED_LAYERS


def add_gate_arguments(parser: argparse.ArgumentParser, studied_default: bool, layer_flag: bool = True) -> None:
    """``--layer``, ``--gate`` and ``--max-fpr``, shared by `finesteer fit`, `demo` and `eval`. Without ``--layer``
    fit takes the middle layer; demo and eval (``studied_default``) the layer `recipes.studied_layer` gives."""
    studied = ", ".join(f"{layer} for {model}" for model, layer in STUDIED_LAYERS.items())
    default = (f"{studied} (chosen by finesteer layers on calibration data, results/layers.md), the "
               "middle layer for other models" if studied_default else "the middle layer, num_layers // 2")
    if layer_flag:
        parser.add_argument("--layer", type=parse_layer, default=None,
                            help="decoder layer whose output is read and edited, or 'auto': the candidate layer "
                                 f"with the best source-held-out calibration AUC of the gate; the default is {default}")
    parser.add_argument("--gate", choices=GATES, default=DEFAULT_GATE,
                        help="gate variant: scs (the paper's: top-r principal subspace of the targets), contrastive "
                             "(generalised eigenvectors of target vs benign second moments) or linear (a shrinkage-"
                             "LDA direction in the op's cone form); see docs/fitting.md")
    parser.add_argument("--max-fpr", type=optional_share, default=DEFAULT_MAX_FPR,
                        help="Neyman-Pearson threshold: the lowest tau with at most this FPR on the benign "
                             "calibration prompts; 'none' for the paper's logistic calibration")


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
