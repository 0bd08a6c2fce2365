"""The embedded default's toy task: multi-step arithmetic word problems with gold step-format solutions.

Each problem starts from a quantity and applies 2–4 operations (``+``, ``-``, ``*``, ``//``) with
operands up to 20, each phrased by one of several templates. Divisions are exact (the divisor divides
the running value): a flooring division maps many wrong values onto the gold one (``x // 13`` is 1 for
every x from 13 to 25), so wrong reasoning reached the right answer by chance and Algorithm 1 took it
for a correct solution (37% of chosen steps were off track on a 200-question annotation). The gold solution has one C-step per
operation (code that prints the running value, and the output that code really prints) and then an
A-step with ``Final Answer: $N$`` — the step format of the paper (Appendix A.5), so that the whole
pipeline (SFT -> MCTS -> value pre-training -> SVPO -> evaluation) runs on it unchanged.

Everything is deterministic by seed. The fixed splits (``train``, ``annotate``, ``test``) are
disjoint by construction: a problem belongs to the split that the hash of its question text picks.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerFast

from ..steps import DEFAULT_FORMAT, StepFormat

# (name, subject pronoun, object pronoun)
_PEOPLE = [
    ("Lily", "She", "her"), ("Tom", "He", "him"), ("Mia", "She", "her"), ("Ben", "He", "him"),
    ("Emma", "She", "her"), ("Sam", "He", "him"), ("Zoe", "She", "her"), ("Max", "He", "him"),
    ("Ava", "She", "her"), ("Leo", "He", "him"), ("Nora", "She", "her"), ("Jack", "He", "him"),
    ("Ella", "She", "her"), ("Owen", "He", "him"), ("Ruby", "She", "her"), ("Liam", "He", "him"),
]  # fmt: skip
# Plural nouns that are also valid Python identifiers: the gold code names its variable after them.
_OBJECTS = [
    "apples", "marbles", "stickers", "coins", "pencils", "cookies", "books", "stamps",
    "shells", "cards", "beads", "candies", "toys", "eggs", "flowers", "rocks",
]  # fmt: skip
_OPENINGS = [
    "{name} has {a} {obj}.",
    "{name} starts with {a} {obj}.",
    "There are {a} {obj} in {name}'s box.",
    "{name} collected {a} {obj} last week.",
]
# Several phrasings per operation: telling them apart is what the policy has to learn.
_OPERATION_TEMPLATES = {
    "+": [
        "{Pron} buys {b} more {obj}.",
        "{Pron} finds {b} more {obj}.",
        "A friend gives {pron_obj} {b} {obj}.",
    ],
    "-": [
        "{Pron} gives away {b} {obj}.",
        "{Pron} loses {b} {obj}.",
        "{Pron} sells {b} of the {obj}.",
    ],
    "*": [
        "The number of {obj} becomes {b} times as large.",
        "{Pron} trades each one for {b} new {obj}.",
    ],
    "//": [
        "{Pron} splits them into {b} equal piles and keeps one, giving the rest away.",
        "{Pron} keeps one out of every {b} {obj}.",
    ],
}
_STEP_ANALYSIS = {
    "+": "Add {b}.",
    "-": "Subtract {b}.",
    "*": "Multiply by {b}.",
    "//": "Divide by {b}.",
}
_QUESTIONS = [
    "How many {obj} does {name} have now?",
    "How many {obj} does {name} have at the end?",
    "How many {obj} are left in the end?",
]

TOY_SPLIT_SIZES = {"train": 4000, "annotate": 3000, "test": 1000}
"""Default number of problems per fixed split: SFT data, MCTS questions, held-out evaluation."""

_SPLIT_SEEDS = {"train": 0, "annotate": 1, "test": 2}
# A problem belongs to the split its question hash picks (out of 20 buckets), so the splits never
# share a question whatever their sizes: test 2/20, annotate 2/20, train 16/20.
_SPLIT_BUCKETS = {"test": range(0, 2), "annotate": range(2, 4), "train": range(4, 20)}


@dataclass(frozen=True)
class ToyTaskConfig:
    """The difficulty knobs of the toy task (not in the paper: the toy task stands in for GSM8K/MATH).

    min_ops / max_ops: number of operations per problem (default 2 and 4), i.e. C-steps per gold
    solution. max_operand: largest operand (default 20); the starting quantity is in [2, max_operand].
    max_value: products are kept at or below this (default 1000) so that numbers stay short.
    """

    min_ops: int = 2
    max_ops: int = 4
    max_operand: int = 20
    max_value: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(
                f"ToyTaskConfig: need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}"
            )
        if self.max_operand < 2:
            raise ValueError(f"ToyTaskConfig.max_operand must be >= 2, got {self.max_operand}")
        if self.max_value < self.max_operand:
            raise ValueError(
                f"ToyTaskConfig.max_value ({self.max_value}) must be >= max_operand ({self.max_operand})"
            )


@dataclass
class ToyProblem:
    """One generated problem: the question, its integer answer and the gold step texts.

    ``operations`` holds, per operation sentence, ``(template, op, operand)``; with ``start``, ``name`` and
    ``obj`` it is everything :func:`toy_solution_steps` needs to write a solution again (e.g. misread).
    """

    question: str
    answer: int
    steps: list[str]
    start: int = 0
    name: str = ""
    obj: str = ""
    operations: list[tuple[str, str, int]] = field(default_factory=list)

    def solution(self) -> str:
        return "".join(self.steps)


def toy_solution_steps(
    start: int,
    name: str,
    obj: str,
    operations: list[tuple[str, int]],
    step_format: StepFormat = DEFAULT_FORMAT,
) -> tuple[list[str], int]:
    """The step texts of the solution that applies ``operations`` (``(op, operand)``) to ``start``, and its
    final value: one C-step per operation, printing the running value, then the A-step."""
    steps: list[str] = []
    value = start
    for k, (op, operand) in enumerate(operations):
        analysis = _STEP_ANALYSIS[op].format(b=operand, obj=obj, name=name)
        if k == 0:
            analysis = f"Start with {value} {obj}. {analysis}"
            code = f"{obj} = {value} {op} {operand}\nprint({obj})"
        else:
            code = f"{obj} = {obj} {op} {operand}\nprint({obj})"
        value = _apply(op, value, operand)
        steps.append(step_format.render_code_step(analysis, code, str(value)))
    steps.append(step_format.render_answer_step(f"{name} ends with {value}.", str(value)))
    return steps, value


def _apply(op: str, value: int, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    return value // operand


def _feasible_operations(value: int, cfg: ToyTaskConfig) -> list[str]:
    ops = ["+"]
    if value >= 2:
        ops.append("-")  # the result stays >= 1
    if value * 2 <= cfg.max_value:
        ops.append("*")
    if _divisors(value, cfg):
        ops.append("//")  # exact: the result is a whole number >= 1
    return ops


def _divisors(value: int, cfg: ToyTaskConfig) -> list[int]:
    """Divisors of ``value`` usable as an operand: 2..max_operand, and at most value / 2 (no result of 1)."""
    return [d for d in range(2, min(cfg.max_operand, value // 2) + 1) if value % d == 0]


def _draw_operand(rng: random.Random, op: str, value: int, cfg: ToyTaskConfig) -> int:
    if op == "+":
        return rng.randint(1, cfg.max_operand)
    if op == "-":
        return rng.randint(1, min(cfg.max_operand, value - 1))
    if op == "*":
        return rng.randint(2, min(cfg.max_operand, cfg.max_value // value))
    return rng.choice(_divisors(value, cfg))


def generate_toy_problem(
    rng: random.Random, cfg: ToyTaskConfig = ToyTaskConfig(), step_format: StepFormat = DEFAULT_FORMAT
) -> ToyProblem:
    """Draw one problem from ``rng``: opening, 2–4 operations, question; gold C-steps then an A-step.

    The code of step k (run after steps 1..k-1, as the sandbox does) prints the running value,
    and the step's ``<output>`` block holds exactly that printed value.
    """
    name, pron, pron_obj = rng.choice(_PEOPLE)
    obj = rng.choice(_OBJECTS)
    start = value = rng.randint(2, cfg.max_operand)
    sentences = [rng.choice(_OPENINGS).format(name=name, a=value, obj=obj)]
    operations: list[tuple[str, str, int]] = []
    for _ in range(rng.randint(cfg.min_ops, cfg.max_ops)):
        op = rng.choice(_feasible_operations(value, cfg))
        operand = _draw_operand(rng, op, value, cfg)
        template = rng.choice(_OPERATION_TEMPLATES[op])
        sentences.append(template.format(Pron=pron, pron_obj=pron_obj, b=operand, obj=obj))
        operations.append((template, op, operand))
        value = _apply(op, value, operand)
    sentences.append(rng.choice(_QUESTIONS).format(obj=obj, name=name))
    steps, answer = toy_solution_steps(start, name, obj, [(op, b) for _, op, b in operations], step_format)
    return ToyProblem(" ".join(sentences), answer, steps, start, name, obj, operations)


def misread_solution(
    problem: ToyProblem,
    misreadings: dict[str, str],
    rate: float,
    rng: random.Random,
    step_format: StepFormat = DEFAULT_FORMAT,
) -> str:
    """The solution of a writer who misreads some phrasings: a sentence whose template contains a phrase of
    ``misreadings`` is computed with the op given there instead (same operand), with probability ``rate``
    each time; everything after follows from the wrong value, final answer included (a wrong solution)."""
    operations = [
        (next((wrong for phrase, wrong in misreadings.items() if phrase in template), op), b)
        if rng.random() < rate and any(phrase in template for phrase in misreadings)
        else (op, b)
        for template, op, b in problem.operations
    ]
    steps, _ = toy_solution_steps(problem.start, problem.name, problem.obj, operations, step_format)
    return "".join(steps)


def _iter_problems(
    num: int, seed: int, cfg: ToyTaskConfig, keep: Callable[[str], bool] | None
) -> Iterator[ToyProblem]:
    rng = random.Random(seed)
    seen: set[str] = set()
    count = 0
    attempts = 0
    while count < num:
        attempts += 1
        if attempts > 1000 * (num + 10):
            raise RuntimeError(
                f"could only generate {count} of {num} distinct toy problems with {cfg}; "
                "raise max_operand or max_ops, or ask for fewer"
            )
        problem = generate_toy_problem(rng, cfg)
        if problem.question in seen or (keep is not None and not keep(problem.question)):
            continue
        seen.add(problem.question)
        count += 1
        yield problem


def make_toy_problems(
    num: int,
    seed: int,
    *,
    config: ToyTaskConfig | None = None,
    id_prefix: str | None = None,
    keep: Callable[[str], bool] | None = None,
    misreadings: dict[str, str] | None = None,
    misreading_rate: float = 0.0,
    misreading_seed: int = 0,
) -> Dataset:
    """``num`` distinct toy problems, deterministic by ``seed``: columns ``id, question, answer, solution``.

    ``answer`` is the integer answer as a string; ``solution`` the gold step texts (without the
    prompt; ``DEFAULT_FORMAT.split_steps`` recovers the steps). ``keep`` filters questions (the
    fixed splits use it).

    With ``misreadings`` (phrase -> op, e.g. ``{"trades each one for": "+"}``), ``solution`` is written by
    someone who misreads those phrasings with probability ``misreading_rate`` per occurrence (see
    :func:`misread_solution`; drawn from ``misreading_seed`` and the question, so the problems themselves do
    not change): imperfect SFT data. ``answer`` stays the true one.
    """
    if num < 0:
        raise ValueError(f"make_toy_problems: num must be >= 0, got {num}")
    if not 0.0 <= misreading_rate <= 1.0:
        raise ValueError(f"misreading_rate must be in [0, 1], got {misreading_rate}")
    check_misreadings(misreadings or {})
    cfg = config or ToyTaskConfig()
    prefix = id_prefix if id_prefix is not None else f"toy-s{seed}"
    rows: dict[str, list[str]] = {"id": [], "question": [], "answer": [], "solution": []}
    for i, problem in enumerate(_iter_problems(num, seed, cfg, keep)):
        rows["id"].append(f"{prefix}-{i:05d}")
        rows["question"].append(problem.question)
        rows["answer"].append(str(problem.answer))
        if misreadings and misreading_rate > 0:
            digest = hashlib.sha256(f"{misreading_seed}/{problem.question}".encode()).digest()
            rng = random.Random(int.from_bytes(digest[:8], "big"))
            rows["solution"].append(misread_solution(problem, misreadings, misreading_rate, rng))
        else:
            rows["solution"].append(problem.solution())
    return Dataset.from_dict(rows)


def check_misreadings(misreadings: dict[str, str]) -> None:
    """Refuse a misreading whose phrase occurs in no toy template or whose op is not a toy op."""
    templates = [t for ts in _OPERATION_TEMPLATES.values() for t in ts]
    for phrase, op in misreadings.items():
        if op not in _STEP_ANALYSIS or not any(phrase in t for t in templates):
            raise ValueError(
                f"misreading {phrase!r} -> {op!r}: the phrase must occur in a toy template and the op be one "
                f"of {sorted(_STEP_ANALYSIS)}; the templates are {templates}"
            )


def toy_split_of(question: str) -> str:
    """The fixed split (``train``, ``annotate`` or ``test``) a question belongs to, by its SHA-1 hash."""
    bucket = int.from_bytes(hashlib.sha1(question.encode("utf-8")).digest()[:4], "big") % 20
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def load_toy_problems(
    split: str, num: int | None = None, *, config: ToyTaskConfig | None = None, **misreading: Any
) -> Dataset:
    """The fixed toy split ``train`` (SFT, 4000), ``annotate`` (MCTS questions, 3000) or ``test`` (1000).

    Splits never share a question (each keeps only the questions hashed to it). ``num`` overrides
    the default size; a smaller ``num`` gives a prefix of the default split. ``misreadings``,
    ``misreading_rate`` and ``misreading_seed`` write imperfect solutions (see :func:`make_toy_problems`).
    """
    if split not in TOY_SPLIT_SIZES:
        raise ValueError(f"unknown toy split {split!r}; expected one of {sorted(TOY_SPLIT_SIZES)}")
    size = TOY_SPLIT_SIZES[split] if num is None else num
    return make_toy_problems(
        size,
        _SPLIT_SEEDS[split],
        config=config,
        id_prefix=f"toy-{split}",
        keep=lambda question: toy_split_of(question) == split,
        **misreading,
    )


def toy_tokenizer_corpus(
    num: int = 2000, *, config: ToyTaskConfig | None = None, step_format: StepFormat = DEFAULT_FORMAT
) -> Iterator[str]:
    """Full solution texts (prompt + gold steps) of the first ``num`` train problems, for the tokenizer."""
    for row in load_toy_problems("train", num, config=config):
        yield step_format.prompt(row["question"]) + row["solution"]


def build_toy_tokenizer(vocab_size: int = 800, num_texts: int = 2000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained locally on toy solutions, format tags as single tokens."""
    from .tokenizer import train_tokenizer

    return train_tokenizer(toy_tokenizer_corpus(num_texts), vocab_size=vocab_size)
