"""Per-request steering with a `SteererBank` on tiny models: every row of a mixed batch (4+ steerers with different
layers, r, K, residuals, and rows with none) generates exactly what that row generates alone with its own steerer
patched, in both modes, with left padding, beam search, sampling, and a KV cache or none; continuous batching
(transformers' generate_batch and its manager, requests arriving and leaving at different times) gives every
request its own plain generate; clear errors.

The op runs on the torch backend (the kernels are checked against it in test_bank_kernels.py; the interpreter
would make every token take seconds), except one test on the default backend.
"""
from __future__ import annotations

import contextlib
import time

import pytest
import torch

from finesteer import SteererBank, patch_model, unpatch_model
from finesteer.patching.layers import hidden_size
from finesteer_kernels import SteerBank
from op_cases import random_params
from patching_fixtures import get_model, no_patch_left_behind, one_thread, torch_backend  # noqa: F401
from tiny_models import random_ids

ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox")
NEW_TOKENS = 4
CHILD = "__child#"  # transformers names a request's forks f"{parent}__child#{i}"

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
        handle.assign(ASSIGNMENT)  # a generate call uses its names once
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
        handle.assign(names)
        torch.manual_seed(5)
        two_each = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=2,
                                  num_return_sequences=2, do_sample=False)
    for i, (name, prompt) in enumerate(zip(names, prompts)):
        expected = alone(model, steerers, name, prompt, mode, num_beams=3, do_sample=False)[0, -NEW_TOKENS:]
        assert torch.equal(beams[i, -NEW_TOKENS:], expected), (i, name)
        pair = alone(model, steerers, name, prompt, mode, num_beams=2, num_return_sequences=2, do_sample=False)
        assert torch.equal(two_each[2 * i:2 * i + 2, -NEW_TOKENS:], pair[:, -NEW_TOKENS:]), (i, name)


