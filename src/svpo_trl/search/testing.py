"""A deterministic backend for tests and examples: completions come from a table, not a model."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .backends import Completion

ScriptEntry = str | tuple[str, float]


@dataclass
class ScriptedBackend:
    """A `GenerationBackend` that answers from a table.

    ``script`` maps a prompt (the full state text) to the completions to return for it, each a text
    or ``(text, prior)`` where ``prior`` is the mean token probability to report (one token per
    whitespace-separated word, each with probability ``prior``). ``generate(n=k)`` returns the first
    ``k`` entries, cycling when the table is shorter. A prompt missing from the table raises
    ``KeyError`` naming it, so a test shows exactly which state it did not script. ``value_fn`` maps
    a text to its value for ``values``; ``calls`` records every ``generate`` call's prompts.
    """

    script: dict[str, list[ScriptEntry]] | Callable[[str], list[ScriptEntry]]
    value_fn: Callable[[str], float] | None = None
    calls: list[list[str]] = field(default_factory=list)
    tokens_generated: int = 0

    def _entries(self, prompt: str) -> list[ScriptEntry]:
        if callable(self.script):
            return self.script(prompt)
        if prompt not in self.script:
            raise KeyError(f"ScriptedBackend has no completions for prompt {prompt!r}")
        return self.script[prompt]

    def generate(
        self,
        prompts: list[str],
        *,
        n: int,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        stop: list[str] | None = None,
    ) -> list[list[Completion]]:
        self.calls.append(list(prompts))
        results = []
        for prompt in prompts:
            entries = self._entries(prompt)
            completions = []
            for i in range(n):
                entry = entries[i % len(entries)]
                text, prior = (entry, 1.0) if isinstance(entry, str) else entry
                num_tokens = max(1, len(text.split()))
                logp = math.log(max(prior, 1e-12))
                completions.append(Completion(text=text, token_logprobs=[logp] * num_tokens))
                self.tokens_generated += num_tokens
            results.append(completions)
        return results

    def values(self, texts: list[str]) -> list[float]:
        if self.value_fn is None:
            raise TypeError("ScriptedBackend was built without value_fn: it has no value head")
        return [float(self.value_fn(t)) for t in texts]
