"""Per-request steering with a `SteererBank` on tiny models: every row of a mixed batch (4+ steerers with different
layers, r, K, residuals, and rows with none) generates exactly what that row generates alone with its own steerer
patched, in both modes, with left padding, beam search, sampling, and a KV cache or none; continuous batching
(transformers' generate_batch and its manager, requests arriving and leaving at different times) gives every
request its own plain generate; clear errors.

The op runs on the torch backend (the kernels are checked against it in test_bank_kernels.py; the interpreter
would make every token take seconds), except one test on the default backend.
"""
from __future__ import annotations

import time

import pytest
import torch

from finesteer import SteererBank, patch_model
from finesteer.layers import hidden_size
from finesteer_kernels import SteerBank
from op_cases import random_params
from patching_fixtures import get_model, no_patch_left_behind, one_thread, torch_backend  # noqa: F401
from tiny_models import random_ids

ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox")
NEW_TOKENS = 4

pytestmark = pytest.mark.usefixtures("torch_backend")  # the exact reference; some tests override it


def steerers_for(model, scale: float = 1.5) -> dict:
    """Four steerers with different shapes and layers; edits about ``scale`` times the residual stream's norm."""
    d = hidden_size(model)
    with torch.no_grad():
        h = model(random_ids(2, 6, seed=99), output_hidden_states=True).hidden_states[2]
    size = scale * h.norm(dim=-1).mean().item()

    def mose(seed, **kw):
        p = random_params(d, seed=seed, gamma=1.0, alpha=1.0, **kw)
        return p.replace(alpha=size / p.experts.norm(dim=-1).mean().item())

    return {"caa": {1: mose(1, r=0, K=1)},
            "mose": {1: mose(2, r=0, K=8, residual="relu", m=8, k=4)},
            "two-layer": {0: mose(3, r=0, K=3, residual="identity", m=5, k=2), 2: mose(4, r=0, K=2)},
            "late": {2: mose(5, r=0, K=4)}}


def left_padded(rows: list) -> tuple:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def alone(model, steerers: dict, name, prompt: list, mode: str, **kw) -> torch.Tensor:
    """One prompt generated on its own, with its steerer patched the plain way (or none)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        if name is None:
            return model.generate(ids, max_new_tokens=NEW_TOKENS, **kw)
        with patch_model(model, steerers[name], mode=mode):
            return model.generate(ids, max_new_tokens=NEW_TOKENS, **kw)


ASSIGNMENT = ["caa", "mose", None, "two-layer", "late", "mose"]


def prompts_of(n: int) -> list:
    return [random_ids(1, 3 + (i * 2) % 5, seed=10 + i)[0].tolist() for i in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["query", "token"])
def test_mixed_batch_equals_each_row_alone(arch, mode):
    """Left-padded prompts of different lengths, greedy with a KV cache and without one."""
    model = get_model(arch)
    steerers = steerers_for(model)
    prompts = prompts_of(len(ASSIGNMENT))
    ids, mask = left_padded(prompts)
    with torch.no_grad(), patch_model(model, SteererBank(steerers), mode=mode) as handle:
        handle.assign(ASSIGNMENT)
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  use_cache=False)
    plain = {}
    for i, (name, prompt) in enumerate(zip(ASSIGNMENT, prompts)):
        expected = alone(model, steerers, name, prompt, mode, do_sample=False)[0, -NEW_TOKENS:]
        assert torch.equal(cached[i, -NEW_TOKENS:], expected), (i, name)
        assert torch.equal(uncached[i, -NEW_TOKENS:], expected), (i, name)
        plain[i] = alone(model, steerers, None, prompt, mode, do_sample=False)[0, -NEW_TOKENS:]
    changed = [name for i, name in enumerate(ASSIGNMENT) if name and not torch.equal(plain[i], cached[i, -NEW_TOKENS:])]
    assert len(set(changed)) >= 3, f"steering changed too few rows to prove anything: {changed}"


@pytest.mark.parametrize("mode", ["query", "token"])
def test_beam_search_and_sampling(mode):
    model = get_model("llama")
    steerers = steerers_for(model)
    names = ["mose", "late", None]
    prompts = prompts_of(3)
    ids, mask = left_padded(prompts)
    with torch.no_grad(), patch_model(model, SteererBank(steerers), mode=mode) as handle:
        handle.assign(names)
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False)
        torch.manual_seed(5)
        two_each = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=2,
                                  num_return_sequences=2, do_sample=False)
    for i, (name, prompt) in enumerate(zip(names, prompts)):
        expected = alone(model, steerers, name, prompt, mode, num_beams=3, do_sample=False)[0, -NEW_TOKENS:]
        assert torch.equal(beams[i, -NEW_TOKENS:], expected), (i, name)
        pair = alone(model, steerers, name, prompt, mode, num_beams=2, num_return_sequences=2, do_sample=False)
        assert torch.equal(two_each[2 * i:2 * i + 2, -NEW_TOKENS:], pair[:, -NEW_TOKENS:]), (i, name)


def test_default_steerer_forward_and_kernels_backend(monkeypatch):
    """Rows never assigned get the bank's default; a plain forward (no generate) takes one name per row; the
    default backend (Triton under the interpreter here) gives the torch backend's logits."""
    model = get_model("gpt2")
    steerers = steerers_for(model)
    ids = random_ids(3, 5, seed=40)
    results = {}
    for backend in ("torch", None):
        if backend is None:
            monkeypatch.delenv("FINESTEER_BACKEND")
        with torch.no_grad():
            with patch_model(model, SteererBank(steerers, default="mose"), mode="token"):
                results[backend, "default"] = model(ids).logits
            with patch_model(model, SteererBank(steerers), mode="query") as handle:
                handle.assign(["two-layer", None, "caa"])
                results[backend, "assigned"] = model(ids).logits
    with torch.no_grad():
        with patch_model(model, steerers["mose"], mode="token"):
            torch.testing.assert_close(results["torch", "default"], model(ids).logits, rtol=1e-5, atol=1e-5)
        with patch_model(model, steerers["caa"], mode="query"):
            torch.testing.assert_close(results["torch", "assigned"][2], model(ids[2:]).logits[0], rtol=1e-5,
                                       atol=1e-5)
        torch.testing.assert_close(results["torch", "assigned"][1], model(ids[1:2]).logits[0], rtol=1e-5, atol=1e-5)
    for kind in ("default", "assigned"):
        torch.testing.assert_close(results[None, kind], results["torch", kind], rtol=1e-4, atol=1e-4)


