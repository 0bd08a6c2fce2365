"""Evaluation over a problem set: greedy, step-level beam search (SBS) and maj@k (Table 2).

Every strategy runs through :class:`~svpo_trl.search.sbs.SBSGenerator`, so the code that decodes
at evaluation time is the code a search uses: greedy is ``B1 = B2 = 1`` at temperature 0, SBS
ranks ``B2`` sampled steps per beam by the value head (§3.3), and maj@k samples ``k`` solutions
and votes over final answers grouped by equivalence.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from .distributed import ProcessShard
from .errors import UsageError
from .grading import is_equiv
from .search.backends import GenerationBackend
from .search.sampler import StepSampler
from .search.sbs import RANKERS, Ranker, SBSConfig, SBSGenerator, SBSResult
from .steps import DEFAULT_FORMAT, StepFormat

REFERENCE_RANKER = "reference"
"""``sbs(B1,B2,reference)``: SBS's candidates ranked by a reference policy's prior (a ranker :func:`evaluate` is
given), beside :data:`~svpo_trl.search.sbs.RANKERS`, which the searching model computes itself."""
STRATEGY_RANKERS = (*RANKERS, REFERENCE_RANKER)

Grader = Callable[[str | None, Any], bool]

_SBS = re.compile(r"^sbs\s*[\(:]?\s*(\d+)\s*[,x]\s*(\d+)\s*(?:,\s*([a-z+]+)\s*)?\)?$")
_MAJ = re.compile(r"^maj@(\d+)$")


@dataclass(frozen=True)
class Strategy:
    """A decoding strategy of Table 2.

    ``kind`` is ``"greedy"``, ``"sbs"`` (``beam_width`` = B1, ``num_samples`` = B2) or ``"maj"``
    (``k`` sampled solutions at ``temperature``, majority vote). Parse one from text with
    :meth:`parse`: ``greedy``, ``sbs(1,5)`` / ``sbs:3x5``, ``maj@8``; ``sbs(1,5,prior)`` and
    ``sbs(1,5,value+prior)`` rank SBS's candidates by another ranker (:attr:`SBSConfig.ranker`), and
    ``sbs(1,5,reference)`` by the prior of a *reference* policy given to :func:`evaluate` as ``ranker``
    (:class:`~svpo_trl.search.rankers.PolicyPriorRanker`; ``recipes/evaluate.py --reference_model``).
    """

    kind: str = "greedy"
    beam_width: int = 1
    num_samples: int = 5
    k: int = 1
    temperature: float | None = None
    ranker: str = "value"

    def __post_init__(self) -> None:
        # Checked here, not when the search starts: an evaluation runs every strategy's checks before any
        # solving, so sbs(0,5) fails at once instead of after greedy decoded the whole set.
        if self.kind not in ("greedy", "sbs", "maj"):
            raise UsageError(f"strategy kind {self.kind!r} unknown: expected 'greedy', 'sbs' or 'maj'")
        if self.kind == "sbs" and (self.beam_width < 1 or self.num_samples < 1):
            raise UsageError(
                f"{self.label}: the beam width B1 and the samples per beam B2 must both be at least 1"
            )
        if self.kind == "maj" and self.k < 1:
            raise UsageError(f"maj@{self.k}: k (the number of sampled solutions) must be at least 1")
        if self.ranker not in STRATEGY_RANKERS:
            raise UsageError(
                f"strategy ranker {self.ranker!r} unknown: expected one of {', '.join(STRATEGY_RANKERS)} "
                "(e.g. 'sbs(1,5,prior)')"
            )
        if self.temperature is not None and self.temperature < 0:
            raise UsageError(f"{self.label}: temperature must be >= 0, got {self.temperature}")

    @classmethod
    def parse(cls, text: str) -> Strategy:
        """``greedy``, ``sbs(B1,B2)`` (also ``sbs:B1xB2``) or ``maj@k``; B1, B2, k at least 1."""
        spec = text.strip().lower().replace(" ", "")
        if spec == "greedy":
            return cls("greedy")
        if match := _SBS.match(spec):
            ranker = match.group(3) or "value"
            return cls("sbs", beam_width=int(match.group(1)), num_samples=int(match.group(2)), ranker=ranker)
        if match := _MAJ.match(spec):
            return cls("maj", k=int(match.group(1)))
        raise UsageError(
            f"unknown strategy {text!r}: expected 'greedy', 'sbs(B1,B2)', 'sbs(B1,B2,RANKER)' or 'maj@k'"
        )

    @property
    def label(self) -> str:
        if self.kind == "sbs":
            ranked = "" if self.ranker == "value" else f", {self.ranker}"
            return f"SBS (B1={self.beam_width}, B2={self.num_samples}{ranked})"
        if self.kind == "maj":
            return f"maj@{self.k}"
        return "greedy"

    @property
    def slug(self) -> str:
        """A file-name-safe name: ``greedy``, ``sbs1x5``, ``sbs1x5-prior``, ``sbs1x5-valueprior``, ``maj8``."""
        if self.kind == "sbs":
            ranked = "" if self.ranker == "value" else "-" + self.ranker.replace("+", "")
            return f"sbs{self.beam_width}x{self.num_samples}{ranked}"
        if self.kind == "maj":
            return f"maj{self.k}"
        return "greedy"

    @property
    def needs_value(self) -> bool:
        return self.kind == "sbs" and self.ranker not in ("prior", REFERENCE_RANKER)

    @property
    def needs_reference(self) -> bool:
        """Whether SBS ranks by another policy's prior (``sbs(B1,B2,reference)``): :func:`evaluate` needs its
        ``ranker``."""
        return self.kind == "sbs" and self.ranker == REFERENCE_RANKER

    def sbs_config(self, max_depth: int, max_new_tokens: int) -> SBSConfig:
        """The SBS settings that implement this strategy."""
        common = {"max_depth": max_depth, "max_new_tokens": max_new_tokens}
        if self.temperature is not None:
            common["temperature"] = self.temperature
        if self.kind == "greedy":
            return SBSConfig.greedy(**common)
        if self.kind == "sbs":
            # The reference's scores replace the ranking score; without the value head, as the prior ranker.
            ranker = "prior" if self.needs_reference else self.ranker
            return SBSConfig(
                beam_width=self.beam_width, num_samples=self.num_samples, ranker=ranker, **common
            )
        # maj@k: k independent samples, each one step at a time without the value head.
        sample = {"temperature": 0.8, **common}
        return SBSConfig(beam_width=1, num_samples=1, use_value=False, remove_duplicates=False, **sample)


@dataclass
class EvalResult:
    """Per-problem ``records`` and the aggregate ``metrics`` of one strategy on one problem set."""

    strategy: str
    metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)


def majority_vote(answers: Sequence[str | None], grader: Grader = is_equiv) -> tuple[str | None, int]:
    """The most frequent answer among ``answers``, grouping equivalent ones (maj@k).

    Returns ``(answer, votes)``; ties go to the group seen first. ``None`` answers do not vote.
    """
    groups: list[list[str]] = []
    for answer in answers:
        if answer is None:
            continue
        for group in groups:
            if answer == group[0] or grader(answer, group[0]):
                group.append(answer)
                break
        else:
            groups.append([answer])
    if not groups:
        return None, 0
    best = max(groups, key=len)  # max keeps the first of equal lengths
    return best[0], len(best)


def _gold(problem: dict[str, Any]) -> Any:
    answers = problem.get("answers")
    return answers if answers else problem["answer"]


def evaluate(
    backend: GenerationBackend,
    problems: Sequence[dict[str, Any]],
    strategy: Strategy | str = "greedy",
    *,
    sandbox: Any = None,
    step_format: StepFormat = DEFAULT_FORMAT,
    max_depth: int = 8,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    grader: Grader = is_equiv,
    output_jsonl: str | os.PathLike | None = None,
    progress: bool = True,
    shard: ProcessShard | None = None,
    resume: bool = True,
    ranker: Ranker | None = None,
) -> EvalResult:
    """Solve every problem with ``strategy`` and grade the answers against the gold.

    ``problems`` are rows with ``id``, ``question``, ``answer`` (and optionally ``answers``, every
    acceptable gold): a `datasets.Dataset` from :func:`svpo_trl.data.load_problems` works as is.
    Questions are solved ``batch_size`` at a time, each batch in lock-step (one backend call per
    round). Every record holds the solution, answer, correctness, value, tokens generated and
    seconds spent (the batch's wall time shared evenly by its questions). With ``output_jsonl``
    the records are written there, one JSON object per line, in the order of ``problems``.

    Nothing is lost on a crash: with ``output_jsonl``, each finished batch is appended to
    ``<output_jsonl>.part-<rank>`` and, with ``resume``, a new run skips the problems recorded in
    any part file of the same strategy (the part files are removed once the JSONL is written).
    With ``shard`` (:meth:`svpo_trl.distributed.ProcessShard.from_environment` under
    ``accelerate launch``), each process solves its share of the problems (by id) and the records
    are gathered so that every process returns the whole result; rank 0 writes the JSONL.
    ``ranker`` replaces SBS's ranking score (e.g. :class:`svpo_trl.search.rankers.PolicyPriorRanker`).
    """
    strategy = Strategy.parse(strategy) if isinstance(strategy, str) else strategy
    if strategy.needs_reference and ranker is None:
        raise UsageError(
            f"{strategy.label}: ranks by a reference policy's prior: pass ranker=PolicyPriorRanker(model, "
            "tokenizer) (recipes/evaluate.py: --reference_model PATH)"
        )
    shard = shard if shard is not None else ProcessShard()
    config = strategy.sbs_config(max_depth, max_new_tokens)
    sampler = StepSampler(backend, sandbox=sandbox, step_format=step_format, max_new_tokens=max_new_tokens)
    generator = SBSGenerator(backend, config, sampler=sampler)
    repeats = strategy.k if strategy.kind == "maj" else 1
    rows = [dict(problems[i]) for i in range(len(problems))]
    ids = [str(row["id"]) for row in rows]
    done = _recorded(output_jsonl, strategy.label) if resume and output_jsonl is not None else {}
    if done and len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(
            f"{output_jsonl}: cannot resume from its part files, problem ids repeat ({repeated}); "
            "give every problem a unique id or delete the part files"
        )
    mine = shard.positions(ids)
    # Records by position: ids need not be unique unless a run resumes.
    records = {p: done[ids[p]] for p in mine if ids[p] in done}
    todo = [p for p in mine if p not in records]
    part = f"{os.fspath(output_jsonl)}.part-{shard.rank:05d}" if output_jsonl is not None else None
    desc = f"eval {strategy.label}" + (f" ({shard.label})" if shard.is_distributed else "")
    bar = tqdm(
        total=len(mine), initial=len(records), desc=desc, disable=not progress or not shard.is_main, unit="q"
    )
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        questions = [rows[p]["question"] for p in batch for _ in range(repeats)]
        began = time.perf_counter()
        results = generator.generate(questions, ranker=ranker)
        seconds = (time.perf_counter() - began) / len(batch)
        new = {
            p: _record(rows[p], results[i * repeats : (i + 1) * repeats], seconds, strategy, grader)
            for i, p in enumerate(batch)
        }
        if part is not None:
            _append_jsonl(list(new.values()), part)
        records.update(new)
        bar.update(len(batch))
    bar.close()
    merged: dict[int, dict[str, Any]] = {}
    for share in shard.gather(records):
        merged.update(share)
    ordered = [merged[p] for p in range(len(rows))]
    result = EvalResult(strategy=strategy.label, metrics=_metrics(ordered), records=ordered)
    if output_jsonl is not None:
        if shard.is_main:
            write_jsonl(ordered, output_jsonl)
        # The JSONL is complete before any process drops the part files it was built from.
        shard.barrier()
        for path in _part_files(output_jsonl):
            if shard.is_main or path == part:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
    return result


def _part_files(output_jsonl: str | os.PathLike) -> list[str]:
    return sorted(glob.glob(glob.escape(os.fspath(output_jsonl)) + ".part-*"))


def _recorded(output_jsonl: str | os.PathLike, strategy: str) -> dict[str, dict[str, Any]]:
    """Records of ``strategy`` already in the part files of an interrupted run, by problem id."""
    found: dict[str, dict[str, Any]] = {}
    for path in _part_files(output_jsonl):
        with open(path) as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the crash: that problem runs again
                if record.get("strategy") == strategy:
                    found[str(record["id"])] = record
    return found


def _append_jsonl(records: list[dict[str, Any]], path: str) -> None:
    """Append records and make them durable before the next batch starts."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _record(
    row: dict[str, Any], results: list[SBSResult], seconds: float, strategy: Strategy, grader: Grader
) -> dict[str, Any]:
    gold = _gold(row)
    if strategy.kind == "maj":
        answer, votes = majority_vote([r.final_answer for r in results], grader)
        chosen = next((r for r in results if r.final_answer == answer), results[0])
    else:
        chosen, answer, votes = results[0], results[0].final_answer, 1
    return {
        "id": str(row["id"]),
        "question": row["question"],
        "gold": row["answer"],
        "strategy": strategy.label,
        "solution": chosen.solution,
        "answer": answer,
        "correct": bool(answer is not None and grader(answer, gold)),
        "value": chosen.value,
        "votes": votes,
        "num_steps": len(chosen.steps),
        "finished": chosen.finished,
        "tokens": sum(r.num_tokens for r in results),
        "seconds": seconds,
    }


