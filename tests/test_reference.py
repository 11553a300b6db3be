"""The torch reference against an independent float64 per-row implementation, special cases and the query split."""
import itertools

import pytest
import torch

from finesteer_kernels import SteerParams, reference
from op_cases import DTYPES, REL_TOL, gate_scores64, loop_coefficients, loop_steer, random_params, random_rows, \
    rel_error

CASES = [(d, r, K, res) for d, r, K, res in itertools.product((5, 576, 1000), (0, 1, 7, 64), (1, 3, 8),
                                                               (None, "relu", "identity")) if r <= d]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,r,K,residual", CASES)
def test_steer_matches_float64_loops(d, r, K, residual, dtype):
    p = random_params(d, r, K, residual, seed=d * 100 + r * 10 + K)
    h = random_rows(p, 6, seed=K + r, dtype=dtype)
    if 0 < r < d:
        on = gate_scores64(h, p) >= p.tau
        assert on.any() and (~on).any(), "test rows must exercise both gate outcomes"
    ref = loop_steer(h, p)
    out = reference.steer(h, p)
    assert out.dtype == dtype and out.shape == h.shape
    assert rel_error(out, ref) < REL_TOL[dtype]
    # leading shape (B, T, d): same rows, same results
    out3 = reference.steer(h.reshape(2, 3, d), p)
    assert out3.shape == (2, 3, d)
    assert torch.equal(out3.reshape(6, d), out)
    # coefficients themselves, in fp32
    assert rel_error(reference.synthesize(h, p), loop_coefficients(h, p)) < max(REL_TOL[dtype], 1e-5)


def test_caa_special_case():
    p = random_params(64, 0, 1, gamma=0.5, alpha=3.0)
    h = torch.randn(4, 7, 64)
    torch.testing.assert_close(reference.steer(h, p), h + 3.0 * 0.5 * p.experts[0], rtol=1e-6, atol=1e-6)


def test_cast_special_case():
    """mu = 0 and one direction u: the gate is cos(h, u)^2 >= tau."""
    d, tau = 32, 0.3
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    p = SteerParams(experts=torch.randn(1, d), basis=u[:, None], tau=tau)
    h = torch.randn(400, d) + 6 * torch.randn(400, 1) * u  # spread of cosines on both sides of sqrt(tau)
    cos2 = torch.nn.functional.cosine_similarity(h.double(), u.double()[None], dim=-1) ** 2
    h = h[(cos2 - tau).abs() > 1e-4]
    expected = (torch.nn.functional.cosine_similarity(h, u[None], dim=-1) ** 2 >= tau).float()
    assert 0 < expected.sum() < len(h)
    assert torch.equal(reference.gate(h, p), expected)


