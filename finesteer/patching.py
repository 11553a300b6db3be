"""`patch_model`: steer a transformers causal LM at the output of some decoder layers, in forward and generate.

Each patched layer gets a forward hook on its output (registered first, so ``output_hidden_states`` records the
steered values). The module that owns the layer list gets a forward pre-hook that notes, once per forward, the
attention mask and how many tokens the cache already holds; from those and the number of new tokens the layer hook
tells a prefill from a decode step; a forward hook on the same module forgets them when the forward ends, so a
layer called on its own afterwards is not steered with a finished forward's mask. A cache that keeps its length in a
device tensor (a static cache) is not read: the handle counts the tokens fed to each cache object instead, in
forward and generate alike. All state (the per-sequence coefficients of query mode, the token counts) lives on the
`PatchHandle` and is dropped by `PatchHandle.remove`.

Threads: one patch serves one thread at a time. A forward, layer call or ``generate`` entering from a second thread
while another thread's is running raises RuntimeError, and so does a query-mode decode step in a thread other than
the one whose prefill made the cached coefficients; patch one model copy per thread instead.

Query mode (the paper's): a prefill synthesises ``coef`` at each row's anchor, the last non-padding token of the
prompt, caches ``coef`` and the per-sequence edit ``delta = coef @ W_out`` and adds delta to every non-padding
position; a decode step is then one op per steered layer, ``h + delta`` (`finesteer_kernels.apply_delta_`). Inside
``model.generate`` the prompt is what ``generate`` was given, so ``use_cache=False`` (which recomputes the whole
sequence every step) and assisted decoding keep the prompt's anchor. Token mode: every position gates and routes on
its own hidden state. See docs/patching.md.

The hooks only look at shapes, never at tensor values, so they do not synchronise with the device.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import weakref
from collections.abc import Mapping
from typing import Optional, Union

import torch

import finesteer_kernels
from finesteer_kernels import SteerParams
from finesteer_kernels.validation import HIDDEN_DTYPES

from .layers import DecoderLayers, check_layer_index, find_decoder_layers, hidden_size
from .steerer import Steerer
from .threads import OneThreadAtATime

__all__ = ["patch_model", "unpatch_model", "PatchHandle", "find_decoder_layers"]

MODES = ("query", "token")
SteererLike = Union[Steerer, SteerParams]


# ---- per-forward context -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _GenerateCall:
    """One active ``model.generate`` call, as far as shapes and configs tell."""

    prompt_length: Optional[int]  # positions [0, prompt_length) are the prompt
    num_beams: int  # beams per prompt; beam search reorders rows only within a prompt's beams


@dataclasses.dataclass
class _ForwardContext:
    """What the owner's pre-hook saw for the current forward, plus index tensors derived from it by the first
    patched layer and reused by the others (all patched layers see the same rows and tokens)."""

    mask: Optional[torch.Tensor]  # attention mask as the model got it: 2-D (B, past + T) or 4-D (B, 1, T, S)
    past_length: Optional[int]  # tokens in the cache before this forward; None = read it from a 2-D mask
    call: Optional[_GenerateCall]  # the generate call this forward belongs to, if any
    key_start: Optional[torch.Tensor] = None  # past_length on the device, for a cache that keeps it there
    derived: dict = dataclasses.field(default_factory=dict)


def _mask_past(mask: torch.Tensor, past: Optional[int], batch: int, new_tokens: int,
               key_start: Optional[torch.Tensor] = None) -> int:
    """Check a 2-D or 4-D attention mask's shape against this forward and return the cached token count (from
    the 2-D mask's width when the cache did not say). Shapes only: no tensor op."""
    if mask.dim() == 2:
        if mask.shape[0] != batch or mask.shape[1] < new_tokens:
            raise ValueError(f"attention_mask: shape {tuple(mask.shape)} does not cover this forward's {batch} rows "
                             f"of {new_tokens} new tokens; expected (batch, past + new)")
        return mask.shape[1] - new_tokens if past is None else past
    if past is None:
        raise ValueError("cache: cannot tell how many tokens it holds (get_seq_length did not return an int) and "
                         "the attention mask is 4-D; pass a 2-D attention_mask")
    keys_needed = new_tokens if key_start is not None else past + new_tokens
    if mask.shape[0] not in (1, batch) or mask.shape[-2] != new_tokens or mask.shape[-1] < keys_needed:
        raise ValueError(f"attention_mask: 4-D shape {tuple(mask.shape)} does not match {batch} rows of "
                         f"{new_tokens} new tokens after {past} cached ones")
    return past


