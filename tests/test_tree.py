"""Search trees: PUCT (Eq. 4) with its tie-breaking, backup (Eq. 6), exhaustion, serialization."""

from __future__ import annotations

import math

import pytest

from svpo_trl.search.tree import NODE_FIELDS, OPTIONAL_NODE_FIELDS, Tree


def _tree_with_children(priors):
    tree = Tree("<question>q</question>\n")
    children = [tree.add_child(tree.root, text=f"s{i}", prior=p) for i, p in enumerate(priors)]
    return tree, children


def test_backup_is_running_mean_along_path():
    tree, (a, _) = _tree_with_children([0.5, 0.5])
    a1 = tree.add_child(a, text="t", is_terminal=True)
    tree.backup(a1, 1.0)
    tree.backup(a, 0.0)
    tree.backup(a1, -1.0)
    # a1 saw 1, -1; a saw 1, 0, -1; the root saw the same three values.
    assert (a1.visit_count, a1.q_value) == (2, 0.0)
    assert (a.visit_count, a.q_value) == (3, 0.0)
    assert (tree.root.visit_count, tree.root.q_value) == (3, 0.0)
    tree.backup(a, 1.0)
    assert a.q_value == pytest.approx(0.25)
    assert tree.root.q_value == pytest.approx(0.25)


def test_puct_eq4_value_and_selection():
    tree, (a, b, c) = _tree_with_children([0.2, 0.9, 0.5])
    tree.root.visit_count = 4
    a.visit_count, a.q_value = 1, 0.5
    b.visit_count, b.q_value = 3, -0.2
    # Eq. 4 by hand: Q + 1.25 * prior * sqrt(4) / (1 + N)
    assert tree.puct(a, 1.25) == pytest.approx(0.5 + 1.25 * 0.2 * 2 / 2)  # 0.75
    assert tree.puct(b, 1.25) == pytest.approx(-0.2 + 1.25 * 0.9 * 2 / 4)  # 0.3625
    assert tree.puct(c, 1.25) == pytest.approx(1.25 * 0.5 * 2 / 1)  # 1.25
    assert tree.select_leaf(1.25) is c
    # Without exploration, the best Q wins.
    assert tree.select_leaf(0.0) is a


def test_puct_ties_go_to_the_first_created_child():
    tree, children = _tree_with_children([0.5, 0.5, 0.5])
    tree.root.visit_count = 1
    assert tree.select_child(tree.root, 1.25) is children[0]
    children[0].exhausted = True
    assert tree.select_child(tree.root, 1.25) is children[1]


def test_selection_skips_terminals_and_marks_exhausted_subtrees():
    tree = Tree("p")
    assert tree.select_leaf(1.25) is tree.root  # a fresh tree expands its root first
    a = tree.add_child(tree.root, text="a", prior=1.0)
    b = tree.add_child(tree.root, text="b", prior=0.1, is_terminal=True)
    tree.backup(b, 1.0)  # a terminal with the best Q is still never selected
    assert tree.select_leaf(1.25) is a
    tree.add_child(a, text="a1", is_terminal=True)
    tree.add_child(a, text="a2", is_terminal=True)
    assert tree.select_leaf(1.25) is None
    assert a.exhausted and tree.root.exhausted


def test_paths_partial_solutions_and_labels():
    tree = Tree("P:")
    a = tree.add_child(tree.root, text="A;")
    b = tree.add_child(tree.root, text="B;", is_terminal=True, final_answer="3")
    a1 = tree.add_child(a, text="A1;", is_terminal=True, final_answer="7")
    b.reward, a1.reward = -1.0, 1.0
    assert [n.node_id for n in tree.path(a1)] == [1, 3]
    assert tree.partial_solution(a1) == "A;A1;"
    assert (a1.depth, a.depth, tree.root.depth) == (2, 1, 0)
    tree.label_correct()
    assert [n.correct for n in tree] == [True, True, False, True]
    assert tree.num_correct_terminals() == 1
    assert a1.value_label == 1.0 and b.value_label == -1.0


def test_round_trip_through_node_rows():
    tree = Tree("P:")
    a = tree.add_child(tree.root, text="A;", prior=0.25)
    b = tree.add_child(a, text="B;", prior=0.5, is_terminal=True, final_answer="12")
    b.reward = 1.0
    tree.backup(b, 1.0)
    tree.backup(a, 0.0)
    tree.label_correct()
    rows = tree.to_nodes()
    assert set(rows[0]) == set(NODE_FIELDS) | set(OPTIONAL_NODE_FIELDS)
    assert rows[0]["parent_id"] == -1 and rows[0]["text"] == ""
    rebuilt = Tree.from_nodes("P:", rows)
    assert rebuilt.to_nodes() == rows
    # Rows written before num_samples existed load with its default (one sample per child).
    old = [{k: v for k, v in row.items() if k != "num_samples"} for row in rows]
    assert Tree.from_nodes("P:", old).to_nodes() == rows
    assert rebuilt[1].children == [2] and rebuilt.partial_solution(rebuilt[2]) == "A;B;"
    assert math.isclose(rebuilt[1].q_value, 0.5)


def test_from_nodes_rejects_bad_rows():
    rows = Tree("P:").to_nodes()
    bad = dict(rows[0], node_id=0)
    del bad["q_value"]
    with pytest.raises(ValueError, match="node row 0 lacks field"):
        Tree.from_nodes("P:", [bad])
    child = dict(rows[0], node_id=1, parent_id=5, depth=1)
    with pytest.raises(ValueError, match="node 1 has parent_id 5"):
        Tree.from_nodes("P:", [rows[0], child])
