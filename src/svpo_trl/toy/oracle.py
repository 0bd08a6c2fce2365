"""Ground truth for every step of a toy problem: is a partial solution still on track?

A toy problem is a starting quantity and a chain of operations; its gold solution prints the running
value after each operation (``<output>`` of each C-step) and ends with the final value. So the exact
value of any state is known: a partial solution is **on track** when every code step printed a later value
of the gold chain than the step before it (one operation further, or several: a step may do two operations
at once), and an answer step gives the gold answer. A step that prints the current value again ("multiply
by 1", or a wrong computation that happens to land on it) does not follow the problem and is off track. A malformed step, an error, or a
value off the chain puts the state off track for good: the toy's operations cannot undo a wrong value
except by coincidence.

This is what the annotation report's label precision (are Algorithm 1's chosen steps on track and its
rejected steps off track?) and the value diagnostic's gold labels are measured against.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from ..steps import DEFAULT_FORMAT, Step, StepFormat

_INTEGER = re.compile(r"-?\d+")


def _as_int(text: str | None) -> int | None:
    if text is None:
        return None
    cleaned = text.strip().strip("$").replace(",", "").strip()
    return int(cleaned) if re.fullmatch(r"-?\d+", cleaned) else None


class ToyStepOracle:
    """On-track labels for partial solutions of toy problems (rows with ``question``, ``solution``).

    Args:
        problems: toy problem rows (``load_toy_problems`` / ``load_problems("toy")``): the gold chain of
            values is read from each ``solution``'s outputs, the starting value from the question (its
            first number, as in every toy opening).
        step_format: the step format of the solutions.

    Example::

        oracle = ToyStepOracle(load_toy_problems("test"))
        oracle.step_labels(question, ["<step>...", "<step>..."])  # [True, False]: the second step erred
    """

    def __init__(self, problems: Iterable[dict[str, Any]], step_format: StepFormat = DEFAULT_FORMAT):
        self.step_format = step_format
        self._chains: dict[str, tuple[list[int], int]] = {}
        for position, row in enumerate(problems):
            if "solution" not in row or not row["solution"]:
                raise ValueError(
                    f"toy problem {position} has no gold 'solution': the oracle reads its values"
                )
            question = row["question"]
            start = _INTEGER.search(question)
            steps = [step_format.parse(text) for text in step_format.split_steps(row["solution"])]
            chain = [_as_int(s.output) for s in steps if s.kind == "code"]
            answer = _as_int(steps[-1].final_answer) if steps else None
            if start is None or answer is None or any(v is None for v in chain):
                raise ValueError(f"toy problem {position} ({row.get('id')!r}) is not a toy gold solution")
            self._chains[self._key(question)] = ([int(start.group()), *chain], answer)

    def _key(self, question_or_prompt: str) -> str:
        # Pairs and states carry the formatted prompt, problem rows the bare question.
        match = re.fullmatch(r"<question>(.*)</question>\n?", question_or_prompt, re.DOTALL)
        return match.group(1) if match else question_or_prompt

    def __contains__(self, question_or_prompt: str) -> bool:
        return self._key(question_or_prompt) in self._chains

    def step_labels(self, question: str, steps: Sequence[str | Step]) -> list[bool]:
        """For each step of a partial solution, whether the solution up to it is on track.

        ``question`` is the question or its formatted prompt; ``steps`` step texts or parsed `Step`s.
        """
        key = self._key(question)
        if key not in self._chains:
            raise KeyError(f"the oracle has no toy problem with question {key[:80]!r}")
        chain, answer = self._chains[key]
        position, labels, on_track = 0, [], True
        for step in steps:
            parsed = step if isinstance(step, Step) else self.step_format.parse(step)
            if on_track:
                on_track, position = self._advance(parsed, chain, answer, position)
            labels.append(on_track)
        return labels

    def on_track(self, question: str, steps: Sequence[str | Step]) -> bool:
        """Whether the whole partial solution is on track (the empty solution is)."""
        labels = self.step_labels(question, steps)
        return labels[-1] if labels else True

    @staticmethod
    def _advance(step: Step, chain: list[int], answer: int, position: int) -> tuple[bool, int]:
        if step.is_malformed:
            return False, position
        if step.kind == "answer":
            return _as_int(step.final_answer) == answer, position
        value = _as_int(step.output)
        if value is None:
            return False, position
        # The nearest gold value after the current one (skipping ahead is doing several operations in
        # one step); chain[0] is the starting quantity, which no step should print.
        for index in range(position + 1, len(chain)):
            if chain[index] == value:
                return True, index
        return False, position

    def num_operations(self, question: str) -> int:
        """How many operations (gold C-steps) the problem has."""
        return len(self._chains[self._key(question)][0]) - 1
