"""Per-request steering: a `SteererBank` of named steerers patched once, and a steerer (or none) chosen per row.

    bank = finesteer.SteererBank({"safety": safety, "truthful": truthful})      # Steerers (each knows its layer)
    with finesteer.patch_model(model, bank, mode="query") as handle:
        handle.assign(["safety", None, "truthful", "safety"])                    # one entry per prompt (row)
        out = model.generate(**batch, max_new_tokens=32)

Each steered layer holds one `finesteer_kernels.SteerBank` of the steerers that act there (a steerer may act at
several layers: give it as ``{layer: Steerer or SteerParams}``), so a mixed batch costs one launch per layer.
Token mode passes a per-row bank index to `steer_bank_`; query mode synthesises each sequence's coefficients with
its own steerer at its anchor (`synthesize_bank`), caches the per-sequence ``delta`` and adds it with the same
`apply_delta_` as a single steerer, so a decode step costs the same whatever the mix. Rows assigned None (or a
steerer that has no part at a layer) are left bit-identical there. Continuous batching (`generate_batch`,
`init_continuous_batching`) takes the steerer per request: `finesteer.patching.continuous`. See docs/serving.md.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Optional

import torch

import finesteer_kernels
from finesteer_kernels import SteerBank

from .layers import find_decoder_layers, hidden_size
from .continuous import ContinuousSteering
from .forward_context import ForwardContext, new_token_count
from .handle import PatchHandle, Site, _padding_mask, _share_within_beams
from .placement import check_free_layer, normalise_steerers, owner_of, placement, prepare


class SteererBank:
    """Named steerers for serving many users: ``{name: Steerer}`` or ``{name: {layer: Steerer or SteerParams}}``.

    ``default``: the name used for rows (requests) that are assigned nothing; None (the default) leaves them
    unsteered. Names are what `PatchHandle.assign`, ``generate_batch(steerers=...)`` and
    ``manager.add_request(steerer=...)`` take.
    """

    def __init__(self, steerers: Mapping, default: Optional[str] = None):
        if not isinstance(steerers, Mapping) or not steerers:
            raise TypeError("steerers: expected a non-empty dict {name: Steerer or {layer: Steerer/SteerParams}}")
        self.sites: dict = {}  # name -> {layer: SteerParams}
        for name, item in steerers.items():
            if not isinstance(name, str):
                raise TypeError(f"steerers: names are strings, got {name!r}")
            self.sites[name] = normalise_steerers(item, name=f"steerers[{name!r}]")
        self.names = tuple(self.sites)
        if default is not None and default not in self.sites:
            raise KeyError(f"default: {default!r} is not one of the bank's names {list(self.names)}")
        self.default = default

    @property
    def layers(self) -> tuple:
        return tuple(sorted({layer for layers in self.sites.values() for layer in layers}))

    def index_of(self, name: Optional[str]) -> int:
        """Global index of a name (-1 for None: no steering)."""
        if name is None:
            return -1
        if name not in self.sites:
            raise KeyError(f"steerer {name!r} is not in the bank (names: {list(self.names)}; None = no steering)")
        return self.names.index(name)

    def indices(self, names: Sequence) -> list:
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise TypeError("names: expected a list with one steerer name (or None) per row")
        return [self.index_of(n) for n in names]

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: layers {sorted(layers)}" for n, layers in self.sites.items())
        return f"SteererBank({{{parts}}}, default={self.default!r})"


@dataclasses.dataclass
class BankSite(Site):
    """A patched layer of a bank: the `SteerBank` of the steerers acting there and the map from the bank's global
    steerer index to this layer's (-1 where a steerer has no part here); `params` is the first steerer's, which
    the handle uses for device checks only."""

    bank: Optional[SteerBank] = None
    local_of: Optional[torch.Tensor] = None  # (S_global + 1,) int64: local index of global g at [g + 1]; [0] = -1
    local_key: tuple = ()  # the same map as a tuple (a cache key: layers with equal maps share plans)
    decode_map: Optional[torch.Tensor] = None  # query mode: (B,) row -> its delta row, -1 for unsteered sequences

    def local(self, global_index: torch.Tensor) -> torch.Tensor:
        return self.local_of[global_index + 1]


@dataclasses.dataclass(eq=False)
class Assignment:
    """The steerers `BankHandle.assign` was given for one batch of prompts: a global index per prompt, and the
    per-row index tensors made from it (per rows per prompt and device)."""

    indices: list
    tensors: dict = dataclasses.field(default_factory=dict)

    def per_row(self, rows_per_prompt: int, device) -> torch.Tensor:
        key = (rows_per_prompt, device)
        if key not in self.tensors:
            values = [g for g in self.indices for _ in range(rows_per_prompt)]
            self.tensors[key] = torch.tensor(values, dtype=torch.long, device=device)
        return self.tensors[key]


class BankHandle(PatchHandle):
    """The live patch of a `SteererBank`: a `PatchHandle` whose rows each get their own steerer.

    ``handle.assign(names)`` sets the steerer of each prompt (one name or None per prompt) of the next batch: the
    next ``generate`` call (expanded over the beams and returned sequences it asks for), or the next forward that
    starts on an empty cache and the forwards that continue its cache. A batch uses its names once: the next
    batch needs ``assign`` again (a stale assignment is refused, so no prompt gets steerers meant for another).
    Rows of a batch with no assignment (or after ``assign(None)``) get ``bank.default``.
    ``handle.params(layer)`` is the layer's `finesteer_kernels.SteerBank`."""

    def __init__(self, model, sites: dict, mode: str, owner, layer_modules, steerers: SteererBank):
        self.steerers = steerers
        self._assigned: Optional[Assignment] = None  # from assign(), for the next batch; None = the default
        self._assignment_used = False  # the last assign()'s names went to a batch already
        self._in_flight: Optional[Assignment] = None  # forwards outside generate: the batch whose cache they continue
        self._default_rows: dict = {}  # (rows, device) -> the default's index per row
        super().__init__(model, sites, mode, owner, layer_modules)

    # ---- public ---------------------------------------------------------------------------------------------
    def assign(self, names: Optional[Sequence]) -> "BankHandle":
        """One steerer name (or None) per prompt of the next batch; ``assign(None)``: the bank's default for every
        row from now on."""
        self._assigned = None if names is None else Assignment(self.steerers.indices(names))
        self._assignment_used = False
        return self

    def params(self, layer: int) -> SteerBank:
        return self._site(layer).bank

    # ---- rows -> steerers -----------------------------------------------------------------------------------
    def _pending_assignment(self, batch: str) -> Optional[Assignment]:
        """The last ``assign``'s names for a new batch (None: the default), refused once a batch has used them."""
        if self._assignment_used:
            raise ValueError(f"assign: the names given to handle.assign() went to an earlier batch; call "
                             f"handle.assign(names) with one name per prompt of this {batch} (assign(None): the "
                             "bank's default for every row), so that no prompt gets steerers meant for another")
        return self._assigned

    def _use(self, assignment: Optional[Assignment]) -> None:
        """A batch has used ``assignment``: if it is the last ``assign``'s, the next batch needs new names. Only
        after its count was checked: a call refused for a wrong count uses nothing."""
        if assignment is not None and assignment is self._assigned:
            self._assignment_used = True

    def _generate_begins(self, call) -> None:
        assignment = self._pending_assignment("generate call")
        if assignment is not None and call.prompts is not None and call.prompts != len(assignment.indices):
            raise ValueError(f"assign: {len(assignment.indices)} steerer names for {call.prompts} prompts; give one "
                             "name (or None) per prompt")
        self._use(assignment)
        call.assignment = assignment

    def _sequence_steerers(self, batch: int, ctx: Optional[ForwardContext], device) -> torch.Tensor:
        """(B,) global steerer index per row of this forward."""
        rows_per_prompt = 1
        if ctx is None:  # a layer called on its own
            assignment = self._in_flight if self._assignment_used else self._assigned
        elif ctx.call is not None:
            assignment, rows_per_prompt = ctx.call.assignment, ctx.call.rows_per_prompt
        else:
            assignment = ctx.derived.get("assignment")
        if assignment is None:
            key = (batch, device)
            if key not in self._default_rows:
                default = self.steerers.index_of(self.steerers.default)
                self._default_rows[key] = torch.full((batch,), default, dtype=torch.long, device=device)
            return self._default_rows[key]
        n = len(assignment.indices)
        if batch != n * rows_per_prompt:
            expanded = f" ({rows_per_prompt} rows per prompt: num_beams / num_return_sequences)" \
                if rows_per_prompt > 1 else ""
            raise ValueError(f"assign: {n} steerer names for a batch of {batch} rows{expanded}; give one name (or "
                             "None) per prompt")
        self._use(assignment)
        return assignment.per_row(rows_per_prompt, device)

    def _bind_forward(self, ctx: ForwardContext, reader, args: tuple, kwargs: dict) -> None:
        """A forward outside generate: one that starts on an empty cache (or one whose cache length is unknown)
        takes the assignment for a new batch; one that continues a cache keeps its batch's."""
        past = ctx.past_length
        if past is None and ctx.mask is not None and ctx.mask.dim() == 2:
            new_tokens = new_token_count(reader, args, kwargs)
            past = None if new_tokens is None else ctx.mask.shape[1] - new_tokens
        if past is None or past == 0 or self._in_flight is None:
            self._in_flight = self._pending_assignment("forward")  # used once its first layer has checked the rows
        ctx.derived["assignment"] = self._in_flight

    # ---- steering -------------------------------------------------------------------------------------------
    def _steer_tokens(self, site: BankSite, hidden, ctx, in_place):
        index = site.local(self._sequence_steerers(hidden.shape[0], ctx, hidden.device))[:, None]
        index = index.expand(hidden.shape[0], hidden.shape[1])
        valid = _padding_mask(ctx, hidden)
        if valid is not None:
            index = torch.where(valid, index, -1)  # padding stays as it is
        plan = self._plan(site, ctx, index)
        steer = finesteer_kernels.steer_bank_ if in_place else finesteer_kernels.steer_bank
        return steer(hidden, site.bank, index, plan=plan)

    def _plan(self, site: BankSite, ctx: Optional[ForwardContext], index: torch.Tensor):
        """The row grouping of this forward, shared by every layer with the same steerers (one sort per forward)."""
        if ctx is None:
            return None
        key = ("bank plan", index.shape, site.local_key)
        if key not in ctx.derived:
            ctx.derived[key] = finesteer_kernels.plan_rows(index, len(site.bank))
        return ctx.derived[key]

    def _anchor_delta(self, site: BankSite, anchors, steerers):
        index = site.local(steerers)
        coef = finesteer_kernels.synthesize_bank(anchors, site.bank, index)
        return finesteer_kernels.bank_coef_delta(coef, site.bank, index)

    def _decode_rows(self, site: BankSite, hidden) -> torch.Tensor:
        return site.decode_map.expand(hidden.shape[0], hidden.shape[1])

    def _prefill(self, site: BankSite, hidden, ctx, rows) -> torch.Tensor:
        seq_index = site.local(self._sequence_steerers(hidden.shape[0], ctx, hidden.device))
        seq_index = torch.where(rows.anchor_found[:, 0], seq_index, -1)  # a row with no real prompt token: none
        anchors = hidden[rows.batch_index, rows.anchor]
        coef = _share_within_beams(finesteer_kernels.synthesize_bank(anchors, site.bank, seq_index), rows.num_beams)
        self._cache_prefill(site, coef, finesteer_kernels.bank_coef_delta(coef, site.bank, seq_index))
        site.decode_map = torch.where(seq_index >= 0, rows.batch_index, -1)[:, None]
        return torch.where(site.decode_map >= 0, rows.row_to_seq, -1)

    def _continuous_steering(self) -> ContinuousSteering:
        return ContinuousSteering(self, self.steerers)  # both modes: each request names its steerer

    def _begin_forward(self, reader, args: tuple, kwargs: dict) -> None:
        super()._begin_forward(reader, args, kwargs)
        ctx = self._context
        if ctx.call is None and self.continuous.batch_of(ctx) is None:
            self._bind_forward(ctx, reader, args, kwargs)


