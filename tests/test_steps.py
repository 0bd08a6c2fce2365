"""The step format (paper A.1, A.5): rendering, parsing, stop strings, final answers, malformed steps."""

from __future__ import annotations

import pytest

from svpo_trl.steps import DEFAULT_FORMAT, StepFormat, extract_final_answer, last_boxed

from conftest import FIGURE5_QUESTION, FIGURE5_STEPS

F = DEFAULT_FORMAT


def test_figure5_prompt_and_solution_text():
    solution = F.render_solution(FIGURE5_QUESTION, FIGURE5_STEPS)
    assert solution.startswith(f"<question>{FIGURE5_QUESTION}</question>\n<step>\n<p>\nTo calculate Haley")
    assert F.split_steps(solution.removeprefix(F.prompt(FIGURE5_QUESTION))) == FIGURE5_STEPS


def test_figure5_code_step_parses():
    step = F.parse(FIGURE5_STEPS[0])
    assert step.kind == "code"
    assert not step.is_terminal and not step.is_malformed
    assert step.analysis.startswith("To calculate Haley's height")
    assert step.code.splitlines() == [
        "current_height = 20",
        "growth_rate = 3",
        "years = 10",
        "future_height = current_height + (growth_rate * years)",
        "print(future_height)",
    ]
    assert step.output == "50"
    assert step.final_answer is None


def test_figure5_answer_step_parses():
    step = F.parse(FIGURE5_STEPS[1])
    assert step.kind == "answer"
    assert step.is_terminal and not step.is_malformed
    assert step.final_answer == "50"
    assert step.code is None


def test_render_then_parse_round_trip():
    code_step = F.render_code_step("Add them.", "a = 2\nb = 3\nprint(a + b)", "5")
    parsed = F.parse(code_step)
    assert (parsed.kind, parsed.analysis, parsed.code, parsed.output) == (
        "code",
        "Add them.",
        "a = 2\nb = 3\nprint(a + b)",
        "5",
    )
    assert F.render_code_step(parsed.analysis, parsed.code, parsed.output) == code_step

    answer_step = F.render_answer_step("So the answer is", r"\frac{1}{2}")
    parsed = F.parse(answer_step)
    assert (parsed.kind, parsed.final_answer, parsed.is_terminal) == ("answer", r"\frac{1}{2}", True)
    assert F.render_answer_step(parsed.analysis, parsed.final_answer) == answer_step


def test_figure5_steps_are_what_the_renderers_produce():
    assert (
        F.render_code_step(F.parse(FIGURE5_STEPS[0]).analysis, F.parse(FIGURE5_STEPS[0]).code, "50")
        == FIGURE5_STEPS[0]
    )
    assert (
        F.render_answer_step(F.parse(FIGURE5_STEPS[1]).analysis, F.parse(FIGURE5_STEPS[1]).final_answer)
        == FIGURE5_STEPS[1]
    )


def test_stop_strings_and_generation_protocol():
    assert F.stop == ["</code>", "</step>"]
    generated = "<step>\n<p>\nMultiply.\n</p>\n<code>\n```python\nprint(6 * 7)\n```\n</code>"
    assert F.code_to_run(generated) == "print(6 * 7)"
    closed = F.close_step(generated, "42")
    assert closed.endswith("</code>\n<output>\n42\n</output>\n</step>\n")
    step = F.parse(closed)
    assert (step.kind, step.code, step.output) == ("code", "print(6 * 7)", "42")

    answer = "<step>\n<p>\nDone.\n</p>\n<p>\nFinal Answer: $42$\n</p>\n</step>"
    assert F.code_to_run(answer) is None
    assert F.parse(F.close_step(answer)).final_answer == "42"