def test_beam_search_on_one_prompt_runs_twice():
    """A bank's query-mode coefficients are shared over beams as a plain patch's: with one prompt they were a view
    with stride 0, into which the next prefill could not copy."""
    model = get_model("llama")
    steerers = steerers_for(model)
    ids = torch.tensor(prompts_of(1))
    with torch.no_grad(), patch_model(model, SteererBank(steerers, default="mose"), mode="query"):
        first = model.generate(ids, max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False), first)
    assert torch.equal(first, alone(model, steerers, "mose", ids[0].tolist(), "query", num_beams=3, do_sample=False))


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
                results[backend, "default, 2 rows"] = model(ids[1:]).logits  # another batch size
            with patch_model(model, SteererBank(steerers), mode="query") as handle:
                handle.assign(["two-layer", None, "caa"])
                results[backend, "assigned"] = model(ids).logits
    with torch.no_grad():
        with patch_model(model, steerers["mose"], mode="token"):
            torch.testing.assert_close(results["torch", "default"], model(ids).logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(results["torch", "default, 2 rows"], model(ids[1:]).logits, rtol=1e-5,
                                       atol=1e-5)
        with patch_model(model, steerers["caa"], mode="query"):
            torch.testing.assert_close(results["torch", "assigned"][2], model(ids[2:]).logits[0], rtol=1e-5,
                                       atol=1e-5)
        torch.testing.assert_close(results["torch", "assigned"][1], model(ids[1:2]).logits[0], rtol=1e-5, atol=1e-5)
    for kind in ("default", "assigned"):
        torch.testing.assert_close(results[None, kind], results["torch", kind], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["query", "token"])
def test_an_assignment_is_one_name_per_prompt_for_one_batch(mode):
    """assign(["caa", None]) before generate on 4 prompts steered prompts 0 and 1 with "caa" (any multiple of the
    names was taken as beams), 4 names for 2 prompts of 2 beams gave each beam its own steerer, and an assignment
    stayed for the next batch of (other users') prompts. Now: one name per prompt, the expansion is what generate
    asked for, and a batch uses its names once: generate, a bare forward and its cache, generate_batch."""
    model = get_model("llama")
    steerers = steerers_for(model)
    prompts = prompts_of(4)
    ids, mask = left_padded(prompts)
    names = ["caa", None, "late", "mose"]
    run = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad(), patch_model(model, SteererBank(steerers), mode=mode) as handle:
        handle.assign(["caa", None])
        with pytest.raises(ValueError, match="assign: 2 steerer names for 4 prompts"):
            model.generate(ids, **run)
        with pytest.raises(ValueError, match="assign: 2 steerer names for a batch of 4 rows"):
            model(ids, attention_mask=mask)
        with pytest.raises(ValueError, match="assign: 2 steerer names for 4 prompts"):
            model.generate(ids, num_beams=2, **run)
        handle.assign(names)
        with pytest.raises(ValueError, match="assign: 4 steerer names for 2 prompts"):
            model.generate(ids[:2], attention_mask=mask[:2], num_beams=2, max_new_tokens=NEW_TOKENS)
        first = model.generate(ids, **run)  # the failed calls used nothing
        with pytest.raises(ValueError, match="went to an earlier batch; call handle.assign"):
            model.generate(ids, **run)
        with pytest.raises(ValueError, match="went to an earlier batch"):
            model(ids, attention_mask=mask)
        handle.assign(names[:2])
        beams = model.generate(ids[:2], attention_mask=mask[:2], num_beams=2, num_return_sequences=2,
                               max_new_tokens=NEW_TOKENS, do_sample=False)
        handle.assign(names[:2])  # sampling: num_return_sequences alone expands each prompt into 3 rows
        torch.manual_seed(7)
        sampled = model.generate(ids[:2], attention_mask=mask[:2], num_return_sequences=3, do_sample=True,
                                 max_new_tokens=NEW_TOKENS)
        # bare forwards: a prefill takes the names, decode steps on its cache keep them (also when the next batch's
        # names are given meanwhile), the next prefill needs new ones
        handle.assign(names)
        prefill = model(ids, attention_mask=mask, use_cache=True)
        step = prefill.logits[:, -1:].argmax(-1)
        handle.assign(names[::-1])
        decode = model(step, attention_mask=torch.cat([mask, torch.ones_like(step)], 1), cache=prefill.past_key_values,
                       use_cache=True)
        reversed_names = model.generate(ids, **run)
        with pytest.raises(ValueError, match="went to an earlier batch; call handle.assign"):
            model(ids, attention_mask=mask)
        # continuous batching never reads an assignment, used (here) or not (below): its requests name their own
        served_after_use = model.generate_batch(prompts, generation_config=greedy_config(), warmup=False,
                                                continuous_batching_config=cb_config())
        handle.assign(None)  # the default (none) from now on, for every batch
        unsteered = model.generate(ids, **run)
        assert torch.equal(model.generate(ids, **run), unsteered)
        handle.assign(names)  # an assignment never reaches continuous batching's requests: they name their own
        served = model.generate_batch(prompts, generation_config=greedy_config(), warmup=False,
                                      continuous_batching_config=cb_config())
        with pytest.raises(ValueError, match="steerers: 2 names for 4 inputs"):
            model.generate_batch(prompts, steerers=names[:2], generation_config=greedy_config(), warmup=False)
    for i, (name, prompt) in enumerate(zip(names, prompts)):
        expected = alone(model, steerers, name, prompt, mode, do_sample=False)[0, -NEW_TOKENS:]
        assert torch.equal(first[i, -NEW_TOKENS:], expected), (i, name)
        assert torch.equal(reversed_names[i, -NEW_TOKENS:],
                           alone(model, steerers, names[::-1][i], prompt, mode, do_sample=False)[0, -NEW_TOKENS:]), i
        assert torch.equal(unsteered[i, -NEW_TOKENS:], alone(model, steerers, None, prompt, mode)[0, -NEW_TOKENS:])
        for results in (served, served_after_use):
            assert list(results.values())[i].generated_tokens == unsteered[i, -NEW_TOKENS:].tolist(), i
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if name is not None:
                stack.enter_context(patch_model(model, steerers[name], mode=mode))
            one = torch.tensor([prompt])
            alone_prefill = model(one, use_cache=True)
            alone_step = alone_prefill.logits[:, -1:].argmax(-1)
            alone_decode = model(alone_step, cache=alone_prefill.past_key_values, use_cache=True)
        torch.testing.assert_close(prefill.logits[i, -1], alone_prefill.logits[0, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decode.logits[i], alone_decode.logits[0], rtol=1e-5, atol=1e-5)
        if i < 2:
            pair = alone(model, steerers, name, prompt, mode, num_beams=2, num_return_sequences=2, do_sample=False)
            assert torch.equal(beams[2 * i:2 * i + 2, -NEW_TOKENS:], pair[:, -NEW_TOKENS:]), (i, name)
    # rows 3-5 (prompt 1's samples) keep prompt 1's steerer when prompt 0's changes; rows 0-2 change with it
    with torch.no_grad(), patch_model(model, SteererBank(steerers), mode=mode) as handle:
        handle.assign(["late", names[1]])
        torch.manual_seed(7)
        again = model.generate(ids[:2], attention_mask=mask[:2], num_return_sequences=3, do_sample=True,
                               max_new_tokens=NEW_TOKENS)
    assert sampled.shape[0] == 6 and torch.equal(sampled[3:], again[3:]) and not torch.equal(sampled[:3], again[:3])


def test_a_cache_of_unknown_length_needs_a_mask_to_continue_a_batch():
    """A static cache filled before patching keeps its length on the device, unread: a forward on it with a 2-D
    mask continues the batch (its length is the mask's width less the new tokens) and keeps the assignment; without
    a mask the patch cannot tell a new batch from a continued one, and refuses to reuse the names."""
    from transformers import StaticCache

    model = get_model("llama")
    steerers = steerers_for(model)
    ids = random_ids(2, 5, seed=43)
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        token = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        with patch_model(model, SteererBank(steerers), mode="token") as handle:
            handle.assign(["mose", "late"])
            for past in (5, 6):
                model(token, cache=cache, use_cache=True, attention_mask=torch.ones(2, past + 1, dtype=torch.long),
                      cache_position=torch.tensor([past]))
            handle.assign(["mose", "late"])
            model(token, cache=cache, use_cache=True, cache_position=torch.tensor([7]))
            with pytest.raises(ValueError, match="went to an earlier batch"):
                model(token, cache=cache, use_cache=True, cache_position=torch.tensor([8]))


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


def test_token_mode_decodes_on_a_static_cache_filled_before_patching():
    """A static cache keeps its length on the device and this patch never saw it filled: token mode needs no
    length (every row gates on itself), so a one-token step without a mask is steered as the plain patch steers it."""
    from transformers import StaticCache

    model = get_model("llama")
    steerers = steerers_for(model)
    ids = random_ids(1, 5, seed=41)
    steps = {}
    for kind in ("plain", "bank"):
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            token = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            with patch_model(model, steerers["mose"] if kind == "plain" else SteererBank(steerers, default="mose"),
                             mode="token"):
                steps[kind] = model(token, cache=cache, use_cache=True).logits
    torch.testing.assert_close(steps["bank"], steps["plain"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["first in, first out", "last in, first out"])
def test_two_banks_removed_in_either_order_leave_nothing_behind(order):
    """Each bank wraps generate, generate_batch and init_continuous_batching on the instance; removing the one
    below first must neither drop the other's wrappers nor leave its own behind."""
    model = get_model("llama")
    steerers = steerers_for(model)
    ids = random_ids(2, 4, seed=42)
    wrapped = ("forward", "generate", "generate_batch", "init_continuous_batching")
    owner = model.model
    with torch.no_grad(), patch_model(model, steerers["caa"]), patch_model(model, steerers["late"]):
        both = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    below = patch_model(model, SteererBank({"x": steerers["caa"]}, default="x"))
    above = patch_model(model, SteererBank({"y": steerers["late"]}, default="y"))
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), both)
        for handle in (below, above) if order == "first in, first out" else (above, below):
            handle.remove()
            assert callable(model.init_continuous_batching) and callable(model.generate_batch)
        assert [name for name in wrapped if name in vars(model) or name in vars(owner)] == []
        assert unpatch_model(model) == 0
        assert not torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), both)


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