def test_identity_activation_is_linear_in_h():
    """Gate off, K = 1, identity MLP without biases: the edit is gamma*alpha*(V + (W2 W1 h)^T U) -> linear part."""
    d = 48
    p = random_params(d, 0, 1, "identity").replace(res_in_bias=None, res_out_bias=None)
    linear = lambda x: reference.steer(x, p) - x - p.alpha * p.gamma * p.experts[0]  # noqa: E731
    x, y = torch.randn(5, d), torch.randn(5, d)
    torch.testing.assert_close(linear(2 * x - 3 * y), 2 * linear(x) - 3 * linear(y), rtol=1e-4, atol=1e-4)
    M = p.res_basis.T @ p.res_out_weight @ p.res_in_weight  # the low-rank linear map
    torch.testing.assert_close(linear(x), p.alpha * p.gamma * x @ M.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_synthesize_then_apply_equals_steer_on_anchors(dtype):
    d, B, T = 40, 3, 5
    p = random_params(d, 4, 3, "relu", seed=3)
    h = random_rows(p, B * T, seed=4, dtype=dtype).reshape(B, T, d)
    anchors = h[:, -1]
    coef = reference.synthesize(anchors, p)
    assert coef.dtype == torch.float32 and coef.shape == (B, p.n_coef)
    row_to_seq = torch.arange(B)[:, None].expand(B, T).clone()
    row_to_seq[1, :2] = -1  # padding rows stay untouched
    out = reference.apply_coef(h, coef, p, row_to_seq)
    assert rel_error(out[:, -1], reference.steer(anchors, p)) < REL_TOL[dtype]
    vectors = coef @ reference.output_basis(p)  # the anchor's vector, added to every row of its sequence
    expected = (h.float() + vectors[:, None]).to(dtype)
    mask = row_to_seq >= 0
    assert rel_error(out[mask], expected[mask]) < REL_TOL[dtype]
    assert torch.equal(out[~mask], h[~mask])
    assert torch.equal(reference.apply_coef(h, coef, p, row_to_seq.reshape(-1)), out)


def test_in_place_steer():
    p = random_params(16, 2, 2)
    h = random_rows(p, 8)
    expected = reference.steer(h, p)
    assert reference.steer_(h, p) is h and torch.equal(h, expected)


def test_hot_path_errors_name_the_argument():
    p = random_params(16, 2, 2)
    with pytest.raises(ValueError, match=r"h: expected shape \(\.\.\., 16\)"):
        reference.steer(torch.randn(3, 17), p)
    with pytest.raises(TypeError, match="h: expected dtype"):
        reference.steer(torch.randn(3, 16, dtype=torch.float64), p)
    with pytest.raises(ValueError, match="h_anchor: expected a 2-D"):
        reference.synthesize(torch.randn(2, 3, 16), p)
    coef = reference.synthesize(torch.randn(2, 16), p)
    with pytest.raises(ValueError, match="coef: expected shape"):
        reference.apply_coef(torch.randn(2, 4, 16), coef[:, :1], p, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="row_to_seq: expected shape"):
        reference.apply_coef(torch.randn(2, 4, 16), coef, p, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="row_to_seq: expected an integer"):
        reference.apply_coef(torch.randn(2, 4, 16), coef, p, torch.zeros(2, 4))
    for unsigned in (torch.bool, torch.uint8):  # cannot hold -1
        with pytest.raises(TypeError, match=f"row_to_seq: expected an integer tensor of a signed dtype.*{unsigned}"):
            reference.apply_coef(torch.randn(2, 4, 16), coef, p, torch.zeros(2, 4, dtype=unsigned))
    with pytest.raises(TypeError, match="row_mask: expected a bool tensor"):
        reference.steer(torch.randn(2, 4, 16), p, row_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="row_mask: expected shape"):
        reference.steer(torch.randn(2, 4, 16), p, row_mask=torch.ones(2, 3, dtype=torch.bool))


def test_signed_row_maps_of_every_width_agree():
    p = random_params(16, 2, 3, "relu")
    h = random_rows(p, 6).reshape(2, 3, 16)
    coef = reference.synthesize(h[:, -1], p)
    seq = torch.tensor([[0, 0, -1], [1, -1, 1]])
    expected = reference.apply_coef(h, coef, p, seq)
    for dtype in (torch.int8, torch.int16, torch.int32):
        assert torch.equal(reference.apply_coef(h, coef, p, seq.to(dtype)), expected)


def test_apply_with_no_sequences_leaves_every_row():
    """B = 0 (a batch with nothing to steer yet): every row maps to -1 and comes back unchanged."""
    p = random_params(16, 2, 3, "relu")
    h = random_rows(p, 5)
    out = reference.apply_coef(h, torch.zeros(0, p.n_coef), p, torch.full((5,), -1))
    assert torch.equal(out, h)


def test_row_mask_leaves_masked_rows_unchanged():
    p = random_params(16, 2, 3, "relu")
    h = random_rows(p, 6).reshape(2, 3, 16)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    out = reference.steer(h, p, row_mask=mask)
    assert torch.equal(out[~mask], h[~mask])
    assert torch.equal(out[mask], reference.steer(h, p)[mask])
    assert torch.equal(reference.steer(h, p, row_mask=mask.reshape(-1)), out)  # flat mask
