"""``patch_model(..., fuse_norm=True)`` on tiny random-weight models: the same logits and tokens as the separate edit
(fp32, 1e-5) on the pre-norm RMSNorm architectures, in forward and in ``generate`` with a KV cache and left padding,
both modes, with the fused kernels really running (the Triton interpreter on CPU), also with a gate that closes for
some rows; the fallback, with its warning, on OLMo2 (post-norm), GPT-2 and GPT-NeoX (LayerNorm); recorded hidden
states; the cases that must stay unfused at run time; and removal restoring the norm modules exactly."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import finesteer
import finesteer_kernels
from finesteer import patch_model
from op_cases import random_params
from patching_fixtures import get_model, no_patch_left_behind, one_thread  # noqa: F401  (autouse fixtures)
from tiny_models import random_ids

FUSED = ("llama", "qwen2", "mistral", "gemma2", "gemma3_text", "phi3")
FALLBACK = ("olmo2", "gpt2", "gpt_neox")
LAYERS = (1, 2)  # a middle layer (next layer's input norm) and the last one (the final norm)
NEW_TOKENS = 3
FUSED_OPS = ("steer_rmsnorm_", "apply_delta_rmsnorm_")


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused ops the handle calls (they are looked up on `finesteer_kernels` at call time)."""
    calls = {name: 0 for name in FUSED_OPS}
    for name in FUSED_OPS:
        op = getattr(finesteer_kernels, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(finesteer_kernels, name, counted)
    return calls


def steerers(model) -> dict:
    """A gated MoSE steerer per layer whose edits are about as large as the residual stream (so tokens change)."""
    d = model.config.hidden_size
    out = {}
    for layer in LAYERS:
        p = random_params(d, 4, 3, "relu", seed=layer, tau=0.0)  # gate open: every row is edited
        out[layer] = p.replace(alpha=2.0 / p.experts.norm(dim=-1).mean().item())
    return out


def left_padded_batch():
    ids = random_ids(2, 5, seed=1)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    return ids, mask


@contextlib.contextmanager
def patched(model, mode, fuse_norm):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning where the fused path is expected
        handle = patch_model(model, steerers(model), mode=mode, fuse_norm=fuse_norm)
    with handle:
        yield handle


def run(model, mode, fuse_norm):
    ids, mask = left_padded_batch()
    with torch.no_grad(), patched(model, mode, fuse_norm):
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out, gen


@pytest.mark.parametrize("arch", FUSED)
@pytest.mark.parametrize("mode", ["query", "token"])
def test_fused_equals_separate_edit_in_forward_and_generate(arch, mode, fused_calls):
    model = get_model(arch)
    plain = model(input_ids=left_padded_batch()[0]).logits.detach()
    out, gen = run(model, mode, fuse_norm=False)
    assert sum(fused_calls.values()) == 0
    fused_out, fused_gen = run(model, mode, fuse_norm=True)
    # forward + prefill + decode steps, at both layers: every call went through the fused op
    op = "steer_rmsnorm_" if mode == "token" else "apply_delta_rmsnorm_"
    assert fused_calls[op] == len(LAYERS) * (2 + NEW_TOKENS - 1)
    assert not torch.allclose(out.logits, plain, atol=1e-2), "the steerers do change the logits"
    torch.testing.assert_close(fused_out.logits, out.logits, rtol=1e-5, atol=1e-5)
    # output_hidden_states records the steered layer outputs (edited in place by the next norm)
    for layer in range(len(out.hidden_states)):
        torch.testing.assert_close(fused_out.hidden_states[layer], out.hidden_states[layer], rtol=1e-5, atol=1e-5)
    assert torch.equal(fused_gen.sequences, gen.sequences)
    for fused_step, step in zip(fused_gen.logits, gen.logits):
        torch.testing.assert_close(fused_step, step, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["query", "token"])
def test_a_norm_weight_edited_after_patching_is_what_the_fused_norm_uses(mode, fused_calls):
    """The fused op reads the norm's weight at every call: after editing the weights of the norms that take the
    edits (in place, new data, load_state_dict) the patched model equals the separate edit with the new weights."""
    from tiny_models import tiny_model

    model = tiny_model("llama", seed=3)
    ids, mask = left_padded_batch()
    norms = [model.model.layers[2].input_layernorm, model.model.norm]  # after layer 1 and after layer 2
    edits = [lambda w: w.mul_(-1.5), lambda w: setattr(w, "data", torch.randn_like(w)),
             lambda w: w.copy_(torch.linspace(-2, 2, w.shape[0]))]
    with torch.no_grad():
        for edit in edits:
            with patched(model, mode, fuse_norm=True):
                before = fused_calls["steer_rmsnorm_"] + fused_calls["apply_delta_rmsnorm_"]
                for norm in norms:
                    edit(norm.weight)
                fused = model(input_ids=ids, attention_mask=mask).logits
                assert fused_calls["steer_rmsnorm_"] + fused_calls["apply_delta_rmsnorm_"] == before + len(LAYERS)
            with patched(model, mode, fuse_norm=False):
                separate = model(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with patched(model, mode, fuse_norm=True):
            for norm in norms:
                state_key = [k for k, v in model.state_dict().items() if v is norm.weight or
                             v.data_ptr() == norm.weight.data_ptr()][0]
                state[state_key] = torch.randn_like(norm.weight)
            model.load_state_dict(state)
            fused = model(input_ids=ids, attention_mask=mask).logits
        with patched(model, mode, fuse_norm=False):
            torch.testing.assert_close(fused, model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", FUSED)
def test_torch_backend_fused_path_is_bit_identical(arch, monkeypatch, fused_calls):
    """On the CPU reference backend the fused op is the edit then the norm's own formula: the same floats."""
    monkeypatch.setenv("FINESTEER_BACKEND", "torch")
    model = get_model(arch)
    for mode in ("query", "token"):
        out, gen = run(model, mode, fuse_norm=False)
        fused_out, fused_gen = run(model, mode, fuse_norm=True)
        assert torch.equal(fused_out.logits, out.logits) and torch.equal(fused_gen.sequences, gen.sequences)
    assert all(fused_calls.values())


# the layers that keep the separate edit, and why: OLMo2 is post-norm (its layers start with attention), but its
# last layer's output is read by the final RMSNorm, which does take the edit; GPT-2 and GPT-NeoX use LayerNorm
FALLBACKS = {"olmo2": ({1}, "Olmo2Attention has no weight"), "gpt2": ({1, 2}, "parameters besides its weight"),
             "gpt_neox": ({1, 2}, "parameters besides its weight")}


@pytest.mark.parametrize("arch", FALLBACK)
def test_fallback_warns_once_and_keeps_the_separate_edit(arch, monkeypatch, fused_calls):
    monkeypatch.setenv("FINESTEER_BACKEND", "torch")
    model = get_model(arch)
    ids, mask = left_padded_batch()
    unfused, reason = FALLBACKS[arch]
    with torch.no_grad():
        with patch_model(model, steerers(model), mode="token"):
            want = model(input_ids=ids, attention_mask=mask).logits
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            handle = patch_model(model, steerers(model), mode="token", fuse_norm=True)
        with handle:
            got = model(input_ids=ids, attention_mask=mask).logits
            assert {i for i, site in handle._sites.items() if site.fused is None} == unfused
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages  # one warning for the whole patch
    assert f"keeps the separate steering edit at {len(unfused)} of 2" in messages[0] and reason in messages[0]
    assert torch.equal(got, want)
    assert fused_calls["steer_rmsnorm_"] == 2 - len(unfused)


def test_unpatch_restores_the_norm_modules_exactly():
    model = get_model("gemma2")
    ids = random_ids(2, 5, seed=2)
    norms = [model.model.layers[2].input_layernorm, model.model.norm]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids).logits
        with patch_model(model, steerers(model), fuse_norm=True) as handle:
            assert {site.fused.module for site in handle._sites.values()} == set(norms)
            assert all("forward" in vars(norm) for norm in norms)
            assert list(model.state_dict()) == list(state)  # the modules were not replaced
        for norm in norms:
            assert "forward" not in vars(norm)
        after = model(ids).logits
    assert torch.equal(after, before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_unfused_at_run_time_outside_a_model_forward_and_with_grad(fused_calls):
    """A layer called on its own (no forward to reach its norm) and a forward that autograd records keep the
    separate edit; so the fused patch gives the same results there too."""
    model = get_model("llama")
    layer = finesteer.find_decoder_layers(model)[1]
    h = torch.randn(2, 3, model.config.hidden_size)
    position = model.model.rotary_emb(h, torch.arange(3)[None].expand(2, 3))
    ids = random_ids(2, 4, seed=3)
    results = {}
    for fuse in (False, True):
        with patch_model(model, steerers(model), mode="token", fuse_norm=fuse):
            with torch.no_grad():
                alone = layer(h, position_embeddings=position)
            logits = model(ids).logits  # autograd on: the weights require grad
            assert logits.requires_grad
            results[fuse] = (alone, logits.detach())
    assert sum(fused_calls.values()) == 0
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=0)


def test_fuse_norm_must_be_a_bool():
    model = get_model("llama")
    with pytest.raises(TypeError, match="fuse_norm: expected True or False"):
        patch_model(model, steerers(model), fuse_norm="yes")


def test_a_stream_changed_before_the_norm_falls_back_at_patch_time_and_raises_later():
    """Layer 2 given a copy of layer 1's output: seen at patch time, layer 1 keeps the separate edit (with the
    warning); appearing only after patching, the fused norm refuses instead of normalising a stream that never got
    the edit."""
    model = get_model("llama")
    ids = random_ids(1, 3)
    copy_input = lambda mod, args: (args[0].clone(), *args[1:])  # noqa: E731
    copying = model.model.layers[2].register_forward_pre_hook(copy_input)
    try:
        with pytest.warns(UserWarning, match="layer 1: no module reads its output directly"):
            handle = patch_model(model, steerers(model), fuse_norm=True)
        with handle, torch.no_grad():
            assert handle._sites[1].fused is None and handle._sites[2].fused is not None
            fused = model(ids).logits
        with patch_model(model, steerers(model)), torch.no_grad():
            torch.testing.assert_close(fused, model(ids).logits, rtol=1e-5, atol=1e-5)
    finally:
        copying.remove()
    with patch_model(model, steerers(model), fuse_norm=True), torch.no_grad():
        copying = model.model.layers[2].register_forward_pre_hook(copy_input)
        try:
            with pytest.raises(RuntimeError, match="fuse_norm: the norm after this steered layer"):
                model(ids)
        finally:
            copying.remove()


def gate_ratio(h: torch.Tensor, p) -> torch.Tensor:
    """The gate's score per row (`reference.gate` compares it with tau): energy of the centred row inside span(S)."""
    centred = h.float() - p.mean
    return (centred @ p.basis).square().sum(-1) / centred.square().sum(-1)


def split_between(scores: torch.Tensor) -> float:
    """A tau in the widest gap between the middle scores: some rows open, some closed, none near the threshold."""
    s = scores.sort().values
    lo, hi = len(s) // 4, max(len(s) - len(s) // 4, len(s) // 4 + 2)
    gaps = s[lo + 1:hi] - s[lo:hi - 1]
    i = lo + int(gaps.argmax())
    assert gaps.max() > 1e-3, "scores too close to keep the rows away from the threshold"
    return float(s[i] + s[i + 1]) / 2


@pytest.mark.parametrize("mode", ["query", "token"])
def test_fused_with_a_closed_gate_and_padding(mode, fused_calls):
    """A tau between the rows' gate scores (token mode: all real positions; query mode: the anchors), so some rows
    are steered and some not, with left padding: the fused norm gives what the separate edit gives, and it leaves
    the closed and padded rows of the first steered layer as they were."""
    model = get_model("llama")
    ids = random_ids(4, 6, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :3] = mask[2, :1] = 0
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    open_gate = steerers(model)
    chosen = {}
    for layer, p in open_gate.items():
        h = plain[layer + 1]  # the layer's output
        rows = h[:, -1] if mode == "query" else h[mask.bool()]  # left padding: the anchor is the last position
        chosen[layer] = p.replace(tau=split_between(gate_ratio(rows, p)))
    results = {}
    for fuse in (False, True):
        with torch.no_grad(), patch_model(model, chosen, mode=mode, fuse_norm=fuse):
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        results[fuse] = out, gen
    assert fused_calls["steer_rmsnorm_" if mode == "token" else "apply_delta_rmsnorm_"] > 0
    (out, gen), (fused_out, fused_gen) = results[False], results[True]
    first = LAYERS[0]  # its input is unsteered, so its gate decisions are those computed above
    edited = (fused_out.hidden_states[first + 1] != plain[first + 1]).any(-1)
    assert not edited[~mask.bool()].any(), "padding stays as it is"
    real = edited[mask.bool()]
    assert real.any() and not real.all(), "tau leaves some real rows unsteered and steers others"
    for fused_h, h in zip(fused_out.hidden_states, out.hidden_states):
        torch.testing.assert_close(fused_h, h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_out.logits, out.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused_gen.sequences, gen.sequences)
    for fused_step, step in zip(fused_gen.logits, gen.logits):
        torch.testing.assert_close(fused_step, step, rtol=1e-5, atol=1e-5)
