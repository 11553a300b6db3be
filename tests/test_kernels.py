"""The Triton kernels against the torch reference: under TRITON_INTERPRET=1 on CPU (set by conftest when there is no
GPU), on CUDA where one is present.

Sizes follow a covering design rather than the full product: every value of every axis (d, rows, r, K, residual,
dtype) appears, the bounds are combined (d = 4096 with 257 rows, r = 128, K = 32), and every case runs all three
kernels (token mode, synthesize, apply) into NaN-poisoned outputs, so an element a kernel fails to write shows up.
"""
import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch

from finesteer_kernels import kernel_common, ops, reference
from finesteer_kernels.apply_kernel import launch_apply
from finesteer_kernels.heuristics import apply_config, steer_config
from finesteer_kernels.kernel_common import Layout, shape_of
from finesteer_kernels.perf_model import Config, Shape
from finesteer_kernels.steer_kernel import launch_steer
from finesteer_kernels.synthesize_kernel import launch_synthesize
from op_cases import REL_TOL, far_mean_params, gate_scores64, random_params, random_rows, rel_error, spread_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

# (d, rows, r, K, residual, dtype, m, k)
CASES = [
    (1, 1, 0, 1, None, f32, 6, 3),
    (1, 3, 1, 4, "relu", bf16, 6, 3),
    (5, 64, 1, 10, "identity", f16, 6, 3),
    (5, 257, 0, 32, "relu", f32, 6, 3),
    (576, 3, 12, 4, None, bf16, 6, 3),
    (576, 64, 64, 1, "identity", f32, 6, 3),
    (576, 257, 128, 10, "relu", f16, 6, 3),
    (1000, 1, 128, 32, "identity", bf16, 6, 3),
    (1000, 64, 12, 1, "relu", f32, 17, 5),
    (1000, 257, 12, 4, None, f16, 6, 3),
    (4096, 1, 64, 10, "relu", f16, 6, 3),
    (4096, 3, 1, 4, "identity", f32, 6, 3),
    (4096, 64, 0, 1, None, bf16, 6, 3),
    (4096, 257, 128, 32, "relu", f16, 40, 16),  # all bounds at once: W_in padded to 256 columns, K+k = 48
]


def case_id(case):
    d, rows, r, K, res, dtype, m, k = case
    return f"d{d}-n{rows}-r{r}-K{K}-{res or 'nores'}-{str(dtype)[6:]}"


def make_case(d, rows, r, K, residual, dtype, m, k):
    seed = d + 7 * rows + 11 * r + 13 * K
    p = random_params(d, r, K, residual, m=m, k=k, seed=seed)
    both_gates = rows >= 2 and 0 < r < d  # then the rows must exercise both gate outcomes
    for attempt in range(1, 20):  # the first row draw that keeps clear of tau (and has both gate outcomes)
        try:
            h = random_rows(p, rows, seed=seed + attempt, dtype=dtype)
        except RuntimeError:
            continue
        if not both_gates:
            break
        on = gate_scores64(h, p) >= p.tau
        if on.any() and (~on).any():
            break
    else:
        raise RuntimeError(f"no suitable row draw for {(d, rows, r, K)}")
    return p.to(DEVICE), h.to(DEVICE)


def kernel_operands(h, p):
    packed, layout = ops._kernel_args(h, p)
    return packed, Layout(*layout)