@pytest.mark.parametrize("mode, fuse_norm, backend", [("query", False, "torch"), ("query", True, "torch"),
                                                       ("token", False, "torch"), ("query", False, "default")])
def test_a_plain_patch_steers_every_request_as_generate_does(mode, fuse_norm, backend, monkeypatch):
    """A user who patched one steerer expects generate_batch to work: query mode refused packed forwards ("patch a
    SteererBank instead"). Now every request equals its own generate with the same patch, on both backends (the
    default one: the Triton kernels, under the interpreter here); per-request names need a bank (query mode says
    so; in token mode the patch wraps nothing and transformers ignores the argument)."""
    if backend == "default":
        monkeypatch.delenv("FINESTEER_BACKEND")
    model = get_model("llama")
    steerers = steerers_for(model)
    prompts = prompts_of(6)
    with torch.no_grad(), patch_model(model, steerers["two-layer"], mode=mode, fuse_norm=fuse_norm):
        results = model.generate_batch(prompts, generation_config=greedy_config(), warmup=False,
                                       continuous_batching_config=cb_config())
        if mode == "query":  # token mode installs nothing: every packed row gates on itself
            with pytest.raises(TypeError, match="steerers: this patch holds one steerer"):
                model.generate_batch(prompts, steerers=["two-layer"] * 6, generation_config=greedy_config(),
                                     warmup=False, continuous_batching_config=cb_config())
    assert all(out.error is None for out in results.values()), [out.error for out in results.values()]
    changed = 0
    for out, prompt in zip(results.values(), prompts):
        expected = alone(model, steerers, "two-layer", prompt, mode, do_sample=False)[0, -NEW_TOKENS:].tolist()
        assert out.generated_tokens == expected, out.request_id
        changed += expected != alone(model, steerers, None, prompt, mode, do_sample=False)[0, -NEW_TOKENS:].tolist()
    assert changed >= 3, f"steering changed {changed} of 6 requests: too few to prove anything"


