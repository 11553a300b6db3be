"""Where the edit enters vLLM's model: the decoder layers found in the loaded model, and each steered layer's class
swapped (on that instance only) for a subclass whose forward adds the edit.

vLLM's Llama-family layers return ``(hidden_states, residual)`` and leave the add to the next layer's fused
add + RMSNorm: the residual stream after layer L is their sum. The steered layer returns ``(steered stream, 0)``,
so the next layer's add gives the steered stream exactly, and a row that gets no edit comes out bit-identical to
vLLM without the plugin (``x + 0 == x``). The edit is one opaque custom op (`finesteer_vllm::steer_layer`) with an
implementation for every device and a fake one, so vLLM's ``torch.compile(fullgraph=True)`` traces it as a single
node; its body reads the per-step request state of `runtime.SteeringRuntime`, kept in fixed buffers.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

_runtime = None  # the process's SteeringRuntime (one model per vLLM worker process)
_steered_classes: dict = {}


def set_runtime(runtime) -> None:
    global _runtime
    _runtime = runtime


@torch.library.custom_op("finesteer_vllm::steer_layer", mutates_args=())
def steer_layer(stream: Tensor, layer: int) -> Tensor:
    """The residual stream after decoder layer ``layer`` with every row's edit added (a new tensor)."""
    return _runtime.edit(stream, layer)


@steer_layer.register_fake
def _steer_layer_fake(stream, layer):
    return torch.empty_like(stream)


def _steered_class(cls: type) -> type:
    if cls not in _steered_classes:
        def forward(self, *args, **kwargs):
            hidden, residual = cls.forward(self, *args, **kwargs)
            stream = torch.ops.finesteer_vllm.steer_layer(hidden + residual, self.finesteer_layer)
            return stream, torch.zeros_like(residual)

        _steered_classes[cls] = type(f"FineSteer{cls.__name__}", (cls,), {"forward": forward})
    return _steered_classes[cls]


def find_layers(model: torch.nn.Module, n_layers: int) -> torch.nn.ModuleList:
    """The model's decoder layer list: the ``ModuleList`` named ``...layers`` with one entry per hidden layer."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and len(module) == n_layers:
            return module
    raise ValueError(f"finesteer: found no list of {n_layers} decoder layers in {type(model).__name__}; the vLLM "
                     "plugin steers models whose decoder layers sit in a ModuleList named 'layers'")


def steer_layers(layer_list: torch.nn.ModuleList, indices) -> list:
    """Swap the class of each layer in ``indices`` for its steered subclass; returns the indices this process owns
    (under pipeline parallelism a rank holds only its own layers; the others are placeholders)."""
    owned = []
    for index in indices:
        layer = layer_list[index]
        cls = type(layer)
        if cls.__name__ == "PPMissingLayer":
            continue
        if cls in _steered_classes.values():
            owned.append(index)
            continue
        if "residual" not in inspect.signature(cls.forward).parameters:
            raise ValueError(f"finesteer: {cls.__name__} (layer {index}) does not follow the (hidden_states, "
                             "residual) layer pattern that the vLLM plugin steers (Llama, Mistral, Qwen2/3, ...)")
        layer.__class__ = _steered_class(cls)
        layer.finesteer_layer = index
        owned.append(index)
    return owned