def _real_new_tokens(mask: torch.Tensor, past: int, batch: int, new_tokens: int,
                     key_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T) bool of non-padding new tokens from a 2-D or 4-D attention mask (checked by `_mask_past`), by
    indexing only.

    A 4-D mask (static caches, custom masks) hides padding in its diagonal: new token i attends to itself (key
    ``past + i``) exactly when it is a real token; masked entries are False or a large negative number. Where the
    cache keeps its length on the device (``key_start``), the keys are indexed from that: exact even when the
    handle's own count lags (CUDA-graph replays run no hooks), and no host read."""
    if mask.dim() == 2:
        return mask[:, mask.shape[1] - new_tokens:].bool()
    i = torch.arange(new_tokens, device=mask.device)
    keys = i + (past if key_start is None else key_start.to(mask.device))
    diagonal = mask[:, 0, i, keys]
    real = diagonal if diagonal.dtype == torch.bool else diagonal > torch.finfo(diagonal.dtype).min / 2
    return real.expand(batch, new_tokens)


class _Rows:
    """How one forward of ``B`` rows and ``T`` new tokens is steered: which tokens are real, whether it is a
    prefill (and where each row's anchor is) or a decode step, as index tensors for the op. Decode or not is
    decided from shapes; the index tensors are built on first use, so a query-mode decode step runs no tensor op
    here."""

    def __init__(self, ctx: _ForwardContext, hidden: torch.Tensor):
        self._ctx = ctx
        self._batch, self._new_tokens = hidden.shape[0], hidden.shape[1]
        self._device = hidden.device
        past = ctx.past_length
        if ctx.mask is not None:
            past = _mask_past(ctx.mask, past, self._batch, self._new_tokens, ctx.key_start)
        self._past = past
        call = ctx.call
        prompt_length = call.prompt_length if call is not None else None
        if prompt_length is not None:
            # Inside generate the prompt is known: everything after it (generated tokens, assisted-decoding
            # candidates) reuses the prompt's coefficients; a use_cache=False step recomputes the prompt and so
            # finds the same anchor again; an early prefill chunk (prefill_chunk_size) ends before the anchor and
            # is left alone, since the decision is not known yet.
            self.decode = past >= prompt_length
            self.pending = past + self._new_tokens < prompt_length
            self._anchor_limit = prompt_length - past
        else:
            # Outside generate: one new token on a non-empty cache is a decode step, anything else a prefill.
            self.decode = self._new_tokens == 1 and past > 0
            self.pending = False
            self._anchor_limit = self._new_tokens
        self.num_beams = call.num_beams if call is not None else 1

    @functools.cached_property
    def valid(self) -> Optional[torch.Tensor]:
        """(B, T) real (non-padding) new tokens; None = all."""
        ctx = self._ctx
        if ctx.mask is None:
            return None
        return _real_new_tokens(ctx.mask, self._past, self._batch, self._new_tokens, ctx.key_start).to(self._device)

    @functools.cached_property
    def row_to_seq(self) -> torch.Tensor:
        """(B, T) sequence index per token, -1 for padding."""
        batch, new_tokens = self._batch, self._new_tokens
        seq = torch.arange(batch, device=self._device)[:, None].expand(batch, new_tokens)
        return seq if self.valid is None else torch.where(self.valid, seq, -1)

    @functools.cached_property
    def _anchors(self) -> tuple:
        """(anchor position per row, whether the row has one): the last real prompt token of each row."""
        batch, new_tokens = self._batch, self._new_tokens
        pos = torch.arange(new_tokens, device=self._device)
        eligible = (pos < self._anchor_limit)[None, :].expand(batch, new_tokens)
        if self.valid is not None:
            eligible = eligible & self.valid
        anchor = torch.where(eligible, pos, -1).amax(dim=1)  # -1 if none
        return anchor.clamp_min(0), (anchor >= 0)[:, None]

    @property
    def anchor(self) -> torch.Tensor:
        return self._anchors[0]

    @property
    def anchor_found(self) -> torch.Tensor:
        return self._anchors[1]

    @functools.cached_property
    def batch_index(self) -> torch.Tensor:
        return torch.arange(self._batch, device=self._device)


