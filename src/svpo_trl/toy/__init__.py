"""The embedded default: a toy arithmetic task, a tokenizer trained locally, tiny models, stage-0 SFT."""

from .bootstrap import ToySFTConfig, ToySFTResult, bootstrap_sft_policy
from .model import tiny_llama, tiny_llama_config
from .task import (
    TOY_SPLIT_SIZES,
    ToyTaskConfig,
    build_toy_tokenizer,
    load_toy_problems,
    make_toy_problems,
    toy_tokenizer_corpus,
)
from .tokenizer import FORMAT_TAGS, train_tokenizer

__all__ = [
    "FORMAT_TAGS",
    "TOY_SPLIT_SIZES",
    "ToySFTConfig",
    "ToySFTResult",
    "ToyTaskConfig",
    "bootstrap_sft_policy",
    "build_toy_tokenizer",
    "load_toy_problems",
    "make_toy_problems",
    "tiny_llama",
    "tiny_llama_config",
    "toy_tokenizer_corpus",
    "train_tokenizer",
]
