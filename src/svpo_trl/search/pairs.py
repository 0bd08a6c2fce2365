"""Step-level preference pairs (Algorithm 1, Appendix A.2) and value labels (Eq. 7) from search trees.

Algorithm 1, per tree:

1. (lines 2-4) label every node on a path from the root to a correct terminal as correct;
2. (lines 5-23) from the root, layer by layer: the chosen node n_w is the correct child of the
   current node with the highest Q (ties: the child created first); pair it with up to
   ``num_sibling`` non-correct children of the same parent (``"sibling"``), up to ``num_cousin``
   non-correct nodes at the depth of n_w under another parent (``"cousin"``) and up to
   ``num_terminal`` non-correct terminal nodes at another depth (``"terminal"``), each drawn at
   random; then descend into n_w until it is terminal.
3. (line 22, optional) when a layer finds no negative at all, borrow an incorrect terminal from
   another tree of the same question.

A tree without a correct terminal gives no pairs. Which non-correct nodes may be negatives is
``negatives`` (:data:`NEGATIVE_RULES`):

- ``"all"``: any node not labeled correct, explored or not (Algorithm 1 as written);
- ``"explored"``: a non-correct node the search visited (N >= 1): a terminal, or a node that was
  expanded and whose subtree produced no correct answer;
- ``"refuted"``: a non-correct node with Q < 0: a wrong terminal, or a node whose subtree search
  found wrong answers and no right one.

A never-visited child has Q = 0 and N = 0: nothing is known about it except that it was sampled,
and §3.1 prefers "the step with the larger Q-value". Labelled against the toy task's gold steps,
such negatives are often right steps (see docs/annotation.md for the measurement).
No pair ever has the same text on both sides.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from .tree import Node, Tree

PAIR_TYPES = ("sibling", "cousin", "terminal")
NEGATIVE_RULES = ("all", "explored", "refuted")


def is_negative(node: Node, rule: str) -> bool:
    """Whether a node may be the rejected side of a pair under ``rule`` (see the module docstring)."""
    if node.correct:
        return False
    if rule == "all":
        return True
    if rule == "explored":
        return node.visit_count > 0
    if rule == "refuted":
        return node.visit_count > 0 and node.value_label < 0
    raise ValueError(f"unknown negatives rule {rule!r}: expected one of {NEGATIVE_RULES}")


def _pair_row(
    question_id: str,
    tree: Tree,
    tree_index: int,
    chosen: Node,
    rejected: Node,
    pair_type: str,
    rejected_tree: Tree | None = None,
    rejected_tree_index: int | None = None,
) -> dict[str, Any]:
    rejected_tree = rejected_tree if rejected_tree is not None else tree
    rejected_tree_index = tree_index if rejected_tree_index is None else rejected_tree_index
    return {
        "id": f"{question_id}/{tree_index}/{chosen.node_id}-{rejected_tree_index}/{rejected.node_id}",
        "prompt": tree.prompt,
        "chosen": tree.partial_solution(chosen),
        "rejected": rejected_tree.partial_solution(rejected),
        "chosen_value": chosen.value_label,
        "rejected_value": rejected.value_label,
        "pair_type": pair_type,
        "tree_index": tree_index,
        "chosen_node_id": chosen.node_id,
        "rejected_node_id": rejected.node_id,
        "rejected_tree_index": rejected_tree_index,
    }


def _sample(rng: random.Random, candidates: list[Node], k: int) -> list[Node]:
    if k <= 0 or not candidates:
        return []
    return rng.sample(candidates, min(k, len(candidates)))


def extract_preference_pairs(
    tree: Tree,
    *,
    question_id: str = "",
    tree_index: int = 0,
    num_sibling: int = 2,
    num_cousin: int = 1,
    num_terminal: int = 1,
    rng: random.Random | None = None,
    other_trees: Sequence[tuple[int, Tree]] = (),
    borrow_negatives: bool = False,
    negatives: str = "all",
) -> list[dict[str, Any]]:
    """Algorithm 1 on one tree: step-level preference pairs as rows of the ``pairs`` dataset.

    Args:
        tree: a finished search tree (terminal rewards set). Its nodes' ``correct`` labels are
            (re)computed here.
        question_id, tree_index: identify the pairs (``id``, ``tree_index`` columns).
        num_sibling: negatives per layer among the chosen node's siblings (paper: 2).
        num_cousin: negatives per layer at the chosen node's depth under another parent (paper: 1).
        num_terminal: incorrect terminals per layer at another depth (paper: 1).
        rng: the source of the random choices (seeded by the caller for reproducibility).
        other_trees: ``(tree_index, tree)`` of the same question, for ``borrow_negatives``.
        borrow_negatives: line 22 of Algorithm 1: when a layer finds no negative, pair the chosen
            node with a random incorrect terminal of another tree (typed ``"terminal"`` or, at the
            same depth, ``"cousin"``; ``rejected_tree_index`` names its tree).
        negatives: which non-correct nodes may be rejected: ``"all"``, ``"explored"`` or
            ``"refuted"`` (see :func:`is_negative`).

    Returns:
        Rows with ``id, prompt, chosen, rejected, chosen_value, rejected_value, pair_type,
        tree_index, chosen_node_id, rejected_node_id, rejected_tree_index``; ``*_value`` is the
        Eq. 7 label (Q, or R on terminals).
    """
    rng = rng if rng is not None else random.Random(0)
    if negatives not in NEGATIVE_RULES:
        raise ValueError(f"unknown negatives rule {negatives!r}: expected one of {NEGATIVE_RULES}")
    tree.label_correct()
    if not tree.root.correct:
        return []
    pairs: list[dict[str, Any]] = []
    node = tree.root
    while not node.is_terminal:
        correct_children = [c for c in tree.children(node) if c.correct]
        if not correct_children:
            break
        chosen = max(correct_children, key=lambda c: (c.q_value, -c.node_id))
        chosen_text = tree.partial_solution(chosen)

        def negative(n: Node, chosen_text: str = chosen_text) -> bool:
            return is_negative(n, negatives) and tree.partial_solution(n) != chosen_text

        siblings = [c for c in tree.children(node) if negative(c)]
        cousins = [
            n for n in tree.nodes_at_depth(chosen.depth) if n.parent_id != node.node_id and negative(n)
        ]
        terminals = [n for n in tree.terminals() if n.depth != chosen.depth and negative(n)]
        found = 0
        for pair_type, candidates, k in (
            ("sibling", siblings, num_sibling),
            ("cousin", cousins, num_cousin),
            ("terminal", terminals, num_terminal),
        ):
            for rejected in _sample(rng, candidates, k):
                pairs.append(_pair_row(question_id, tree, tree_index, chosen, rejected, pair_type))
                found += 1
        if found == 0 and borrow_negatives:
            borrowed = [
                (index, other, n)
                for index, other in other_trees
                if other is not tree
                for n in other.terminals()
                if n.reward is not None and n.reward <= 0 and other.partial_solution(n) != chosen_text
            ]
            if borrowed:
                index, other, rejected = borrowed[rng.randrange(len(borrowed))]
                pair_type = "cousin" if rejected.depth == chosen.depth else "terminal"
                pairs.append(
                    _pair_row(question_id, tree, tree_index, chosen, rejected, pair_type, other, index)
                )
        node = chosen
    return pairs


def question_preference_pairs(
    trees: Sequence[Tree],
    *,
    question_id: str,
    rng: random.Random,
    num_sibling: int = 2,
    num_cousin: int = 1,
    num_terminal: int = 1,
    borrow_negatives: bool = False,
    negatives: str = "all",
) -> list[dict[str, Any]]:
    """Algorithm 1 over all trees of one question, in tree order, sharing one seeded ``rng``."""
    indexed = list(enumerate(trees))
    pairs: list[dict[str, Any]] = []
    for index, tree in indexed:
        pairs.extend(
            extract_preference_pairs(
                tree,
                question_id=question_id,
                tree_index=index,
                num_sibling=num_sibling,
                num_cousin=num_cousin,
                num_terminal=num_terminal,
                rng=rng,
                other_trees=indexed,
                borrow_negatives=borrow_negatives,
                negatives=negatives,
            )
        )
    return pairs


def value_rows(trees: Sequence[Tree], *, question_id: str) -> list[dict[str, Any]]:
    """Eq. 7 training rows: one per distinct root-to-terminal path over the question's trees.

    Every terminal node (correct, incorrect, malformed or cut at the depth limit) gives the path
    from the root to it; ``step_values`` holds each step's label V̂ (Q of the node, or R on the
    terminal step); ``correct`` is R > 0. Paths whose step texts repeat an earlier path (same or
    earlier tree, node creation order) are dropped, so the first occurrence's labels are kept.
    """
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    for tree_index, tree in enumerate(trees):
        for node in tree.terminals():
            path = tree.path(node)
            steps = tuple(n.text for n in path)
            if steps in seen:
                continue
            seen.add(steps)
            rows.append(
                {
                    "id": f"{question_id}/{tree_index}/{node.node_id}",
                    "prompt": tree.prompt,
                    "steps": list(steps),
                    "step_values": [n.value_label for n in path],
                    "correct": bool(node.reward is not None and node.reward > 0),
                }
            )
    return rows
