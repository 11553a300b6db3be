"""pytest-benchmark view of the op: ``pytest benchmarks/ --benchmark-only`` (``--benchmark-json out.json`` to keep
it). The fuller table with launches, bandwidth and decoder-layer share is ``python -m benchmarks.run``.

Each benchmark first checks its output against the reference, so a fast wrong kernel cannot pass.
"""
import pytest
import torch

from benchmarks.cases import REL_TOL, OpCase, make_inputs, make_params, rel_error
from benchmarks.implementations import op_function

IMPLS = ("reference", "frugal", "compiled") + (("triton",) if torch.cuda.is_available() else ())
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32  # never time half precision on a CPU
SIZES = [(1, 576), (512, 576), (1, 4096), (4096, 4096)]
_COMPILED: dict = {}


def _function(impl: str, op: str):
    if impl != "compiled":
        return op_function(impl, op)
    if op not in _COMPILED:  # one compiled function per op (dynamic shapes) for the whole session
        _COMPILED[op] = op_function(impl, op)
    return _COMPILED[op]


# apply gets no torch.compile variant here (each compile costs ~20 s of CPU); benchmarks.run --compile-ops has it
OP_IMPLS = [(op, impl) for op in ("steer", "apply") for impl in IMPLS if (op, impl) != ("apply", "compiled")]


@pytest.mark.parametrize("rows,d", SIZES, ids=[f"T{t}-d{d}" for t, d in SIZES])
@pytest.mark.parametrize("op,impl", OP_IMPLS, ids=[f"{op}-{impl}" for op, impl in OP_IMPLS])
def test_op(benchmark, device, op, impl, rows, d):
    case = OpCase(op, rows, d, residual=True, dtype=DTYPE)
    params = make_params(d, residual=True, device=device)
    inputs = make_inputs(case, params, device)
    fn = _function(impl, op)
    with torch.inference_mode():
        expected = op_function("reference", op)(params, **inputs)
        out = fn(params, **inputs)  # also compiles / warms up
        assert rel_error(out, expected) <= REL_TOL[DTYPE]

        def call():
            fn(params, **inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        benchmark.extra_info.update(op=op, impl=impl, T=rows, d=d, dtype=str(DTYPE))
        benchmark.pedantic(call, rounds=10 if rows * d > 1e6 else 50, warmup_rounds=2)
