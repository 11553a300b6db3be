"""No host synchronisation on the op's call path: every Tensor method that copies device data to the host (or
branches on it) is patched to raise while steer, steer_, synthesize, apply_coef, apply_coef_, coef_delta,
apply_delta and apply_delta_ run, on both backends, and while the split-d launch (workspace and flags) runs. Under TRITON_INTERPRET the interpreter stands in for the device and copies data by design, so calls made
from inside it are let through; on CUDA, torch's sync debug mode checks the rest."""
import contextlib
import sys

import pytest
import torch

from finesteer_kernels import ops
from op_cases import random_params, random_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__")


def _called_from_triton_interpreter() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.replace("\\", "/").endswith("triton/runtime/interpreter.py"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def host_sync_forbidden():
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def guarded(name, original):
        def method(self, *args, **kwargs):
            if not _called_from_triton_interpreter():
                raise AssertionError(f"host sync on the call path: Tensor.{name}")
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, guarded(name, original))
    sync_mode = torch.cuda.get_sync_debug_mode() if DEVICE == "cuda" else None
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode(sync_mode)


def test_guard_catches_syncs():
    t = torch.ones(2)
    for call in (lambda: t.sum().item(), lambda: t.tolist(), lambda: bool(t[0] > 0), lambda: float(t[0]),
                 lambda: [0, 1][t[0].long()]):
        with host_sync_forbidden(), pytest.raises(AssertionError, match="host sync"):
            call()
    assert t.sum().item() == 2.0  # restored afterwards


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_op_call_path_has_no_host_sync(backend, monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", backend)
    p = random_params(48, 4, 3, "relu", seed=21).to(DEVICE)
    h = random_rows(p, 6, seed=22, dtype=torch.float16).to(DEVICE).reshape(2, 3, 48)
    row_to_seq = torch.tensor([[0, 0, 0], [-1, 1, 1]], device=DEVICE)
    ops.steer(h, p)  # packs the weights (cached on p)
    fresh = p.replace(alpha=2.0)  # validated at construction (which may sync); not packed yet
    with host_sync_forbidden():
        assert ops.select_backend(h) == backend
        out = ops.steer(h, p)
        ops.steer_(h.clone(), p)
        coef = ops.synthesize(h[:, -1], p)
        applied = ops.apply_coef(h, coef, p, row_to_seq)
        ops.apply_coef_(h.clone(), coef, p, row_to_seq)
        delta = ops.coef_delta(coef, p)
        ops.apply_delta(h, delta)
        ops.apply_delta_(h.clone(), delta, row_to_seq)
        ops.steer(h, fresh)  # packing happens on the call path too
    assert out.shape == h.shape and applied.shape == h.shape and coef.shape == (2, p.n_coef)


def test_split_d_launch_has_no_host_sync():
    from finesteer_kernels.kernel_common import Layout
    from finesteer_kernels.perf_model import Config
    from finesteer_kernels.steer_kernel import launch_steer

    p = random_params(96, 4, 3, "relu", seed=23).to(DEVICE)
    h = random_rows(p, 20, seed=24, dtype=torch.float16).to(DEVICE)
    packed, layout = ops._kernel_args(h, p)
    out = torch.empty_like(h)
    with host_sync_forbidden():
        launch_steer(h, out, packed.w_in, packed.w_out, packed.mean, packed.consts, Layout(*layout), p.tau, p.eps,
                     p.alpha * p.gamma, config=Config(16, 32, 4, 2, SPLIT=2))
    assert torch.isfinite(out).all()
