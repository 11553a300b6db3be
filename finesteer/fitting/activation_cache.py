"""Anchor activations cached on disk, so gate variants, layers and held-out sources are compared from one pass.

Forwarding every prompt of every source through the model is the expensive part of gate studies (about 0.3 s per
prompt through SmolLM2's 30 layers on two CPU cores); fitting a gate on cached rows takes milliseconds. So
`cached_anchor_activations` collects the pooled anchor rows (`collect_pooled_activations`) of a prompt list at
every requested layer in one pass and keeps them in a safetensors file under ``<finesteer cache>/activations/``,
keyed on the model (its name and `models.fingerprint`: config, dtypes and a sample of the weights), the
prompts, the layers, the poolings, the prompt cut and the collecting code. Any change to one of those makes a new
key, so a stale file is never read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from safetensors.torch import load_file, save_file

_CODE = ("activations.py", "activation_cache.py")


def activation_cache_dir(path: Optional[str | os.PathLike] = None) -> Path:
    from .models import cache_dir

    folder = Path(path) if path else cache_dir() / "activations"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def activations_key(model_name: str, model_fingerprint: str, prompts: Sequence[str], layers: Sequence[int],
                    pools: Sequence[int], max_prompt_tokens: int) -> str:
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in _CODE)).hexdigest()
    blob = json.dumps({"model": model_name, "fingerprint": model_fingerprint, "prompts": list(prompts),
                       "layers": list(layers), "pools": list(pools), "max_prompt_tokens": max_prompt_tokens,
                       "code": code})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_anchor_activations(model, tokenizer, prompts: Sequence[str], layers: Sequence[int], *, model_name: str,
                              pools: Sequence[int] = (1,), batch_size: int = 16, max_prompt_tokens: int = 256,
                              cache: Optional[str | os.PathLike] = None, progress: bool = True) -> dict:
    """``layer -> (len(prompts), len(pools), d)`` fp32 tensors, read from the cache or collected and cached
    (written to a temporary file and renamed, so an interrupted run leaves nothing behind)."""
    from .activations import collect_pooled_activations
    from .models import fingerprint

    layers, pools = sorted(set(layers)), list(pools)
    key = activations_key(model_name, fingerprint(model), prompts, layers, pools, max_prompt_tokens)
    path = activation_cache_dir(cache) / f"anchors-{key}.safetensors"
    if path.is_file():
        stored = load_file(path)
        return {layer: stored[f"layer{layer}"] for layer in layers}
    out = collect_pooled_activations(model, tokenizer, list(prompts), layers, pools, batch_size=batch_size,
                                     max_prompt_tokens=max_prompt_tokens, progress=progress)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({f"layer{layer}": t.contiguous() for layer, t in out.items()}, str(tmp),
              metadata={"model": model_name, "n_prompts": str(len(prompts)), "pools": json.dumps(pools)})
    os.replace(tmp, path)
    return out
