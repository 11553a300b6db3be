"""Tiny random-weight causal LMs built from configs (offline, < 0.1 s each) for fast tests."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "llama": _DECODER,
    "qwen2": _DECODER,
    "qwen3": {**_DECODER, "head_dim": 16},
    "mistral": _DECODER,
    "gemma2": {**_DECODER, "head_dim": 16},
    "gemma3_text": {**_DECODER, "head_dim": 16},
    "phi3": _DECODER,
    "olmo2": _DECODER,  # post-norm: its layers start with attention, not a norm
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, n_positions=256),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     max_position_embeddings=256),
    # no _can_record_outputs: their layers are found at the usual path (transformer.h)
    "falcon": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4),
    "bloom": dict(hidden_size=64, n_layer=3, n_head=4),
}
ARCHITECTURES = tuple(CONFIGS)


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides) -> torch.nn.Module:
    """A tiny random-weight model in eval mode (hidden size 64, 3 layers unless overridden)."""
    config = AutoConfig.for_model(arch, **{**_COMMON, **CONFIGS[arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids that avoid the special ids 0-2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def save_word_tokenizer(folder) -> None:
    """A tokenizer for the tiny models (ids 0..VOCAB-1 as the words t0 t1 ...), built offline, saved in ``folder``
    so that it is a complete model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", pad_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(folder)
