"""Where each steerer goes and in what form, for `patch_model` and `patch_bank` alike: steerers as
``{layer index: SteerParams}``, each steered layer checked (its index exists, no FineSteer patch is on it yet) with the
device and dtype it computes in, the parameters moved there and the op warmed, and the module whose forward receives
the attention mask and the cache."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch

import finesteer_kernels
from finesteer_kernels import SteerParams
from finesteer_kernels.validation import HIDDEN_DTYPES

from .layers import check_layer_index
from ..steerer import Steerer
from .handle import LayerHook


def normalise_steerers(steerers, name: str = "steerer_or_dict") -> dict:
    """A `Steerer` or ``{layer index: Steerer or SteerParams}`` -> ``{layer index: SteerParams}``; errors name the
    argument as ``name``."""
    if isinstance(steerers, Steerer):
        return {steerers.layer: steerers.params}
    if isinstance(steerers, SteerParams):
        raise TypeError(f"{name}: a bare SteerParams has no layer; pass {{layer_index: params}} or a Steerer")
    if not isinstance(steerers, Mapping):
        raise TypeError(f"{name}: expected a Steerer or a dict {{layer index: Steerer}}, got "
                        f"{type(steerers).__name__}")
    if not steerers:
        raise ValueError(f"{name}: empty dict, nothing to patch")
    out = {}
    for layer, item in steerers.items():
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"{name}: keys are decoder layer indices (int), got {layer!r}")
        if isinstance(item, Steerer):
            if item.layer != layer:
                raise ValueError(f"{name}: key {layer} holds a steerer fitted at layer {item.layer}; use the key "
                                 f"{item.layer}, or dataclasses.replace(steerer, layer={layer}) to apply it elsewhere "
                                 "on purpose")
            out[layer] = item.params
        elif isinstance(item, SteerParams):
            out[layer] = item
        else:
            raise TypeError(f"{name}[{layer}]: expected a Steerer or SteerParams, got {type(item).__name__}")
    return out


def owner_of(model: torch.nn.Module, layers: torch.nn.ModuleList) -> torch.nn.Module:
    """The module whose child is the layer list (its forward gets the mask and cache)."""
    for module in model.modules():
        if any(child is layers for child in module.children()):
            return module
    raise ValueError(f"model: the decoder layers of {type(model).__name__} have no parent module")


def placement(layer: torch.nn.Module, index: int) -> tuple:
    """(device, dtype) the layer computes in, from its floating-point parameters."""
    for tensor in (*layer.parameters(), *layer.buffers()):
        if tensor.is_floating_point():
            if tensor.device.type == "meta":
                raise ValueError(f"model: layer {index} has its weights on the meta device (offloaded or not "
                                 "loaded); load the model onto a real device before patching")
            if tensor.dtype not in HIDDEN_DTYPES:
                raise TypeError(f"model: layer {index} computes in {tensor.dtype}; the steering op supports "
                                "float32, float16 and bfloat16 hidden states")
            return tensor.device, tensor.dtype
    raise ValueError(f"model: layer {index} has no floating-point parameters to tell its device and dtype")


def check_free_layer(layer_modules: torch.nn.ModuleList, index: int, name: str) -> torch.nn.Module:
    """The layer at ``index`` (an IndexError naming ``name`` if there is none), refused if FineSteer patches it."""
    check_layer_index(index, len(layer_modules), name=name, error=IndexError)
    layer = layer_modules[index]
    if any(isinstance(fn, LayerHook) for fn in layer._forward_hooks.values()):
        raise RuntimeError(f"model: layer {index} is already patched by FineSteer; remove that patch (handle."
                           "remove() or finesteer.unpatch_model(model)) first")
    return layer


def prepare(params: SteerParams, device: torch.device, dtype: torch.dtype, alpha: Optional[float]) -> SteerParams:
    """Apply alpha, move to the layer's device once, and warm the op there (packing caches, kernel compilation),
    which also surfaces a device or dtype the op cannot run on now rather than mid-generation."""
    if alpha is not None:
        params = params.replace(alpha=alpha)
    params = params.to(device)
    probe = torch.zeros(1, 1, params.d, device=device, dtype=dtype)
    coef = finesteer_kernels.synthesize(probe[0], params)
    finesteer_kernels.apply_coef(probe, coef, params, torch.zeros(1, 1, dtype=torch.long, device=device))
    delta = finesteer_kernels.coef_delta(coef, params)
    finesteer_kernels.apply_delta(probe, delta)  # the decode step's kernel, compiled before any graph capture
    finesteer_kernels.apply_delta(probe, delta, torch.zeros(1, 1, dtype=torch.long, device=device))
    finesteer_kernels.steer(probe, params)
    finesteer_kernels.steer(probe, params, row_mask=torch.ones(1, 1, dtype=torch.bool, device=device))
    return params
