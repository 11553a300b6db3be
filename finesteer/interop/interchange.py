"""Vectors from other steering tools as FineSteer `Steerer`s, and control vectors back out.

- GGUF control vectors, the layout llama.cpp reads (``--control-vector``) and llama.cpp's cvector-generator and
  repeng's ``ControlVector.export_gguf`` write: ``general.architecture = "controlvector"``,
  ``controlvector.model_hint`` (a string), ``controlvector.layer_count`` (an integer) and one 1-D F32 tensor
  ``direction.<layer>`` per steered layer: `import_gguf`, `export_gguf`.
- Plain ``{layer: vector}`` maps, from a dict (repeng's ``ControlVector.directions``, steering-vectors'
  ``SteeringVector.layer_activations``, your own) or a safetensors file: `import_vectors`.
- CAST (IBM activation-steering): a condition direction with a threshold plus a behaviour vector: `import_cast`.

Every vector becomes a CAA steerer: one expert, no router, no residual and (except CAST) no gate, so the op adds
``alpha * vector`` to every row, which is what llama.cpp and repeng do.

Layer index, one convention for every format here: layer ``N`` is the output of decoder layer ``N`` counted from 0
in `patching.layers.find_decoder_layers` (the residual stream after block ``N``), which is what ``Steerer.layer``
means. The formats agree with it, no shift:

- llama.cpp keeps ``direction.N`` in ``tensors[N]`` of its control-vector adapter (``src/llama-adapter.cpp``) and
  adds ``tensors[il]`` with ``build_cvec(cur, il)`` right after the last residual add of block ``il`` (0-based), the
  tensor it names ``l_out``. Its loader (``common_control_vector_load_one``) rejects ``direction.0``: the output of
  block 0 cannot be steered by a llama.cpp control vector, so `export_gguf` refuses layer 0 and `import_gguf` treats
  ``direction.0`` as a malformed file, as llama.cpp does.
- repeng reads ``directions[N]`` from ``hidden_states[N + 1]``, the output of ``model.layers[N]``; its
  ``ControlModel`` adds it to the output of ``model.layers[N]``; ``export_gguf`` writes it as ``direction.N``.

The files hold no strength: llama.cpp scales by ``--control-vector-scaled FILE S`` and repeng by ``coeff`` at use.
Importing sets ``alpha`` (default 1); exporting writes the vector the steerer adds, ``alpha * gamma * v`` in fp32,
so any reader with strength 1 adds exactly what FineSteer adds.
"""
from __future__ import annotations

import os
import struct
import warnings
from typing import Iterable, Mapping, NamedTuple, Optional, Union

import numpy as np
import torch

from finesteer_kernels import SteerParams

from ..patching.layers import check_layer_index
from ..steerer import Steerer

ARCHITECTURE = "controlvector"
MODEL_HINT_KEY = f"{ARCHITECTURE}.model_hint"
LAYER_COUNT_KEY = f"{ARCHITECTURE}.layer_count"
TENSOR_PREFIX = "direction."
LAYER_CONVENTION = ("layer N = output of decoder layer N (0-based), as llama.cpp's direction.N and repeng's "
                    "directions[N]")

VectorLike = Union[torch.Tensor, np.ndarray]


class ControlVectorError(ValueError):
    """A control-vector or vector file that cannot be imported: not GGUF/safetensors, wrong architecture, missing
    or unexpected tensors, a bad layer index, or a hidden size that does not match."""


# ---- shared checks -------------------------------------------------------------------------------------------
def _model_shape(model, hidden_size: Optional[int], num_layers: Optional[int]) -> tuple[Optional[int], Optional[int]]:
    """Hidden size and layer count to check against, from ``model`` (a transformers model) or given directly."""
    if model is None:
        return hidden_size, num_layers
    from ..patching.layers import find_decoder_layers
    from ..patching.layers import hidden_size as model_hidden_size

    d, n = model_hidden_size(model), len(find_decoder_layers(model))
    for name, given, actual in (("hidden_size", hidden_size, d), ("num_layers", num_layers, n)):
        if given is not None and given != actual:
            raise ValueError(f"{name}: given as {given} but the model has {actual}; pass one or the other")
    return d, n


