"""Stage-0 data: step-format SFT solutions from a user's files, the Hub, or GSM8K's calculator answers.

The SFT policy of stage 0 must write the step format (paper §4.1, A.5; :mod:`svpo_trl.steps`), so every
training target is checked before any training: a solution is one or more ``<step>`` blocks, code steps
(analysis, code, output) followed by one answer step (analysis, ``Final Answer: $…$``). A row that is not
in that format stops the stage with the file, the row and the field named; nothing empty or free-form is
ever trained on.

Accepted layouts (JSONL or JSON-array files, a folder with ``{split}.jsonl``/``{split}.json``, a
``save_to_disk`` folder, or a Hub dataset id): ``question`` or ``problem``, plus ``solution``; any other
column (``answer``, ``id``, …) is ignored.

GSM8K's own answers are not in the step format, but each calculation is marked ``<<expr=value>>`` and the
gold follows ``####``: :func:`gsm8k_to_step_format` turns them mechanically into code steps (the sentence as
analysis, ``print(expr)`` as code, the printed value as output) and an answer step. It is a
``datasets.map`` function; rows it cannot convert come back with an empty ``solution`` and the reason in
``conversion_error``, and :func:`load_sft_dataset` drops and counts them.
"""

from __future__ import annotations

import ast
import logging
import math
import operator
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .data import HUB_SOURCES, _read_rows, _resolve_file, load_saved_dataset
from .errors import UsageError, require_path
from .steps import DEFAULT_FORMAT, StepFormat

logger = logging.getLogger(__name__)

__all__ = [
    "SFTData",
    "conversion_failure_kind",
    "gsm8k_to_step_format",
    "gsm8k_to_steps",
    "load_sft_dataset",
    "step_format_error",
]

QUESTION_FIELDS = ("question", "problem")


# ----------------------------------------------------------------------------- the step format check
def step_format_error(solution: Any, step_format: StepFormat = DEFAULT_FORMAT) -> str | None:
    """Why ``solution`` is not a step-format SFT target, or None when it is one.

    A target is code steps followed by exactly one answer step, each well formed; text outside the
    ``<step>`` blocks, an empty solution and a solution without a final answer are refused.
    """
    if not isinstance(solution, str) or not solution.strip():
        return "it is empty" if isinstance(solution, str) or solution is None else f"not text: {solution!r}"
    steps = step_format.split_steps(solution)
    if not steps or not steps[0].lstrip().startswith(step_format.step_open):
        return f"it does not start with {step_format.step_open}: {_clip(solution)}"
    for number, text in enumerate(steps, start=1):
        step = step_format.parse(text)
        if step.is_malformed:
            return f"step {number} is malformed ({step.error}): {_clip(text)}"
        last = number == len(steps)
        if step.kind == "answer" and not last:
            return f"step {number} gives the final answer but {len(steps) - number} more step(s) follow"
        if last and step.kind != "answer":
            return "no answer step (Final Answer: $...$) at the end"
    return None


def _clip(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "…")


# ----------------------------------------------------------------------------- GSM8K conversion
_MARK = re.compile(r"<<([^<>]*)>>")
_NUMBER = r"\$?\d[\d,]*(?:\.\d+)?"
# "20/4 = $5", "10 × $4 = $40", "(3 + 2) * 4 = 20": numbers and operators, '=', a number.
_INLINE = re.compile(
    rf"((?:\(\s*)*{_NUMBER}(?:\s*\)?\s*[-+*/x×÷−]\s*\(*\s*{_NUMBER}\s*\)*)+)\s*=\s*({_NUMBER})"
)
_SYMBOLS = str.maketrans({"x": "*", "×": "*", "÷": "/", "−": "-"})
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


class _NotArithmetic(ValueError):
    """A calculator mark that is not plain arithmetic, or whose value cannot be computed."""


def _python_expression(expression: str) -> str:
    """A GSM8K calculator expression as Python: ``^`` is a power, ``1,000`` is 1000, ``08`` is 8."""
    text = expression.replace("^", "**").replace("$", "").strip()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    # Python 3 refuses leading zeros on integers ("08"); GSM8K writes clock times and prices so.
    return re.sub(r"(?<![\d.])0+(?=\d)", "", text)


