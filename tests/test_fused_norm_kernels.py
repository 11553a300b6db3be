"""The steering ops fused with the next RMSNorm (issue 14) against the reference edit followed by the model's own norm
module (transformers' LlamaRMSNorm and Gemma2RMSNorm, random weights): under TRITON_INTERPRET=1 on CPU (set by
conftest when there is no GPU), on CUDA where one is present.

Token mode (`steer_rmsnorm`, the token-mode kernel with NORM) and query mode (`apply_delta_rmsnorm`), both norm
variants, awkward widths, gates on and off in one batch, padding rows, in place and out of place, fp32/fp16/bf16,
into NaN-poisoned outputs (an element a kernel fails to write shows), and the GPU layouts (split-d with several row
tiles, the decode split, the wide-row query kernel) reached by passing their configurations explicitly.
"""
import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from finesteer.patching.fused_norm import rmsnorm_of
from finesteer_kernels import RMSNormParams, kernel_common, ops, reference
from finesteer_kernels.delta_norm_kernel import launch_apply_delta_norm
from finesteer_kernels.kernel_common import Layout
from finesteer_kernels.norm import NormOperands, pack_steer_norm
from finesteer_kernels.perf_model import Config
from finesteer_kernels.steer_kernel import launch_steer
from op_cases import REL_TOL, gate_scores64, random_params, random_rows, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
NORMS = {"llama": LlamaRMSNorm, "gemma2": Gemma2RMSNorm}
# The normalised rows: the interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest), and Llama's rule
# rounds twice (the normalised row, then the product), so under the interpreter bf16 rows may be two ulps off.
Y_TOL = {**REL_TOL, bf16: 2e-2 if kernel_common.INTERPRETING else REL_TOL[bf16]}


def norm_module(kind: str, d: int, dtype, seed: int = 0) -> torch.nn.Module:
    """The model's own RMSNorm module of width d, random weights (around 1 for Llama's w, 0 for Gemma's 1 + w)."""
    module = NORMS[kind](d, eps=1e-6)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(torch.randn(d, generator=g) * 0.3 + (1.0 if kind == "llama" else 0.0))
    return module.to(DEVICE, dtype)


def recognised(module: torch.nn.Module, d: int) -> RMSNormParams:
    norm, why = rmsnorm_of(module, d)
    assert norm is not None, why
    return norm


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def rows_with_both_gates(p, n: int, dtype, seed: int) -> torch.Tensor:
    h = random_rows(p, n, seed=seed, dtype=dtype).to(DEVICE)
    if p.has_gate and n >= 2:
        on = gate_scores64(h.cpu(), p.to("cpu")) >= p.tau
        assert on.any() and (~on).any()
    return h


# (d, rows, r, K, residual, dtype, norm, config): config None = the launcher's own (pinned under the interpreter)
TOKEN_CASES = [
    (1, 3, 0, 1, None, f32, "llama", None),  # CAA-like: pass 1 runs for the norm alone
    (37, 17, 4, 3, "relu", f32, "gemma2", None),
    (64, 33, 8, 1, None, bf16, "llama", None),
    (200, 40, 12, 4, "identity", f16, "gemma2", None),
    (300, 70, 12, 4, "relu", f32, "llama", Config(16, 32, 4, 2, SPLIT=4)),  # split-d: 5 tiles, several items
    (257, 1, 64, 32, "relu", bf16, "gemma2", Config(16, 64, 4, 3, SPLIT=4)),  # decode split, r and K at bounds
    (96, 40, 8, 10, "relu", f16, "llama", Config(16, 32, 4, 2, SPLIT=2)),
    (100, 150, 12, 4, "relu", f16, "gemma2", Config(128, 32, 8, 4, SPLIT=2)),  # 128-row tiles, finished in chunks
]


def token_id(case):
    d, rows, r, K, res, dtype, norm, config = case
    return f"d{d}-n{rows}-r{r}-K{K}-{str(dtype)[6:]}-{norm}" + (f"-split{config.SPLIT}" if config else "")


