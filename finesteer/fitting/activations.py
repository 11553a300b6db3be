"""Residual-stream activations at decoder-layer outputs: the anchor rows SCS and the MoSE router read, and the
completion shifts (Delta) the experts are fitted to.

The site is the output of decoder layer ``L`` (what `find_decoder_layers(model)[L]` returns), the same place the
steering hook edits, so what is fitted is what gets applied. Forwards are batched with right padding (real tokens
keep positions ``0..n-1`` and causal attention never sees the padding after them), sorted by length to waste
little, and stop right after the last layer needed: a hook on that layer raises and the collector catches it, so
layers above it cost nothing. Only per-sequence means are kept, so memory stays bounded for any number of prompts.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..patching.layers import DecoderLayers, check_layer_index, find_decoder_layers

Completions = Union[str, Sequence[str]]


class _StopForward(Exception):
    """Raised from the hook on the last layer needed; caught by the collector."""


class Shifts(NamedTuple):
    """`completion_shifts` output, each a dict ``layer -> (N, d)`` fp32 tensor."""

    delta: dict
    anchors: dict


def _check_layers(model: torch.nn.Module, layers, decoder_layers: DecoderLayers = None) -> list:
    n = len(find_decoder_layers(model, decoder_layers))
    wanted = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
    if not wanted:
        raise ValueError("layers: expected a decoder layer index or a non-empty list of them, got an empty list")
    name = "layers" if len(wanted) == 1 else "layers[{}]"
    return sorted({check_layer_index(x, n, name.format(i)) for i, x in enumerate(wanted)})


def encode_prompt(tokenizer, prompt: str, chat_template: bool = True) -> list:
    """Token ids of a user prompt ready for the assistant's reply: the chat template with the generation prompt
    when the tokenizer has one (and ``chat_template``), else the raw text with the tokenizer's special tokens."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompts: expected strings, got {type(prompt).__name__}")
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def encode_completion(tokenizer, completion: str) -> list:
    """Token ids of an assistant reply, to be appended to `encode_prompt`'s ids (tokenised separately so the
    prompt/completion boundary is exact)."""
    if not isinstance(completion, str) or not completion:
        raise ValueError(f"completions: expected non-empty strings, got {completion!r}")
    return list(tokenizer(completion, add_special_tokens=False)["input_ids"])


class _Truncations:
    """Counts what had to be cut, and says so once at the end instead of cutting silently."""

    def __init__(self) -> None:
        self.prompts = 0
        self.completions = 0

    def warn(self, max_prompt_tokens: int, max_completion_tokens: int) -> None:
        if self.prompts:
            warnings.warn(f"{self.prompts} prompt(s) longer than max_prompt_tokens={max_prompt_tokens} were cut "
                          "from the left (their end, the anchor token, is kept)", stacklevel=3)
        if self.completions:
            warnings.warn(f"{self.completions} completion(s) longer than max_completion_tokens="
                          f"{max_completion_tokens} were cut to their first tokens", stacklevel=3)


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


