"""How trustworthy is an annotation? Label precision of Algorithm 1's pairs, and how deep the search got.

Where every step's true value is known (the toy task, :class:`~svpo_trl.toy.oracle.ToyStepOracle`), each
pair can be checked: its chosen partial solution should be on track and its rejected one off track. A
preference learner trained on pairs whose rejected side is in fact a right step learns to avoid right
steps, so these precisions are the first thing to look at after an annotation.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from ..steps import DEFAULT_FORMAT, StepFormat


def pair_label_precision(
    pairs: Iterable[dict[str, Any]], oracle: Any, step_format: StepFormat = DEFAULT_FORMAT
) -> dict[str, dict[str, Any]]:
    """Per pair type (and ``"all"``): ``pairs``, ``chosen_on_track`` (share of chosen partial solutions
    that are on track), ``rejected_off_track`` (share of rejected ones that are off track), and
    ``identical`` (pairs whose two sides are the same text).

    ``oracle.on_track(prompt, steps)`` gives the truth (``ToyStepOracle``).
    """
    counts: dict[str, Counter] = defaultdict(Counter)
    for pair in pairs:
        chosen = step_format.split_steps(pair["chosen"])
        rejected = step_format.split_steps(pair["rejected"])
        for kind in (pair["pair_type"], "all"):
            tally = counts[kind]
            tally["pairs"] += 1
            tally["chosen_on_track"] += int(oracle.on_track(pair["prompt"], chosen))
            tally["rejected_off_track"] += int(not oracle.on_track(pair["prompt"], rejected))
            tally["identical"] += int(pair["chosen"] == pair["rejected"])
    return {
        kind: {
            "pairs": tally["pairs"],
            "chosen_on_track": tally["chosen_on_track"] / tally["pairs"],
            "rejected_off_track": tally["rejected_off_track"] / tally["pairs"],
            "identical": tally["identical"],
        }
        for kind, tally in counts.items()
    }


def search_reach(trees: Iterable[dict[str, Any]], oracle: Any = None) -> dict[str, Any]:
    """How deep the search went and what it solved.

    Returns ``deepest`` (the deepest node of any tree), ``deepest_node_per_tree`` (histogram: depth ->
    trees), ``duplicate_children`` (children whose text repeats a sibling's; 0 since identical samples
    are merged), and with an ``oracle`` that knows ``num_operations(question)``, ``solved_by_operations``:
    operations -> ``{"problems", "solved"}`` (a problem is solved when any of its trees reached a right
    answer).
    """
    per_tree: Counter = Counter()
    solved: dict[str, bool] = {}
    questions: dict[str, str] = {}
    duplicates = 0
    for row in trees:
        nodes = row["nodes"]
        per_tree[max(n["depth"] for n in nodes)] += 1
        qid = str(row["id"])
        questions[qid] = row["question"]
        solved[qid] = solved.get(qid, False) or any(
            n["is_terminal"] and (n["reward"] or 0) > 0 for n in nodes
        )
        seen: set[tuple[int, str]] = set()
        for n in nodes[1:]:
            key = (n["parent_id"], n["text"])
            duplicates += int(key in seen)
            seen.add(key)
    result: dict[str, Any] = {
        "deepest": max(per_tree) if per_tree else 0,
        "deepest_node_per_tree": dict(sorted(per_tree.items())),
        "duplicate_children": duplicates,
    }
    if oracle is not None:
        by_ops: dict[int, Counter] = defaultdict(Counter)
        for qid, question in questions.items():
            ops = oracle.num_operations(question)
            by_ops[ops]["problems"] += 1
            by_ops[ops]["solved"] += int(solved[qid])
        result["solved_by_operations"] = {k: dict(by_ops[k]) for k in sorted(by_ops)}
    return result


def format_label_quality(precision: dict[str, dict[str, Any]], reach: dict[str, Any]) -> str:
    """The label precision per pair type and the search's reach as a markdown table and a line."""
    lines = [
        "| pair type | pairs | chosen on track | rejected off track | identical sides |",
        "|---|---|---|---|---|",
    ]
    for kind in ("sibling", "cousin", "terminal", "solution", "all"):
        if kind in precision:
            p = precision[kind]
            lines.append(
                f"| {kind} | {p['pairs']} | {100 * p['chosen_on_track']:.1f}% | "
                f"{100 * p['rejected_off_track']:.1f}% | {p['identical']} |"
            )
    solved = reach.get("solved_by_operations")
    if solved:
        parts = ", ".join(f"{k} ops {v['solved']}/{v['problems']}" for k, v in solved.items())
        lines.append(f"\nsolved by number of operations: {parts}; deepest node {reach['deepest']}")
    return "\n".join(lines)


def annotation_label_quality(
    oracle: Any, trees: Iterable[dict], pairs: dict[str, Iterable[dict]]
) -> dict[str, Any]:
    """``{"precision": {dataset: per-type precision}, "reach": search_reach}`` for an annotation's pair datasets
    (``{"pairs": ..., "solution_pairs": ...}``), judged by ``oracle``."""
    return {
        "precision": {name: pair_label_precision(rows, oracle) for name, rows in pairs.items()},
        "reach": search_reach(trees, oracle),
    }