def _layer_banks(steerers: SteererBank, layer_modules, width: int, alpha, placement) -> dict:
    """{layer: BankSite} with each layer's steerers packed on that layer's device and dtype (``placement(layer
    module, index) -> (device, dtype)``)."""
    sites = {}
    for layer in steerers.layers:
        device, dtype = placement(check_free_layer(layer_modules, layer, "steerers"), layer)
        here = {}
        for name in steerers.names:
            params = steerers.sites[name].get(layer)
            if params is None:
                continue
            if params.d != width:
                raise ValueError(f"steerers[{name!r}]: the steerer for layer {layer} has hidden size {params.d}, but "
                                 f"the model has hidden size {width}")
            here[name] = prepare(params, device, dtype, alpha)
        bank = SteerBank(here)
        local = [-1] + [bank.names.index(n) if n in here else -1 for n in steerers.names]
        site = BankSite(layer, bank.params[0], bank=bank, local_key=tuple(local),
                        local_of=torch.tensor(local, dtype=torch.long, device=device))
        _warm(bank, device, dtype)
        sites[layer] = site
    return sites


def _warm(bank: SteerBank, device, dtype) -> None:
    """Run the bank ops once on the layer's device (packing, kernel compilation), as `placement.prepare` does for a
    single steerer, so a problem shows at patch time and nothing compiles during a CUDA-graph capture."""
    probe = torch.zeros(2, bank.d, device=device, dtype=dtype)
    index = torch.tensor([0, -1], device=device)
    finesteer_kernels.steer_bank(probe, bank, index)
    coef = finesteer_kernels.synthesize_bank(probe, bank, index)
    finesteer_kernels.bank_coef_delta(coef, bank, index)


def patch_bank(model: torch.nn.Module, steerers: SteererBank, mode: str, alpha, decoder_layers) -> BankHandle:
    """`patch_model` for a `SteererBank` (it has checked ``mode`` and ``model``)."""
    layer_modules = find_decoder_layers(model, decoder_layers)
    sites = _layer_banks(steerers, layer_modules, hidden_size(model), alpha, placement)
    return BankHandle(model, sites, mode, owner_of(model, layer_modules), layer_modules, steerers)
