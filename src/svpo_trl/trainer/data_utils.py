"""The ``values`` dataset (DESIGN.md) for value pre-training (Eq. 7): validation, tokenization, collation.

A row is one solution path of a search tree: ``id, prompt, steps: list[str], step_values: list[float],
correct: bool``. ``step_values[i]`` is the Eq. 7 label of the state ending with step ``i``: the Q-value
of its node, or the reward R ∈ {−1, +1} when the step is terminal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..steps import DEFAULT_FORMAT, StepFormat
from ..tokenization import tokenize_solution

VALUES_COLUMNS = ("prompt", "steps", "step_values", "correct")
TOKENIZED_COLUMNS = ("input_ids", "completion_mask", "step_ends", "step_values", "correct")


def validate_values_row(row: dict[str, Any], index: int) -> None:
    """Raise a ``ValueError`` naming the row and column when ``row`` is not a valid ``values`` row."""
    where = f"values dataset row {index}" + (f" (id={row['id']!r})" if row.get("id") is not None else "")
    steps, labels = row["steps"], row["step_values"]
    if not isinstance(row["prompt"], str) or not row["prompt"]:
        raise ValueError(f"{where}: column 'prompt' must be a non-empty string, got {row['prompt']!r}")
    if not steps:
        raise ValueError(f"{where}: column 'steps' is empty; a solution needs at least one step")
    for i, step in enumerate(steps):
        # A search path may end in a step the policy left blank (EOS at once: malformed, terminal, R = -1);
        # it still carries its label. Blank text anywhere else means the row is broken.
        blank_last = i == len(steps) - 1 and isinstance(step, str) and step != ""
        if not isinstance(step, str) or (not step.strip() and not blank_last):
            raise ValueError(f"{where}: column 'steps'[{i}] is empty; every step must be non-empty text")
    if labels is None or len(steps) != len(labels):
        raise ValueError(
            f"{where}: column 'step_values' has {None if labels is None else len(labels)} labels but 'steps' "
            f"has {len(steps)} steps; one label (Q, or R for a terminal step) per step is expected"
        )
    for i, label in enumerate(labels):
        if label is None or not math.isfinite(label) or not -1.0 <= label <= 1.0:
            raise ValueError(f"{where}: column 'step_values'[{i}] = {label!r} is outside [-1, 1]")
    if not isinstance(row["correct"], bool):
        raise ValueError(f"{where}: column 'correct' must be a bool, got {row['correct']!r}")


def is_complete_solution(steps: Sequence[str], step_format: StepFormat = DEFAULT_FORMAT) -> bool:
    """Whether the solution ends with an answer step (then the model wrote EOS after it)."""
    return step_format.parse(steps[-1]).kind == "answer"


def tokenize_values_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    step_format: StepFormat = DEFAULT_FORMAT,
    num_proc: int | None = None,
) -> Dataset:
    """Validate and tokenize a ``values`` dataset into the model-input columns :data:`TOKENIZED_COLUMNS`.

    ``input_ids`` is prompt + steps (+ EOS when the solution is complete), ``completion_mask`` marks the
    model-written tokens, ``step_ends`` the last token of each step (where V is read, A.3). Sequences
    longer than ``max_length`` are cut on the right; steps whose last token is cut lose their label.
    """
    missing = [c for c in VALUES_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The values dataset lacks column(s) {missing}; expected {list(VALUES_COLUMNS)} (+ optional 'id'), "
            f"got {dataset.column_names}"
        )

    def tokenize(row: dict[str, Any], index: int) -> dict[str, Any]:
        validate_values_row(row, index)
        tokenized = tokenize_solution(
            tokenizer,
            row["prompt"],
            row["steps"],
            add_eos=is_complete_solution(row["steps"], step_format),
            step_format=step_format,
        )
        input_ids, completion_mask = tokenized.input_ids, tokenized.completion_mask
        kept = [i for i, end in enumerate(tokenized.step_ends) if max_length is None or end < max_length]
        if max_length is not None:
            input_ids, completion_mask = input_ids[:max_length], completion_mask[:max_length]
        return {
            "input_ids": input_ids,
            "completion_mask": completion_mask,
            "step_ends": [tokenized.step_ends[i] for i in kept],
            "step_values": [float(row["step_values"][i]) for i in kept],
            "correct": row["correct"],
        }

    removed = [c for c in dataset.column_names if c not in ("step_values", "correct")]
    return dataset.map(tokenize, with_indices=True, remove_columns=removed, num_proc=num_proc)


@dataclass
class ValueSFTCollator:
    """Right-pads tokenized ``values`` rows into a batch for Eq. 7.

    Returns ``input_ids``/``attention_mask`` ``(B, T)``; ``labels`` ``(B, T)``: the token ids on
    model-written tokens of correct solutions, -100 elsewhere (the NLL term); ``step_ends``,
    ``step_values`` and ``step_mask`` ``(B, S)``: where V is read, its label, and which entries are real
    (the MSE term). Right padding keeps ``step_ends`` valid as they are.
    """

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        num_steps = max(1, max(len(r["step_ends"]) for r in rows))
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        step_ends = torch.zeros((len(rows), num_steps), dtype=torch.long)
        step_values = torch.zeros((len(rows), num_steps), dtype=torch.float)
        step_mask = torch.zeros((len(rows), num_steps), dtype=torch.bool)
        for b, row in enumerate(rows):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            input_ids[b, : len(ids)] = ids
            attention_mask[b, : len(ids)] = 1
            if row["correct"]:
                trained = torch.as_tensor(row["completion_mask"], dtype=torch.bool)
                labels[b, : len(ids)] = ids.masked_fill(~trained, -100)
            n = len(row["step_ends"])
            step_ends[b, :n] = torch.as_tensor(row["step_ends"], dtype=torch.long)
            step_values[b, :n] = torch.as_tensor(row["step_values"], dtype=torch.float)
            step_mask[b, :n] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "step_ends": step_ends,
            "step_values": step_values,
            "step_mask": step_mask,
        }