def _metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    n = len(records)
    if n == 0:
        return {
            "num_problems": 0,
            "accuracy": math.nan,
            "tokens_per_question": math.nan,
            "seconds_per_question": math.nan,
        }
    return {
        "num_problems": n,
        "accuracy": sum(r["correct"] for r in records) / n,
        "answered": sum(r["answer"] is not None for r in records) / n,
        "tokens_per_question": sum(r["tokens"] for r in records) / n,
        "seconds_per_question": sum(r["seconds"] for r in records) / n,
    }


def write_jsonl(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write records as JSON lines, atomically (a crash never leaves half a file)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def results_table(rows: Sequence[dict[str, Any]], datasets: Sequence[str] | None = None) -> str:
    """A markdown table shaped like the paper's Table 2: one row per system and decoding strategy,
    one accuracy column per dataset, then the mean cost per question (tokens, seconds).

    Each input row is ``{"system", "strategy", "dataset", "accuracy", "tokens_per_question",
    "seconds_per_question", "num_problems"}``; accuracies print as percentages.
    """
    datasets = list(datasets) if datasets else list(dict.fromkeys(r["dataset"] for r in rows))
    systems = list(dict.fromkeys((r["system"], r["strategy"]) for r in rows))
    header = ["System", "Decoding", *datasets, "tokens / question", "seconds / question"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for system, strategy in systems:
        cells = [system, strategy]
        mine = [r for r in rows if (r["system"], r["strategy"]) == (system, strategy)]
        for dataset in datasets:
            hit = next((r for r in mine if r["dataset"] == dataset), None)
            cells.append("-" if hit is None else f"{100 * hit['accuracy']:.1f}")
        tokens = sum(r["tokens_per_question"] * r["num_problems"] for r in mine) / sum(
            r["num_problems"] for r in mine
        )
        seconds = sum(r["seconds_per_question"] * r["num_problems"] for r in mine) / sum(
            r["num_problems"] for r in mine
        )
        cells += [f"{tokens:.0f}", f"{seconds:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_row(system: str, dataset: str, result: EvalResult) -> dict[str, Any]:
    """One row of :func:`results_table` from an `EvalResult`."""
    return {"system": system, "strategy": result.strategy, "dataset": dataset, **result.metrics}


__all__ = [
    "EvalResult",
    "Strategy",
    "evaluate",
    "majority_vote",
    "results_table",
    "summary_row",
    "write_jsonl",
]