@pytest.mark.parametrize("mode", ["query", "token"])
def test_a_request_scheduled_before_add_request_returns_is_steered(mode):
    """The manager's thread may schedule (here: finish) a request before add_request / add_requests return: the
    steerer must be recorded before the request is queued. The queue's put is made to wait for the result."""
    model = get_model("llama")
    steerers = steerers_for(model)
    prompts = prompts_of(3)
    names = ["mose", "late", "two-layer"]
    results = {}
    with torch.no_grad(), patch_model(model, SteererBank(steerers), mode=mode):
        with model.continuous_batching_context_manager(generation_config=greedy_config(), warmup=False,
                                                       continuous_batching_config=cb_config()) as manager:
            put = manager.input_queue.put

            def put_and_wait_until_generated(state, *args, **kwargs):
                put(state, *args, **kwargs)
                while state.request_id not in results:
                    out = manager.get_result(timeout=60)
                    assert out is not None, "continuous batching stalled"
                    if out.is_finished():
                        results[out.request_id] = out

            manager.input_queue.put = put_and_wait_until_generated
            manager.add_request(prompts[0], request_id="alone", steerer=names[0])
            batch_ids = manager.add_requests(prompts[1:], steerers=names[1:])
    for request_id, name, prompt in zip(["alone", *batch_ids], names, prompts):
        expected = alone(model, steerers, name, prompt, mode, do_sample=False)[0, -NEW_TOKENS:].tolist()
        assert results[request_id].generated_tokens == expected, (request_id, name)


