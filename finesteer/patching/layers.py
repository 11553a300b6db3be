"""Finding the decoder layers of a transformers 5 causal LM without a per-architecture table.

The model says which module class records its hidden states (``_can_record_outputs["hidden_states"]``); the decoder
layers are the ``ModuleList`` of that class. Each such layer returns the residual stream after the block. Models
that do not say (Falcon, Bloom and other older code in transformers) are searched at the usual attribute paths
(`LAYER_PATHS`), and any model's layers can be named explicitly: every function that needs them takes
``decoder_layers=`` (a dotted path such as ``"transformer.h"``, or the ``ModuleList`` itself).
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch


def _layer_class(model: torch.nn.Module):
    for module in model.modules():
        recorded = (getattr(module, "_can_record_outputs", None) or {}).get("hidden_states")
        if recorded is not None:
            # an entry is a class, or an OutputRecorder-like object naming one
            return getattr(recorded, "target_class", recorded)
    return None


# Where decoder layers usually live, tried in order when the model does not name its layer class: Llama-like
# (model.layers), GPT-2 / Falcon / Bloom (transformer.h), GPT-NeoX, encoder-decoder-style and VLM text models, and
# base models given directly.
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers",
               "transformer.blocks", "model.language_model.layers", "language_model.model.layers", "layers", "h",
               "decoder.layers", "blocks")

DecoderLayers = Union[str, torch.nn.ModuleList, None]


def _named_layers(model: torch.nn.Module, decoder_layers) -> torch.nn.ModuleList:
    if isinstance(decoder_layers, str):
        try:
            found = model.get_submodule(decoder_layers)
        except AttributeError:
            raise ValueError(f"decoder_layers: {type(model).__name__} has no submodule {decoder_layers!r}") from None
    elif isinstance(decoder_layers, torch.nn.Module):
        found = decoder_layers
        if not any(m is found for m in model.modules()):
            raise ValueError("decoder_layers: the ModuleList given is not part of the model")
    else:
        raise TypeError(f"decoder_layers: expected a dotted path (e.g. 'transformer.h') or the ModuleList of "
                        f"decoder layers, got {type(decoder_layers).__name__}")
    if not isinstance(found, torch.nn.ModuleList) or len(found) == 0:
        raise ValueError(f"decoder_layers: {decoder_layers if isinstance(decoder_layers, str) else 'the module'} "
                         f"is a {type(found).__name__}, not a non-empty ModuleList of decoder layers")
    return found


def find_decoder_layers(model: torch.nn.Module, decoder_layers: DecoderLayers = None) -> torch.nn.ModuleList:
    """The ``ModuleList`` of decoder layers whose outputs are the residual stream (``model.model.layers`` for Llama,
    ``transformer.h`` for GPT-2, Falcon and Bloom, the text model's layers for vision-language models).

    ``decoder_layers`` names them instead of searching: a dotted path inside ``model`` or the ``ModuleList``.
    """
    if decoder_layers is not None:
        return _named_layers(model, decoder_layers)
    cls = _layer_class(model)
    candidates = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if cls is not None and isinstance(cls, type):
        matching = [m for m in candidates if all(isinstance(layer, cls) for layer in m)]
        if matching:
            return max(matching, key=len)
    for path in LAYER_PATHS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, torch.nn.ModuleList) and len(found) > 0:
            return found
    raise ValueError(f"model: cannot find the decoder layers of {type(model).__name__}: it names no module class "
                     "that records hidden states (_can_record_outputs['hidden_states']) and has no layer list at "
                     f"the usual paths ({', '.join(LAYER_PATHS)}); pass decoder_layers='path.to.layers' (or the "
                     "ModuleList itself)")


def num_layers(model: torch.nn.Module, decoder_layers: DecoderLayers = None) -> int:
    return len(find_decoder_layers(model, decoder_layers))


def hidden_size(model: torch.nn.Module) -> int:
    """The residual-stream width, read from the (text) config."""
    return config_hidden_size(model.config)


def config_hidden_size(config) -> int:
    """The residual-stream width a transformers config (or its ``text_config``) gives."""
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
