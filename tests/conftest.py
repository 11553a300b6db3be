"""Test set-up: run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test module imports it.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(__file__))  # shared helpers such as op_cases
