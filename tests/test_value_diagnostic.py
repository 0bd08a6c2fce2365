"""The value diagnostic on a scripted policy: every metric computed by hand; labels by oracle and by rollouts."""

from __future__ import annotations

import json
import re

import pytest

from svpo_trl.search.labelers import GoldLabeler, RolloutLabeler
from svpo_trl.search.sampler import StepSampler
from svpo_trl.search.state import State
from svpo_trl.search.testing import ScriptedBackend
from svpo_trl.steps import DEFAULT_FORMAT as F
from svpo_trl.value_diagnostic import format_value_diagnostic, group_metrics, value_diagnostic

from conftest import ConstantSandbox


def code(label: str) -> str:
    return f"<step>\n<p>\nlabel={label}\n</p>\n<code>\n```python\nprint(1)\n```\n</code>"


def answer(label: str, value: str) -> str:
    return f"<step>\n<p>\nlabel={label}\n</p>\n<p>\nFinal Answer: ${value}$\n</p>\n</step>"


# Per question: the completions after each state (keyed by the last step's label) with their priors.
TREES = {
    "Q": {  # gold 7: the good code step is the policy's least likely and V's second choice
        "ROOT": [(code("CG"), 0.3), (code("CB"), 0.9), (answer("AW", "8"), 0.5)],
        "CG": [(answer("A7", "7"), 0.4), (answer("A9", "9"), 0.6)],
        "CB": [(answer("A8", "8"), 0.7)],
    },
    "W": {"ROOT": [(answer("X", "1"), 0.5), (answer("Y", "2"), 0.4)]},  # gold 7: nothing is on track
}
VALUES = {"CG": 0.8, "CB": 0.2, "AW": 0.9, "A7": 0.7, "A9": 0.1, "A8": 0.3, "X": 0.0, "Y": 0.5}
ON_TRACK = {"CG", "A7"}
PROBLEMS = [{"id": "q", "question": "Q", "answer": "7"}, {"id": "w", "question": "W", "answer": "7"}]


def _label(text: str) -> str:
    labels = re.findall(r"label=(\w+)", text)
    return labels[-1] if labels else "ROOT"


def backend() -> ScriptedBackend:
    def script(prompt: str):
        question = re.search(r"<question>(.*?)</question>", prompt, re.DOTALL).group(1)
        return TREES[question][_label(prompt)]

    return ScriptedBackend(script, value_fn=lambda text: VALUES[_label(text)])


class LabelOracle:
    """On track when every step's label is in ON_TRACK."""

    def on_track(self, prompt: str, steps) -> bool:
        return all(_label(s.text) in ON_TRACK for s in steps)


def test_metrics_by_hand(tmp_path):
    out = tmp_path / "diag.jsonl"
    result = value_diagnostic(
        backend(), PROBLEMS, GoldLabeler(LabelOracle()), num_samples=3, sandbox=ConstantSandbox(),
        output_jsonl=out, progress=False,
    )  # fmt: skip
    m = result.metrics
    # Q, root: on {CG V .8 p .3} vs off {CB V .2 p .9, AW V .9 p .5}: V wins 1 of 2, prior 0 of 2;
    # top-1: V picks AW (off), prior CB (off). The perfect ranker follows CG.
    # Q after CG: on {A7 V .7 p .4} vs off {A9 V .1 p .6}: V 1 of 1, prior 0 of 1; top-1 V on, prior off.
    # W, root: nothing on track: not a mixed state.
    assert (m["groups"], m["mixed_groups"], m["ranked_pairs"]) == (3, 2, 3)
    assert m["within_group_accuracy"] == pytest.approx(2 / 3)
    assert m["prior_within_group_accuracy"] == pytest.approx(0.0)
    assert m["top1_accuracy"] == pytest.approx(0.5) and m["prior_top1_accuracy"] == pytest.approx(0.0)
    # Pooled AUC: on {.8, .7} vs off {.2, .9, .1 (Q), .0, .5 (W)}: 8 of 10 pairs.
    assert m["value_auc"] == pytest.approx(8 / 10)
    assert m["oracle_ceiling"] == pytest.approx(0.5)  # Q solved through CG -> A7; W cannot be
    assert m["num_problems"] == 2 and m["labels"] == "GoldLabeler"
    q, w = result.records
    assert q["oracle_correct"] and q["oracle_answer"] == "7" and not w["oracle_correct"]
    assert [_label(s) for s in F.split_steps(q["oracle_solution"])] == ["CG", "A7"]
    assert [len(g["candidates"]) for g in q["groups"]] == [3, 2]
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in saved] == ["q", "w"] and saved[0]["groups"][0]["candidates"][0]["on_track"]
    text = format_value_diagnostic(m)
    assert "V 66.7%, prior 0.0%" in text and "oracle ceiling 50.0%" in text


