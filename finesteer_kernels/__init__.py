"""FineSteer kernels: the unified steering op (gate, router, residual MLP, vector addition) and its reference.

    from finesteer_kernels import SteerParams, steer, synthesize, apply_coef, reference

Importing needs no GPU; ``finesteer_kernels.reference`` needs no triton either.
"""
from . import reference
from .ops import apply_coef, select_backend, steer, steer_, synthesize
from .params import PackedSteerParams, SteerParams

__version__ = "0.1.0"
__all__ = ["SteerParams", "PackedSteerParams", "steer", "steer_", "synthesize", "apply_coef", "select_backend",
           "reference", "__version__"]
