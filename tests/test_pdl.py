"""Programmatic dependent launch (`finesteer_kernels.pdl`): the switch and what the model predicts for it. Whether the
kernels hold the wait before their first memory access is checked on their sm_90a PTX
(tests/test_kernel_compile.py, the bank kernel in tests/test_bank_kernels.py); whether it pays is for the GPU run
(benchmarks/gpu_check.py, decode and empty_kernel sections)."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from finesteer_kernels import SteerBank, pdl
from finesteer_kernels.bank_kernel import bank_launch, bank_shape
from finesteer_kernels.bank_perf_model import predict_bank
from finesteer_kernels.heuristics import best_steer
from finesteer_kernels.pdl_model import GRAPH_GAP_US, PDL_RELEASE_US, pdl_gain, step_us
from finesteer_kernels.perf_model import CARDS, Shape, predict_apply_delta
from op_cases import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh_switch(monkeypatch):
    """The switch as a new process would read it."""
    pdl.pdl_requested.cache_clear()
    yield monkeypatch
    pdl.pdl_requested.cache_clear()


@pytest.mark.parametrize("value, on", [(None, False), ("0", False), ("1", True), ("on", True), ("no", False)])
def test_the_env_switch_is_off_by_default_and_read_once(fresh_switch, value, on):
    if value is None:
        fresh_switch.delenv(pdl.ENV, raising=False)
    else:
        fresh_switch.setenv(pdl.ENV, value)
    assert pdl.pdl_requested() is on
    fresh_switch.setenv(pdl.ENV, "0" if on else "1")  # read once: the launch path never reads the environment again
    assert pdl.pdl_requested() is on


def test_an_unknown_value_of_the_switch_is_an_error(fresh_switch):
    fresh_switch.setenv(pdl.ENV, "maybe")
    with pytest.raises(ValueError, match="FINESTEER_PDL='maybe': expected one of 1, on, true, yes"):
        pdl.pdl_requested()


def test_never_on_when_interpreted_or_on_a_cpu_tensor(fresh_switch):
    fresh_switch.setenv(pdl.ENV, "1")
    h = torch.zeros(2, 8)
    assert pdl.pdl_requested()
    for forced in (True, False):
        with pdl.forced(forced):
            assert not pdl.pdl_enabled(h) and pdl.launch_options(h) == {"PDL": False}


OLD_TRITON = """
import sys
import triton.language.extra.cuda
cuda = sys.modules["triton.language.extra.cuda"]  # the module `from triton.language.extra.cuda import` reads
del cuda.gdc_wait, cuda.gdc_launch_dependents  # as in a Triton from before April 2025
import torch
import finesteer_kernels as fk
from finesteer_kernels import pdl
assert not pdl.SUPPORTED
h, delta = torch.randn(3, 40), torch.randn(3, 40)
assert torch.equal(fk.apply_delta(h, delta), (h.float() + delta).to(h.dtype))
print("ran")
"""


def test_the_kernels_still_run_on_a_triton_without_grid_dependency_control():
    """Triton 3.2 (which setup.py allows) has no ``gdc_wait``: PDL is then off and the kernels, which never compile
    the PDL branch, run as before."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", OLD_TRITON], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ran", proc.stderr[-2000:]


def test_forced_overrides_the_switch_and_restores_it(fresh_switch, monkeypatch):
    fresh_switch.setenv(pdl.ENV, "0")
    seen = []
    monkeypatch.setattr(pdl, "INTERPRETING", False)  # as on a GPU: only the tensor's device stands in the way
    monkeypatch.setattr(pdl, "_device_supports", lambda index: True)
    h = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))  # a CUDA tensor as the switch sees one
    with pdl.forced(True):
        seen.append(pdl.launch_options(h))
        with pdl.forced(False):
            seen.append(pdl.launch_options(h))
        seen.append(pdl.launch_options(h))
    seen.append(pdl.launch_options(h))
    assert seen == [{"PDL": True, "launch_pdl": True}, {"PDL": False}, {"PDL": True, "launch_pdl": True},
                    {"PDL": False}]


def test_the_model_hides_the_launch_gap_only_after_a_kernel_that_triggers():
    """PDL saves the graph's launch gap less the wait's release, per launch, whatever the kernel; nothing after a
    kernel that never lets dependents start early; the kernel's own round trips stay (the wait precedes them)."""
    card = CARDS["H200"]
    pred = best_steer(Shape.of(1, 4096, 2, 64, 8, 16, 8), card)
    gain = pdl_gain(pred)
    assert gain["saved_us"] == pytest.approx(GRAPH_GAP_US - PDL_RELEASE_US)
    assert step_us(pred, True) - pred.time_us == pytest.approx(PDL_RELEASE_US)
    assert pred.latency_us > 0 and step_us(pred, True) > pred.time_us  # round trips not hidden
    assert pdl_gain(pred, previous_triggers=False)["saved_us"] == 0


@pytest.mark.parametrize("card", list(CARDS))
def test_predicted_decode_and_prefill_gains(card):
    """The figures docs/kernels.md quotes (predicted; per launch, back to back in a CUDA graph)."""
    card = CARDS[card]
    shape = lambda T: Shape.of(T, 4096, 2, 64, 8, 16, 8)  # noqa: E731
    token = {T: pdl_gain(best_steer(shape(T), card)) for T in (1, 16, 4096, 8192)}
    query = pdl_gain(predict_apply_delta(1, 4096, 2, 1, card))
    layout = SteerBank({"one": random_params(4096, 64, 8, residual="relu", m=16, k=8)}).pack(torch.bfloat16).layout
    config, programs = bank_launch(1, 4096, layout, 2, card, interpreting=False)
    bank = pdl_gain(predict_bank([bank_shape(1, 4096, layout, 2)], config, card, in_place=True, programs=programs))
    assert round(token[1]["off_us"], 1) == 6.2 and round(token[1]["on_us"], 1) == 4.7
    assert 1.3 <= token[16]["speedup"] < token[1]["speedup"] + 0.01
    assert all(token[T]["speedup"] < 1.07 for T in (4096, 8192))  # prefill: a few percent at most
    assert (round(query["off_us"], 1), round(query["on_us"], 1)) == (3.0, 1.5)
    assert config.SPLIT == 8 and (round(bank["off_us"], 1), round(bank["on_us"], 1)) == (9.7, 8.2)
