"""``patch_model(..., fuse_norm=True)``: move each steered layer's edit into the RMSNorm that reads its output next.

In a pre-norm decoder (Llama, Qwen2/3, Mistral, Gemma 2/3, Phi3, ...) the residual stream that leaves layer L is read
at once by layer L+1's input norm (by the model's final norm after the last layer), and layer L+1 later adds its
block's output to that same tensor. The fused op steers the tensor in place and returns its norm in one launch
(`finesteer_kernels.steer_rmsnorm_`, `apply_delta_rmsnorm_`), so the edit costs no pass over the stream of its own.

The pattern is found from the modules, not from a table of architectures:

* `first_readers`: one short forward (two tokens, no cache) with hooks records, for each steered layer, the first
  module other than a decoder layer that is called with that layer's output tensor itself;
* `rmsnorm_of`: that module must be an RMSNorm: a weight of size d and an eps (``variance_epsilon`` or ``eps``),
  and on a copy with random weights its forward must equal ``x * rsqrt(mean(x^2) + eps) * w`` or ``* (1 + w)``
  (Gemma), with Llama's or Gemma's rounding (`finesteer_kernels.RMSNormParams`), in fp32 and bf16.

Where that fails (post-norm OLMo2, whose layers start with attention; LayerNorm models such as GPT-2 and GPT-NeoX;
a last layer without a final norm; a norm on another device) the layer keeps the separate edit, and
`patch_model` says so once with a warning. At run time the layer's hook hands the edit to the norm (`FusedNorm.arm`)
only inside the model's forward and when the output may be edited in place (no autograd graph needs it); else it
edits as without fusion. The norm module is not replaced: its instance ``forward`` is wrapped (`wrappers`), and
removing the patch puts the original back, so the model's modules, parameters and state dict never change.
"""
from __future__ import annotations

import copy
import functools
import warnings
from typing import Optional

import torch

import finesteer_kernels
from finesteer_kernels import RMSNormParams, SteerParams, reference

from .wrappers import Wrapped, unwrap, wrap

EPS_NAMES = ("variance_epsilon", "eps")
PROBE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    if isinstance(value, torch.Tensor):
        return value
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def first_readers(model: torch.nn.Module, layer_modules: torch.nn.ModuleList, indices) -> dict:
    """``{layer index: module}``: for each layer in ``indices``, the first module (not a decoder layer) called with
    that layer's output tensor, in one forward of two tokens without a cache. Raises what the forward raises."""
    indices = set(indices)
    layer_ids = {id(layer) for layer in layer_modules}
    outputs, readers, handles = {}, {}, []

    def record_output(index):
        def hook(module, args, output):
            outputs[index] = output[0] if isinstance(output, tuple) else output
        return hook

    def record_reader(module, args, kwargs):
        if id(module) in layer_ids or not outputs:
            return
        tensor = _first_tensor(args, kwargs)
        for index, output in outputs.items():
            if index not in readers and tensor is output:
                readers[index] = module

    try:
        for index in indices:
            handles.append(layer_modules[index].register_forward_hook(record_output(index)))
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(record_reader, with_kwargs=True))
        device = next(p.device for p in layer_modules.parameters())
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 3
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2]], device=device) % vocab, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return readers


def rmsnorm_of(module: torch.nn.Module, d: int) -> tuple:
    """``(RMSNormParams, None)`` if ``module`` computes an RMSNorm over the last axis (checked on a probe), else
    ``(None, why not)``."""
    weight = getattr(module, "weight", None)
    name = type(module).__name__
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (d,) or not weight.is_floating_point():
        return None, f"{name} has no weight of size {d}"
    eps = next((getattr(module, n) for n in EPS_NAMES if isinstance(getattr(module, n, None), (int, float))), None)
    if eps is None or isinstance(eps, bool):
        return None, f"{name} has no eps ({' or '.join(EPS_NAMES)})"
    others = [n for n, p in module.named_parameters() if p is not weight]
    if others:
        return None, f"{name} has parameters besides its weight ({', '.join(others)}): not an RMSNorm"
    if weight.device.type == "meta":
        return None, f"{name}'s weight is on the meta device"
    variant = _probe_variant(module, weight, float(eps))
    if variant is None:
        return None, f"{name} does not compute x * rsqrt(mean(x^2) + eps) * (w or 1 + w) (a LayerNorm?)"
    unit_offset, weight_in_fp32 = variant
    return RMSNormParams(weight, float(eps), unit_offset=unit_offset, weight_in_fp32=weight_in_fp32), None


def _probe_variant(module: torch.nn.Module, weight: torch.Tensor, eps: float) -> Optional[tuple]:
    """``(unit_offset, weight_in_fp32)`` of the RMSNorm formula ``module`` matches best on random rows (with a mean,
    which a LayerNorm would remove) and random weights (a ones or zeros initialisation would hide ``1 + w`` and the
    rounding), in fp32 and bf16; None if none matches. Runs on a copy: the module itself is not touched."""
    g = torch.Generator().manual_seed(0)
    d = weight.shape[0]
    rows = torch.randn(4, d, generator=g) * torch.tensor([[0.5], [1.0], [3.0], [20.0]]) + 1.5
    probe_weight = torch.randn(d, generator=g) * 0.5 + 0.3
    errors = {}
    for dtype, tol in PROBE_TOL.items():
        probe = copy.deepcopy(module).to(weight.device, dtype)
        with torch.no_grad():
            probe.weight.copy_(probe_weight)
            x = rows.to(weight.device, dtype)
            try:
                got = probe(x)
            except Exception:  # noqa: BLE001 - a module that cannot take a plain (N, d) tensor is no plain norm
                return None
            for unit_offset in (False, True):
                for weight_in_fp32 in (False, True):
                    want = reference.rms_norm(x, RMSNormParams(probe.weight, eps, unit_offset, weight_in_fp32))
                    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
                        return None
                    err = float(((got.double() - want.double()).abs().max() / want.double().abs().max()))
                    key = (unit_offset, weight_in_fp32)
                    errors[key] = max(errors.get(key, 0.0), err / tol)
    best = min(errors, key=errors.get)
    return best if errors[best] <= 1.0 else None


