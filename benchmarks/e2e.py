"""End to end: greedy generation with SmolLM2-135M-Instruct, unpatched vs patched (query and token mode, one and
three steered layers, and three with ``fuse_norm``), as ratios measured in the same run.

Every configuration, the unpatched one included, gets its own deep copy of the model (same weights, and memory
allocated the same way: a model loaded from a memory-mapped file and a copy of it were seen to differ by ~3 % in
step time), patched once with `finesteer.patch_model`, and the same prompt. After the prefills, the copies decode greedily one token per forward, interleaved token by token
(in rotating order), so that a slow spell of a shared machine hits all configurations alike. A configuration's
ratio is the median over decode steps of its step time over the unpatched step time of the same token (paired);
its p20/p80 say how finely the run resolves a slowdown.

The steerer is random FineSteer parameters at the model's width (r = 64, K = 8, residual MLP) with the gate forced
open (``tau = 0``), so every row is edited: the op's full cost, nothing skipped.

On a CPU, times are process CPU time (``time.process_time``), not wall time: on a machine shared with other jobs,
wall time mostly measures when the scheduler lets this process run, while CPU time measures the work the patch
adds. Wall-clock tokens/s and wall ratios are reported beside them. On a GPU all times are wall time after a
synchronisation.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import statistics
import time
from typing import Optional

import torch
from tqdm import tqdm

import finesteer_kernels

from .cases import make_params
from .timing import elapsed_s, stats_of

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def missing_parts() -> Optional[str]:
    """Why the end-to-end benchmark cannot run in this tree, or None."""
    for module in ("finesteer.patching", "finesteer.fitting.models"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not in this tree yet; the end-to-end benchmark needs it"
    return None


def cache_kwarg(model) -> str:
    """The keyword a causal LM's forward takes the KV cache by: ``cache`` in transformers 5.24, ``past_key_values``
    in earlier 5.x (5.17, on the lent GPU machines, knows only that; 5.24 still accepts it, with a warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output):
    """The KV cache a forward returned: ``output.cache`` (5.24) or ``output.past_key_values`` (earlier 5.x)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def steered_layer_sets(num_layers: int) -> dict:
    """One layer (the middle) and three (at 1/4, 1/2 and 3/4 of the depth; distinct from 3 layers on)."""
    middle = num_layers // 2
    three = sorted({num_layers // 4, middle, (3 * num_layers) // 4})
    return {"1 layer": [middle], "3 layers": three}


def e2e_configs(num_layers: int, modes=("query", "token")) -> list[dict]:
    """Unpatched; each mode at one and three layers; and three layers with ``fuse_norm`` (issue 14: the edit done
    by the next RMSNorm, one launch for both)."""
    configs = [{"config": "unpatched", "mode": None, "layers": [], "fuse_norm": False}]
    for mode in modes:
        for name, layers in steered_layer_sets(num_layers).items():
            configs.append({"config": f"{mode}, {name}", "mode": mode, "layers": layers, "fuse_norm": False})
        configs.append({"config": f"{mode}, 3 layers, fused norm", "mode": mode,
                        "layers": steered_layer_sets(num_layers)["3 layers"], "fuse_norm": True})
    return configs


class _Clock:
    """CPU: process CPU time; GPU: wall time after synchronising the device."""

    def __init__(self, device: torch.device):
        self.gpu = device.type == "cuda"
        self.device = device

    def now(self) -> tuple:
        if self.gpu:
            torch.cuda.synchronize(self.device)
        return time.perf_counter(), time.process_time()

    def elapsed(self, start: tuple) -> tuple:
        wall, cpu = self.now()
        wall -= start[0]
        return wall, (wall if self.gpu else cpu - start[1])


def prompt_ids(model, tokenizer, device) -> torch.Tensor:
    if tokenizer is None:  # random-weight models in tests
        return torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0)).to(device)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt")["input_ids"].to(device)


def run_e2e(model, tokenizer, new_tokens: int = 96, modes=("query", "token"), progress: bool = True) -> dict:
    """Decode tokens/s and paired step-time ratios per configuration; ``model`` is any transformers causal LM."""
    from finesteer.patching.layers import find_decoder_layers, hidden_size
    from finesteer.patching import patch_model

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    params = make_params(hidden_size(model), residual=True, device=device).replace(tau=0.0, alpha=0.1)
    configs = e2e_configs(len(find_decoder_layers(model)), modes)
    prompt = prompt_ids(model, tokenizer, device)
    kw = cache_kwarg(model)
    clock = _Clock(device)
    runs = []
    for config in configs:
        copy_ = copy.deepcopy(model)
        handle = (patch_model(copy_, {layer: params for layer in config["layers"]}, mode=config["mode"],
                              fuse_norm=config["fuse_norm"]) if config["layers"] else None)
        runs.append({**config, "model": copy_, "handle": handle, "steps": [], "walls": []})
    bar = tqdm(total=len(runs) * (new_tokens + 1), desc="end to end", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for run in runs:  # prefill (query mode synthesises and caches its coefficients here)
                start = clock.now()
                out = run["model"](input_ids=prompt, use_cache=True)
                run["prefill_s"] = clock.elapsed(start)[1]
                run["cache"], run["token"] = cache_of(out), out.logits[:, -1:].argmax(-1)
                run["generated"] = [run["token"]]
                bar.update()
            for step in range(new_tokens):
                shift = step % len(runs)
                for run in runs[shift:] + runs[:shift]:
                    start = clock.now()
                    out = run["model"](input_ids=run["token"], use_cache=True, **{kw: run["cache"]})
                    run["token"] = out.logits[:, -1:].argmax(-1)
                    wall, spent = clock.elapsed(start)
                    run["steps"].append(spent)
                    run["walls"].append(wall)
                    run["generated"].append(run["token"])
                    bar.update()
    finally:
        bar.close()
        for run in runs:
            if run["handle"] is not None:
                run["handle"].remove()
    base = runs[0]
    rows = []
    for run in runs:
        steps = stats_of(run["steps"])
        paired = stats_of([t / b for t, b in zip(run["steps"], base["steps"])])
        rows.append({
            "config": run["config"], "mode": run["mode"], "layers": run["layers"], "fuse_norm": run["fuse_norm"],
            "new_tokens": len(run["steps"]), "prefill_s": run["prefill_s"], "step_median_s": steps.median,
            "step_p20_s": steps.p20, "step_p80_s": steps.p80,
            "tokens_per_s": len(run["walls"]) / sum(run["walls"]),
            "time_ratio": paired.median, "ratio_p20": paired.p20, "ratio_p80": paired.p80,
            "wall_ratio": statistics.median(w / b for w, b in zip(run["walls"], base["walls"])),
            "tokens_differ_from_unpatched": bool(torch.cat(run["generated"]).ne(torch.cat(base["generated"])).any()),
        })
    probe = torch.zeros(1, params.d, device=device, dtype=dtype)
    return {"model": type(model).__name__, "prompt_tokens": int(prompt.shape[1]), "new_tokens": new_tokens,
            "dtype": str(dtype).replace("torch.", ""), "clock": "wall" if clock.gpu else "process CPU time",
            "backend": finesteer_kernels.select_backend(probe), "steerer": repr(params), "rows": rows}


# ---- one decode step captured in a CUDA graph (benchmarks/gpu_check.py's decode section) ------------------------
def random_llama(model_config: dict, device, dtype):
    """A LlamaForCausalLM of ``model_config``'s sizes with random weights (seeded: every call gets the same)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, **model_config)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype=dtype).eval()


