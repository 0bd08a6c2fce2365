"""Tests of answer grading: gold extraction per benchmark and :func:`svpo_trl.grading.is_equiv`."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import multiprocessing
import os
import signal
import threading
import time

import pytest

from svpo_trl.grading import (
    _call_with_alarm,
    _GradingTimeout,
    extract_gold,
    extract_gold_answers,
    is_equiv,
    normalize_answer,
)

from conftest import SHARED_DATA

# (prediction, gold, equivalent?, style). Expectations are worked out by hand, not read off the code.
EQUIV_TABLE = [
    # gsm8k: integers, commas, currency, units
    ("18", "18", True, "gsm8k"),
    ("70,000", "70000", True, "gsm8k"),
    ("70000.0", "70000", True, "gsm8k"),
    ("1,000,000", "1000000", True, "gsm8k"),
    ("\\$18", "18", True, "gsm8k"),
    ("18 dollars", "18", True, "gsm8k"),
    ("$1,000$ dollars.", "1000", True, "gsm8k"),
    ("17", "18", False, "gsm8k"),
    ("-18", "18", False, "gsm8k"),
    ("\\boxed{42}", "42", True, "gsm8k"),
    ("42.", "42", True, "gsm8k"),
    ("$42$", "42", True, "gsm8k"),
    ("5\\text{ cm}", "5", True, "gsm8k"),
    ("12\\text{ cm}^2", "12", True, "gsm8k"),
    ("6\\text{ cm}", "5", False, "gsm8k"),
    ("+5", "5", True, "signs"),
    ("\u22125", "-5", True, "signs"),
    ("-5", "5", False, "signs"),
    # percentages: as math-verify decides
    ("50\\%", "0.5", True, "percent"),
    ("50\\%", "50", True, "percent"),
    ("50\\%", "5", False, "percent"),
    # MATH: fractions vs decimals
    ("0.5", "\\frac{1}{2}", True, "math"),
    ("\\frac12", "\\frac{1}{2}", True, "math"),
    ("\\dfrac{3}{4}", "0.75", True, "math"),
    ("\\frac{2}{4}", "\\frac12", True, "math"),
    ("0.33333", "\\frac{1}{3}", True, "math"),
    ("0.33", "\\frac{1}{3}", False, "math"),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True, "math"),
    ("\\frac{1}{2}", "-\\frac{1}{2}", False, "math"),
    # sqrt / pi
    ("2\\sqrt{2}", "\\sqrt{8}", True, "math"),
    ("\\sqrt{2}", "\\sqrt{3}", False, "math"),
    ("\\frac{\\sqrt3}2", "\\frac{\\sqrt{3}}{2}", True, "math"),
    ("0.866", "\\frac{\\sqrt{3}}{2}", True, "math"),
    ("0.87", "\\frac{\\sqrt{3}}{2}", False, "math"),
    ("6.2832", "2\\pi", True, "math"),
    ("3.14", "\\pi", False, "math"),
    ("\\frac{1}{3}\\pi", "\\frac{\\pi}{3}", True, "math"),
    ("14\\pi", "2250\\pi", False, "math"),
    # intervals
    ("[2, 3)", "[2,3)", True, "interval"),
    ("(2,3]", "[2,3)", False, "interval"),
    ("[2,\\infty)", "[2,+\\infty)", True, "interval"),
    ("(1,\\infty)", "[1,\\infty)", False, "interval"),
    ("[-2,1)", "\\{x|-2\\leq x < 1\\}", True, "interval"),
    ("(-2,1)", "\\{x|-2\\leq x < 1\\}", False, "interval"),
    ("x<-3", "(-\\infty,-3)", True, "interval"),
    # tuples
    ("(3, -1)", "(3,-1)", True, "tuple"),
    ("(-1,3)", "(3,-1)", False, "tuple"),
    ("\\left(\\frac43, -\\frac{1}{3}\\right)", "\\left( \\frac{4}{3}, -\\frac{1}{3} \\right)", True, "tuple"),
    ("(60, -88, 25, 4)", "(60,-88,25,4)", True, "tuple"),
    ("(60, -88, 25, 5)", "(60,-88,25,4)", False, "tuple"),
    # sets and lists of solutions
    ("\\{3,2,1\\}", "\\{1,2,3\\}", True, "set"),
    ("\\{1,2\\}", "\\{1,2,3\\}", False, "set"),
    ("93, 27", "27,93", True, "set"),
    (
        "\\frac{1}{2}, \\frac{1}{5}, \\frac{1}{4}, \\frac{2}{5}",
        "\\frac{1}{5}, \\frac{1}{4}, \\frac{2}{5}, \\frac{1}{2}",
        True,
        "set",
    ),
    # matrices
    (
        "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
        "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
        True,
        "matrix",
    ),
    ("\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", False, "matrix"),
    (
        "\\begin{pmatrix}0.5\\\\ \\frac{1}{4}\\end{pmatrix}",
        "\\begin{pmatrix}\\frac12\\\\0.25\\end{pmatrix}",
        True,
        "matrix",
    ),
    ("\\begin{pmatrix}2\\\\1\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", False, "matrix"),
    # expressions and equations
    ("(x+1)^2", "x^2+2x+1", True, "expression"),
    ("x^2-1", "x^2+1", False, "expression"),
    ("20-2x", "-2x + 20", True, "expression"),
    ("3(3c+2)", "9c+6", True, "expression"),
    ("y=1+2x", "y=2x+1", True, "expression"),
    ("y=2x-1", "y = 2x+1", False, "expression"),
    ("x=3", "3", True, "expression"),
    # complex numbers
    ("-i+1", "1-i", True, "complex"),
    ("1-2i", "1+2i", False, "complex"),
    ("1+i\\sqrt{3}", "1+\\sqrt{3} i", True, "complex"),
    # degrees
    ("90^\\circ", "90", True, "degrees"),
    ("90", "90^\\circ", True, "degrees"),
    # text answers
    ("Devon", "\\text{Devon}", True, "text"),
    ("Evan", "\\text{Devon}", False, "text"),
    ("veDon", "\\text{Devon}", False, "text"),
    ("(C)", "\\text{(C)}", True, "text"),
    ("\\text{(B)}", "\\text{(C)}", False, "text"),
    ("quadrant I", "$Quadrant I$", True, "text"),
    ("Quadrant II", "$Quadrant I$", False, "text"),
    # gaokao2023en LaTeX golds
    ("\\frac{x^2}{2}-\\frac{y^2}{2}=1", "$\\frac{x^{2}}{2} - \\frac{y^{2}}{2} = 1$", True, "gaokao"),
    ("48, 384", "$48$, $384$", True, "gaokao"),
    ("-\\frac{\\sqrt{5}}{5}", "$-\\frac{\\sqrt{5}}{5}$", True, "gaokao"),
    ("\\frac{\\sqrt{5}}{5}", "$-\\frac{\\sqrt{5}}{5}$", False, "gaokao"),
    ("\\{0, 2, 4, 6, 8\\}", "$\\{0,2,4,6,8\\}$", True, "gaokao"),
    ("\\frac{3\\pi}{10}", "$\\frac{3\\pi}{10}$", True, "gaokao"),
    # OCW: scientific notation, rounding, numpy-style golds
    ("4.5\\times 10^{33}", "4.5e33", True, "ocw"),
    ("4.50 \\times 10^{33}", "4.5e33", True, "ocw"),
    ("4.6e33", "4.5e33", False, "ocw"),
    ("1.2e-6", "1.3e-6", False, "ocw"),
    ("2.7778\\times10^{-6}", "2.7778e-6", True, "ocw"),
    ("2.78e-6", "2.7778e-6", False, "ocw"),
    ("-0.333333", "-1./3", True, "ocw"),
    ("0.8776", "np.arcsin(10/13)", True, "ocw"),
    ("\\arcsin(10/13)", "np.arcsin(10/13)", True, "ocw"),
    ("1e-5", "10^{-5}", True, "ocw"),
    ("1.6 \\mathrm{~cm}", "1.6", True, "ocw"),
    ("\\frac{4A}{3+3i}e^{it}", "\\frac{4 A}{3+3 i} e^{i t}", True, "ocw"),  # spacing changes sympy's i
    ("\\frac{4A}{3+3i}e^{-it}", "\\frac{4 A}{3+3 i} e^{i t}", False, "ocw"),
    ("y^2+1", "x^2+1", False, "expression"),
    # MARIO_EVAL: several acceptable golds
    ("-3", ["3", "-3"], True, "list"),
    ("2", ["3", "-3"], False, "list"),
    ("(0,0)", ["(10,0)", "(0,0)"], True, "list"),
    ("32760", "32,\\!760", True, "math"),
    ("1{,}000", "1000", True, "math"),
]


def test_table_is_large_and_balanced():
    styles = {style for *_, style in EQUIV_TABLE}
    assert len(EQUIV_TABLE) >= 60
    assert sum(expected for _, _, expected, _ in EQUIV_TABLE) >= 30
    assert sum(not expected for _, _, expected, _ in EQUIV_TABLE) >= 30
    assert {
        "gsm8k",
        "math",
        "gaokao",
        "ocw",
        "interval",
        "tuple",
        "set",
        "matrix",
        "percent",
        "signs",
    } <= styles


@pytest.mark.parametrize(("prediction", "gold", "expected", "style"), EQUIV_TABLE)
def test_is_equiv_table(prediction, gold, expected, style):
    assert is_equiv(prediction, gold) is expected


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        (None, "1"),
        ("", "1"),
        ("1", ""),
        ("1", []),
        (True, "1"),
        ("1", True),
        ("\\frac{1}{0}", "1"),
        ("}{", "\\frac{"),
    ],
)
def test_is_equiv_bad_input_is_false_not_an_error(prediction, gold):
    assert is_equiv(prediction, gold) is False


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        (5, 5, True),
        ("5", 5, True),
        (5, "5", True),
        ("72", [71, 72.0], True),
        (0.5, "\\frac{1}{2}", True),
        ("6", 5, False),
    ],
)
def test_is_equiv_accepts_numeric_answers(prediction, gold, expected):
    """Numeric golds from a user's own dataset (JSON numbers) grade like their text."""
    assert is_equiv(prediction, gold) is expected


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("$\\boxed{1,000}$.", "1000"),
        ("\\(\\frac{1}{2}\\)", "\\frac{1}{2}"),
        ("5\\text{ cm}^2", "5"),
        ("\\text{Devon}", "\\text{Devon}"),  # a text answer is not a unit
        ("18 dollars", "18"),
        ("32,\\!760", "32760"),
        ("x = 3", "3"),
        ("y = 2x+1", "y = 2x+1"),
        ("90^\\circ", "90"),
        ("\\left(\tfrac32, -\\tfrac52\\right)", "(\\frac32, -\\frac52)"),  # TAB: JSON damage of "\t"
        ("np.arcsin(10/13)", "\\arcsin(10/13)"),
        ("-1./3", "-1/3"),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ],
)
def test_normalize_answer(raw, clean):
    assert normalize_answer(raw) == clean


