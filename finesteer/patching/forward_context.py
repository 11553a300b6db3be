"""What one forward of a patched model looks like, read from shapes and arguments only: the generate call it belongs
to, the attention mask and cache length the owner module got, and from those, per layer call, which new tokens are
real, whether it is a prefill or a decode step and where each row's anchor (last real prompt token) is.

Nothing here reads tensor values, so nothing synchronises with the device.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Optional

import torch


@dataclasses.dataclass
class GenerateCall:
    """One active ``model.generate`` call, as far as shapes and configs tell."""

    prompt_length: Optional[int]  # positions [0, prompt_length) are the prompt
    num_beams: int  # beams per prompt; beam search reorders rows only within a prompt's beams
    prompts: Optional[int] = None  # prompts given to generate (rows of its input), None if it got none
    rows_per_prompt: int = 1  # generate repeats each prompt's row this many times, consecutively
    assignment: Optional[object] = None  # a BankHandle's steerer per prompt, bound when the call began


@dataclasses.dataclass
class ForwardContext:
    """What the owner's pre-hook saw for the current forward, plus index tensors derived from it by the first
    patched layer and reused by the others (all patched layers see the same rows and tokens)."""

    mask: Optional[torch.Tensor]  # attention mask as the model got it: 2-D (B, past + T) or 4-D (B, 1, T, S)
    past_length: Optional[int]  # tokens in the cache before this forward; None = read it from a 2-D mask
    call: Optional[GenerateCall]  # the generate call this forward belongs to, if any
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


class Rows:
    """How one forward of ``B`` rows and ``T`` new tokens is steered: which tokens are real, whether it is a
    prefill (and where each row's anchor is) or a decode step, as index tensors for the op. Decode or not is
    decided from shapes; the index tensors are built on first use, so a query-mode decode step runs no tensor op
    here."""

    def __init__(self, ctx: ForwardContext, hidden: torch.Tensor):
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


def rows_for(ctx: Optional[ForwardContext], hidden: torch.Tensor) -> Rows:
    if ctx is None:  # a layer called outside its model's forward: no mask, no cache information
        ctx = ForwardContext(None, 0, None)
    key = (hidden.shape[0], hidden.shape[1], hidden.device)
    rows = ctx.derived.get(key)
    if rows is None:
        rows = ctx.derived[key] = Rows(ctx, hidden)
    return rows



class ArgReader:
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


def reported_length(cache):
    """What a transformers cache says it holds: an int, a device tensor (a static cache), or None."""
    get = getattr(cache, "get_seq_length", None)
    return get() if get is not None else None


def as_mask(mask) -> Optional[torch.Tensor]:
    """The attention mask as a 2-D or 4-D tensor; a dict of per-attention-type masks gives its full-attention one
    (every kind keeps the diagonal, which is all that is read)."""
    if isinstance(mask, Mapping):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() in (2, 4)):
        return mask
    what = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
    raise ValueError(f"attention_mask: expected a 2-D (batch, past + new) or 4-D (batch, 1, new, keys) mask, "
                     f"got {what}")


def new_token_count(reader: "ArgReader", args: tuple, kwargs: dict) -> Optional[int]:
    ids = reader.get(args, kwargs, "input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return ids.shape[1]
    embeds = reader.get(args, kwargs, "inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        return embeds.shape[1]
    return None



def generate_call(model, reader: ArgReader, args: tuple, kwargs: dict) -> GenerateCall:
    """Prompt length and beams of a generate call, from shapes and configs."""
    prompt = reader.get(args, kwargs, "inputs", "input_ids")
    if prompt is None:
        prompt = kwargs.get("inputs_embeds")
    given = isinstance(prompt, torch.Tensor) and prompt.dim() >= 2
    prompt_length = prompt.shape[1] if given else None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and prompt_length is not None:
        # generate may get only the new tokens on top of a given cache, with a mask for the whole sequence
        prompt_length = max(prompt_length, mask.shape[1])
    config = reader.get(args, kwargs, "generation_config") or getattr(model, "generation_config", None)
    num_beams = int(kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1)
    sequences = int(kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1)
    # as generate's _expand_inputs_for_generation: max(num_beams, num_return_sequences) rows per prompt
    return GenerateCall(prompt_length, num_beams, prompt.shape[0] if given else None, max(num_beams, sequences))

