"""FineSteer kernels: the unified steering op (gate, router, residual MLP, vector addition) and its reference.

    from finesteer_kernels import SteerParams, steer, steer_, synthesize, apply_coef, apply_coef_, reference
    from finesteer_kernels import coef_delta, apply_delta, apply_delta_      # query-mode decode fast path
    from finesteer_kernels import SteerBank, steer_bank, synthesize_bank, bank_coef_delta  # a steerer per row
    from finesteer_kernels import RMSNormParams, steer_rmsnorm_, apply_delta_rmsnorm_  # fused with the next norm
    from finesteer_kernels import split_d_error_flag, clear_split_d_error  # split-d's bounded waits, for a host check

Importing needs no GPU and no triton (the Triton kernels are imported on first use); docs/kernels.md describes them.
"""
from . import bank_reference, reference
from .bank import SteerBank, plan_rows
from .norm import RMSNormParams
from .ops import (apply_coef, apply_coef_, apply_delta, apply_delta_, apply_delta_rmsnorm, apply_delta_rmsnorm_,
                  bank_coef_delta, coef_delta, select_backend, steer, steer_, steer_bank, steer_bank_, steer_rmsnorm,
                  steer_rmsnorm_, synthesize, synthesize_bank)
from .params import CentredPack, PackedSteerParams, SteerParams
from .split_state import clear_split_d_error, split_d_error_flag

__version__ = "0.1.0"
__all__ = ["SteerParams", "PackedSteerParams", "CentredPack", "steer", "steer_", "synthesize", "apply_coef",
           "apply_coef_", "coef_delta", "apply_delta", "apply_delta_", "select_backend", "reference", "__version__",
           "SteerBank", "plan_rows", "steer_bank", "steer_bank_", "synthesize_bank", "bank_coef_delta", "bank_reference",
           "RMSNormParams", "steer_rmsnorm", "steer_rmsnorm_", "apply_delta_rmsnorm", "apply_delta_rmsnorm_",
           "split_d_error_flag", "clear_split_d_error"]
