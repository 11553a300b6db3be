"""`patch_model` and `unpatch_model`: find the decoder layers, check and place each steerer on its layer's device,
warm the op there, and hand the hooks to a `PatchHandle`."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import torch

import finesteer_kernels
from finesteer_kernels import SteerParams
from finesteer_kernels.validation import HIDDEN_DTYPES

from ..layers import DecoderLayers, check_layer_index, find_decoder_layers, hidden_size
from ..steerer import Steerer
from .bank import SteererBank, patch_bank
from .fused_norm import install_fused_norms, plan_fused_norms
from .handle import MODES, LayerHook, PatchHandle, Site

SteererLike = Union[Steerer, SteerParams]


def _owner_of(model: torch.nn.Module, layers: torch.nn.ModuleList) -> torch.nn.Module:
    for module in model.modules():
        if any(child is layers for child in module.children()):
            return module
    raise ValueError(f"model: the decoder layers of {type(model).__name__} have no parent module")


def _placement(layer: torch.nn.Module, index: int) -> tuple:
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


def _already_patched(layer: torch.nn.Module) -> bool:
    return any(isinstance(fn, LayerHook) for fn in layer._forward_hooks.values())


def _normalise_steerers(steerer_or_dict) -> dict:
    """-> {layer index: SteerParams}."""
    if isinstance(steerer_or_dict, Steerer):
        return {steerer_or_dict.layer: steerer_or_dict.params}
    if isinstance(steerer_or_dict, SteerParams):
        raise TypeError("steerer_or_dict: a bare SteerParams has no layer; pass {layer_index: params} or a Steerer")
    if not isinstance(steerer_or_dict, Mapping):
        raise TypeError(f"steerer_or_dict: expected a Steerer or a dict {{layer index: Steerer}}, got "
                        f"{type(steerer_or_dict).__name__}")
    if not steerer_or_dict:
        raise ValueError("steerer_or_dict: empty dict, nothing to patch")
    out = {}
    for layer, item in steerer_or_dict.items():
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"steerer_or_dict: keys are decoder layer indices (int), got {layer!r}")
        if isinstance(item, Steerer):
            if item.layer != layer:
                raise ValueError(f"steerer_or_dict: key {layer} holds a steerer fitted at layer {item.layer}; "
                                 f"use the key {item.layer}, or dataclasses.replace(steerer, layer={layer}) to "
                                 "apply it elsewhere on purpose")
            out[layer] = item.params
        elif isinstance(item, SteerParams):
            out[layer] = item
        else:
            raise TypeError(f"steerer_or_dict[{layer}]: expected a Steerer or SteerParams, got "
                            f"{type(item).__name__}")
    return out


def _prepare(params: SteerParams, device: torch.device, dtype: torch.dtype, alpha: Optional[float]) -> SteerParams:
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


def patch_model(model: torch.nn.Module, steerer_or_dict: Union[Steerer, Mapping[int, SteererLike], SteererBank],
                mode: str = "query", alpha: Optional[float] = None,
                decoder_layers: DecoderLayers = None, fuse_norm: bool = False) -> PatchHandle:
    """Steer ``model`` at the output of decoder layers; returns a `PatchHandle` (a context manager).

    Args:
        model: a transformers 5 causal LM (or its base model / a VLM whose text model has decoder layers).
        steerer_or_dict: a `Steerer` (applied at ``steerer.layer``) or a dict ``{layer index: Steerer or
            SteerParams}`` for several layers; or a `SteererBank` of named steerers, one chosen per row or request
            (returns a `BankHandle`: ``handle.assign(names)``; docs/serving.md).
        mode: ``"query"`` (per sequence: gate and route once at the prompt's last token, add the same vector to
            every token) or ``"token"`` (every position gates and routes on its own hidden state).
        alpha: strength overriding each steerer's own ``alpha``; None keeps theirs.
        decoder_layers: where the decoder layers are, for a model where `find_decoder_layers` cannot find them:
            a dotted path inside ``model`` (e.g. ``"transformer.h"``) or the ``ModuleList`` itself. Its parent
            module must be the one whose forward receives the attention mask and cache.
        fuse_norm: apply each layer's edit inside the RMSNorm that reads the layer's output next (the next layer's
            input norm, or the final norm), one launch for both, where the model is pre-norm with RMSNorm; other
            layers keep the separate edit, with one warning (`fused_norm`; docs/patching.md). Same results.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if not isinstance(fuse_norm, bool):
        raise TypeError(f"fuse_norm: expected True or False, got {fuse_norm!r}")
    if isinstance(steerer_or_dict, SteererBank):
        if fuse_norm:
            raise NotImplementedError("fuse_norm: not available with a SteererBank yet (the fused kernels take one "
                                      "steerer); patch the bank with fuse_norm=False")
        return patch_bank(model, steerer_or_dict, mode, alpha, decoder_layers)
    wanted = _normalise_steerers(steerer_or_dict)
    layer_modules = find_decoder_layers(model, decoder_layers)
    width = hidden_size(model)
    sites, dtypes = {}, {}
    for index, params in sorted(wanted.items()):
        check_layer_index(index, len(layer_modules), name="steerer_or_dict", error=IndexError)
        if params.d != width:
            raise ValueError(f"steerer_or_dict: the steerer for layer {index} has hidden size {params.d}, but "
                             f"{type(model).__name__} has hidden size {width}")
        if _already_patched(layer_modules[index]):
            raise RuntimeError(f"model: layer {index} is already patched by FineSteer; remove that patch (handle."
                               "remove() or finesteer.unpatch_model(model)) first")
        device, dtypes[index] = _placement(layer_modules[index], index)
        sites[index] = Site(index, _prepare(params, device, dtypes[index], alpha))
    plans = plan_fused_norms(model, layer_modules, sites, dtypes) if fuse_norm else {}
    handle = PatchHandle(model, sites, mode, _owner_of(model, layer_modules), layer_modules)
    install_fused_norms(handle, plans)
    return handle


def unpatch_model(model: torch.nn.Module) -> int:
    """Remove every FineSteer patch from ``model``; returns how many patches were removed."""
    handles = []
    for module in model.modules():
        for fn in list(module._forward_hooks.values()):
            if isinstance(fn, LayerHook) and fn.handle not in handles:
                handles.append(fn.handle)
    for handle in handles:
        handle.remove()
    return len(handles)
