"""Tiny causal LMs built from a config, for the embedded default and the tests (no download)."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 1024,
) -> LlamaConfig:
    """A small Llama config sized to ``tokenizer`` (its special token ids included)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **config_kwargs) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama for ``tokenizer`` (deterministic given ``seed``)."""
    import torch

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, **config_kwargs))
