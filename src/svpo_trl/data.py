"""Problem loaders: a benchmark name or a local file -> ``datasets.Dataset`` of ``id, question, answer``.

The paper's benchmarks (Table 6) are known by name and loaded from the Hub / their published
files: ``gsm8k`` (train 7473, test 1319), ``math`` (Hendrycks MATH train; MARIO_EVAL's
annotated test, 5000), ``gaokao2023en`` (test 385) and ``ocw`` (test 272). Local copies in the
formats of ``shared/data`` (JSONL or a JSON array) load offline through the same row conversion.

Every dataset has the columns

- ``id``: stable and unique, ``{name}/{split}/{row}`` (e.g. ``gsm8k/test/17``);
- ``question``: the problem text;
- ``answer``: the gold answer as one string (the first acceptable one for MATH);
- ``answers``: every acceptable gold answer (``list[str]``; several only for some MARIO_EVAL
  rows) — pass it to :func:`svpo_trl.grading.is_equiv`, which accepts a list;

plus per-benchmark extras: ``solution`` (gsm8k, MATH train, OCW), ``type`` (MATH, OCW),
``level`` (MATH train), ``source`` (gaokao2023en).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .errors import PathNotFoundError, UsageError
from .grading import extract_gold_answers
from .steps import last_boxed

logger = logging.getLogger(__name__)

__all__ = ["HUB_SOURCES", "ProblemFormatError", "detect_schema", "load_problems", "rows_to_problems"]

_REPO_RAW = "https://raw.githubusercontent.com"
HUB_SOURCES: dict[str, dict[str, dict[str, Any]]] = {
    "gsm8k": {
        "train": {"path": "openai/gsm8k", "name": "main", "split": "train", "schema": "gsm8k"},
        "test": {"path": "openai/gsm8k", "name": "main", "split": "test", "schema": "gsm8k"},
    },
    "math": {
        # Hendrycks MATH, one config per subject; gold = last \boxed{} of the solution.
        "train": {
            "path": "EleutherAI/hendrycks_math",
            "configs": (
                "algebra",
                "counting_and_probability",
                "geometry",
                "intermediate_algebra",
                "number_theory",
                "prealgebra",
                "precalculus",
            ),
            "split": "train",
            "schema": "math_solution",
        },
        # The paper's MATH test set: MARIO_EVAL's 5000 problems with hand-annotated answers.
        "test": {
            "url": f"{_REPO_RAW}/MARIO-Math-Reasoning/MARIO_EVAL/main/data/math_testset_annotation.json",
            "schema": "math",
        },
    },
    "gaokao2023en": {
        "test": {
            "url": f"{_REPO_RAW}/QwenLM/Qwen2.5-Math/main/evaluation/data/gaokao2023en/test.jsonl",
            "schema": "gaokao2023en",
        },
    },
    "ocw": {
        "test": {
            "url": f"{_REPO_RAW}/QwenLM/Qwen2.5-Math/main/evaluation/data/minerva_math/test.jsonl",
            "schema": "ocw",
        },
    },
}
"""Where each known benchmark split comes from: a Hub dataset (``path``, ``name``/``configs``) or a
published file (``url``, read by ``datasets``' download manager), and the row schema it has."""

_DEFAULT_SPLIT = "test"
_SPLIT_FILES = ("{split}.jsonl", "{split}.json", "{split}_annotated.json", "{split}_annotated.jsonl")


class ProblemFormatError(UsageError):
    """A problem file or row that cannot be read; the message names the file, the row and the field."""


# ----------------------------------------------------------------------------- row schemas
def _question(row: dict, field: str) -> str:
    value = row[field]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {field!r} must be a non-empty string, got {value!r}")
    return value


def _convert_gsm8k(row: dict) -> dict:
    answers = extract_gold_answers("gsm8k", row)
    return {
        "question": _question(row, "question"),
        "answer": answers[0],
        "answers": answers,
        "solution": row["answer"].rsplit("####", 1)[0].strip(),
    }


def _convert_math(row: dict) -> dict:
    answers = extract_gold_answers("math", row)
    return {
        "question": _question(row, "question"),
        "answer": answers[0],
        "answers": answers,
        "type": str(row.get("human_type", row.get("type", ""))),
    }


def _convert_math_solution(row: dict) -> dict:
    if not isinstance(row["solution"], str):
        raise ValueError(f"field 'solution' must be a string, got {row['solution']!r}")
    gold = last_boxed(row["solution"])
    if gold is None or not gold.strip():
        raise ValueError("field 'solution' has no \\boxed{...} answer")
    return {
        "question": _question(row, "problem"),
        "answer": gold.strip(),
        "answers": [gold.strip()],
        "solution": row["solution"],
        "level": str(row.get("level", "")),
        "type": str(row.get("type", "")),
    }


def _convert_gaokao(row: dict) -> dict:
    answers = extract_gold_answers("gaokao2023en", row)
    return {
        "question": _question(row, "question"),
        "answer": answers[0],
        "answers": answers,
        "source": str(row.get("source", "")),
    }


def _convert_ocw(row: dict) -> dict:
    answers = extract_gold_answers("ocw", row)
    return {
        "question": _question(row, "problem"),
        "answer": answers[0],
        "answers": answers,
        "solution": row["solution"],
        "type": str(row.get("type", "")),
    }


def _convert_generic(row: dict) -> dict:
    value = row["answer"]
    answers = [value] if isinstance(value, str) else value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        answers = [str(value)]
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        raise ValueError(f"field 'answer' must be a non-empty string or list of strings, got {value!r}")
    field = "question" if "question" in row else "problem"
    return {
        "question": _question(row, field),
        "answer": answers[0].strip(),
        "answers": [a.strip() for a in answers],
    }


# name -> (required fields, conversion). The same conversion serves Hub rows and local rows.
_SCHEMAS: dict[str, tuple[tuple[str, ...], Callable[[dict], dict]]] = {
    "gsm8k": (("question", "answer"), _convert_gsm8k),
    "math": (("question", "answer"), _convert_math),
    "math_solution": (("problem", "solution"), _convert_math_solution),
    "gaokao2023en": (("question", "answer"), _convert_gaokao),
    "ocw": (("problem", "solution"), _convert_ocw),
    "generic": (("answer",), _convert_generic),
}


def detect_schema(row: dict) -> str:
    """The schema of a row, from its fields (see the table in ``shared/data/README.md``).

    ``question`` + ``answer`` with ``#### N``: gsm8k; with ``index``/``human_type``: MARIO_EVAL
    MATH; with ``source``/``lang``: gaokao2023en; ``problem`` + ``solution`` + ``idx``: OCW;
    ``problem`` + ``solution``: Hendrycks MATH; otherwise ``question`` (or ``problem``) +
    ``answer``: generic.
    """
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    keys = set(row)
    if {"question", "answer"} <= keys:
        if isinstance(row["answer"], str) and "####" in row["answer"]:
            return "gsm8k"
        if keys & {"index", "human_type"}:
            return "math"
        if keys & {"source", "lang"}:
            return "gaokao2023en"
        return "generic"
    if {"problem", "solution"} <= keys and "answer" not in keys:
        return "ocw" if "idx" in keys else "math_solution"
    if "answer" in keys and "problem" in keys:
        return "generic"
    missing = [f for f in ("question", "answer") if f not in keys]
    raise ValueError(
        f"missing field {missing[0]!r}: expected 'question' and 'answer' (or 'problem' and 'solution'), "
        f"got fields {sorted(keys)}"
    )


def rows_to_problems(
    rows: Iterable[tuple[str, dict]], *, prefix: str, source: str, schema: str | None = None
) -> list[dict]:
    """Convert raw rows to problem records with ``id = {prefix}/{i}``.

    ``rows`` yields ``(where, row)`` with ``where`` naming the row in errors (``line 3``,
    ``row 17``). The schema is detected on the first row unless given, and every row must fit it.
    """
    problems = []
    for i, (where, row) in enumerate(rows):
        try:
            if schema is None:
                schema = detect_schema(row)
            required, convert = _SCHEMAS[schema]
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            for name in required:
                if name not in row:
                    raise ValueError(f"missing field {name!r} ({schema} rows have {', '.join(required)})")
            record = convert(row)
        except (KeyError, ValueError, TypeError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise ProblemFormatError(f"{source}, {where}: {message}") from error
        problems.append({"id": f"{prefix}/{i}", **record})
    if not problems:
        raise ProblemFormatError(f"{source}: no problems (empty file)")
    empty = [p["id"] for p in problems if not p["answer"]]
    if empty:
        logger.warning(
            "%s: %d rows have an empty gold answer, no prediction can match: %s", source, len(empty), empty
        )
    return problems


# ----------------------------------------------------------------------------- files
def _read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """JSONL (one object a line, blank lines skipped) or one JSON array; rows named for errors."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ProblemFormatError(
                f"{path}: malformed JSON array (line {error.lineno}: {error.msg})"
            ) from error
        for i, row in enumerate(data):
            yield f"row {i}", row
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ProblemFormatError(f"{path}, line {lineno}: malformed JSON ({error.msg})") from error
        yield f"line {lineno}", row


def _resolve_file(path: str, split: str | None) -> tuple[str, str]:
    """The file to read and the split name used in ids."""
    if os.path.isfile(path):
        stem = os.path.basename(path).split(".")[0]
        return path, split or stem.removesuffix("_annotated")
    split = split or _DEFAULT_SPLIT
    candidates = [os.path.join(path, pattern.format(split=split)) for pattern in _SPLIT_FILES]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate, split
    available = sorted(f for f in os.listdir(path) if f.endswith((".json", ".jsonl")))
    raise PathNotFoundError(
        f"{path}: no file for split {split!r} (looked for {', '.join(os.path.basename(c) for c in candidates)}; "
        f"found {available})"
    )


def _dataset_name(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.basename(os.path.dirname(path) if os.path.isfile(path) else path)


def _load_local(path: str, split: str | None):
    from datasets import Dataset

    file, split = _resolve_file(path, split)
    name = _dataset_name(path)
    problems = rows_to_problems(_read_rows(file), prefix=f"{name}/{split}", source=file)
    return Dataset.from_list(problems)


# ----------------------------------------------------------------------------- Hub
def _load_hub(name: str, split: str):
    import datasets

    sources = HUB_SOURCES[name]
    if split not in sources:
        raise UsageError(f"{name} has no split {split!r} on the Hub; available: {sorted(sources)}")
    spec = sources[split]
    source = spec.get("url") or spec["path"]
    if "url" in spec:
        # A published file, fetched and cached by datasets; our reader keeps MARIO_EVAL's
        # mixed string / list answers, which a typed Arrow reader would reject.
        local = datasets.DownloadManager().download(spec["url"])
        rows: Iterable[tuple[str, Any]] = _read_rows(local)
    else:
        configs = spec.get("configs") or (spec.get("name"),)
        parts = [datasets.load_dataset(spec["path"], config, split=spec["split"]) for config in configs]
        rows = ((f"row {i}", row) for i, row in enumerate(r for part in parts for r in part))
    problems = rows_to_problems(rows, prefix=f"{name}/{split}", source=source, schema=spec["schema"])
    return datasets.Dataset.from_list(problems)


# ----------------------------------------------------------------------------- entry point
def load_saved_dataset(path: str | os.PathLike):
    """``datasets.load_from_disk``, also for a dataset saved with no rows.

    ``save_to_disk`` of an empty dataset writes no Arrow file, which ``load_from_disk`` cannot read
    back (an annotation may have no pairs at all); such a dataset comes back empty, with its features.
    """
    from datasets import Dataset, Features, load_from_disk

    path = os.fspath(path)
    state = os.path.join(path, "state.json")
    if os.path.exists(state):
        with open(state) as handle:
            empty = json.load(handle).get("_data_files") == []
        if empty:
            with open(os.path.join(path, "dataset_info.json")) as handle:
                features = Features.from_dict(json.load(handle)["features"])
            return Dataset.from_dict({name: [] for name in features}, features=features)
    return load_from_disk(path)


def load_problems(name_or_path: str, split: str | None = None):
    """Problems of a benchmark (Hub name), a local file or directory, or the toy task.

    Args:
        name_or_path: ``gsm8k``, ``math``, ``gaokao2023en``, ``ocw`` (loaded from the Hub, see
            :data:`HUB_SOURCES`); a directory holding ``{split}.jsonl`` / ``{split}.json`` /
            ``{split}_annotated.json`` (e.g. ``shared/data/math``); a ``.jsonl`` or JSON-array file
            in any schema of ``shared/data``; or ``toy`` / ``toy:{split}`` for the toy arithmetic task.
            An existing path wins over a name.
        split: ``train`` or ``test`` (default ``test``); picks the file in a directory; ignored
            for a file except in ids.

    Returns:
        A ``datasets.Dataset`` with columns ``id, question, answer, answers`` and per-benchmark extras.

    Raises:
        ProblemFormatError: a malformed file or row, naming the file, the row and the field.
        FileNotFoundError / ValueError: an unknown name, a missing split.
    """
    if name_or_path == "toy" or name_or_path.startswith("toy:"):
        try:
            from svpo_trl.toy.task import load_toy_problems
        except ImportError as error:
            raise ImportError(
                "load_problems('toy') needs svpo_trl.toy.task.load_toy_problems, which could not be imported"
            ) from error
        toy_split = name_or_path.partition(":")[2] or None
        return load_toy_problems(split or toy_split or _DEFAULT_SPLIT)
    if os.path.exists(name_or_path):
        return _load_local(name_or_path, split)
    name = name_or_path.lower()
    if name in HUB_SOURCES:
        return _load_hub(name, split or _DEFAULT_SPLIT)
    raise PathNotFoundError(
        f"{name_or_path!r} is neither a file, a directory, nor a known benchmark "
        f"({', '.join(sorted(HUB_SOURCES))}, toy)"
    )
