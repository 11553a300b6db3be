"""Test set-up: run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test module imports it.
"""
import importlib.util
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(__file__))  # shared helpers such as op_cases

# The vLLM plugin's tests need vLLM, which lives in its own environment (.venv-vllm: vLLM pins an older
# transformers); the README's test command runs them there with `.venv-vllm/bin/python -m pytest -q tests/vllm_plugin`.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_plugin"]
