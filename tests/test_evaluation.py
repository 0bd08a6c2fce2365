"""Evaluation harness: strategies, grading, maj@k voting, records, the Table 2-shaped markdown table."""

from __future__ import annotations

import json

import pytest

from svpo_trl.errors import UsageError
from svpo_trl.evaluation import Strategy, evaluate, majority_vote, results_table, summary_row
from svpo_trl.search.testing import ScriptedBackend
from svpo_trl.steps import DEFAULT_FORMAT as F

Q1, Q2 = "What is 6 * 7?", "What is 2 + 2?"
CODE = "<step>\n<p>\nMultiply.\n</p>\n<code>\n```python\nprint(6 * 7)\n```\n</code>"
RIGHT = "<step>\n<p>\nDone.\n</p>\n<p>\nFinal Answer: $42$\n</p>\n</step>"
WRONG = "<step>\n<p>\nDone.\n</p>\n<p>\nFinal Answer: $41$\n</p>\n</step>"
FOUR = "<step>\n<p>\nEasy.\n</p>\n<p>\nFinal Answer: $4$\n</p>\n</step>"
FIVE = "<step>\n<p>\nEasy.\n</p>\n<p>\nFinal Answer: $5$\n</p>\n</step>"

PROBLEMS = [
    {"id": "p/0", "question": Q1, "answer": "42"},
    {"id": "p/1", "question": Q2, "answer": "4"},
]


class FakeSandbox:
    """Runs the arithmetic snippets of these tests in-process (the real sandbox has its own tests)."""

    def run_many(self, snippet_lists, max_workers=None):
        from svpo_trl.sandbox import ExecResult

        return [ExecResult(stdout="42", error=None, timed_out=False) for _ in snippet_lists]


def script(prompt: str):
    after_code = F.prompt(Q1) + F.close_step(CODE, "42")
    table = {
        # Greedy takes the first entry: code, then the wrong answer. Sampling cycles through them.
        F.prompt(Q1): [(CODE, 0.9)],
        after_code: [(WRONG, 0.9), (RIGHT, 0.5), (RIGHT, 0.5)],
        F.prompt(Q2): [(FOUR, 0.9), (FIVE, 0.8), (FOUR, 0.7)],
    }
    return table[prompt]


def value_fn(text: str) -> float:
    if "$42$" in text or "$4$" in text:
        return 0.9
    if "$41$" in text or "$5$" in text:
        return -0.9
    return 0.1


def test_strategy_parse_and_labels():
    assert Strategy.parse("greedy") == Strategy("greedy")
    assert Strategy.parse("SBS(3, 5)") == Strategy("sbs", beam_width=3, num_samples=5)
    assert Strategy.parse("sbs:1x5").label == "SBS (B1=1, B2=5)"
    assert Strategy.parse("maj@8").k == 8
    with pytest.raises(ValueError, match="unknown strategy 'beam'"):
        Strategy.parse("beam")
    prior = Strategy.parse("sbs(1,5,prior)")
    assert (prior.ranker, prior.label, prior.slug, prior.needs_value) == (
        "prior",
        "SBS (B1=1, B2=5, prior)",
        "sbs1x5-prior",
        False,
    )
    both = Strategy.parse("sbs(3, 5, value+prior)")
    assert (both.slug, both.needs_value, both.sbs_config(8, 96).ranker) == (
        "sbs3x5-valueprior",
        True,
        "value+prior",
    )
    assert Strategy.parse("sbs(1,5)").ranker == "value" and Strategy.parse("sbs(1,5)").needs_value
    with pytest.raises(UsageError, match="strategy ranker 'vaue' unknown: expected one of value, prior"):
        Strategy.parse("sbs(1,5,vaue)")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "sbs(0,5)",
            r"SBS \(B1=0, B2=5\): the beam width B1 and the samples per beam B2 must both be at least 1",
        ),
        ("sbs(2,0)", r"SBS \(B1=2, B2=0\): the beam width B1"),
        ("maj@0", r"maj@0: k \(the number of sampled solutions\) must be at least 1"),
    ],
)
def test_strategy_parse_refuses_searches_that_cannot_run(text, message):
    """sbs(0,5) failed only after greedy had run on the whole set; maj@0 crashed with an IndexError."""
    with pytest.raises(UsageError, match=message):
        Strategy.parse(text)
    with pytest.raises(UsageError):
        Strategy("maj", k=0)


