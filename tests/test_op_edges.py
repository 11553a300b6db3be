"""Edges of the op on both backends (the Triton one through the interpreter): rows exactly on the gate threshold,
a row equal to the mean, scales at the float32 limit, out-of-range sequence indices, rank-deficient bases and the
errors for malformed arguments.

The boundary rows are built from small integers on coordinate axes, so every product and sum is exact in fp32 (and
in fp16/bf16): the score comes out exactly equal to tau in the reference and in the kernel alike, and ``>=``
versus ``>`` decides the outcome.
"""
import numpy as np
import pytest
import torch

from finesteer_kernels import SteerParams, ops, reference

from op_cases import DTYPES, random_params

D = 8
FP32_MAX = torch.finfo(torch.float32).max
BACKENDS = ("torch", "triton")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", request.param)
    return request.param


def axis_params(r: int, tau: float, mean=None, scale: float = 2.0) -> SteerParams:
    """Gate on the first ``r`` coordinate axes, one all-ones expert, ``alpha * gamma = scale``."""
    return SteerParams(experts=torch.ones(1, D), basis=torch.eye(D)[:, :r], mean=mean, tau=tau, alpha=scale)


def rows(*coords) -> torch.Tensor:
    """Rows given by their first coordinates (the rest zero)."""
    out = torch.zeros(len(coords), D)
    for i, c in enumerate(coords):
        out[i, :len(c)] = torch.tensor(c, dtype=torch.float32)
    return out