def test_without_a_value_head_reports_the_prior_and_the_ceiling():
    plain = backend()
    plain.value_fn = None  # values() raises: the diagnostic must not call it
    m = value_diagnostic(
        plain, PROBLEMS, GoldLabeler(LabelOracle()), num_samples=3, sandbox=ConstantSandbox(),
        use_value=False, progress=False,
    ).metrics  # fmt: skip
    assert m["within_group_accuracy"] is None and m["top1_accuracy"] is None and m["value_auc"] is None
    assert m["prior_within_group_accuracy"] == pytest.approx(0.0) and m["oracle_ceiling"] == pytest.approx(
        0.5
    )


def test_ties_count_half_and_states_are_grouped_by_parent():
    groups = [
        {"candidates": [{"on_track": True, "value": 0.5, "prior": 0.5}, {"on_track": False, "value": 0.5, "prior": 0.1}]},
        {"candidates": [{"on_track": False, "value": 0.9, "prior": 0.9}]},
    ]  # fmt: skip
    m = group_metrics(groups)
    assert m["within_group_accuracy"] == pytest.approx(0.5) and m["prior_within_group_accuracy"] == 1.0
    assert m["top1_accuracy"] == 1.0  # the first of equal values is the on-track one
    assert m["mixed_groups"] == 1 and m["groups"] == 2


def test_rollout_labels_match_the_outcomes():
    scripted = backend()
    sampler = StepSampler(scripted, sandbox=ConstantSandbox())
    labeler = RolloutLabeler(scripted, num_rollouts=2, sampler=sampler, temperature=0.6)
    prompt = F.prompt("Q")
    [cg, cb, aw] = sampler.next_steps([State(prompt)], n=3, temperature=0.6)[0]
    states = [State(prompt, [cg]), State(prompt, [cb]), State(prompt, [aw])]
    # CG's rollouts answer 7 (A7 is its first completion), CB's answer 8, AW is terminal and wrong.
    assert labeler.label([PROBLEMS[0]] * 3, states) == [True, False, False]
    assert labeler.tokens_generated > 0
    assert len(scripted.calls[-1]) == 4  # two rollouts for each of the two open states, in one call
    with pytest.raises(ValueError, match="num_rollouts"):
        RolloutLabeler(scripted, num_rollouts=0)


def test_auto_labels_pick_the_toy_oracle_or_rollouts():
    from svpo_trl.toy.task import load_toy_problems
    from svpo_trl.value_diagnostic import make_labeler

    toy = [dict(r) for r in load_toy_problems("test", 3)]
    assert isinstance(make_labeler("auto", toy, backend()), GoldLabeler)
    assert isinstance(make_labeler("auto", PROBLEMS, backend()), RolloutLabeler)
    with pytest.raises(ValueError, match="toy task only"):
        make_labeler("gold", PROBLEMS, backend())
    with pytest.raises(ValueError, match="auto, gold or rollout"):
        make_labeler("perfect", PROBLEMS, backend())