def _rows_for(ctx: Optional[_ForwardContext], hidden: torch.Tensor) -> _Rows:
    if ctx is None:  # a layer called outside its model's forward: no mask, no cache information
        ctx = _ForwardContext(None, 0, None)
    key = (hidden.shape[0], hidden.shape[1], hidden.device)
    rows = ctx.derived.get(key)
    if rows is None:
        rows = ctx.derived[key] = _Rows(ctx, hidden)
    return rows


def _editable_in_place(hidden: torch.Tensor, layer_input) -> bool:
    """Whether the layer's output may be edited in place, which saves writing the residual stream again (the
    kernels leave rows without an edit unwritten): not when autograd needs the original, and not when the output
    shares memory with the layer's input (an identity layer), whose recorded hidden state would change too."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        return False
    if isinstance(layer_input, torch.Tensor) and \
            layer_input.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr():
        return False
    return True


def _share_within_beams(coef: torch.Tensor, num_beams: int) -> torch.Tensor:
    """Give every beam of a prompt the coefficients of its first beam, so that beam search's reordering of rows
    (always within a prompt's beams) leaves each row's coefficients exactly right."""
    if num_beams <= 1:
        return coef
    batch, n = coef.shape
    if batch % num_beams:
        raise RuntimeError(f"beam search: {batch} rows are not a multiple of num_beams={num_beams}")
    return coef.view(batch // num_beams, num_beams, n)[:, :1].expand(-1, num_beams, -1).reshape(batch, n)


def _store_coef(cached: Optional[torch.Tensor], coef: torch.Tensor) -> torch.Tensor:
    """The new prefill's coefficients, written into the cached tensor when it fits: a decode step captured in a
    CUDA graph reads that memory on every replay, so the next prompt's prefill must update it in place (also after
    `PatchHandle.reset`). Not when autograd tracks either one (an in-place copy would chain the graphs of
    successive prefills)."""
    if cached is None or cached.shape != coef.shape or cached.requires_grad or coef.requires_grad:
        return coef
    return cached.copy_(coef)


# ---- argument lookup -----------------------------------------------------------------------------------------------
class _ArgReader:
    """Reads named arguments of ``fn`` from a call's ``args``/``kwargs`` (some models pass them positionally)."""

    def __init__(self, fn):
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        self.positions = {p.name: i for i, p in enumerate(params)
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def get(self, args: tuple, kwargs: dict, *names: str):
        for name in names:
            if name in kwargs:
                return kwargs[name]
            i = self.positions.get(name)
            if i is not None and i < len(args):
                return args[i]
        return None


def _reported_length(cache):
    """What a transformers cache says it holds: an int, a device tensor (a static cache), or None."""
    get = getattr(cache, "get_seq_length", None)
    return get() if get is not None else None


def _as_mask(mask) -> Optional[torch.Tensor]:
    """The attention mask as a 2-D or 4-D tensor; a dict of per-attention-type masks gives its full-attention one
    (every kind keeps the diagonal, which is all that is read)."""
    if isinstance(mask, Mapping):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() in (2, 4)):
        return mask
    what = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
    raise ValueError(f"attention_mask: expected a 2-D (batch, past + new) or 4-D (batch, 1, new, keys) mask, "
                     f"got {what}")


