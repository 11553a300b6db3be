"""torch.compile(fullgraph=True) traces functions that call the op: the Triton path as torch.library custom ops
(opaque nodes with fake implementations), the torch path as plain torch code. Compiled results match eager.
CPU here (the kernels under TRITON_INTERPRET); set TORCHINDUCTOR_COMPILE_THREADS=1 on small machines."""
import os

import pytest
import torch

from finesteer_kernels import ops
from op_cases import random_params, random_rows

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class RecordingBackend:
    """Hands each traced graph to a real backend and keeps its text, to see which ops it holds."""

    def __init__(self, backend: str):
        self.backend = torch._dynamo.lookup_backend(backend)
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(str(gm.graph))
        return self.backend(gm, example_inputs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def params_and_rows(dtype=torch.float32):
    p = random_params(40, 4, 3, "relu", seed=31).to(DEVICE)
    return p, random_rows(p, 6, seed=32, dtype=dtype).to(DEVICE).reshape(2, 3, 40)


def test_compiled_token_mode_matches_eager_with_inductor(monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", "triton")
    p, h = params_and_rows()

    def layer_output(x):
        return ops.steer(x * 2.0, p) + 1.0

    backend = RecordingBackend("inductor")
    compiled = torch.compile(layer_output, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(h), layer_output(h), rtol=1e-5, atol=1e-5)
    assert len(backend.graphs) == 1 and "finesteer.steer" in backend.graphs[0]


def test_compiled_query_mode_and_in_place_match_eager(monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", "triton")
    p, h = params_and_rows(torch.float16)
    row_to_seq = torch.tensor([[0, 0, 0], [-1, 1, 1]], device=DEVICE)

    def hooks(x):
        x = x.clone()
        ops.steer_(x, p)
        coef = ops.synthesize(x[:, -1], p)
        delta = ops.coef_delta(coef, p)
        decoded = ops.apply_delta_(x[:, -1:].clone(), delta)
        return (ops.apply_coef_(x, coef, p, row_to_seq), ops.apply_coef(x, coef, p, row_to_seq), decoded,
                ops.apply_delta(x, delta, row_to_seq))

    backend = RecordingBackend("aot_eager")
    compiled = torch.compile(hooks, fullgraph=True, backend=backend)
    for got, want in zip(compiled(h), hooks(h)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    graph = backend.graphs[0]
    for op in ("finesteer.steer_", "finesteer.synthesize", "finesteer.apply_coef_", "finesteer.apply_coef",
               "finesteer.apply_delta_", "finesteer.apply_delta"):
        assert op in graph, op


def test_compiled_torch_backend_matches_eager(monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", "torch")
    p, h = params_and_rows()
    backend = RecordingBackend("aot_eager")
    compiled = torch.compile(lambda x: ops.steer(x, p), fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(h), ops.steer(h, p), rtol=1e-6, atol=1e-6)
    assert "finesteer" not in backend.graphs[0]  # the reference is traced as plain torch ops
