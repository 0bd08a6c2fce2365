"""The value lab's metrics on hand-built groups, its group freezing, and candidate scoring on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from svpo_trl.search.tree import Tree
from svpo_trl.steps import DEFAULT_FORMAT
from svpo_trl.value_lab import (
    diagnostic_groups,
    flat_candidates,
    mixed_groups,
    ranking_metrics,
    score_candidates,
    tree_sibling_groups,
)


def _group(labels, prefix=()):
    return {
        "id": "g",
        "prompt": DEFAULT_FORMAT.prompt("q"),
        "prefix": list(prefix),
        "depth": len(prefix),
        "candidates": [{"text": f"s{i}", "label": lab} for i, lab in enumerate(labels)],
    }


GROUPS = [_group([True, False, False]), _group([True, False]), _group([True, True])]
SCORES = [0.9, 0.1, 0.5, 0.2, 0.8, 0.0, 1.0]


def test_ranking_metrics_on_hand_built_groups():
    m = ranking_metrics(GROUPS, SCORES, num_resamples=200)
    # group 0: the on-track step beats both off-track ones (2/2); group 1: it loses (0/1); group 2 is not mixed
    assert (m["groups"], m["mixed_groups"], m["pairs"]) == (3, 2, 3)
    assert m["within_group"] == pytest.approx(2 / 3)
    assert m["top1"] == pytest.approx(0.5)
    # pooled AUC: on-track {0.9, 0.2, 0.0, 1.0} vs off-track {0.1, 0.5, 0.8}: 3 + 1 + 0 + 3 = 7 of 12 pairs
    assert m["auc"] == pytest.approx(7 / 12)
    assert m["within_group_low"] <= m["within_group"] <= m["within_group_high"]
    assert m["within_group_low"] >= 0.0 and m["within_group_high"] <= 1.0
    assert m["auc_low"] <= m["auc_high"]


def test_ties_count_half_and_reversed_scores_mirror():
    m = ranking_metrics([_group([True, False])], [0.5, 0.5], num_resamples=10)
    assert m["within_group"] == 0.5 and m["auc"] == 0.5
    flipped = ranking_metrics(GROUPS, [-s for s in SCORES], num_resamples=10)
    assert flipped["within_group"] == pytest.approx(1 - 2 / 3)
    assert flipped["auc"] == pytest.approx(1 - 7 / 12)


def test_wrong_number_of_scores_is_refused():
    with pytest.raises(ValueError, match="6 scores for 7 candidates"):
        ranking_metrics(GROUPS, SCORES[:-1])


def test_no_mixed_group_gives_nan_not_a_crash():
    m = ranking_metrics([_group([True, True])], [0.1, 0.2], num_resamples=10)
    assert m["mixed_groups"] == 0 and math.isnan(m["within_group"]) and math.isnan(m["auc"])


class _Oracle:
    """On track iff every step text so far starts with 'ok'."""

    def on_track(self, prompt, steps):
        return all(s.startswith("ok") for s in steps)


def _tree_row():
    tree = Tree(DEFAULT_FORMAT.prompt("what?"))
    a = tree.add_child(tree.root, text="ok1", prior=0.7)
    b = tree.add_child(tree.root, text="bad1", prior=0.9)
    tree.add_child(a, text="ok2", prior=0.5)
    c = tree.add_child(a, text="bad2", prior=0.4)
    a.q_value, b.q_value, c.q_value = -0.5, 0.0, 0.25
    a.visit_count, b.visit_count, c.visit_count = 3, 0, 1
    tree.label_correct()
    return {"id": "p", "question": "what?", "tree_index": 0, "nodes": tree.to_nodes()}


def test_tree_sibling_groups_keep_q_visits_and_gold_labels():
    groups = tree_sibling_groups([_tree_row()], _Oracle())
    assert [g["prefix"] for g in groups] == [[], ["ok1"]]
    first = groups[0]["candidates"]
    assert [c["text"] for c in first] == ["ok1", "bad1"]
    assert [c["label"] for c in first] == [True, False]
    assert [c["q"] for c in first] == [-0.5, 0.0] and [c["visits"] for c in first] == [3, 0]
    # the Eq. 7 label orders this gold pair the wrong way: the unvisited off-track child keeps Q = 0
    assert first[0]["target"] < first[1]["target"]
    assert [c["label"] for c in groups[1]["candidates"]] == [True, False]
    assert mixed_groups(groups) == [0, 1]
    # without an oracle the label is Algorithm 1's (no correct terminal here: nothing is on track)
    assert all(not c["label"] for g in tree_sibling_groups([_tree_row()]) for c in g["candidates"])


def test_diagnostic_groups_need_the_state_and_drop_duplicate_texts():
    record = {
        "id": "t1",
        "groups": [
            {
                "prompt": "P",
                "prefix": ["a"],
                "depth": 2,
                "candidates": [
                    {"text": "x", "on_track": True, "prior": 0.5, "value": 0.1},
                    {"text": "x", "on_track": True, "prior": 0.5, "value": 0.1},
                    {"text": "y", "on_track": False, "prior": 0.4, "value": 0.3},
                ],
            }
        ],
    }
    [group] = diagnostic_groups([record])
    assert [c["text"] for c in group["candidates"]] == ["x", "y"] and group["prefix"] == ["a"]
    del record["groups"][0]["prompt"]
    with pytest.raises(ValueError, match="'t1', group 0"):
        diagnostic_groups([record])


def test_score_candidates_matches_a_direct_forward(tiny_model, tiny_tokenizer):
    from svpo_trl.models.value_head import ValueHeadForCausalLM
    from svpo_trl.tokenization import tokenize_solution

    from conftest import randomize_value_head

    model = randomize_value_head(ValueHeadForCausalLM.from_causal_lm(tiny_model))
    step1 = DEFAULT_FORMAT.render_code_step("add", "print(3 + 4)", "7")
    groups = [
        {
            "id": "g",
            "prompt": DEFAULT_FORMAT.prompt("What is 3 + 4?"),
            "prefix": [step1],
            "depth": 1,
            "candidates": [
                {"text": DEFAULT_FORMAT.render_answer_step("so", "7"), "label": True},
                {"text": DEFAULT_FORMAT.render_code_step("mul", "print(3 * 4)", "12"), "label": False},
            ],
        }
    ]
    out = score_candidates(
        model, tiny_tokenizer, groups, batch_size=1, hidden_layers=(-1,), token_states=True
    )
    flat, _ = flat_candidates(groups)
    for i, c in enumerate(flat):
        tok = tokenize_solution(tiny_tokenizer, groups[0]["prompt"], [step1, c["text"]], add_eos=False)
        ids = torch.tensor([tok.input_ids])
        with torch.no_grad():
            result = model(input_ids=ids)
        logp = torch.log_softmax(result.logits[0].float(), -1)
        positions = [p for p in range(tok.step_ends[0] + 1, tok.step_ends[1] + 1) if tok.completion_mask[p]]
        if i == 0:  # the answer step's last newline is the sampler's, not the policy's: not in its log-prob
            assert tiny_tokenizer.decode([tok.input_ids[positions[-1]]]) == "\n"
            positions = positions[:-1]
        expected = sum(float(logp[p - 1, tok.input_ids[p]]) for p in positions)
        assert out["logp_sum"][i] == pytest.approx(expected, abs=1e-4)
        assert out["num_tokens"][i] == len(positions)
        assert out["value"][i] == pytest.approx(float(result.values[0, tok.step_ends[1]]), abs=1e-5)
        assert out["tokens"][i].shape == (len(positions), model.config.hidden_size)
    # the code step's environment part (the output block) is not the model's: fewer tokens than the text
    assert out["hidden_end"][-1].shape == (2, model.config.hidden_size)


def test_policy_prior_ranker_scores_each_step_under_its_own_model(tiny_model, tiny_tokenizer):
    import math as _math

    from svpo_trl.search.rankers import PolicyPriorRanker
    from svpo_trl.search.sbs import SBSConfig, SBSGenerator
    from svpo_trl.search.state import State
    from svpo_trl.search.testing import ScriptedBackend

    prompt = DEFAULT_FORMAT.prompt("What is 3 + 4?")
    steps = [DEFAULT_FORMAT.render_answer_step("add", "7"), DEFAULT_FORMAT.render_answer_step("mul", "12")]
    ranker = PolicyPriorRanker(tiny_model, tiny_tokenizer)
    parsed = [DEFAULT_FORMAT.parse(s) for s in steps]
    scores = ranker([0, 0], [State(prompt, [p]) for p in parsed], [None, None])
    groups = [{"prompt": prompt, "prefix": [], "candidates": [{"text": s} for s in steps]}]
    expected = score_candidates(tiny_model, tiny_tokenizer, groups)
    assert scores == pytest.approx(list(expected["prob_mean"]))
    assert all(0 < s < 1 and not _math.isnan(s) for s in scores)
    # SBS keeps the step the other policy finds likelier, whatever the searching policy's own prior says
    backend = ScriptedBackend({prompt: [(steps[0].rstrip("\n"), 0.5), (steps[1].rstrip("\n"), 0.5)]})

    class _Sandbox:
        def run_many(self, snippet_lists, max_workers=None):
            return []

    config = SBSConfig(num_samples=2, ranker="prior")
    [result] = SBSGenerator(backend, config, sandbox=_Sandbox()).generate(["What is 3 + 4?"], ranker=ranker)
    assert result.final_answer == ("7" if scores[0] > scores[1] else "12")


def _benchmark(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_training_sets_are_whole_questions_in_order():
    scale = _benchmark("value_lab_scale")
    groups = [{"id": f"toy-annotate-{q}/{k}"} for q, ks in ((0, 3), (1, 1), (2, 2)) for k in range(ks)]
    assert [g["id"] for g in scale.first_questions(groups, 2)] == [
        "toy-annotate-0/0",
        "toy-annotate-0/1",
        "toy-annotate-0/2",
        "toy-annotate-1/0",
    ]
    assert len(scale.first_questions(groups, 10)) == 6


def test_pairwise_head_learns_a_separable_within_group_order():
    """The lab's pairwise loss on frozen features: a feature that marks the on-track sibling is learned,
    and the learned head ranks fresh groups with it (a head that learned nothing would score 0.5)."""
    lab = _benchmark("value_lab")
    gen = torch.Generator().manual_seed(0)
    groups = [_group([True, False, False]) for _ in range(40)]
    labels = torch.tensor([c["label"] for c in flat_candidates(groups)[0]], dtype=torch.float)
    features = torch.randn(len(labels), 8, generator=gen)
    features[:, 3] += 3.0 * labels
    inputs = lambda idx: (features[idx],)  # noqa: E731
    target = lab._target(groups, "gold")
    head = lab.train_head(lab._make("linear", 8), inputs, groups, "pairwise", target, epochs=200, lr=3e-2)
    fresh = torch.randn(len(labels), 8, generator=gen)
    fresh[:, 3] += 3.0 * labels
    scores = head(fresh).detach().numpy()
    assert ranking_metrics(groups, scores, num_resamples=1)["within_group"] > 0.85
