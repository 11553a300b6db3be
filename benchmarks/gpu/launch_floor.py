"""Section ``empty_kernel``: a Triton kernel that does nothing, 100 launches in a CUDA graph and eagerly: the floor
a decode-size op is held to (the goal: a decode op <= 1.5x this)."""
from __future__ import annotations

NAME, DEADLINE = "empty_kernel", 0.26


def run(sec, ctx) -> dict:
    import torch

    from benchmarks import timing
    from benchmarks.empty_kernel import empty_kernel

    x = torch.empty(1, device=ctx.device)
    launch = lambda: empty_kernel[(1,)](x)  # noqa: E731
    launch()
    graph = timing.time_graph(launch, ctx.device, reps=ctx.reps(20), cold_l2=False,
                                 calls_per_graph=ctx.reps(100))
    eager = timing.measure(launch, ctx.device, budget_s=0.2, cold_l2=False)
    return {**graph.as_us(), "eager_median_us": eager.median * 1e6}


def empty_us(results: dict):
    return results["sections"].get(NAME, {}).get("median_us")


def markdown(results: dict) -> list:
    us = empty_us(results)
    return [] if us is None else ["", f"**Empty kernel** in a graph: {us:.2f} us per launch"]
