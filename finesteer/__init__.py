"""FineSteer: fine-grained inference-time steering of LLMs (SCS gate + mixture of steering experts).

    import finesteer
    steerer = finesteer.Steerer.load("safety.safetensors")
    with finesteer.patch_model(model, steerer, mode="query"):
        model.generate(...)

Heavy parts (transformers, scikit-learn) are imported only when the names that need them are used.
"""
import importlib

from finesteer_kernels import SteerParams, __version__

from .steerer import Steerer, SteererFileError

# name -> module that defines it; imported on first use so `import finesteer` stays light.
_LAZY = {
    "patch_model": "finesteer.patching",
    "unpatch_model": "finesteer.patching",
    "PatchHandle": "finesteer.patching",
    "SteererBank": "finesteer.patching",
    "find_decoder_layers": "finesteer.patching",
    "fit_scs": "finesteer.fitting.gates",
    "fit_gate": "finesteer.fitting.gates",
    "fit_mose": "finesteer.fitting.fit",
    "fit_caa": "finesteer.fitting.fit",
    "fit_cast": "finesteer.fitting.fit",
    "load_model": "finesteer.fitting.models",
    "load_smollm2": "finesteer.fitting.models",
    "collect_activations": "finesteer.fitting.activations",
    "completion_shifts": "finesteer.fitting.activations",
    "safety_steerer": "finesteer.fitting.recipes",
    "truthfulness_steerer": "finesteer.fitting.recipes",
    "import_gguf": "finesteer.interop.interchange",
    "export_gguf": "finesteer.interop.interchange",
    "import_vectors": "finesteer.interop.interchange",
    "import_cast": "finesteer.interop.interchange",
    "ControlVectorError": "finesteer.interop.interchange",
}

__all__ = ["Steerer", "SteererFileError", "SteerParams", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finesteer' has no attribute {name!r}")
