"""patch_model on tiny random-weight transformers models: exactness against hand-written hooks and reference loops,
padding, generate (greedy, sampling, no cache, beams), token-mode gating, state and errors."""
from __future__ import annotations

import contextlib
import dataclasses
import threading

import pytest
import torch

import finesteer
from finesteer import Steerer, patch_model, unpatch_model
from finesteer.patching.layers import hidden_size
from finesteer_kernels import SteerParams, reference
from op_cases import random_params
from patching_fixtures import get_model, no_patch_left_behind, one_thread, torch_backend  # noqa: F401
from tiny_models import random_ids, tiny_model

ARCHS = ("llama", "qwen2", "mistral", "gemma2", "gpt2", "gpt_neox", "falcon", "bloom")
LAYER = 1  # a middle layer: hidden_states[LAYER + 1] is its raw output (the last layer's is normed)
NEW_TOKENS = 4

pytestmark = pytest.mark.usefixtures("torch_backend")  # the exact reference; some tests override it


# ---- helpers -------------------------------------------------------------------------------------------------------
def layer_outputs(model, layer: int, **inputs) -> torch.Tensor:
    """The raw output of decoder layer ``layer`` (after any patch, since patch hooks run first)."""
    seen = []
    hook = finesteer.find_decoder_layers(model)[layer].register_forward_hook(
        lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen[0].detach()


@contextlib.contextmanager
def adding(model, vectors: dict):
    """Plain hand-written hooks: layer -> (B, d) vectors added to every position of row b."""
    layers = finesteer.find_decoder_layers(model)

    def add(out, v):  # Falcon and Bloom layers return tuples
        if isinstance(out, tuple):
            return (add(out[0], v), *out[1:])
        return out + v[:, None, :].to(out.dtype)

    hooks = [layers[i].register_forward_hook(lambda mod, args, out, v=v: add(out, v)) for i, v in vectors.items()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def gate_between(open_rows: torch.Tensor, closed_rows: torch.Tensor) -> tuple:
    """A gate (basis, tau) with mean 0 that opens for ``open_rows`` and stays shut for ``closed_rows``: the basis
    spans the open rows' parts orthogonal to the closed rows, so closed rows score 0."""
    o, c = open_rows.double(), closed_rows.double()
    q = torch.linalg.qr(c.T)[0]
    basis = torch.linalg.qr((o - o @ q @ q.T).T)[0]
    open_scores = (o @ basis).square().sum(-1) / o.square().sum(-1)
    closed_scores = (c @ basis).square().sum(-1) / c.square().sum(-1)
    tau = float(open_scores.min()) / 2
    assert tau > 0.02 and float(closed_scores.max()) < tau / 4, "test data give no clear gate margin"
    return basis.float(), tau


def mose(d: int, scale: float, seed: int = 0, **changes) -> SteerParams:
    """Two experts with a router and a residual MLP, its vectors about ``scale`` long."""
    p = random_params(d, r=0, K=2, residual="relu", seed=seed, gamma=1.0, alpha=1.0)
    return p.replace(alpha=scale / p.experts.norm(dim=-1).mean().item(), **changes)


def hidden_scale(model, ids) -> float:
    """Mean norm of the residual stream at LAYER: steering vectors about as long change tokens but keep text."""
    return layer_outputs(model, LAYER, input_ids=ids).norm(dim=-1).mean().item() * 2


def left_padded(rows: list) -> tuple:
    width = max(r.shape[-1] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[-1]:] = r
        mask[i, width - r.shape[-1]:] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def greedy_loop(model, ids, mask, steps: int) -> torch.Tensor:
    """Cache-free greedy decoding: the whole sequence recomputed every step."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def greedy(model, ids, mask=None, **kw) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **kw)


def anchors_of(model, layer, ids, mask, extra_vectors=None) -> torch.Tensor:
    """Unpatched layer output at each row's last real token (left padding: the last position)."""
    with adding(model, extra_vectors or {}):
        h = layer_outputs(model, layer, input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    return h[:, -1]


def fixed_vectors(params: SteerParams, anchors: torch.Tensor) -> torch.Tensor:
    """What query mode adds per row: the reference coef at the anchor times W_out."""
    return reference.synthesize(anchors, params) @ reference.output_basis(params)


def batch_with_gate(arch: str):
    """A left-padded batch of two prompts and a MoSE steerer whose gate opens for row 0's anchor only; row 0 is
    the shorter, padded prompt, so a wrong anchor (a padding position) would show."""
    model = get_model(arch)
    ids, mask = left_padded([random_ids(1, 3, seed=2)[0], random_ids(1, 5, seed=1)[0]])
    anchors = anchors_of(model, LAYER, ids, mask)
    basis, tau = gate_between(anchors[:1], anchors[1:])
    params = mose(hidden_size(model), hidden_scale(model, ids), basis=basis, tau=tau)
    return model, ids, mask, anchors, params


# ---- acceptance ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["query", "token"])
def test_closed_gate_is_bit_identical(arch, mode):
    model = get_model(arch)
    ids = random_ids(2, 6, seed=3)
    h = layer_outputs(model, LAYER, input_ids=ids).reshape(-1, hidden_size(model))
    basis = torch.linalg.qr(torch.randn(h.shape[1], 2, generator=torch.Generator().manual_seed(0)))[0]
    scores = (h @ basis).square().sum(-1) / h.square().sum(-1)
    assert scores.max() < 0.5, "a random 2-D subspace should hold little of each row's energy"
    closed = mose(h.shape[1], hidden_scale(model, ids), basis=basis, tau=0.9)
    with torch.no_grad():
        base = model(ids).logits
        base_tokens = greedy(model, ids)
        with patch_model(model, {LAYER: closed}, mode=mode) as handle:
            assert torch.equal(model(ids).logits, base)
            assert torch.equal(greedy(model, ids), base_tokens)
        assert not handle.active
        assert torch.equal(model(ids).logits, base)
        # the same steerer with its gate always open does change the logits: the gate alone kept them equal
        with patch_model(model, {LAYER: closed.replace(tau=0.0)}, mode=mode):
            assert not torch.allclose(model(ids).logits, base, atol=1e-3)
        assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["query", "token"])
def test_always_on_single_expert_equals_hand_hook(arch, mode):
    model = get_model(arch)
    ids = random_ids(2, 5, seed=4)
    d = hidden_size(model)
    v = torch.randn(1, d, generator=torch.Generator().manual_seed(5))
    alpha = hidden_scale(model, ids) / v.norm().item()
    params = SteerParams(experts=v, alpha=alpha, gamma=1.0)
    with torch.no_grad():
        base = model(ids, output_hidden_states=True)
        with adding(model, {LAYER: alpha * v.expand(2, d)}):
            expected = model(ids).logits
        with patch_model(model, {LAYER: params}, mode=mode):
            out = model(ids, output_hidden_states=True)
    torch.testing.assert_close(out.logits, expected, rtol=1e-6, atol=1e-6)
    # output_hidden_states at the steered layer shows the edit, earlier ones do not
    edit = out.hidden_states[LAYER + 1] - base.hidden_states[LAYER + 1]
    torch.testing.assert_close(edit, (alpha * v).expand_as(edit), rtol=1e-5, atol=1e-5)
    for i in range(LAYER + 1):
        assert torch.equal(out.hidden_states[i], base.hidden_states[i])


@pytest.mark.parametrize("arch", ARCHS)
def test_query_generate_matches_cache_free_reference(arch):
    """KV-cached and use_cache=False generate == a loop that recomputes everything with the coef fixed at the
    prompt's anchor; the gate opens for row 0 only, so row 1 is exactly unsteered."""
    model, ids, mask, anchors, params = batch_with_gate(arch)
    vectors = fixed_vectors(params, anchors)
    assert vectors[0].norm() > 0 and torch.equal(vectors[1], torch.zeros_like(vectors[1]))
    with adding(model, {LAYER: vectors}):
        expected = greedy_loop(model, ids, mask, NEW_TOKENS)
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
        with patch_model(model, {LAYER: params}, mode="query") as handle:
            cached = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
            torch.testing.assert_close(handle.cached_coef(LAYER), reference.synthesize(anchors, params),
                                       rtol=1e-5, atol=1e-6)
            uncached = greedy(model, ids, mask, use_cache=False)
    assert torch.equal(cached.sequences, expected)
    assert torch.equal(uncached, expected)
    first_steered, first_plain = cached.logits[0], plain.logits[0]
    assert not torch.allclose(first_steered[0], first_plain[0], atol=1e-3), "row 0 was not steered"
    for steered, unsteered in zip(cached.logits, plain.logits):
        torch.testing.assert_close(steered[1], unsteered[1], rtol=1e-5, atol=1e-5)  # gate shut for row 1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["query", "token"])
def test_padded_batch_rows_equal_rows_alone(arch, mode):
    model, ids, mask, _, params = batch_with_gate(arch)
    rows = [ids[i][mask[i].bool()][None] for i in range(2)]
    with torch.no_grad():
        base = model(ids, attention_mask=mask, position_ids=positions(mask), output_hidden_states=True)
    with torch.no_grad(), patch_model(model, {LAYER: params}, mode=mode):
        out = model(ids, attention_mask=mask, position_ids=positions(mask), output_hidden_states=True)
        left = out.logits
        padding = ~mask.bool()
        assert torch.equal(out.hidden_states[LAYER + 1][padding], base.hidden_states[LAYER + 1][padding])
        assert not torch.equal(out.hidden_states[LAYER + 1][0, -1], base.hidden_states[LAYER + 1][0, -1])
        left_tokens = greedy(model, ids, mask)
        right_ids, right_mask = ids.clone(), mask.clone()
        for i, row in enumerate(rows):  # the same prompts, right-padded
            right_ids[i], right_mask[i] = 0, 0
            right_ids[i, :row.shape[1]], right_mask[i, :row.shape[1]] = row, 1
        right = model(right_ids, attention_mask=right_mask).logits
        for i, row in enumerate(rows):
            alone = model(row).logits[0]
            n = row.shape[1]
            torch.testing.assert_close(left[i, -n:], alone, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(right[i, :n], alone, rtol=1e-4, atol=1e-4)
            assert torch.equal(left_tokens[i, -NEW_TOKENS:], greedy(model, row)[0, -NEW_TOKENS:])


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("mode", ["query", "token"])
def test_static_cache_and_4d_masks(arch, mode):
    """A static cache keeps its length on the device and generate hands the layers 4-D masks (a dict of them for
    Gemma2): padding then comes from the mask's diagonal and the cache length from counting what went in."""
    model, ids, mask, _, params = batch_with_gate(arch)
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    allowed = causal[None, None] & mask.bool()[:, None, None, :]
    mask_4d = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)  # additive form
    with torch.no_grad(), patch_model(model, {LAYER: params}, mode=mode):
        dynamic = greedy(model, ids, mask)
        assert torch.equal(greedy(model, ids, mask, cache_implementation="static"), dynamic)
        pos = positions(mask)
        torch.testing.assert_close(model(ids, attention_mask=mask_4d, position_ids=pos).logits[mask.bool()],
                                   model(ids, attention_mask=mask, position_ids=pos).logits[mask.bool()],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_chunked_prefill_steers_from_the_anchor_chunk(arch):
    """generate(prefill_chunk_size=2): chunks that end before the prompt's last token are left alone (the decision
    is not known yet); the chunk holding the anchor and every token after it get the anchor's vector."""
    model = get_model(arch)
    ids = random_ids(2, 5, seed=18)
    mask = torch.ones_like(ids)
    params = mose(hidden_size(model), hidden_scale(model, ids), seed=4)
    anchors = anchors_of(model, LAYER, ids, mask)
    vectors = fixed_vectors(params, anchors)
    calls = []

    def from_third_call(mod, args, out):  # chunks [0, 2), [2, 4) come first, [4, 5) holds the anchor
        calls.append(out.shape[1])
        return out + vectors[:, None, :] if len(calls) >= 3 else out

    with torch.no_grad():
        hook = finesteer.find_decoder_layers(model)[LAYER].register_forward_hook(from_third_call)
        try:
            expected = greedy(model, ids, mask, prefill_chunk_size=2)
        finally:
            hook.remove()
        assert calls[:3] == [2, 2, 1]
        with patch_model(model, {LAYER: params}) as handle:
            assert torch.equal(greedy(model, ids, mask, prefill_chunk_size=2), expected)
            torch.testing.assert_close(handle.cached_coef(LAYER), reference.synthesize(anchors, params),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_token_mode_changes_exactly_the_gated_positions(arch):
    model = get_model(arch)
    ids = random_ids(1, 6, seed=6)
    d = hidden_size(model)
    h = layer_outputs(model, LAYER, input_ids=ids)[0]
    gated = torch.tensor([False, True, False, False, True, False])
    basis, tau = gate_between(h[gated], h[~gated])
    params = mose(d, hidden_scale(model, ids), basis=basis, tau=tau)
    with torch.no_grad():
        base = model(ids, output_hidden_states=True).hidden_states
        with patch_model(model, {LAYER: params}, mode="token"):
            steered = model(ids, output_hidden_states=True).hidden_states
            # an all-ones mask takes the row_mask path of the op: it must steer exactly the same rows the same way
            masked = model(ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
    assert torch.equal(masked[LAYER + 1], steered[LAYER + 1])
    changed = (steered[LAYER + 1][0] != base[LAYER + 1][0]).any(-1)
    assert torch.equal(changed, gated)
    torch.testing.assert_close(steered[LAYER + 1][0], reference.steer(h, params), rtol=1e-5, atol=1e-6)
    for i in range(LAYER + 1):
        assert torch.equal(steered[i], base[i])


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_two_layers_sampling_and_no_cache(arch):
    """Query mode at layers 0 and 2: greedy with and without cache and seeded sampling equal hand-written hooks
    that add the vectors synthesised at the prompt's anchors (layer 2's anchor already sees layer 0's edit)."""
    model = get_model(arch)
    ids = random_ids(2, 5, seed=7)
    mask = torch.ones_like(ids)
    d = hidden_size(model)
    scale = hidden_scale(model, ids)
    params = {0: mose(d, scale, seed=1), 2: mose(d, scale, seed=2)}
    vectors = {0: fixed_vectors(params[0], anchors_of(model, 0, ids, mask))}
    vectors[2] = fixed_vectors(params[2], anchors_of(model, 2, ids, mask, extra_vectors=vectors))

    def sample(seed):
        torch.manual_seed(seed)
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0)

    with torch.no_grad():
        with adding(model, vectors):
            expected_greedy, expected_sample = greedy(model, ids, mask), sample(11)
        plain = greedy(model, ids, mask)
        with patch_model(model, params, mode="query"):
            assert torch.equal(greedy(model, ids, mask), expected_greedy)
            assert torch.equal(greedy(model, ids, mask, use_cache=False), expected_greedy)
            assert torch.equal(sample(11), expected_sample)
    assert (expected_greedy != plain).any(-1).all(), "steering must change every row, or the test proves nothing"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_beam_search_matches_fixed_vector_hooks(arch):
    model = get_model(arch)
    ids = random_ids(2, 4, seed=8)
    mask = torch.ones_like(ids)
    d = hidden_size(model)
    params = mose(d, hidden_scale(model, ids), seed=3)
    vectors = fixed_vectors(params, anchors_of(model, LAYER, ids, mask)).repeat_interleave(3, dim=0)
    with torch.no_grad():
        with adding(model, {LAYER: vectors}):
            expected = greedy(model, ids, mask, num_beams=3, num_return_sequences=2)
        with patch_model(model, {LAYER: params}):
            got = greedy(model, ids, mask, num_beams=3, num_return_sequences=2)
        plain = greedy(model, ids, mask, num_beams=3, num_return_sequences=2)
    assert torch.equal(got, expected)
    assert (got != plain).any(-1).all(), "steering must change every beam, or the test proves nothing"


def test_beam_search_on_one_prompt_runs_twice():
    """With one prompt the beams' shared coefficients were a view with stride 0 over the beams, into which the next
    prefill's in-place copy failed ("more than one element of the written-to tensor refers to a single memory
    location"), reset() or not."""
    model = get_model("llama")
    ids = random_ids(1, 5, seed=8)
    params = mose(hidden_size(model), hidden_scale(model, ids), seed=3)
    with torch.no_grad(), patch_model(model, {LAYER: params}) as handle:
        first = greedy(model, ids, num_beams=3)
        assert torch.equal(greedy(model, ids, num_beams=3), first)
        handle.reset()
        model(ids.expand(3, -1))  # a bare prefill of three rows
        assert torch.equal(greedy(model, ids, num_beams=3), first)


def test_assisted_generation_keeps_the_prompt_coef():
    """Assisted decoding verifies several candidate tokens per forward on top of the cache: they are after the
    prompt, so they reuse its coefficients and the result equals plain greedy decoding of the patched model."""
    model = get_model("llama")
    ids = random_ids(1, 5, seed=19)
    mask = torch.ones_like(ids)
    params = mose(hidden_size(model), hidden_scale(model, ids), seed=5)
    widths = []
    probe = finesteer.find_decoder_layers(model)[LAYER].register_forward_hook(
        lambda mod, args, out: widths.append(out.shape[1]))
    try:
        with torch.no_grad(), patch_model(model, {LAYER: params}):
            expected = greedy(model, ids, mask)
            widths.clear()
            assisted = greedy(model, ids, mask, assistant_model=tiny_model("llama", seed=1))
    finally:
        probe.remove()
    assert max(widths[1:]) > 1, "no multi-token verification step happened"
    assert torch.equal(assisted, expected)


# ---- state, lifetime, options ------------------------------------------------------------------------------------
def test_state_lives_on_handle_and_unpatch_removes_everything():
    model = get_model("llama")
    ids = random_ids(2, 5, seed=9)
    d = hidden_size(model)
    params = mose(d, hidden_scale(model, ids))
    with torch.no_grad():
        base = model(ids).logits
        first = patch_model(model, {0: params})
        second = patch_model(model, {2: params}, mode="token")
        assert "generate" in vars(model)
        model(ids)
        assert first.cached_coef(0).shape == (2, params.n_coef)
        with pytest.raises(RuntimeError, match="already patched"):
            patch_model(model, {0: params})
        assert unpatch_model(model) == 2
        assert not first.active and not second.active and first.cached_coef(0) is None
        assert "generate" not in vars(model)  # the class's generate is back
        assert torch.equal(model(ids).logits, base)
        assert unpatch_model(model) == 0
        first.remove()  # removing twice is harmless


def test_new_prefill_replaces_cache_and_decode_checks_batch():
    model = get_model("llama")
    d = hidden_size(model)
    params = mose(d, 1.0)
    two, one = random_ids(2, 4, seed=10), random_ids(1, 3, seed=11)
    with torch.no_grad():
        unpatched_cache = model(one, use_cache=True).cache
        with patch_model(model, {LAYER: params}) as handle:
            step = random_ids(1, 1, seed=12)
            with pytest.raises(RuntimeError, match="no prefill"):
                model(step, cache=unpatched_cache)
            cache_two = model(two, use_cache=True).cache
            assert handle.cached_coef(LAYER).shape[0] == 2
            model(one, use_cache=True)
            assert handle.cached_coef(LAYER).shape[0] == 1  # the new prefill replaced the cache
            with pytest.raises(RuntimeError, match="batch size changed"):
                model(random_ids(2, 1, seed=13), cache=cache_two)


def test_row_without_real_tokens_gets_no_edit():
    model = get_model("llama")
    ids = random_ids(2, 4, seed=20)
    mask = torch.ones_like(ids)
    mask[1] = 0
    with torch.no_grad(), patch_model(model, {LAYER: mose(hidden_size(model), 1.0)}) as handle:
        model(ids, attention_mask=mask)
        coef = handle.cached_coef(LAYER)
    assert coef[0].abs().sum() > 0 and torch.equal(coef[1], torch.zeros_like(coef[1]))


def test_beams_of_a_prompt_share_its_first_beams_coef():
    """Beam search reorders rows within a prompt's beams; sharing one coef row per prompt keeps that exact even
    where a device computes identical rows with slightly different rounding."""
    from finesteer.patching.handle import _share_within_beams

    coef = torch.arange(12.0).view(6, 2)
    shared = _share_within_beams(coef, 3)
    assert torch.equal(shared, coef[[0, 0, 0, 3, 3, 3]])
    assert torch.equal(_share_within_beams(coef, 1), coef)
    one_prompt = _share_within_beams(coef[:3], 3)
    one_prompt.copy_(coef[3:])  # the next prefill writes into it: every row its own memory
    assert torch.equal(one_prompt, coef[3:])
    with pytest.raises(RuntimeError, match="num_beams"):
        _share_within_beams(coef, 4)


def test_alpha_override_and_steerer_objects():
    model = get_model("qwen2")
    ids = random_ids(1, 5, seed=14)
    d = hidden_size(model)
    params = mose(d, hidden_scale(model, ids))
    steerer = Steerer(params=params, layer=LAYER)
    with torch.no_grad():
        with patch_model(model, {LAYER: params.replace(alpha=0.5 * params.alpha)}):
            expected = model(ids).logits
        with patch_model(model, steerer, alpha=0.5 * params.alpha) as handle:
            assert handle.layers == (LAYER,) and handle.params(LAYER).alpha == 0.5 * params.alpha
            assert torch.equal(model(ids).logits, expected)
        with patch_model(model, steerer):
            assert not torch.equal(model(ids).logits, expected)


@pytest.mark.parametrize("mode", ["query", "token"])
def test_bfloat16_model_keeps_dtype_and_prepares_once(mode, monkeypatch):
    """Parameters are moved and packed at patch time; forwards add nothing to the packing cache. Runs on the
    default backend (the Triton interpreter here once the kernels are in), which reads the packed form."""
    monkeypatch.delenv("FINESTEER_BACKEND", raising=False)
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = random_ids(1, 5, seed=15)
    with torch.no_grad(), patch_model(model, {LAYER: mose(64, 0.5)}, mode=mode) as handle:
        packed_forms = dict(handle.params(LAYER)._pack_cache)
        steered = model(ids, output_hidden_states=True).hidden_states[LAYER + 1]
        assert steered.dtype == torch.bfloat16
        model(ids, attention_mask=torch.ones_like(ids))
        assert handle.params(LAYER)._pack_cache == packed_forms


def test_default_backend_agrees_with_torch_reference(monkeypatch):
    """Whatever backend the kernels pick here (the Triton interpreter once the kernels land) gives the same
    patched logits as the torch reference."""
    model = get_model("llama")
    ids, mask = left_padded([random_ids(1, 4, seed=16)[0], random_ids(1, 3, seed=17)[0]])
    params = mose(64, hidden_scale(model, ids))
    results = {}
    for backend in ("torch", None):
        if backend is None:
            monkeypatch.delenv("FINESTEER_BACKEND", raising=False)
        with torch.no_grad():
            for mode in ("query", "token"):
                with patch_model(model, {LAYER: params}, mode=mode):
                    results[backend, mode] = model(ids, attention_mask=mask).logits
    for mode in ("query", "token"):
        torch.testing.assert_close(results[None, mode], results["torch", mode], rtol=1e-4, atol=1e-4)


# ---- errors --------------------------------------------------------------------------------------------------------
def test_clear_errors():
    model = get_model("llama")
    params = mose(64, 1.0)
    with pytest.raises(ValueError, match="mode"):
        patch_model(model, {LAYER: params}, mode="sentence")
    with pytest.raises(IndexError, match=r"steerer_or_dict: index 3 out of range .* decoder layers"):
        patch_model(model, {3: params})
    with pytest.raises(IndexError, match="steerer_or_dict: expected a non-negative int"):
        patch_model(model, {-1: params})
    with pytest.raises(ValueError, match="hidden size 32"):
        patch_model(model, {LAYER: mose(32, 1.0)})
    with pytest.raises(TypeError, match="bare SteerParams"):
        patch_model(model, params)
    with pytest.raises(ValueError, match="fitted at layer 0"):
        patch_model(model, {LAYER: Steerer(params=params, layer=0)})
    with pytest.raises(ValueError, match="empty"):
        patch_model(model, {})
    with pytest.raises(TypeError, match="float64"):
        patch_model(tiny_model("llama", dtype=torch.float64), {LAYER: params})
    with patch_model(model, {LAYER: params}), pytest.raises(ValueError, match="attention_mask: expected a 2-D"):
        model(random_ids(1, 3), attention_mask=torch.ones(1, 3, 3, dtype=torch.bool))
    assert unpatch_model(model) == 0
    moved = tiny_model("gpt2")
    with patch_model(moved, {LAYER: params}), torch.no_grad():
        moved.to("meta")  # stands in for a model moved to another device after patching
        with pytest.raises(RuntimeError, match="moved after patching"):
            finesteer.find_decoder_layers(moved)[LAYER](torch.zeros(1, 3, 64, device="meta"))
    with patch_model(model, {LAYER: params}, mode="token"), torch.no_grad():
        model.double()
        try:
            with pytest.raises(TypeError, match="float64"):
                model(random_ids(1, 3))
        finally:
            model.float()


def test_steerer_dataclass_replace_moves_site():
    """The error message's suggested fix works: the moved steerer edits the output of LAYER, not of layer 0."""
    model = get_model("llama")
    ids = random_ids(1, 4, seed=30)
    steerer = Steerer(params=SteerParams(experts=torch.ones(1, 64), alpha=0.5), layer=0)
    with torch.no_grad():
        base = model(ids, output_hidden_states=True).hidden_states
        with patch_model(model, {LAYER: dataclasses.replace(steerer, layer=LAYER)}) as handle:
            assert handle.layers == (LAYER,)
            out = model(ids, output_hidden_states=True).hidden_states
    for i in range(LAYER + 1):
        assert torch.equal(out[i], base[i])
    torch.testing.assert_close(out[LAYER + 1], base[LAYER + 1] + 0.5, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edit_comes_first_with_grad_enabled(arch):
    """With autograd on, the edit returns a new tensor (no in-place write hides the order): the steering hook
    must still run before transformers' recording hooks and before a user's hook registered earlier."""
    model = get_model(arch)
    ids = random_ids(2, 4, seed=31)
    params = SteerParams(experts=torch.ones(1, 64), alpha=0.5)
    with torch.no_grad():
        base = model(ids, output_hidden_states=True).hidden_states[LAYER + 1]
    seen = []
    user = finesteer.find_decoder_layers(model)[LAYER].register_forward_hook(
        lambda mod, args, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        with torch.enable_grad(), patch_model(model, {LAYER: params}):
            recorded = model(ids, output_hidden_states=True).hidden_states[LAYER + 1]
            assert recorded.requires_grad
    finally:
        user.remove()
    torch.testing.assert_close(recorded.detach(), base + 0.5, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen[0], base + 0.5, rtol=1e-6, atol=1e-6)


def test_beams_share_their_prompts_coefficients_even_when_computed_apart(monkeypatch):
    """Beams start from identical prefills, so on a CPU their coefficients agree anyway; here synthesize gives
    every row different ones (as rounding can on a GPU), and query mode must still use one row per prompt, the
    first beam's."""
    import finesteer_kernels

    real = finesteer_kernels.synthesize

    def per_row(h, params):
        coef = real(h, params)
        return coef * (1 + 0.1 * torch.arange(coef.shape[0], dtype=coef.dtype))[:, None]

    monkeypatch.setattr(finesteer_kernels, "synthesize", per_row)
    model = get_model("llama")
    ids = random_ids(2, 4, seed=32)
    params = mose(64, hidden_scale(model, ids), seed=6)
    with torch.no_grad(), patch_model(model, {LAYER: params}) as handle:
        greedy(model, ids, num_beams=3)
        coef = handle.cached_coef(LAYER)
    anchors = anchors_of(model, LAYER, ids, torch.ones_like(ids))
    first_beams = real(anchors, params) * torch.tensor([1.0, 1.3])[:, None]  # rows 0 and 3 of six
    torch.testing.assert_close(coef, first_beams.repeat_interleave(3, dim=0), rtol=1e-5, atol=1e-6)


def test_a_layer_called_after_a_padded_forward_does_not_reuse_its_mask():
    """The forward's context (mask, cache length) ends with the forward: a decoder layer called on its own
    afterwards is steered as under a fresh patch (token mode, always-on steerer: every row), not with the
    finished forward's padding."""
    model = get_model("gpt2")
    ids, mask = left_padded([random_ids(1, 2, seed=36)[0], random_ids(1, 5, seed=37)[0]])
    layer = finesteer.find_decoder_layers(model)[LAYER]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(38))
    params = SteerParams(experts=torch.ones(1, 64), alpha=1.0)
    with torch.no_grad():
        plain = layer(x)
        with patch_model(model, {LAYER: params}, mode="token"):
            fresh = layer(x)
        with patch_model(model, {LAYER: params}, mode="token"):
            model(ids, attention_mask=mask)
            after = layer(x)
    torch.testing.assert_close(fresh, plain + 1.0, rtol=1e-6, atol=1e-6)
    assert torch.equal(after, fresh)


def test_a_second_thread_is_refused_while_one_is_running():
    """Documented choice: one patch serves one thread at a time. A generate or forward entering from a second
    thread while the first thread's generate runs raises at once; the first thread's result is unaffected."""
    model = get_model("llama")
    ids = random_ids(1, 4, seed=33)
    params = mose(64, hidden_scale(model, ids), seed=7)
    inside, release, results = threading.Event(), threading.Event(), {}

    def hold_the_first_forward(mod, args, out):
        if not inside.is_set():
            inside.set()
            release.wait(60)

    def first_thread():
        results["tokens"] = greedy(model, ids)

    with torch.no_grad(), patch_model(model, {LAYER: params}):
        expected = greedy(model, ids)
        hook = finesteer.find_decoder_layers(model)[0].register_forward_hook(hold_the_first_forward)
        worker = threading.Thread(target=first_thread)
        try:
            worker.start()
            assert inside.wait(60)
            with pytest.raises(RuntimeError, match="model.generate: called from a second thread"):
                greedy(model, ids)
            with pytest.raises(RuntimeError, match="model forward: called from a second thread"):
                model(ids)
        finally:
            release.set()
            worker.join(60)
            hook.remove()
        assert torch.equal(results["tokens"], expected)
        assert torch.equal(greedy(model, ids), expected)  # free again once the first thread is done


@pytest.mark.parametrize("kind", ["plain", "bank"])
def test_a_decode_step_in_another_thread_than_its_prefill_is_refused(kind):
    """Interleaved manual loops in two threads would decode with each other's coefficients: a decode step must
    run in the thread whose prefill made the cached ones (a SteererBank's patch too)."""
    model = get_model("llama")
    ids, step = random_ids(1, 4, seed=34), random_ids(1, 1, seed=35)
    steerer = {LAYER: mose(64, 1.0)}
    caches = {}
    with torch.no_grad(), patch_model(model, steerer if kind == "plain" else
                                      finesteer.SteererBank({"s": steerer}, default="s")):
        worker = threading.Thread(target=lambda: caches.update(other=model(ids, use_cache=True).cache))
        worker.start()
        worker.join(60)
        with pytest.raises(RuntimeError, match="decode step in another thread than the prefill"):
            model(step, cache=caches["other"])
        model(step, cache=model(ids, use_cache=True).cache)  # prefill and decode in this thread


@pytest.mark.parametrize("mode", ["query", "token"])
def test_a_keyboard_interrupt_in_a_forward_releases_the_patch(mode):
    """torch runs the owner's always_call hook only for an Exception: a KeyboardInterrupt inside a forward must
    still end the forward (guard released, context cleared), so that another thread can use the model afterwards;
    an Exception is released once, not twice (a level held around the forward, as generate holds one, stays)."""
    model = get_model("llama")
    ids = random_ids(2, 5, seed=36)
    layer = finesteer.find_decoder_layers(model)[2]
    with torch.no_grad(), patch_model(model, {LAYER: mose(64, 1.0)}, mode=mode) as handle:
        want = model(ids).logits
        guard = handle._one_thread
        for error in (KeyboardInterrupt, ValueError):
            raising = layer.register_forward_hook(lambda *_, e=error: (_ for _ in ()).throw(e()))
            try:
                for outer_levels in (0, 1):
                    for _ in range(outer_levels):
                        guard.enter("outer call")
                    with pytest.raises(error):
                        model(ids)
                    assert guard._depth == outer_levels and handle._context is None, (error, outer_levels)
                    for _ in range(outer_levels):
                        guard.exit()
                    assert not guard._lock.locked(), error
            finally:
                raising.remove()
        results = {}
        worker = threading.Thread(target=lambda: results.update(logits=model(ids).logits))
        worker.start()
        worker.join(60)
        assert torch.equal(results["logits"], want)


@pytest.mark.parametrize("kind", ["plain", "bank"])
def test_an_inference_mode_prefill_then_a_no_grad_one(kind):
    """Query mode writes each prefill's coefficients into the last one's memory (CUDA graphs read it): memory made
    under torch.inference_mode() is updated there, not refused, when the next prefill runs under no_grad; and the
    other way round."""
    model = get_model("llama")
    ids = random_ids(2, 5, seed=37)
    steerer = {LAYER: mose(64, hidden_scale(model, ids), seed=3)}
    patch = lambda: patch_model(model, steerer if kind == "plain" else  # noqa: E731
                                finesteer.SteererBank({"s": steerer}, default="s"))
    with torch.no_grad(), patch():
        want = greedy(model, ids)
    with patch():
        for modes in ((torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode)):
            for grad_mode in modes:
                with grad_mode():
                    assert torch.equal(greedy(model, ids), want), grad_mode


@pytest.mark.parametrize("arch", ["falcon", "bloom"])
def test_layers_of_models_without_a_recorded_layer_class_are_found(arch):
    model = get_model(arch)
    assert not any(getattr(m, "_can_record_outputs", None) for m in model.modules())
    assert finesteer.find_decoder_layers(model) is model.transformer.h


def test_decoder_layers_can_be_named_explicitly(monkeypatch):
    """A model the search cannot handle (simulated: no recorded layer class, no known path) works once its layer
    list is named, in patch_model and in the activation collectors."""
    from finesteer.fitting import activations
    from finesteer.patching import layers

    model = get_model("llama")
    ids = random_ids(1, 4, seed=39)
    params = SteerParams(experts=torch.ones(1, 64), alpha=0.5)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[LAYER + 1] + 0.5
    monkeypatch.setattr(layers, "_layer_class", lambda model: None)
    monkeypatch.setattr(layers, "LAYER_PATHS", ())
    with pytest.raises(ValueError, match="pass decoder_layers='path.to.layers'"):
        patch_model(model, {LAYER: params})
    for named in ("model.layers", model.model.layers):
        with torch.no_grad(), patch_model(model, {LAYER: params}, decoder_layers=named):
            out = model(ids, output_hidden_states=True).hidden_states[LAYER + 1]
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    means = activations.span_means(model, [ids[0].tolist()], [[(3, 4)]], [LAYER], progress=False,
                                   decoder_layers="model.layers")
    torch.testing.assert_close(means[LAYER][0, 0], expected[0, 3] - 0.5, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="decoder_layers: LlamaForCausalLM has no submodule 'model.blocks'"):
        layers.find_decoder_layers(model, "model.blocks")
    with pytest.raises(ValueError, match="decoder_layers: model.norm is a LlamaRMSNorm, not a non-empty ModuleList"):
        layers.find_decoder_layers(model, "model.norm")
    with pytest.raises(ValueError, match="not part of the model"):
        layers.find_decoder_layers(model, torch.nn.ModuleList([torch.nn.Linear(2, 2)]))
    with pytest.raises(TypeError, match="decoder_layers: expected a dotted path"):
        layers.find_decoder_layers(model, 3)


# ---- manual decode loops (what a CUDA-graph decode loop runs, step by step) ------------------------------------------
def manual_greedy(model, ids, cache, steps: int, with_mask: bool) -> tuple:
    """Prefill, then one-token steps on ``cache``: (sequences, (B, steps, V) next-token logits)."""
    mask = torch.ones_like(ids)
    step_ids, all_logits = ids, []
    for _ in range(steps):
        extra = {"attention_mask": mask} if with_mask else {}
        with torch.no_grad():
            logits = model(step_ids, cache=cache, use_cache=True, **extra).logits[:, -1]
        all_logits.append(logits)
        step_ids = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    return ids, torch.stack(all_logits, dim=1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_manual_cache_loops_match_generate(arch):
    """Query mode in a hand-written loop with a StaticCache (its length lives on the device, so the handle counts
    what it was fed) or a DynamicCache, with and without an attention mask, gives generate's tokens and logits; a
    static cache reused after cache.reset() + handle.reset() serves a second prompt, updating the cached
    coefficients in place (what a captured decode graph reads)."""
    from transformers import DynamicCache, StaticCache

    model = get_model(arch)
    prompts = random_ids(2, 5, seed=21), random_ids(2, 5, seed=22)
    params = mose(hidden_size(model), hidden_scale(model, prompts[0]), seed=4)
    static = StaticCache(config=model.config, max_cache_len=16)
    coef_memory = None
    with torch.no_grad():
        plain = model.generate(prompts[0], attention_mask=torch.ones_like(prompts[0]), max_new_tokens=NEW_TOKENS,
                               do_sample=False, output_logits=True, return_dict_in_generate=True)
        with patch_model(model, {LAYER: params}) as handle:
            for prompt in prompts:
                expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                          do_sample=False, output_logits=True, return_dict_in_generate=True)
                expected_logits = torch.stack(expected.logits, dim=1)
                for with_mask in (False, True):
                    for cache in (DynamicCache(config=model.config), static):
                        static.reset()
                        handle.reset()
                        tokens, logits = manual_greedy(model, prompt, cache, NEW_TOKENS, with_mask)
                        what = f"{type(cache).__name__}, mask={with_mask}"
                        assert torch.equal(tokens, expected.sequences), what
                        torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4, msg=what)
                        coef_memory = handle.cached_coef(LAYER) if coef_memory is None else coef_memory
                        assert handle.cached_coef(LAYER) is coef_memory, "coef not updated in place"
    assert not torch.allclose(expected_logits, torch.stack(plain.logits, dim=1), atol=1e-3), "steering had no effect"


def test_static_cache_filled_before_patching_needs_a_mask():
    """A static cache the patch never saw cannot say (without a device read) how many tokens it holds: a decode
    step without a mask is refused clearly, one with a 2-D mask works."""
    from transformers import StaticCache

    model = get_model("llama")
    ids = random_ids(1, 4, seed=23)
    static = StaticCache(config=model.config, max_cache_len=8)
    with torch.no_grad():
        model(ids, cache=static, use_cache=True)
        with patch_model(model, {LAYER: mose(hidden_size(model), 1.0)}):
            step = random_ids(1, 1, seed=24)
            with pytest.raises(ValueError, match="did not see"):
                model(step, cache=static)
            model(ids, attention_mask=torch.ones_like(ids))  # a prefill (no cache) gives coefficients
            model(step, cache=static, attention_mask=torch.ones(1, 5, dtype=torch.long))