def _model_type(model) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def _check_model_hint(hint: Optional[str], model, where: str) -> None:
    model_type = _model_type(model)
    if hint and model_type and hint != model_type:
        # llama.cpp ignores the hint and repeng only stores it, so a mismatch is worth a warning, not a refusal;
        # the hidden size is what is checked strictly.
        warnings.warn(f"{where}: model hint {hint!r} differs from the model's type {model_type!r}", stacklevel=3)


def _check_layer(layer: int, num_layers: Optional[int], where: str, allow_zero: bool = True) -> int:
    layer = check_layer_index(layer, num_layers, where, error=ControlVectorError)
    if layer == 0 and not allow_zero:
        raise ControlVectorError(f"{where}: layer index 0 is invalid in a GGUF control vector (llama.cpp rejects "
                                 "direction.0: it never steers the output of block 0)")
    return layer


def _layer_of(text: str) -> Optional[int]:
    """The layer index a tensor name's suffix spells in ASCII digits ('12'), else None (``str.isdigit`` also
    accepts digits such as '²' that ``int`` cannot read)."""
    return int(text) if text.isascii() and text.isdigit() else None


def _as_vector(value: VectorLike, where: str, hidden_size: Optional[int]) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.array(value))  # a copy: GGUF data is a read-only memmap
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor or numpy array, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{where}: expected floating-point values, got dtype {value.dtype}")
    if value.dim() != 1 or value.numel() == 0:
        raise ControlVectorError(f"{where}: expected a non-empty 1-D vector of the hidden size, got shape "
                                 f"{tuple(value.shape)}")
    if hidden_size is not None and value.shape[0] != hidden_size:
        raise ControlVectorError(f"{where}: hidden size {value.shape[0]} does not match the model's {hidden_size}")
    if not torch.isfinite(value).all():
        raise ControlVectorError(f"{where}: contains NaN or infinite values")
    return value.detach()


def _same_width(vectors: Mapping[int, torch.Tensor], where: str) -> None:
    widths = {layer: v.shape[0] for layer, v in vectors.items()}
    if len(set(widths.values())) > 1:
        raise ControlVectorError(f"{where}: vectors of different sizes {widths}; one model has one hidden size")


# ---- building blocks -----------------------------------------------------------------------------------------
def caa_params(vector: VectorLike, alpha: float = 1.0) -> SteerParams:
    """The op's parameters for adding ``alpha * vector`` to every row: one expert, no gate, no router."""
    return SteerParams(experts=_as_vector(vector, "vector", None)[None], alpha=alpha)


def caa_steerer(vector: VectorLike, layer: int, *, alpha: float = 1.0, model_hint: Optional[str] = None,
                method: str = "caa", metadata: Optional[dict] = None) -> Steerer:
    """A `Steerer` that adds ``alpha * vector`` at the output of decoder layer ``layer`` (0-based)."""
    return Steerer(params=caa_params(vector, alpha), layer=layer, model=model_hint, method=method,
                   metadata=dict(metadata or {}))


def control_vector_of(steerer: Steerer) -> torch.Tensor:
    """The fp32 vector a CAA-shaped steerer adds to every row (``alpha * gamma * v``), exactly as the op adds it.

    Raises ``ValueError`` for steerers a control vector cannot express (a gate, several experts, a residual)."""
    p = steerer.params
    problems = [what for what, present in (("a gate (basis)", p.has_gate), (f"{p.num_experts} experts",
                p.num_experts > 1), ("a residual MLP", p.has_residual)) if present]
    if problems:
        raise ValueError(f"steerer at layer {steerer.layer}: has {', '.join(problems)}; a control vector adds one "
                         "fixed vector to every row, so only ungated single-expert steerers can be exported")
    # the op multiplies the fp32 expert row by the fp32 scale alpha*gamma: the same single product here
    scale = torch.tensor(p.alpha * p.gamma, dtype=torch.float32)
    vector = p.experts[0].float().cpu()
    return vector if scale == 1 else vector * scale


