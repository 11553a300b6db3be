"""`Steerer`: a fitted steerer (op parameters + where it applies + how it was fitted) and its file format.

A steerer file is one safetensors file: the `SteerParams` tensors under their field names, and in the header's
``__metadata__`` one JSON string under ``"finesteer"`` holding the format version, the scalars, the site, the fit
metadata and SHA-256 digests of each tensor's stored bytes and of the rest of that header, which `Steerer.load`
checks (safetensors itself has no checksum: flipped bytes would load as different numbers). Files written before
the digests load with a note in ``metadata["integrity"]``. Loading never unpickles anything.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from finesteer_kernels import SteerParams
from finesteer_kernels.params import HIDDEN_AXIS, SCALAR_FIELDS, STORABLE_DTYPES, TENSOR_FIELDS

from .files import apply_umask

FORMAT_NAME = "finesteer"
FORMAT_VERSION = 1
INTEGRITY_NOTE = "integrity"  # metadata key of the note a file without digests gets at load (dropped at save)


class SteererFileError(ValueError):
    """A steerer file that cannot be loaded: not safetensors, wrong format version, missing or bad tensors."""


def _versions() -> dict:
    import finesteer_kernels

    versions = {"finesteer": finesteer_kernels.__version__, "torch": torch.__version__,
                "python": platform.python_version()}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    return versions


@dataclasses.dataclass
class Steerer:
    """A fitted steerer.

    Attributes:
        params: the op's parameters (`finesteer_kernels.SteerParams`).
        layer: index of the decoder layer whose output it reads and edits.
        model: a hint naming the model it was fitted on (checked loosely, hidden size is checked strictly).
        method: ``"finesteer"``, ``"caa"``, ``"cast"``, ... .
        metadata: JSON-serialisable fit metadata: data provenance, metrics, options, versions.
    """

    params: SteerParams
    layer: int
    model: Optional[str] = None
    method: str = "finesteer"
    metadata: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.params, SteerParams):
            raise TypeError(f"params: expected finesteer_kernels.SteerParams, got {type(self.params).__name__}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ValueError(f"layer: expected a non-negative int (decoder layer index), got {self.layer!r}")
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError, RecursionError) as e:
            raise TypeError(f"metadata: must be JSON-serialisable ({type(e).__name__}: {e})") from None

    @property
    def hidden_size(self) -> int:
        return self.params.d

    def with_alpha(self, alpha: float) -> "Steerer":
        return dataclasses.replace(self, params=self.params.replace(alpha=alpha))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Steerer":
        """A copy on ``device`` (ValueError naming it when this machine has no such device) and/or in ``dtype``."""
        device = None if device is None else _checked_device(device)
        return dataclasses.replace(self, params=self.params.to(device, dtype))

    # ---- I/O -----------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (tensors as stored, fp32 by default) with JSON metadata, with the file mode
        the user's umask gives."""
        path = _writable_file(path)
        tensors = {n: t.detach().cpu().contiguous() for n, t in self.params.tensors().items()}
        metadata = {k: v for k, v in self.metadata.items() if k != INTEGRITY_NOTE}  # this file has digests
        header: dict[str, Any] = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "tensors": sorted(tensors), "scalars": self.params.scalars(),
            "layer": self.layer, "hidden_size": self.hidden_size, "model": self.model, "method": self.method,
            # the versions that write this file, not ones carried over from a loaded file's metadata
            "metadata": {**metadata, "versions": _versions()},
        }
        header["digests"] = {"algorithm": "sha256", "header": _header_digest(header),
                             "tensors": {n: _tensor_digest(t) for n, t in sorted(tensors.items())}}
        try:
            save_file(tensors, path, metadata={FORMAT_NAME: json.dumps(header)})
        except (SafetensorError, OSError) as e:
            raise OSError(f"path: cannot write the steerer file {path!r} ({e})") from None
        apply_umask(path)  # safetensors writes 0600 whatever the umask

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "Steerer":
        """Read a file written by `save` onto ``device``. Raises `SteererFileError` with the reason on any bad file,
        ``FileNotFoundError`` for a missing one and ``ValueError`` for a device this machine does not have."""
        path = os.fspath(path)
        device = _checked_device(device)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no steerer file at {path!r}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:  # checked here, then moved to ``device``
                raw = (f.metadata() or {}).get(FORMAT_NAME)
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise SteererFileError(f"{path}: not a safetensors file ({e})") from None
        if raw is None:
            raise SteererFileError(f"{path}: a safetensors file without FineSteer metadata (no '{FORMAT_NAME}' "
                                   "entry in its header)")
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as e:
            raise SteererFileError(f"{path}: FineSteer metadata is not valid JSON "
                                   f"({'nested too deeply' if isinstance(e, RecursionError) else e})") from None
        if not isinstance(header, dict):
            raise SteererFileError(f"{path}: FineSteer metadata must be a JSON object, got {type(header).__name__}")
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            raise SteererFileError(f"{path}: unknown format_version {version!r}; this FineSteer reads version "
                                   f"{FORMAT_VERSION}")
        checked = _check_digests(path, header, tensors)
        listed = header.get("tensors", [])
        if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
            raise SteererFileError(f"{path}: header 'tensors' must be a list of tensor names, got {listed!r}")
        listed = set(listed)
        missing = sorted(listed - tensors.keys())
        if missing:
            raise SteererFileError(f"{path}: missing tensors {missing}")
        unknown = sorted(tensors.keys() - set(TENSOR_FIELDS))
        if unknown:
            raise SteererFileError(f"{path}: unknown tensors {unknown}")
        # every scalar is required: a missing one would silently become SteerParams' default (tau = 0.5, ...)
        scalars = header.get("scalars")
        if not isinstance(scalars, dict):
            raise SteererFileError(f"{path}: header 'scalars' must be a JSON object with {list(SCALAR_FIELDS)}, "
                                   f"got {scalars!r}")
        missing = [k for k in SCALAR_FIELDS if k not in scalars]
        if missing:
            raise SteererFileError(f"{path}: header 'scalars' lacks {missing}")
        scalars = {k: scalars[k] for k in SCALAR_FIELDS}
        layer = header.get("layer")
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise SteererFileError(f"{path}: header 'layer' must be a non-negative int (decoder layer index), got "
                                   f"{layer!r}")
        metadata = header.get("metadata", {})
        if not isinstance(metadata, dict):
            raise SteererFileError(f"{path}: header 'metadata' must be a JSON object, got {type(metadata).__name__}")
        for key, kind in (("model", (str, type(None))), ("method", str)):
            if not isinstance(header.get(key, "finesteer"), kind):
                raise SteererFileError(f"{path}: header '{key}' must be a string, got {header[key]!r}")
        _check_tensors(path, tensors, header.get("hidden_size"))
        if not checked:
            metadata = {**metadata, INTEGRITY_NOTE: "not checked: the file has no digests (written before FineSteer "
                                                    "recorded them, or by another tool); save it again to add them"}
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
        dtype = tensors["experts"].dtype if "experts" in tensors else None
        try:
            params = SteerParams(**tensors, **scalars, storage_dtype=dtype)
        except (TypeError, ValueError) as e:
            raise SteererFileError(f"{path}: invalid steering parameters: {e}") from None
        return cls(params=params, layer=layer, model=header.get("model"),
                   method=header.get("method", "finesteer"), metadata=metadata)

    def __repr__(self) -> str:
        return (f"Steerer(method={self.method!r}, layer={self.layer}, hidden_size={self.hidden_size}, "
                f"model={self.model!r}, params={self.params!r})")


