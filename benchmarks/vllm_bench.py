"""``python -m benchmarks.vllm_bench``: what the vLLM plugin costs in vLLM's own offline engine (issue 22).

SmolLM2-135M-Instruct (fp32), greedy, ``--requests`` chat prompts of ``--tokens`` generated tokens each, with vLLM's
default torch.compile. One run measures, as generated tokens per second (median of ``--repeats`` rounds after a
warm-up round) and as ratios to stock vLLM:

* **stock**: vLLM without the plugin (its general plugin left out of ``VLLM_PLUGINS``);
* **idle**: the plugin loaded with steerers at 3 layers, no request steered;
* **one steerer**: every request on the same steerer;
* **own steerer**: every request on its own steerer (``--distinct``, default 8, spread over the 3 layers).

Both engines live in this process and the rounds are interleaved (stock, idle, one, own, stock, ...), so a busy
spell on a shared machine hits every configuration alike. Results go to
``benchmarks/results/vllm-<device>.json`` and a bar chart ``vllm-<device>.png``. Goal on the CPU: within 3 % of
stock with every request steered, 0 % when idle. On a GPU run it through ``benchmarks/gpu_check.py``'s vLLM
section or directly.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
os.environ.pop("TRITON_INTERPRET", None)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAYERS = (10, 15, 20)
PROMPTS = ["Explain how a bicycle gear works.", "Write a short poem about the sea.", "What is a prime number?",
           "How do I make pancakes?", "Describe the water cycle.", "Why is the sky blue?",
           "Give three tips for studying.", "What does a compiler do?"]


def make_steerers(folder: str, d: int, distinct: int) -> list:
    import torch

    import finesteer
    from finesteer_kernels import SteerParams

    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(distinct):
        basis = torch.linalg.qr(torch.randn(d, 8, generator=g))[0]
        params = SteerParams(basis=basis, tau=0.0, experts=torch.randn(4, d, generator=g) / d ** 0.5,
                             router_weight=torch.randn(d, 4, generator=g) / 8, alpha=0.5)
        name = f"s{i}"
        finesteer.Steerer(params, layer=LAYERS[i % len(LAYERS)]).save(os.path.join(folder, f"{name}.safetensors"))
        names.append(name)
    return names


def sampling(names, tokens: int) -> list:
    from vllm import SamplingParams

    return [SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                           extra_args=None if n is None else {"steerer": n}) for n in names]


def timed_round(llm, prompts, params) -> float:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def run(args) -> dict:
    from vllm import LLM

    from finesteer.fitting.models import smollm2_folder

    folder = str(smollm2_folder(progress=False))
    steerer_dir = tempfile.mkdtemp(prefix="finesteer-bench-")
    names = make_steerers(steerer_dir, 576, args.distinct)
    engine_args = dict(model=folder, dtype="float32", max_model_len=512, seed=0)
    os.environ["VLLM_PLUGINS"] = "none"  # read by the engine's processes as they start
    stock = LLM(**engine_args)
    del os.environ["VLLM_PLUGINS"]
    os.environ["FINESTEER_VLLM_STEERERS"] = steerer_dir
    plugin = LLM(**engine_args)
    tok = stock.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                       add_generation_prompt=True, tokenize=False) for i in range(args.requests)]
    n = args.requests
    configs = {"stock": (stock, [None] * n), "idle": (plugin, [None] * n),
               "one steerer": (plugin, [names[0]] * n), "own steerer": (plugin, [names[i % len(names)] for i in range(n)])}
    params = {name: sampling(steer, args.tokens) for name, (_, steer) in configs.items()}
    for name, (llm, _) in configs.items():  # warm-up
        timed_round(llm, prompts, params[name])
    rounds = {name: [] for name in configs}
    for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits every configuration
        for name, (llm, _) in configs.items():
            rounds[name].append(timed_round(llm, prompts, params[name]))
    for llm in (stock, plugin):
        llm.llm_engine.engine_core.shutdown()
    results = {name: {"tokens_per_s": statistics.median(r), "rounds": r} for name, r in rounds.items()}
    for row in results.values():
        row["vs_stock"] = row["tokens_per_s"] / results["stock"]["tokens_per_s"]
    return {"config": vars(args), "steered_layers": LAYERS, "results": results}


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(list(rows), [r["tokens_per_s"] for r in rows.values()], color=["#888", "#6a9", "#48c", "#c64"])
    for i, r in enumerate(rows.values()):
        ax.text(i, r["tokens_per_s"], f"{r['vs_stock']:.3f}x", ha="center", va="bottom")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"vLLM + FineSteer plugin, SmolLM2 fp32, {report['config']['requests']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vllm_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--distinct", type=int, default=8)
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args(argv)
    report = run(args)
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"vllm-{device}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    plot(report, os.path.join(args.out, f"vllm-{device}.png"))
    print("| configuration | generated tok/s (median) | vs stock |\n| --- | --: | --: |")
    for name, row in report["results"].items():
        print(f"| {name} | {row['tokens_per_s']:.1f} | {row['vs_stock']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