# ----------------------------------------------------------------------------- bounded time
def test_pathological_inputs_return_within_the_budget():
    # sympy spends about 6 s (unloaded machine) comparing these; the budget cuts it at 1 s.
    start = time.monotonic()
    assert is_equiv("(x+1)^{1000}", "x^{1000}+1", timeout=1.0) is False
    assert time.monotonic() - start < 3.0
    # A power tower makes sympy compute in C, where no signal reaches: it must never get there.
    start = time.monotonic()
    assert is_equiv("2^{10^{10}}", "1") is False
    assert is_equiv("9^{9^{9}}", "9^{9^{9}}") is True  # identical strings need no algebra
    assert is_equiv("(" * 5000 + "1" + ")" * 5000, "1") is False
    assert time.monotonic() - start < 1.0


def test_alarm_deadline_survives_code_that_swallows_exceptions():
    def stubborn():
        while True:
            with contextlib.suppress(Exception):  # library code does this; _GradingTimeout is a BaseException
                time.sleep(0.01)

    start = time.monotonic()
    with pytest.raises(_GradingTimeout):
        _call_with_alarm(stubborn, 0.2)
    assert time.monotonic() - start < 1.0


def test_alarm_restores_the_previous_handler_and_timer():
    def handler(signum, frame):
        raise AssertionError("our alarm must not reach the previous handler")

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        assert is_equiv("(x+1)^2", "x^2+2x+1") is True
        assert signal.getsignal(signal.SIGALRM) is handler
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def _grade_rows(rows):
    return [is_equiv(prediction, gold) for prediction, gold, _, _ in rows]


