"""Steering inside transformers' continuous batching (``generate_batch``, ``init_continuous_batching``,
``continuous_batching_context_manager``), per request: with a patched `SteererBank` each request names its steerer;
a plain query-mode patch steers every request with its one steerer (index 0), with its own anchor.

There the model sees packed forwards: every request's new tokens one after the other in one row of shape
``(1, total, d)``, requests joining and leaving between steps, prompts possibly split over several steps (chunked
prefill), paged attention. The decoder layers cannot tell which request a row belongs to, so the patch records it
where requests enter and where the batch is prepared: it wraps, on the instances it creates and nowhere globally,

* ``model.init_continuous_batching`` (every entry point goes through it) and ``model.generate_batch`` (to take a
  ``steerers=[name or None per input]`` argument);
* on the manager: ``add_request(..., steerer=name)`` and ``add_requests(..., steerers=[...])``, and its input
  queue's ``put`` and ``get``: the request's steerer is recorded under its id *before* the request is queued (the
  manager's thread may schedule it at once), and the request counts as admitted when the manager takes it off;
* ``_create_batch_processor``, to wrap the batch processor's ``inputs_and_outputs.prepare_batch_tensors``: before
  each forward it gives, in order, each request's id, its segment of the packed rows, how many of its tokens are
  cached, and whether the segment ends its prompt.

From that, per forward (host side, before the forward runs): token mode gets a bank index per packed row; query
mode gets per request a *slot* in a table of per-request edits (``delta`` rows, one table per steered layer): a
request whose prompt ends in this segment is synthesised at the segment's last row (its anchor) with its own
steerer and its delta stored in its slot; every later row of that request (decode steps, other requests coming
and going meanwhile) adds its slot's delta. The rows of a prompt chunk that ends before the anchor are left
unsteered, as with ``generate(prefill_chunk_size=...)``. Forked requests (``num_return_sequences``) take their
parent's steerer. Prefix sharing between requests is turned off for managers created under the patch: a cached
prefix's keys and values depend on the steerer that computed them.

A request's steerer and slot are kept until the scheduler no longer knows its id (finished, failed or cancelled):
when the manager runs out of KV cache it may *soft reset* a request (drop its cache and queue it again under the
same id, its generated tokens now part of its prompt), and the re-prefill must add the same delta to the same
positions as before (`Request.steer_from`); children forked from a request that has finished keep its steerer.

Not run here (no GPU): CUDA graphs and async batching of continuous batching (the per-forward index tensors are
rebuilt each step, which a captured graph would not see; docs/serving.md has the design that fixes it).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from typing import Optional

import torch

import finesteer_kernels

from .forward_context import ForwardContext
from .wrappers import unwrap, wrap, wrapped_by

CHILD = "__child#"  # transformers names forked requests f"{parent}__child#{i}"
WARMUP = "__warmup"  # and its warm-up requests f"__warmup_{status}_{i}__"


@dataclasses.dataclass
class Request:
    """What the patch keeps for one request id, from its submission until the scheduler forgets the id."""

    steerer: int  # global steerer index, -1 = none
    children: int = 0  # forks transformers makes of it (num_return_sequences - 1)
    admitted: bool = False  # taken off the manager's input queue: from then on the scheduler knows it until it ends
    slot: int = -1  # query mode: its row of the per-layer delta tables, from its anchor on
    steer_from: int = 0  # query mode: the first position that gets the slot's delta (earlier prompt chunks: none)


@dataclasses.dataclass
class Segment:
    """One request's rows of a packed forward."""

    request_id: str
    past: int  # tokens of the request already in the cache
    length: int  # its rows in this forward
    ends_prompt: bool  # the segment ends the request's prompt (its last row is the anchor)


@dataclasses.dataclass
class PackedBatch:
    """One prepared forward: per packed row its steerer (token mode) or its request's slot (query mode), and the
    anchors to synthesise (query mode), as device tensors."""

    row_steerer: torch.Tensor  # (rows,) global steerer index per packed row, -1 = none
    row_slot: torch.Tensor  # (rows,) slot of the row's request, -1 = not (yet) steered
    anchor_rows: torch.Tensor  # (A,) packed row of each new anchor
    anchor_slots: torch.Tensor  # (A,) slot it fills
    anchor_steerers: torch.Tensor  # (A,) global steerer index
    copies: list  # [(parent slot, child slot)] for requests forked after their parent's anchor


