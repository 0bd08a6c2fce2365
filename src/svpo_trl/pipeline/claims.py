"""The claims a pipeline checks on its own evaluation: paired differences between two of its rows.

A setting file's ``pipeline.claims`` lists them; each names two rows of ``pipeline.evaluate_systems`` by
system name and strategy (as written there)::

    claims:
      - {claim: "value pre-training vs SFT", first: ["Value SFT (Eq. 7)", greedy], second: [SFT, greedy]}

After the table, the pipeline prints one line per claim: the two accuracies, the difference in points and its
paired bootstrap 95% interval over the problems (``svpo_trl.stats.paired_bootstrap``), and whether the interval
excludes zero. Both rows must have been evaluated on the same problems, in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..errors import UsageError
from ..stats import format_difference, paired_bootstrap


def row_key(row: dict[str, Any]) -> str:
    """``"<system>/<strategy label>"``: how a claim finds a row (the label, e.g. ``SBS (B1=1, B2=5)``)."""
    return f"{row['system']}/{row['strategy']}"


def _claim_key(side: Any, claim: dict[str, Any], which: str) -> str:
    from ..evaluation import Strategy

    if not (isinstance(side, Sequence) and not isinstance(side, str) and len(side) == 2):
        raise UsageError(
            f"pipeline.claims: {claim.get('claim', claim)!r}: '{which}' must be [system, strategy], got {side!r}"
        )
    system, strategy = side
    return f"{system}/{Strategy.parse(str(strategy)).label}"


def claim_lines(correct: dict[str, Sequence[int]], claims: Sequence[dict[str, Any]]) -> list[str]:
    """One line per claim from the rows' per-problem 0/1 (``correct[row_key]``).

    Example line: ``value pre-training vs SFT: 88.3 vs 52.0, +36.3 points [+31.7, +41.0], paired 95%
    interval over 300 problems: holds``.
    """
    lines = []
    for claim in claims:
        first = _claim_key(claim.get("first"), claim, "first")
        second = _claim_key(claim.get("second"), claim, "second")
        missing = [key for key in (first, second) if key not in correct]
        if missing:
            raise UsageError(
                f"pipeline.claims: {claim.get('claim')!r} names rows that were not evaluated: {missing}; "
                f"the rows are {sorted(correct)}"
            )
        result = paired_bootstrap(correct[first], correct[second])
        (system_a, decoding_a), (system_b, decoding_b) = first.split("/", 1), second.split("/", 1)
        # One system under two decodings is told apart by the decodings, two systems by their names.
        name_a, name_b = (decoding_a, decoding_b) if system_a == system_b else (system_a, system_b)
        if result["low"] > 0:
            verdict = f"{name_a} is better"
        elif result["high"] < 0:
            verdict = f"{name_b} is better"
        else:
            verdict = "no difference this run can tell"
        lines.append(
            f"{claim.get('claim', f'{first} - {second}')}: {100 * result['first']:.1f} vs "
            f"{100 * result['second']:.1f}, {format_difference(result)} points (paired 95% interval, "
            f"{result['num_problems']} problems): {verdict}"
        )
    return lines


def read_correct(path: str) -> list[int]:
    """The per-problem 0/1 of an evaluation's JSONL (``evaluate(..., output_jsonl=)``), in problem order."""
    with open(path) as handle:
        return [int(json.loads(line)["correct"]) for line in handle]


def correct_by_row(rows: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """Every evaluated row's per-problem 0/1, read from the JSONL its ``predictions`` field names."""
    return {row_key(row): read_correct(row["predictions"]) for row in rows}