def _evaluate(node: ast.AST) -> int | float:
    """Plain arithmetic on numbers, with Python's own semantics (so ``print`` shows what the sandbox shows)."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise _NotArithmetic("power too large to evaluate safely")
        try:
            return _OPERATORS[type(node.op)](left, right)
        except (ArithmeticError, ValueError) as error:
            raise _NotArithmetic(str(error)) from error
    raise _NotArithmetic(f"not plain arithmetic: {ast.dump(node)[:60]}")


def _calculate(expression: str) -> tuple[str, str]:
    """``(code, printed)``: the Python code of one calculator mark and what ``print`` shows for it."""
    python = _python_expression(expression)
    try:
        tree = ast.parse(python, mode="eval")
    except SyntaxError as error:
        raise _NotArithmetic(f"not a Python expression: {expression!r}") from error
    value = _evaluate(tree)
    if isinstance(value, float) and not math.isfinite(value):
        raise _NotArithmetic(f"{expression!r} is not finite")
    return f"print({python})", str(value)


def _number(text: str) -> float | None:
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def _agrees(printed: str, stated: str) -> bool:
    """Whether a computed value is the value GSM8K states; a statement with decimals may have rounded or
    cut the value to those decimals (``<<10/3=3.33>>``), a whole number must be exact."""
    computed, expected = _number(printed), _number(stated)
    if computed is None or expected is None:
        return False
    if math.isclose(computed, expected, rel_tol=1e-9, abs_tol=1e-9):
        return True
    decimals = len(stated.strip().rstrip(".").partition(".")[2])
    if decimals == 0:
        return False
    cut = math.trunc(computed * 10**decimals) / 10**decimals
    return any(
        math.isclose(v, expected, rel_tol=1e-9, abs_tol=1e-12) for v in (round(computed, decimals), cut)
    )


@dataclass
class _Step:
    analysis: list[str] = field(default_factory=list)
    code: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)


def _inline_calculations(line: str) -> list[str]:
    """Calculations a line writes out without a mark (``20/4 = $5``, ``10 × $4 = $40``), as ``expr=value``.

    Only those that parse as arithmetic and agree with the value written count; anything else stays text.
    """
    found = []
    for match in _INLINE.finditer(line):
        expression = match.group(1).translate(_SYMBOLS)
        try:
            _, printed = _calculate(expression)
        except _NotArithmetic:
            continue
        if _agrees(printed, match.group(2)):
            found.append(f"{expression}={match.group(2)}")
    return found


def _code_step(line: str, marks: list[str]) -> _Step:
    step = _Step(analysis=[_MARK.sub("", line).strip()])
    for mark in marks:
        expression, equals, stated = mark.rpartition("=")
        if not equals or not expression.strip():
            raise ValueError(f"calculator mark <<{mark}>> has no 'expr=value' form")
        try:
            code, printed = _calculate(expression)
        except _NotArithmetic as error:
            raise ValueError(f"calculator mark <<{mark}>>: {error}") from error
        if not _agrees(printed, stated):
            raise ValueError(f"calculator mark <<{mark}>> computes {printed}, not {stated.strip()}")
        step.code.append(code)
        step.output.append(printed)
    return step


def gsm8k_to_steps(answer: str, step_format: StepFormat = DEFAULT_FORMAT) -> tuple[list[str], str]:
    """``(steps, gold)``: a GSM8K answer (rationale with ``<<expr=value>>`` marks, then ``#### gold``) in the
    step format, as step texts.

    Each rationale line with calculations becomes a code step: the line without its marks as analysis
    (lines without calculations join the next step's analysis), one ``print(expr)`` per calculation as
    code, and the printed values as output. Calculations are the ``<<expr=value>>`` marks, or, on a line
    without marks, arithmetic written out as ``expr = value`` that agrees with its value. An answer step
    states the gold; the last calculation, or failing that an earlier one, must give it.

    Raises ``ValueError`` (with the reason) when the answer has no gold or no calculation, a mark is not
    plain arithmetic or disagrees with the value GSM8K states, or no calculation gives the gold.
    """
    if not isinstance(answer, str) or "####" not in answer:
        raise ValueError("no '#### <gold>' line")
    rationale, gold = answer.rsplit("####", 1)
    gold = gold.strip().replace(",", "")
    if _number(gold) is None:
        raise ValueError(f"gold {gold!r} is not a number")
    steps: list[_Step] = []
    pending: list[str] = []
    for line in (line.strip() for line in rationale.splitlines()):
        if not line:
            continue
        marks = _MARK.findall(line) or _inline_calculations(line)
        if not marks:
            pending.append(line)
            continue
        step = _code_step(line, marks)
        step.analysis[:0] = pending
        pending = []
        steps.append(step)
    if not steps:
        raise ValueError("no <<expr=value>> calculator marks")
    outputs = [value for step in steps for value in step.output]
    if not any(_agrees(value, gold) for value in outputs):
        raise ValueError(f"no calculation gives the gold {gold} (the last gives {outputs[-1]})")
    texts = [
        step_format.render_code_step(" ".join(s.analysis), "\n".join(s.code), "\n".join(s.output))
        for s in steps
    ]
    conclusion = " ".join(pending) if pending else f"The answer is {gold}."
    texts.append(step_format.render_answer_step(conclusion, gold))
    return texts, gold


def gsm8k_to_step_format(row: dict[str, Any]) -> dict[str, str]:
    """``datasets.map`` function: a GSM8K row (``question``, ``answer``) to ``solution`` in the step format.

    Returns ``solution`` (empty when the row does not convert), ``gold`` and ``conversion_error`` (empty
    when it converts). ``dataset.map(gsm8k_to_step_format).filter(lambda r: r["solution"] != "")`` keeps the
    converted rows.
    """
    try:
        steps, gold = gsm8k_to_steps(row["answer"])
    except (ValueError, KeyError, TypeError) as error:
        return {"solution": "", "gold": "", "conversion_error": str(error)}
    return {"solution": "".join(steps), "gold": gold, "conversion_error": ""}


# ----------------------------------------------------------------------------- reading SFT data
@dataclass
class SFTData:
    """What :func:`load_sft_dataset` read: ``dataset`` (``question``, ``solution``), where it came from,
    and the rows dropped by the GSM8K conversion (with the most common reasons)."""

    dataset: Any
    source: str
    rows_read: int
    dropped: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        kept = f"{len(self.dataset):,} of {self.rows_read:,} rows"
        if not self.dropped:
            return f"{self.source}: {kept}"
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.drop_reasons.items())
        return f"{self.source}: {kept} converted to the step format; {self.dropped:,} dropped ({reasons})"


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


def _rows(name_or_path: str, split: str) -> tuple[str, Iterator[tuple[str, Any]]]:
    """``(source, rows)``: where the rows come from (named in errors) and ``(where, row)`` pairs."""
    if os.path.isdir(name_or_path) and _is_saved_dataset(name_or_path):
        from datasets import DatasetDict

        data = load_saved_dataset(name_or_path)
        if isinstance(data, DatasetDict):
            if split not in data:
                raise UsageError(f"{name_or_path}: no split {split!r} (has {sorted(data)})")
            data = data[split]
        return name_or_path, ((f"row {i}", row) for i, row in enumerate(data))
    if os.path.exists(name_or_path):
        try:
            file, _ = _resolve_file(name_or_path, split)
        except FileNotFoundError as error:
            raise UsageError(str(error)) from error
        return file, _read_rows(file)
    require_path(name_or_path, "dataset_name")
    import datasets

    spec = HUB_SOURCES.get(name_or_path.lower(), {}).get(split)
    if spec is not None and "path" in spec and "configs" not in spec:
        data = datasets.load_dataset(spec["path"], spec.get("name"), split=spec["split"])
        source = spec["path"]
    else:
        data = datasets.load_dataset(name_or_path, split=split)
        source = name_or_path
    return source, ((f"row {i}", row) for i, row in enumerate(data))


def _question(row: dict, source: str, where: str) -> str:
    for name in QUESTION_FIELDS:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value
        if name in row:
            raise UsageError(f"{source}, {where}: field {name!r} must be a non-empty string, got {value!r}")
    raise UsageError(
        f"{source}, {where}: no 'question' (or 'problem') field; SFT rows need question + step-format "
        f"solution, got fields {sorted(row)}"
    )


def _step_rows(rows: Iterable[tuple[str, Any]], source: str, step_format: StepFormat) -> list[dict]:
    records, bad = [], []
    for where, row in rows:
        if not isinstance(row, dict):
            raise UsageError(f"{source}, {where}: expected a JSON object, got {type(row).__name__}")
        question = _question(row, source, where)
        if "solution" not in row:
            hint = ""
            if isinstance(row.get("answer"), str) and "####" in row["answer"]:
                hint = " (GSM8K answers convert to the step format with --convert_gsm8k)"
            raise UsageError(
                f"{source}, {where}: no 'solution' field; SFT needs a step-format solution{hint}, "
                f"got fields {sorted(row)}"
            )
        error = step_format_error(row["solution"], step_format)
        if error is not None:
            bad.append(f"{source}, {where}: field 'solution' is not a step-format solution: {error}")
        else:
            records.append({"question": question, "solution": row["solution"]})
    if bad:
        more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
        raise UsageError(bad[0] + more)
    return records


def _gsm8k_rows(rows: Iterable[tuple[str, Any]], source: str) -> tuple[list[dict], int, dict[str, int]]:
    records, reasons = [], {}
    read = 0
    for where, row in rows:
        read += 1
        if not isinstance(row, dict):
            raise UsageError(f"{source}, {where}: expected a JSON object, got {type(row).__name__}")
        question = _question(row, source, where)
        if not isinstance(row.get("answer"), str):
            raise UsageError(
                f"{source}, {where}: --convert_gsm8k needs a GSM8K 'answer' field, got {sorted(row)}"
            )
        converted = gsm8k_to_step_format(row)
        if converted["solution"]:
            records.append({"question": question, "solution": converted["solution"]})
        else:
            reason = conversion_failure_kind(converted["conversion_error"])
            reasons[reason] = reasons.get(reason, 0) + 1
    return records, read - len(records), dict(sorted(reasons.items(), key=lambda kv: -kv[1]))


def conversion_failure_kind(error: str) -> str:
    """A conversion error without its row's numbers, to count rows by reason."""
    kinds = {
        "calculator marks": "no calculation",
        "gives the gold": "no calculation gives the gold",
        "computes": "a mark's value differs from GSM8K's",
        "not plain arithmetic": "a mark is not plain arithmetic",
    }
    return next((kind for key, kind in kinds.items() if key in error), error.split(":")[0])


def load_sft_dataset(
    name_or_path: str,
    split: str = "train",
    *,
    convert_gsm8k: bool = False,
    step_format: StepFormat = DEFAULT_FORMAT,
) -> SFTData:
    """Stage-0 rows ``question``, ``solution`` (step format), from a file, folder, saved dataset or the Hub.

    ``name_or_path``: a JSONL / JSON-array file; a folder with ``{split}.jsonl`` or ``{split}.json``; a
    ``save_to_disk`` folder; ``gsm8k`` (``openai/gsm8k``); or any Hub dataset id. Rows need ``question`` (or
    ``problem``) and a step-format ``solution``; other columns are ignored. With ``convert_gsm8k`` the
    solutions come from GSM8K ``answer`` fields instead (:func:`gsm8k_to_step_format`); rows that do not
    convert are dropped and counted in the result.

    Raises:
        UsageError: a missing path, a row without the fields, or a solution not in the step format (the
            file, the row and the field are named), or no rows left to train on.
    """
    source, rows = _rows(name_or_path, split)
    if convert_gsm8k:
        records, dropped, reasons = _gsm8k_rows(rows, source)
    else:
        records, dropped, reasons = _step_rows(rows, source, step_format), 0, {}
    if not records:
        raise UsageError(
            f"{source}: no rows to train on" + (f" ({dropped} did not convert)" if dropped else "")
        )
    from datasets import Dataset

    return SFTData(Dataset.from_list(records), source, len(records) + dropped, dropped, reasons)
