"""SteerParams validation and the packed form."""
import math

import pytest
import torch

from finesteer_kernels import SteerParams, reference
from op_cases import random_params, random_rows


def test_stores_fp32_masters_and_sizes():
    p = random_params(20, 3, 4, "relu", m=5, k=2)
    assert all(t.dtype == torch.float32 for t in p.tensors().values())
    assert (p.d, p.r, p.num_experts, p.m, p.k, p.n_coef) == (20, 3, 4, 5, 2, 6)
    half = p.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and half.d == 20 and p.dtype == torch.float32


@pytest.mark.parametrize("change,error,match", [
    (dict(tau=1.5), ValueError, r"tau: .* \[0, 1\]"),
    (dict(tau=-0.1), ValueError, r"tau: "),
    (dict(gamma=float("nan")), ValueError, "gamma: must be finite"),
    (dict(activation="gelu"), ValueError, "activation: expected one of"),
    (dict(experts=torch.randn(0, 8)), ValueError, "experts: expected shape"),
    (dict(experts=torch.randn(2, 8, dtype=torch.float64).long()), TypeError, "experts: expected a floating"),
    (dict(experts=torch.full((2, 8), float("nan"))), ValueError, "experts: contains NaN"),
    (dict(basis=torch.randn(8, 2)), ValueError, "basis: columns must be orthonormal"),
    (dict(basis=torch.eye(9)[:, :2]), ValueError, r"basis: hidden size of basis \(9, 2\) disagrees with d=8"),
    (dict(mean=torch.randn(7)), ValueError, r"mean: hidden size of mean \(7,\) disagrees with d=8"),
    (dict(router_weight=None), ValueError, "router_weight: required when K > 1"),
    (dict(router_weight=torch.randn(8, 3)), ValueError, r"router_weight: expected shape \(8, 2\)"),
    (dict(router_bias=torch.randn(3)), ValueError, r"router_bias: expected shape \(2,\)"),
    (dict(res_basis=None), ValueError, "residual: res_basis missing"),
    (dict(res_out_weight=torch.randn(3, 4)), ValueError, r"res_out_weight: expected shape \(3, 5\)"),
    (dict(res_out_weight=torch.randn(2, 5)), ValueError, r"res_basis: expected shape \(2, 8\) .*k=2"),
    (dict(res_in_bias=torch.randn(4)), ValueError, r"res_in_bias: expected shape \(5,\)"),
    (dict(res_basis=torch.randn(3, 9)), ValueError, r"res_basis: hidden size of res_basis \(3, 9\)"),
    (dict(res_basis=torch.randn(2, 8)), ValueError, r"res_basis: expected shape \(3, 8\) .*k=3"),
    (dict(experts=torch.randn(2, 9), basis=torch.eye(8)[:, :2], mean=torch.zeros(8), router_weight=None,
          router_bias=None, res_in_weight=None, res_in_bias=None, res_out_weight=None, res_out_bias=None,
          res_basis=None), ValueError, r"experts: hidden size of experts \(2, 9\) disagrees with d=8 of basis"),
    (dict(experts=[[1.0] * 8, [0.0] * 8]), TypeError, "experts: expected a torch.Tensor"),
    (dict(experts=torch.ones(2, 8, dtype=torch.float8_e4m3fn)), TypeError, "experts: expected a floating"),
    (dict(tau=torch.tensor([0.1, 0.2])), TypeError, r"tau: expected a number, got a Tensor of shape \(2,\)"),
    (dict(tau="0.5"), TypeError, "tau: expected a number, got str"),
    (dict(eps=0.0), ValueError, "eps: must be a positive"),
    (dict(eps=1e-50), ValueError, "eps: must be a positive normal float32"),
    (dict(alpha=1e39), ValueError, r"alpha: 1e\+39 overflows float32"),
    (dict(gamma=-1e39), ValueError, r"gamma: -1e\+39 overflows float32"),
    (dict(alpha=1e20, gamma=1e20), ValueError, r"alpha \* gamma: 1e\+40 overflows float32"),
])
def test_invalid_parameters_raise_naming_the_argument(change, error, match):
    p = random_params(8, 2, 2, "relu", m=5, k=3)
    kw = {**p.tensors(), **p.scalars(), **change}
    with pytest.raises(error, match=match):
        SteerParams(**kw)


