"""Gold-answer extraction and answer equivalence: the correctness behind the reward R of Eq. 5.

A terminal step earns R = +1 when its final answer is equivalent to the gold answer, else -1
(paper §3.1). :func:`is_equiv` decides "equivalent": the answers are cleaned (``$...$``,
``\\boxed{}``, ``\\text{ cm}`` units, trailing periods, ``1,000``), compared as strings, then by
`math-verify <https://github.com/huggingface/Math-Verify>`_ (symbolic: fractions, intervals,
sets, tuples, matrices, ``\\sqrt``/``\\pi`` expressions, percentages), then numerically with a
relative tolerance of 1e-4. It never raises and never hangs: every call has a wall-clock budget
(``timeout``), enforced with ``SIGALRM`` in a main thread and by a killable helper process
elsewhere (see :func:`is_equiv`).

:func:`extract_gold` reads the gold answer of a row of each benchmark (gsm8k, MATH,
gaokao2023en, OCW) as stored on the Hub and in ``shared/data``.
"""

from __future__ import annotations

import atexit
import logging
import math
import numbers
import os
import re
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .steps import last_boxed

logger = logging.getLogger(__name__)


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeouts are off; ours (see :func:`is_equiv`) replace them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutWarning())

__all__ = [
    "DEFAULT_TIMEOUT",
    "KNOWN_DATASETS",
    "extract_gold",
    "extract_gold_answers",
    "is_equiv",
    "normalize_answer",
    "repair_latex_escapes",
]

DEFAULT_TIMEOUT = 5.0
"""Wall-clock budget of one :func:`is_equiv` call, in seconds (math-verify's own default is 5 s)."""

RELATIVE_TOLERANCE = 1e-4
"""Numbers within this relative tolerance are equivalent (OCW answers are rounded, e.g. ``4.5e33``)."""

MAX_SYMBOLIC_CHARS = 512
"""Longer answers are compared as strings and numbers only: no gold answer of the four sets is over 100."""

KNOWN_DATASETS = ("gsm8k", "math", "gaokao2023en", "ocw")


# ----------------------------------------------------------------------------- gold answers
def _field(row: dict, name: str, dataset: str) -> Any:
    if not isinstance(row, dict) or name not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise KeyError(f"{dataset} row has no field {name!r} (fields: {keys})")
    return row[name]


def extract_gold_answers(dataset: str, row: dict) -> list[str]:
    """All acceptable gold answers of ``row`` (one, except for some MATH rows of MARIO_EVAL).

    - ``gsm8k``: the number after ``#### `` at the end of ``answer``.
    - ``math``: ``answer`` as a string or a list of acceptable strings (MARIO_EVAL annotation);
      Hendrycks MATH rows without ``answer`` use the last ``\\boxed{}`` of ``solution``.
    - ``gaokao2023en``: ``answer``, LaTeX with its ``$`` delimiters removed (empty in 2 rows).
    - ``ocw``: the last ``\\boxed{}`` of ``solution``.
    """
    name = dataset.lower()
    if name == "gsm8k":
        text = _field(row, "answer", dataset)
        if not isinstance(text, str) or "####" not in text:
            raise ValueError(f"gsm8k field 'answer' has no '#### <number>' line: {str(text)[-80:]!r}")
        answers = [text.rsplit("####", 1)[1].strip()]
    elif name == "math":
        if "answer" in row or "solution" not in row:
            value = _field(row, "answer", dataset)
        else:
            value = last_boxed(str(row["solution"]))
            if value is None:
                raise ValueError("math field 'solution' has no \\boxed{...} answer")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        answers = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else None
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"math field 'answer' must be a string or a list of strings, got {value!r}")
    elif name == "gaokao2023en":
        value = _field(row, "answer", dataset)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"gaokao2023en field 'answer' must be a string, got {value!r}")
        answers = [_strip_math_delimiters(value)]
    elif name == "ocw":
        solution = _field(row, "solution", dataset)
        boxed = last_boxed(str(solution))
        if boxed is None:
            raise ValueError("ocw field 'solution' has no \\boxed{...} answer")
        answers = [boxed.strip()]
    else:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(KNOWN_DATASETS)}")
    answers = [repair_latex_escapes(a).strip() for a in answers]
    # Two rows of the published gaokao2023en file (lines 168, 193) have an empty answer (it leaked
    # into the question); they stay, as in Table 6's 385, and no prediction can match them.
    if not all(answers) and name != "gaokao2023en":
        raise ValueError(f"{dataset} row has an empty gold answer")
    return answers