def capture_decode_step(config: dict, model_config: dict, device, dtype, params, prompt: torch.Tensor,
                        token: torch.Tensor) -> dict:
    """One `e2e_configs` configuration: its own model, patched, prefilled with ``prompt`` (query mode caches its
    coefficients there), and the decode step of ``token`` captured in a CUDA graph after three warm-up steps on a
    side stream; on a CPU the step runs once, eagerly. Returns the configuration with ``handle`` (remove it when
    done), ``logits`` and ``replay`` (the graph's replay; on a CPU, the step again, eagerly, one token further).

    The cache is transformers' DynamicCache: its length is a Python int, so the patch's hooks know a decode step
    without reading the device (a StaticCache keeps its length in a device tensor, which query mode cannot read
    outside ``generate`` without a sync). The cache tensors the captured step reads are kept alive, so every replay
    recomputes the same step at a fixed context length."""
    from finesteer.patching import patch_model

    model = random_llama(model_config, device, dtype)
    handle = (patch_model(model, {layer: params for layer in config["layers"]}, mode=config["mode"],
                          fuse_norm=config["fuse_norm"]) if config["layers"] else None)
    run = {**config, "handle": handle, "model": model}
    try:
        cache = cache_of(model(input_ids=prompt, use_cache=True))
        kw = cache_kwarg(model)

        def step():
            position = torch.full((1, 1), cache.get_seq_length(), device=device)
            return model(input_ids=token, position_ids=position, use_cache=True, **{kw: cache}).logits

        if device.type != "cuda":
            run.update(logits=step(), replay=step)
            return run
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        run["keep_alive"] = [(layer.keys, layer.values) for layer in cache.layers]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
        graph.replay()
        torch.cuda.synchronize(device)
        run.update(logits=logits, replay=graph.replay)
        return run
    except Exception:
        if handle is not None:
            handle.remove()
        raise


def replay_rounds(runs: list, replays: int, rounds: int = 10) -> dict:
    """Seconds per replay of each run's captured step, in ``rounds`` interleaved rounds of ``replays // rounds``
    replays (a slow spell hits every configuration alike), as in `run_e2e`: ``{config: [seconds, ...]}``."""
    samples = {r["config"]: [] for r in runs}
    per_sample = max(1, replays // rounds)
    for _ in range(rounds):
        for r in runs:
            seconds = elapsed_s(lambda: [r["replay"]() for _ in range(per_sample)], r["logits"].device)
            samples[r["config"]].append(seconds / per_sample)
    return samples
