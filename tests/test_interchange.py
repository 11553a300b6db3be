"""Control-vector interchange: GGUF round trip, files from the gguf package's own writer, clear errors on malformed
files, {layer: vector} maps, CAST gates, and the repeng-style example against a hand-written repeng hook."""
import os
import runpy
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import finesteer_kernels
from finesteer import Steerer, patching
from finesteer.interop.interchange import (ControlVectorError, caa_steerer, export_gguf, import_cast, import_gguf,
                                   import_vectors)
from finesteer.patching.layers import find_decoder_layers
from op_cases import random_params
from tiny_models import random_ids, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "repeng_style_control.py")
D = 16


def vectors(layers, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(d, generator=g) for layer in layers}


def write_gguf(path, tensors, arch="controlvector", hint="llama", layer_count=None, count_type="uint32"):
    """A file written by the gguf package's own GGUFWriter, the way repeng's export_gguf writes one."""
    writer = gguf.GGUFWriter(str(path), arch)
    if hint is not None:
        writer.add_string(f"{arch}.model_hint", hint)
    if layer_count is not None:
        getattr(writer, f"add_{count_type}")(f"{arch}.layer_count", layer_count)
    for name, array in tensors.items():
        writer.add_tensor(name, np.asarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- GGUF round trip -----------------------------------------------------------------------------------------
def test_export_then_import_round_trips_exactly(tmp_path):
    original = {layer: caa_steerer(v, layer, model_hint="llama") for layer, v in vectors([1, 3, 7]).items()}
    export_gguf(original, tmp_path / "a.gguf")
    imported = import_gguf(tmp_path / "a.gguf")
    assert sorted(imported) == [1, 3, 7]
    for layer, s in imported.items():
        assert (s.layer, s.model, s.method, s.params.alpha) == (layer, "llama", "control_vector", 1.0)
        assert not s.params.has_gate and s.params.num_experts == 1 and not s.params.has_residual
        assert torch.equal(s.params.experts, original[layer].params.experts)
        assert s.metadata["source"]["layer_count"] == 3 and s.metadata["source"]["tensor"] == f"direction.{layer}"
    # and exporting the imported steerers writes the same tensors and keys again
    export_gguf(imported, tmp_path / "b.gguf")
    a, b = gguf.GGUFReader(tmp_path / "a.gguf"), gguf.GGUFReader(tmp_path / "b.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors] == ["direction.1", "direction.3", "direction.7"]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))
    assert {k: f.contents() for k, f in a.fields.items()} == {k: f.contents() for k, f in b.fields.items()}


def test_export_bakes_the_strength_in_and_the_edit_round_trips_bit_exactly(tmp_path):
    p = random_params(D, 0, 1, gamma=0.7, alpha=-2.5, seed=3)  # CAA shape, with a strength and a gamma
    steerer = Steerer(params=p, layer=4, model="qwen2", method="caa")
    export_gguf(steerer, tmp_path / "s.gguf")
    (imported,) = import_gguf(tmp_path / "s.gguf").values()
    assert imported.params.alpha == 1.0
    h = torch.randn(5, 7, D)
    # the reference multiplies and adds in separate fp32 roundings, so baking alpha*gamma into the file is exact
    assert torch.equal(finesteer_kernels.reference.steer(h, imported.params), finesteer_kernels.reference.steer(h, p))
    # the backend in use (Triton kernels where they run) may fuse multiply and add: equal up to one rounding
    assert torch.allclose(finesteer_kernels.steer(h, imported.params), finesteer_kernels.steer(h, p),
                          atol=1e-6, rtol=1e-6)


def test_a_file_from_the_gguf_writer_in_the_repeng_and_llama_cpp_layouts_imports(tmp_path):
    vs = vectors([2, 5], d=D)
    # repeng: string model hint, uint32 layer count
    repeng_file = write_gguf(tmp_path / "repeng.gguf", {f"direction.{k}": v.numpy() for k, v in vs.items()},
                             hint="mistral", layer_count=2)
    # llama.cpp's cvector-generator: int32 layer count, and no model hint when it has none
    llama_file = write_gguf(tmp_path / "llama.gguf", {f"direction.{k}": v.numpy() for k, v in vs.items()},
                            hint=None, layer_count=2, count_type="int32")
    for path, hint in ((repeng_file, "mistral"), (llama_file, None)):
        steerers = import_gguf(path, alpha=3.0, hidden_size=D, num_layers=6)
        assert sorted(steerers) == [2, 5]
        for layer, s in steerers.items():
            assert torch.equal(s.params.experts[0], vs[layer]) and s.model == hint and s.params.alpha == 3.0
            h = torch.randn(4, D)
            assert torch.allclose(finesteer_kernels.steer(h, s.params), h + 3.0 * vs[layer])


@pytest.mark.parametrize("case, tensors, kwargs, error", [
    ("wrong architecture", {"direction.1": np.ones(D, np.float32)}, dict(arch="llama"),
     "not a control vector .*'llama'"),
    ("no tensors", {}, {}, "missing tensors"),
    ("unexpected tensor", {"direction.1": np.ones(D, np.float32), "blk.0.attn_q.weight": np.ones(D, np.float32)},
     {}, "unexpected tensor 'blk.0.attn_q.weight'"),
    ("unparsable layer", {"direction.one": np.ones(D, np.float32)}, {}, "no valid layer index"),
    ("negative layer", {"direction.-2": np.ones(D, np.float32)}, {}, "no valid layer index"),
    ("non-ASCII digit", {"direction.\u00b2": np.ones(D, np.float32)}, {},
     "'direction.\u00b2' has no valid layer index"),
    ("layer zero", {"direction.0": np.ones(D, np.float32)}, {}, "layer index 0 is invalid"),
    ("layer beyond the model", {"direction.6": np.ones(D, np.float32)}, {},
     "index 6 out of range for a model with 6 decoder layers"),
    ("wrong hidden size", {"direction.1": np.ones(D + 1, np.float32)}, {}, f"hidden size {D + 1} does not match .*{D}"),
    ("mixed widths", {"direction.1": np.ones(D, np.float32), "direction.2": np.ones(8, np.float32)},
     dict(check=False), "different sizes"),
    ("not F32", {"direction.1": np.ones(D, np.float16)}, {}, "type F16"),
    ("not 1-D", {"direction.1": np.ones((2, D // 2), np.float32)}, dict(check=False), "expected 1-D"),
    ("twice the same layer", {"direction.1": np.ones(D, np.float32), "direction.01": np.ones(D, np.float32)}, {},
     "layer 1 appears twice"),
])
def test_malformed_files_raise_clear_errors(tmp_path, case, tensors, kwargs, error):
    kwargs = dict(kwargs)
    check = kwargs.pop("check", True)
    path = write_gguf(tmp_path / "bad.gguf", tensors, **kwargs)
    sizes = dict(hidden_size=D, num_layers=6) if check else {}
    with pytest.raises(ControlVectorError, match=error):
        import_gguf(path, **sizes)


def test_not_a_gguf_file_and_missing_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"certainly not a GGUF file" * 4)
    with pytest.raises(ControlVectorError, match="not a readable GGUF file"):
        import_gguf(tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError, match="no control-vector file"):
        import_gguf(tmp_path / "missing.gguf")


def test_import_checks_against_a_model(tmp_path):
    model = tiny_model("llama")  # hidden 64, 3 layers
    path = write_gguf(tmp_path / "v.gguf", {"direction.2": np.ones(64, np.float32)}, hint="llama")
    assert sorted(import_gguf(path, model=model)) == [2]
    with pytest.raises(ControlVectorError, match="hidden size 64 does not match the model's 32"):
        import_gguf(path, model=tiny_model("llama", hidden_size=32, head_dim=8))
    with pytest.raises(ValueError, match="hidden_size: given as 48 but the model has 64"):
        import_gguf(path, model=model, hidden_size=48)
    with pytest.warns(UserWarning, match="model hint 'llama' differs from the model's type 'qwen2'"):
        import_gguf(path, model=tiny_model("qwen2"))


def test_export_refuses_what_a_control_vector_cannot_hold(tmp_path):
    gated = Steerer(params=random_params(D, 2, 1, seed=1), layer=3, model="llama")
    with pytest.raises(ValueError, match="layer 3: has a gate"):
        export_gguf(gated, tmp_path / "x.gguf")
    mose = Steerer(params=random_params(D, 0, 3, residual="relu", seed=1), layer=3, model="llama")
    with pytest.raises(ValueError, match="3 experts, a residual MLP"):
        export_gguf(mose, tmp_path / "x.gguf")
    with pytest.raises(ControlVectorError, match="layer index 0 is invalid"):
        export_gguf(caa_steerer(torch.ones(D), 0, model_hint="llama"), tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="model_hint: the steerers name models"):
        export_gguf(caa_steerer(torch.ones(D), 2), tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="key 5 holds a steerer for layer 2"):
        export_gguf({5: caa_steerer(torch.ones(D), 2, model_hint="llama")}, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


# ---- plain {layer: vector} maps ------------------------------------------------------------------------------
def test_import_vectors_from_dicts_and_safetensors(tmp_path):
    vs = vectors([0, 2])
    from_numpy = import_vectors({k: v.numpy() for k, v in vs.items()}, model_hint="gpt2")  # repeng's directions
    save_file({"direction.0": vs[0], "2": vs[2]}, str(tmp_path / "v.safetensors"))
    from_file = import_vectors(tmp_path / "v.safetensors", alpha=2.0, hidden_size=D, num_layers=3)
    for steerers in (from_numpy, from_file):
        assert sorted(steerers) == [0, 2]
        assert all(torch.equal(steerers[k].params.experts[0], vs[k]) for k in vs)
    assert from_numpy[0].model == "gpt2" and from_file[2].params.alpha == 2.0


@pytest.mark.parametrize("bad, error", [
    ({-1: torch.ones(D)}, "non-negative int"),
    ({"3": torch.ones(D)}, "non-negative int"),
    ({3: torch.ones(D)}, "vectors: index 3 out of range for a model with 3 decoder layers"),
    ({1: torch.ones(D + 2)}, f"hidden size {D + 2} does not match"),
    ({1: torch.ones(2, D)}, "expected a non-empty 1-D vector"),
    ({1: torch.ones(0)}, r"vectors\[1\]: expected a non-empty 1-D vector of the hidden size, got shape \(0,\)"),
    ({1: torch.full((D,), float("nan"))}, "NaN"),
    ({}, "no vectors"),
])
def test_import_vectors_rejects_bad_maps(bad, error):
    with pytest.raises(ControlVectorError, match=error):
        import_vectors(bad, hidden_size=D, num_layers=3)


def test_import_vectors_rejects_badly_named_safetensors(tmp_path):
    for name in ("layer_two", "direction.\u00b2", "\u0663"):  # '²' and Arabic-Indic 3 pass str.isdigit
        save_file({name: torch.ones(D)}, str(tmp_path / "v.safetensors"))
        with pytest.raises(ControlVectorError, match=f"'{name}' is not named by a layer index"):
            import_vectors(tmp_path / "v.safetensors")


def test_a_zero_length_vector_is_named_without_a_model():
    with pytest.raises(ControlVectorError, match=r"vectors\[2\]: expected a non-empty 1-D vector"):
        import_vectors({2: np.zeros(0, np.float32)})


def test_corrupt_gguf_bytes_raise_control_vector_errors_naming_the_file(tmp_path):
    """Random byte flips (seeded) anywhere in a valid file: every outcome is a clean import or a
    ControlVectorError that names the file, never a bare decoding or indexing error."""
    import random

    good = write_gguf(tmp_path / "good.gguf", {f"direction.{i}": np.full(D, i, np.float32) for i in (1, 2)},
                      layer_count=2).read_bytes()
    rng = random.Random(0)
    outcomes = {"imported": 0, "refused": 0}
    for trial in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(4, len(data) if trial % 2 else 256)] = rng.randrange(256)  # odd: anywhere
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(bytes(data))
        try:
            import_gguf(bad)
            outcomes["imported"] += 1
        except ControlVectorError as e:
            assert str(bad) in str(e)
            outcomes["refused"] += 1
    assert min(outcomes.values()) > 10, outcomes


# ---- CAST ----------------------------------------------------------------------------------------------------
def rows_with_cosines(u: torch.Tensor, cosines: torch.Tensor, seed: int) -> torch.Tensor:
    """float64 rows whose cosine with ``u`` is exactly (up to rounding) each of ``cosines``, at random scales."""
    g = torch.Generator().manual_seed(seed)
    unit = u.double() / u.double().norm()
    other = torch.randn(len(cosines), u.shape[0], generator=g, dtype=torch.float64)
    other = other - (other @ unit)[:, None] * unit
    other = other / other.norm(dim=1, keepdim=True)
    scale = torch.exp(torch.randn(len(cosines), 1, generator=g, dtype=torch.float64) * 2)
    sines = (1 - cosines.square()).clamp_min(0).sqrt()
    return scale * (cosines[:, None] * unit + sines[:, None] * other)


@pytest.mark.parametrize("threshold", [0.0, 0.35, 0.8, 0.99])
def test_cast_gate_decides_exactly_as_abs_cosine_reaches_threshold(threshold):
    d = 48
    g = torch.Generator().manual_seed(7)
    u, v = torch.randn(d, generator=g) * 3, torch.randn(d, generator=g)
    steerer = import_cast(u, v, threshold, layer=5, alpha=1.5, model_hint="llama")
    assert steerer.method == "cast" and steerer.params.tau == pytest.approx(threshold ** 2)
    assert steerer.params.mean is None and steerer.params.r == 1
    # random rows (cosines near 0 in 48-d), rows spread over [-1, 1] with both signs, and rows just either side
    cosines = torch.cat([torch.linspace(-1, 1, 81, dtype=torch.float64),
                         torch.tensor([threshold - 0.01, threshold + 0.01, -threshold - 0.01, -threshold + 0.01],
                                      dtype=torch.float64).clamp(-1, 1)])
    h64 = torch.cat([torch.randn(40, d, generator=g, dtype=torch.float64), rows_with_cosines(u, cosines, seed=8)])
    h = h64.float()
    # CAST's own similarity, cos(h, P h) with P the projector onto u, in float64 from the fp32 rows
    P = torch.outer(u.double(), u.double()) / (u.double() @ u.double())
    Ph = h.double() @ P
    cast_similarity = (h.double() * Ph).sum(1) / (h.double().norm(dim=1) * Ph.norm(dim=1))
    abs_cos = (h.double() @ u.double()).abs() / (h.double().norm(dim=1) * u.double().norm())
    defined = abs_cos > 1e-6  # CAST's cosine is 0/0 where P h = 0
    assert torch.allclose(cast_similarity[defined], abs_cos[defined], atol=1e-9)
    margin = (abs_cos - threshold).abs() > 1e-4  # leave out rows that fp32 rounding could put either side
    assert margin.sum() >= len(h) - 3
    expected = abs_cos >= threshold
    out = finesteer_kernels.steer(h, steerer.params)
    changed = (out != h).any(dim=1)
    assert torch.equal(changed[margin], expected[margin])
    assert expected[margin].any() and (threshold == 0.0 or (~expected[margin]).any())
    coef = finesteer_kernels.synthesize(h, steerer.params)
    assert torch.equal((coef[:, 0] != 0)[margin], expected[margin])
    on = expected & margin
    assert torch.allclose(out[on], h[on] + 1.5 * v, atol=1e-5, rtol=1e-5)


def test_cast_rejects_bad_input():
    u, v = torch.randn(D), torch.randn(D)
    for threshold in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="threshold: a cosine magnitude"):
            import_cast(u, v, threshold, layer=1)
    with pytest.raises(ValueError, match="condition: the zero vector"):
        import_cast(torch.zeros(D), v, 0.5, layer=1)
    with pytest.raises(ControlVectorError, match="behavior: hidden size 8 does not match"):
        import_cast(u, torch.randn(8), 0.5, layer=1)


# ---- the repeng-style example and repeng's semantics ---------------------------------------------------------
def repeng_hook(vector: torch.Tensor, coeff: float, mask: torch.Tensor):
    """repeng's documented semantics by hand: add coeff * vector to the layer output at every non-padding position."""
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        edited = h + coeff * vector * mask[:, :, None].to(h.dtype)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited
    return hook


def left_padded_batch(arch_seed=0):
    ids = random_ids(3, 9, seed=arch_seed)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 6)):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def hand_hooked_logits(model, vs, coeff, ids, mask):
    layers = find_decoder_layers(model)
    handles = [layers[k].register_forward_hook(repeng_hook(v, coeff, mask)) for k, v in vs.items()]
    try:
        with torch.no_grad():
            return model(ids, attention_mask=mask).logits
    finally:
        for handle in handles:
            handle.remove()


def test_example_runs_and_reports_a_working_control(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [EXAMPLE])
    runpy.run_path(EXAMPLE, run_name="__main__")
    out = capsys.readouterr().out
    assert "GGUF round trip of layers [1, 2]: exact" in out
    assert "on padding 0\n" in out  # padding positions untouched
    lines = {line.split(":")[0]: line for line in out.splitlines() if line.startswith("generate")}
    assert lines["generate, coeff=+0"].split(":", 1)[1] != lines["generate, coeff=+4"].split(":", 1)[1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_example_control_model_equals_a_hand_written_repeng_hook(arch):
    ControlModel = runpy.run_path(EXAMPLE)["ControlModel"]
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    vs = vectors([1, 2], d=64, seed=4)
    steerers = import_vectors(vs)
    control_model = ControlModel(model, [-2, -1])
    try:
        with torch.no_grad():
            base = control_model(ids, attention_mask=mask).logits
            control_model.set_control(steerers, coeff=-3.0)
            out = control_model(ids, attention_mask=mask, output_hidden_states=True)
            ours = out.logits
            control_model.reset()
            assert torch.equal(control_model(ids, attention_mask=mask).logits, base)
    finally:
        control_model.unwrap()
    expected = hand_hooked_logits(model, vs, -3.0, ids, mask)
    real = mask.bool()
    assert (expected - base)[real].abs().max() > 1e-2  # the control does something
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[~real], base[~real])  # padding positions stay untouched
    # hooks run before transformers' recording hooks: the recorded output of layer 1 (the first steered one, so
    # its input is unchanged) is the plain output plus exactly the control
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    edit = out.hidden_states[2] - plain[2]
    assert torch.allclose(edit[real], (-3.0 * vs[1]).expand(int(real.sum()), -1), atol=1e-5)
    assert torch.equal(edit[~real], torch.zeros_like(edit[~real]))


@pytest.mark.parametrize("mode", ["query", "token"])
def test_patch_model_with_an_imported_control_vector_equals_the_hand_written_hook(tmp_path, mode):
    model = tiny_model("llama")
    vs = vectors([1, 2], d=64, seed=5)
    export_gguf(import_vectors(vs, model_hint="llama"), tmp_path / "v.gguf")
    steerers = import_gguf(tmp_path / "v.gguf", model=model, alpha=2.0)
    ids, mask = left_padded_batch()
    expected = hand_hooked_logits(model, vs, 2.0, ids, mask)
    with patching.patch_model(model, steerers, mode=mode):
        with torch.no_grad():
            ours = model(ids, attention_mask=mask).logits
    real = mask.bool()  # padding positions' logits are not compared: no real token attends to them
    assert torch.allclose(ours[real], expected[real], atol=1e-5, rtol=1e-5)
