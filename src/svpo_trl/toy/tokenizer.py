"""A byte-level BPE tokenizer trained locally, with the step-format tags as single tokens.

Nothing is downloaded: the embedded default and the tests build their tokenizer from text.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

FORMAT_TAGS = [
    "<question>", "</question>", "<step>", "</step>", "<p>", "</p>",
    "<code>", "</code>", "<output>", "</output>", "```python", "```",
]  # fmt: skip
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 800) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus``; format tags become single (non-special) tokens.

    The tags are added tokens rather than special ones so that ``decode(skip_special_tokens=True)``
    keeps them: they are part of the text a model writes.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # padding_side as an init argument, so that save_pretrained/from_pretrained keep it (generation
    # of a batch needs left padding).
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )
    fast.add_tokens(FORMAT_TAGS)
    return fast
