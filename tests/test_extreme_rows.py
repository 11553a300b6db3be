"""No silent wrong answer at any magnitude (issue 23, items 2 and 3), on both backends, every dtype.

* A huge row that lies in the gate subspace opens the gate: the energy share is formed so that ``||h - mu||^2``
  cannot overflow fp32 (the reference divides the row by its largest centred entry, the kernels keep a second sum of
  squares scaled by 2^-80); it overflowed from entries of ~1e19, inf / inf = NaN, and the gate closed.
* A row whose gate is off comes back bit-identical (a -0.0 stays -0.0) and its coefficients are exactly 0, whatever
  the router and the residual MLP produce: the coefficients are selected with the gate, not multiplied by it
  (inf * 0 = NaN).

Checked for the token-mode op (one program per row tile and split-d), `synthesize`, the bank and the fused RMSNorm.
"""
import pytest
import torch

import finesteer_kernels as fk
from finesteer_kernels import SteerBank, reference
from finesteer_kernels.norm import NormOperands, pack_steer_norm
from finesteer_kernels.perf_model import Config
from finesteer_kernels.steer_kernel import launch_steer
from op_cases import DTYPES, REL_TOL, gate_scores64, random_params, rel_error
from test_fused_norm_kernels import Y_TOL
from test_kernels import kernel_operands

D, R = 200, 12
SPLIT = Config(16, 32, 4, 2, SPLIT=4)  # a GPU layout: several slices per tile, partial sums combined in order
# a magnitude per dtype: fp32 and bf16 rows far past the old overflow (~1e19); fp16 rows large for fp16 (the edit
# must still fit)
HUGE = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 3e3}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", request.param)
    return request.param


def huge_rows(p, n: int, dtype) -> tuple:
    """(rows, truth): rows of magnitude HUGE[dtype]; even rows inside span(S) (gate on), odd rows orthogonal to it
    (gate off), all centred on mu."""
    g = torch.Generator().manual_seed(5)
    S = p.basis.double()
    inside = torch.randn(n, R, generator=g, dtype=torch.float64) @ S.T
    outside = torch.randn(n, D, generator=g, dtype=torch.float64)
    outside = outside - outside @ S @ S.T
    on = torch.arange(n) % 2 == 0
    unit = torch.where(on[:, None], inside, outside)
    unit = unit / unit.abs().amax(1, keepdim=True)
    rows = (p.mean.double() + HUGE[dtype] * unit).to(dtype)
    assert torch.isfinite(rows).all()
    return rows, on


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_rows_in_the_subspace_open_the_gate(backend, dtype):
    p = random_params(D, R, 4, "relu", seed=21)
    h, on = huge_rows(p, 9, dtype)
    coef = fk.synthesize(h, p)
    assert torch.equal((coef != 0).any(1), on), coef
    assert rel_error(coef[on], reference.synthesize(h[on], p)) < REL_TOL[dtype]
    out = fk.steer(h, p)
    assert rel_error(out, reference.steer(h, p)) < REL_TOL[dtype]
    assert torch.equal(bits(out[~on]), bits(h[~on]))
    if backend == "triton":  # the split-d layout combines the slices' scaled sums
        packed, layout = kernel_operands(h, p)
        split = torch.full_like(h, float("nan"))
        launch_steer(h, split, packed.w_in, packed.w_out, packed.mean, packed.consts, layout, p.tau, p.eps,
                     p.alpha * p.gamma, config=SPLIT)
        assert rel_error(split, out) < REL_TOL[dtype] and torch.equal(bits(split[~on]), bits(h[~on]))


def test_tiny_and_zero_rows_keep_their_gate(backend):
    """The scaling must not break the other end: rows of 1e-18 (energy just above the smallest eps) and 1e-25 (far
    below it: share = inside / eps, about 0) decide as the float64 truth does; a row equal to mu stays off."""
    p = random_params(D, R, 1, seed=22, tau=0.3, eps=1.2e-38, with_mean=False)
    h, on = huge_rows(p.replace(mean=torch.zeros(D)), 6, torch.float32)
    h = torch.cat([(h.double() * 1e-48).float(), (h.double() * 1e-55).float(), torch.zeros(1, D)])
    truth = gate_scores64(h, p) >= p.tau
    assert torch.equal(truth[:6], on) and not truth[6:].any()
    assert torch.equal((fk.synthesize(h, p) != 0).any(1), truth)


def explosive(dtype):
    """Parameters whose residual MLP (and, where the dtype holds it, router) overflow to inf / NaN on every row."""
    p = random_params(D, R, 4, "relu", seed=23)
    full = p.res_out_weight.clone().fill_(3e38)
    router = p.router_weight * 1e37 if dtype != torch.float16 else p.router_weight  # W_in holds it in h's dtype
    return p.replace(res_out_weight=full, res_in_bias=p.res_in_bias.abs() + 1.0, router_weight=router)


