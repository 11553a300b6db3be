"""The worker side of the plugin: after vLLM loads the model, steer its layers; before each forward, prepare the
step's request state; and the methods that ``collective_rpc`` calls to load, unload and inspect steerers.

vLLM compiles the model lazily on its first forward, so layers swapped right after ``load_model`` are traced into
the graph. The compile cache keys on vLLM's config, not on plugins: the steered layers and the mode go into
``vllm_config.additional_config["finesteer"]``, which enters that key, so a graph compiled without (or with other)
steered layers is never loaded.
"""
from __future__ import annotations

import functools
import hashlib
import json

from . import layers
from .banks import LayerBanks
from .config import configured_files, load_steerer, steering_mode
from .runtime import SteeringRuntime

_RPC = ("finesteer_load", "finesteer_unload", "finesteer_names", "finesteer_gates")


def install_into(runner) -> None:
    """Steer the runner's model with the configured steerers (nothing when none are configured)."""
    if getattr(runner, "_finesteer", None) is not None:
        return
    runner._finesteer = None
    files = configured_files()
    if not files:
        return
    steerers = {name: load_steerer(name, path) for name, path in files.items()}
    config = runner.model_config
    n_layers = config.hf_text_config.num_hidden_layers
    steered = sorted({s.layer for s in steerers.values()})
    bad = [f"{n!r} (layer {s.layer})" for n, s in steerers.items() if not 0 <= s.layer < n_layers]
    if bad:
        raise ValueError(f"finesteer: steerers {', '.join(bad)} act past the served model's {n_layers} decoder "
                         f"layers (0..{n_layers - 1})")
    layer_list = layers.find_layers(runner.model, n_layers)
    owned = layers.steer_layers(layer_list, steered)
    mode = steering_mode()
    banks = LayerBanks(steerers, steered, owned, config.get_hidden_size(), n_layers, runner.device, config.dtype)
    runtime = SteeringRuntime(banks, mode, runner.max_num_tokens, runner.max_num_reqs)
    layers.set_runtime(runtime)
    runner._finesteer = runtime
    key = json.dumps({"layers": owned, "mode": mode, "op": layers.__name__}, sort_keys=True)
    runner.vllm_config.additional_config["finesteer"] = hashlib.sha256(key.encode()).hexdigest()[:16]


def wrap_load_model(load_model):
    @functools.wraps(load_model)
    def wrapped(self, *args, **kwargs):
        out = load_model(self, *args, **kwargs)
        install_into(self)
        return out
    wrapped.finesteer_wrapped = True
    return wrapped


def wrap_model_forward(model_forward):
    @functools.wraps(model_forward)
    def wrapped(self, *args, **kwargs):
        runtime = getattr(self, "_finesteer", None)
        if runtime is None:
            return model_forward(self, *args, **kwargs)
        runtime.prepare(self)
        try:
            return model_forward(self, *args, **kwargs)
        finally:
            runtime.reset()
    wrapped.finesteer_wrapped = True
    return wrapped


def _runtime_of(worker) -> SteeringRuntime:
    runtime = getattr(worker.model_runner, "_finesteer", None)
    if runtime is None:
        raise RuntimeError("finesteer: this server steers no layers; start it with FINESTEER_VLLM_STEERERS naming at "
                           "least one steerer file (its layers are fixed at start-up)")
    return runtime


def finesteer_load(worker, name: str, path: str) -> list:
    runtime = _runtime_of(worker)
    runtime.add(name, load_steerer(name, path))
    return list(runtime.banks.names)


def finesteer_unload(worker, name: str) -> list:
    runtime = _runtime_of(worker)
    runtime.remove(name)
    return [n for n in runtime.banks.names if n not in runtime._retiring]


def finesteer_names(worker) -> dict:
    runtime = getattr(worker.model_runner, "_finesteer", None)
    if runtime is None:
        return {}
    return {n: {"layer": s.layer, "alpha": s.params.alpha} for n, s in runtime.banks.steerers.items()
            if n not in runtime._retiring}


def finesteer_gates(worker) -> dict:
    return _runtime_of(worker).gates(worker.model_runner.requests)


def add_rpc_methods(worker_class) -> None:
    """The methods ``collective_rpc("finesteer_...")`` reaches on every worker (string names, no pickled code)."""
    for name in _RPC:
        if not hasattr(worker_class, name):
            setattr(worker_class, name, globals()[name])