@torch.inference_mode()
def span_means(model: torch.nn.Module, sequences: Sequence[Sequence[int]], spans: Sequence[Sequence[tuple]],
               layers: Sequence[int], pad_id: int = 0, batch_size: int = 16, progress: bool = True,
               desc: str = "activations", decoder_layers: DecoderLayers = None) -> dict:
    """Mean residual stream over token spans at the given layer outputs.

    Args:
        sequences: token ids per sequence.
        spans: per sequence, the same number ``S`` of ``(start, end)`` token ranges (non-empty, within the
            sequence).
        layers: decoder layer indices (validated by the callers).
        decoder_layers: where the decoder layers are, when `find_decoder_layers` cannot find them (a dotted path
            such as ``"transformer.h"`` or the ``ModuleList``).
    Returns:
        ``layer -> (N, S, d)`` fp32 CPU tensor.
    """
    n = len(sequences)
    if n == 0:
        raise ValueError("sequences: empty; nothing to run")
    n_spans = len(spans[0])
    for i, (seq, sp) in enumerate(zip(sequences, spans)):
        if len(sp) != n_spans or any(not 0 <= a < b <= len(seq) for a, b in sp):
            raise ValueError(f"spans[{i}]: expected {n_spans} ranges 0 <= start < end <= {len(seq)}, got {sp}")
    layer_modules = find_decoder_layers(model, decoder_layers)
    last = max(layers)
    captured: dict = {}

    def make_hook(index: int):
        def hook(module, args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
            if index == last:
                raise _StopForward
        return hook

    device = next(model.parameters()).device
    handles = [layer_modules[i].register_forward_hook(make_hook(i)) for i in layers]
    order = sorted(range(n), key=lambda i: -len(sequences[i]))  # longest first: memory peaks show up at once
    out = {}
    chunks: dict = {layer: [] for layer in layers}
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=n, desc=desc, unit="seq", disable=not progress) as bar:
            for start in range(0, n, batch_size):
                batch = order[start:start + batch_size]
                width = max(len(sequences[i]) for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                weights = torch.zeros(len(batch), n_spans, width)
                for row, i in enumerate(batch):
                    ids[row, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
                    mask[row, :len(sequences[i])] = 1
                    for s, (a, b) in enumerate(spans[i]):
                        weights[row, s, a:b] = 1.0 / (b - a)
                captured.clear()
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _StopForward:
                    pass
                for layer in layers:
                    hidden = captured[layer].float()
                    chunks[layer].append((weights.to(hidden.device) @ hidden).cpu())
                bar.update(len(batch))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    inverse = torch.empty(n, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(n)
    for layer in layers:
        out[layer] = torch.cat(chunks[layer])[inverse]
    return out


def collect_activations(model: torch.nn.Module, tokenizer, prompts: Sequence[str], layers, *,
                        batch_size: int = 16, max_prompt_tokens: int = 256, chat_template: bool = True,
                        progress: bool = True, desc: str = "anchor activations",
                        decoder_layers: DecoderLayers = None) -> dict:
    """Anchor-row (last prompt token, where the reply starts) residual stream at the outputs of ``layers``.

    Returns ``layer -> (len(prompts), d)`` fp32 CPU tensor. Prompts longer than ``max_prompt_tokens`` are cut from
    the left (with a warning), keeping the anchor. ``decoder_layers`` names the layer list where
    `find_decoder_layers` cannot find it (see `span_means`).
    """
    pooled = collect_pooled_activations(model, tokenizer, prompts, layers, (1,), batch_size=batch_size,
                                        max_prompt_tokens=max_prompt_tokens, chat_template=chat_template,
                                        progress=progress, desc=desc, decoder_layers=decoder_layers)
    return {layer: m[:, 0] for layer, m in pooled.items()}


def collect_pooled_activations(model: torch.nn.Module, tokenizer, prompts: Sequence[str], layers,
                               pools: Sequence[int] = (1,), *, batch_size: int = 16, max_prompt_tokens: int = 256,
                               chat_template: bool = True, progress: bool = True,
                               desc: str = "anchor activations", decoder_layers: DecoderLayers = None) -> dict:
    """Means of the residual stream over the last ``n`` prompt tokens, for each ``n`` in ``pools`` (``n = 1``:
    the anchor row; a prompt shorter than ``n`` gives the mean of all its tokens), at the outputs of ``layers``,
    from one forward per batch.

    Returns ``layer -> (len(prompts), len(pools), d)`` fp32 CPU tensor. ``decoder_layers`` as in
    `collect_activations`.
    """
    if not pools or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in pools):
        raise ValueError(f"pools: expected positive token counts, got {list(pools)!r}")
    layers = _check_layers(model, layers, decoder_layers)
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty sequence of strings")
    cuts = _Truncations()
    sequences = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt, chat_template)
        if len(ids) > max_prompt_tokens:
            cuts.prompts += 1
            ids = ids[-max_prompt_tokens:]
        sequences.append(ids)
    cuts.warn(max_prompt_tokens, 0)
    return span_means(model, sequences, [[(max(0, len(s) - n), len(s)) for n in pools] for s in sequences], layers,
                      _pad_id(tokenizer), batch_size, progress, desc, decoder_layers)


def completion_shifts(model: torch.nn.Module, tokenizer, prompts: Sequence[str], desired: Sequence[Completions],
                      undesired: Sequence[Completions], layers, *, batch_size: int = 16,
                      max_prompt_tokens: int = 256, max_completion_tokens: int = 64, chat_template: bool = True,
                      progress: bool = True, decoder_layers: DecoderLayers = None) -> Shifts:
    """Delta per prompt: mean over completion tokens of h(prompt + desired) minus the same for the undesired
    completion, at the outputs of ``layers``; plus the anchor rows (last prompt token) from the same forwards.

    ``desired[i]`` / ``undesired[i]`` is one completion or a list of completions for ``prompts[i]``; with several,
    each side is the average of its completions' means.
    Returns `Shifts(delta, anchors)`, each ``layer -> (len(prompts), d)`` fp32 CPU tensor. ``decoder_layers``
    names the layer list where `find_decoder_layers` cannot find it (see `span_means`).
    """
    layers = _check_layers(model, layers, decoder_layers)
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty sequence of strings")
    for name, side in (("desired", desired), ("undesired", undesired)):
        if isinstance(side, str) or len(side) != len(prompts):
            raise ValueError(f"{name}: expected one completion (or list of completions) per prompt "
                             f"({len(prompts)}), got {'a string' if isinstance(side, str) else len(side)}")
    cuts = _Truncations()
    sequences, spans, owner, sign, weight = [], [], [], [], []
    for i, prompt in enumerate(prompts):
        prompt_ids = encode_prompt(tokenizer, prompt, chat_template)
        if len(prompt_ids) > max_prompt_tokens:
            cuts.prompts += 1
            prompt_ids = prompt_ids[-max_prompt_tokens:]
        p = len(prompt_ids)
        for side_sign, side in ((1.0, desired[i]), (-1.0, undesired[i])):
            completions = [side] if isinstance(side, str) else list(side)
            if not completions:
                raise ValueError(f"{'desired' if side_sign > 0 else 'undesired'}[{i}]: no completion given")
            for completion in completions:
                ids = encode_completion(tokenizer, completion)
                if len(ids) > max_completion_tokens:
                    cuts.completions += 1
                    ids = ids[:max_completion_tokens]
                sequences.append(prompt_ids + ids)
                spans.append([(p - 1, p), (p, p + len(ids))])
                owner.append(i)
                sign.append(side_sign)
                weight.append(1.0 / len(completions))
    cuts.warn(max_prompt_tokens, max_completion_tokens)
    means = span_means(model, sequences, spans, layers, _pad_id(tokenizer), batch_size, progress,
                       desc="completion shifts", decoder_layers=decoder_layers)
    owner_t = torch.tensor(owner)
    coeff = torch.tensor(sign) * torch.tensor(weight)
    first = torch.full((len(prompts),), -1, dtype=torch.long)
    for j in range(len(owner) - 1, -1, -1):  # first sequence of each prompt supplies its anchor
        first[owner[j]] = j
    delta, anchors = {}, {}
    for layer, m in means.items():
        delta[layer] = torch.zeros(len(prompts), m.shape[-1]).index_add_(0, owner_t, m[:, 1] * coeff[:, None])
        anchors[layer] = m[first, 0]
    return Shifts(delta, anchors)
