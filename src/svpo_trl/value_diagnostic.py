"""Judge a value head before paying for search: does V rank candidate steps better than the policy does?

SBS (§3.3) helps only if, among the ``B2`` steps sampled from a state, the value head puts the ones that
lead to a right answer above the ones that do not, and does so better than the policy's own preference
(its prior, Eq. 4's mean token probability, which is what greedy decoding follows). On held-out problems,
:func:`value_diagnostic` runs step-level beam search with a **perfect ranker** (candidates on track first,
then by V), so that it visits the states where ranking decides the outcome, and at every state it records
each candidate's label (on track or not, from a :class:`~svpo_trl.search.labelers.StepLabeler`), V and
prior. It reports:

- ``within_group_accuracy``: over every state whose candidates mix on-track and off-track steps, and every
  (on-track, off-track) pair of its candidates, how often V puts the on-track one higher (ties count half);
  ``prior_within_group_accuracy``: the same for the prior. 0.5 is chance.
- ``top1_accuracy`` / ``prior_top1_accuracy``: in those mixed states, how often the ranker's first choice
  is on track (what SBS(1, B2) keeps).
- ``value_auc``: AUC of V over all labelled candidates pooled across states (also compares cousins).
- ``oracle_ceiling``: the accuracy of SBS(B1, B2) with the perfect ranker: what any value head could reach
  with this policy's samples; ``greedy``-level accuracy plus the room SBS has.

Raw V and prior are compared as they are (malformed candidates included); SBS itself never keeps a
malformed candidate over a well-formed one.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from .grading import is_equiv
from .search.labelers import GoldLabeler, RolloutLabeler, StepLabeler, gold_of
from .search.sampler import StepSampler
from .search.sbs import SBSConfig, SBSGenerator
from .search.state import State
from .steps import DEFAULT_FORMAT, StepFormat

# A label outweighs any value in [-1, 1]: the perfect ranker sorts by label, then by V.
_LABEL_WEIGHT = 10.0


@dataclass
class ValueDiagnostic:
    """``metrics`` (see the module docstring), one record per problem and one per ranked state."""

    metrics: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)


def make_labeler(kind: str, problems: Sequence[dict[str, Any]], backend: Any, **rollout: Any) -> StepLabeler:
    """``gold`` (the toy task's exact step values), ``rollout`` (Monte-Carlo), or ``auto``: gold when every
    problem is a toy problem with its gold solution, rollouts otherwise."""
    if kind not in ("auto", "gold", "rollout"):
        raise ValueError(f"value diagnostic labels must be auto, gold or rollout, got {kind!r}")
    if kind in ("auto", "gold"):
        from .toy.oracle import ToyStepOracle

        try:
            return GoldLabeler(ToyStepOracle(problems))
        except (ValueError, KeyError) as error:
            if kind == "gold":
                raise ValueError(
                    f"gold step labels exist for the toy task only (its solutions print every value): {error}"
                ) from error
    return RolloutLabeler(backend, **rollout)


def has_trained_value_head(backend: Any) -> bool:
    """Whether the backend's policy has a value head that was trained (its own ``check_value_head`` decides;
    a backend without that check is trusted when it has ``values``)."""
    from .models.value_head import UntrainedValueHeadError

    check = getattr(backend, "check_value_head", None)
    if check is None:
        return hasattr(backend, "values")
    try:
        check()
    except (TypeError, UntrainedValueHeadError):
        return False
    return True


def pairwise_accuracy(on_track: Sequence[float], off_track: Sequence[float]) -> tuple[float, int]:
    """Share of (on, off) pairs with ``on > off`` (ties half) and the number of pairs."""
    pairs = len(on_track) * len(off_track)
    if pairs == 0:
        return math.nan, 0
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in on_track for b in off_track)
    return wins / pairs, pairs


def group_metrics(groups: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ranking metrics of the module docstring from recorded groups (each ``{"candidates": [...]}``
    with ``on_track``, ``value`` (or None) and ``prior`` per candidate)."""
    totals = {"value": [0.0, 0], "prior": [0.0, 0]}
    top1 = {"value": 0, "prior": 0}
    mixed = 0
    pooled: dict[bool, list[float]] = {True: [], False: []}
    has_value = any(c["value"] is not None for g in groups for c in g["candidates"])
    for group in groups:
        cands = group["candidates"]
        if has_value:
            for c in cands:
                pooled[c["on_track"]].append(c["value"])
        on = [c for c in cands if c["on_track"]]
        off = [c for c in cands if not c["on_track"]]
        if not on or not off:
            continue
        mixed += 1
        for key in ("value", "prior") if has_value else ("prior",):
            accuracy, count = pairwise_accuracy([c[key] for c in on], [c[key] for c in off])
            totals[key][0] += accuracy * count
            totals[key][1] += count
            top1[key] += int(max(cands, key=lambda c, key=key: c[key])["on_track"])  # first of ties

    def ratio(wins: float, count: int) -> float | None:
        return wins / count if count else None

    auc, _ = pairwise_accuracy(pooled[True], pooled[False]) if has_value else (math.nan, 0)
    return {
        "groups": len(groups),
        "mixed_groups": mixed,
        "ranked_pairs": totals["prior"][1],
        "within_group_accuracy": ratio(*totals["value"]) if has_value else None,
        "prior_within_group_accuracy": ratio(*totals["prior"]),
        "top1_accuracy": ratio(top1["value"], mixed) if has_value else None,
        "prior_top1_accuracy": ratio(top1["prior"], mixed),
        "value_auc": None if math.isnan(auc) else auc,
        "mean_candidates": sum(len(g["candidates"]) for g in groups) / len(groups) if groups else None,
    }


