"""The step format of the paper (Appendix A.1, A.5): how questions, steps and solutions look as text.

A solution is a prompt ``<question>...</question>\\n`` followed by ``<step>...</step>\\n`` blocks.
A C-step carries analysis, a ``<code>`` block and the ``<output>`` of running it; an A-step carries
analysis and ``Final Answer: $...$``. Generation of one step stops at ``</code>`` (the sandbox then
runs the code and :meth:`StepFormat.close_step` appends the output) or at ``</step>``.

Everything format-specific lives in :class:`StepFormat`, so that another format can be plugged
into search and training by subclassing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

StepKind = Literal["code", "answer", "malformed"]

_CODE_FENCE = re.compile(r"^\s*```(?:python|py)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)
_FINAL_ANSWER = re.compile(r"Final Answer\s*:\s*(.*)", re.DOTALL)
_FINAL_ANSWER_MARKER = re.compile(r"Final Answer\s*:\s*")


@dataclass
class Step:
    """One reasoning step, parsed.

    ``text`` is the step exactly as it appears in a solution (``<step>`` ... ``</step>\\n``).
    ``prior`` is the mean token probability of the generated part (Eq. 4); ``num_tokens`` the
    number of generated tokens. Both are filled by the sampler and default to neutral values.
    """

    text: str
    kind: StepKind
    analysis: str = ""
    code: str | None = None
    output: str | None = None
    final_answer: str | None = None
    is_terminal: bool = False
    is_malformed: bool = False
    prior: float = 1.0
    num_tokens: int = 0
    error: str | None = None
    extra: dict = field(default_factory=dict)


def _balanced_braces(text: str, start: int) -> str | None:
    """Content of the brace group that opens at ``text[start] == '{'``, or None if unclosed."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced."""
    for macro in ("\\boxed", "\\fbox"):
        idx = text.rfind(macro)
        if idx < 0:
            continue
        brace = idx + len(macro)
        while brace < len(text) and text[brace] == " ":
            brace += 1
        if brace < len(text) and text[brace] == "{":
            return _balanced_braces(text, brace)
    return None


def extract_final_answer(text: str) -> str | None:
    """The answer of a ``Final Answer: ...`` line: inside ``\\boxed{}`` if present, else inside ``$...$``.

    Returns None when there is no ``Final Answer:`` marker or it is empty.
    """
    markers = list(_FINAL_ANSWER_MARKER.finditer(text))
    if not markers:
        return None
    answer = text[markers[-1].end() :]
    # The answer paragraph ends at the closing </p> (or the end of the step).
    answer = re.split(r"</p>|</step>", answer, maxsplit=1)[0].strip().rstrip(".").strip()
    boxed = last_boxed(answer)
    if boxed is not None:
        answer = boxed
    elif answer.startswith("$$") and answer.endswith("$$") and len(answer) >= 4:
        answer = answer[2:-2]
    elif answer.startswith("$") and answer.endswith("$") and len(answer) >= 2:
        answer = answer[1:-1]
    elif answer.startswith("\\(") and answer.endswith("\\)"):
        answer = answer[2:-2]
    answer = answer.strip().rstrip(".").strip()
    return answer or None