def test_greedy_takes_the_policy_path_and_grades_it(tmp_path):
    backend = ScriptedBackend(script, value_fn=value_fn)
    out = tmp_path / "greedy.jsonl"
    result = evaluate(backend, PROBLEMS, "greedy", sandbox=FakeSandbox(), output_jsonl=out, progress=False)
    first, second = result.records
    assert (first["answer"], first["correct"], first["num_steps"]) == ("41", False, 2)
    assert (second["answer"], second["correct"]) == ("4", True)
    assert result.metrics["accuracy"] == 0.5
    assert first["value"] is None  # greedy never calls the value head
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["p/0", "p/1"]
    assert lines[0]["solution"].endswith("Final Answer: $41$\n</p>\n</step>\n")


def test_sbs_uses_the_value_head_to_pick_the_right_answer():
    backend = ScriptedBackend(script, value_fn=value_fn)
    result = evaluate(backend, PROBLEMS, "sbs(1,3)", sandbox=FakeSandbox(), progress=False)
    assert [r["answer"] for r in result.records] == ["42", "4"]
    assert result.metrics["accuracy"] == 1.0
    assert result.records[0]["value"] == pytest.approx(0.9)
    assert result.records[0]["tokens"] > 0


def test_sbs_ranked_by_the_prior_runs_without_a_value_head():
    # No value_fn: any value call would raise. The prior (0.9) picks the wrong answer 41 after the code step,
    # where V picks 42: the ranker, not the sampling, decides.
    backend = ScriptedBackend(script)
    result = evaluate(backend, PROBLEMS, "sbs(1,3,prior)", sandbox=FakeSandbox(), progress=False)
    assert [r["answer"] for r in result.records] == ["41", "4"]
    assert result.strategy == "SBS (B1=1, B2=3, prior)"


def test_sbs_ranked_by_a_reference_policy_uses_the_ranker_it_is_given():
    """sbs(1,3,reference): the scores of the ranker passed in decide (here: the one that prefers 42, where the
    searching policy's own prior picks 41); without a ranker the strategy refuses to start."""
    reference = Strategy.parse("sbs(1,3,reference)")
    assert (reference.label, reference.slug, reference.needs_value, reference.needs_reference) == (
        "SBS (B1=1, B2=3, reference)",
        "sbs1x3-reference",
        False,
        True,
    )
    assert reference.sbs_config(8, 96).ranker == "prior" and not reference.sbs_config(8, 96).needs_value
    with pytest.raises(UsageError, match=r"reference policy's prior: pass ranker=PolicyPriorRanker"):
        evaluate(ScriptedBackend(script), PROBLEMS, reference, sandbox=FakeSandbox(), progress=False)

    def prefers_42(owners, candidates, values):
        return [1.0 if "42" in state.steps[-1].text else 0.0 for state in candidates]

    backend = ScriptedBackend(script)  # no value_fn: a value call would raise
    result = evaluate(backend, PROBLEMS, reference, sandbox=FakeSandbox(), progress=False, ranker=prefers_42)
    assert result.records[0]["answer"] == "42"  # the prior alone picks 41 here (the test above)


def test_maj_at_k_votes_over_equivalent_answers():
    # Each of the k samples is its own prompt in one batch: hand out 4, 5, 4 in turn, as sampling would.
    answers = iter([[(FOUR, 0.9)], [(FIVE, 0.8)], [(FOUR, 0.7)]])
    backend = ScriptedBackend(lambda prompt: next(answers), value_fn=value_fn)
    result = evaluate(backend, PROBLEMS[1:], "maj@3", sandbox=FakeSandbox(), progress=False)
    (record,) = result.records
    assert (record["answer"], record["votes"], record["correct"]) == ("4", 2, True)


def test_majority_vote_groups_equivalents_and_ignores_none():
    assert majority_vote(["0.5", "1/2", "\\frac{1}{2}", "3", None, None]) == ("0.5", 3)
    assert majority_vote(["2", "3"]) == ("2", 1)
    assert majority_vote([None]) == (None, 0)


def test_results_table_shape():
    backend = ScriptedBackend(script, value_fn=value_fn)
    greedy = evaluate(backend, PROBLEMS, "greedy", sandbox=FakeSandbox(), progress=False)
    sbs = evaluate(backend, PROBLEMS, "sbs(1,3)", sandbox=FakeSandbox(), progress=False)
    table = results_table([summary_row("SVPO", "toy", greedy), summary_row("SVPO", "toy", sbs)])
    lines = table.splitlines()
    assert lines[0] == "| System | Decoding | toy | tokens / question | seconds / question |"
    assert lines[2].startswith("| SVPO | greedy | 50.0 |")
    assert lines[3].startswith("| SVPO | SBS (B1=1, B2=3) | 100.0 |")
