"""The token-mode case the split-d smoke, prefill and sweep sections share: FineSteer parameters with the residual
MLP (r = min(64, d/2), K = 8, m = 32, k = 8), bf16 rows (half gated on), the reference output, and a direct launch
of the steering kernel in a given configuration; and the bytes model's prediction for it."""
from __future__ import annotations


def steer_case(d: int, T: int, device, seed: int = 0):
    """(params, bf16 rows, the reference output, the packed operands, the layout)."""
    import torch

    from benchmarks.cases import make_params, random_rows
    from finesteer_kernels import ops, reference
    from finesteer_kernels.kernel_common import Layout

    params = make_params(d, residual=True, device=device, seed=seed)
    h = random_rows(params.to("cpu"), T, seed=T, dtype=torch.bfloat16).to(device)
    packed, layout = ops._kernel_args(h, params)
    return params, h, reference.steer(h, params), packed, Layout(*layout)


def launch(h, out, params, packed, layout, config) -> None:
    """The token-mode kernel on ``h`` into ``out`` (``out is h``: in place) in ``config`` (None: the heuristic's)."""
    from finesteer_kernels.steer_kernel import launch_steer

    launch_steer(h, out, packed.w_in, packed.w_out, packed.mean, packed.consts, layout, params.tau, params.eps,
                 params.alpha * params.gamma, config=config)


def shape_of(T: int, d: int, params):
    from finesteer_kernels.perf_model import Shape

    return Shape.of(T, d, 2, params.r, params.num_experts, params.m, params.k)


def prediction(results: dict, shape, config=None) -> dict:
    """The model's time for ``shape`` (its own pick, or ``config``) on the shipped card and on the card with this
    run's measured bandwidths (`bandwidth.model_cards`); the v1 kernels' figure beside the shipped pick."""
    from benchmarks.gpu.bandwidth import model_cards
    from finesteer_kernels.heuristics import best_steer
    from finesteer_kernels.perf_model import predict_steer, predict_v1

    out = {}
    for name, card in zip(("shipped", "measured"), model_cards(results)):
        pred = predict_steer(shape, config, card) if config else best_steer(shape, card)
        out[name] = {"time_us": pred.time_us, "pct_copy": 100 / pred.ratio, "config": pred.config.short(),
                     "bound": pred.bound}
        if name == "shipped" and config is None:
            out["v1_pct_copy"] = 100 / predict_v1(shape, card).ratio
    return out
