"""The embedded default: a toy arithmetic task, a tokenizer trained locally, tiny models."""

from .model import tiny_llama, tiny_llama_config
from .tokenizer import FORMAT_TAGS, train_tokenizer

__all__ = ["FORMAT_TAGS", "tiny_llama", "tiny_llama_config", "train_tokenizer"]
