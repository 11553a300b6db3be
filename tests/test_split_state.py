"""The split-d launches' persistent counters and bounded waits (issue 24, items 4 and 8), under the interpreter.

* The last program out puts the counters back to zero: one buffer serves every call, and a call allocates (and
  zero-fills, a memset launch on a GPU) nothing once the buffer is large enough.
* A wait that is never satisfied gives up after ``spin_limit`` polls and sets the device's error word, which
  `split_d_error_flag` exposes to the host; `clear_split_d_error` resets it and the counters.
"""
import pytest
import torch

import finesteer_kernels as fk
from finesteer_kernels import reference, split_state
from finesteer_kernels.perf_model import Config
from finesteer_kernels.steer_kernel import launch_steer
from op_cases import REL_TOL, random_params, random_rows, rel_error
from test_kernels import DEVICE, kernel_operands, poisoned

SPLIT = Config(16, 32, 4, 2, SPLIT=4)


def split_launch(h, p, **kw):
    packed, layout = kernel_operands(h, p)
    out = poisoned(*h.shape, dtype=h.dtype)
    launch_steer(h, out, packed.w_in, packed.w_out, packed.mean, packed.consts, layout, p.tau, p.eps,
                 p.alpha * p.gamma, config=SPLIT, **kw)
    return out


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(split_state, "_counters", {})
    monkeypatch.setattr(split_state, "_errors", {})


def test_counters_reset_themselves_and_calls_allocate_nothing(fresh_state, monkeypatch):
    p = random_params(150, 12, 4, "relu", seed=50).to(DEVICE)
    h = random_rows(p, 70, seed=51, dtype=torch.float16).to(DEVICE)  # 5 row tiles
    assert rel_error(split_launch(h, p), reference.steer(h, p)) < REL_TOL[torch.float16]
    (counters,) = split_state._counters.values()
    assert counters.numel() >= 2 + 2 * 5 and not counters.any()  # put back to zero by the last program out
    assert fk.split_d_error_flag(h.device).item() == 0

    def no_zeros(*args, **kwargs):
        raise AssertionError("a split-d call allocated zero-filled memory (a memset launch on a GPU)")

    monkeypatch.setattr(torch, "zeros", no_zeros)
    for rows in (70, 1, 33):  # fewer tiles reuse the buffer too
        h = random_rows(p, rows, seed=rows, dtype=torch.float16).to(DEVICE)
        assert rel_error(split_launch(h, p), reference.steer(h, p)) < REL_TOL[torch.float16]
        assert split_state._counters[(h.device, None)] is counters and not counters.any()


def test_a_wait_that_is_never_satisfied_gives_up_and_sets_the_error_word(fresh_state):
    p = random_params(150, 12, 4, "relu", seed=52).to(DEVICE)
    h = random_rows(p, 40, seed=53, dtype=torch.float32).to(DEVICE)  # 3 row tiles
    counters, error = split_state.launch_buffers(h.device, 3)
    counters[2] = 100  # tile 0's arrival count can never reach SPLIT - 1: its coefficients are never published
    split_launch(h, p, spin_limit=5)
    assert fk.split_d_error_flag(h.device).item() == 1  # the launch ended, and says a wait gave up
    fk.clear_split_d_error(h.device)
    assert fk.split_d_error_flag(h.device).item() == 0 and not counters.any()
    assert rel_error(split_launch(h, p), reference.steer(h, p)) < REL_TOL[torch.float32]
    assert fk.split_d_error_flag(h.device).item() == 0