def extract_gold(dataset: str, row: dict) -> str:
    """The gold answer of ``row`` as one string (the first acceptable one for MATH lists).

    Use :func:`extract_gold_answers` to keep every acceptable answer of a MATH row.

    >>> extract_gold("gsm8k", {"answer": "48 + 24 = 72\\n#### 72"})
    '72'
    """
    return extract_gold_answers(dataset, row)[0]


# ----------------------------------------------------------------------------- normalization
# JSON files written with unescaped backslashes turn "\tfrac", "\frac", "\boxed", "\right" into
# control characters (MATH test row 2913 has a TAB for "\t"); no answer contains them on purpose.
_CONTROL_ESCAPES = {"\t": "\\t", "\f": "\\f", "\b": "\\b", "\r": "\\r", "\v": "\\v"}
_DAMAGED_ESCAPE = re.compile(r"[\t\f\b\r\v](?=[A-Za-z])")
_UNIT_MACRO = r"\\(?:text|textbf|mbox|mathrm|rm|operatorname)\s*\{\s*[~\\ ]*[A-Za-z][A-Za-z .~\\/-]*\}"
_TRAILING_UNIT = re.compile(rf"\s*(?:{_UNIT_MACRO})(?:\s*\^\s*(?:\{{\s*\d\s*\}}|\d))?\s*$")
_TEXT_ONLY = re.compile(r"^\\(?:text|textbf|mbox|mathrm)\s*\{(.*)\}$", re.DOTALL)
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SCI = re.compile(r"(?<![\w.])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)(?![\w.])")
_SET_BUILDER = re.compile(r"^\\\{\s*([A-Za-z])\s*(?:\||\\mid)\s*(.*)\\\}$", re.DOTALL)
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_WORDS = re.compile(r"^[A-Za-z][A-Za-z ,.'()-]*$")


def repair_latex_escapes(text: str) -> str:
    """Undo JSON escape damage: a TAB before ``frac`` was ``\\t`` of ``\\tfrac`` (likewise ``\\f``, ``\\b``, ``\\r``)."""
    return _DAMAGED_ESCAPE.sub(lambda m: _CONTROL_ESCAPES[m.group(0)], text)


def _strip_math_delimiters(text: str) -> str:
    text = text.strip()
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)")):
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            text = text[len(left) : -len(right)].strip()
    # "$48$, $384$" (gaokao) is one answer written as two math spans: drop every unescaped "$".
    return re.sub(r"(?<!\\)\$", "", text).strip()


def normalize_answer(text: str) -> str:
    """Clean an answer for comparison; the result is still LaTeX.

    Takes the last ``\\boxed{}``, drops ``$...$``/``\\(...\\)`` delimiters, trailing periods,
    ``\\text{ cm}``-style units (when a value precedes them), ``^\\circ``, ``\\!``/``\\,`` spacing,
    ``\\left``/``\\right``, thousands separators (``1,000`` and ``1{,}000``), a leading ``x =``
    style assignment of a single variable, and turns ``4.5e33`` into ``4.5\\times10^{33}``.

    >>> normalize_answer("$\\\\boxed{1,000}$ cm.")
    '1000'
    """
    text = repair_latex_escapes(str(text))
    text = text.replace("\u2212", "-").replace("\n", " ").strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    text = _strip_math_delimiters(text)
    # Thin spaces go; a "\\\\" row break (matrices) stays.
    text = re.sub(r"\\\\|\\[,!;: ]|\\q?quad\b", lambda m: m.group(0) if m.group(0) == "\\\\" else "", text)
    text = text.replace("{,}", ",").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\\left\b|\\right\b", "", text)
    text = re.sub(r"\\displaystyle\b", "", text)
    text = text.replace("\\%", "%").replace("\\$", "")
    text = text.strip().rstrip(".").strip()
    # Units after a value: "5\text{ cm}^2", "18 \mbox{ dollars}"; "\text{Devon}" alone stays.
    while True:
        stripped = _TRAILING_UNIT.sub("", text).strip()
        if stripped == text or not stripped:
            break
        text = stripped.rstrip(".").strip()
    text = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\degree\b|°", "", text).strip()
    words_after_number = re.fullmatch(
        rf"([+-]?\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?|{_NUMBER})\s+(?:[A-Za-z]{{2,}}\.?\s*)+", text
    )
    if words_after_number:  # "18 dollars", "3 cm"
        text = words_after_number.group(1)
    assignment = re.fullmatch(r"[A-Za-z]\s*=\s*([^=]+)", text)
    if assignment and not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", assignment.group(1))):
        text = assignment.group(1)  # "x = 3" -> "3"; "y = 2x+1" stays an equation
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    # OCW golds are sometimes numpy code: "np.arcsin(10/13)" -> "\arcsin(10/13)".
    text = re.sub(r"\b(?:np|math)\.", "", text)
    text = re.sub(
        r"(?<![\\A-Za-z])(arcsin|arccos|arctan|sin|cos|tan|exp|log|ln|sqrt)(?=\s*\()", r"\\\1", text
    )
    text = re.sub(r"(\d)\.(?=\s*[/*)]|\s*$)", r"\1", text)  # OCW "-1./3"
    return text.strip()