def tight_cache():
    """So little KV cache that requests are soft reset (their cache dropped, the request queued again with its
    generated tokens as prompt) and forks do not fit (a child then waits to be prefilled from scratch)."""
    from transformers import ContinuousBatchingConfig

    return ContinuousBatchingConfig(max_batch_tokens=48, num_blocks=4, page_size=8, max_requests_per_batch=8)


@pytest.mark.parametrize("mode", ["query", "token"])
def test_soft_reset_requests_keep_their_steerer_and_delta(mode, monkeypatch):
    from transformers.generation.continuous_batching.requests import RequestState

    soft_resets = []
    reset = RequestState.create_equivalent_initial_request
    monkeypatch.setattr(RequestState, "create_equivalent_initial_request",
                        lambda state: soft_resets.append(state.request_id) or reset(state))
    model = get_model("llama")
    steerers = steerers_for(model)
    prompts, names, tokens = prompts_of(3), ["mose", "caa", "late"], 12
    with torch.no_grad(), patch_model(model, SteererBank(steerers), mode=mode):
        results = model.generate_batch(prompts, generation_config=greedy_config(tokens), steerers=names,
                                       warmup=False, continuous_batching_config=tight_cache())
    assert soft_resets, "the cache was large enough: no request was soft reset"
    for (request_id, out), name, prompt in zip(results.items(), names, prompts):
        with torch.no_grad(), patch_model(model, steerers[name], mode=mode):
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False)
        assert out.generated_tokens == expected[0, -tokens:].tolist(), (request_id, name)


@pytest.mark.parametrize("mode", ["query", "token"])
def test_forked_requests_take_their_parents_steerer(mode, monkeypatch):
    """num_return_sequences: transformers prefills all but the prompt's last token, forks the request, and queues
    the children that do not fit in the cache to be prefilled from scratch (here after their parent has finished:
    one new token each). Every child generates what its parent does; query mode steers from the anchor on, as
    generate does with the prompt split before its last token."""
    from transformers.generation.continuous_batching.scheduler import Scheduler

    requeued = []
    add_waiting = Scheduler.add_waiting_request
    monkeypatch.setattr(Scheduler, "add_waiting_request",
                        lambda self, state: requeued.append(state.request_id) or add_waiting(self, state))
    model = get_model("llama")
    steerers = steerers_for(model)
    prompts, names = [list(range(5, 17)), list(range(9, 22))], ["mose", "late"]
    config = greedy_config(1)
    config.num_return_sequences = 3
    with torch.no_grad(), patch_model(model, SteererBank(steerers), mode=mode):
        results = model.generate_batch(prompts, generation_config=config, steerers=names, warmup=False,
                                       continuous_batching_config=tight_cache())
    assert any(CHILD in request_id for request_id in requeued), "every child fitted: none was prefilled anew"
    assert len(results) == 6
    assert any(out.lifespan[0] > results[request_id.split(CHILD)[0]].lifespan[1]
               for request_id, out in results.items() if CHILD in request_id), "no child started after its parent"
    for request_id, out in results.items():
        k = int(request_id.split(CHILD)[0][len("req_"):])
        expected = alone(model, steerers, names[k], prompts[k], mode, do_sample=False,
                         prefill_chunk_size=len(prompts[k]) - 1)[0, -NEW_TOKENS]
        assert out.generated_tokens == [expected.item()], (request_id, names[k])