def test_clear_errors():
    model = get_model("llama")
    steerers = steerers_for(model)
    with pytest.raises(KeyError, match="default: 'nobody' is not one of the bank's names"):
        SteererBank(steerers, default="nobody")
    with pytest.raises(TypeError, match="expected a Steerer or a dict"):
        SteererBank({"x": 3})
    with pytest.raises(IndexError, match="steerers: index 7 out of range"):
        patch_model(model, SteererBank({"far": {7: steerers["caa"][1]}}))
    with pytest.raises(NotImplementedError, match="fuse_norm: not available with a SteererBank"):
        patch_model(model, SteererBank(steerers), fuse_norm=True)
    with patch_model(model, SteererBank(steerers)) as handle, torch.no_grad():
        with pytest.raises(KeyError, match="'nobody' is not in the bank"):
            handle.assign(["caa", "nobody"])
        handle.assign(["caa", "late"])
        with pytest.raises(ValueError, match="assign: 2 steerer names for a batch of 3 rows"):
            model(random_ids(3, 4))
    assert isinstance(handle.params(1), SteerBank) and handle.params(1).names == ("caa", "mose")


# ---- continuous batching ---------------------------------------------------------------------------------------
def cb_config():
    from transformers import ContinuousBatchingConfig

    # small pages and batches so requests interleave: 8 requests of 3-7 prompt tokens share 48-token batches
    return ContinuousBatchingConfig(max_batch_tokens=48, num_blocks=32, page_size=16, max_requests_per_batch=6)


def greedy_config(tokens: int = NEW_TOKENS):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)


CB_ASSIGNMENT = ["caa", "mose", None, "two-layer", "late", "mose", "late", "caa"]


@pytest.mark.parametrize("mode", ["query", "token"])
def test_generate_batch_gives_every_request_its_own_generate(mode):
    model = get_model("llama")
    steerers = steerers_for(model)
    prompts = prompts_of(len(CB_ASSIGNMENT))
    with torch.no_grad(), patch_model(model, SteererBank(steerers), mode=mode):
        results = model.generate_batch(prompts, generation_config=greedy_config(), steerers=CB_ASSIGNMENT,
                                       warmup=False, continuous_batching_config=cb_config())
    assert len(results) == len(prompts)
    for (request_id, out), name, prompt in zip(results.items(), CB_ASSIGNMENT, prompts):
        expected = alone(model, steerers, name, prompt, mode, do_sample=False)[0, -NEW_TOKENS:].tolist()
        assert out.generated_tokens == expected, (request_id, name)


def test_requests_arriving_and_leaving_at_different_times():
    """The manager API: requests added in three waves while others decode, each with its own steerer and length;
    query-mode slots of finished requests are freed and reused."""
    model = get_model("qwen2")
    steerers = steerers_for(model)
    prompts = prompts_of(9)
    names = CB_ASSIGNMENT + ["two-layer"]
    lengths = [2 + i % 4 for i in range(9)]
    with torch.no_grad(), patch_model(model, SteererBank(steerers), mode="query") as handle:
        with model.continuous_batching_context_manager(generation_config=greedy_config(), warmup=False,
                                                       continuous_batching_config=cb_config()) as manager:
            results = {}

            def collect(n):
                deadline = time.time() + 120
                while len(results) < n and time.time() < deadline:
                    out = manager.get_result(timeout=1)
                    if out is not None and out.is_finished():
                        results[out.request_id] = out
                assert len(results) >= n, "continuous batching stalled"

            for wave in ((0, 1, 2, 3), (4, 5, 6), (7, 8)):
                for i in wave:
                    manager.add_request(prompts[i], request_id=f"user{i}", max_new_tokens=lengths[i],
                                        steerer=names[i])
                collect(wave[0] + 1)  # at least one more request finished before the next wave arrives
            collect(9)
        slots_used = handle.continuous.capacity
    for i in range(9):
        ids = torch.tensor([prompts[i]])
        with torch.no_grad():
            if names[i] is None:
                expected = model.generate(ids, max_new_tokens=lengths[i], do_sample=False)
            else:
                with patch_model(model, steerers[names[i]], mode="query"):
                    expected = model.generate(ids, max_new_tokens=lengths[i], do_sample=False)
        assert results[f"user{i}"].generated_tokens == expected[0, -lengths[i]:].tolist(), (i, names[i])
    assert slots_used < 8, f"finished requests' slots were not reused ({slots_used} slots for 8 steered requests)"


def test_a_plain_patch_refuses_query_mode_in_packed_batches():
    model = get_model("llama")
    steerers = steerers_for(model)
    with torch.no_grad(), patch_model(model, steerers["caa"], mode="query"):
        results = model.generate_batch(prompts_of(2), generation_config=greedy_config(2), warmup=False,
                                       continuous_batching_config=cb_config())
    assert all(out.error is not None and "SteererBank" in out.error for out in results.values())
