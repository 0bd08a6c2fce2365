"""Monte Carlo search trees (§3.1): nodes, PUCT selection (Eq. 4), backup (Eq. 6), (de)serialization.

A node holds the action a_t (one reasoning step) that leads to it from its parent; its ``q_value``
and ``visit_count`` are Q(s_t, a_t) and N(s_t, a_t). The root holds no step (``text == ""``); its
visit count is N(parent) for the first layer of Eq. 4.

A tree serializes to the ``nodes`` column of the ``trees`` dataset (DESIGN.md, "Datasets the
annotator writes") and is rebuilt from it without the search-time ``Step`` objects, which is all
pair extraction (Algorithm 1) and value labels (Eq. 7) need.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..steps import Step
from .state import State

NODE_FIELDS = (
    "node_id",
    "parent_id",
    "depth",
    "text",
    "q_value",
    "visit_count",
    "prior",
    "is_terminal",
    "final_answer",
    "reward",
    "correct",
)
OPTIONAL_NODE_FIELDS = {"num_samples": 1}
"""Node fields added after the first release, with the value a row written without them stands for."""


@dataclass
class Node:
    """One node of a search tree: the state reached by taking ``step`` from the parent's state.

    ``num_samples`` is how many of the expansion's samples had exactly this step text: identical
    samples become one child (as in AlphaMath), so siblings always differ. ``reward`` is R of Eq. 5 (+1 / -1) on terminal nodes and None elsewhere. ``correct`` is the
    Algorithm 1 label (lines 2-4: on a path from the root to a correct terminal), filled by
    :meth:`Tree.label_correct`. ``exhausted`` (search time only) marks a node whose subtree has no
    selectable leaf left: it is terminal, or expanded with every child exhausted.
    """

    node_id: int
    parent_id: int
    depth: int
    text: str = ""
    prior: float = 1.0
    q_value: float = 0.0
    visit_count: int = 0
    is_terminal: bool = False
    final_answer: str | None = None
    reward: float | None = None
    correct: bool | None = None
    num_samples: int = 1
    num_tokens: int = 0
    step: Step | None = None
    children: list[int] = field(default_factory=list)
    expanded: bool = False
    exhausted: bool = False

    @property
    def value_label(self) -> float:
        """The Eq. 7 label V̂: the reward R if the node is terminal, else its Q-value."""
        if self.is_terminal and self.reward is not None:
            return float(self.reward)
        return float(self.q_value)

    def to_dict(self) -> dict[str, Any]:
        """The node as a row of the ``nodes`` column (the fields of :data:`NODE_FIELDS`)."""
        return {
            "node_id": self.node_id,
            "parent_id": self.parent_id,
            "depth": self.depth,
            "text": self.text,
            "q_value": float(self.q_value),
            "visit_count": int(self.visit_count),
            "prior": float(self.prior),
            "is_terminal": bool(self.is_terminal),
            "final_answer": self.final_answer,
            "reward": None if self.reward is None else float(self.reward),
            "correct": self.correct,
            "num_samples": int(self.num_samples),
        }


class Tree:
    """A search tree for one question: nodes in creation order, the root is node 0.

    Args:
        prompt: the formatted question (the root state's text).
        nodes: nodes to start from (deserialization); a fresh tree gets a root only.
    """

    def __init__(self, prompt: str, nodes: list[Node] | None = None):
        self.prompt = prompt
        self.nodes: list[Node] = nodes if nodes is not None else [Node(node_id=0, parent_id=-1, depth=0)]
        if not self.nodes or self.nodes[0].parent_id != -1:
            raise ValueError("a tree needs a root: node 0 with parent_id -1")

    # ------------------------------------------------------------------ structure
    @property
    def root(self) -> Node:
        return self.nodes[0]

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, node_id: int) -> Node:
        return self.nodes[node_id]

    def children(self, node: Node) -> list[Node]:
        return [self.nodes[i] for i in node.children]

    def parent(self, node: Node) -> Node | None:
        return None if node.parent_id < 0 else self.nodes[node.parent_id]

    def path(self, node: Node) -> list[Node]:
        """Nodes from the first step down to ``node`` (the root excluded)."""
        path = []
        while node.parent_id >= 0:
            path.append(node)
            node = self.nodes[node.parent_id]
        return path[::-1]

    def partial_solution(self, node: Node) -> str:
        """The step texts from the root to ``node``, concatenated (y_{1:t} of §3.2)."""
        return "".join(n.text for n in self.path(node))

    def state(self, node: Node) -> State:
        """The search state at ``node``: prompt plus the steps on its path (needs the search-time steps)."""
        steps = []
        for n in self.path(node):
            if n.step is None:
                raise ValueError(f"node {n.node_id} has no Step object (tree rebuilt from a dataset row)")
            steps.append(n.step)
        return State(self.prompt, steps)

    def terminals(self) -> list[Node]:
        return [n for n in self.nodes if n.is_terminal]

    def nodes_at_depth(self, depth: int) -> list[Node]:
        return [n for n in self.nodes if n.depth == depth]

    def add_child(
        self,
        parent: Node,
        step: Step | None = None,
        *,
        text: str | None = None,
        prior: float | None = None,
        is_terminal: bool | None = None,
        final_answer: str | None = None,
        num_tokens: int | None = None,
        num_samples: int = 1,
    ) -> Node:
        """A new child of ``parent`` holding ``step`` (or the given fields, for hand-built trees)."""
        node = Node(
            node_id=len(self.nodes),
            parent_id=parent.node_id,
            depth=parent.depth + 1,
            text=text if text is not None else (step.text if step is not None else ""),
            prior=float(prior if prior is not None else (step.prior if step is not None else 1.0)),
            is_terminal=bool(
                is_terminal if is_terminal is not None else (step.is_terminal if step is not None else False)
            ),
            final_answer=final_answer if final_answer is not None else (step.final_answer if step else None),
            num_tokens=int(num_tokens if num_tokens is not None else (step.num_tokens if step else 0)),
            num_samples=num_samples,
            step=step,
        )
        self.nodes.append(node)
        parent.children.append(node.node_id)
        parent.expanded = True
        return node

    # ------------------------------------------------------------------ MCTS
    def puct(self, node: Node, c_puct: float) -> float:
        """Eq. 4: Q(s, a) + c_puct · prior(a) · sqrt(N(parent)) / (1 + N(s, a)).

        ``prior(a)`` is the mean token probability of the step (Σ_j π(a_j|·) / |a|).
        """
        parent = self.nodes[node.parent_id]
        return node.q_value + c_puct * node.prior * math.sqrt(parent.visit_count) / (1 + node.visit_count)

    def select_child(self, node: Node, c_puct: float) -> Node | None:
        """The child with the highest PUCT score among children that are not exhausted.

        Terminal children are never selected: their value is exactly their reward, already backed
        up when they were created. Ties go to the child created first (lowest ``node_id``), so
        selection is deterministic.
        """
        best, best_score = None, -math.inf
        for child in self.children(node):
            if child.exhausted or child.is_terminal:
                continue
            score = self.puct(child, c_puct)
            if score > best_score:
                best, best_score = child, score
        return best

    def select_leaf(self, c_puct: float) -> Node | None:
        """Selection (§3.1): follow PUCT from the root to an unexpanded non-terminal node.

        Nodes found to have no selectable child on the way are marked exhausted and selection
        restarts from the root. Returns None when the whole tree is exhausted.
        """
        while not self.root.exhausted:
            node = self.root
            while node.expanded:
                child = self.select_child(node, c_puct)
                if child is None:
                    node.exhausted = True
                    break
                node = child
            else:
                if node.is_terminal:
                    node.exhausted = True
                    continue
                return node
        return None

    def backup(self, node: Node, value: float) -> None:
        """Eq. 6 from ``node`` up to the root: N ← N + 1; Q ← Q + (V − Q) / N."""
        current: Node | None = node
        while current is not None:
            current.visit_count += 1
            current.q_value += (value - current.q_value) / current.visit_count
            current = self.parent(current)

    # ------------------------------------------------------------------ Algorithm 1, lines 2-4
    def label_correct(self) -> None:
        """Label every node on a path from the root to a correct terminal as correct, others not."""
        for node in self.nodes:
            node.correct = False
        for node in self.nodes:
            if node.is_terminal and node.reward is not None and node.reward > 0:
                current: Node | None = node
                while current is not None and not current.correct:
                    current.correct = True
                    current = self.parent(current)

    def num_correct_terminals(self) -> int:
        return sum(1 for n in self.nodes if n.is_terminal and n.reward is not None and n.reward > 0)

    # ------------------------------------------------------------------ (de)serialization
    def to_nodes(self) -> list[dict[str, Any]]:
        """The ``nodes`` column: one dict per node, in creation order."""
        return [node.to_dict() for node in self.nodes]

    @classmethod
    def from_nodes(cls, prompt: str, rows: list[dict[str, Any]]) -> Tree:
        """Rebuild a tree from its ``nodes`` column (search-time ``Step`` objects are not restored)."""
        nodes: list[Node] = []
        for position, row in enumerate(rows):
            missing = [f for f in NODE_FIELDS if f not in row]
            if missing:
                raise ValueError(
                    f"node row {position} lacks field(s) {missing}; expected {list(NODE_FIELDS)}"
                )
            if row["node_id"] != position:
                raise ValueError(
                    f"node row {position} has node_id {row['node_id']}; nodes must be in creation order"
                )
            nodes.append(
                Node(
                    node_id=int(row["node_id"]),
                    parent_id=int(row["parent_id"]),
                    depth=int(row["depth"]),
                    text=row["text"],
                    prior=float(row["prior"]),
                    q_value=float(row["q_value"]),
                    visit_count=int(row["visit_count"]),
                    is_terminal=bool(row["is_terminal"]),
                    final_answer=row["final_answer"],
                    reward=None if row["reward"] is None else float(row["reward"]),
                    correct=row["correct"],
                    num_samples=int(row.get("num_samples") or OPTIONAL_NODE_FIELDS["num_samples"]),
                )
            )
        for node in nodes[1:]:
            if not 0 <= node.parent_id < node.node_id:
                raise ValueError(
                    f"node {node.node_id} has parent_id {node.parent_id}; expected an earlier node's id"
                )
            parent = nodes[node.parent_id]
            parent.children.append(node.node_id)
            parent.expanded = True
        return cls(prompt, nodes)
