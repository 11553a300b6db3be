"""What is benchmarked: op cases (rows T, width d, residual or not, dtype), their parameters and inputs, the
bytes each op must move, and a decoder layer of the same width to compare against.

Parameters and rows come from the test helpers (`tests/op_cases.py`): random parameters at the scale of
unit-variance hidden states and rows that sit clearly on either side of the gate threshold, half of them gated on.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

import torch

_TESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from op_cases import REL_TOL, random_params, random_rows, rel_error  # noqa: E402

from finesteer_kernels import SteerParams  # noqa: E402

__all__ = ["OpCase", "REL_TOL", "rel_error", "make_params", "make_inputs", "bytes_moved", "decoder_layer",
           "RANK", "NUM_EXPERTS", "RES_HIDDEN", "RES_RANK", "OPS", "DTYPE_NAMES"]

RANK, NUM_EXPERTS = 64, 8  # r and K of the issue
RES_HIDDEN, RES_RANK = 32, 8  # m and k of the residual MLP when present
OPS = ("steer", "apply")  # token mode; query mode's per-row step (what runs at every decode step)
MAX_SEQUENCES = 16  # `apply` cases map rows onto min(T, 16) sequences
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class OpCase:
    op: str  # "steer" | "apply"
    rows: int  # T
    d: int
    residual: bool
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in DTYPE_NAMES.items()}[self.dtype]

    def label(self) -> str:
        return f"{self.op} T={self.rows} d={self.d} res={'y' if self.residual else 'n'} {self.dtype_name}"


def make_params(d: int, residual: bool, device, rank: int = RANK, seed: int = 0) -> SteerParams:
    """FineSteer parameters with a gate (r = min(RANK, d/2)), K = 8 experts and optionally the residual MLP."""
    r = min(rank, d // 2)
    params = random_params(d, r, NUM_EXPERTS, residual="relu" if residual else None, m=RES_HIDDEN, k=RES_RANK,
                           seed=seed)
    return params.to(device)


def make_inputs(case: OpCase, params: SteerParams, device, seed: int = 1) -> dict:
    """The op's inputs: ``h`` ``(T, d)``; for ``apply`` also ``coef`` ``(B, K+k)`` fp32 and ``row_to_seq``."""
    h = random_rows(params.to("cpu"), case.rows, seed=seed, dtype=case.dtype).to(device)
    inputs = {"h": h}
    if case.op == "apply":
        sequences = min(case.rows, MAX_SEQUENCES)
        g = torch.Generator().manual_seed(seed)
        inputs["coef"] = torch.randn(sequences, params.n_coef, generator=g).to(device)
        inputs["row_to_seq"] = (torch.arange(case.rows) % sequences).to(device)
    return inputs


def bytes_moved(case: OpCase, params: SteerParams) -> int:
    """Bytes the op cannot avoid moving: read and write ``h`` once (``2*T*d`` elements) plus its weights in the
    input dtype (``steer``: packed W_in and W_out and the fp32 epilogue constants; ``apply``: W_out, ``coef`` and
    ``row_to_seq``)."""
    elem = torch.finfo(case.dtype).bits // 8
    packed = params.pack(dtype=case.dtype)
    stream = 2 * case.rows * case.d * elem
    if case.op == "steer":
        return stream + (packed.w_in.numel() + packed.w_out.numel()) * elem + packed.consts.numel() * 4
    sequences = min(case.rows, MAX_SEQUENCES)
    return stream + packed.w_out.numel() * elem + sequences * params.n_coef * 4 + case.rows * 8


# ---- a decoder layer of the same width --------------------------------------------------------------------------
# (heads, kv heads, intermediate) of real models at these widths: SmolLM2-135M and Llama-3-8B.
_LAYER_SHAPES = {576: (9, 3, 1536), 4096: (32, 8, 14336)}


def layer_config(d: int):
    """A LlamaConfig of width ``d``: a real model's shape where known, else head dim 64 (or d/4 for small d),
    KV heads a quarter of the heads, MLP width 8/3 d rounded up to 64."""
    from transformers import LlamaConfig

    if d in _LAYER_SHAPES:
        heads, kv_heads, inter = _LAYER_SHAPES[d]
    else:
        heads = max(1, d // 64) if d >= 256 else 4
        kv_heads = max(1, heads // 4)
        inter = -(-(8 * d // 3) // 64) * 64
    if d % heads:
        raise ValueError(f"d: width {d} is not divisible into {heads} heads")
    config = LlamaConfig(hidden_size=d, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=1, vocab_size=128)
    config._attn_implementation = "sdpa"
    return config


class DecoderLayerBench:
    """One LlamaDecoderLayer of width ``d`` (random weights, ``dtype``) run on ``T`` new rows with no past: the
    cost the steering op is compared against. At T = 1 this is a decode step with a one-token context (the weight
    reads dominate it, as in real decoding at short context)."""

    def __init__(self, d: int, dtype: torch.dtype, device):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.config = layer_config(d)
        torch.manual_seed(0)
        self.layer = LlamaDecoderLayer(self.config, layer_idx=0).to(device=device, dtype=dtype).eval()
        self.rope = LlamaRotaryEmbedding(self.config).to(device)
        self.d, self.dtype, self.device = d, dtype, torch.device(device)
        self.params = sum(p.numel() for p in self.layer.parameters())

    def estimated_flops(self, rows: int) -> float:
        return 2.0 * rows * self.params + 2.0 * rows * rows * self.d  # matmuls + causal attention

    def call_for(self, rows: int):
        x = torch.randn(1, rows, self.d, device=self.device, dtype=self.dtype)
        positions = torch.arange(rows, device=self.device)[None]
        with torch.inference_mode():
            embeddings = self.rope(x, positions)
        return lambda: self.layer(x, position_ids=positions, position_embeddings=embeddings)


def decoder_layer(d: int, dtype: torch.dtype, device) -> DecoderLayerBench:
    return DecoderLayerBench(d, dtype, device)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPE_NAMES)}, got {name!r}")
    return DTYPE_NAMES[name]


def optional_float(x) -> Optional[float]:
    return None if x is None else float(x)