def _checked_device(device) -> torch.device:
    """``device`` as a torch.device this machine has, or a ValueError naming it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested, but CUDA is not available here (torch "
                             f"{torch.__version__}); load on 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} requested, but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return dev


def _writable_file(path) -> str:
    """``path`` as a string, or an error naming it when it cannot be a new file: a folder, or in a folder that does
    not exist (safetensors would name its hidden temporary file instead)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path: {path!r} is a folder; give a file path such as "
                                f"{os.path.join(path, 'steerer.safetensors')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise NotADirectoryError(f"path: {folder!r} is a file, not a folder; save the steerer elsewhere")
        raise FileNotFoundError(f"path: the folder {folder!r} does not exist; create it first (os.makedirs) or "
                                "save elsewhere")
    return path


def _tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as the file stores them (row-major, little-endian)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _header_digest(header: dict) -> str:
    """SHA-256 of the header without its digests, in one canonical JSON form: as read back from the file (keys as
    strings, tuples as lists; floats round-trip exactly), keys sorted."""
    rest = json.loads(json.dumps({k: v for k, v in header.items() if k != "digests"}))
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_digests(path: str, header: dict, tensors: dict) -> bool:
    """Compare the file's tensors and header with the digests recorded at save; False for a file without any."""
    digests = header.get("digests")
    if digests is None:
        return False
    recorded = digests.get("tensors") if isinstance(digests, dict) else None
    if not isinstance(recorded, dict) or digests.get("algorithm") != "sha256":
        raise SteererFileError(f"{path}: header 'digests' must be {{'algorithm': 'sha256', 'header': ..., "
                               f"'tensors': {{name: hex}}}}, got {digests!r}")
    for name in sorted(tensors.keys() | recorded.keys()):
        if name not in tensors:
            raise SteererFileError(f"{path}: missing tensors [{name!r}] (the file's digests list it)")
        if name not in recorded:
            raise SteererFileError(f"{path}: tensor {name!r} has no digest in the header: it was added after saving")
        if recorded.get(name) != _tensor_digest(tensors[name]):
            raise SteererFileError(f"{path}: tensor {name!r} does not match the digest recorded when the file was "
                                   "saved: the file is corrupted or was changed since; use a good copy or fit again")
    if digests.get("header") != _header_digest(header):
        raise SteererFileError(f"{path}: the FineSteer header (scalars, layer, metadata) does not match the digest "
                               "recorded when the file was saved: the file is corrupted or was edited; use a good "
                               "copy or fit again")
    return True


def _check_tensors(path: str, tensors: dict, hidden_size) -> None:
    """Dtypes and the header's hidden size, tensor by tensor, so a bad tensor is named by the file's own record
    rather than by a disagreement with whichever tensor is checked next."""
    if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size < 1:
        raise SteererFileError(f"{path}: header 'hidden_size' must be a positive int, got {hidden_size!r}")
    for name, tensor in tensors.items():
        if tensor.dtype not in STORABLE_DTYPES:
            raise SteererFileError(f"{path}: tensor {name!r} has dtype {tensor.dtype}; steerer files hold float32, "
                                   "float16, bfloat16 or float64 tensors")
        axis = HIDDEN_AXIS.get(name)
        if axis is not None and tensor.dim() > axis and tensor.shape[axis] != hidden_size:
            raise SteererFileError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, whose hidden-size axis "
                                   f"{axis} is {tensor.shape[axis]}, but the header says hidden_size={hidden_size}")