class StepFormat:
    """The XML step format of the paper (Appendix A.5). Subclass to plug in another format."""

    step_open = "<step>"
    step_close = "</step>"
    code_close = "</code>"

    def prompt(self, question: str) -> str:
        """The prompt for a question, Figure 5: ``<question>{question}</question>\\n``."""
        return f"<question>{question.strip()}</question>\n"

    @property
    def stop(self) -> list[str]:
        """Stop strings for generating one step: at ``</code>`` run the code; ``</step>`` ends a step."""
        return [self.code_close, self.step_close]

    # ------------------------------------------------------------------ rendering
    def render_code_step(self, analysis: str, code: str, output: str) -> str:
        """A C-step: analysis, code, and the output of running it."""
        return (
            f"<step>\n<p>\n{analysis.strip()}\n</p>\n<code>\n```python\n{code.strip()}\n```\n</code>\n"
            f"<output>\n{output.strip()}\n</output>\n</step>\n"
        )

    def render_answer_step(self, analysis: str, answer: str) -> str:
        """An A-step: analysis and ``Final Answer: $answer$``."""
        return (
            f"<step>\n<p>\n{analysis.strip()}\n</p>\n<p>\nFinal Answer: ${answer.strip()}$\n</p>\n</step>\n"
        )

    def render_solution(self, question: str, steps: list[str]) -> str:
        """Prompt plus the concatenated step texts."""
        return self.prompt(question) + "".join(steps)

    # ------------------------------------------------------------------ generation protocol
    def code_to_run(self, generated: str) -> str | None:
        """The code of a step whose generation stopped at ``</code>``, else None.

        A generation that stopped at ``</code>`` but also states a final answer is malformed and
        is not executed.
        """
        body = generated.rstrip()
        if not body.endswith(self.code_close):
            return None
        if _FINAL_ANSWER.search(body):
            return None
        code_block = self._tag(body, "code")
        if code_block is None:
            return None
        return self._strip_fence(code_block)

    def close_step(self, generated: str, output: str | None = None) -> str:
        """The full step text from a generation that stopped at a stop string (or ran out).

        After ``</code>``, appends the ``<output>`` block of the executed code and ``</step>``.
        """
        body = generated.rstrip()
        if output is not None and body.endswith(self.code_close):
            return f"{body}\n<output>\n{output.strip()}\n</output>\n{self.step_close}\n"
        return body + "\n"

    # ------------------------------------------------------------------ parsing
    def parse(self, text: str) -> Step:
        """Parse one complete step. Malformed steps are marked (``is_malformed``, terminal), never raised.

        Malformed: no ``<step>``/``</step>`` pair, unclosed ``<code>``/``<p>`` tags, a step with both
        code and a final answer, or with neither.
        """
        body = text.strip()
        problems: list[str] = []
        if not body.startswith(self.step_open):
            problems.append("does not start with <step>")
        if not body.endswith(self.step_close):
            problems.append("does not end with </step>")
        inner = body.removeprefix(self.step_open).removesuffix(self.step_close)
        for tag in ("p", "code", "output"):
            if inner.count(f"<{tag}>") != inner.count(f"</{tag}>"):
                problems.append(f"unclosed <{tag}>")
        code_block = self._tag(inner, "code")
        output = self._tag(inner, "output")
        final_answer = extract_final_answer(inner) if _FINAL_ANSWER.search(inner) else None
        has_final_marker = _FINAL_ANSWER.search(inner) is not None
        if code_block is not None and has_final_marker:
            problems.append("has both code and a final answer")
        if code_block is None and not has_final_marker:
            problems.append("has neither code nor a final answer")
        if has_final_marker and final_answer is None:
            problems.append("empty final answer")
        if code_block is not None and output is None:
            problems.append("code without <output>")
        paragraphs = re.findall(r"<p>(.*?)</p>", inner, re.DOTALL)
        analysis = paragraphs[0].strip() if paragraphs else ""
        if not text.endswith("\n"):
            text = text + "\n"
        if problems:
            return Step(
                text=text,
                kind="malformed",
                analysis=analysis,
                code=self._strip_fence(code_block) if code_block is not None else None,
                output=output,
                final_answer=final_answer,
                is_terminal=True,
                is_malformed=True,
                error="; ".join(problems),
            )
        if code_block is not None:
            return Step(
                text=text,
                kind="code",
                analysis=analysis,
                code=self._strip_fence(code_block),
                output=output.strip() if output is not None else None,
            )
        return Step(text=text, kind="answer", analysis=analysis, final_answer=final_answer, is_terminal=True)

    def split_steps(self, solution: str) -> list[str]:
        """Split a solution (without its prompt) into its steps: each runs up to and including a ``</step>``.

        Generation of a step stops at the first ``</step>`` (or at ``</code>``, after which the sampler
        closes the step), so a step's text holds exactly one ``</step>``, at its end. A search path can
        end in a malformed step (it never closed, or text came before its ``<step>``): that text is the
        last step. So partial solutions from search trees split back into the steps they were built
        from; blank text between steps is dropped.
        """
        steps = []
        for match in re.finditer(r".*?(?:</step>\n?|\Z)", solution, re.DOTALL):
            text = match.group(0)
            if text.lstrip().startswith(self.step_open):
                text = text.lstrip()
            if text.strip():
                steps.append(text + "\n" if text.endswith(self.step_close) else text)
        return steps

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _tag(text: str, tag: str) -> str | None:
        match = re.search(rf"<{tag}>\n?(.*?)\n?</{tag}>", text, re.DOTALL)
        return match.group(1) if match else None

    @staticmethod
    def _strip_fence(code: str) -> str:
        match = _CODE_FENCE.match(code)
        return (match.group(1) if match else code).strip("\n")


DEFAULT_FORMAT = StepFormat()