# ---- plain {layer: vector} maps ------------------------------------------------------------------------------
def _read_safetensors_vectors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ControlVectorError(f"{path}: not a safetensors file ({e})") from None
    vectors = {}
    for name, tensor in tensors.items():
        layer = _layer_of(name[len(TENSOR_PREFIX):] if name.startswith(TENSOR_PREFIX) else name)
        if layer is None:
            raise ControlVectorError(f"{path}: tensor {name!r} is not named by a layer index ('12' or "
                                     f"'{TENSOR_PREFIX}12')")
        if layer in vectors:
            raise ControlVectorError(f"{path}: layer {layer} appears twice (tensor {name!r})")
        vectors[layer] = tensor
    return vectors


def import_vectors(vectors: Union[Mapping[int, VectorLike], str, os.PathLike], *, alpha: float = 1.0,
                   model_hint: Optional[str] = None, model=None, hidden_size: Optional[int] = None,
                   num_layers: Optional[int] = None, method: str = "caa") -> dict[int, Steerer]:
    """``{layer: vector}`` (a dict, or a safetensors file whose tensors are named ``"12"`` or ``"direction.12"``) ->
    ``{layer: Steerer}`` adding ``alpha * vector`` at the output of decoder layer ``layer`` (0-based; layer 0 is
    allowed here). Pass ``model`` (or ``hidden_size`` / ``num_layers``) to check sizes and layer indices; the model
    hint then defaults to ``model.config.model_type``."""
    d, n = _model_shape(model, hidden_size, num_layers)
    if isinstance(vectors, (str, os.PathLike)):
        source = {"format": "safetensors {layer: vector}", "file": os.path.basename(os.fspath(vectors))}
        raw = _read_safetensors_vectors(os.fspath(vectors))
        where = os.fspath(vectors)
    elif isinstance(vectors, Mapping):
        source = {"format": "{layer: vector} mapping"}
        raw, where = dict(vectors), "vectors"
    else:
        raise TypeError(f"vectors: expected a {{layer: vector}} mapping or a safetensors path, got "
                        f"{type(vectors).__name__}")
    if not raw:
        raise ControlVectorError(f"{where}: no vectors")
    checked = {}
    for layer, value in raw.items():
        layer = _check_layer(layer, n, where)
        checked[layer] = _as_vector(value, f"{where}[{layer}]", d)
    _same_width(checked, where)
    _check_model_hint(model_hint, model, where)
    model_hint = model_hint or _model_type(model)
    return {layer: caa_steerer(checked[layer], layer, alpha=alpha, model_hint=model_hint, method=method,
                               metadata={"source": {**source, "layer_convention": LAYER_CONVENTION}})
            for layer in sorted(checked)}


# ---- GGUF control vectors ------------------------------------------------------------------------------------
class _GGUFTensor(NamedTuple):
    name: str
    type_name: str
    is_f32: bool
    shape: tuple
    data: np.ndarray


