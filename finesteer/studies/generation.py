"""Greedy generation from fixed, length-grouped batches, as the studies compare configurations: every
configuration reuses the same batches, and the first step's log-probabilities are kept for a KL divergence."""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import torch


@dataclasses.dataclass
class Generations:
    """Greedy replies of one configuration, in prompt order."""

    tokens: list  # per prompt: generated ids up to and including the first end-of-sequence token
    texts: list
    first_logprobs: torch.Tensor  # (N, vocab) fp32 log-probabilities of the first generated token
    seconds: float  # wall time inside generate
    positions: int  # rows x decode steps generated


def encode_batches(tokenizer, prompts: Sequence[str], batch_size: int, max_prompt_tokens: int) -> list:
    """Left-padded batches ``(indices, input_ids, attention_mask)`` of chat-formatted prompts, grouped by length so
    little is padded. Every configuration reuses the same batches, so unsteered rows compute bit-identically."""
    from ..fitting.activations import _pad_id, encode_prompt

    encoded = [encode_prompt(tokenizer, p)[-max_prompt_tokens:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad = _pad_id(tokenizer)
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - len(encoded[i]):] = 1
        batches.append((idx, ids, mask))
    return batches


def _eos_ids(model, tokenizer) -> set:
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.inference_mode()
def generate(model, tokenizer, batches: list, n_prompts: int, max_new_tokens: int, bar=None) -> Generations:
    """Greedy generation over prepared batches, recording the first step's log-probabilities and the time."""
    eos = _eos_ids(model, tokenizer)
    tokens: list = [None] * n_prompts
    first = None
    seconds, positions = 0.0, 0
    device = next(model.parameters()).device
    for idx, ids, mask in batches:
        clock = time.perf_counter()
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             return_dict_in_generate=True, output_logits=True, temperature=None, top_p=None,
                             top_k=None)
        seconds += time.perf_counter() - clock
        new = out.sequences[:, ids.shape[1]:].cpu()
        positions += new.numel()
        logprobs = torch.log_softmax(out.logits[0].float(), dim=-1).cpu()
        if first is None:
            first = torch.empty(n_prompts, logprobs.shape[-1])
        for row, i in enumerate(idx):
            seq = new[row].tolist()
            cut = next((j + 1 for j, t in enumerate(seq) if t in eos), len(seq))
            tokens[i] = seq[:cut]
            first[i] = logprobs[row]
        if bar is not None:
            bar.update(len(idx))
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    return Generations(tokens, texts, first, seconds, positions)


def kl_divergence(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Per row KL(reference || other) in nats, from log-probabilities."""
    return (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1).clamp_min(0.0)