def poisoned(*shape, dtype, device=DEVICE):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def row_map(rows: int, n_seq: int, seed: int) -> torch.Tensor:
    """Sequence index per row, with some -1 (padding) rows once there are three rows or more."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, n_seq, (rows,), generator=g)
    if rows >= 3:
        seq[torch.randperm(rows, generator=g)[: max(1, rows // 4)]] = -1
    return seq.to(DEVICE)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernels_match_reference(case):
    p, h = make_case(*case)
    dtype, rows, tol = h.dtype, h.shape[0], REL_TOL[h.dtype]
    packed, layout = kernel_operands(h, p)
    scale = p.alpha * p.gamma

    out = poisoned(*h.shape, dtype=dtype)
    launch_steer(h, out, packed.w_in, packed.w_out, packed.mean, packed.consts, layout, p.tau, p.eps, scale)
    assert rel_error(out, reference.steer(h, p)) < tol

    coef = poisoned(rows, p.n_coef, dtype=f32)
    launch_synthesize(h, coef, packed.w_in, packed.mean, packed.consts, layout, p.tau, p.eps, scale)
    expected_coef = reference.synthesize(h, p)
    assert rel_error(coef, expected_coef) < tol
    if p.has_gate:  # gate decisions agree exactly: gated-off rows have all-zero coefficients
        assert torch.equal(coef.abs().sum(1) == 0, expected_coef.abs().sum(1) == 0)

    n_seq = min(rows, 3)
    seq = row_map(rows, n_seq, seed=rows)
    out = poisoned(*h.shape, dtype=dtype)
    launch_apply(h, out, expected_coef[:n_seq].contiguous(), seq, packed.w_out)
    assert rel_error(out, reference.apply_coef(h, expected_coef[:n_seq], p, seq)) < tol
    assert torch.equal(out[seq < 0], h[seq < 0])


# The in-place forms through the public functions (torch.library ops), on the cases small enough to repeat.
@pytest.mark.parametrize("case", [c for c in CASES if c[0] * c[1] <= 64 * 1000], ids=case_id)
def test_public_in_place_forms_match_reference(case):
    p, h = make_case(*case)
    tol = REL_TOL[h.dtype]
    assert ops.select_backend(h) == "triton"
    steered = h.clone()
    assert ops.steer_(steered, p) is steered
    assert rel_error(steered, reference.steer(h, p)) < tol
    coef = ops.synthesize(h, p)
    seq = row_map(h.shape[0], h.shape[0], seed=3)
    applied = h.clone()
    assert ops.apply_coef_(applied, coef, p, seq) is applied
    assert rel_error(applied, reference.apply_coef(h, coef, p, seq)) < tol
    assert torch.equal(applied[seq < 0], h[seq < 0])


@pytest.mark.parametrize("dtype", [f32, f16, bf16], ids=str)
def test_public_functions_keep_shapes_and_dtypes(dtype):
    p = random_params(40, 4, 3, "relu", seed=5).to(DEVICE)
    h = random_rows(p, 12, seed=6, dtype=dtype).to(DEVICE).reshape(3, 4, 40)
    out = ops.steer(h, p)
    assert out.shape == h.shape and out.dtype == dtype
    assert rel_error(out, reference.steer(h, p)) < REL_TOL[dtype]
    coef = ops.synthesize(h[:, -1], p)
    assert coef.shape == (3, p.n_coef) and coef.dtype == f32
    seq = torch.arange(3, device=DEVICE)[:, None].expand(3, 4).clone()
    seq[0, :2] = -1
    applied = ops.apply_coef(h, coef, p, seq)
    assert applied.shape == h.shape and applied.dtype == dtype
    assert rel_error(applied, reference.apply_coef(h, coef, p, seq)) < REL_TOL[dtype]
    # transposed (non-contiguous) inputs: every form against the reference, so a stride bug shows
    ht = h.transpose(0, 1)
    seq_t = seq.transpose(0, 1)
    steered_t = ht.clone()
    assert not steered_t.is_contiguous()
    assert ops.steer_(steered_t, p) is steered_t
    assert rel_error(steered_t, reference.steer(ht, p)) < REL_TOL[dtype]
    assert rel_error(ops.steer(ht, p), reference.steer(ht, p)) < REL_TOL[dtype]
    applied_t = ht.clone()
    assert ops.apply_coef_(applied_t, coef, p, seq_t) is applied_t
    assert rel_error(applied_t, reference.apply_coef(ht, coef, p, seq_t)) < REL_TOL[dtype]


def test_in_place_leaves_gated_off_rows_unwritten():
    """A negative zero survives only if its row is left as it is (``-0.0 + 0.0`` is ``+0.0``): gated-off rows are not
    stored in place and copied unchanged out of place."""
    p = random_params(64, 4, 3, "relu", seed=8).to(DEVICE)
    h = random_rows(p, 8, seed=9).to(DEVICE)
    off = (gate_scores64(h.cpu(), p.to("cpu")) < p.tau).to(DEVICE)
    assert off.any() and (~off).any()
    h[:, 0] = -0.0
    steered = ops.steer_(h.clone(), p)
    assert torch.signbit(steered[off, 0]).all()
    assert torch.equal(steered[off], h[off])
    assert rel_error(steered, reference.steer(h, p)) < 1e-5
    assert torch.signbit(ops.steer(h, p)[off, 0]).all()  # out of place too: gated-off rows keep their bits


def test_gpu_block_configurations_under_the_interpreter():
    """The tile shapes the model picks on a GPU (16/32/64 rows, d blocks of 64-256, a split of d) give the same
    results as the pinned interpreter configuration."""
    p = random_params(200, 12, 4, "relu", seed=10)
    wide = random_params(200, 128, 32, "relu", m=40, k=16, seed=11)
    for params, rows in ((p, 5), (p, 40), (wide, 70)):
        params = params.to(DEVICE)
        h = random_rows(params, rows, seed=12, dtype=f16).to(DEVICE)
        packed, layout = kernel_operands(h, params)
        shape = shape_of(rows, params.d, layout, 2)
        config = steer_config(shape)
        out = poisoned(*h.shape, dtype=f16)
        launch_steer(h, out, packed.w_in, packed.w_out, packed.mean, packed.consts, layout, params.tau, params.eps,
                     params.alpha * params.gamma, config=config)
        assert rel_error(out, reference.steer(h, params)) < REL_TOL[f16], config
        coef = reference.synthesize(h, params)
        seq = row_map(rows, rows, seed=13)
        config = apply_config(Shape(rows, params.d, 2, 8, params.n_coef, has_pass1=False), rows)
        out = poisoned(*h.shape, dtype=f16)
        launch_apply(h, out, coef, seq, packed.w_out, config=config)
        assert rel_error(out, reference.apply_coef(h, coef, params, seq)) < REL_TOL[f16], config


# split-d (SPLIT > 1): the prefill layout (several row tiles, a lag, a ring of partial slots smaller than the tile
# count) and the decode layout (one row tile over many programs), every dtype, in and out of place, with a keep
# mask, into poisoned outputs; d not a multiple of the slice.
SPLIT_CASES = [  # (d, rows, r, K, residual, dtype, config, lag)
    (300, 70, 12, 4, "relu", f32, Config(16, 32, 4, 2, SPLIT=4), 2),  # 5 tiles, ring < tiles
    (257, 1, 64, 32, "identity", bf16, Config(16, 64, 4, 3, SPLIT=4), None),  # decode, r and K at bounds
    (1000, 33, 12, 1, None, f16, Config(32, 64, 4, 3, SPLIT=8), 1),  # 2 tiles; last slices empty (8 x 128 > 1000)
    (96, 40, 8, 10, "relu", f16, Config(16, 32, 4, 2, SPLIT=2), 3),  # lag past the tile count
    (200, 20, 128, 32, "relu", f32, Config(16, 64, 8, 2, SPLIT=4), None),  # r and K at their bounds, NP = 256
    # tiles taller than EPILOGUE_ROWS: the last slice sums and finishes them in 64-row chunks (the picks' 128 x 64)
    (300, 300, 64, 8, "relu", bf16, Config(128, 64, 8, 4, SPLIT=4), None),  # 3 tiles, the last one 44 rows
    (70, 129, 3, 1, None, f16, Config(128, 32, 8, 4, SPLIT=2), 1),  # 2 tiles, the second one row; K = 1, no MLP
    (200, 1, 128, 32, "relu", f32, Config(128, 64, 8, 2, SPLIT=4), None),  # one row, r and K at their bounds
    (300, 260, 16, 4, "relu", f16, Config(128, 64, 8, 4, SPLIT=6), 2),  # 6 slices: the 5th short, the 6th empty
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"d{c[0]}-n{c[1]}-split{c[6].SPLIT}-{str(c[5])[6:]}")
def test_split_d_matches_reference(case):
    d, rows, r, K, residual, dtype, config, lag = case
    p = random_params(d, r, K, residual, seed=d + 7 * rows).to(DEVICE)
    h = random_rows(p, rows, seed=rows, dtype=dtype).to(DEVICE)
    packed, layout = kernel_operands(h, p)
    scale, tol = p.alpha * p.gamma, REL_TOL[dtype]
    args = (packed.w_in, packed.w_out, packed.mean, packed.consts, layout, p.tau, p.eps, scale)
    expected = reference.steer(h, p)
    out = poisoned(*h.shape, dtype=dtype)
    launch_steer(h, out, *args, config=config, lag=lag)
    assert rel_error(out, expected) < tol
    coef = poisoned(rows, p.n_coef, dtype=f32)
    launch_synthesize(h, coef, packed.w_in, packed.mean, packed.consts, layout, p.tau, p.eps, scale, config=config)
    assert rel_error(coef, reference.synthesize(h, p)) < tol
    keep = torch.arange(rows, device=DEVICE) % 3 != 1
    steered = h.clone()
    steered[:, 0] = -0.0
    before = steered.clone()
    launch_steer(steered, steered, *args, keep=keep, config=config, lag=lag)
    want = reference.steer(before, p, row_mask=keep)
    assert rel_error(steered, want) < tol
    untouched = ~keep | (reference.synthesize(before, p).abs().sum(1) == 0)  # masked or gated off: not stored
    assert torch.signbit(steered[untouched, 0]).all()


def test_split_d_persistent_programs_loop_over_many_items(monkeypatch):
    """On a card with 2 SMs of one program each, the split-d grid is 2 programs taking many tickets each."""
    import dataclasses

    from finesteer_kernels import steer_kernel
    from finesteer_kernels.kernel_common import shape_of
    from finesteer_kernels.perf_model import DEFAULT_CARD, split_plan

    tiny = dataclasses.replace(DEFAULT_CARD, sms=2, max_ctas_per_sm=1)
    monkeypatch.setattr(steer_kernel, "card_for", lambda t: tiny)
    p = random_params(150, 12, 4, "relu", seed=44).to(DEVICE)
    h = random_rows(p, 100, seed=45, dtype=f16).to(DEVICE)  # 7 row tiles
    packed, layout = kernel_operands(h, p)
    config = Config(16, 32, 4, 2, SPLIT=4)
    plan = split_plan(shape_of(100, 150, layout, 2), config, tiny)
    assert plan.grid == 2 and plan.ring < 7  # 2 programs for (7 + lag) x 4 items; the partials' ring is reused
    out = poisoned(*h.shape, dtype=f16)
    launch_steer(h, out, packed.w_in, packed.w_out, packed.mean, packed.consts, layout, p.tau, p.eps,
                 p.alpha * p.gamma, config=config)
    assert rel_error(out, reference.steer(h, p)) < REL_TOL[f16]


def test_apply_delta_matches_reference():
    p = random_params(130, 6, 4, "relu", seed=40).to(DEVICE)
    for dtype in (f32, f16, bf16):
        h = random_rows(p, 6, seed=41, dtype=dtype).to(DEVICE).reshape(3, 2, 130)
        coef = reference.synthesize(h[:, -1], p)
        delta = ops.coef_delta(coef, p)
        assert delta.dtype == f32 and rel_error(delta, coef @ reference.output_basis(p)) < 1e-6
        want = reference.apply_coef(h, coef, p, torch.arange(3, device=DEVICE)[:, None].expand(3, 2))
        assert rel_error(ops.apply_delta(h, delta), want) < REL_TOL[dtype]
        steered = h.clone()
        assert ops.apply_delta_(steered, delta) is steered
        assert rel_error(steered, want) < REL_TOL[dtype]
        seq = torch.tensor([[2, -1], [0, 0], [-1, 1]], device=DEVICE)
        mapped = ops.apply_delta(h, delta, seq)
        assert rel_error(mapped, reference.apply_coef(h, coef, p, seq)) < REL_TOL[dtype]
        assert torch.equal(mapped[seq < 0], h[seq < 0])
        in_place = h.clone()
        ops.apply_delta_(in_place, delta, seq)
        assert torch.equal(in_place, mapped)
    with pytest.raises(ValueError, match="delta: without row_to_seq"):
        ops.apply_delta(h[:2], delta)
    with pytest.raises(TypeError, match="delta: expected float32"):
        ops.apply_delta(h, delta.half())



@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [f16, bf16], ids=str)
def test_delta_in_the_activation_dtype(backend, dtype, monkeypatch):
    """Issue 24: ``coef_delta(..., dtype=h.dtype)`` stores the per-sequence edit in 2 bytes an element; a decode step
    still adds it in fp32 and stays within the op's tolerance of the fp32 delta, with and without a map, fused with
    the norm too; the prompt (mapped) and the generated tokens (unmapped) still get the same edit."""
    monkeypatch.setenv("FINESTEER_BACKEND", backend)
    p = random_params(130, 6, 4, "relu", seed=42).to(DEVICE)
    h = random_rows(p, 6, seed=43, dtype=dtype).to(DEVICE).reshape(3, 2, 130)
    coef = reference.synthesize(h[:, -1], p)
    wide, narrow = ops.coef_delta(coef, p), ops.coef_delta(coef, p, dtype)
    assert narrow.dtype == dtype and torch.equal(narrow, reference.coef_delta(coef, p, dtype))
    want = reference.apply_delta(h, wide)
    assert rel_error(ops.apply_delta(h, narrow), want) < REL_TOL[dtype]
    steered = h.clone()
    ops.apply_delta_(steered, narrow)
    seq = torch.arange(3, device=DEVICE)[:, None].expand(3, 2)
    assert torch.equal(steered, ops.apply_delta(h, narrow, seq))
    norm = random_norm(130, dtype)
    out, y = ops.apply_delta_rmsnorm(h, narrow, norm)
    assert torch.equal(out, steered) and rel_error(y, reference.rms_norm(want, norm)) < 2 * REL_TOL[dtype]


def random_norm(d, dtype):
    from finesteer_kernels import RMSNormParams

    return RMSNormParams(torch.rand(d, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE) + 0.5, 1e-6)


@pytest.mark.parametrize("dtype", [f32, f16], ids=str)
def test_apply_delta_without_a_map_over_row_and_column_tiles(dtype):
    """No map: row i belongs to sequence i // rows_per_seq. 5 sequences of 7 rows (sequences straddle the 16-row
    tiles) and d = 1100 (three 512-column blocks), out of place into a poisoned output and in place, exact against
    h + delta repeated per row (a row-index bug here was caught only by the benchmark dry run)."""
    from finesteer_kernels.delta_kernel import launch_apply_delta

    g = torch.Generator().manual_seed(47)
    sequences, rows_per_seq, d = 5, 7, 1100
    h = torch.randn(sequences, rows_per_seq, d, generator=g).to(DEVICE, dtype)
    delta = torch.randn(sequences, d, generator=g).to(DEVICE)
    want = (h.float() + delta[:, None, :]).to(dtype)
    out = poisoned(*h.shape, dtype=dtype)
    launch_apply_delta(h, out, delta, None, rows_per_seq)
    assert torch.equal(out, want)
    assert torch.equal(ops.apply_delta(h, delta), want)
    in_place = h.clone()
    assert torch.equal(ops.apply_delta_(in_place, delta), want)


# ratios at which the former gate (expanded ||h||^2 - 2 h.mu + ||mu||^2, mu rounded into W_in) got 4-7 of these
# 128 rows wrong in each dtype; larger 16-bit ratios would leave h - mu below the rounding of h itself
@pytest.mark.parametrize("dtype,ratio", [(f32, 1000.0), (f16, 1000.0), (bf16, 300.0)], ids=["f32", "f16", "bf16"])
def test_rows_near_a_large_mean(dtype, ratio):
    """||mu|| >= 30 ||h - mu||, as in real residual streams, and gate scores spread up to the margin around tau:
    the gate decisions must match the float64 truth exactly."""
    p = far_mean_params(1000, 12, 4, "relu", ratio=ratio, seed=3)
    h = spread_rows(p, 128, seed=4, dtype=dtype)
    assert (p.mean.norm() / (h.double() - p.mean.double()).norm(dim=1)).min() >= 30
    truth = gate_scores64(h, p) >= p.tau
    assert truth.any() and (~truth).any()
    p, h = p.to(DEVICE), h.to(DEVICE)
    coef = ops.synthesize(h, p)
    assert torch.equal((coef.abs().sum(1) != 0).cpu(), truth)
    assert rel_error(coef, reference.synthesize(h, p)) < REL_TOL[dtype]
    out = ops.steer(h, p)
    assert torch.equal((out != h).any(1).cpu(), truth)
    assert rel_error(out, reference.steer(h, p)) < REL_TOL[dtype]


def test_apply_marks_out_of_range_sequence_indices_with_nan():
    p = random_params(32, 0, 2, seed=14).to(DEVICE)
    h = torch.randn(4, 32, device=DEVICE)
    coef = torch.randn(2, p.n_coef, device=DEVICE)
    out = ops.apply_coef(h, coef, p, torch.tensor([0, 2, -1, 1], device=DEVICE))
    assert out[1].isnan().all() and not out[[0, 2, 3]].isnan().any()


def test_row_mask_leaves_rows_alone_in_one_launch():
    p = random_params(64, 4, 3, "relu", seed=16).to(DEVICE)
    h = random_rows(p, 8, seed=17).to(DEVICE).reshape(2, 4, 64)
    on = (gate_scores64(h.reshape(8, 64).cpu(), p.to("cpu")) >= p.tau).reshape(2, 4).to(DEVICE)
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]], device=DEVICE)
    assert (on & mask).any() and (on & ~mask).any()  # masked rows whose gate is on would have changed
    h[..., 0] = -0.0
    expected = reference.steer(h, p, row_mask=mask)
    assert torch.equal(expected[~mask], h[~mask])
    out = ops.steer(h, p, row_mask=mask)
    assert rel_error(out, expected) < 1e-5 and torch.equal(out[~mask], h[~mask])
    steered = h.clone()
    assert ops.steer_(steered, p, row_mask=mask.reshape(-1)) is steered
    assert rel_error(steered, expected) < 1e-5
    assert torch.signbit(steered[~mask][:, 0]).all()  # masked rows are not stored at all in place
    with pytest.raises(TypeError, match="row_mask: expected a bool tensor"):
        ops.steer(h, p, row_mask=mask.long())


def test_gradients_fall_back_to_the_differentiable_reference(monkeypatch):
    """The kernels have no backward: with autograd on and an input requiring grad, the reference runs."""
    p = random_params(24, 3, 3, "relu", seed=18).to(DEVICE)
    h = random_rows(p, 6, seed=19).to(DEVICE)
    x = h.clone().requires_grad_(True)
    assert ops.select_backend(x) == "torch"
    ops.steer(x, p).square().sum().backward()
    x_ref = h.clone().requires_grad_(True)
    reference.steer(x_ref, p).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    coef = ops.synthesize(h[:2], p).requires_grad_(True)
    seq = torch.tensor([0, 1, -1, 0, 1, 1], device=DEVICE)
    assert ops.select_backend(h, coef) == "torch"
    ops.apply_coef(h, coef, p, seq).sum().backward()
    assert coef.grad is not None and coef.grad.abs().sum() > 0
    with torch.no_grad():
        assert ops.select_backend(x) == "triton"
        assert rel_error(ops.steer(x, p), reference.steer(h, p)) < 1e-5
    monkeypatch.setenv("FINESTEER_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="FINESTEER_BACKEND=triton.*requires grad.*no backward"):
        ops.steer(x, p)


def test_every_launch_makes_the_tensors_device_current(monkeypatch):
    """Triton launches on the current device: each launcher enters `device_guard(h)` around its launch (on a CPU
    machine this checks the wiring; the guard itself sets the CUDA device for CUDA tensors)."""
    from finesteer_kernels import apply_kernel, delta_kernel, steer_kernel

    seen = []

    def recording_guard(t):
        seen.append(t)
        return kernel_common.device_guard(t)

    for module in (steer_kernel, apply_kernel, delta_kernel):  # synthesize launches through steer_kernel
        monkeypatch.setattr(module, "device_guard", recording_guard)
    p = random_params(16, 2, 3, "relu", seed=20).to(DEVICE)
    h = random_rows(p, 4, seed=21).to(DEVICE)
    ops.steer(h, p)
    coef = ops.synthesize(h, p)
    ops.apply_coef(h, coef, p, torch.arange(4, device=DEVICE))
    ops.apply_delta(h, ops.coef_delta(coef, p), torch.arange(4, device=DEVICE))
    assert len(seen) == 4 and all(t.device == h.device and t.shape == h.shape for t in seen)
    assert isinstance(kernel_common.device_guard(torch.zeros(1)), contextlib.nullcontext)


def test_empty_input():
    p = random_params(16, 2, 3, "relu", seed=15).to(DEVICE)
    h = torch.randn(0, 16, device=DEVICE)
    assert ops.steer(h, p).shape == (0, 16)
    assert ops.synthesize(h, p).shape == (0, p.n_coef)


# ---- backend selection ----------------------------------------------------------------------------------------

def test_backend_env_forces_and_validates(monkeypatch):
    h = torch.randn(2, 8, device=DEVICE)
    monkeypatch.setenv("FINESTEER_BACKEND", "torch")
    assert ops.select_backend(h) == "torch"
    monkeypatch.setenv("FINESTEER_BACKEND", "Triton ")
    assert ops.select_backend(h) == "triton"
    monkeypatch.setenv("FINESTEER_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FINESTEER_BACKEND: expected one of"):
        ops.select_backend(h)
    monkeypatch.delenv("FINESTEER_BACKEND")
    assert ops.select_backend(h) == "triton"


def test_forcing_triton_where_it_cannot_run_raises(monkeypatch):
    cpu = torch.randn(2, 8)
    monkeypatch.setattr(kernel_common, "INTERPRETING", False)
    assert ops.select_backend(cpu) == "torch"
    monkeypatch.setenv("FINESTEER_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="FINESTEER_BACKEND=triton.*TRITON_INTERPRET=1"):
        ops.select_backend(cpu)
    monkeypatch.setattr(ops, "_TRITON_INSTALLED", False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        ops.steer(cpu, random_params(8, 0, 1))
    monkeypatch.delenv("FINESTEER_BACKEND")
    assert ops.select_backend(cpu) == "torch"


def test_package_imports_and_runs_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"  # any `import triton` now fails
            "import torch, finesteer_kernels as fk\n"
            "from finesteer_kernels import reference\n"
            "p = fk.SteerParams(experts=torch.ones(1, 4))\n"
            "assert fk.select_backend(torch.zeros(1, 4)) == 'torch'\n"
            "assert torch.equal(fk.steer(torch.zeros(2, 4), p), torch.ones(2, 4))\n"
            "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    env = {k: v for k, v in os.environ.items() if k not in ("FINESTEER_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_relative_tolerances_are_the_issue_ones():
    assert REL_TOL[f32] == 1e-5 and REL_TOL[f16] == REL_TOL[bf16] == 1e-2
    assert math.isinf(rel_error(torch.tensor([float("nan")]), torch.tensor([1.0])))


def test_split_d_launch_runs_the_plan_the_model_predicts_with(monkeypatch):
    """One split plan (`perf_model.split_plan`) for the kernel and the model: the grid, lag and workspace the launch
    uses are the model's; at decode (one row tile) the lag is clamped to the tile count in both (the model once
    counted an unclamped lag: a grid of 3 x SPLIT programs where the kernel launches 2 x SPLIT)."""
    from finesteer_kernels import perf_model, steer_kernel

    launched = {}
    real = steer_kernel.steer_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.update(grid=grid[0], lag=args[16], ring=args[17], ws=args[8].numel())
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(steer_kernel, "steer_kernel", Recorder())
    p = random_params(150, 12, 4, "relu", seed=46).to(DEVICE)
    h = random_rows(p, 1, seed=47, dtype=f16).to(DEVICE)
    packed, layout = kernel_operands(h, p)
    config = Config(16, 32, 4, 2, SPLIT=4)
    out = poisoned(*h.shape, dtype=f16)
    launch_steer(h, out, packed.w_in, packed.w_out, packed.mean, packed.consts, layout, p.tau, p.eps,
                 p.alpha * p.gamma, config=config)
    assert rel_error(out, reference.steer(h, p)) < REL_TOL[f16]
    shape = shape_of(1, 150, layout, 2)
    card = kernel_common.card_for(h)
    plan = perf_model.split_plan(shape, config, card)
    pred = perf_model.predict_steer(shape, config, card)
    assert plan.lag == 1 and launched == dict(grid=plan.grid, lag=1, ring=plan.ring, ws=plan.workspace)
    assert pred.grid == plan.grid == 2 * 4  # pass 1 and pass 2 items of the one tile's 4 slices
    # the workspace holds the kernel's rows: NP + 2 partial words (the projections, ||xc||^2 plain and
    # scaled), NCP + 1 coefficient words (fused norm: + 1 each)
    np_, ncp = layout.constexprs()["NP"], layout.constexprs()["NCP"]
    assert (plan.part_w, plan.coef_w) == (np_ + 2, ncp + 1)
    norm_plan = perf_model.split_plan(shape.with_norm(2), config, card)
    assert (norm_plan.part_w, norm_plan.coef_w) == (np_ + 3, ncp + 2)


def test_packs_are_not_built_inside_a_cuda_graph_capture(monkeypatch):
    """A pack built on first use inside torch.cuda.graph(...) would only be recorded, never run before the first
    replay: the first use on a new dtype/device inside a capture raises, naming the cure; built packs are reused."""
    from finesteer_kernels import params as params_module
    from finesteer_kernels import RMSNormParams, SteerBank
    from finesteer_kernels.norm import pack_steer_norm

    p = random_params(40, 4, 3, "relu", seed=48)
    h = random_rows(p, 3, seed=49, dtype=f32)
    ops.steer(h, p)  # packs for fp32 on this device, before any capture
    bank = SteerBank([p, random_params(40, 0, 1, seed=50)])
    for q in bank.params:
        q.pack_centred(f32, h.device, 8)  # the bank's own pack is what is missing below, not its steerers'
    monkeypatch.setattr(params_module, "cuda_graph_capturing", lambda: True)
    assert rel_error(ops.steer(h, p), reference.steer(h, p)) < REL_TOL[f32]  # cached: fine while capturing
    for build in (lambda: ops.steer(h.half(), p), lambda: p.pack(f16), lambda: pack_steer_norm(p, f32, h.device),
                  lambda: ops.steer_rmsnorm(h, p, RMSNormParams(torch.ones(40), 1e-6)), lambda: bank.pack(f32)):
        with pytest.raises(RuntimeError, match="inside a CUDA graph capture.*call the op once"):
            build()