def test_code_to_run_refuses_code_with_final_answer():
    generated = "<step>\n<p>\nFinal Answer: $3$\n</p>\n<code>\n```python\nprint(3)\n```\n</code>"
    assert F.code_to_run(generated) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Final Answer: $50$", "50"),
        ("Final Answer: $\\boxed{\\frac{3}{4}}$", "\\frac{3}{4}"),
        ("Final Answer: \\boxed{x^2 + 1}", "x^2 + 1"),
        ("Final Answer: $(1, 2]$.", "(1, 2]"),
        ("Final Answer: 12.", "12"),
        ("<p>\nFinal Answer: $\\{1, 2\\}$\n</p>\n</step>", "\\{1, 2\\}"),
        ("Final Answer: $$2\\sqrt{3}$$", "2\\sqrt{3}"),
        ("Final Answer: \\(\\pi\\)", "\\pi"),
        ("no answer here", None),
        ("Final Answer: $$", None),
        ("Final Answer: $1$ ... Final Answer: $2$", "2"),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_last_boxed_balances_braces():
    assert last_boxed("so \\boxed{\\frac{1}{\\sqrt{2}}} and") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("nothing") is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "<step>\n<p>\nboth\n</p>\n<code>\n```python\nprint(1)\n```\n</code>\n<output>\n1\n</output>\n"
            "<p>\nFinal Answer: $1$\n</p>\n</step>\n",
            "both code and a final answer",
        ),
        ("<step>\n<p>\nI think about it.\n</p>\n</step>\n", "neither code nor a final answer"),
        ("<step>\n<p>\nunclosed\n<code>\n```python\nprint(1)\n```\n</code>\n</step>\n", "unclosed <p>"),
        ("<step>\n<p>\nno end\n</p>\n<p>\nFinal Answer: $3$\n</p>\n", "does not end with </step>"),
        ("<p>\nno start\n</p>\n<p>\nFinal Answer: $3$\n</p>\n</step>\n", "does not start with <step>"),
        ("<step>\n<p>\nempty\n</p>\n<p>\nFinal Answer: $$\n</p>\n</step>\n", "empty final answer"),
        (
            "<step>\n<p>\nno output\n</p>\n<code>\n```python\nprint(1)\n```\n</code>\n</step>\n",
            "code without <output>",
        ),
        ("", "does not start with <step>"),
        ("<step>\n<p>\ntruncated by the token limit", "does not end with </step>"),
    ],
)
def test_malformed_steps_are_marked_not_raised(text, reason):
    step = F.parse(text)
    assert step.is_malformed
    assert step.is_terminal
    assert step.kind == "malformed"
    assert reason in step.error


def test_split_steps_cuts_after_each_step_end():
    assert F.split_steps("\n" + FIGURE5_STEPS[0] + "\n\n" + FIGURE5_STEPS[1]) == FIGURE5_STEPS
    # Text before a <step> belongs to that step (what the model generated); it parses as malformed.
    steps = F.split_steps(FIGURE5_STEPS[0] + "<p>\n" + FIGURE5_STEPS[1])
    assert steps == [FIGURE5_STEPS[0], "<p>\n" + FIGURE5_STEPS[1]]
    assert F.parse(steps[1]).is_malformed


def test_split_steps_keeps_an_unclosed_last_step():
    truncated = "<step>\n<p>\nRan out of tokens\n<code>\n```python\nprint(1 +\n"
    steps = F.split_steps(FIGURE5_STEPS[0] + truncated)
    assert steps == [FIGURE5_STEPS[0], truncated]
    assert F.parse(steps[-1]).is_malformed
    # A generation that never opened a step (it stopped at once at "</code>") is a last, malformed step too.
    steps = F.split_steps(FIGURE5_STEPS[0] + "</code>\n")
    assert steps == [FIGURE5_STEPS[0], "</code>\n"]
    assert F.parse(steps[-1]).is_malformed


def test_step_format_is_pluggable():
    class QuestionPrefix(StepFormat):
        def prompt(self, question: str) -> str:
            return f"Q: {question}\n"

    fmt = QuestionPrefix()
    assert fmt.prompt("1+1?") == "Q: 1+1?\n"
    assert fmt.parse(FIGURE5_STEPS[1]).final_answer == "50"