def _is_text_answer(gold: str) -> bool:
    """A gold answer made of words (``\\text{even}``, ``Quadrant I``, ``\\text{(C)}``), not mathematics."""
    inner = _TEXT_ONLY.match(gold)
    if inner is not None:
        return not re.search(r"[\d\\^_]", inner.group(1))
    return bool(_WORDS.match(gold)) and bool(re.search(r"[A-Za-z]{3,}", gold))


def _text_key(text: str) -> str:
    inner = _TEXT_ONLY.match(text)
    if inner is not None:
        text = inner.group(1)
    return re.sub(r"[\s().]", "", text).lower()


# ----------------------------------------------------------------------------- numbers
_PLAIN_NUMBER = re.compile(
    rf"^({_NUMBER})(?:[eE]([+-]?\d+)|\s*(?:\\times|\\cdot|\*|x)\s*10\s*\^\s*\{{?\s*([+-]?\d+)\s*\}}?)?$"
)
_FRACTION = re.compile(rf"^([+-]?)\\frac\s*\{{\s*({_NUMBER})\s*\}}\s*\{{\s*({_NUMBER})\s*\}}$")
_SLASH = re.compile(rf"^({_NUMBER})\s*/\s*({_NUMBER})$")


def _plain_number(text: str) -> float | None:
    """The value of a plain number (``-3``, ``.5``, ``4.5e33``, ``4.5\\times10^{33}``, ``\\frac{3}{4}``, ``3/4``)."""
    text = text.replace(" ", "")
    try:
        match = _PLAIN_NUMBER.match(text)
        if match:
            exponent = match.group(2) or match.group(3)
            value = float(match.group(1))
            return value * 10.0 ** int(exponent) if exponent else value
        match = _FRACTION.match(text)
        if match:
            value = float(match.group(2)) / float(match.group(3))
            return -value if match.group(1) == "-" else value
        match = _SLASH.match(text)
        if match:
            return float(match.group(1)) / float(match.group(2))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def _close(a: complex | float, b: complex | float) -> bool:
    if not (math.isfinite(abs(a)) and math.isfinite(abs(b))):
        return False
    return abs(a - b) <= RELATIVE_TOLERANCE * max(abs(a), abs(b)) or abs(a - b) <= 1e-12


# ----------------------------------------------------------------------------- symbolic comparison
def _intractable(text: str) -> bool:
    """Answers that make sympy compute in C for minutes, where no signal can interrupt it.

    Towers (``2^{10^{10}}``), huge literal exponents and over-long answers are compared as
    strings and plain numbers only.
    """
    if len(text) > MAX_SYMBOLIC_CHARS:
        return True
    if re.search(r"(?:\^|\*\*)\s*\{?[^{}]*?(?:\^|\*\*)", text):  # a power inside an exponent
        return True
    if re.search(r"(?:\^|\*\*)\s*\{?\s*[+-]?\d{6,}", text):
        return True
    return bool(re.search(r"\d{5,}\s*!", text))


