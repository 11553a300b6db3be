"""What the plugin serves, read the same way in every vLLM process: steerer files named in the environment, the
steering mode, and what a request asks for in ``SamplingParams.extra_args``.

    FINESTEER_VLLM_STEERERS=safety=/srv/safety.safetensors,truthful=/srv/truthful.safetensors
    FINESTEER_VLLM_STEERERS=/srv/steerers          # a folder: every *.safetensors in it, named by its stem
    FINESTEER_VLLM_MODE=query|token                 # default query (as patch_model)

A request: ``SamplingParams(extra_args={"steerer": "safety", "alpha": 1.5})``; over the OpenAI API
``extra_body={"vllm_xargs": {"steerer": "safety", "alpha": 1.5}}``. ``alpha`` is optional (the steerer's own).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping, NamedTuple, Optional

from ...steerer import Steerer

STEERERS_ENV = "FINESTEER_VLLM_STEERERS"
MODE_ENV = "FINESTEER_VLLM_MODE"
MODES = ("query", "token")
STEERER_KEY = "steerer"  # extra_args key naming the steerer
ALPHA_KEY = "alpha"      # extra_args key overriding its strength
GENERATION_KEY = "finesteer_generation"  # set by the frontend: which load of the named file the request saw
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class Steering(NamedTuple):
    """What one request asks for: a steerer name and the strength (None: the steerer's own alpha)."""

    name: str
    alpha: Optional[float]


def check_name(name) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"steerer name {name!r}: expected 1-64 letters, digits, '_', '.' or '-'")
    return name


def steering_mode() -> str:
    mode = os.environ.get(MODE_ENV, "query").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}: expected one of {MODES}, got {mode!r}")
    return mode


def configured_files() -> dict:
    """``{name: path}`` from ``FINESTEER_VLLM_STEERERS`` (empty when unset)."""
    spec = os.environ.get(STEERERS_ENV, "").strip()
    if not spec:
        return {}
    folder = Path(spec)
    if "=" not in spec and folder.is_dir():
        files = {p.stem: p for p in sorted(folder.glob("*.safetensors"))}
        if not files:
            raise ValueError(f"{STEERERS_ENV}: the folder {spec} holds no *.safetensors steerer files")
        return {check_name(name): path for name, path in files.items()}
    files = {}
    for item in spec.split(","):
        name, sep, path = item.strip().partition("=")
        if not sep or not path:
            raise ValueError(f"{STEERERS_ENV}: expected name=path[,name=path...] or a folder, got {item!r}")
        if check_name(name.strip()) in files:
            raise ValueError(f"{STEERERS_ENV}: the name {name.strip()!r} is given twice")
        files[name.strip()] = Path(path.strip())
    return files


def load_steerer(name: str, path) -> Steerer:
    """A steerer file, checked: its strength must be rescalable per request (alpha != 0)."""
    steerer = Steerer.load(path)
    if steerer.params.alpha == 0:
        raise ValueError(f"steerer {name!r} ({path}): alpha is 0, so a request's alpha cannot rescale it; save it "
                         "with a non-zero alpha")
    return steerer


def requested(extra_args: Optional[Mapping], known) -> Optional[Steering]:
    """The steering a request asks for (None: none), checked against the names in ``known``. Raises ValueError
    naming the field: vLLM turns it into an HTTP 400 for that request alone."""
    if not extra_args or extra_args.get(STEERER_KEY) is None:
        if extra_args and extra_args.get(ALPHA_KEY) is not None:
            raise ValueError(f"extra_args[{ALPHA_KEY!r}] given without extra_args[{STEERER_KEY!r}]")
        return None
    name = extra_args[STEERER_KEY]
    if not isinstance(name, str):
        raise ValueError(f"extra_args[{STEERER_KEY!r}]: expected a steerer name (string), got {name!r}")
    if name not in known:
        raise ValueError(f"unknown steerer {name!r}: this server has {sorted(known)}")
    alpha = extra_args.get(ALPHA_KEY)
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"extra_args[{ALPHA_KEY!r}]: expected a finite number, got {alpha!r}")
        alpha = float(alpha)
    return Steering(name, alpha)