def value_diagnostic(
    backend: Any,
    problems: Sequence[dict[str, Any]],
    labeler: StepLabeler | str = "auto",
    *,
    beam_width: int = 1,
    num_samples: int = 5,
    temperature: float = 0.6,
    max_depth: int = 8,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    use_value: bool = True,
    num_rollouts: int = 4,
    sandbox: Any = None,
    step_format: StepFormat = DEFAULT_FORMAT,
    grader: Any = is_equiv,
    output_jsonl: str | os.PathLike | None = None,
    progress: bool = True,
) -> ValueDiagnostic:
    """Rank ``num_samples`` candidates per state with a perfect ranker on ``problems`` and measure V.

    Args:
        backend: the policy (with a value head unless ``use_value=False``, which reports the prior's
            metrics and the oracle ceiling only: what a head would have to beat).
        problems: rows with ``id``, ``question``, ``answer`` (toy rows carry ``solution`` too).
        labeler: a `StepLabeler`, or ``"auto"`` / ``"gold"`` / ``"rollout"`` (see :func:`make_labeler`;
            rollouts use ``num_rollouts`` completions at ``temperature``).
        beam_width, num_samples, temperature: the SBS(B1, B2) being judged (paper: B2 = 5).
        output_jsonl: write one record per problem (oracle solution, answer, correctness, its ranked
            states with every candidate's label, V and prior).

    Returns:
        A :class:`ValueDiagnostic`: ``metrics`` holds :func:`group_metrics` plus ``oracle_ceiling`` and
        ``num_problems``.
    """
    rows = [dict(problems[i]) for i in range(len(problems))]
    sampler = StepSampler(backend, sandbox=sandbox, step_format=step_format, max_new_tokens=max_new_tokens)
    if isinstance(labeler, str):
        labeler = make_labeler(
            labeler,
            rows,
            backend,
            num_rollouts=num_rollouts,
            temperature=temperature,
            max_depth=max_depth,
            max_new_tokens=max_new_tokens,
            sampler=sampler,
            grader=grader,
        )
    config = SBSConfig(
        beam_width=beam_width,
        num_samples=num_samples,
        temperature=temperature,
        max_depth=max_depth,
        max_new_tokens=max_new_tokens,
        use_value=use_value,
    )
    generator = SBSGenerator(backend, config, sampler=sampler)
    records: list[dict[str, Any]] = []
    all_groups: list[dict[str, Any]] = []
    bar = tqdm(total=len(rows), desc="value diagnostic", disable=not progress, unit="q")
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        groups: dict[tuple[int, str], dict[str, Any]] = {}

        def perfect_ranker(
            owners: list[int], candidates: list[State], values: list, batch=batch, groups=groups
        ):
            labels = labeler.label([batch[o] for o in owners], candidates)
            for owner, state, value, label in zip(owners, candidates, values, labels):
                parent = "".join(s.text for s in state.steps[:-1])
                group = groups.setdefault(
                    (owner, parent),
                    {
                        "id": str(batch[owner]["id"]),
                        "depth": state.depth,
                        # the state itself, so that any other ranker can score the same candidates later
                        # (svpo_trl.value_lab.diagnostic_groups)
                        "prompt": state.prompt,
                        "prefix": [s.text for s in state.steps[:-1]],
                        "candidates": [],
                    },
                )
                step = state.steps[-1]
                group["candidates"].append(
                    {
                        "on_track": bool(label),
                        "value": value,
                        "prior": step.prior,
                        "malformed": step.is_malformed,
                        "final_answer": step.final_answer,
                        "text": step.text,
                    }
                )
            return [_LABEL_WEIGHT * float(label) + (value or 0.0) for label, value in zip(labels, values)]

        results = generator.generate([row["question"] for row in batch], ranker=perfect_ranker)
        by_problem: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for (owner, _), group in groups.items():
            by_problem[owner].append(group)
        for i, (row, result) in enumerate(zip(batch, results)):
            correct = result.final_answer is not None and bool(grader(result.final_answer, gold_of(row)))
            records.append(
                {
                    "id": str(row["id"]),
                    "question": row["question"],
                    "gold": row["answer"],
                    "oracle_solution": result.solution,
                    "oracle_answer": result.final_answer,
                    "oracle_correct": correct,
                    "groups": by_problem[i],
                }
            )
            all_groups.extend(by_problem[i])
        bar.update(len(batch))
    bar.close()
    metrics = {
        "num_problems": len(records),
        "oracle_ceiling": sum(r["oracle_correct"] for r in records) / len(records) if records else math.nan,
        **group_metrics(all_groups),
        "labels": type(labeler).__name__,
        "beam_width": beam_width,
        "num_samples": num_samples,
        "temperature": temperature,
    }
    if output_jsonl is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output_jsonl)) or ".", exist_ok=True)
        with open(output_jsonl, "w") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return ValueDiagnostic(metrics=metrics, records=records, groups=all_groups)


def format_value_diagnostic(metrics: dict[str, Any]) -> str:
    """A few readable lines: the ranking accuracies of V and of the prior, and the SBS oracle ceiling."""

    def pct(key: str) -> str:
        value = metrics.get(key)
        return (
            "-"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else f"{100 * value:.1f}%"
        )

    return (
        f"value diagnostic on {metrics['num_problems']} problems ({metrics['labels']}, "
        f"SBS({metrics['beam_width']},{metrics['num_samples']}) at T={metrics['temperature']}): "
        f"{metrics['mixed_groups']} of {metrics['groups']} states mix right and wrong steps\n"
        f"  within-group accuracy: V {pct('within_group_accuracy')}, prior {pct('prior_within_group_accuracy')}"
        f" (0.5 = chance); top-1 on track: V {pct('top1_accuracy')}, prior {pct('prior_top1_accuracy')}\n"
        f"  value AUC {pct('value_auc')}; SBS oracle ceiling {pct('oracle_ceiling')}"
    )