# Symbolic cases (no string / plain-number shortcut), so that the bounded path really runs.
_SYMBOLIC = [row for row in EQUIV_TABLE if row[3] in {"interval", "set", "matrix", "expression", "tuple"}][
    ::4
]


def test_is_equiv_from_threads():
    # No SIGALRM off the main thread: the helper process pool takes over (start-up ~1-3 s once).
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda row: is_equiv(row[0], row[1]), _SYMBOLIC))
        assert results == [expected for _, _, expected, _ in _SYMBOLIC]
        start = time.monotonic()
        slow = pool.submit(is_equiv, "(x+1)^{1000}", "x^{1000}+1", timeout=1.0)
        assert slow.result() is False
        assert time.monotonic() - start < 5.0
    assert threading.current_thread() is threading.main_thread()


def test_is_equiv_in_worker_processes():
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        results = pool.submit(_grade_rows, _SYMBOLIC).result(timeout=120)
        timed = pool.submit(functools.partial(is_equiv, timeout=1.0), "(x+1)^{1000}", "x^{1000}+1")
        assert timed.result(timeout=60) is False
    assert results == [expected for _, _, expected, _ in _SYMBOLIC]


# ----------------------------------------------------------------------------- gold answers
def _first_row(relative: str, index: int = 0) -> dict:
    path = os.path.join(SHARED_DATA, relative)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)[index]
    with open(path, encoding="utf-8") as handle:
        return json.loads(handle.readlines()[index])