def _latex_for_math_verify(text: str) -> str:
    text = _SCI.sub(r"\1\\times10^{\2}", text)  # math-verify reads "4.5e33" as 4.5*e*33
    match = _SET_BUILDER.match(text)
    if match:  # "\{x|-2\leq x<1\}" -> "-2\leq x<1", which math-verify compares with intervals
        text = match.group(2)
    return "\\boxed{" + text + "}"


def _math_verify_parse(text: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    # Timeouts are ours (whole call, any thread); math-verify's own use SIGALRM in whole seconds.
    return parse(_latex_for_math_verify(text), extraction_config=config, parsing_timeout=None)


def _numeric_value(parsed: list) -> complex | None:
    import sympy

    for expr in parsed:
        if isinstance(expr, sympy.Expr) and not expr.free_symbols and expr.is_number:
            value = complex(expr.evalf())
            return value if value.imag != 0 else value.real
    return None


def _symbolic_equiv(prediction: str, gold: str) -> bool:
    from math_verify import verify

    parsed_gold = _math_verify_parse(gold)
    parsed_pred = _math_verify_parse(prediction)
    if not parsed_gold or not parsed_pred:
        return False
    if verify(parsed_gold, parsed_pred, timeout_seconds=None, allow_set_relation_comp=True):
        return True
    if "%" in prediction or "%" in gold:  # percentages: as math-verify decides
        return False
    value_gold, value_pred = _numeric_value(parsed_gold), _numeric_value(parsed_pred)
    if value_gold is not None and value_pred is not None:
        return _close(value_gold, value_pred)
    return _same_function(parsed_gold, parsed_pred)


def _same_function(parsed_gold: list, parsed_pred: list, points: int = 3) -> bool:
    """Two expressions in the same variables that agree at random points (OCW formulas).

    math-verify gives ``i`` different sympy assumptions depending on the spacing of the LaTeX
    (``e^{i t}`` vs ``e^{it}``), and then sees two equal expressions as different: symbols are
    matched by name here, and the expressions compared at ``points`` random real points.
    """
    import random

    import sympy

    exprs = [
        next((e for e in parsed if isinstance(e, sympy.Expr)), None) for parsed in (parsed_gold, parsed_pred)
    ]
    if any(e is None or not e.free_symbols for e in exprs):
        return False
    names = sorted({s.name for e in exprs for s in e.free_symbols})
    if len(names) > 8:
        return False
    plain = [e.xreplace({s: sympy.Symbol(s.name) for s in e.free_symbols}) for e in exprs]
    rng = random.Random(0)
    for _ in range(points):
        point = {sympy.Symbol(n): sympy.Float(rng.uniform(0.5, 1.5)) for n in names}
        values = [complex(e.xreplace(point).evalf()) for e in plain]
        if not _close(values[0], values[1]):
            return False
    return True


def _fast_equiv(prediction: str, gold: str) -> bool | None:
    """The decision when no symbolic work is needed (strings, words, plain numbers), else None."""
    if not prediction or not gold:
        return False
    if prediction == gold:
        return True
    if _is_text_answer(gold):
        return _text_key(prediction) == _text_key(gold)
    pred_number, gold_number = _plain_number(prediction), _plain_number(gold)
    if pred_number is not None and gold_number is not None:
        # Two plain numbers: relative tolerance decides. math-verify rounds to 6 decimals, which
        # would equate OCW's 1.2e-6 and 1.3e-6.
        return _close(pred_number, gold_number)
    if _intractable(prediction) or _intractable(gold):
        return False
    return None


def _symbolic_equiv_any(prediction: str, golds: Sequence[str]) -> bool:
    return any(_symbolic_equiv(prediction, gold) for gold in golds)


# ----------------------------------------------------------------------------- bounded time
class _GradingTimeout(BaseException):
    """Raised by our SIGALRM handler; a BaseException so that library ``except Exception`` lets it through."""


def _can_use_signals() -> bool:
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0  # someone else's timer is running: leave it
    )


def _call_with_alarm(fn: Callable[[], bool], seconds: float) -> bool:
    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:
            raise _GradingTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    # The timer re-fires every 50 ms in case some library code swallows BaseException once.
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        return fn()
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_POOL: Any = None
_POOL_PID: int | None = None
_POOL_LOCK = threading.Lock()
_POOL_WORKERS = 2
_HELPER_STARTUP_ALLOWANCE = 30.0


