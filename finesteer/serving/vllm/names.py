"""The steerer names a frontend process accepts: those configured in the environment, plus those loaded and minus
those unloaded through the plugin's routes (or `finesteer.serving.vllm.load_steerer`) while it runs. Requests are
checked against this set before they reach the engine, so an unknown name fails its own request only. Each load
bumps the name's generation, which the request carries into its prefix-cache salt (`salt.py`)."""
from __future__ import annotations

import functools
import os

from .config import STEERERS_ENV, configured_files

_generation: dict = {}  # name -> how many times it was loaded at run time (configured names start at 0)
_unloaded: set = set()


@functools.lru_cache(maxsize=4)
def _configured(spec: str) -> tuple:
    return tuple(configured_files())


def plugin_enabled() -> bool:
    """Whether vLLM loads the plugin's engine side here (``VLLM_PLUGINS`` unset, or naming ``finesteer``)."""
    allowed = os.environ.get("VLLM_PLUGINS")
    return allowed is None or "finesteer" in [p.strip() for p in allowed.split(",")]


def known_names() -> set:
    return (set(_configured(os.environ.get(STEERERS_ENV, ""))) | set(_generation)) - _unloaded


def generation(name: str) -> int:
    return _generation.get(name, 0)


def note_loaded(name: str) -> None:
    _generation[name] = _generation.get(name, 0) + 1
    _unloaded.discard(name)


def note_unloaded(name: str) -> None:
    if name not in known_names():
        raise KeyError(f"unknown steerer {name!r}: this server has {sorted(known_names())}")
    _unloaded.add(name)
