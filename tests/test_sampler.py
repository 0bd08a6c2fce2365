"""StepSampler: generate -> execute -> parse, with the scripted backend."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from svpo_trl.search.backends import Completion
from svpo_trl.search.sampler import StepSampler, format_execution_output, mean_token_probability
from svpo_trl.search.state import State
from svpo_trl.search.testing import ScriptedBackend
from svpo_trl.steps import DEFAULT_FORMAT

PROMPT = DEFAULT_FORMAT.prompt("What is 3 + 4?")
CODE_GEN = "<step>\n<p>\nAdd them.\n</p>\n<code>\n```python\nprint(3 + 4)\n```\n</code>"
ANSWER_GEN = "<step>\n<p>\nDone.\n</p>\n<p>\nFinal Answer: $7$\n</p>\n</step>"
NO_TAGS_GEN = "I think the answer is 7</step>"


@dataclass
class FakeExecResult:
    stdout: str = ""
    error: str | None = None
    timed_out: bool = False


class FakeSandbox:
    """Stand-in for the sandbox collaborator: records calls, answers from a table keyed by the last snippet."""

    def __init__(self, answers: dict[str, FakeExecResult] | None = None):
        self.answers = answers or {}
        self.calls: list[list[list[str]]] = []

    def run(self, snippets: list[str]) -> FakeExecResult:
        return self.answers.get(snippets[-1], FakeExecResult(stdout="7\n"))

    def run_many(self, snippet_lists, max_workers=None):
        self.calls.append([list(s) for s in snippet_lists])
        return [self.run(s) for s in snippet_lists]


class FixedBackend:
    """A backend returning given Completion objects (finish reasons and exact log-probs under test control)."""

    def __init__(self, completions: list[Completion]):
        self.completions = completions
        self.calls = 0

    def generate(self, prompts, *, n, temperature, max_new_tokens, stop):
        self.calls += 1
        return [[self.completions[j % len(self.completions)] for j in range(n)] for _ in prompts]

    def values(self, texts):
        raise TypeError("no value head")


def test_code_step_is_executed_and_output_appended():
    backend = ScriptedBackend({PROMPT: [CODE_GEN]})
    sandbox = FakeSandbox()
    sampler = StepSampler(backend, sandbox=sandbox)
    [[step]] = sampler.next_steps([State(PROMPT)], n=1, temperature=1.0)
    assert step.kind == "code"
    assert not step.is_terminal
    assert step.code == "print(3 + 4)"
    assert step.output == "7"
    assert step.text == CODE_GEN + "\n<output>\n7\n</output>\n</step>\n"
    assert sandbox.calls == [[["print(3 + 4)"]]]
    assert sampler.executions == 1


def test_answer_step_is_terminal_with_final_answer_and_not_executed():
    backend = ScriptedBackend({PROMPT: [ANSWER_GEN]})
    sandbox = FakeSandbox()
    sampler = StepSampler(backend, sandbox=sandbox)
    [[step]] = sampler.next_steps([State(PROMPT)], n=1, temperature=1.0)
    assert step.kind == "answer"
    assert step.is_terminal and not step.is_malformed
    assert step.final_answer == "7"
    assert step.text == ANSWER_GEN + "\n"
    assert sandbox.calls == []
    assert sampler.executions == 0


def test_code_history_runs_before_new_snippet():
    first = DEFAULT_FORMAT.render_code_step("Set x.", "x = 5", "")
    state = State(PROMPT, [DEFAULT_FORMAT.parse(first)])
    gen = "<step>\n<p>\nUse x.\n</p>\n<code>\n```python\nprint(x * 2)\n```\n</code>"
    sandbox = FakeSandbox({"print(x * 2)": FakeExecResult(stdout="10\n")})
    sampler = StepSampler(ScriptedBackend({state.text: [gen]}), sandbox=sandbox)
    [[step]] = sampler.next_steps([state], n=1, temperature=1.0)
    assert sandbox.calls == [[["x = 5", "print(x * 2)"]]]
    assert step.output == "10"


def test_one_backend_call_and_one_run_many_for_many_states():
    other = DEFAULT_FORMAT.prompt("What is 2 * 5?")
    other_code = CODE_GEN.replace("3 + 4", "2 * 5")
    backend = ScriptedBackend({PROMPT: [CODE_GEN, ANSWER_GEN], other: [other_code]})
    sandbox = FakeSandbox({"print(2 * 5)": FakeExecResult(stdout="10\n")})
    sampler = StepSampler(backend, sandbox=sandbox)
    steps = sampler.next_steps([State(PROMPT), State(other)], n=3, temperature=0.8)
    assert len(backend.calls) == 1 and backend.calls[0] == [PROMPT, other]
    assert len(sandbox.calls) == 1
    # PROMPT cycles code, answer, code; other gives three code steps: 5 executions in one batch.
    assert len(sandbox.calls[0]) == 5
    assert [s.kind for s in steps[0]] == ["code", "answer", "code"]
    assert [s.output for s in steps[1]] == ["10", "10", "10"]
    assert sampler.executions == 5
    assert sampler.backend_calls == 1


def test_output_shows_stdout_then_last_error_line():
    assert format_execution_output(FakeExecResult(stdout="1\n2\n")) == "1\n2"
    err = "Traceback (most recent call last):\n  File ...\nZeroDivisionError: division by zero"
    assert format_execution_output(FakeExecResult(error=err)) == "ZeroDivisionError: division by zero"
    assert (
        format_execution_output(FakeExecResult(stdout="3\n", error=err))
        == "3\nZeroDivisionError: division by zero"
    )
    timeout = FakeExecResult(error="TimeoutError: timed out after 5s", timed_out=True)
    assert format_execution_output(timeout) == "TimeoutError: timed out after 5s"
    assert format_execution_output(FakeExecResult(timed_out=True)).startswith("TimeoutError")


def test_error_output_goes_into_the_step():
    err = "Traceback (most recent call last):\nNameError: name 'y' is not defined"
    gen = CODE_GEN.replace("3 + 4", "y")
    sandbox = FakeSandbox({"print(y)": FakeExecResult(error=err)})
    sampler = StepSampler(ScriptedBackend({PROMPT: [gen]}), sandbox=sandbox)
    [[step]] = sampler.next_steps([State(PROMPT)], n=1, temperature=1.0)
    assert step.kind == "code" and not step.is_terminal
    assert step.output == "NameError: name 'y' is not defined"


def test_malformed_step_is_terminal():
    sampler = StepSampler(ScriptedBackend({PROMPT: [NO_TAGS_GEN]}), sandbox=FakeSandbox())
    [[step]] = sampler.next_steps([State(PROMPT)], n=1, temperature=1.0)
    assert step.kind == "malformed"
    assert step.is_terminal and step.is_malformed
    assert "does not start with <step>" in step.error


def test_length_finish_is_malformed_and_not_executed():
    # Even text that looks like a finished code step is not run when the backend says it ran out.
    completion = Completion(CODE_GEN, token_logprobs=[-0.1] * 4, finish_reason="length")
    sandbox = FakeSandbox()
    sampler = StepSampler(FixedBackend([completion]), sandbox=sandbox, max_new_tokens=4)
    [[step]] = sampler.next_steps([State(PROMPT)], n=1, temperature=1.0)
    assert step.is_malformed and step.is_terminal and step.kind == "malformed"
    assert "ran out of tokens" in step.error
    assert sandbox.calls == []


def test_end_without_stop_string_is_malformed():
    # EOS right after a well-formed answer body, but no </step>: the step never closed.
    completion = Completion(ANSWER_GEN.removesuffix("</step>"), token_logprobs=[-0.5], finish_reason="stop")
    sampler = StepSampler(FixedBackend([completion]), sandbox=FakeSandbox())
    [[step]] = sampler.next_steps([State(PROMPT)], n=1, temperature=1.0)
    assert step.is_malformed and step.is_terminal
    assert "without a stop string" in step.error


def test_prior_is_mean_token_probability():
    # Token probabilities 0.9, 0.5, 0.1: Eq. 4's prior is (0.9 + 0.5 + 0.1) / 3 = 0.5,
    # not the geometric mean (0.045 ** (1/3) = 0.3557).
    logprobs = [math.log(0.9), math.log(0.5), math.log(0.1)]
    completion = Completion(ANSWER_GEN, token_logprobs=logprobs, finish_reason="stop")
    sampler = StepSampler(FixedBackend([completion]), sandbox=FakeSandbox())
    [[step]] = sampler.next_steps([State(PROMPT)], n=1, temperature=1.0)
    assert step.prior == pytest.approx(0.5)
    assert step.num_tokens == 3
    assert sampler.tokens_generated == 3
    assert mean_token_probability([]) == 0.0


def test_scripted_prior_and_token_counts():
    backend = ScriptedBackend({PROMPT: [(ANSWER_GEN, 0.25), (CODE_GEN, 0.8)]})
    sampler = StepSampler(backend, sandbox=FakeSandbox())
    [steps] = sampler.next_steps([State(PROMPT)], n=2, temperature=1.0)
    assert [s.prior for s in steps] == pytest.approx([0.25, 0.8])
    assert [s.num_tokens for s in steps] == [len(ANSWER_GEN.split()), len(CODE_GEN.split())]
    assert sampler.tokens_generated == backend.tokens_generated


def test_bad_input_is_rejected_clearly():
    sampler = StepSampler(ScriptedBackend({PROMPT: [ANSWER_GEN]}), sandbox=FakeSandbox())
    done = State(PROMPT, [DEFAULT_FORMAT.parse(ANSWER_GEN)])
    with pytest.raises(ValueError, match="state 1 is terminal"):
        sampler.next_steps([State(PROMPT), done], n=1, temperature=1.0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        sampler.next_steps([State(PROMPT)], n=0, temperature=1.0)
    assert sampler.next_steps([], n=2, temperature=1.0) == []


def test_real_sandbox_runs_code_with_history_and_errors():
    from svpo_trl.sandbox import PythonSandbox

    first = DEFAULT_FORMAT.render_code_step("Set x.", "x = 5", "")
    state = State(PROMPT, [DEFAULT_FORMAT.parse(first)])
    use_x = "<step>\n<p>\nUse x.\n</p>\n<code>\n```python\nprint(x * 2)\n```\n</code>"
    divide = "<step>\n<p>\nDivide.\n</p>\n<code>\n```python\nprint(x)\nprint(1 / 0)\n```\n</code>"
    with PythonSandbox(timeout_s=5.0) as sandbox:
        sampler = StepSampler(ScriptedBackend({state.text: [use_x, divide]}), sandbox=sandbox)
        [[ok, failed]] = sampler.next_steps([state], n=2, temperature=1.0)
    assert ok.kind == "code" and ok.output == "10"
    assert failed.kind == "code" and not failed.is_terminal
    assert failed.output == "5\nZeroDivisionError: division by zero"
    assert failed.text.endswith("<output>\n5\nZeroDivisionError: division by zero\n</output>\n</step>\n")
    assert sampler.executions == 2