@contextlib.contextmanager
def stepped_manager(model, tokens: int):
    """A continuous-batching manager whose generation loop the test steps itself, in its own thread, so that the
    order of events is fixed: ``step()`` is one turn of the loop (take new requests and cancellations, schedule,
    forward, update)."""
    manager = model.init_continuous_batching(generation_config=greedy_config(tokens),
                                             continuous_batching_config=cb_config())
    processor = manager.batch_processor = manager._create_batch_processor()
    manager.current_batch = 0
    try:
        yield manager, lambda: manager._generation_loop_body(processor, bootstrapping=False)
    finally:
        manager.destroy()
        if manager._original_attn_impl is not None:  # stop() would restore it, but this manager never started
            model.set_attn_implementation(manager._original_attn_impl)


@pytest.mark.parametrize("mode", ["query", "token"])
def test_finished_and_cancelled_requests_are_forgotten(mode):
    """A cancelled request never finishes: its steerer and query-mode slot must go when the scheduler drops it,
    like a finished one's, and new requests reuse the slots."""
    model = get_model("llama")
    steerers = steerers_for(model)
    prompts = prompts_of(4)
    with torch.no_grad(), patch_model(model, SteererBank(steerers), mode=mode) as handle, \
            stepped_manager(model, tokens=30) as (manager, step):
        manager.add_request(prompts[0], request_id="cancelled", steerer="caa")
        manager.add_request(prompts[1], request_id="finished", steerer="mose", max_new_tokens=2)
        step()  # both prefilled
        step()  # "finished" has its two tokens
        manager.cancel_request("cancelled")
        manager.add_request(prompts[2], request_id="new0", steerer="late", max_new_tokens=NEW_TOKENS)
        manager.add_request(prompts[3], request_id="new1", steerer="two-layer", max_new_tokens=NEW_TOKENS)
        step()
        assert handle.continuous.capacity == (2 if mode == "query" else 0)  # the two freed slots taken again
        assert set(handle.continuous.requests) == {"new0", "new1"}
        while manager.batch_processor.has_pending_requests():
            step()
        results = {}
        while (out := manager.get_result(timeout=0)) is not None:
            results[out.request_id] = out
    assert "cancelled" not in results
    for request_id, name, prompt in (("new0", "late", prompts[2]), ("new1", "two-layer", prompts[3])):
        expected = alone(model, steerers, name, prompt, mode, do_sample=False)[0, -NEW_TOKENS:].tolist()
        assert results[request_id].generated_tokens == expected, request_id


def test_request_bookkeeping_keeps_parents_for_children_and_early_chunks_unsteered():
    """The bookkeeping itself, for what a CPU run does not reach reliably: a finished parent stays while a child
    still waits for its delta, and a soft-reset re-prefill leaves unsteered the positions its first prefill left
    unsteered (the chunks before the one holding the anchor)."""
    from types import SimpleNamespace

    from finesteer.patching.continuous import Request, Segment

    model = get_model("llama")
    with patch_model(model, SteererBank(steerers_for(model)), mode="query") as handle:
        steering = handle.continuous
        steering.requests = {"p": Request(steerer=1, children=2, admitted=True, slot=0, steer_from=6),
                             f"p{CHILD}0": Request(steerer=1, admitted=True, slot=1, steer_from=6)}
        steering.capacity = 2
        waiting = SimpleNamespace(active_requests={}, waiting_requests={f"p{CHILD}1": None})
        steering._forget(waiting)  # the parent is done, child 0 too (and had its delta), child 1 waits
        assert set(steering.requests) == {"p"} and steering.free == [1]
        io = SimpleNamespace(input_ids=torch.zeros(1))
        packed = steering._pack([Segment(f"p{CHILD}1", past=0, length=7, ends_prompt=True)], io)
        assert packed.copies == [(0, 1)] and packed.anchor_rows.numel() == 0  # the parent's delta, not a new one
        assert packed.row_slot.tolist() == [-1] * 6 + [1]
        steering._forget(SimpleNamespace(active_requests={f"p{CHILD}1": None}, waiting_requests={}))
        assert set(steering.requests) == {f"p{CHILD}1"} and steering.free == [0]
