"""`PatchHandle`: the live patch of one model. Its hooks steer each patched layer's output (token mode or query mode),
keep the per-sequence query-mode state, and wrap ``model.generate`` so that forwards know the prompt length and
beam count.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING, Optional

import torch

import finesteer_kernels
from finesteer_kernels import SteerParams
from finesteer_kernels.validation import HIDDEN_DTYPES

from .continuous import ContinuousSteering
from .forward_context import (ArgReader, ForwardContext, GenerateCall, as_mask, generate_call, new_token_count,
                              reported_length, rows_for)
from .threads import OneThreadAtATime
from .wrappers import unwrap, wrap

if TYPE_CHECKING:
    from .fused_norm import FusedNorm

MODES = ("query", "token")


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


def _padding_mask(ctx: Optional[ForwardContext], hidden: torch.Tensor) -> Optional[torch.Tensor]:
    """Token mode: the (B, T) real-token mask (padding positions stay as they are; the kernels skip rows it marks
    False), or None when the forward has no mask."""
    return None if ctx is None or ctx.mask is None else rows_for(ctx, hidden).valid


def _share_within_beams(coef: torch.Tensor, num_beams: int) -> torch.Tensor:
    """Give every beam of a prompt the coefficients of its first beam, so that beam search's reordering of rows
    (always within a prompt's beams) leaves each row's coefficients exactly right. A tensor of its own: the
    next prefill copies into it (`_store_coef`), which a view with stride 0 over the beams would refuse."""
    if num_beams <= 1:
        return coef
    batch = coef.shape[0]
    if batch % num_beams:
        raise RuntimeError(f"beam search: {batch} rows are not a multiple of num_beams={num_beams}")
    return coef[::num_beams].repeat_interleave(num_beams, dim=0)


def _store_coef(cached: Optional[torch.Tensor], coef: torch.Tensor) -> torch.Tensor:
    """The new prefill's coefficients, written into the cached tensor when it fits: a decode step captured in a
    CUDA graph reads that memory on every replay, so the next prompt's prefill must update it in place (also after
    `PatchHandle.reset`). Not when autograd tracks either one (an in-place copy would chain the graphs of
    successive prefills). A tensor made under ``torch.inference_mode()`` is updated inside it, the only place torch
    allows that, when this prefill runs outside it."""
    if cached is None or cached.shape != coef.shape or cached.requires_grad or coef.requires_grad:
        return coef
    if cached.is_inference() and not torch.is_inference_mode_enabled():
        with torch.inference_mode():
            return cached.copy_(coef)
    return cached.copy_(coef)


class LayerHook:
    """Forward hook on one decoder layer. A class (not a closure) so `unpatch_model` can recognise it."""

    def __init__(self, handle: "PatchHandle", site: "Site"):
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
        self.reader = ArgReader(owner.forward)

    def __call__(self, module, args, kwargs):
        self.handle._begin_forward(self.reader, args, kwargs)


class _OwnerPostHook:
    """Forward hook on the same module (run even when the forward raises an Exception): the forward's context ends
    with it."""

    def __init__(self, handle: "PatchHandle"):
        self.handle = handle

    def __call__(self, module, args, output):
        self.handle._end_forward()


def _end_on_interrupt(handle: "PatchHandle"):
    """The owner's forward, wrapped: torch runs ``always_call`` hooks only for an ``Exception``, so a
    KeyboardInterrupt (or another BaseException) inside the forward ends the forward's context here instead; an
    Exception is left to `_OwnerPostHook` (one release either way)."""
    def make(forward):
        def guarded(*args, **kwargs):
            try:
                return forward(*args, **kwargs)
            except BaseException as e:
                if not isinstance(e, Exception):
                    handle._end_forward()
                raise
        return guarded
    return make


@dataclasses.dataclass
class Site:
    """One patched layer: its parameters (on the layer's device) and the query-mode cache."""

    layer: int
    params: SteerParams
    coef: Optional[torch.Tensor] = None  # (B, K+k) fp32 per sequence, from the last prefill
    coef_memory: Optional[torch.Tensor] = None  # where prefills write coef; kept by reset(), see _store_coef
    delta: Optional[torch.Tensor] = None  # (B, d) fp32 = coef @ W_out: a decode step only adds it
    delta_memory: Optional[torch.Tensor] = None  # where prefills write delta (as coef_memory)
    fused: Optional[FusedNorm] = None  # fuse_norm: the next norm that takes this layer's edit (fused_norm.py)
    slot_delta: Optional[torch.Tensor] = None  # continuous batching, query mode: (capacity, d) fp32 delta per slot

    def local(self, global_index: torch.Tensor) -> torch.Tensor:
        """This layer's index of a request's steerer: a plain patch has one, index 0 everywhere (-1: none)."""
        return global_index


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
        self._context: Optional[ForwardContext] = None
        self._generate_stack: list = []  # a GenerateCall per active (possibly nested) generate call
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
                LayerHook(self, site), with_kwargs=True, prepend=True))
        self._wrappers = [wrap(owner, "forward", _end_on_interrupt(self))]
        self.active = True
        if callable(getattr(model, "generate", None)):
            self._wrappers.append(wrap(model, "generate", self._generate_wrapper))
        self.continuous: Optional[ContinuousSteering] = self._continuous_steering()

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
        if self.continuous is not None:
            self.continuous.remove()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for record in reversed(self._wrappers):
            unwrap(record)
        self._wrappers = []
        self.reset()
        for site in self._sites.values():
            site.coef_memory = site.delta_memory = None
            if site.fused is not None:
                site.fused.uninstall()
                site.fused = None
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle(mode={self.mode!r}, layers={list(self.layers)}, {state})"

    # ---- internals ------------------------------------------------------------------------------------------
    def _site(self, layer: int) -> Site:
        if layer not in self._sites:
            raise KeyError(f"layer: {layer} is not patched by this handle (patched: {list(self.layers)})")
        return self._sites[layer]

    def _continuous_steering(self) -> Optional[ContinuousSteering]:
        """Continuous batching: query mode keeps a delta per request (token mode: every packed row gates on
        itself, nothing to keep)."""
        return ContinuousSteering(self) if self.mode == "query" else None

    def _begin_forward(self, reader: ArgReader, args: tuple, kwargs: dict) -> None:
        if self.continuous is not None and self.continuous.begin_forward(reader, args, kwargs):
            return  # continuous batching, a packed forward: its requests' rows and slots are its context
        self._one_thread.enter("model forward")  # left in _end_forward, which runs even if this raises
        if reader.get(args, kwargs, "cu_seq_lens_q") is not None:  # continuous batching: requests packed in one row
            self._context = ForwardContext(None, 0, None)  # token mode: every packed row gates on itself
            return
        mask = as_mask(reader.get(args, kwargs, "attention_mask"))
        cache = reader.get(args, kwargs, "cache", "past_key_values")
        call = self._generate_stack[-1] if self._generate_stack else None
        past, key_start = 0, None
        if cache is not None:
            length = reported_length(cache)
            if isinstance(length, int):
                past = length
            else:
                # Counted instead: a cache first seen inside generate was made by it (empty); a cache handed to
                # generate was measured when the call began.
                past = self._cache_fill.get(cache, 0 if call is not None else None)
                if isinstance(length, torch.Tensor) and mask is not None and mask.dim() == 4:
                    key_start = length.clone()  # the layers advance it in place
            new_tokens = new_token_count(reader, args, kwargs)
            if past is not None and new_tokens is not None:
                self._cache_fill[cache] = past + new_tokens
        if past is None and mask is None and self.mode == "query":
            raise ValueError("cache: it keeps its length on the device and holds tokens this patch did not see "
                             "(filled before patching or through another model): run the prompt through the patched "
                             "model with a fresh cache (or after cache.reset() and handle.reset()), or pass a 2-D "
                             "attention_mask of shape (batch, past + new)")
        self._context = ForwardContext(mask, past, call, key_start)
        self._disarm_fused_norms()

    def _end_forward(self) -> None:
        if self._one_thread.held_here():  # not in a thread whose _begin_forward was refused
            self._context = None
            self._disarm_fused_norms()  # a forward that raised between a layer and its norm leaves none armed
            self._one_thread.exit()

    def _disarm_fused_norms(self) -> None:
        for site in self._sites.values():
            if site.fused is not None:
                site.fused.disarm()

    def _steer_output(self, site: Site, output, layer_input):
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
        packed = ContinuousSteering.batch_of(ctx)  # a packed forward of continuous batching, per request
        if packed is not None:
            steer = self.continuous.steer_query if self.mode == "query" else self.continuous.steer_tokens
            steered = steer(site, hidden, packed, in_place)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered
        if site.fused is not None and ctx is not None and in_place:
            site.fused.arm(hidden)  # fuse_norm: the next norm edits ``hidden`` in place (fused_norm.py)
            return output
        if self.mode == "token":
            steered = self._steer_tokens(site, hidden, ctx, in_place)
        else:
            steered = self._steer_query(site, hidden, ctx, in_place)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    def _steer_into_norm(self, site: Site, hidden: torch.Tensor, norm) -> Optional[torch.Tensor]:
        """fuse_norm: steer ``hidden`` (the layer's output, unedited) in place and return its norm in one op, or
        None when nothing is to be added yet (a chunked prefill before the anchor)."""
        ctx = self._context
        if self.mode == "token":
            return finesteer_kernels.steer_rmsnorm_(hidden, site.params, norm, row_mask=_padding_mask(ctx, hidden))
        found = self._query_delta(site, hidden, ctx)
        if found is None:
            return None
        delta, row_to_seq = found
        return finesteer_kernels.apply_delta_rmsnorm_(hidden, delta, norm, row_to_seq)

    def _steer_tokens(self, site: Site, hidden: torch.Tensor, ctx: Optional[ForwardContext],
                      in_place: bool) -> torch.Tensor:
        steer = finesteer_kernels.steer_ if in_place else finesteer_kernels.steer
        return steer(hidden, site.params, row_mask=_padding_mask(ctx, hidden))

    def _steer_query(self, site: Site, hidden: torch.Tensor, ctx: Optional[ForwardContext],
                     in_place: bool) -> torch.Tensor:
        found = self._query_delta(site, hidden, ctx)
        if found is None:
            return hidden
        apply = finesteer_kernels.apply_delta_ if in_place else finesteer_kernels.apply_delta
        return apply(hidden, *found)

    def _query_delta(self, site: Site, hidden: torch.Tensor, ctx: Optional[ForwardContext]) -> Optional[tuple]:
        """``(delta, row_to_seq)`` to add to ``hidden``: at decode the delta cached at prefill (``row_to_seq``
        None: row b gets delta[b]), at prefill a new one (synthesised at the anchors and cached); None while the
        anchor has not come (a chunked prefill's early chunks)."""
        rows = rows_for(ctx, hidden)
        if rows.pending:
            return None
        if rows.decode:
            # The fast path: one op on the per-sequence delta cached at prefill (every decode token is a real token:
            # padding only ever sits in the prompt).
            self._check_decode(site, hidden.shape[0])
            return site.delta, self._decode_rows(site, hidden)
        row_to_seq = self._prefill(site, hidden, ctx, rows)  # sets site.delta
        return site.delta, row_to_seq

    def _anchor_delta(self, site: Site, anchors: torch.Tensor, steerers: torch.Tensor) -> torch.Tensor:
        """Continuous batching: the delta of each request whose prompt ends in this forward, from its anchor row
        (``steerers``: each one's global steerer index; a plain patch's are all 0)."""
        return finesteer_kernels.coef_delta(finesteer_kernels.synthesize(anchors, site.params), site.params)

    def _decode_rows(self, site: Site, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """A decode step's ``row_to_seq``: None, row b gets delta[b]."""
        return None

    def _prefill(self, site: Site, hidden: torch.Tensor, ctx: Optional[ForwardContext], rows) -> torch.Tensor:
        """Synthesise at the anchors, cache coefficients and delta; -> the prefill's ``row_to_seq``."""
        anchors = hidden[rows.batch_index, rows.anchor]  # (B, d)
        coef = finesteer_kernels.synthesize(anchors, site.params)
        coef = torch.where(rows.anchor_found, coef, 0.0)  # a row with no real prompt token gets no edit
        coef = _share_within_beams(coef, rows.num_beams)
        self._cache_prefill(site, coef, finesteer_kernels.coef_delta(coef, site.params))
        return rows.row_to_seq

    def _check_decode(self, site: Site, batch: int) -> None:
        """A query-mode decode step may use the coefficients cached at prefill: there are some, this thread made
        them, and they have one row per sequence of this batch."""
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

    def _cache_prefill(self, site: Site, coef: torch.Tensor, delta: torch.Tensor) -> None:
        """Keep a prefill's per-sequence coefficients and delta for its decode steps (in place, see `_store_coef`)."""
        site.coef = site.coef_memory = _store_coef(site.coef_memory, coef)
        site.delta = site.delta_memory = _store_coef(site.delta_memory, delta)
        self._coef_thread = self._one_thread.ident()

    # ---- generate -------------------------------------------------------------------------------------------
    def _generate_begins(self, call: GenerateCall) -> None:
        """A generate call is about to run (a `BankHandle` binds its steerer assignment to it here)."""

    def _generate_wrapper(self, original):
        """``model.generate``, wrapped on this instance so forwards know the prompt length and beam count."""
        model = self.model
        reader = ArgReader(original)
        handle = self

        def generate(*args, **kwargs):
            handle._one_thread.enter("model.generate")
            try:
                return _run(*args, **kwargs)
            finally:
                handle._one_thread.exit()

        def _run(*args, **kwargs):
            call = generate_call(model, reader, args, kwargs)
            handle._generate_begins(call)
            handle._generate_stack.append(call)
            given_cache = kwargs.get("cache", kwargs.get("past_key_values"))
            length = reported_length(given_cache) if given_cache is not None else None
            if isinstance(length, torch.Tensor):
                # the one host read: once per call, before any forward, never in a hook
                handle._cache_fill[given_cache] = int(length)
            try:
                return original(*args, **kwargs)
            finally:
                handle._generate_stack.pop()

        return generate
