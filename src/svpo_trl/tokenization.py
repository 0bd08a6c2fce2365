"""Tokenize solutions in the step format for training: loss masks and step-end positions.

The model writes the analysis and code of every step; the environment writes the ``<output>``
blocks. So the LM loss covers model-written tokens only, and the value head (Eq. 7, Appendix A.3)
is read at the last token of each step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .steps import DEFAULT_FORMAT, StepFormat

# What follows ``</code>`` in a C-step (the output block and the closing ``</step>``) is appended by
# the sampler after running the code; the model never generates it.
_ENVIRONMENT_PART = re.compile(r"</code>(\s*<output>.*?</output>\s*(?:</step>\s*)?)", re.DOTALL)


@dataclass
class TokenizedSolution:
    """``input_ids`` of prompt + steps (+ EOS); ``completion_mask`` 1 on model-written step tokens;
    ``step_ends`` the index of the last token of each step; ``prompt_len`` the number of prompt tokens."""

    input_ids: list[int]
    completion_mask: list[int]
    step_ends: list[int]
    prompt_len: int


def environment_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` written by the environment, not the model: after each ``</code>``,
    the ``<output>`` block and the ``</step>`` that closes the C-step."""
    return [m.span(1) for m in _ENVIRONMENT_PART.finditer(text)]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_solution(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    steps: list[str],
    *,
    add_eos: bool,
    step_format: StepFormat = DEFAULT_FORMAT,
) -> TokenizedSolution:
    """Tokenize ``prompt`` + ``steps`` piece by piece, as generation sees them.

    Each step is tokenized on its own (the prompt too), so a step's tokens are the same whatever
    precedes it and ``step_ends`` are exact. ``add_eos`` appends EOS (only complete solutions end;
    partial ones do not, DESIGN.md); the EOS counts as model-written. A BOS is prepended when the
    tokenizer defines one and adds it by default.
    """
    del step_format  # environment spans are found by tag; kept for formats that mark them otherwise
    ids: list[int] = []
    mask: list[int] = []
    bos = tokenizer.bos_token_id
    if bos is not None and _adds_bos(tokenizer):
        ids.append(bos)
        mask.append(0)
    prompt_ids = _encode(tokenizer, prompt)
    ids += prompt_ids
    mask += [0] * len(prompt_ids)
    prompt_len = len(ids)
    step_ends: list[int] = []
    for step in steps:
        cursor = 0
        for start, end in [*environment_spans(step), (len(step), len(step))]:
            model_part = _encode(tokenizer, step[cursor:start]) if start > cursor else []
            env_part = _encode(tokenizer, step[start:end]) if end > start else []
            ids += model_part + env_part
            mask += [1] * len(model_part) + [0] * len(env_part)
            cursor = end
        step_ends.append(len(ids) - 1)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return TokenizedSolution(input_ids=ids, completion_mask=mask, step_ends=step_ends, prompt_len=prompt_len)


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id
