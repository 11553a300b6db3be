"""Models spread over devices: transformers tensor parallelism (``tp_plan="auto"`` under torchrun, 2 processes,
gloo on the CPU) and ``device_map`` placements give the single-process steered tokens and logits with a
`SteererBank` in both modes. Several GPUs are not available here: a device_map that spreads layers over GPUs is
documented in docs/serving.md, and the placement logic (each layer's bank on that layer's device) is checked with
stubbed devices."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finesteer import Steerer, SteererBank, patch_model
from op_cases import random_params
from tiny_models import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = torch.tensor([[5, 17, 33, 9, 41], [7, 7, 19, 3, 60], [11, 90, 4, 25, 8]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved with save_pretrained and two steerer files (layers 1 and 2)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.save_pretrained(folder)
    files = []
    for name, layer, seed, kw in (("mose", 1, 1, dict(r=0, K=4, residual="relu", m=6, k=3)),
                                  ("caa", 2, 2, dict(r=0, K=1))):
        params = random_params(64, seed=seed, gamma=1.0, alpha=4.0, **kw)
        path = folder / f"{name}.safetensors"
        Steerer(params=params, layer=layer).save(path)
        files.append(str(path))
    return folder, files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bank_generate(model, files) -> dict:
    steerers = {os.path.basename(p).split(".")[0]: Steerer.load(p) for p in files}
    out = {}
    for mode in ("query", "token"):
        with torch.no_grad(), patch_model(model, SteererBank(steerers), mode=mode) as handle:
            handle.assign(list(steerers) + [None])
            gen = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
            out["layers"] = {layer: handle.params(layer).device for layer in handle.layers}
        out[f"{mode}_tokens"], out[f"{mode}_logits"] = gen.sequences, torch.stack(gen.logits, 1)
    return out


def test_tensor_parallel_two_processes_equal_one(saved, tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("FINESTEER_BACKEND", "torch")
    folder, files = saved
    single = bank_generate(AutoModelForCausalLM.from_pretrained(folder).eval(), files)
    out = tmp_path / "tp.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", FINESTEER_BACKEND="torch", PYTHONPATH=ROOT,
               MASTER_ADDR="127.0.0.1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()),
                           os.path.join(ROOT, "tests", "tp_worker.py"), str(folder), ",".join(files), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tp = load_file(out)
    for mode in ("query", "token"):
        assert torch.equal(tp[f"{mode}_tokens"], single[f"{mode}_tokens"]), mode
        torch.testing.assert_close(tp[f"{mode}_logits"], single[f"{mode}_logits"], rtol=1e-4, atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        unsteered = plain.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False)
    assert not torch.equal(unsteered[:2], single["query_tokens"][:2]), "the steerers must change the steered rows"
    assert torch.equal(unsteered[2], single["query_tokens"][2])


def test_device_map_placement(saved, monkeypatch):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("FINESTEER_BACKEND", "torch")
    folder, files = saved
    single = bank_generate(AutoModelForCausalLM.from_pretrained(folder).eval(), files)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" for i in range(3)}}
    mapped = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map).eval()
    assert all(p.device.type == "cpu" for p in mapped.parameters())  # (a one-device map sets no hf_device_map)
    spread = bank_generate(mapped, files)
    assert spread["layers"] == {1: torch.device("cpu"), 2: torch.device("cpu")}
    for mode in ("query", "token"):
        assert torch.equal(spread[f"{mode}_tokens"], single[f"{mode}_tokens"]), mode


def test_each_layer_bank_is_packed_for_its_own_layers_device(saved, monkeypatch):
    """The CPU is the only device here, so the placement is stubbed: layer 1 'on' the CPU, layer 2 on the meta device
    (tensors there have shapes and a device but no data). Each layer's steerers must be prepared, indexed and warmed
    on the device its own layer module reports, which a bank packed once for the whole model, or with another layer's
    placement, would not be."""
    from finesteer.patching import bank as bank_module

    folder, files = saved
    steerers = SteererBank({os.path.basename(p).split(".")[0]: Steerer.load(p) for p in files})
    model = tiny_model("llama")
    layer_modules = bank_module.find_decoder_layers(model)
    devices = {1: torch.device("cpu"), 2: torch.device("meta")}
    asked, prepared, warmed = [], [], []

    def stub_placement(layer, index):
        asked.append((layer, index))
        return devices[index], torch.float32

    def spy_prepare(params, device, dtype, alpha):  # records the device, prepares on the CPU (meta has no data)
        prepared.append((params, device))
        return real_prepare(params, torch.device("cpu"), dtype, alpha)

    real_prepare = bank_module.prepare
    monkeypatch.setattr(bank_module, "prepare", spy_prepare)
    monkeypatch.setattr(bank_module, "_warm", lambda bank, device, dtype: warmed.append((bank, device)))
    sites = bank_module._layer_banks(steerers, layer_modules, 64, None, stub_placement)
    assert asked == [(layer_modules[i], i) for i in (1, 2)]
    for layer, site in sites.items():
        wanted = {id(params) for params in (steerers.sites[name].get(layer) for name in steerers.names)
                  if params is not None}
        assert {id(params) for params, device in prepared if device == devices[layer]} == wanted, layer
        assert site.local_of.device == devices[layer]
        assert [device for bank, device in warmed if bank is site.bank] == [devices[layer]]