def test_extract_gold_on_real_rows():
    assert extract_gold("gsm8k", _first_row("gsm8k/test.jsonl")) == "18"
    assert extract_gold("gsm8k", _first_row("gsm8k/train.jsonl")) == "72"
    assert extract_gold("math", _first_row("math/test_annotated.json")) == "2"
    # MARIO_EVAL row with two acceptable answers, the first damaged by a JSON TAB for "\t".
    row = _first_row("math/test_annotated.json", 2912)
    assert extract_gold_answers("math", row) == [
        "\\left(\\tfrac32, -\\tfrac52\\right)",
        "\\left(-\\tfrac52, -\\tfrac52\\right)",
    ]
    assert extract_gold("math", row) == "\\left(\\tfrac32, -\\tfrac52\\right)"
    assert extract_gold("gaokao2023en", _first_row("gaokao2023en/test.jsonl")) == "\\{x|-2\\leq x < 1\\}"
    assert extract_gold("gaokao2023en", _first_row("gaokao2023en/test.jsonl", 8)) == "48, 384"
    assert extract_gold("ocw", _first_row("ocw/test.jsonl")) == "1.6"
    assert extract_gold("ocw", _first_row("ocw/test.jsonl", 1)) == "4.5e33"


def test_extract_gold_other_shapes():
    assert extract_gold("math", {"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$."}) == "\\frac{1}{2}"
    assert extract_gold_answers("math", {"answer": ["3", "-3"]}) == ["3", "-3"]
    assert extract_gold("GSM8K", {"answer": "1000 - 1 = 999\n#### 999"}) == "999"


def test_extract_gold_errors_name_the_field():
    with pytest.raises(KeyError, match="'answer'"):
        extract_gold("gsm8k", {"question": "q"})
    with pytest.raises(ValueError, match="####"):
        extract_gold("gsm8k", {"answer": "no marker"})
    with pytest.raises(ValueError, match="boxed"):
        extract_gold("ocw", {"problem": "p", "solution": "no box"})
    with pytest.raises(ValueError, match="list of strings"):
        extract_gold("math", {"answer": {"a": 1}})
    with pytest.raises(ValueError, match="unknown dataset 'mmlu'"):
        extract_gold("mmlu", {"answer": "1"})


def test_gold_answers_of_real_sets_are_equivalent_to_themselves_after_reformatting():
    # Each gold, wrapped as a model would write it, must still match: the answer-step format.
    for relative, dataset, index in [
        ("gsm8k/test.jsonl", "gsm8k", 2),
        ("gaokao2023en/test.jsonl", "gaokao2023en", 5),
        ("ocw/test.jsonl", "ocw", 10),
        ("math/test_annotated.json", "math", 0),
    ]:
        gold = extract_gold(dataset, _first_row(relative, index))
        assert is_equiv(f"\\boxed{{{gold}}}.", gold), (dataset, gold)