def _read_gguf(path: str) -> tuple[dict, list]:
    """``({key: value} of the control-vector keys, [_GGUFTensor])``, read eagerly: the gguf reader decodes some
    values lazily, so a corrupt file would otherwise fail later with an error that does not name it."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no control-vector file at {path!r}")
    try:
        reader = gguf.GGUFReader(path)
        fields = {}
        for key in ("general.architecture", MODEL_HINT_KEY, LAYER_COUNT_KEY):
            field = reader.get_field(key)
            if field is not None:
                fields[key] = field.contents()
        tensors = [_GGUFTensor(t.name, t.tensor_type.name, t.tensor_type == gguf.GGMLQuantizationType.F32,
                               tuple(int(s) for s in t.shape), t.data) for t in reader.tensors]
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError, struct.error) as e:
        # ValueError includes UnicodeDecodeError (a corrupt string)
        raise ControlVectorError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    return fields, tensors


def _parse_direction_name(name: str, path: str) -> int:
    text = name[len(TENSOR_PREFIX):] if name.startswith(TENSOR_PREFIX) else None
    if text is None:
        raise ControlVectorError(f"{path}: unexpected tensor {name!r}; a control vector holds only "
                                 f"'{TENSOR_PREFIX}<layer>' tensors")
    layer = _layer_of(text)
    if layer is None:
        raise ControlVectorError(f"{path}: tensor {name!r} has no valid layer index (expected "
                                 f"'{TENSOR_PREFIX}<non-negative int>')")
    return layer


def import_gguf(path: Union[str, os.PathLike], *, alpha: float = 1.0, model=None, hidden_size: Optional[int] = None,
                num_layers: Optional[int] = None) -> dict[int, Steerer]:
    """Read a GGUF control vector (llama.cpp / repeng layout) -> ``{layer: Steerer}``, one CAA steerer per
    ``direction.<layer>`` tensor, adding ``alpha * direction`` at the output of decoder layer ``layer`` (0-based).

    Pass ``model`` (a transformers model) or ``hidden_size`` / ``num_layers`` to check the vector width and layer
    indices. Raises `ControlVectorError` naming the problem for a file that is not a control vector (wrong
    architecture), has no or unexpected tensors, a bad layer index (0, not an int, beyond the model), non-F32 or
    non-1-D tensors, or a width that differs between tensors or from the model. ``controlvector.layer_count`` is
    kept in the metadata but not enforced: llama.cpp does not read it and writers fill it differently.
    """
    path = os.fspath(path)
    d, n = _model_shape(model, hidden_size, num_layers)
    fields, tensors = _read_gguf(path)
    arch = fields.get("general.architecture")
    if arch != ARCHITECTURE:
        found = "no general.architecture" if arch is None else f"general.architecture = {arch!r}"
        raise ControlVectorError(f"{path}: not a control vector ({found}, expected {ARCHITECTURE!r})")
    hint = fields.get(MODEL_HINT_KEY)
    layer_count = fields.get(LAYER_COUNT_KEY)
    if hint is not None and not isinstance(hint, str):
        raise ControlVectorError(f"{path}: {MODEL_HINT_KEY} must be a string, got {hint!r}")
    if layer_count is not None and (not isinstance(layer_count, (int, np.integer)) or isinstance(layer_count, bool)):
        raise ControlVectorError(f"{path}: {LAYER_COUNT_KEY} must be an integer, got {layer_count!r}")
    if not tensors:
        raise ControlVectorError(f"{path}: missing tensors: a control vector needs at least one "
                                 f"'{TENSOR_PREFIX}<layer>' tensor, the file has none")
    vectors: dict[int, torch.Tensor] = {}
    for tensor in tensors:
        layer = _parse_direction_name(tensor.name, path)
        where = f"{path}: tensor {tensor.name!r}"
        _check_layer(layer, n, where, allow_zero=False)
        if layer in vectors:
            raise ControlVectorError(f"{where}: layer {layer} appears twice")
        if not tensor.is_f32:
            raise ControlVectorError(f"{where}: type {tensor.type_name}, llama.cpp reads only F32 directions")
        if len(tensor.shape) != 1:
            raise ControlVectorError(f"{where}: shape {tensor.shape}, expected 1-D")
        vectors[layer] = _as_vector(np.asarray(tensor.data, dtype=np.float32), where, d)
    _same_width(vectors, path)
    _check_model_hint(hint, model, path)
    source = {"format": "gguf control vector (llama.cpp / repeng)", "file": os.path.basename(path),
              "model_hint": hint, "layer_count": None if layer_count is None else int(layer_count),
              "layer_convention": LAYER_CONVENTION}
    return {layer: caa_steerer(vectors[layer], layer, alpha=alpha, model_hint=hint, method="control_vector",
                               metadata={"source": {**source, "tensor": f"{TENSOR_PREFIX}{layer}"}})
            for layer in sorted(vectors)}


def _as_steerer_dict(steerers) -> dict[int, Steerer]:
    if isinstance(steerers, Steerer):
        return {steerers.layer: steerers}
    if isinstance(steerers, Mapping):
        for key, s in steerers.items():
            if not isinstance(s, Steerer):
                raise TypeError(f"steerers[{key!r}]: expected a finesteer.Steerer, got {type(s).__name__}")
            if key != s.layer:
                raise ValueError(f"steerers: key {key!r} holds a steerer for layer {s.layer}; keys are layers")
        return dict(steerers)
    items = list(steerers) if isinstance(steerers, Iterable) else None
    if not items or not all(isinstance(s, Steerer) for s in items):
        raise TypeError("steerers: expected a Steerer, a {layer: Steerer} dict or a list of Steerers")
    out = {}
    for s in items:
        if s.layer in out:
            raise ValueError(f"steerers: two steerers for layer {s.layer}; a control vector has one per layer")
        out[s.layer] = s
    return out


def export_gguf(steerers, path: Union[str, os.PathLike], *, model_hint: Optional[str] = None) -> None:
    """Write CAA steerers (``{layer: Steerer}``, a list, or one) as a GGUF control vector llama.cpp and repeng read.

    ``direction.<layer>`` holds ``alpha * gamma * v`` in fp32, so a reader with strength 1 adds what the steerer
    adds. ``model_hint`` defaults to the steerers' ``model``. Layer 0 cannot be written (llama.cpp rejects
    ``direction.0``); gated, multi-expert or residual steerers raise ``ValueError``.
    """
    import gguf

    by_layer = _as_steerer_dict(steerers)
    if not by_layer:
        raise ValueError("steerers: nothing to export")
    vectors = {}
    for layer in sorted(by_layer):
        _check_layer(layer, None, f"steerers[{layer}]", allow_zero=False)
        vectors[layer] = control_vector_of(by_layer[layer])
    _same_width(vectors, "steerers")
    if model_hint is None:
        hints = {s.model for s in by_layer.values()}
        if len(hints) != 1 or None in hints:
            raise ValueError(f"model_hint: the steerers name models {sorted(map(str, hints))}; pass model_hint= "
                             "(e.g. model.config.model_type) to say which model the file is for")
        model_hint = hints.pop()
    writer = gguf.GGUFWriter(os.fspath(path), ARCHITECTURE)
    writer.add_string(MODEL_HINT_KEY, model_hint)
    # the number of direction tensors, as llama.cpp's cvector-generator and repeng both write it
    writer.add_uint32(LAYER_COUNT_KEY, len(vectors))
    for layer, vector in vectors.items():
        writer.add_tensor(f"{TENSOR_PREFIX}{layer}", vector.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- CAST ----------------------------------------------------------------------------------------------------
def import_cast(condition: VectorLike, behavior: VectorLike, threshold: float, layer: int, *, alpha: float = 1.0,
                model_hint: Optional[str] = None, model=None, hidden_size: Optional[int] = None,
                metadata: Optional[dict] = None) -> Steerer:
    """A CAST condition direction + behaviour vector -> one gated `Steerer` at the output of decoder layer ``layer``.

    CAST steers when ``cos(h, P h) >= threshold`` with ``P`` the projector onto the condition direction ``u``.
    For one direction ``cos(h, P h) = ||P h|| / ||h|| = |cos(h, u)|``, so the gate is the op's with
    ``basis = u / ||u||``, ``mean = None`` and ``tau = threshold ** 2``. CAST's public code also applies ``tanh``
    elementwise to ``P h`` before the cosine, which makes its decision depend on the scale of ``h``; the op follows
    the paper's plain ``cos(h, P h)`` instead. The threshold must lie in [0, 1] (a cosine magnitude). Only CAST's
    "steer when the similarity reaches the threshold" side is expressible; the op has no "below threshold" gate.

    Layer: CAST extracts vectors from ``hidden_states[L + 1]`` (output of layer L) but its LeashLayer applies them
    to the *input* of layer L (output of layer L - 1). FineSteer reads and writes at one site: pass ``layer=L`` to
    use them where they were measured, ``layer=L - 1`` to reproduce CAST's application site.
    """
    d, n = _model_shape(model, hidden_size, None)
    _check_layer(layer, n, "layer")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: a cosine magnitude |cos(h, u)| in [0, 1], got {threshold!r} (below 0 CAST "
                         "would always steer, above 1 never)")
    u = _as_vector(condition, "condition", d).double()
    v = _as_vector(behavior, "behavior", u.shape[0])
    norm = torch.linalg.vector_norm(u)
    if norm == 0:
        raise ValueError("condition: the zero vector has no direction")
    params = SteerParams(experts=v[None].float(), basis=(u / norm).float()[:, None], mean=None,
                         tau=float(threshold) ** 2, alpha=alpha)
    _check_model_hint(model_hint, model, "import_cast")
    model_hint = model_hint or _model_type(model)
    source = {"format": "CAST condition + behaviour", "threshold": float(threshold),
              "gate": "|cos(h, u)| >= threshold, as ||S^T h||^2 / ||h||^2 >= threshold^2"}
    return Steerer(params=params, layer=layer, model=model_hint, method="cast",
                   metadata={"source": source, **(metadata or {})})
