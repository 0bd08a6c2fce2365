"""One reasoning step for many states at once: generate -> execute code -> parsed `Step` (DESIGN.md).

MCTS expansion (§3.1), step-level beam search (§3.3) and greedy decoding all grow solutions
through :class:`StepSampler`, so raw model text becomes an executed, parsed step in one place.
"""

from __future__ import annotations

import math
from typing import Any

from ..steps import DEFAULT_FORMAT, Step, StepFormat
from .backends import Completion, GenerationBackend
from .state import State


def mean_token_probability(token_logprobs: list[float]) -> float:
    """The prior of a step, Eq. 4: ``sum_j pi(a_j | s, a_<j) / |a|``, the mean *probability* of its tokens.

    This is the arithmetic mean of ``exp(logprob)``, not ``exp(mean logprob)`` (the geometric mean,
    which is smaller whenever token probabilities differ). A step with no tokens gets prior 0.
    """
    if not token_logprobs:
        return 0.0
    return sum(math.exp(lp) for lp in token_logprobs) / len(token_logprobs)


def format_execution_output(result: Any) -> str:
    """What a C-step's ``<output>`` block shows for a sandbox ``ExecResult``.

    The stdout, or the last line of the error (the exception line, as a Jupyter-trained policy
    expects to read it); stdout then the error line when both exist. A timeout shows its error.
    """
    stdout = (getattr(result, "stdout", "") or "").strip()
    error = (getattr(result, "error", None) or "").strip()
    if not error and getattr(result, "timed_out", False):
        error = "TimeoutError: execution timed out"
    error_line = error.splitlines()[-1].strip() if error else ""
    return "\n".join(part for part in (stdout, error_line) if part)


class StepSampler:
    """Turns states into their next executed steps.

    Args:
        backend: a `GenerationBackend` (``HFBackend``, ``ScriptedBackend``, ...).
        sandbox: runs model-written code; needs ``run_many(list_of_snippet_lists)`` returning one
            ``ExecResult(stdout, error, timed_out)`` per list. ``None`` creates a
            ``svpo_trl.sandbox.PythonSandbox()`` the first time code has to run.
        step_format: the step format (stop strings, code extraction, parsing).
        max_new_tokens: token budget of one step; a step that exhausts it is malformed.

    Attributes ``tokens_generated``, ``executions`` and ``backend_calls`` count the work done, for
    run summaries.
    """

    def __init__(
        self,
        backend: GenerationBackend,
        sandbox: Any = None,
        step_format: StepFormat = DEFAULT_FORMAT,
        max_new_tokens: int = 256,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.backend = backend
        self._sandbox = sandbox
        self.step_format = step_format
        self.max_new_tokens = max_new_tokens
        self.tokens_generated = 0
        self.executions = 0
        self.backend_calls = 0

    @property
    def sandbox(self) -> Any:
        if self._sandbox is None:
            from ..sandbox import PythonSandbox

            self._sandbox = PythonSandbox()
        return self._sandbox

    def next_steps(self, states: list[State], n: int, temperature: float) -> list[list[Step]]:
        """``n`` next steps for every state: one backend call, one parallel sandbox batch.

        Returns one list of ``n`` steps per state, in order. Each step has ``prior`` (Eq. 4, see
        `mean_token_probability`) and ``num_tokens`` set; code steps carry their ``<output>``;
        answer steps are terminal with ``final_answer``; malformed steps (including generations that
        ran out of tokens or ended without a stop string) are terminal with ``is_malformed``.
        Depth limits are the caller's business.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        for i, state in enumerate(states):
            if state.is_terminal:
                raise ValueError(
                    f"state {i} is terminal (its last step is {state.steps[-1].kind}); it has no next step"
                )
        if not states:
            return []
        completions = self.backend.generate(
            [state.text for state in states],
            n=n,
            temperature=temperature,
            max_new_tokens=self.max_new_tokens,
            stop=self.step_format.stop,
        )
        self.backend_calls += 1
        if len(completions) != len(states) or any(len(c) != n for c in completions):
            raise RuntimeError(
                f"backend returned {[len(c) for c in completions]} completions for {len(states)} states x n={n}"
            )

        # Which completions stopped at a code block: run all of them in one parallel sandbox batch.
        jobs: list[tuple[int, int]] = []
        snippets: list[list[str]] = []
        for i, (state, group) in enumerate(zip(states, completions)):
            for j, completion in enumerate(group):
                self.tokens_generated += completion.num_tokens
                if self._unfinished_reason(completion) is not None:
                    continue
                code = self.step_format.code_to_run(completion.text)
                if code is not None:
                    jobs.append((i, j))
                    snippets.append([*state.code_history, code])
        outputs: dict[tuple[int, int], str] = {}
        if snippets:
            results = self.sandbox.run_many(snippets)
            self.executions += len(snippets)
            for job, result in zip(jobs, results):
                outputs[job] = format_execution_output(result)

        return [
            [self._to_step(completion, outputs.get((i, j))) for j, completion in enumerate(group)]
            for i, group in enumerate(completions)
        ]

    # ------------------------------------------------------------------ helpers
    def _unfinished_reason(self, completion: Completion) -> str | None:
        if completion.finish_reason == "length":
            return f"ran out of tokens (max_new_tokens={self.max_new_tokens})"
        if not any(completion.text.rstrip().endswith(s) for s in self.step_format.stop):
            return "generation ended without a stop string"
        return None

    def _to_step(self, completion: Completion, output: str | None) -> Step:
        text = self.step_format.close_step(completion.text, output)
        step = self.step_format.parse(text)
        unfinished = self._unfinished_reason(completion)
        if unfinished is not None:
            step.kind = "malformed"
            step.is_malformed = True
            step.is_terminal = True
            step.error = unfinished if step.error is None else f"{unfinished}; {step.error}"
        step.prior = mean_token_probability(completion.token_logprobs)
        step.num_tokens = completion.num_tokens
        step.extra["finish_reason"] = completion.finish_reason
        return step