def gated_rows(p, n: int, dtype) -> tuple:
    g = torch.Generator().manual_seed(7)
    S = p.basis
    z = torch.randn(n, D, generator=g)
    on = torch.arange(n) % 3 == 0
    rows = p.mean + torch.where(on[:, None], 3 * torch.randn(n, R, generator=g) @ S.T, z - z @ S @ S.T)
    rows = rows.to(dtype)
    rows[:, ::7] = -0.0  # signed zeros must survive in the rows left alone
    return rows, on


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_off_rows_are_exact_whatever_the_router_and_mlp_give(backend, dtype):
    p = explosive(dtype)
    h, on = gated_rows(p, 10, dtype)
    off = ~on
    coef = fk.synthesize(h, p)
    assert not torch.isfinite(coef[on]).all()  # the parameters do overflow where the gate is on
    assert torch.equal(bits(coef[off]), bits(torch.zeros_like(coef[off])))
    assert torch.equal(bits(fk.steer(h, p)[off]), bits(h[off]))
    inplace = h.clone()
    fk.steer_(inplace, p)
    assert torch.equal(bits(inplace[off]), bits(h[off]))
    keep = torch.arange(h.shape[0]) % 2 == 0
    assert torch.equal(bits(fk.steer(h, p, row_mask=keep)[off | ~keep]), bits(h[off | ~keep]))
    if backend == "triton":
        packed, layout = kernel_operands(h, p)
        args = (packed.w_in, packed.w_out, packed.mean, packed.consts, layout, p.tau, p.eps, p.alpha * p.gamma)
        split = torch.full_like(h, float("nan"))
        launch_steer(h, split, *args, config=SPLIT)
        assert torch.equal(bits(split[off]), bits(h[off]))
        split_coef = torch.full((h.shape[0], p.n_coef), float("nan"))
        launch_steer(h, None, packed.w_in, packed.w_in, packed.mean, packed.consts, layout, p.tau, p.eps,
                     p.alpha * p.gamma, config=SPLIT, coef_out=split_coef)
        assert torch.equal(bits(split_coef[off]), bits(torch.zeros_like(split_coef[off])))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_norm_gated_off_rows(backend, dtype):
    """The fused RMSNorm: gated-off rows stay bit-identical and their norm is the plain norm of h (before, the
    kernel's 1/rms came from NaN coefficients)."""
    p = explosive(dtype)
    h, on = gated_rows(p, 10, dtype)
    off = ~on
    weight = torch.rand(D, generator=torch.Generator().manual_seed(8)).to(dtype) + 0.5
    norm = fk.RMSNormParams(weight, 1e-6)
    want = reference.rms_norm(h[off], norm)
    steered, y = fk.steer_rmsnorm(h, p, norm)
    assert torch.equal(bits(steered[off]), bits(h[off]))
    assert rel_error(y[off], want) < Y_TOL[dtype]
    inplace = h.clone()
    y2 = fk.steer_rmsnorm_(inplace, p, norm)
    assert torch.equal(bits(inplace[off]), bits(h[off]))
    assert rel_error(y2[off], want) < Y_TOL[dtype]
    if backend == "triton":  # the split-d layout reads the gate from the published tile
        packed, layout = kernel_operands(h, p)
        fused = pack_steer_norm(p, dtype, h.device)
        layout = layout._replace(W_IN_STRIDE=fused.w_in.shape[1])
        out, y3 = torch.full_like(h, float("nan")), torch.full_like(h, float("nan"))
        launch_steer(h, out, fused.w_in, packed.w_out, packed.mean, packed.consts, layout, p.tau, p.eps,
                     p.alpha * p.gamma, config=SPLIT,
                     norm=NormOperands(y3, norm.weight, fused.consts, fused.out_col, norm.eps, False, False))
        assert torch.equal(bits(out[off]), bits(h[off]))
        assert rel_error(y3[off], want) < Y_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bank_gated_off_rows_and_huge_rows(backend, dtype):
    safe = random_params(D, R, 4, "relu", seed=24)
    bank = SteerBank({"explosive": explosive(dtype), "safe": safe})
    h, on = gated_rows(bank.params[0], 10, dtype)
    index = torch.zeros(10, dtype=torch.long)
    coef = fk.synthesize_bank(h, bank, index)
    assert torch.equal(bits(coef[~on]), bits(torch.zeros_like(coef[~on])))
    assert torch.equal(bits(fk.steer_bank(h, bank, index)[~on]), bits(h[~on]))
    big, big_on = huge_rows(safe, 6, dtype)
    ones = torch.ones(6, dtype=torch.long)
    assert torch.equal((fk.synthesize_bank(big, bank, ones) != 0).any(1), big_on)
    assert rel_error(fk.steer_bank(big, bank, ones), reference.steer(big, safe)) < REL_TOL[dtype]
