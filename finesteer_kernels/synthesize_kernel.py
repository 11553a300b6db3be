"""Query-mode step 1: anchor rows -> fp32 coefficients ``(B, K+k)``, gate and ``alpha * gamma`` folded in.

The token-mode kernel with ``STORE_COEF``: pass 1 and the epilogue, then a store of the coefficient row instead
of pass 2 (`steer_kernel`; with a split of d for the few-row case, so W_in is read by many SMs rather than one).
Readable equivalent: `reference.synthesize`. Launch configuration: `heuristics.steer_config(store_coef=True)`.
"""
import torch

from .kernel_common import Layout
from .steer_kernel import launch_steer


def launch_synthesize(h2d: torch.Tensor, coef: torch.Tensor, w_in: torch.Tensor, mean: torch.Tensor,
                      consts: torch.Tensor, layout: Layout, tau: float, eps: float, scale: float,
                      config=None) -> None:
    """Fill ``coef`` (``(B, K+k)`` fp32, contiguous) from contiguous anchor rows ``(B, d)``."""
    launch_steer(h2d, None, w_in, w_in, mean, consts, layout, tau, eps, scale, config=config, coef_out=coef)
