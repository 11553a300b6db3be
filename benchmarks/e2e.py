"""End to end: greedy generation with SmolLM2-135M-Instruct, unpatched vs patched (query and token mode, one and
three steered layers), as ratios measured in the same run.

The configurations are interleaved (a round of every configuration, repeated, in rotating order) so that a slow
spell of a shared machine hits all of them alike. A configuration's ratio is the median over rounds of its time
over the unpatched time of the same round (paired, so slow drifts of the machine cancel); its p20/p80 say how
finely the run resolves a slowdown. The steerer is random FineSteer parameters
at the model's width (r = 64, K = 8, residual MLP) with the gate forced open (``tau = 0``), so every row is edited:
the op's full cost, nothing skipped. Every generation is forced to the same length (``min_new_tokens``).

On a CPU the ratios are of process CPU time (``time.process_time``), not wall time: on a machine shared with other
jobs, wall time mostly measures when the scheduler lets this process run, while CPU time measures the work the
patch adds. Wall-clock tokens/s and wall ratios are reported beside them. On a GPU both are wall time (synchronised).
"""
from __future__ import annotations

import importlib.util
import statistics
from typing import Optional

import torch
from tqdm import tqdm

import finesteer_kernels

from .cases import make_params
from .timing import stats_of

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def missing_parts() -> Optional[str]:
    """Why the end-to-end benchmark cannot run in this tree, or None."""
    for module in ("finesteer.patching", "finesteer.models"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not in this tree yet; the end-to-end benchmark needs it"
    return None


def steered_layer_sets(num_layers: int) -> dict:
    """One layer (the middle) and three (at 1/4, 1/2 and 3/4 of the depth; distinct from 3 layers on)."""
    middle = num_layers // 2
    three = sorted({num_layers // 4, middle, (3 * num_layers) // 4})
    return {"1 layer": [middle], "3 layers": three}


def e2e_configs(num_layers: int, modes=("query", "token")) -> list[dict]:
    configs = [{"config": "unpatched", "mode": None, "layers": []}]
    for mode in modes:
        for name, layers in steered_layer_sets(num_layers).items():
            configs.append({"config": f"{mode}, {name}", "mode": mode, "layers": layers})
    return configs


def _generate_fn(model, inputs: dict, new_tokens: int):
    def generate():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=model.generation_config.pad_token_id or 0)
    return generate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_e2e(model, tokenizer, new_tokens: int = 16, reps: int = 10, modes=("query", "token"),
            progress: bool = True) -> dict:
    """Tokens/s and time ratios for each configuration; ``model`` is any transformers causal LM."""
    import time

    from finesteer.layers import find_decoder_layers, hidden_size
    from finesteer.patching import patch_model

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    params = make_params(hidden_size(model), residual=True, device=device).replace(tau=0.0, alpha=0.1)
    configs = e2e_configs(len(find_decoder_layers(model)), modes)
    if tokenizer is not None:
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = dict(tokenizer(text, return_tensors="pt").to(device))
    else:  # random-weight models in dry runs
        inputs = {"input_ids": torch.randint(3, model.config.vocab_size, (1, 12), device=device)}
    generate = _generate_fn(model, inputs, new_tokens)
    gpu = device.type == "cuda"
    times: dict = {c["config"]: [] for c in configs}
    walls: dict = {c["config"]: [] for c in configs}
    lengths: dict = {}
    bar = tqdm(total=len(configs) * (reps + 1), desc="end to end", disable=not progress, leave=False)
    with torch.inference_mode():
        for rep in range(reps + 1):  # round 0 warms every configuration up and is not counted
            shift = rep % len(configs)
            for config in configs[shift:] + configs[:shift]:
                handle = (patch_model(model, {layer: params for layer in config["layers"]}, mode=config["mode"])
                          if config["layers"] else None)
                try:
                    _sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = generate()
                    _sync(device)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                finally:
                    if handle is not None:
                        handle.remove()
                lengths[config["config"]] = out.shape[1] - inputs["input_ids"].shape[1]
                if rep:
                    times[config["config"]].append(wall if gpu else cpu)
                    walls[config["config"]].append(wall)
                bar.update()
    bar.close()
    rows = []
    for config in configs:
        name = config["config"]
        stats = stats_of(times[name])
        paired = stats_of([t / b for t, b in zip(times[name], times["unpatched"])])
        wall = statistics.median(walls[name])
        rows.append({**config, "new_tokens": lengths[name], "median_s": stats.median, "p20_s": stats.p20,
                     "p80_s": stats.p80, "reps": stats.reps, "tokens_per_s": lengths[name] / wall,
                     "wall_median_s": wall, "time_ratio": paired.median, "ratio_p20": paired.p20,
                     "ratio_p80": paired.p80,
                     "wall_ratio": statistics.median(w / b for w, b in zip(walls[name], walls["unpatched"]))})
    probe = torch.zeros(1, params.d, device=device, dtype=dtype)
    return {"model": type(model).__name__, "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "new_tokens": new_tokens, "reps": reps, "clock": "wall" if gpu else "process CPU time", "dtype": str(dtype).replace("torch.", ""),
            "backend": finesteer_kernels.select_backend(probe), "steerer": repr(params), "rows": rows}