@pytest.mark.parametrize("case", TOKEN_CASES, ids=token_id)
def test_steer_rmsnorm_matches_the_edit_then_the_models_norm(case):
    d, rows, r, K, residual, dtype, kind, config = case
    p = random_params(d, r, K, residual, seed=d + rows).to(DEVICE)
    h = rows_with_both_gates(p, rows, dtype, seed=rows)
    module = norm_module(kind, d, dtype, seed=d)
    norm = recognised(module, d)
    tol = REL_TOL[dtype]
    steered = reference.steer(h, p)
    with torch.no_grad():
        normed = module(steered)

    # the launch, out of place, into poisoned outputs (config: the GPU layouts)
    packed, layout = ops._kernel_args(h, p)
    fused = pack_steer_norm(p, dtype, h.device)
    layout = Layout(*layout)._replace(W_IN_STRIDE=fused.w_in.shape[1])
    out, y = poisoned(*h.shape, dtype=dtype), poisoned(*h.shape, dtype=norm.out_dtype(dtype))
    args = (fused.w_in, packed.w_out, packed.mean, packed.consts, layout, p.tau, p.eps, p.alpha * p.gamma)
    operands = lambda y: NormOperands(y, norm.weight, fused.consts, fused.out_col, norm.eps,  # noqa: E731
                                      norm.unit_offset, norm.weight_in_fp32)
    launch_steer(h, out, *args, config=config, norm=operands(y))
    assert rel_error(out, steered) < tol
    assert y.dtype == normed.dtype and rel_error(y, normed) < Y_TOL[dtype]

    # in place with a keep mask (padding rows): steered rows written, the others untouched, every row normalised
    keep = torch.arange(rows, device=DEVICE) % 3 != 1
    work = h.clone()
    work[:, 0] = -0.0  # survives only in rows that are never stored
    before = work.clone()
    y = poisoned(*h.shape, dtype=norm.out_dtype(dtype))
    launch_steer(work, work, *args, keep=keep, config=config, norm=operands(y))
    want = reference.steer(before, p, row_mask=keep)
    assert rel_error(work, want) < tol
    with torch.no_grad():
        assert rel_error(y, module(want)) < Y_TOL[dtype]
    unedited = ~keep | (reference.synthesize(before, p).abs().sum(1) == 0)
    assert torch.signbit(work[unedited, 0]).all()


@pytest.mark.parametrize("kind", sorted(NORMS))
@pytest.mark.parametrize("dtype", [f32, bf16], ids=str)
@torch.no_grad()  # as in generation: the module's weight requires grad, so with autograd on the reference would run
def test_public_fused_ops_in_and_out_of_place(kind, dtype):
    p = random_params(48, 4, 3, "relu", seed=3).to(DEVICE)
    h = rows_with_both_gates(p, 12, dtype, seed=4).reshape(3, 4, 48)
    module = norm_module(kind, 48, dtype, seed=5)
    norm = recognised(module, 48)
    assert ops.select_backend(h, norm.weight) == "triton"
    tol, y_tol = REL_TOL[dtype], Y_TOL[dtype]
    mask = torch.ones(3, 4, dtype=torch.bool, device=DEVICE)
    mask[0, :2] = False  # left padding
    want = reference.steer(h, p, row_mask=mask)
    with torch.no_grad():
        want_y = module(want)
    out, y = ops.steer_rmsnorm(h, p, norm, row_mask=mask)
    assert out.shape == h.shape and y.shape == h.shape and y.dtype == want_y.dtype
    assert rel_error(out, want) < tol and rel_error(y, want_y) < y_tol
    work = h.clone()
    y = ops.steer_rmsnorm_(work, p, norm, row_mask=mask)
    assert rel_error(work, want) < tol and rel_error(y, want_y) < y_tol
    work_t = h.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous: computed out of place, copied back
    assert not work_t.is_contiguous()
    y = ops.steer_rmsnorm_(work_t, p, norm, row_mask=mask)
    assert rel_error(work_t, want) < tol and rel_error(y, want_y) < y_tol

    # query mode: the delta cached at prefill, per row (-1: padding, normalised but not edited) or per sequence
    coef = ops.synthesize(h[:, -1].contiguous(), p)
    delta = ops.coef_delta(coef, p)
    seq = torch.arange(3, device=DEVICE)[:, None].expand(3, 4).clone()
    seq[0, :2] = -1
    want = reference.apply_delta(h, delta, seq)
    with torch.no_grad():
        want_y = module(want)
    out, y = ops.apply_delta_rmsnorm(h, delta, norm, seq)
    assert rel_error(out, want) < tol and rel_error(y, want_y) < y_tol
    assert torch.equal(out[seq < 0], h[seq < 0])
    step = h[:, -1:].clone()
    y = ops.apply_delta_rmsnorm_(step, delta, norm)  # a decode step: (B, 1, d), row b gets delta[b]
    want = reference.apply_delta(h[:, -1:], delta)
    with torch.no_grad():
        assert rel_error(step, want) < tol and rel_error(y, module(want)) < y_tol


