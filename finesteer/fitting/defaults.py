"""The defaults the commands share, in one place: the gate variant, its threshold rule, the studied layer per
model, and the fit sizes of `finesteer eval` and `finesteer demo`."""
from __future__ import annotations

# The demo's and eval's defaults, chosen on fit and calibration prompts only: the gate variant `finesteer transfer`
# ranked first by the source-held-out calibration AUC (results/transfer.md), and the layer where `finesteer layers`
# measured the most steered refusals on the calibration split (results/layers.md; the gate criterion is nearly flat
# over layers 15-27, steering is not).
DEFAULT_GATE = "linear"
STUDIED_LAYERS = {"SmolLM2-135M-Instruct": 15}
# The target is at most 3 % of benign prompts steered, so the threshold is set for that on calibration data.
DEFAULT_MAX_FPR = 0.03
# The strength a fitted steerer carries (`finesteer fit --alpha`, the demo's and `finesteer layers`' default): on the
# eval's held-out split at layer 15 (results/eval.md), query mode refuses 85 % of harmful prompts at alpha 2 against
# 77 % at alpha 1, with every benign and over-refusal reply identical at both (the gate, not alpha, decides those).
DEFAULT_ALPHA = 2.0


def studied_layer(model_identity: str, layer_count: int) -> int:
    """The demo's and eval's layer: the one `finesteer layers` chose for this model where it was studied
    (`STUDIED_LAYERS`, keyed by the model's canonical name), else the middle layer."""
    return STUDIED_LAYERS.get(model_identity, layer_count // 2)


# Default fit sizes (targets, benign prompts drawn before the split) of `finesteer eval` and `finesteer demo`.
EVAL_SIZES = (400, 400)
DEMO_SIZES = (200, 200)
