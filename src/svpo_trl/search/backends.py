"""Text generation backends (DESIGN.md): one protocol, HF transformers for CPU/GPU, vLLM for scale."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class Completion:
    """One sampled continuation.

    ``text`` includes the stop string that ended it (if any); ``token_logprobs`` holds the log-prob
    of every generated token; ``finish_reason`` is ``"stop"`` (a stop string or EOS) or ``"length"``.
    """

    text: str
    token_logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "stop"

    @property
    def num_tokens(self) -> int:
        return len(self.token_logprobs)


@runtime_checkable
class GenerationBackend(Protocol):
    """What search needs from a model: sampled continuations and (for value-head models) state values."""

    def generate(
        self,
        prompts: list[str],
        *,
        n: int,
        temperature: float,
        max_new_tokens: int,
        stop: list[str],
    ) -> list[list[Completion]]:
        """``n`` completions per prompt; temperature 0 means greedy."""
        ...

    def values(self, texts: list[str]) -> list[float]:
        """The value head's output at the last token of each text, in [-1, 1]."""
        ...
