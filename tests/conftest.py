"""Shared fixtures: tiny randomly initialised decoder models built from configs (no download)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    # a sliding window of 4, shorter than the test sequences, so Mistral differs from Llama
    "mistral": lambda: MistralConfig(**TINY, sliding_window=4),
    "qwen2": lambda: Qwen2Config(**TINY),
    # sliding window of 4 with a 1:1 pattern exercises sliding-window cache layers and masks
    "gemma3": lambda: Gemma3TextConfig(**TINY, head_dim=8, sliding_window=4, sliding_window_pattern=2),
}


def tiny_model(arch: str = "llama", attn_implementation: str = "sdpa", seed: int = 0):
    """A tiny random ``*ForCausalLM`` of the given family, float32, eval mode."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def left_padded_batch(seed: int = 1, lengths=(9, 6, 3), vocab: int = 96):
    """``input_ids`` and ``attention_mask`` ``[B, T]``, left padded with pad id 0."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n :] = torch.randint(1, vocab, (n,), generator=g)
        mask[b, T - n :] = 1
    return ids, mask


@pytest.fixture
def batch():
    return left_padded_batch()