def test_router_refused_for_single_expert_and_mean_without_basis():
    with pytest.raises(ValueError, match="router_weight: K == 1 needs no router"):
        SteerParams(experts=torch.randn(1, 4), router_weight=torch.randn(4, 1))
    with pytest.raises(ValueError, match="mean: given without basis"):
        SteerParams(experts=torch.randn(1, 4), mean=torch.randn(4))


def test_orthonormalize_keeps_the_span():
    raw = torch.randn(12, 3)
    p = SteerParams(experts=torch.randn(1, 12), basis=raw, orthonormalize=True)
    S = p.basis.double()
    torch.testing.assert_close(S.T @ S, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    proj = S @ S.T @ raw.double()
    torch.testing.assert_close(proj, raw.double(), atol=1e-5, rtol=1e-5)


def test_replace_revalidates():
    p = random_params(8, 2, 1)
    assert p.replace(alpha=4.0).alpha == 4.0 and p.alpha != 4.0
    with pytest.raises(ValueError, match="tau"):
        p.replace(tau=2.0)


def unscaled_coefficients(y: torch.Tensor, pk, p: SteerParams) -> torch.Tensor:
    """Router weights then residual coefficients from the products ``y`` with a packed ``W_in`` (either packing)."""
    coef = []
    if pk.has_router:
        logits = y[:, pk.router_col:pk.router_col + pk.num_experts] + pk.consts[
            pk.router_bias_off:pk.router_bias_off + pk.num_experts]
        coef.append(torch.softmax(logits, -1))
    else:
        coef.append(torch.ones(len(y), 1))
    if pk.k:
        hid = y[:, pk.res_col:pk.res_col + pk.m] + pk.consts[pk.res_in_bias_off:pk.res_in_bias_off + pk.m]
        hid = torch.relu(hid) if p.activation == "relu" else hid
        W2 = pk.consts[pk.res_out_weight_off:pk.res_out_weight_off + pk.k * pk.m].reshape(pk.k, pk.m)
        coef.append(hid @ W2.T + pk.consts[pk.res_out_bias_off:pk.res_out_bias_off + pk.k])
    return torch.cat(coef, -1)


def packed_steer(h: torch.Tensor, p: SteerParams) -> torch.Tensor:
    """The op computed only from the packed form, the way the fused kernels do."""
    pk = p.pack()
    x = h.float()
    y = x @ pk.w_in.float()
    coef = unscaled_coefficients(y, pk, p)
    scale = torch.full((len(x),), p.alpha * p.gamma)
    if pk.has_gate:
        proj = y[:, :pk.r] - pk.consts[pk.s_mu_off:pk.s_mu_off + pk.r]
        energy = (x * x).sum(-1) - 2 * y[:, pk.mean_col] + pk.consts[pk.mu_sq_off]
        scale = scale * (proj.square().sum(-1) >= p.tau * energy.clamp_min(p.eps))
    return x + (coef * scale[:, None]) @ pk.w_out.float()


@pytest.mark.parametrize("r,K,residual", [(0, 1, None), (3, 1, None), (0, 4, "relu"), (5, 3, "identity"),
                                          (2, 2, "relu")])
def test_packed_form_computes_the_op(r, K, residual):
    p = random_params(30, r, K, residual, seed=r + K)
    h = random_rows(p, 16)
    torch.testing.assert_close(packed_steer(h, p), reference.steer(h, p), rtol=1e-4, atol=1e-4)
    pk = p.pack()
    assert pk.w_in.shape == (30, (r + 1 if r else 0) + (K if K > 1 else 0) + p.m)
    assert pk.w_out.shape == (K + p.k, 30)
    assert p.pack() is pk, "packing is cached"
    assert p.pack(torch.float16).w_in.dtype == torch.float16


def test_energy_expansion_is_exact_enough_for_the_gate():
    # ||h - mu||^2 = ||h||^2 - 2 h.mu + ||mu||^2 in fp32 agrees with the direct form far from the threshold
    p = random_params(256, 8, 1, seed=9)
    h = random_rows(p, 64)
    pk = p.pack()
    y = h @ pk.w_in
    energy = (h * h).sum(-1) - 2 * y[:, pk.mean_col] + pk.consts[pk.mu_sq_off]
    direct = (h - p.mean).square().sum(-1)
    assert torch.allclose(energy, direct, rtol=1e-4)
    assert not math.isnan(float(energy.sum()))


def centred_packed_steer(h: torch.Tensor, p: SteerParams, dtype=torch.float32) -> torch.Tensor:
    """The op computed only from `pack_centred`, the way the fused kernels do (centre, one product, epilogue)."""
    pk = p.pack_centred(dtype)
    x = h.float()
    xc = x - pk.mean if pk.has_mean else x
    y = xc @ pk.w_in.float()
    coef = unscaled_coefficients(y, pk, p)
    scale = torch.full((len(x),), p.alpha * p.gamma)
    if pk.has_gate:
        inside = y[:, :pk.r].square().sum(-1)
        scale = scale * (inside / xc.square().sum(-1).clamp_min(p.eps) >= p.tau)
    return x + (coef * scale[:, None]) @ pk.w_out.float()


@pytest.mark.parametrize("r,K,residual,with_mean", [(0, 1, None, True), (3, 1, None, True), (0, 4, "relu", True),
                                                    (5, 3, "identity", True), (2, 2, "relu", False)])
def test_centred_packed_form_computes_the_op(r, K, residual, with_mean):
    p = random_params(30, r, K, residual, seed=r + K, with_mean=with_mean)
    h = random_rows(p, 16)
    torch.testing.assert_close(centred_packed_steer(h, p), reference.steer(h, p), rtol=1e-5, atol=1e-5)
    pk = p.pack_centred(torch.float16, align=8)
    n_in = r + (K if K > 1 else 0) + p.m
    assert pk.w_in.shape == (30, max(8, -(-n_in // 8) * 8)) and pk.w_in.dtype == torch.float16
    assert not pk.w_in[:, n_in:].any()  # the padding columns are zero
    assert pk.mean.dtype == pk.consts.dtype == torch.float32 and pk.consts.numel() >= 1
    assert pk.has_mean == (r > 0 and with_mean) and pk.mean.shape == ((30,) if pk.has_mean else (1,))
    assert p.pack_centred(torch.float16, align=8) is pk, "packing is cached"


def test_centred_packing_folds_the_mean_into_the_biases_in_full_precision():
    """A^T h = A^T (h - mu) + A^T mu with A^T mu from the fp32 masters: in fp16 only the small centred part sees
    the rounded weights, so rows far from the origin keep their router logits."""
    p = random_params(64, 4, 3, "relu", seed=3).replace(mean=torch.full((64,), 50.0))
    pk = p.pack_centred(torch.float16)
    expected_bias = p.router_bias.double() + p.router_weight.double().T @ p.mean.double()
    torch.testing.assert_close(pk.consts[:3].double(), expected_bias, rtol=1e-6, atol=1e-5)
    h = random_rows(p, 8)
    assert (h - p.mean).norm(dim=1).max() < 0.3 * p.mean.norm()
    torch.testing.assert_close(centred_packed_steer(h, p, torch.float16), reference.steer(h, p), rtol=0, atol=2e-2)


def test_packing_in_a_narrow_dtype_raises_on_overflow_naming_the_field():
    big = 1e5  # > fp16 max (65504), fine in bf16 and fp32
    p = random_params(16, 2, 3, "relu", seed=4)
    for field in ("experts", "router_weight", "res_in_weight", "res_basis"):
        q = p.replace(**{field: getattr(p, field) * 0 + big})
        for pack in (q.pack, q.pack_centred):
            with pytest.raises(ValueError, match=f"{field}: largest magnitude 1e\\+05 overflows torch.float16"):
                pack(torch.float16)
            assert torch.isfinite(pack(torch.bfloat16).w_out).all()
    far = p.replace(mean=p.mean * 0 + big)
    with pytest.raises(ValueError, match="mean: largest magnitude"):
        far.pack(torch.float16)  # pack puts mu into the fp16 W_in
    assert far.pack_centred(torch.float16).mean.dtype == torch.float32  # mu stays fp32 for the kernels
    with pytest.raises(ValueError, match="experts: .*overflows torch.float16.*storage_dtype"):
        SteerParams(experts=torch.full((1, 4), big), storage_dtype=torch.float16)