class ContinuousSteering:
    """The continuous-batching side of a `BankHandle` (or of a plain query-mode `PatchHandle`, whose one steerer has
    index 0): the wrappers it installs and the per-request state."""

    def __init__(self, handle, bank=None):
        self.handle = handle
        self.bank = bank  # the handle's SteererBank, or None: one steerer, which every request gets
        self.requests: dict = {}  # request id -> Request
        self.free: list = []  # released slots
        self.capacity = 0  # slots ever handed out
        self.batches: dict = {}  # key of the forward's cu_seq_lens_q -> PackedBatch
        self._lock = threading.Lock()  # requests arrive from the callers' threads, batches form in the manager's
        self._submitting = threading.local()  # the steerer of the add_request / add_requests call on this thread
        self._wrappers: list = []
        model = handle.model
        if callable(getattr(model, "init_continuous_batching", None)):
            self._wrap(model, "init_continuous_batching", self._init_wrapper)
        if callable(getattr(model, "generate_batch", None)):
            self._wrap(model, "generate_batch", self._generate_batch_wrapper)

    def _wrap(self, obj, name: str, make) -> None:
        self._wrappers.append(wrap(obj, name, make))

    def remove(self) -> None:
        for record in reversed(self._wrappers):
            unwrap(record)
        self._wrappers = []
        self.batches.clear()
        self.requests.clear()
        self.free, self.capacity = [], 0

    @property
    def _default(self) -> int:
        return 0 if self.bank is None else self.bank.index_of(self.bank.default)

    def _indices(self, names, argument: str) -> list:
        if self.bank is None:
            raise TypeError(f"{argument}: this patch holds one steerer and steers every request with it; patch a "
                            "finesteer.SteererBank to choose a steerer per request")
        return [self.bank.index_of(names)] if argument == "steerer" else self.bank.indices(names)

    # ---- wrappers: requests in --------------------------------------------------------------------------------
    def _generate_batch_wrapper(self, original):
        def generate_batch(inputs, *args, steerers=None, **kwargs):
            if steerers is not None and len(steerers) != len(inputs):
                raise ValueError(f"steerers: {len(steerers)} names for {len(inputs)} inputs; give one per input")
            self._submitting.batch = None if steerers is None else self._indices(steerers, "steerers")
            try:
                return original(inputs, *args, **kwargs)
            finally:
                self._submitting.batch = None
        return generate_batch

    def _init_wrapper(self, original):
        def init_continuous_batching(*args, **kwargs):
            manager = original(*args, **kwargs)
            if not wrapped_by(manager, "add_request", self._wrappers):
                manager.continuous_batching_config.allow_block_sharing = False  # a prefix's KV depends on the steerer
                manager._use_prefix_sharing = False
                self._wrap(manager, "add_request", self._add_request_wrapper)
                self._wrap(manager, "add_requests", self._add_requests_wrapper)
                self._wrap(manager.input_queue, "put", self._put_wrapper)
                self._wrap(manager.input_queue, "get", self._get_wrapper)
                self._wrap(manager, "_create_batch_processor", self._processor_wrapper)
            return manager
        return init_continuous_batching

    def _add_request_wrapper(self, original):
        def add_request(input_ids, request_id=None, *args, steerer=None, **kwargs):
            if steerer is not None:
                index = self._indices(steerer, "steerer")[0]
            else:  # inside add_requests: the steerer given for this input
                queued = (getattr(self._submitting, "by_input", None) or {}).get(id(input_ids))
                index = queued.popleft() if queued else None
            self._submitting.steerer = index
            try:
                return original(input_ids, request_id, *args, **kwargs)
            finally:
                self._submitting.steerer = None
        return add_request

    def _add_requests_wrapper(self, original):
        def add_requests(inputs, *args, steerers=None, **kwargs):
            indices = getattr(self._submitting, "batch", None) if steerers is None else \
                self._indices(steerers, "steerers")
            if indices is not None and len(indices) != len(inputs):
                raise ValueError(f"steerers: {len(indices)} names for {len(inputs)} requests; give one per input")
            # add_requests calls add_request once per input (in an order of its choosing): match them by identity
            by_input = collections.defaultdict(collections.deque)
            for input_ids, index in zip(inputs, indices or ()):
                by_input[id(input_ids)].append(index)
            self._submitting.by_input = by_input
            try:
                return original(inputs, *args, **kwargs)
            finally:
                self._submitting.by_input = None
        return add_requests

    def _put_wrapper(self, original):
        def put(state, *args, **kwargs):
            """Record the request's steerer before it is queued: the manager may schedule it at once."""
            index = getattr(self._submitting, "steerer", None)
            request = Request(self._default if index is None else index, children=state.num_children)
            with self._lock:
                self._release(self.requests.pop(state.request_id, None))  # an id used again
                self.requests[state.request_id] = request
            try:
                return original(state, *args, **kwargs)
            except BaseException:
                with self._lock:
                    if self.requests.get(state.request_id) is request:
                        del self.requests[state.request_id]
                raise
        return put

    def _get_wrapper(self, original):
        def get(*args, **kwargs):
            state = original(*args, **kwargs)
            with self._lock:
                request = self.requests.get(getattr(state, "request_id", None))
                if request is not None:
                    request.admitted = True
            return state
        return get

    # ---- wrappers: batches out ----------------------------------------------------------------------------------
    def _processor_wrapper(self, original):
        def create_batch_processor(*args, **kwargs):
            processor = original(*args, **kwargs)  # new, or the manager's last one reset: its scheduler is empty
            with self._lock:
                self._forget(processor.scheduler)  # requests of an earlier session
            io = processor.inputs_and_outputs
            if not wrapped_by(io, "prepare_batch_tensors", self._wrappers):
                self._wrap(io, "prepare_batch_tensors",
                           functools.partial(self._prepare_wrapper, io=io, processor=processor))
            return processor
        return create_batch_processor

    def _prepare_wrapper(self, original, io, processor):
        def prepare_batch_tensors(requests_in_batch, *args, **kwargs):
            # a segment that yields a token while the request has generated none ends its prompt
            layout = [Segment(fs.state.request_id, fs.state.position_offset, fs.query_length,
                              fs.has_new_token and fs.state.generated_len() == 0) for fs in requests_in_batch]
            original(requests_in_batch, *args, **kwargs)
            with self._lock:
                self._forget(processor.scheduler)
                packed = self._pack(layout, io)
            self.batches = {_forward_key(io): packed}
        return prepare_batch_tensors

    # ---- per-request state (called with the lock held) --------------------------------------------------------
    def _release(self, request: Optional[Request]) -> None:
        if request is not None and request.slot >= 0:
            self.free.append(request.slot)

    def _forget(self, scheduler) -> None:
        """Drop the requests the scheduler no longer knows (finished, failed, cancelled; a soft-reset request is
        queued again under its id and stays), except a parent whose children still need its steerer or delta
        (children that did not fit in the cache at the fork wait to be prefilled from scratch, maybe after the
        parent finished). O(requests) per forward, as the scheduler's own pass over its waiting requests."""
        def known(request_id: str) -> bool:
            return request_id in scheduler.active_requests or request_id in scheduler.waiting_requests

        def needs_parent(child: str) -> bool:
            request = self.requests.get(child)
            return known(child) and (request is None or (request.steerer >= 0 and request.slot < 0 and
                                                         self.handle.mode == "query"))

        for request_id, request in list(self.requests.items()):
            if not request.admitted or known(request_id):
                continue
            if not any(needs_parent(f"{request_id}{CHILD}{i}") for i in range(request.children)):
                self._release(self.requests.pop(request_id))

    def _parent(self, request_id: str) -> Optional[Request]:
        return self.requests.get(request_id.split(CHILD)[0]) if CHILD in request_id else None

    def _request(self, request_id: str) -> Request:
        """The request's record; a fork (its parent's steerer), or a request queued before the patch, gets one now."""
        request = self.requests.get(request_id)
        if request is None:
            parent = self._parent(request_id)
            request = self.requests[request_id] = Request(self._default if parent is None else parent.steerer,
                                                          admitted=True)
        return request

    def _new_slot(self) -> int:
        slot = self.free.pop() if self.free else self.capacity
        self.capacity = max(self.capacity, slot + 1)
        return slot

    def _pack(self, layout: list, io) -> PackedBatch:
        """Host side, once per forward: give new anchors a slot, and map every packed row to its steerer and slot."""
        row_steerer, row_slot, anchors, copies = [], [], [], []
        query = self.handle.mode == "query"
        for segment in layout:
            if segment.request_id.startswith(WARMUP):
                row_steerer += [-1] * segment.length
                row_slot += [-1] * segment.length
                continue
            request = self._request(segment.request_id)
            if query and request.steerer >= 0 and request.slot < 0:
                parent = self._parent(segment.request_id)
                if parent is not None and parent.slot >= 0:
                    # a fork: same prompt, same steerer, so its parent's delta from the same position on (also for
                    # a child prefilled from scratch, whose own prompt chunks may differ from its parent's)
                    request.slot, request.steer_from = self._new_slot(), parent.steer_from
                    copies.append((parent.slot, request.slot))
                elif segment.ends_prompt:
                    request.slot, request.steer_from = self._new_slot(), segment.past
                    anchors.append((len(row_slot) + segment.length - 1, request.slot, request.steerer))
            row_steerer += [request.steerer] * segment.length
            unsteered = min(max(request.steer_from - segment.past, 0), segment.length) if request.slot >= 0 \
                else segment.length  # a re-prefill after a soft reset: the first prompt chunks stay unsteered
            row_slot += [-1] * unsteered + [request.slot] * (segment.length - unsteered)
        device = io.input_ids.device
        as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
        return PackedBatch(as_tensor(row_steerer), as_tensor(row_slot), as_tensor([a[0] for a in anchors]),
                           as_tensor([a[1] for a in anchors]), as_tensor([a[2] for a in anchors]), copies)

    # ---- per forward --------------------------------------------------------------------------------------------
    def begin_forward(self, reader, args: tuple, kwargs: dict) -> bool:
        """The owner's pre-hook: a packed forward of a wrapped manager gets its `PackedBatch` as context."""
        cu_seq_lens = reader.get(args, kwargs, "cu_seq_lens_q")
        if cu_seq_lens is None:
            return False
        packed = self.batches.get(cu_seq_lens.data_ptr())
        if packed is None:
            raise RuntimeError("continuous batching: a packed forward whose requests this patch did not see; start "
                               "the manager (generate_batch, init_continuous_batching) while the model is patched")
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
        if packed.anchor_rows.numel():
            site.slot_delta[packed.anchor_slots] = self.handle._anchor_delta(site, rows[packed.anchor_rows],
                                                                             packed.anchor_steerers)
        for parent, child in packed.copies:  # after the anchors: a parent may have got its delta in this forward
            site.slot_delta[child] = site.slot_delta[parent]
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