def _new_token_count(reader: "_ArgReader", args: tuple, kwargs: dict) -> Optional[int]:
    ids = reader.get(args, kwargs, "input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return ids.shape[1]
    embeds = reader.get(args, kwargs, "inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        return embeds.shape[1]
    return None


# ---- the hooks -----------------------------------------------------------------------------------------------------
class _LayerHook:
    """Forward hook on one decoder layer. A class (not a closure) so `unpatch_model` can recognise it."""

    def __init__(self, handle: "PatchHandle", site: "_Site"):
        self.handle = handle
        self.site = site

    def __call__(self, module, args, kwargs, output):
        layer_input = args[0] if args else kwargs.get("hidden_states")
        guard = self.handle._one_thread
        guard.enter(f"layer {self.site.layer}")
        try:
            return self.handle._steer_output(self.site, output, layer_input)
        finally:
            guard.exit()


class _OwnerPreHook:
    """Forward pre-hook on the module that owns the decoder layers: records mask and cache length."""

    def __init__(self, handle: "PatchHandle", owner: torch.nn.Module):
        self.handle = handle
        self.reader = _ArgReader(owner.forward)

    def __call__(self, module, args, kwargs):
        self.handle._begin_forward(self.reader, args, kwargs)


class _OwnerPostHook:
    """Forward hook on the same module (run even when the forward raises): the forward's context ends with it."""

    def __init__(self, handle: "PatchHandle"):
        self.handle = handle

    def __call__(self, module, args, output):
        self.handle._end_forward()


@dataclasses.dataclass
class _Site:
    """One patched layer: its parameters (on the layer's device) and the query-mode cache."""

    layer: int
    params: SteerParams
    coef: Optional[torch.Tensor] = None  # (B, K+k) fp32 per sequence, from the last prefill
    coef_memory: Optional[torch.Tensor] = None  # where prefills write coef; kept by reset(), see _store_coef
    delta: Optional[torch.Tensor] = None  # (B, d) fp32 = coef @ W_out: a decode step only adds it
    delta_memory: Optional[torch.Tensor] = None  # where prefills write delta (as coef_memory)


class PatchHandle:
    """The live patch of one model: hooks, per-layer parameters and query-mode state.

    Use it as a context manager or call `remove`. ``handle.layers`` lists the patched layer indices,
    ``handle.params(layer)`` the parameters used there (moved to the layer's device, alpha applied), and
    ``handle.cached_coef(layer)`` the per-sequence coefficients of the last query-mode prefill (or None).
    """

    def __init__(self, model: torch.nn.Module, sites: dict, mode: str, owner: torch.nn.Module,
                 layer_modules: torch.nn.ModuleList):
        self.model = model
        self.mode = mode
        self._sites = sites
        self._context: Optional[_ForwardContext] = None
        self._generate_stack: list = []  # a _GenerateCall per active (possibly nested) generate call
        # Tokens fed to each cache object through this patch, for caches whose length lives on the device (reading
        # it would synchronise). Weak keys: a cache the caller drops is forgotten.
        self._cache_fill: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._one_thread = OneThreadAtATime(
            "one patch serves one thread at a time (its forward context and query-mode coefficients are shared); "
            "patch a separate copy of the model per thread")
        self._coef_thread: Optional[int] = None  # thread whose prefill made the cached query-mode coefficients
        self._hooks = [owner.register_forward_pre_hook(_OwnerPreHook(self, owner), with_kwargs=True,
                                                       prepend=True),
                       owner.register_forward_hook(_OwnerPostHook(self), always_call=True)]
        for index, site in sites.items():
            # prepend: run before transformers' own recording hooks so output_hidden_states shows the edit
            self._hooks.append(layer_modules[index].register_forward_hook(
                _LayerHook(self, site), with_kwargs=True, prepend=True))
        self._generate_wrapper = None
        self._wrapped_generate = None
        self.active = True
        if callable(getattr(model, "generate", None)):
            self._install_generate_wrapper()

    # ---- public ---------------------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple:
        return tuple(sorted(self._sites))

    def params(self, layer: int) -> SteerParams:
        return self._site(layer).params

    def cached_coef(self, layer: int) -> Optional[torch.Tensor]:
        return self._site(layer).coef

    def reset(self) -> None:
        """Forget the cached query-mode coefficients (the next forward must be a prefill) and take every cache
        seen so far as empty: call it after ``cache.reset()`` when reusing a static cache for a new prompt."""
        for site in self._sites.values():
            site.coef = site.delta = None
        for cache in list(self._cache_fill.keys()):
            self._cache_fill[cache] = 0
        self._context = None

    def remove(self) -> None:
        """Remove every hook of this patch and drop its state. Safe to call twice."""
        if not self.active:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._restore_generate()
        self.reset()
        for site in self._sites.values():
            site.coef_memory = site.delta_memory = None
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle(mode={self.mode!r}, layers={list(self.layers)}, {state})"

    # ---- internals ------------------------------------------------------------------------------------------
    def _site(self, layer: int) -> _Site:
        if layer not in self._sites:
            raise KeyError(f"layer: {layer} is not patched by this handle (patched: {list(self.layers)})")
        return self._sites[layer]

    def _begin_forward(self, reader: _ArgReader, args: tuple, kwargs: dict) -> None:
        self._one_thread.enter("model forward")  # left in _end_forward, which runs even if this raises
        mask = _as_mask(reader.get(args, kwargs, "attention_mask"))
        cache = reader.get(args, kwargs, "cache", "past_key_values")
        call = self._generate_stack[-1] if self._generate_stack else None
        past, key_start = 0, None
        if cache is not None:
            length = _reported_length(cache)
            if isinstance(length, int):
                past = length
            else:
                # Counted instead: a cache first seen inside generate was made by it (empty); a cache handed to
                # generate was measured when the call began.
                past = self._cache_fill.get(cache, 0 if call is not None else None)
                if isinstance(length, torch.Tensor) and mask is not None and mask.dim() == 4:
                    key_start = length.clone()  # the layers advance it in place
            new_tokens = _new_token_count(reader, args, kwargs)
            if past is not None and new_tokens is not None:
                self._cache_fill[cache] = past + new_tokens
        if past is None and mask is None and self.mode == "query":
            raise ValueError("cache: it keeps its length on the device and holds tokens this patch did not see "
                             "(filled before patching or through another model): run the prompt through the patched "
                             "model with a fresh cache (or after cache.reset() and handle.reset()), or pass a 2-D "
                             "attention_mask of shape (batch, past + new)")
        self._context = _ForwardContext(mask, past, call, key_start)

    def _end_forward(self) -> None:
        if self._one_thread.held_here():  # not in a thread whose _begin_forward was refused
            self._context = None
            self._one_thread.exit()

    def _steer_output(self, site: _Site, output, layer_input):
        hidden = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            what = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise TypeError(f"layer {site.layer}: expected the decoder layer to return the residual stream as a "
                            f"(batch, tokens, hidden) tensor (or a tuple starting with one), got {what}")
        params = site.params
        if hidden.device != params.device:
            raise RuntimeError(f"layer {site.layer}: hidden states are on {hidden.device} but the steerer was "
                               f"moved to {params.device} at patch time; the model moved after patching: remove "
                               "the patch and patch again")
        if hidden.dtype not in HIDDEN_DTYPES:
            raise TypeError(f"layer {site.layer}: hidden states in {hidden.dtype}; the steering op supports "
                            "float32, float16 and bfloat16")
        ctx = self._context
        in_place = _editable_in_place(hidden, layer_input)
        if self.mode == "token":
            steered = self._steer_tokens(site, hidden, ctx, in_place)
        else:
            steered = self._steer_query(site, hidden, ctx, in_place)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    def _steer_tokens(self, site: _Site, hidden: torch.Tensor, ctx: Optional[_ForwardContext],
                      in_place: bool) -> torch.Tensor:
        steer = finesteer_kernels.steer_ if in_place else finesteer_kernels.steer
        if ctx is None or ctx.mask is None:
            return steer(hidden, site.params)
        # With a mask, padding positions stay as they are: the kernel skips rows the mask marks False.
        return steer(hidden, site.params, row_mask=_rows_for(ctx, hidden).valid)

    def _steer_query(self, site: _Site, hidden: torch.Tensor, ctx: Optional[_ForwardContext],
                     in_place: bool) -> torch.Tensor:
        rows = _rows_for(ctx, hidden)
        batch = hidden.shape[0]
        if rows.pending:
            return hidden
        if rows.decode:
            # The fast path: one op on the per-sequence delta cached at prefill (every decode token is a real token:
            # padding only ever sits in the prompt).
            if site.delta is None:
                raise RuntimeError(f"layer {site.layer}: a decode step (tokens after a non-empty cache) but no "
                                   "prefill was seen since patching (or since reset()); run the prompt through the "
                                   "patched model first")
            here = self._one_thread.ident()
            if None not in (here, self._coef_thread) and here != self._coef_thread:
                raise RuntimeError(f"layer {site.layer}: a query-mode decode step in another thread than the "
                                   "prefill that made the cached coefficients; one patch serves one thread at a "
                                   "time: patch a separate copy of the model per thread")
            if site.delta.shape[0] != batch:
                raise RuntimeError(f"layer {site.layer}: batch size changed between prefill ({site.delta.shape[0]} "
                                   f"rows) and decode ({batch} rows); query mode keeps one coefficient row per "
                                   "sequence and cannot follow rows that were added, dropped or regrouped")
            apply = finesteer_kernels.apply_delta_ if in_place else finesteer_kernels.apply_delta
            return apply(hidden, site.delta)
        anchors = hidden[rows.batch_index, rows.anchor]  # (B, d)
        coef = finesteer_kernels.synthesize(anchors, site.params)
        coef = torch.where(rows.anchor_found, coef, 0.0)  # a row with no real prompt token gets no edit
        coef = _share_within_beams(coef, rows.num_beams)
        site.coef = site.coef_memory = _store_coef(site.coef_memory, coef)
        delta = finesteer_kernels.coef_delta(coef, site.params)
        site.delta = site.delta_memory = _store_coef(site.delta_memory, delta)
        self._coef_thread = self._one_thread.ident()
        apply = finesteer_kernels.apply_delta_ if in_place else finesteer_kernels.apply_delta
        return apply(hidden, site.delta, rows.row_to_seq)

    # ---- generate -------------------------------------------------------------------------------------------
    def _install_generate_wrapper(self) -> None:
        """Wrap ``model.generate`` on this instance so forwards know the prompt length and beam count."""
        model = self.model
        original = model.generate
        reader = _ArgReader(original)
        handle = self

        @functools.wraps(original)
        def generate(*args, **kwargs):
            if not handle.active:  # removed while another wrapper sat on top of this one
                return original(*args, **kwargs)
            handle._one_thread.enter("model.generate")
            try:
                return _run(*args, **kwargs)
            finally:
                handle._one_thread.exit()

        def _run(*args, **kwargs):
            handle._generate_stack.append(_generate_call(model, reader, args, kwargs))
            given_cache = kwargs.get("cache", kwargs.get("past_key_values"))
            length = _reported_length(given_cache) if given_cache is not None else None
            if isinstance(length, torch.Tensor):
                # the one host read: once per call, before any forward, never in a hook
                handle._cache_fill[given_cache] = int(length)
            try:
                return original(*args, **kwargs)
            finally:
                handle._generate_stack.pop()

        generate._finesteer_handle = self
        self._had_instance_generate = "generate" in vars(model)
        self._wrapped_generate = original  # kept after removal: a wrapper above ours may still call it
        self._generate_wrapper = generate
        model.generate = generate

    def _restore_generate(self) -> None:
        if self._generate_wrapper is None:
            return
        # Undo our wrapper only while it is on top; if something wrapped it since, ours stays as an inactive
        # pass-through, and is unwrapped later when the wrappers above it are gone.
        self.active = False
        model = self.model
        while True:
            top = vars(model).get("generate")
            owner = getattr(top, "_finesteer_handle", None)
            if owner is None or owner.active:
                break
            if owner._had_instance_generate:
                model.generate = owner._wrapped_generate
            else:
                del model.generate
        self._generate_wrapper = None


def _generate_call(model, reader: _ArgReader, args: tuple, kwargs: dict) -> _GenerateCall:
    """Prompt length and beams of a generate call, from shapes and configs."""
    prompt = reader.get(args, kwargs, "inputs", "input_ids")
    if prompt is None:
        prompt = kwargs.get("inputs_embeds")
    prompt_length = prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and prompt_length is not None:
        # generate may get only the new tokens on top of a given cache, with a mask for the whole sequence
        prompt_length = max(prompt_length, mask.shape[1])
    config = reader.get(args, kwargs, "generation_config") or getattr(model, "generation_config", None)
    num_beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    return _GenerateCall(prompt_length, int(num_beams))


# ---- patching --------------------------------------------------------------------------------------------------
def _owner_of(model: torch.nn.Module, layers: torch.nn.ModuleList) -> torch.nn.Module:
    for module in model.modules():
        if any(child is layers for child in module.children()):
            return module
    raise ValueError(f"model: the decoder layers of {type(model).__name__} have no parent module")


def _placement(layer: torch.nn.Module, index: int) -> tuple:
    """(device, dtype) the layer computes in, from its floating-point parameters."""
    for tensor in (*layer.parameters(), *layer.buffers()):
        if tensor.is_floating_point():
            if tensor.device.type == "meta":
                raise ValueError(f"model: layer {index} has its weights on the meta device (offloaded or not "
                                 "loaded); load the model onto a real device before patching")
            if tensor.dtype not in HIDDEN_DTYPES:
                raise TypeError(f"model: layer {index} computes in {tensor.dtype}; the steering op supports "
                                "float32, float16 and bfloat16 hidden states")
            return tensor.device, tensor.dtype
    raise ValueError(f"model: layer {index} has no floating-point parameters to tell its device and dtype")


def _already_patched(layer: torch.nn.Module) -> bool:
    return any(isinstance(fn, _LayerHook) for fn in layer._forward_hooks.values())


def _normalise_steerers(steerer_or_dict) -> dict:
    """-> {layer index: SteerParams}."""
    if isinstance(steerer_or_dict, Steerer):
        return {steerer_or_dict.layer: steerer_or_dict.params}
    if isinstance(steerer_or_dict, SteerParams):
        raise TypeError("steerer_or_dict: a bare SteerParams has no layer; pass {layer_index: params} or a Steerer")
    if not isinstance(steerer_or_dict, Mapping):
        raise TypeError(f"steerer_or_dict: expected a Steerer or a dict {{layer index: Steerer}}, got "
                        f"{type(steerer_or_dict).__name__}")
    if not steerer_or_dict:
        raise ValueError("steerer_or_dict: empty dict, nothing to patch")
    out = {}
    for layer, item in steerer_or_dict.items():
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"steerer_or_dict: keys are decoder layer indices (int), got {layer!r}")
        if isinstance(item, Steerer):
            if item.layer != layer:
                raise ValueError(f"steerer_or_dict: key {layer} holds a steerer fitted at layer {item.layer}; "
                                 f"use the key {item.layer}, or dataclasses.replace(steerer, layer={layer}) to "
                                 "apply it elsewhere on purpose")
            out[layer] = item.params
        elif isinstance(item, SteerParams):
            out[layer] = item
        else:
            raise TypeError(f"steerer_or_dict[{layer}]: expected a Steerer or SteerParams, got "
                            f"{type(item).__name__}")
    return out


def _prepare(params: SteerParams, device: torch.device, dtype: torch.dtype, alpha: Optional[float]) -> SteerParams:
    """Apply alpha, move to the layer's device once, and warm the op there (packing caches, kernel compilation),
    which also surfaces a device or dtype the op cannot run on now rather than mid-generation."""
    if alpha is not None:
        params = params.replace(alpha=alpha)
    params = params.to(device)
    probe = torch.zeros(1, 1, params.d, device=device, dtype=dtype)
    coef = finesteer_kernels.synthesize(probe[0], params)
    finesteer_kernels.apply_coef(probe, coef, params, torch.zeros(1, 1, dtype=torch.long, device=device))
    delta = finesteer_kernels.coef_delta(coef, params)
    finesteer_kernels.apply_delta(probe, delta)  # the decode step's kernel, compiled before any graph capture
    finesteer_kernels.apply_delta(probe, delta, torch.zeros(1, 1, dtype=torch.long, device=device))
    finesteer_kernels.steer(probe, params)
    finesteer_kernels.steer(probe, params, row_mask=torch.ones(1, 1, dtype=torch.bool, device=device))
    return params


def patch_model(model: torch.nn.Module, steerer_or_dict: Union[Steerer, Mapping[int, SteererLike]],
                mode: str = "query", alpha: Optional[float] = None,
                decoder_layers: DecoderLayers = None) -> PatchHandle:
    """Steer ``model`` at the output of decoder layers; returns a `PatchHandle` (a context manager).

    Args:
        model: a transformers 5 causal LM (or its base model / a VLM whose text model has decoder layers).
        steerer_or_dict: a `Steerer` (applied at ``steerer.layer``) or a dict ``{layer index: Steerer or
            SteerParams}`` for several layers.
        mode: ``"query"`` (per sequence: gate and route once at the prompt's last token, add the same vector to
            every token) or ``"token"`` (every position gates and routes on its own hidden state).
        alpha: strength overriding each steerer's own ``alpha``; None keeps theirs.
        decoder_layers: where the decoder layers are, for a model where `find_decoder_layers` cannot find them:
            a dotted path inside ``model`` (e.g. ``"transformer.h"``) or the ``ModuleList`` itself. Its parent
            module must be the one whose forward receives the attention mask and cache.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    wanted = _normalise_steerers(steerer_or_dict)
    layer_modules = find_decoder_layers(model, decoder_layers)
    width = hidden_size(model)
    sites = {}
    for index, params in sorted(wanted.items()):
        check_layer_index(index, len(layer_modules), name="steerer_or_dict", error=IndexError)
        if params.d != width:
            raise ValueError(f"steerer_or_dict: the steerer for layer {index} has hidden size {params.d}, but "
                             f"{type(model).__name__} has hidden size {width}")
        if _already_patched(layer_modules[index]):
            raise RuntimeError(f"model: layer {index} is already patched by FineSteer; remove that patch (handle."
                               "remove() or finesteer.unpatch_model(model)) first")
        device, dtype = _placement(layer_modules[index], index)
        sites[index] = _Site(index, _prepare(params, device, dtype, alpha))
    return PatchHandle(model, sites, mode, _owner_of(model, layer_modules), layer_modules)


def unpatch_model(model: torch.nn.Module) -> int:
    """Remove every FineSteer patch from ``model``; returns how many patches were removed."""
    handles = []
    for module in model.modules():
        for fn in list(module._forward_hooks.values()):
            if isinstance(fn, _LayerHook) and fn.handle not in handles:
                handles.append(fn.handle)
    for handle in handles:
        handle.remove()
    return len(handles)
