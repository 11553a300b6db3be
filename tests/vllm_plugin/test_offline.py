"""The plugin in vLLM's offline engine on SmolLM2 (fp32, greedy), with vLLM's default torch.compile on: every
request equals transformers + patch_model with the same steerer file, a mixed batch equals each request alone,
prefix caching never mixes steerings, and steerers load and unload while the engine runs."""

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

import finesteer.serving.vllm as plugin
from engines import BENIGN, HARMFUL, chat, engine, greedy, reference_tokens, tokens


@pytest.fixture(scope="module")
def steered(smollm2, steerer_files, compile_cache):
    env = {"FINESTEER_VLLM_STEERERS": str(steerer_files), "FINESTEER_VLLM_MODE": "query"}
    with engine(env, compile_cache, model=smollm2[2], max_model_len=512) as llm:
        yield llm


@pytest.fixture(scope="module")
def stock(smollm2, compile_cache):
    """vLLM without the plugin (its general plugin is not in VLLM_PLUGINS)."""
    with engine({}, compile_cache, start_env={"VLLM_PLUGINS": "none"}, model=smollm2[2], max_model_len=512) as llm:
        yield llm


@pytest.fixture(scope="module")
def prompts(smollm2):
    return [chat(smollm2[1], p) for p in HARMFUL[:4] + BENIGN[:4]]


def test_query_mode_equals_patch_model_tokens_and_gates(steered, smollm2, steerer_files, prompts):
    model, tokenizer, _ = smollm2
    outputs = steered.generate(prompts, greedy("safety"))
    gates = {rid.rsplit("-", 1)[0]: g for rid, g in plugin.gate_decisions(steered).items()}  # engine id = id-suffix
    expected = [reference_tokens(model, tokenizer, p, steerer_files / "safety.safetensors") for p in prompts]
    assert tokens(outputs) == [t for t, _ in expected]
    assert [gates[o.request_id] for o in outputs] == [g for _, g in expected]
    assert any(g for _, g in expected) and not all(g for _, g in expected)  # both decisions occur


def test_mixed_batch_equals_each_request_alone(steered, stock, prompts):
    names = ["safety", None, "shift", "mix", None, "safety", "mix", "shift"]
    mixed = tokens(steered.generate(prompts, [greedy(n) for n in names]))
    alone = [tokens(steered.generate([p], greedy(n)))[0] for p, n in zip(prompts, names)]
    assert mixed == alone
    unsteered = [i for i, n in enumerate(names) if n is None]
    stock_out = tokens(stock.generate([prompts[i] for i in unsteered], greedy()))
    assert [mixed[i] for i in unsteered] == stock_out
    ungated = [i for i, n in enumerate(names) if n in ("shift", "mix")]  # these steerers change replies
    plain = tokens(stock.generate([prompts[i] for i in ungated], greedy()))
    assert sum(mixed[i] != p for i, p in zip(ungated, plain)) >= len(ungated) - 1


def test_prefix_cache_separates_steerings_and_shares_unsteered(steered, smollm2):
    story = " ".join(["The old lighthouse keeper climbed the stairs every evening to light the lamp."] * 20)
    prompt = chat(smollm2[1], f"{story} What did the keeper do?")  # several KV blocks long
    runs = {}
    for name in (None, "safety", "shift"):  # each alone, from an empty prefix cache
        steered.reset_prefix_cache()
        runs[name] = tokens(steered.generate([prompt], greedy(name)))[0]
    steered.reset_prefix_cache()
    cached = {}
    for name in (None, None, "safety", "shift", "shift"):
        out = steered.generate([prompt], greedy(name))[0]
        assert list(out.outputs[0].token_ids) == runs[name]
        cached.setdefault(name, []).append(out.num_cached_tokens)
    assert cached[None][1] > 0        # unsteered requests keep sharing blocks
    assert cached["safety"] == [0]    # no steered request reuses the unsteered prompt's blocks
    assert cached["shift"][0] == 0 and cached["shift"][1] > 0  # ... nor another steerer's, but its own


def test_n_samples_and_alpha_override(steered, smollm2, steerer_files, prompts):
    model, tokenizer, _ = smollm2
    two = SamplingParams(n=2, temperature=1.0, top_k=1, max_tokens=greedy().max_tokens, extra_args={"steerer": "shift"})
    out = steered.generate([prompts[5]], two)[0]  # top-k 1: greedy tokens, but vLLM allows n > 1
    alone = tokens(steered.generate([prompts[5]], greedy("shift")))[0]
    assert [list(c.token_ids) for c in out.outputs] == [alone, alone]
    half = tokens(steered.generate([prompts[5]], greedy("shift", alpha=0.5)))[0]
    assert half == reference_tokens(model, tokenizer, prompts[5], steerer_files / "shift.safetensors",
                                    alpha=0.5)[0]
    assert half != alone


def test_unknown_steerer_fails_its_request_only(steered, prompts):
    with pytest.raises(VLLMValidationError, match="unknown steerer 'nope'"):
        steered.generate([prompts[0]], greedy("nope"))
    with pytest.raises(VLLMValidationError, match="alpha"):
        steered.generate([prompts[0]], greedy("shift", alpha=float("nan")))
    assert len(tokens(steered.generate([prompts[1]], greedy("shift")))[0]) > 0


def test_load_and_unload_while_running(steered, smollm2, steerer_files, prompts, tmp_path):
    model, tokenizer, _ = smollm2
    extra = finesteer_steerer_at(steerer_files, tmp_path)
    served = plugin.load_steerer(steered, "extra", extra)
    assert "extra" in served
    got = tokens(steered.generate([prompts[6]], greedy("extra")))[0]
    assert got == reference_tokens(model, tokenizer, prompts[6], extra)[0]
    plugin.unload_steerer(steered, "extra")
    with pytest.raises(VLLMValidationError, match="unknown steerer 'extra'"):
        steered.generate([prompts[6]], greedy("extra"))
    with pytest.raises(Exception, match="does not steer"):  # a layer the engine does not steer
        plugin.load_steerer(steered, "elsewhere", finesteer_steerer_at(steerer_files, tmp_path, layer=3))


def finesteer_steerer_at(steerer_files, folder, layer=10):
    import finesteer

    base = finesteer.Steerer.load(steerer_files / "shift.safetensors")
    moved = finesteer.Steerer(base.params.replace(experts=-base.params.experts), layer=layer)
    path = folder / f"at{layer}.safetensors"
    moved.save(path)
    return path
