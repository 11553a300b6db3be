"""Section ``empty_kernel``: a Triton kernel that does nothing, 100 launches in a CUDA graph and eagerly: the floor
a decode-size op is held to (the goal: a decode op <= 1.5x this). Then the same 100 launches in a graph with
programmatic dependent launch (`finesteer_kernels.pdl`): the gap PDL leaves, which `finesteer_kernels.pdl_model`
assumes (``PDL_RELEASE_US``) against the plain graph's (``GRAPH_GAP_US``)."""
from __future__ import annotations

NAME, DEADLINE = "empty_kernel", 0.26


def run(sec, ctx) -> dict:
    import torch

    from benchmarks import timing
    from benchmarks.empty_kernel import empty_kernel
    from finesteer_kernels import pdl

    x = torch.empty(1, device=ctx.device)
    launch = lambda: empty_kernel[(1,)](x, **pdl.launch_options(x))  # noqa: E731
    launch()
    graph = timing.time_graph(launch, ctx.device, reps=ctx.reps(20), cold_l2=False,
                                 calls_per_graph=ctx.reps(100))
    eager = timing.measure(launch, ctx.device, budget_s=0.2, cold_l2=False)

    def with_pdl():
        with pdl.forced(True):
            return {"launched": pdl.pdl_enabled(x), **timing.time_graph(
                launch, ctx.device, reps=ctx.reps(20), cold_l2=False, calls_per_graph=ctx.reps(100)).as_us()}

    sec.measure({"pdl": True}, with_pdl, "empty kernel with PDL")  # a failure is its row's: the plain figures stay
    return {**graph.as_us(), "eager_median_us": eager.median * 1e6}


def empty_us(results: dict):
    return results["sections"].get(NAME, {}).get("median_us")


def markdown(results: dict) -> list:
    us = empty_us(results)
    if us is None:
        return []
    with_pdl = (results["sections"][NAME].get("rows") or [{}])[0]
    if with_pdl.get("launched"):
        pdl = f"; with PDL {with_pdl['median_us']:.2f} us"
    else:
        pdl = f"; with PDL: {with_pdl.get('error', 'not launched (interpreter or a card older than sm_90)')[:120]}"
    return ["", f"**Empty kernel** in a graph: {us:.2f} us per launch{pdl}"]
