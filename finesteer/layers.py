"""Finding the decoder layers of a transformers 5 causal LM without a per-architecture table.

The model says which module class records its hidden states (``_can_record_outputs["hidden_states"]``); the decoder
layers are the ``ModuleList`` of that class. Each such layer returns the residual stream after the block.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def _layer_class(model: torch.nn.Module):
    for module in model.modules():
        recorded = (getattr(module, "_can_record_outputs", None) or {}).get("hidden_states")
        if recorded is not None:
            # an entry is a class, or an OutputRecorder-like object naming one
            return getattr(recorded, "target_class", recorded)
    return None


def find_decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ``ModuleList`` of decoder layers whose outputs are the residual stream (``model.model.layers`` for Llama,
    ``transformer.h`` for GPT-2, the text model's layers for vision-language models)."""
    cls = _layer_class(model)
    candidates = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if cls is not None and isinstance(cls, type):
        matching = [m for m in candidates if all(isinstance(layer, cls) for layer in m)]
        if matching:
            return max(matching, key=len)
    raise ValueError(f"model: cannot find the decoder layers of {type(model).__name__}: it names no module class "
                     "that records hidden states (_can_record_outputs['hidden_states']), or no ModuleList of that "
                     "class exists")


def num_layers(model: torch.nn.Module) -> int:
    return len(find_decoder_layers(model))


def hidden_size(model: torch.nn.Module) -> int:
    """The residual-stream width, read from the (text) config."""
    config = model.config
    config = getattr(config, "text_config", None) or config
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    raise ValueError(f"model: cannot read the hidden size from {type(config).__name__}")


def check_layer_index(layer, layer_count: Optional[int], name: str = "layer", error: type = ValueError) -> int:
    """``layer`` as an int, after checking it is a decoder layer index: a non-negative int (numpy ints accepted,
    bools refused) and, when ``layer_count`` is known, below it. Raises ``error`` (any exception class, so
    callers keep their own error type) naming ``name``."""
    if isinstance(layer, np.integer):
        layer = int(layer)
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise error(f"{name}: expected a non-negative int (a decoder layer index), got {layer!r}")
    if layer_count is not None and layer >= layer_count:
        raise error(f"{name}: index {layer} out of range for a model with {layer_count} decoder layers "
                    f"(0..{layer_count - 1})")
    return layer
