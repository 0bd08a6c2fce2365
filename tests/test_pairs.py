"""Algorithm 1 on hand-built trees: every branch, and the Eq. 7 value rows."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from svpo_trl.search.pairs import extract_preference_pairs, is_negative, question_preference_pairs, value_rows
from svpo_trl.search.tree import Tree


def _node(tree, parent, text, q=0.0, reward=None):
    node = tree.add_child(parent, text=text, is_terminal=reward is not None)
    node.q_value, node.reward = q, reward
    if reward is not None:
        node.visit_count = 1
    return node


def mixed_tree():
    """root ─ a (Q .5) ─ a1 (+1), a2 (-1);  b (Q -.5) ─ b1 (-1), b2 (Q 0);  c (-1 at depth 1)."""
    t = Tree("P:")
    a = _node(t, t.root, "a;", q=0.5)
    b = _node(t, t.root, "b;", q=-0.5)
    _node(t, t.root, "c;", q=-1.0, reward=-1.0)
    _node(t, a, "a1;", q=1.0, reward=1.0)
    _node(t, a, "a2;", q=-1.0, reward=-1.0)
    _node(t, b, "b1;", q=-1.0, reward=-1.0)
    _node(t, b, "b2;", q=0.0)
    return t  # node ids: root 0, a 1, b 2, c 3, a1 4, a2 5, b1 6, b2 7


def evidence_tree():
    """root ─ a (correct) ─ a1 (+1); siblings of a: u (never visited: N 0, Q 0), e (expanded once, all
    children non-terminal: N 1, Q 0), r (refuted: N 3, Q -1/3), w (a wrong answer, -1)."""
    t = Tree("P:")
    a = _node(t, t.root, "a;", q=1.0)
    a.visit_count = 1
    _node(t, a, "a1;", q=1.0, reward=1.0)
    _node(t, t.root, "u;")
    e = _node(t, t.root, "e;")
    e.visit_count = 1
    r = _node(t, t.root, "r;", q=-1 / 3)
    r.visit_count = 3
    _node(t, t.root, "w;", q=-1.0, reward=-1.0)
    return t  # ids: root 0, a 1, a1 2, u 3, e 4, r 5, w 6


def _edges(pairs):
    return {(p["pair_type"], p["chosen_node_id"], p["rejected_node_id"]) for p in pairs}


def test_every_pair_type_with_paper_defaults():
    pairs = extract_preference_pairs(mixed_tree(), question_id="q", rng=random.Random(0))
    edges = _edges(pairs)
    assert len(pairs) == 6
    # Layer 1 (chosen a): both non-correct siblings, no cousin exists, one terminal at depth 2.
    assert {("sibling", 1, 2), ("sibling", 1, 3)} <= edges
    assert len(edges & {("terminal", 1, 5), ("terminal", 1, 6)}) == 1
    # Layer 2 (chosen a1): sibling a2, one cousin under b, the depth-1 terminal c.
    assert ("sibling", 4, 5) in edges and ("terminal", 4, 3) in edges
    assert len(edges & {("cousin", 4, 6), ("cousin", 4, 7)}) == 1
    assert Counter(p["pair_type"] for p in pairs) == {"sibling": 3, "cousin": 1, "terminal": 2}


def test_pair_rows_hold_partial_solutions_and_eq7_labels():
    pairs = extract_preference_pairs(mixed_tree(), question_id="q7", tree_index=3, rng=random.Random(0))
    row = next(p for p in pairs if p["pair_type"] == "sibling" and p["chosen_node_id"] == 4)
    assert row["prompt"] == "P:"
    assert row["chosen"] == "a;a1;" and row["rejected"] == "a;a2;"  # siblings share all but the last step
    assert (row["chosen_value"], row["rejected_value"]) == (1.0, -1.0)  # R on terminals
    assert row["tree_index"] == 3 and row["rejected_tree_index"] == 3
    assert row["id"] == "q7/3/4-3/5"
    row = next(p for p in pairs if p["pair_type"] == "sibling" and p["rejected_node_id"] == 2)
    assert (row["chosen"], row["rejected"]) == ("a;", "b;")
    assert (row["chosen_value"], row["rejected_value"]) == (0.5, -0.5)  # Q on non-terminals


def test_counts_are_configurable_and_zero_disables_a_type():
    pairs = extract_preference_pairs(
        mixed_tree(), num_sibling=1, num_cousin=0, num_terminal=0, rng=random.Random(0)
    )
    assert [p["pair_type"] for p in pairs] == ["sibling", "sibling"]
    assert pairs[1]["rejected_node_id"] == 5


def test_random_choices_are_seeded():
    def run(seed):
        return extract_preference_pairs(mixed_tree(), num_sibling=1, rng=random.Random(seed))

    assert run(3) == run(3)
    first_sibling = {run(seed)[0]["rejected_node_id"] for seed in range(20)}
    assert first_sibling == {2, 3}  # both siblings get drawn over seeds


def test_chosen_is_the_best_q_correct_child_ties_to_first():
    def build(q_y):
        t = Tree("P:")
        x = _node(t, t.root, "x;", q=0.2)
        y = _node(t, t.root, "y;", q=q_y)
        _node(t, t.root, "z;", q=-1.0, reward=-1.0)
        _node(t, x, "x1;", q=1.0, reward=1.0)
        _node(t, y, "y1;", q=1.0, reward=1.0)
        return t  # root 0, x 1, y 2, z 3, x1 4, y1 5

    pairs = extract_preference_pairs(build(0.8), rng=random.Random(0))
    # y (best Q) then y1; x and x1 are correct, so never negatives.
    assert _edges(pairs) == {("sibling", 2, 3), ("terminal", 5, 3)}
    pairs = extract_preference_pairs(build(0.2), rng=random.Random(0))
    assert _edges(pairs) == {("sibling", 1, 3), ("terminal", 4, 3)}  # tie: x was created first


def test_no_pairs_without_correct_or_without_incorrect_nodes():
    no_correct = Tree("P:")
    a = _node(no_correct, no_correct.root, "a;")
    _node(no_correct, a, "a1;", q=-1.0, reward=-1.0)
    _node(no_correct, no_correct.root, "b;", q=-1.0, reward=-1.0)
    assert extract_preference_pairs(no_correct, rng=random.Random(0)) == []

    all_correct = Tree("P:")
    a = _node(all_correct, all_correct.root, "a;", q=1.0)
    _node(all_correct, a, "a1;", q=1.0, reward=1.0)
    assert extract_preference_pairs(all_correct, rng=random.Random(0)) == []
    assert [n.correct for n in all_correct] == [True, True, True]


def test_borrowing_a_negative_from_another_tree():
    all_correct = Tree("P:")
    a = _node(all_correct, all_correct.root, "a;", q=1.0)
    _node(all_correct, a, "a1;", q=1.0, reward=1.0)
    other = Tree("P:")
    _node(other, other.root, "w;", q=-1.0, reward=-1.0)  # depth 1
    trees = [all_correct, other]
    pairs = question_preference_pairs(trees, question_id="q", rng=random.Random(0), borrow_negatives=True)
    assert [(p["pair_type"], p["chosen_node_id"], p["rejected_node_id"]) for p in pairs] == [
        ("cousin", 1, 1),  # same depth as the chosen a
        ("terminal", 2, 1),  # a1 sits at depth 2
    ]
    assert all(p["tree_index"] == 0 and p["rejected_tree_index"] == 1 for p in pairs)
    assert pairs[1]["chosen"] == "a;a1;" and pairs[1]["rejected"] == "w;"
    assert question_preference_pairs(trees, question_id="q", rng=random.Random(0)) == []


def test_value_rows_one_per_distinct_terminal_path():
    t = mixed_tree()
    rows = value_rows([t, mixed_tree()], question_id="q")
    assert [r["steps"] for r in rows] == [["c;"], ["a;", "a1;"], ["a;", "a2;"], ["b;", "b1;"]]
    assert [r["step_values"] for r in rows] == [[-1.0], [0.5, 1.0], [0.5, -1.0], [-0.5, -1.0]]
    assert [r["correct"] for r in rows] == [False, True, False, False]
    assert rows[1]["id"] == "q/0/4" and rows[1]["prompt"] == "P:"


@pytest.mark.parametrize(
    ("rule", "rejected"),
    [("all", {3, 4, 5, 6}), ("explored", {4, 5, 6}), ("refuted", {5, 6})],
)
def test_negative_rules_decide_which_siblings_are_rejected(rule, rejected):
    tree = evidence_tree()
    tree.label_correct()
    assert {n.node_id for n in tree.nodes if is_negative(n, rule)} == rejected
    pairs = extract_preference_pairs(tree, num_sibling=10, num_cousin=0, num_terminal=0, negatives=rule)
    assert {p["rejected_node_id"] for p in pairs if p["chosen_node_id"] == 1} == rejected


def test_unknown_negative_rule_is_refused():
    with pytest.raises(ValueError, match="negatives"):
        extract_preference_pairs(evidence_tree(), negatives="unvisited")


def test_no_pair_prefers_a_step_to_itself():
    # Trees written before identical samples were merged hold duplicate siblings: the unvisited copy of the
    # chosen step is not correct, but it is the same step and must never be its negative.
    t = Tree("P:")
    a = _node(t, t.root, "a;", q=1.0)
    _node(t, a, "a1;", q=1.0, reward=1.0)
    _node(t, t.root, "a;")  # the duplicate, never visited
    _node(t, t.root, "b;", q=-1.0, reward=-1.0)
    pairs = extract_preference_pairs(t, num_sibling=10, num_cousin=10, num_terminal=10, negatives="all")
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    assert {p["rejected"] for p in pairs if p["chosen"] == "a;"} == {"b;"}