@pytest.mark.parametrize("one_pass_max_d", [8192, 64], ids=["row in registers", "wide rows: two passes"])
@pytest.mark.parametrize("dtype", [f32, f16, bf16], ids=str)
def test_apply_delta_rmsnorm_kernel_into_poisoned_outputs(dtype, one_pass_max_d):
    d, rows = 130, 7
    g = torch.Generator().manual_seed(6)
    h = (torch.randn(rows, d, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    delta = torch.randn(3, d, generator=g).to(DEVICE)
    seq = torch.tensor([0, 2, -1, 1, 1, -1, 0], device=DEVICE)
    tol, y_tol = REL_TOL[dtype], Y_TOL[dtype]
    for kind in sorted(NORMS):
        module = norm_module(kind, d, dtype, seed=7)
        norm = recognised(module, d)
        want = reference.apply_delta(h, delta, seq)
        with torch.no_grad():
            want_y = module(want)
        out, y = poisoned(rows, d, dtype=dtype), poisoned(rows, d, dtype=want_y.dtype)
        launch_apply_delta_norm(h, out, y, delta, seq, 1, norm.weight, norm.eps, norm.unit_offset,
                                norm.weight_in_fp32, one_pass_max_d=one_pass_max_d)
        assert rel_error(out, want) < tol and rel_error(y, want_y) < y_tol
        work = h.clone()
        work[:, 0] = -0.0
        before = work.clone()
        y = poisoned(rows, d, dtype=want_y.dtype)
        launch_apply_delta_norm(work, work, y, delta, seq, 1, norm.weight, norm.eps, norm.unit_offset,
                                norm.weight_in_fp32, one_pass_max_d=one_pass_max_d)
        assert torch.equal(work[seq < 0], before[seq < 0])  # not stored: -0.0 kept
        with torch.no_grad():
            assert rel_error(y, module(reference.apply_delta(before, delta, seq))) < y_tol


# fp16 everywhere; bf16 on a GPU only: the interpreter converts fp32 to bf16 by truncation, the model's norm rounds
ROUNDED_DTYPES = [f16] + ([bf16] if not kernel_common.INTERPRETING else [])


@torch.no_grad()
@pytest.mark.parametrize("one_pass_max_d", [8192, 64], ids=["row in registers", "wide rows: two passes"])
@pytest.mark.parametrize("kind", sorted(NORMS))
@pytest.mark.parametrize("dtype", ROUNDED_DTYPES, ids=str)
def test_apply_delta_rmsnorm_normalises_the_stored_rounded_rows(dtype, kind, one_pass_max_d):
    """y must be the model's own norm of h' as stored, rounded to h's dtype, not of the unrounded fp32 sum (the
    model's next layer reads the stored h'). Deltas with fractions the dtype cannot hold make the two differ in
    many elements; only the sum-of-squares order may differ here, which flips under 1 % of the roundings. The last
    row overflows the dtype when edited: stored inf, so the model's norm gives NaN there, and so must y.
    (Token mode's `steer_rmsnorm` takes 1/rms from the unrounded edit by design, ||h||^2 + 2 h.v + ||v||^2: about
    5 % of its fp16 y elements are one ulp off this; not checked here.)"""
    d, rows = 96, 48
    g = torch.Generator().manual_seed(31)
    h = (torch.randn(rows, d, generator=g) * 4).to(DEVICE, dtype)
    delta = (torch.randn(rows, d, generator=g) * 3 + 0.37).to(DEVICE)
    top = torch.finfo(dtype).max
    h[-1, 0], delta[-1, 0] = top / 2, top  # h' = 1.5 * max: inf once stored
    module = norm_module(kind, d, dtype, seed=32)
    norm = recognised(module, d)
    stored, y = poisoned(rows, d, dtype=dtype), poisoned(rows, d, dtype=dtype)
    launch_apply_delta_norm(h, stored, y, delta, None, 1, norm.weight, norm.eps, norm.unit_offset,
                            norm.weight_in_fp32, one_pass_max_d=one_pass_max_d)
    want = module(stored)
    assert stored[-1, 0].isinf() and want[-1, 0].isnan()
    assert torch.equal(y.isnan(), want.isnan())
    finite = ~want.isnan()
    got, want = y[finite].float(), want[finite].float()
    ulps = (got - want).abs() / (torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny))
    assert ulps.max() <= 2, ulps.max()
    assert (got != want).float().mean() < 0.01, (got != want).float().mean()


@torch.no_grad()
def test_sequence_index_past_the_end_gives_nan_rows():
    """The kernel's rule (as `apply_delta`'s): an index it cannot check without a host sync gives NaN rows."""
    d = 16
    module = norm_module("llama", d, f32)
    norm = recognised(module, d)
    h = torch.randn(3, d, device=DEVICE)
    assert ops.select_backend(h, norm.weight) == "triton"
    out, y = ops.apply_delta_rmsnorm(h, torch.zeros(1, d, device=DEVICE), norm, torch.tensor([0, 1, -1], device=DEVICE))
    assert out[1].isnan().all() and y[1].isnan().all()
    assert not out[[0, 2]].isnan().any() and not y[[0, 2]].isnan().any()


def test_clear_errors_for_a_bad_norm():
    p = random_params(16, 2, 1, seed=1).to(DEVICE)
    h = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(TypeError, match="norm: expected finesteer_kernels.RMSNormParams"):
        ops.steer_rmsnorm(h, p, norm_module("llama", 16, f32))
    with pytest.raises(ValueError, match="norm: weight of size 8 does not match"):
        ops.steer_rmsnorm_(h, p, RMSNormParams(torch.ones(8, device=DEVICE), 1e-6))
    with pytest.raises(ValueError, match="weight: expected a 1-D"):
        RMSNormParams(torch.ones(2, 8), 1e-6)
    with pytest.raises(ValueError, match="eps: expected a finite number"):
        RMSNormParams(torch.ones(8), float("nan"))


def test_norm_variants_are_told_apart_from_the_modules():
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    llama, gemma = recognised(LlamaRMSNorm(24), 24), recognised(Gemma2RMSNorm(24), 24)
    olmo2 = recognised(Olmo2RMSNorm(24), 24)
    assert (llama.unit_offset, llama.weight_in_fp32) == (False, False)
    assert (gemma.unit_offset, gemma.weight_in_fp32) == (True, True)
    assert (olmo2.unit_offset, olmo2.weight_in_fp32) == (False, True)
    for module in (torch.nn.LayerNorm(24), torch.nn.LayerNorm(24, bias=False), torch.nn.Linear(24, 24)):
        norm, why = rmsnorm_of(module, 24)
        assert norm is None and why, module


@pytest.mark.parametrize("backend", ["triton", "torch"])
@torch.no_grad()
def test_fused_call_path_has_no_host_sync(backend, monkeypatch):
    from test_no_sync import host_sync_forbidden

    monkeypatch.setenv("FINESTEER_BACKEND", backend)
    p = random_params(48, 4, 3, "relu", seed=21).to(DEVICE)
    h = random_rows(p, 6, seed=22, dtype=f16).to(DEVICE).reshape(2, 3, 48)
    norm = recognised(norm_module("gemma2", 48, f16), 48)
    delta = ops.coef_delta(ops.synthesize(h[:, -1], p), p)
    row_to_seq = torch.tensor([[0, 0, 0], [-1, 1, 1]], device=DEVICE)
    fresh = p.replace(alpha=2.0)  # not packed yet: packing the fused form happens on the call path
    with host_sync_forbidden():
        ops.steer_rmsnorm(h, p, norm)
        ops.steer_rmsnorm_(h.clone(), fresh, norm, row_mask=row_to_seq >= 0)
        ops.apply_delta_rmsnorm(h, delta, norm, row_to_seq)
        y = ops.apply_delta_rmsnorm_(h.clone(), delta, norm)
    assert y.shape == h.shape


def test_fused_ops_trace_with_torch_compile(monkeypatch):
    """The fused ops are torch.library custom ops with fake implementations: one graph, the eager results."""
    monkeypatch.setenv("FINESTEER_BACKEND", "triton")
    torch._dynamo.reset()
    p = random_params(40, 4, 3, "relu", seed=31).to(DEVICE)
    h = random_rows(p, 6, seed=32).to(DEVICE).reshape(2, 3, 40)
    norm = recognised(norm_module("llama", 40, f32), 40)
    delta = ops.coef_delta(ops.synthesize(h[:, -1], p), p)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def layer_then_norm(x):
        x = x * 2.0
        return ops.steer_rmsnorm_(x, p, norm) + ops.apply_delta_rmsnorm_(x.clone(), delta, norm)

    try:
        with torch.no_grad():
            compiled = torch.compile(layer_then_norm, fullgraph=True, backend=backend)(h)
            torch.testing.assert_close(compiled, layer_then_norm(h), rtol=0, atol=0)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1 and "finesteer.steer_rmsnorm_" in graphs[0] and "finesteer.apply_delta_rmsnorm_" in graphs[0]


@torch.no_grad()
@pytest.mark.parametrize("kind", sorted(NORMS))
def test_fused_ops_read_the_norm_weight_as_it_is_now(kind):
    """`RMSNormParams` keeps the module's own weight and the kernels read it at every call: an edit of the weights
    in place, or new data for the parameter (as ``model.to(device)`` gives it), is what the next call normalises
    with. (A multiplier derived once at construction went stale and stayed on the old device.)"""
    d = 40
    p = random_params(d, 4, 3, "relu", seed=11).to(DEVICE)
    module = norm_module(kind, d, f32, seed=12)
    norm = recognised(module, d)
    h = rows_with_both_gates(p, 5, f32, seed=13)
    delta = ops.coef_delta(ops.synthesize(h[:2], p), p)
    seq = torch.tensor([0, 1, -1, 1, 0], device=DEVICE)
    for edit in (lambda w: w.mul_(-1.5), lambda w: setattr(w, "data", torch.randn(d, device=DEVICE))):
        edit(module.weight)
        steered, y = ops.steer_rmsnorm(h, p, norm)
        assert rel_error(y, module(reference.steer(h, p))) < REL_TOL[f32]
        edited, y = ops.apply_delta_rmsnorm(h, delta, norm, seq)
        assert rel_error(y, module(reference.apply_delta(h, delta, seq))) < REL_TOL[f32]
