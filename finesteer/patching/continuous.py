"""Steering inside transformers' continuous batching (``generate_batch``, ``init_continuous_batching``,
``continuous_batching_context_manager``), per request, with a patched `SteererBank`.

There the model sees packed forwards: every request's new tokens one after the other in one row of shape
``(1, total, d)``, requests joining and leaving between steps, prompts possibly split over several steps (chunked
prefill), paged attention. The decoder layers cannot tell which request a row belongs to, so the patch records it
where the batch is prepared: it wraps, on the instances it creates and nowhere globally,

* ``model.init_continuous_batching`` (every entry point goes through it) and ``model.generate_batch`` (to take a
  ``steerers=[name or None per input]`` argument);
* on the manager: ``add_request(..., steerer=name)`` and ``add_requests(..., steerers=[...])`` (the steerer travels
  with the request id), and ``_create_batch_processor``, to wrap the batch processor's
  ``inputs_and_outputs.prepare_batch_tensors``: before each forward it gives, in order, each request's id, its
  segment of the packed rows, how many of its tokens are cached, and whether the segment ends its prompt.

From that, per forward (host side, before the forward runs): token mode gets a bank index per packed row; query
mode gets per request a *slot* in a table of per-request edits (``delta`` rows, one table per steered layer): a
request whose prompt ends in this segment is synthesised at the segment's last row (its anchor) with its own
steerer and its delta stored in its slot; every later row of that request (decode steps, other requests coming
and going meanwhile) adds its slot's delta; a request's slot is freed when it finishes. The rows of a prompt chunk
that ends before the anchor are left unsteered, as with ``generate(prefill_chunk_size=...)``. Forked requests
(``num_return_sequences``) inherit their parent's slot contents. Prefix sharing between requests is turned off for
managers created under the patch: a cached prefix's keys and values depend on the steerer that computed them.

Not run here (no GPU): CUDA graphs and async batching of continuous batching (the per-forward index tensors are
rebuilt each step, which a captured graph would not see; docs/serving.md has the design that fixes it).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

import finesteer_kernels

CHILD = "__child#"  # transformers names forked requests f"{parent}__child#{i}"


@dataclasses.dataclass
class PackedBatch:
    """One prepared forward: per packed row its steerer (token mode) or its request's slot (query mode), and the
    anchors to synthesise (query mode), as device tensors."""

    row_steerer: torch.Tensor  # (rows,) global steerer index per packed row, -1 = none
    row_slot: torch.Tensor  # (rows,) slot of the row's request, -1 = not (yet) steered
    anchor_rows: torch.Tensor  # (A,) packed row of each new anchor
    anchor_slots: torch.Tensor  # (A,) slot it fills
    anchor_steerers: torch.Tensor  # (A,) global steerer index
    copies: list  # [(parent slot, child slot)] for forked requests


class ContinuousSteering:
    """The continuous-batching side of a `BankHandle`: the wrappers it installs and the per-request state."""

    def __init__(self, handle):
        self.handle = handle
        self.request_steerer: dict = {}  # request id -> global steerer index
        self.slots: dict = {}  # request id -> slot (query mode)
        self.slot_states: dict = {}  # request id -> its RequestState (to see it finish)
        self.free: list = []
        self.capacity = 0
        self.batches: dict = {}  # key of the forward's cu_seq_lens_q -> PackedBatch
        self.pending_steerers: Optional[list] = None  # generate_batch(steerers=...) for its add_requests
        self._restore: list = []
        self._install(handle.model)

    # ---- wrappers -------------------------------------------------------------------------------------------
    def _wrap(self, obj, name: str, make):
        """Replace ``obj.name`` by ``make(original)`` on the instance; undone by `remove`."""
        original = getattr(obj, name)
        had_own = name in vars(obj)
        setattr(obj, name, functools.wraps(original)(make(original)))
        self._restore.append((obj, name, original if had_own else None))

    def _install(self, model) -> None:
        if callable(getattr(model, "init_continuous_batching", None)):
            self._wrap(model, "init_continuous_batching", self._init_wrapper)
        if callable(getattr(model, "generate_batch", None)):
            self._wrap(model, "generate_batch", self._generate_batch_wrapper)

    def remove(self) -> None:
        for obj, name, original in reversed(self._restore):
            if original is None:
                vars(obj).pop(name, None)
            else:
                setattr(obj, name, original)
        self._restore = []
        self.batches.clear()
        self.slots.clear()
        self.slot_states.clear()

    def _generate_batch_wrapper(self, original):
        def generate_batch(inputs, *args, steerers=None, **kwargs):
            if steerers is not None and len(steerers) != len(inputs):
                raise ValueError(f"steerers: {len(steerers)} names for {len(inputs)} inputs; give one per input")
            self.pending_steerers = None if steerers is None else self.handle.steerers.indices(steerers)
            try:
                return original(inputs, *args, **kwargs)
            finally:
                self.pending_steerers = None
        return generate_batch

    def _init_wrapper(self, original):
        def init_continuous_batching(*args, **kwargs):
            manager = original(*args, **kwargs)
            if not getattr(manager, "_finesteer_wrapped", False):
                manager._finesteer_wrapped = True
                manager.continuous_batching_config.allow_block_sharing = False  # a prefix's KV depends on the steerer
                manager._use_prefix_sharing = False
                self._wrap(manager, "add_request", self._add_request_wrapper)
                self._wrap(manager, "add_requests", self._add_requests_wrapper)
                self._wrap(manager, "_create_batch_processor", self._processor_wrapper)
            return manager
        return init_continuous_batching

    def _add_request_wrapper(self, original):
        def add_request(input_ids, request_id=None, *args, steerer=None, **kwargs):
            index = self.handle.steerers.index_of(steerer)
            request_id = original(input_ids, request_id, *args, **kwargs)
            if request_id is not None and steerer is not None:
                self.request_steerer[request_id] = index
            return request_id
        return add_request

    def _add_requests_wrapper(self, original):
        def add_requests(inputs, *args, steerers=None, **kwargs):
            indices = self.pending_steerers if steerers is None else self.handle.steerers.indices(steerers)
            request_ids = original(inputs, *args, **kwargs)
            if indices is not None:
                if len(indices) != len(request_ids):
                    raise ValueError(f"steerers: {len(indices)} names for {len(request_ids)} requests")
                self.request_steerer.update(zip(request_ids, indices))
            return request_ids
        return add_requests

    def _processor_wrapper(self, original):
        def create_batch_processor(*args, **kwargs):
            processor = original(*args, **kwargs)
            io = processor.inputs_and_outputs
            if not getattr(io, "_finesteer_wrapped", False):
                io._finesteer_wrapped = True
                self._wrap(io, "prepare_batch_tensors", functools.partial(self._prepare_wrapper, io=io))
            return processor
        return create_batch_processor

    def _prepare_wrapper(self, original, io):
        def prepare_batch_tensors(requests_in_batch, *args, **kwargs):
            # a segment that yields a token while the request has generated none ends its prompt
            layout = [(fs.state.request_id, fs.state, fs.query_length,
                       fs.has_new_token and fs.state.generated_len() == 0) for fs in requests_in_batch]
            original(requests_in_batch, *args, **kwargs)
            self.batches = {_forward_key(io): self._pack(layout, io)}
        return prepare_batch_tensors

    # ---- per forward ----------------------------------------------------------------------------------------
    def _steerer_of(self, request_id: str) -> int:
        if request_id in self.request_steerer:
            return self.request_steerer[request_id]
        if CHILD in request_id:
            return self._steerer_of(request_id.split(CHILD)[0])
        return self.handle.steerers.index_of(self.handle.steerers.default)

    def _new_slot(self, request_id: str, state) -> int:
        slot = self.free.pop() if self.free else self.capacity
        self.capacity = max(self.capacity, slot + 1)
        self.slots[request_id] = slot
        self.slot_states[request_id] = state
        return slot

    def _pack(self, layout: list, io) -> PackedBatch:
        """Host side, once per forward: free the slots of finished requests, give new anchors a slot, and map every
        packed row to its steerer and slot."""
        from transformers.generation.continuous_batching.requests import RequestStatus

        for request_id, state in list(self.slot_states.items()):
            if state.status in (RequestStatus.FINISHED, RequestStatus.FAILED):
                self.free.append(self.slots.pop(request_id))
                del self.slot_states[request_id]
                self.request_steerer.pop(request_id, None)
        row_steerer, row_slot, anchors, copies = [], [], [], []
        query = self.handle.mode == "query"
        for request_id, state, length, ends_prompt in layout:
            steerer = -1 if request_id.startswith("__warmup") else self._steerer_of(request_id)
            slot = self.slots.get(request_id, -1)
            if query and steerer >= 0 and slot < 0:
                parent = request_id.split(CHILD)[0] if CHILD in request_id else None
                if parent is not None and parent in self.slots:  # a fork: same prompt, same anchor
                    slot = self._new_slot(request_id, state)
                    copies.append((self.slots[parent], slot))
                elif ends_prompt:
                    slot = self._new_slot(request_id, state)
                    anchors.append((len(row_slot) + length - 1, slot, steerer))
            row_steerer += [steerer] * length
            row_slot += [slot] * length
        device = io.input_ids.device
        as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
        return PackedBatch(as_tensor(row_steerer), as_tensor(row_slot), as_tensor([a[0] for a in anchors]),
                           as_tensor([a[1] for a in anchors]), as_tensor([a[2] for a in anchors]), copies)

    def begin_forward(self, reader, args: tuple, kwargs: dict) -> bool:
        """The owner's pre-hook: a packed forward of a wrapped manager gets its `PackedBatch` as context."""
        cu_seq_lens = reader.get(args, kwargs, "cu_seq_lens_q")
        if cu_seq_lens is None:
            return False
        from .forward_context import ForwardContext

        packed = self.batches.get(cu_seq_lens.data_ptr())
        if packed is None:
            raise RuntimeError("continuous batching: a packed forward whose requests this patch did not see; start "
                               "the manager (generate_batch, init_continuous_batching) while the bank is patched")
        self.handle._one_thread.enter("model forward")  # left in _end_forward, as for any forward
        self.handle._context = ForwardContext(None, 0, None, derived={"packed": packed})
        return True

    @staticmethod
    def batch_of(ctx) -> Optional[PackedBatch]:
        return None if ctx is None else ctx.derived.get("packed")

    def steer_tokens(self, site, hidden: torch.Tensor, packed: PackedBatch, in_place: bool) -> torch.Tensor:
        rows = hidden.view(-1, hidden.shape[-1])
        index = _padded(site.local(packed.row_steerer), rows.shape[0])
        steer = finesteer_kernels.steer_bank_ if in_place else finesteer_kernels.steer_bank
        return steer(rows, site.bank, index).view(hidden.shape)

    def steer_query(self, site, hidden: torch.Tensor, packed: PackedBatch, in_place: bool) -> torch.Tensor:
        rows = hidden.view(-1, hidden.shape[-1])
        if site.slot_delta is None or site.slot_delta.shape[0] < self.capacity:
            grown = rows.new_zeros(max(self.capacity, 8, 2 * (0 if site.slot_delta is None else
                                                           site.slot_delta.shape[0])), rows.shape[1],
                                   dtype=torch.float32)
            if site.slot_delta is not None:
                grown[:site.slot_delta.shape[0]] = site.slot_delta
            site.slot_delta = grown
        for parent, child in packed.copies:
            site.slot_delta[child] = site.slot_delta[parent]
        if packed.anchor_rows.numel():
            index = site.local(packed.anchor_steerers)
            coef = finesteer_kernels.synthesize_bank(rows[packed.anchor_rows], site.bank, index)
            site.slot_delta[packed.anchor_slots] = finesteer_kernels.bank_coef_delta(coef, site.bank, index)
        steered_here = site.local(packed.row_steerer) >= 0  # the request's steerer has a part at this layer
        row_slot = _padded(torch.where(steered_here, packed.row_slot, -1), rows.shape[0])
        apply = finesteer_kernels.apply_delta_ if in_place else finesteer_kernels.apply_delta
        return apply(rows, site.slot_delta, row_slot).view(hidden.shape)


def _padded(index: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row index for ``rows`` packed rows: rows past the prepared ones (padding to a static size) get -1."""
    if index.shape[0] >= rows:
        return index[:rows]
    return torch.cat([index, index.new_full((rows - index.shape[0],), -1)])


def _forward_key(io) -> int:
    """The address of the cu_seq_lens_q tensor the next forward receives (async IOs: the current pair's device
    side)."""
    pairs = getattr(io, "io_pairs", None)
    if pairs is not None:
        io = pairs[io.current_pair].device_io
    return io.cumulative_seqlens_q.data_ptr()
