"""Steerer banks (`finesteer_kernels.SteerBank`): a mixed batch, each row with its own steerer or none, in one launch.

Parity under the Triton interpreter (fp32 and fp16) against the single-steerer op for the rows of each steerer, on
awkward mixes (r = 0 beside r = 64, K = 1 beside K = 8, residual beside none, identity beside relu, no mean); rows
with index -1 bit-identical; indices outside the bank NaN; the bank reference in bf16/fp16 against the
single-steerer reference; query mode (synthesize_bank, bank_coef_delta, apply_delta); the packed memory equals the
documented formula; no host sync; torch.compile traces the ops; and the kernel compiles for sm_90a without spills in
every configuration it may launch with, and with programmatic dependent launch waits for the previous kernel before
its first memory access.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import finesteer_kernels as fk
from finesteer_kernels import SteerBank, bank_reference, reference
from finesteer_kernels.bank import plan_rows
from finesteer_kernels.perf_model import Config
from op_cases import REL_TOL, random_params, random_rows, rel_error
from test_no_sync import host_sync_forbidden

D = 72  # not a multiple of the 32-wide interpreter d block... nor of 64


def awkward_bank(d: int = D, wide_r: int = 64) -> SteerBank:
    """r = 0 / K = 1 (CAA) beside r = 64, K = 8 with a relu MLP; an identity MLP with K = 1; a gate without mean."""
    return SteerBank({
        "caa": random_params(d, 0, 1, seed=1),
        "wide": random_params(d, wide_r, 8, residual="relu", m=12, k=5, seed=2),
        "linear": random_params(d, 3, 1, residual="identity", m=4, k=2, seed=3),
        "no-mean": random_params(d, 5, 3, with_mean=False, seed=4),
    })


def mixed_rows(bank: SteerBank, n: int, seed: int = 0, dtype=torch.float32):
    """(rows, index): a random assignment over -1..S-1, each row drawn for its own steerer (away from its gate's
    threshold, half of the gated rows on)."""
    index = torch.randint(-1, len(bank), (n,), generator=torch.Generator().manual_seed(seed))
    rows = [random_rows(bank.params[max(int(i), 0)], 1, seed=100 + seed * 1000 + j, dtype=dtype)
            for j, i in enumerate(index)]
    return torch.cat(rows), index


def assert_rows_match_single_op(out, h, bank, index, op, tol):
    for s, p in enumerate(bank.params):
        rows = index == s
        if rows.any():
            assert rel_error(out[rows], op(h[rows], p)) <= tol, f"steerer {bank.names[s]}"
    assert torch.equal(out[index == -1], h[index == -1]), "rows with index -1 must be bit-identical"


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", "triton")


@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_mode_rows_equal_their_own_steerer(triton_backend, n, dtype):
    bank = awkward_bank()
    h, index = mixed_rows(bank, n, seed=n, dtype=dtype)
    if n == 1:
        index[0] = 1  # the widest steerer alone
    out = fk.steer_bank(h, bank, index)
    assert_rows_match_single_op(out, h, bank, index, fk.steer, REL_TOL[dtype])
    assert_rows_match_single_op(out, h, bank, index, reference.steer, REL_TOL[dtype])
    inplace = h.clone()
    assert fk.steer_bank_(inplace, bank, index) is inplace
    assert torch.equal(inplace, out)


def test_gpu_tile_shapes_many_tiles_per_steerer(triton_backend):
    """16-row tiles: steerers spanning several tiles and partial ones, the copy tiles of -1 rows, a (B, T) index."""
    from finesteer_kernels.bank_kernel import BankLaunch, launch_bank

    bank = awkward_bank()
    h, index = mixed_rows(bank, 70, seed=5)
    plan = plan_rows(index, len(bank))
    out = torch.full_like(h, float("nan"))  # poisoned: every row must be written
    launch_bank(h, out, bank.pack(h.dtype, h.device), plan.order, plan.counts, launch=BankLaunch(Config(16, 32, 4, 1)))
    assert rel_error(out, bank_reference.steer_bank(h, bank, index)) <= 1e-5
    assert torch.equal(out[index == -1], h[index == -1])
    shaped = fk.steer_bank(h.view(7, 10, D), bank, index.view(7, 10), plan=plan)
    assert torch.equal(shaped.view(70, D), fk.steer_bank(h, bank, index))


def _check_steer_launch(h, index, bank, packed, plan, launch):
    """``launch`` of the bank kernel against the bank reference: out of place into a poisoned buffer (every valid row
    written, rows outside the bank NaN, -1 rows copied) and in place (the same rows, the others left NaN). Returns
    the mask of rows with a valid index."""
    from finesteer_kernels.bank_kernel import launch_bank

    expected = bank_reference.steer_bank(h, bank, index)
    valid = (index >= -1) & (index < len(bank))
    out = torch.full_like(h, float("nan"))  # poisoned: every row must be written
    launch_bank(h, out, packed, plan.order, plan.counts, launch=launch)
    assert out[~valid].isnan().all()
    assert rel_error(out[valid], expected[valid]) <= REL_TOL[h.dtype]
    assert torch.equal(out[index == -1], h[index == -1])
    inplace = h.clone()
    launch_bank(inplace, inplace, packed, plan.order, plan.counts, launch=launch)
    assert torch.equal(inplace[valid], out[valid]) and inplace[~valid].isnan().all()
    return valid


@pytest.mark.parametrize("programs", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bounded_persistent_grid(triton_backend, programs, dtype):
    """Issue 24: fewer programs than tiles, each looping over tiles p, p + P, ... (the grid that keeps the tiles in
    flight L2-sized). 16-row tiles over 83 rows of 6 groups (every steerer, -1 rows, indices outside the bank), in
    place and out of place into a poisoned buffer, and the coefficient-storing variant."""
    from finesteer_kernels.bank_kernel import BankLaunch, launch_bank

    bank = awkward_bank()
    h, index = mixed_rows(bank, 83, seed=11, dtype=dtype)
    index[[4, 40]] = torch.tensor([len(bank), -7])
    plan = plan_rows(index, len(bank))
    packed = bank.pack(h.dtype, h.device)
    launch = BankLaunch(Config(16, 32, 4, 1), programs)
    valid = _check_steer_launch(h, index, bank, packed, plan, launch)
    coef = torch.full((83, packed.layout.NC), float("nan"))
    launch_bank(h, None, packed, plan.order, plan.counts, coef_out=coef, launch=launch)
    own = bank_reference.synthesize_bank(h, bank, index)
    assert coef[~valid].isnan().all()
    assert rel_error(coef[valid], own[valid]) <= REL_TOL[dtype]


@pytest.mark.parametrize("n,split,sms", [(83, 2, 132), (83, 3, 132), (83, 2, 1), (83, 4, 1), (1, 3, 132)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_split_d(triton_backend, monkeypatch, n, split, sms, dtype):
    """Split-d over the bank's tiles (d = 72 cut into 32-column slices: 64 + 8 or 32 + 32 + 8 columns), 16-row tiles
    of every group, or one row (decode). On a one-SM card the partials' ring has fewer slots than the tiles, so
    slots are reused (the wait on the slot's previous tile); the counters must come back to zero for the next
    launch."""
    import dataclasses

    from finesteer_kernels import bank_kernel as module
    from finesteer_kernels.bank_kernel import BankLaunch, bank_shape
    from finesteer_kernels.perf_model import DEFAULT_CARD, split_plan
    from finesteer_kernels.split_state import launch_buffers, split_d_error_flag

    card = dataclasses.replace(DEFAULT_CARD, sms=sms)
    monkeypatch.setattr(module, "card_for", lambda h: card)
    bank = awkward_bank()
    h, index = mixed_rows(bank, n, seed=12, dtype=dtype)
    if n > 1:
        index[[4, 40]] = torch.tensor([len(bank), -7])
    else:
        index[0] = 1  # decode: one row of the widest steerer
    plan = plan_rows(index, len(bank))
    packed = bank.pack(h.dtype, h.device)
    launch = BankLaunch(Config(16, 32, 4, 1, split))
    tiles = -(-n // 16) + len(bank) + 2
    ring = split_plan(bank_shape(tiles * 16, D, packed.layout, h.element_size()), launch.config, card).ring
    assert (ring < tiles) == (sms == 1 and n > 1)
    _check_steer_launch(h, index, bank, packed, plan, launch)
    counters, _ = launch_buffers(h.device, tiles)
    assert not counters.any() and split_d_error_flag(h.device).item() == 0


def test_indices_outside_the_bank_give_nan_rows(triton_backend):
    bank = awkward_bank()
    h, index = mixed_rows(bank, 9, seed=6)
    index[2], index[5] = len(bank), -3
    for out in (fk.steer_bank(h, bank, index), bank_reference.steer_bank(h, bank, index)):
        assert out[[2, 5]].isnan().all() and not out[[0, 1, 3, 4, 6, 7, 8]].isnan().any()
    coef = fk.synthesize_bank(h, bank, index)
    assert coef[[2, 5]].isnan().all() and not coef[[0, 1, 3]].isnan().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bank_reference_is_the_single_steerer_reference_in_half_precision(dtype):
    bank = awkward_bank()
    h, index = mixed_rows(bank, 24, seed=7, dtype=dtype)
    out = bank_reference.steer_bank(h, bank, index)
    for s, p in enumerate(bank.params):
        rows = index == s
        assert torch.equal(out[rows], reference.steer(h[rows], p))
    assert torch.equal(out[index == -1], h[index == -1])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_query_mode_synthesize_delta_and_apply(monkeypatch, backend):
    monkeypatch.setenv("FINESTEER_BACKEND", backend)
    bank = awkward_bank()
    anchors, index = mixed_rows(bank, 11, seed=8)
    coef = fk.synthesize_bank(anchors, bank, index)
    assert coef.shape == (11, bank.n_coef) and coef.dtype == torch.float32
    delta = fk.bank_coef_delta(coef, bank, index)
    for s, p in enumerate(bank.params):
        rows = index == s
        own = reference.synthesize(anchors[rows], p)
        assert rel_error(coef[rows, :p.n_coef], own) <= 1e-5
        assert torch.equal(coef[rows, p.n_coef:], torch.zeros_like(coef[rows, p.n_coef:]))
        assert rel_error(delta[rows], reference.coef_delta(own, p)) <= 1e-5
    assert torch.equal(coef[index == -1], torch.zeros_like(coef[index == -1]))
    assert torch.equal(delta[index == -1], torch.zeros_like(delta[index == -1]))
    assert rel_error(delta, bank_reference.bank_coef_delta(coef, bank, index)) <= 1e-5
    # the prefill: every token of sequence b gets delta[b]; sequences with -1 are mapped to -1 (untouched)
    h = torch.randn(11, 3, D)
    row_to_seq = torch.where(index[:, None] >= 0, torch.arange(11)[:, None], -1).expand(11, 3)
    out = fk.apply_delta(h, delta, row_to_seq)
    assert torch.equal(out[index == -1], h[index == -1])
    torch.testing.assert_close(out[index >= 0], h[index >= 0] + delta[index >= 0][:, None], rtol=1e-6, atol=1e-6)


def test_memory_is_the_sum_of_the_steerers_own_packs():
    for bank in (awkward_bank(), SteerBank(list(awkward_bank().params) + [random_params(D, 4, 3, seed=5)])):
        for dtype in (torch.float32, torch.bfloat16):
            packed = bank.pack(dtype)
            stored = sum(t.numel() * t.element_size() for t in (packed.w_in, packed.w_out, packed.mean, packed.consts,
                                                               packed.meta, packed.scalars))
            assert bank.memory_bytes(dtype) == stored
            own = sum(sum(t.numel() * t.element_size() for t in p.pack_centred(dtype)[:4]) for p in bank.params)
            own -= sum(4 for p in bank.params if p.mean is None)  # a pack without a mean keeps a one-element stub
            cols = sum(p.pack_centred(dtype).w_in.shape[1] for p in bank.params)  # 112, then 120
            stride = packed.layout.W_IN_STRIDE
            assert stride == packed.w_in.shape[1] and stride % 16 == 0 and 0 <= stride - cols < 16
            assert bank.memory_bytes(dtype) == own + D * (stride - cols) * dtype.itemsize + 4 * len(bank) * 23


def _specialisation(monkeypatch, bank, h, index) -> dict:
    """What the JIT compiles a bank launch for: the constexpr arguments, and for each integer argument it may
    specialise, whether it is 1 and whether it is a multiple of 16 (`do_not_specialize` ones excepted)."""
    from finesteer_kernels import bank_kernel as module

    real, seen = module.bank_kernel, {}
    names, dont = real.arg_names, real.kwargs["do_not_specialize"]

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                ints = {n: v for n, v in zip(names, args) if type(v) is int and n not in dont}
                seen.update(kwargs, **{n: (v == 1, v % 16 == 0) for n, v in ints.items()})
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, "bank_kernel", Recorder())
    out = fk.steer_bank(h, bank, index)
    torch.testing.assert_close(out, bank_reference.steer_bank(h, bank, index), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(module, "bank_kernel", real)
    return seen


def test_one_more_steerer_reuses_the_compiled_kernel(monkeypatch):
    """Re-packing a bank with one more steerer (no wider than the widest, no part that none had) launches the same
    specialisation (docs/serving.md: adding a steerer at run time re-packs without recompiling). The group count,
    the coefficient width and W_in's stride are run-time arguments; the stride is padded to a multiple of 16."""
    bank = awkward_bank()
    bigger = SteerBank({**dict(zip(bank.names, bank.params)), "extra": random_params(D, 4, 3, seed=5)})
    h, index = mixed_rows(bank, 20, seed=8)
    before, after = (_specialisation(monkeypatch, b, h, index) for b in (bank, bigger))
    assert bank.pack(torch.float32).layout.W_IN_STRIDE != bigger.pack(torch.float32).layout.W_IN_STRIDE
    assert before == after


def test_no_host_sync_and_compiled(monkeypatch):
    bank = awkward_bank()
    h, index = mixed_rows(bank, 10, seed=9)
    for backend in ("triton", "torch"):
        monkeypatch.setenv("FINESTEER_BACKEND", backend)
        bank.pack(h.dtype, h.device)
        with host_sync_forbidden():
            out = fk.steer_bank(h, bank, index)
            fk.steer_bank_(h.clone(), bank, index)
            coef = fk.synthesize_bank(h, bank, index)
            fk.bank_coef_delta(coef, bank, index)
        assert torch.isfinite(out).all()
    monkeypatch.setenv("FINESTEER_BACKEND", "triton")
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(lambda x, i: fk.steer_bank(x * 2.0, bank, i) + 1.0, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(h, index), fk.steer_bank(h * 2.0, bank, index) + 1.0, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1 and "finesteer.steer_bank" in graphs[0]
    torch._dynamo.reset()


def test_clear_errors():
    bank = awkward_bank()
    with pytest.raises(ValueError, match="hidden size 40"):
        SteerBank([random_params(D, 2, 1), random_params(40, 2, 1)])
    with pytest.raises(ValueError, match="at least one"):
        SteerBank([])
    with pytest.raises(KeyError, match="'nope' is not in the bank"):
        bank.index_of("nope")
    h = torch.randn(4, D)
    with pytest.raises(TypeError, match="index: expected an integer tensor of a signed dtype"):
        fk.steer_bank(h, bank, torch.zeros(4))
    with pytest.raises(ValueError, match=r"index: expected shape \(4,\)"):
        fk.steer_bank(h, bank, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden size 72"):
        fk.steer_bank(torch.randn(4, 40), bank, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="plan: expected a BankPlan"):
        fk.steer_bank(h, bank, torch.zeros(4, dtype=torch.long), plan=plan_rows(torch.zeros(5, dtype=torch.long), 4))


# ---- sm_90a ------------------------------------------------------------------------------------------------------
def model_ctas(shape, config, persistent: bool) -> int:
    """Programs per SM as `bank_perf_model.predict_bank` counts them on the default card."""
    from finesteer_kernels.bank_perf_model import persistent_ctas_per_sm
    from finesteer_kernels.perf_model import DEFAULT_CARD, resources

    ctas = resources(shape, config, DEFAULT_CARD).ctas_per_sm
    return persistent_ctas_per_sm(config, shape.elem, DEFAULT_CARD, ctas) if persistent else ctas


def launchable(elem: int) -> list:
    """``(config, store_coef, persistent)`` of every variant `bank_launch` may launch in ``elem``-byte dtypes: the
    plain configurations one program per tile (token mode and `synthesize_bank`) and persistent, the deep pipelines
    persistent only, split-d in token mode only."""
    from finesteer_kernels.bank_kernel import BANK_CONFIGS, DEEP_CONFIGS, SPLIT_CONFIGS

    return ([(c, store, persistent) for c in BANK_CONFIGS[elem]
             for store, persistent in ((False, False), (True, False), (False, True))]
            + [(c, False, True) for c in DEEP_CONFIGS[elem]] + [(c, False, False) for c in SPLIT_CONFIGS[elem]])


def pdl_launches() -> list:
    """Programmatic dependent launch: bf16 launches of every layout the bank kernel runs in, as `bank_launch` picks
    them for d = 4096 (token mode at decode: split-d; at prefill: the bounded persistent grid; `synthesize_bank`:
    one program per row tile) plus token mode in one program per row tile; each compiled as planned and with PDL."""
    from finesteer_kernels.bank_kernel import BANK_CONFIGS, BankLaunch, bank_launch
    from finesteer_kernels.perf_model import DEFAULT_CARD

    layout = awkward_bank(4096).pack(torch.bfloat16).layout
    picks = [(bank_launch(rows, 4096, layout, 2, DEFAULT_CARD, store_coef, interpreting=False), store_coef)
             for rows, store_coef in ((1, False), (4096, False), (1, True))]
    picks.append((BankLaunch(BANK_CONFIGS[2][0]), False))
    launches = [(launch.config, store_coef, launch.programs is not None) for launch, store_coef in picks]
    layouts = [(config.SPLIT > 1, persistent) for config, _, persistent in launches]
    assert layouts == [(True, False), (False, True), (False, False), (False, False)], launches
    return launches


def compile_bank(layout, dtype: str, config, store_coef: bool, persistent: bool, pdl: bool = False) -> dict:
    """Compile the bank kernel for sm_90a as a launch with ``layout`` in ``dtype`` gets it: ptxas registers and
    spills, what the TTGIR says of the W_in loads, and where the grid dependency control sits
    (`test_kernel_compile.grid_dependency_order`)."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from finesteer_kernels.bank_kernel import bank_constexprs, bank_kernel, bank_shape
    from test_kernel_compile import PDL_VARIANT, grid_dependency_order

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    elem = 4 if dtype == "fp32" else 2
    consts = dict(bank_constexprs(layout), NATIVE_DOT=dtype != "fp32", IN_PLACE=False, STORE_COEF=store_coef,
                  BLOCK_T=config.BLOCK_T, BLOCK_D=config.BLOCK_D, NUM_STAGES=config.num_stages, PERSISTENT=persistent,
                  SPLIT=config.SPLIT, PDL=pdl)
    sig = dict(h_ptr=f"*{dtype}", out_ptr=f"*{dtype}", order_ptr="*i32", counts_ptr="*i32", meta_ptr="*i32",
               scalars_ptr="*fp32", w_in_ptr=f"*{dtype}", w_out_ptr=f"*{dtype}", mean_ptr="*fp32", consts_ptr="*fp32",
               coef_out_ptr="*fp32", ws_ptr="*fp32", flags_ptr="*i32", error_ptr="*i32", n_rows="i32", d="i32",
               n_groups="i32", NC="i32", w_in_stride="i32", lag="i32", ring="i32", spin_limit="i32")
    sig.update({c: "constexpr" for c in consts})
    # the JIT's specialisation: pointers, d and W_in's stride (a multiple of 16 by construction) aligned
    aligned = list(range(14)) + [list(sig).index("d"), list(sig).index("w_in_stride")]
    src = ASTSource(bank_kernel, sig, consts, attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if pdl:
        options["launch_pdl"] = True
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "k.ptx"), "w") as f:
            f.write(compiled.asm["ptx"])
        ptxas = subprocess.run([os.path.join(bin_dir, "ptxas-blackwell"), "-v", "--gpu-name", "sm_90a",
                                os.path.join(tmp, "k.ptx"), "-o", os.path.join(tmp, "k.cubin")],
                               capture_output=True, text=True, check=True)
    report = ptxas.stderr + ptxas.stdout
    # the integer types added to BLOCK_D x 1 pointer tensors, in order: the first is W_in's row offset
    # (offs_d x the stride), which must be 64-bit (d x all steerers' columns may pass 2^31 elements)
    w_in_offsets = re.findall(rf"tt\.addptr [^\n]*: tensor<{config.BLOCK_D}x1x!tt\.ptr<\w+>>, "
                              rf"tensor<{config.BLOCK_D}x1x(i\d+)>", compiled.asm["ttir"])
    # the W_in tile (BLOCK_D x NP) of pass 1: cp.async copies of 16 bytes, or synchronous loads
    w_in_tile = [line for line in compiled.asm["ttgir"].splitlines()
                 if f"tensor<{config.BLOCK_D}x{layout.NP}x!tt.ptr<{dtype.replace('fp', 'f')}>" in line
                 and ("tt.load" in line or "async_copy_global_to_local" in line)]
    return dict(
        dtype=dtype, config=config.short(), num_warps=config.num_warps, split=config.SPLIT, store_coef=store_coef,
        persistent=persistent, variant=PDL_VARIANT if pdl else "planned", w_in_offsets=w_in_offsets,
        model_ctas=model_ctas(bank_shape(4096, 4096, layout, elem), config, persistent),
        w_in_sync=sum("tt.load" in line for line in w_in_tile),
        w_in_async_16b=sum("async_copy_global_to_local" in line
                           and f"contiguity = {16 // elem} " in line for line in w_in_tile),
        registers=int(re.search(r"Used (\d+) registers", report).group(1)),
        spill_bytes=sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)),
        shared_bytes=compiled.metadata.shared, launch_pdl=bool(compiled.metadata.launch_pdl),
        gdc=grid_dependency_order(compiled.asm["ptx"]))


def _compile_bank_configs(which: str) -> None:
    """Compile the bank kernel (d = 4096, the awkward bank with r = 64), printing one JSON line each: ``launchable``,
    every configuration it may launch with; ``pdl``, the `pdl_launches` as planned and with PDL."""
    bank = awkward_bank(4096)
    if which == "pdl":
        layout = bank.pack(torch.bfloat16).layout
        for launch in pdl_launches():
            for pdl in (False, True):
                print(json.dumps(compile_bank(layout, "bf16", *launch, pdl=pdl)), flush=True)
        return
    for dtype, elem, torch_dtype in (("bf16", 2, torch.bfloat16), ("fp16", 2, torch.float16),
                                     ("fp32", 4, torch.float32)):
        layout = bank.pack(torch_dtype).layout
        for launch in launchable(elem):
            print(json.dumps(compile_bank(layout, dtype, *launch)), flush=True)


def bank_compile_results(which: str) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))])
    proc = subprocess.run([sys.executable, __file__, "--compile", which], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_bank_kernel_compiles_for_hopper_without_spills():
    results = bank_compile_results("launchable")
    from finesteer_kernels.perf_model import DEFAULT_CARD as card

    assert len(results) == 2 * len(launchable(2)) + len(launchable(4))
    for res in results:
        print(res)
        assert res["spill_bytes"] == 0, res
        assert res["w_in_offsets"][:1] == ["i64"], res  # in int32, d x W_in's stride overflowed past 2^31
        if not res["store_coef"]:  # issue 24: the run-time column mask once kept W_in at 2-byte synchronous loads
            assert res["w_in_sync"] == 0 and res["w_in_async_16b"] > 0, res
        if res["persistent"] or res["split"] > 1:  # the programs per SM the bank model counts are ptxas's
            per_warp = -(-res["registers"] * 32 // 256) * 256
            by_regs = card.regs_per_sm // (per_warp * res["num_warps"])
            by_smem = card.smem_per_sm // (res["shared_bytes"] + 1024)
            assert res["model_ctas"] == min(by_regs, by_smem), res


def test_bank_kernel_with_pdl_waits_for_the_previous_kernel_before_any_memory_access():
    """The bank kernel under programmatic dependent launch, checked as `test_kernel_compile` checks the others
    (`assert_pdl_variants_wait_first`): ``griddepcontrol.wait`` before the first load, store or atomic (split-d: the
    first ticket) and before any branch, then ``launch_dependents``; without PDL neither; same registers, no
    spills, in each layout (`pdl_launches`)."""
    from test_kernel_compile import assert_pdl_variants_wait_first

    results = bank_compile_results("pdl")
    assert len(results) == 2 * len(pdl_launches())
    for res in results:
        print(res)
    assert_pdl_variants_wait_first(results, lambda res: (res["config"], res["store_coef"], res["persistent"]))


if __name__ == "__main__":
    if "--compile" in sys.argv:
        _compile_bank_configs(sys.argv[sys.argv.index("--compile") + 1])
