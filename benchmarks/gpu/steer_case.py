"""The token-mode case the split-d smoke, prefill and sweep sections share: FineSteer parameters with the residual
MLP (r = min(64, d/2), K = 8, m = 32, k = 8), bf16 rows (half gated on), the reference output, and a direct launch
of the steering kernel in a given configuration, the configuration a GPU launch picks, and the bytes model's
prediction for a configuration."""
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


def shape_of(h, layout):
    """The model's view of a launch on ``h`` (2-D rows) with the packed ``layout``."""
    from finesteer_kernels.kernel_common import shape_of

    return shape_of(h.shape[0], h.shape[-1], layout, h.element_size())


def launched_config(h, layout):
    """The configuration a GPU launch on ``h`` picks (the heuristic, for this device's card; one program per row
    tile when ``FINESTEER_SPLIT_D=0``, as after a failed split-d smoke)."""
    from finesteer_kernels.heuristics import steer_config
    from finesteer_kernels.kernel_common import card_for

    return steer_config(shape_of(h, layout), card_for(h))


def prediction(results: dict, shape, config, with_v1: bool = False) -> dict:
    """The model's time for ``shape`` in ``config`` on the shipped card and on the card with this run's measured
    bandwidths (`bandwidth.model_cards`); ``with_v1``: the v1 kernels' figure beside them."""
    from benchmarks.gpu.bandwidth import model_cards
    from finesteer_kernels.perf_model import predict_steer, predict_v1

    cards = dict(zip(("shipped", "measured"), model_cards(results)))
    out = {}
    for name, card in cards.items():
        pred = predict_steer(shape, config, card)
        out[name] = {"time_us": pred.time_us, "pct_copy": 100 / pred.ratio, "config": config.short(),
                     "bound": pred.bound, "round_trips_us": pred.latency_us}
    if with_v1:
        out["v1_pct_copy"] = 100 / predict_v1(shape, cards["shipped"]).ratio
    return out
