"""Row isolation, property-based (hypothesis): no row's result depends on the other rows of its batch.

- The bank ops: random banks (1-4 steerers of random d, r, K, residual, mean or not), random mixes of steerers and
  -1 (none) per row, every dtype, both backends (Triton through the interpreter): every row equals its own steerer's
  single-steerer op, rows with -1 come back bit-identical, in token mode and in query mode.
- Patched models: random batch sizes, prompt lengths, left or right padding, modes, and a plain steerer or a bank
  with a random assignment of steerers and None: each prompt's logits at its real positions (and, left-padded, its
  greedy tokens) equal running that prompt alone with its own steerer patched.

Derandomized with no example database, as test_op_properties.py (fixed examples for a fixed suite order).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import finesteer_kernels as fk
from finesteer import SteererBank, patch_model
from finesteer_kernels import SteerBank
from op_cases import DTYPES, REL_TOL, random_params, random_rows, rel_error
from patching_fixtures import get_model, no_patch_left_behind, one_thread  # noqa: F401  (autouse fixtures)

SETTINGS = dict(derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ---- the bank ops ----------------------------------------------------------------------------------------------
@st.composite
def bank_cases(draw):
    d = draw(st.integers(1, 40))
    steerers = []
    for _ in range(draw(st.integers(1, 4))):
        steerers.append(random_params(
            d, draw(st.integers(0, min(d, 5))), draw(st.integers(1, 4)),
            draw(st.sampled_from([None, "relu", "identity"])), m=draw(st.integers(1, 4)), k=draw(st.integers(1, 3)),
            seed=draw(st.integers(0, 2 ** 16)), tau=draw(st.floats(0.2, 0.8)), with_mean=draw(st.booleans())))
    n = draw(st.integers(1, 20))
    index = draw(st.lists(st.integers(-1, len(steerers) - 1), min_size=n, max_size=n))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2 ** 16))
    try:  # each row drawn for its own steerer, away from that gate's threshold
        h = torch.cat([random_rows(steerers[max(s, 0)], 1, seed=seed + j, dtype=dtype) for j, s in enumerate(index)])
    except RuntimeError:
        assume(False)
    return SteerBank(steerers), h, torch.tensor(index)


def check_bank_rows(bank: SteerBank, h: torch.Tensor, index: torch.Tensor) -> None:
    tol = REL_TOL[h.dtype]
    out = fk.steer_bank(h, bank, index)
    in_place = h.clone()
    fk.steer_bank_(in_place, bank, index)
    assert torch.equal(in_place, out)
    coef = fk.synthesize_bank(h, bank, index)
    delta = fk.bank_coef_delta(coef, bank, index)
    for s, p in enumerate(bank.params):
        rows = index == s
        if rows.any():
            assert rel_error(out[rows], fk.steer(h[rows], p)) <= tol, f"token mode, steerer {s}"
            own = fk.synthesize(h[rows], p)
            assert rel_error(coef[rows, :p.n_coef], own) <= max(tol, 1e-5), f"coefficients, steerer {s}"
            assert rel_error(delta[rows], fk.coef_delta(own, p)) <= max(tol, 1e-5), f"delta, steerer {s}"
    none = index == -1
    assert torch.equal(out[none], h[none]), "rows with index -1 must come back bit-identical"
    assert not coef[none].any() and not delta[none].any()
    # query mode's prefill: every row adds its sequence's delta; sequences without a steerer map to -1
    row_to_seq = torch.where(none, -1, torch.arange(len(index)))
    applied = fk.apply_delta(h, delta, row_to_seq)
    assert torch.equal(applied[none], h[none])
    if (~none).any():
        want = (h.double() + delta.double()).to(h.dtype)
        assert rel_error(applied[~none], want[~none]) <= tol


@pytest.mark.parametrize("backend, examples", [("torch", 50), ("triton", 16)])
def test_bank_rows_equal_their_own_steerer_on_random_mixes(backend, examples, monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", backend)

    @settings(max_examples=examples, **SETTINGS)
    @given(bank_cases())
    def run(case):
        check_bank_rows(*case)

    run()


# ---- patched models ------------------------------------------------------------------------------------------------
NAMES = ("caa", "mose", "two-layer", "late")


def model_steerers(model) -> dict:
    """Four steerers over the tiny model's 3 layers, edits about as long as the residual stream (tokens change)."""
    d = model.config.hidden_size

    def vector(seed, **kw):
        p = random_params(d, 0, seed=seed, gamma=1.0, alpha=1.0, **kw)
        return p.replace(alpha=2.0 / p.experts.norm(dim=-1).mean().item())

    return {"caa": {1: vector(1, K=1)}, "mose": {1: vector(2, K=4, residual="relu", m=6, k=3)},
            "two-layer": {0: vector(3, K=2), 2: vector(4, K=3, residual="identity", m=4, k=2)},
            "late": {2: vector(5, K=2)}}


@st.composite
def batches(draw):
    n = draw(st.integers(1, 4))
    prompts = [draw(st.lists(st.integers(3, 127), min_size=1, max_size=6)) for _ in range(n)]
    kind = draw(st.sampled_from(["plain", "bank"]))
    names = [draw(st.sampled_from((None,) + NAMES)) for _ in range(n)] if kind == "bank" else \
        [draw(st.sampled_from(NAMES))] * n
    return prompts, names, kind, draw(st.sampled_from(["query", "token"])), draw(st.sampled_from(["left", "right"]))


def padded(prompts: list, side: str) -> tuple:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        cols = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[i, cols], mask[i, cols] = torch.tensor(prompt), 1
    return ids, mask


def check_batch_against_each_prompt(model, steerers: dict, case) -> None:
    prompts, names, kind, mode, side = case
    ids, mask = padded(prompts, side)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    tokens = 2
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if kind == "plain":
            stack.enter_context(patch_model(model, steerers[names[0]], mode=mode))
        else:
            handle = stack.enter_context(patch_model(model, SteererBank(steerers), mode=mode))
            handle.assign(names)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        if side == "left":
            if kind == "bank":
                handle.assign(names)
            generated = model.generate(ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False)
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        one = torch.tensor([prompt])
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if name is not None:
                stack.enter_context(patch_model(model, steerers[name], mode=mode))
            alone = model(input_ids=one).logits[0]
            alone_tokens = model.generate(one, max_new_tokens=tokens, do_sample=False)[0, -tokens:] \
                if side == "left" else None
        torch.testing.assert_close(logits[i][mask[i].bool()], alone, rtol=1e-5, atol=1e-5)
        if alone_tokens is not None:
            assert torch.equal(generated[i, -tokens:], alone_tokens), (i, name)


def test_a_patched_batch_equals_each_prompt_alone_on_random_shapes(monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", "torch")  # the exact reference: the model runs, not the interpreter
    model = get_model("llama")
    steerers = model_steerers(model)

    @settings(max_examples=40, **SETTINGS)
    @given(batches())
    def run(case):
        check_batch_against_each_prompt(model, steerers, case)

    run()
