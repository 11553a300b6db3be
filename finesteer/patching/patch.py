"""`patch_model` and `unpatch_model`: find the decoder layers, check and place each steerer on its layer's device,
warm the op there, and hand the hooks to a `PatchHandle`."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import torch

from finesteer_kernels import SteerParams

from .layers import DecoderLayers, find_decoder_layers, hidden_size
from ..steerer import Steerer
from .bank import SteererBank, patch_bank
from .fused_norm import install_fused_norms, plan_fused_norms
from .handle import MODES, LayerHook, PatchHandle, Site
from .placement import check_free_layer, normalise_steerers, owner_of, placement, prepare

SteererLike = Union[Steerer, SteerParams]


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
    wanted = normalise_steerers(steerer_or_dict)
    layer_modules = find_decoder_layers(model, decoder_layers)
    width = hidden_size(model)
    sites, dtypes = {}, {}
    for index, params in sorted(wanted.items()):
        layer = check_free_layer(layer_modules, index, "steerer_or_dict")
        if params.d != width:
            raise ValueError(f"steerer_or_dict: the steerer for layer {index} has hidden size {params.d}, but "
                             f"{type(model).__name__} has hidden size {width}")
        device, dtypes[index] = placement(layer, index)
        sites[index] = Site(index, prepare(params, device, dtypes[index], alpha))
    plans = plan_fused_norms(model, layer_modules, sites, dtypes) if fuse_norm else {}
    handle = PatchHandle(model, sites, mode, owner_of(model, layer_modules), layer_modules)
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