# (r, tau, rows, expected gate) with exact scores: 1/2, 1/4, 1 and 0 against tau at the same value
BOUNDARY_CASES = {
    "score == tau = 1/2": (1, 0.5, rows([1, 1], [1, 1, 1, 1]), [1, 0]),
    "score == tau = 1/4": (1, 0.25, rows([1, 1, 1, 1], [1, 1, 1, 1, 1]), [1, 0]),
    "tau = 1, row inside span(S)": (2, 1.0, rows([3, 4], [3, 4, 1]), [1, 0]),
    "tau = 0, row orthogonal to S": (2, 0.0, rows([0, 0, 2], [0, 0, 0, 5, 1]), [1, 1]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BOUNDARY_CASES, ids=str)
@pytest.mark.parametrize("with_mean", [False, True], ids=["no-mean", "mean"])
def test_rows_exactly_on_the_threshold_are_steered(case, dtype, with_mean, backend):
    """``g = [score >= tau]``: a score exactly equal to tau steers (a ``>`` would leave these rows alone)."""
    r, tau, offsets, gate = BOUNDARY_CASES[case]
    mean = torch.arange(D, dtype=torch.float32) - 3 if with_mean else None
    p = axis_params(r, tau, mean)
    h = (offsets + (mean if with_mean else 0)).to(dtype)
    on = torch.tensor(gate, dtype=torch.bool)
    expected = torch.where(on[:, None], h.float() + 2.0, h.float()).to(dtype)  # exact: small integers
    assert torch.equal(reference.gate(h.float(), p), on.float())
    assert torch.equal(ops.steer(h, p), expected)
    in_place = h.clone()
    ops.steer_(in_place, p)
    assert torch.equal(in_place, expected)
    assert torch.equal(ops.synthesize(h, p), 2.0 * on.float()[:, None])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_row_equal_to_the_mean_uses_the_eps_floor(dtype, backend):
    """h == mu: centred energy 0, so the score is 0 / max(0, eps) = 0 and tau = 0 steers it; without the eps
    floor it would be 0/0 = NaN and the comparison false."""
    mean = torch.tensor([1.0, -2.0, 3.0, 0.0, 4.0, 0.0, -1.0, 2.0])
    p = axis_params(2, 0.0, mean)
    h = torch.stack([mean, mean + rows([0, 0, 1])[0]]).to(dtype)
    assert torch.equal(ops.synthesize(h, p), torch.full((2, 1), 2.0))
    assert torch.equal(ops.steer(h, p), (h.float() + 2.0).to(dtype))
    # with tau > 0 the same row is left alone: the floor makes its score 0, not NaN-and-accidentally-off
    assert torch.equal(ops.steer(h, axis_params(2, 0.5, mean)), h)


def test_gated_off_rows_stay_exactly_unchanged_at_the_largest_scale(backend):
    """The largest scale the op accepts keeps gated-off rows bit-identical and their coefficients exactly 0."""
    scale = FP32_MAX / 2
    p = SteerParams(experts=torch.ones(1, D), basis=torch.eye(D)[:, :1], tau=0.5, alpha=scale, gamma=2.0)
    h = rows([1, 0], [0, 1], [1, 3])  # on, off, off
    coef = ops.synthesize(h, p)
    assert torch.equal(coef[1:], torch.zeros(2, 1)) and coef[0, 0] > 1e38
    out = ops.steer(h, p)
    assert torch.equal(out[1:], h[1:]) and not out.isnan().any()
    in_place = h.clone()
    ops.steer_(in_place, p)
    assert torch.equal(in_place[1:], h[1:])
    row_to_seq = torch.tensor([0, 1, 2])
    assert torch.equal(ops.apply_coef(h, coef, p, row_to_seq)[1:], h[1:])


@pytest.mark.parametrize("scalars", [dict(alpha=1e39), dict(alpha=1e20, gamma=1e20), dict(gamma=-4e38)])
def test_scales_that_overflow_float32_are_refused(scalars):
    with pytest.raises(ValueError, match=r"(alpha|gamma).*overflows float32"):
        SteerParams(experts=torch.ones(1, 64), basis=torch.eye(64)[:, :1], tau=0.5, **scalars)
    with pytest.raises(ValueError, match="overflows float32"):
        SteerParams(experts=torch.ones(1, 64)).replace(**scalars)


@pytest.mark.parametrize("in_place", [False, True])
def test_sequence_indices_past_the_end_give_nan_rows_on_both_backends(backend, in_place):
    """One documented behaviour: an index >= B makes its row NaN (B itself included), negative ones skip the row;
    nothing raises, because checking would need a host read of row_to_seq."""
    p = random_params(32, 0, 2, seed=14)
    h = torch.randn(6, 32)
    coef = torch.randn(2, p.n_coef)
    row_to_seq = torch.tensor([0, 2, -1, 1, 3, -2])
    if in_place:
        out = h.clone()
        ops.apply_coef_(out, coef, p, row_to_seq)
    else:
        out = ops.apply_coef(h, coef, p, row_to_seq)
    assert out[[1, 4]].isnan().all()
    assert torch.equal(out[[2, 5]], h[[2, 5]])
    expected = reference.apply_coef(h[[0, 3]], coef, p, torch.tensor([0, 1]))
    torch.testing.assert_close(out[[0, 3]], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("basis", [torch.eye(64)[:, [0, 0]], torch.zeros(64, 3),
                                   torch.stack([torch.eye(64)[0], 2 * torch.eye(64)[0], torch.eye(64)[1]], 1)],
                         ids=["e0-e0", "zeros-r3", "e0-2e0-e1"])
def test_orthonormalize_refuses_rank_deficient_bases(basis):
    """QR of a rank-deficient basis fills the missing directions with arbitrary columns: with [e0, e0] the row
    e1 would be steered. Such bases are refused instead."""
    with pytest.raises(ValueError, match="basis: rank-deficient"):
        SteerParams(experts=torch.ones(1, 64), basis=basis, tau=0.5, orthonormalize=True)


def test_orthonormalize_accepts_nearly_parallel_independent_columns():
    e = torch.eye(64)
    p = SteerParams(experts=torch.ones(1, 64), basis=torch.stack([e[0], e[0] + 1e-3 * e[1]], 1), tau=0.5,
                    orthonormalize=True)
    torch.testing.assert_close(p.basis.abs(), e[:, :2], atol=1e-4, rtol=0)


def test_numpy_and_one_element_tensor_scalars_are_numbers():
    p = SteerParams(experts=torch.ones(1, 4), tau=np.float32(0.25), alpha=np.float64(2.0), gamma=np.int64(3),
                    eps=torch.tensor(1e-6))
    assert p.scalars() == dict(tau=0.25, alpha=2.0, gamma=3.0, eps=pytest.approx(1e-6), activation="relu")
    assert all(type(p.scalars()[k]) is float for k in ("tau", "alpha", "gamma", "eps"))


def test_hot_path_errors_name_the_argument_on_both_backends(backend):
    p = random_params(16, 2, 2, seed=3)
    h = torch.randn(3, 16)
    with pytest.raises(ValueError, match=r"coef: expected shape \(B, 2\)"):
        ops.apply_coef(h, [[0.5, 0.5]], p, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="coef: expected shape"):
        ops.apply_coef_(h, [[0.5, 0.5]], p, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="params: expected finesteer_kernels.SteerParams, got dict"):
        ops.steer(h, {"experts": p.experts})


@pytest.mark.parametrize("in_place", [False, True])
def test_delta_ops_give_nan_rows_past_the_end_on_both_backends(backend, in_place):
    """`apply_delta` (and `apply_delta_rmsnorm`, which adds the same edit) follow `apply_coef`'s rule on both
    backends: an index >= B makes its row NaN (B itself included), negative ones leave the row unedited. (The
    reference once left the row at index B unchanged and raised IndexError past it, where the kernel gave NaN.)"""
    from finesteer_kernels import RMSNormParams

    d = 32
    g = torch.Generator().manual_seed(15)
    h, delta = torch.randn(6, d, generator=g), torch.randn(2, d, generator=g)
    norm = RMSNormParams(torch.rand(d, generator=g) + 0.5, 1e-6)
    row_to_seq = torch.tensor([0, 2, -1, 1, 3, -2])
    if in_place:
        out, fused = h.clone(), h.clone()
        ops.apply_delta_(out, delta, row_to_seq)
        y = ops.apply_delta_rmsnorm_(fused, delta, norm, row_to_seq)
    else:
        out = ops.apply_delta(h, delta, row_to_seq)
        fused, y = ops.apply_delta_rmsnorm(h, delta, norm, row_to_seq)
    for edited in (out, fused):
        assert edited[[1, 4]].isnan().all()
        assert torch.equal(edited[[2, 5]], h[[2, 5]])
        torch.testing.assert_close(edited[[0, 3]], h[[0, 3]] + delta, rtol=1e-6, atol=1e-6)
    assert y[[1, 4]].isnan().all() and not y[[0, 2, 3, 5]].isnan().any()
    torch.testing.assert_close(y[[0, 2, 3, 5]], reference.rms_norm(fused[[0, 2, 3, 5]], norm), rtol=1e-5, atol=1e-5)
