"""Solution-level preference pairs: the data of the DPO baseline (Table 3).

Plain DPO compares complete solutions: a correct one (chosen) against an incorrect one (rejected)
for the same question, with no step-level information. They are drawn from the same MCTS
annotation as the step-level pairs (the complete root-to-terminal paths of the ``values`` rows),
so DPO and SVPO see the same solutions and differ only in how preferences are formed.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from datasets import Dataset

SOLUTION_PAIR_COLUMNS = ("id", "prompt", "chosen", "rejected", "chosen_value", "rejected_value", "pair_type")


def _question_id(row_id: str) -> str:
    # values ids are "{question_id}/{tree_index}/{node_id}"
    return row_id.rsplit("/", 2)[0]


def solution_level_pairs(
    values: Dataset | list[dict[str, Any]], *, per_question: int = 4, seed: int = 0
) -> Dataset:
    """Pair correct and incorrect complete solutions of each question (chosen = correct).

    Each question contributes up to ``per_question`` pairs, drawn without repetition from its
    (correct, incorrect) combinations with a RNG seeded by ``seed`` and the question id, in the
    order questions first appear. A solution is complete when its last step is a terminal answer
    (rows of the ``values`` dataset, :func:`svpo_trl.search.pairs.value_rows`); its value label is
    the reward of the last step (+1 / -1). Questions whose solutions are all right or all wrong
    give no pair.
    """
    by_question: dict[str, dict[bool, list[dict[str, Any]]]] = defaultdict(lambda: {True: [], False: []})
    for row in values:
        by_question[_question_id(row["id"])][bool(row["correct"])].append(row)
    pairs: dict[str, list[Any]] = {name: [] for name in SOLUTION_PAIR_COLUMNS}
    for question_id, groups in by_question.items():
        combos = [(c, r) for c in groups[True] for r in groups[False]]
        if not combos:
            continue
        rng = random.Random(f"{seed}/{question_id}")
        for chosen, rejected in rng.sample(combos, min(per_question, len(combos))):
            pairs["id"].append(f"{chosen['id']}-{rejected['id']}")
            pairs["prompt"].append(chosen["prompt"])
            pairs["chosen"].append("".join(chosen["steps"]))
            pairs["rejected"].append("".join(rejected["steps"]))
            pairs["chosen_value"].append(float(chosen["step_values"][-1]))
            pairs["rejected_value"].append(float(rejected["step_values"][-1]))
            pairs["pair_type"].append("solution")
    return Dataset.from_dict(pairs)