def _warm_up() -> None:
    import math_verify  # noqa: F401  (import sympy once per helper process, not per call)


def _helper_pool():
    """A per-process pool of helper processes that a timeout can kill (no SIGALRM off the main thread)."""
    global _POOL, _POOL_PID
    import multiprocessing

    import pebble

    with _POOL_LOCK:
        if _POOL is None or os.getpid() != _POOL_PID or not _POOL.active:
            # fork: the helper starts in milliseconds with sympy already imported, and it never
            # re-runs an unguarded __main__ as forkserver/spawn would. The child only runs sympy,
            # so locks other threads held at fork time (torch, tokenizers) are never touched.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            _POOL = pebble.ProcessPool(
                max_workers=_POOL_WORKERS, initializer=_warm_up, context=multiprocessing.get_context(method)
            )
            _POOL_PID = os.getpid()
            atexit.register(_stop_helper_pool, _POOL)
        return _POOL


def _stop_helper_pool(pool) -> None:
    pool.stop()
    pool.join(timeout=5)


def _call_in_helper_process(prediction: str, golds: list[str], seconds: float) -> bool:
    from concurrent.futures import TimeoutError as FutureTimeout

    future = _helper_pool().schedule(_symbolic_equiv_any, args=(prediction, golds), timeout=seconds)
    try:
        # The helper enforces ``seconds`` once the task runs; the allowance covers its start-up.
        return bool(future.result(timeout=seconds + _HELPER_STARTUP_ALLOWANCE))
    except FutureTimeout:
        future.cancel()
        return False


def _answer_text(value: Any) -> str | None:
    """An answer as text: strings as they are, numbers (a user's own dataset may store ``72``) as
    ``str``; anything else (None, bools, containers) is no answer."""
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return str(value)
    return None


def is_equiv(
    prediction: str | float | None,
    gold: str | float | Sequence[str | float],
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> bool:
    """Whether ``prediction`` is mathematically equivalent to ``gold`` (or to any answer of a list).

    Either side may also be a number (``is_equiv("5", 5)``: numeric golds of a user's own dataset).

    Order: cleaned strings equal (:func:`normalize_answer`); text answers (``\\text{even}``)
    compared as lower-cased words; two plain numbers compared with relative tolerance 1e-4;
    otherwise math-verify (``verify(gold, prediction)``), then the numeric values of both sides
    with relative tolerance 1e-4 (so ``\\frac{\\sqrt{3}}{2}`` equals ``0.866``), or for
    expressions in variables their values at 3 random points. Percentages follow
    math-verify (``50\\%`` equals both ``0.5`` and ``50``).

    Never raises (bad input is simply not equivalent) and returns within about ``timeout``
    seconds: in the main thread a ``SIGALRM`` timer interrupts sympy; in other threads (no
    signals there) the symbolic part runs in a per-process pool of helper processes that is
    killed on timeout (the first such call also pays the helper's start-up, about a second).
    Answers that would make sympy compute in C, out of a signal's reach (``2^{10^{10}}``), or
    longer than 512 characters are compared as strings and numbers only. Safe in
    worker processes (``ProcessPoolExecutor`` runs tasks in the worker's main thread).
    """
    try:
        prediction = _answer_text(prediction)
        golds = [gold] if _answer_text(gold) is not None else list(gold)
        golds = [text for text in map(_answer_text, golds) if text is not None]
        if prediction is None or not golds:
            return False
        prediction = normalize_answer(prediction)
        golds = [normalize_answer(g) for g in golds]
        undecided = []
        for g in golds:
            decision = _fast_equiv(prediction, g)
            if decision:
                return True
            if decision is None:
                undecided.append(g)
        if not undecided:
            return False
        _warm_up()  # the first import of sympy takes seconds: keep it out of the budget
        if _can_use_signals():
            return _call_with_alarm(lambda: _symbolic_equiv_any(prediction, undecided), timeout)
        return _call_in_helper_process(prediction, undecided, timeout)
    except _GradingTimeout:
        logger.debug("is_equiv timed out after %.1fs: %r vs %r", timeout, prediction, gold)
        return False
    except Exception:  # never raise: a grading failure is "not equivalent"
        logger.debug("is_equiv failed: %r vs %r", prediction, gold, exc_info=True)
        return False