class FusedNorm:
    """The forward of the norm that reads steered layer ``site.layer``'s output next, wrapped: when the layer's hook
    has armed it, the call steers its input in place and returns the norm of the steered rows in one op (through
    the handle, which knows the mode and the forward's padding); otherwise it is the module's own forward."""

    def __init__(self, handle, site, module: torch.nn.Module, norm: RMSNormParams):
        self.handle, self.site, self.module, self.norm = handle, site, module, norm
        self._armed: Optional[torch.Tensor] = None
        self._wrapper: Optional[Wrapped] = None

    def install(self) -> None:
        # on the instance: the module's own forward, or a wrapper already there (e.g. accelerate's), is kept below
        self._wrapper = wrap(self.module, "forward", lambda original: functools.partial(self._forward, original))

    def uninstall(self) -> None:
        """Put the module's forward back (`wrappers.unwrap`: not over a wrapper that something put on it since)."""
        self._armed = None
        if self._wrapper is not None:
            unwrap(self._wrapper)
            self._wrapper = None

    def arm(self, hidden: torch.Tensor) -> None:
        """The layer's hook left ``hidden`` unedited: the next call of this norm on it applies the edit."""
        self._armed = hidden

    def disarm(self) -> None:
        self._armed = None

    def _forward(self, original, *args, **kwargs):
        armed, self._armed = self._armed, None
        if armed is None:
            return original(*args, **kwargs)
        given = list(args) + list(kwargs.values())
        if len(given) != 1 or given[0] is not armed:
            # the edit cannot be dropped silently: the pattern seen at patch time does not hold in this forward
            raise RuntimeError(
                f"layer {self.site.layer}: fuse_norm: the norm after this steered layer was called on something "
                "other than the layer's output (the model changed it in between); patch without fuse_norm")
        guard = self.handle._one_thread
        guard.enter(f"layer {self.site.layer}'s fused norm")
        try:
            normed = self.handle._steer_into_norm(self.site, armed, self.norm)
        finally:
            guard.exit()
        return original(armed) if normed is None else normed


@torch.no_grad()  # as in generation (the norm's weight requires grad; with autograd on the reference would run)
def _warm(params: SteerParams, norm: RMSNormParams, dtype: torch.dtype) -> None:
    """Run the fused ops once on a zero row where the layer runs (compiles the kernels at patch time)."""
    device = params.device
    probe = torch.zeros(1, 1, params.d, device=device, dtype=dtype)
    finesteer_kernels.steer_rmsnorm(probe, params, norm)
    finesteer_kernels.steer_rmsnorm(probe, params, norm, row_mask=torch.ones(1, 1, dtype=torch.bool, device=device))
    delta = torch.zeros(1, params.d, device=device)
    finesteer_kernels.apply_delta_rmsnorm(probe, delta, norm)
    finesteer_kernels.apply_delta_rmsnorm(probe, delta, norm, torch.zeros(1, 1, dtype=torch.long, device=device))


def plan_fused_norms(model: torch.nn.Module, layer_modules: torch.nn.ModuleList, sites: dict, dtypes: dict) -> dict:
    """``{layer index: (norm module, RMSNormParams)}`` for the steered layers whose edit can move into the next norm;
    warns once, naming the others and why. ``dtypes``: the dtype each steered layer computes in."""
    reasons = {}
    try:
        readers = first_readers(model, layer_modules, sites)
    except Exception as e:  # noqa: BLE001 - any failure of the probe forward means: no fusion, and say why
        readers, reasons = {}, {index: f"the probe forward failed ({type(e).__name__}: {e})" for index in sites}
    plans, taken = {}, set()
    for index, site in sites.items():
        if index in reasons:
            continue
        module = readers.get(index)
        if module is None:
            what = "the final norm" if index == len(layer_modules) - 1 else f"layer {index + 1}"
            reasons[index] = f"no module reads its output directly ({what} is missing or gets a changed tensor)"
            continue
        norm, why = rmsnorm_of(module, site.params.d)
        if norm is None:
            reasons[index] = f"the first module reading its output is not an RMSNorm: {why}"
        elif id(module) in taken:
            reasons[index] = f"its norm ({type(module).__name__}) already takes another steered layer's edit"
        elif norm.device != site.params.device:
            reasons[index] = f"its norm is on {norm.device}, the layer on {site.params.device}"
        else:
            _warm(site.params, norm, dtypes[index])
            plans[index] = (module, norm)
            taken.add(id(module))
    if reasons:
        listed = "; ".join(f"layer {i}: {why}" for i, why in sorted(reasons.items()))
        warnings.warn(f"fuse_norm: {type(model).__name__} keeps the separate steering edit at {len(reasons)} of "
                      f"{len(sites)} steered layer(s) ({listed})", stacklevel=3)
    return plans


def install_fused_norms(handle, plans: dict) -> None:
    """Wrap each planned norm's forward and attach it to its site (`PatchHandle.remove` undoes both)."""
    for index, (module, norm) in plans.items():
        site = handle._sites[index]
        site.fused = FusedNorm(handle, site, module, norm)
        site.fused.install()
