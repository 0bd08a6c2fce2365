"""Step labels for judging rankers: does a candidate step lead to a right answer?

The value diagnostic (:func:`svpo_trl.value_diagnostic.value_diagnostic`) needs, for every candidate
state it meets, whether the state is still on track. Two sources:

- :class:`GoldLabeler`: an oracle that knows every step's exact value (the toy task's
  :class:`~svpo_trl.toy.oracle.ToyStepOracle`): exact and free.
- :class:`RolloutLabeler`: Monte-Carlo rollouts of the policy from each candidate, for any dataset: a
  state is on track when at least one of ``num_rollouts`` sampled completions reaches the gold answer
  (an existence proof; a state whose rollouts all fail may still be solvable, so this labels some
  on-track states off track when the policy is weak). Terminal states are labelled by their answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..grading import is_equiv
from .state import State

Grader = Callable[[str | None, Any], bool]


class StepLabeler(Protocol):
    """``label(problems, states)``: for each state (``problems[i]`` is its problem row), on track or not."""

    def label(self, problems: Sequence[dict[str, Any]], states: Sequence[State]) -> list[bool]: ...


def gold_of(problem: dict[str, Any]) -> Any:
    """Every acceptable gold answer of a problem row (``answers``), else its ``answer``."""
    return problem.get("answers") or problem["answer"]


def terminal_label(state: State, problem: dict[str, Any], grader: Grader = is_equiv) -> bool:
    """A finished state is on track when it is well formed and its final answer is right."""
    last = state.steps[-1]
    if last.is_malformed or last.final_answer is None:
        return False
    return bool(grader(last.final_answer, gold_of(problem)))


class GoldLabeler:
    """Labels from an oracle with ``on_track(question_or_prompt, steps) -> bool`` (e.g. ``ToyStepOracle``)."""

    def __init__(self, oracle: Any):
        self.oracle = oracle

    def label(self, problems: Sequence[dict[str, Any]], states: Sequence[State]) -> list[bool]:
        return [bool(self.oracle.on_track(state.prompt, state.steps)) for state in states]


class RolloutLabeler:
    """Monte-Carlo labels: ``num_rollouts`` policy completions from each non-terminal state.

    Args:
        backend: the policy's `GenerationBackend`.
        num_rollouts: completions per state (default 4); on track if any reaches the gold answer.
        temperature: sampling temperature of the rollouts (default 0.6, SBS's).
        max_depth, max_new_tokens: limits of a rollout, as in evaluation.
        sampler: a `StepSampler` to reuse (its sandbox); built from ``backend`` when None.
        grader: answer equivalence.

    All rollouts of one ``label`` call run as one batched search; ``tokens_generated`` counts them.
    """

    def __init__(
        self,
        backend: Any,
        *,
        num_rollouts: int = 4,
        temperature: float = 0.6,
        max_depth: int = 8,
        max_new_tokens: int = 256,
        sampler: Any = None,
        grader: Grader = is_equiv,
    ):
        from .sampler import StepSampler
        from .sbs import SBSConfig, SBSGenerator

        if num_rollouts < 1:
            raise ValueError(f"num_rollouts must be >= 1, got {num_rollouts}")
        self.num_rollouts = num_rollouts
        self.grader = grader
        sampler = sampler if sampler is not None else StepSampler(backend, max_new_tokens=max_new_tokens)
        config = SBSConfig(
            beam_width=1,
            num_samples=1,
            temperature=temperature,
            max_depth=max_depth,
            max_new_tokens=max_new_tokens,
            use_value=False,
            remove_duplicates=False,
        )
        self._rollout = SBSGenerator(backend, config, sampler=sampler)
        self.tokens_generated = 0

    def label(self, problems: Sequence[dict[str, Any]], states: Sequence[State]) -> list[bool]:
        labels: list[bool | None] = [
            terminal_label(s, p, self.grader) if s.is_terminal else None for s, p in zip(states, problems)
        ]
        todo = [i for i, label in enumerate(labels) if label is None]
        starts = [states[i] for i in todo for _ in range(self.num_rollouts)]
        results = self._rollout.search(starts) if starts else []
        self.tokens_generated += sum(r.num_tokens for r in results)
        for k, i in enumerate(todo):
            mine = results[k * self.num_rollouts : (k + 1) * self.num_rollouts]
            gold = gold_of(problems[i])
            labels[i] = any(r.final_answer is not None and self.grader(r.final_answer, gold) for r in mine)
        return [bool(label) for label in labels]
