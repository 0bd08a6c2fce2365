"""Tree viewer (HTML, checked in headless Chromium) and annotation report (JSON numbers, PNG plots)."""

from __future__ import annotations

import math
import random
from pathlib import Path

from svpo_trl.steps import DEFAULT_FORMAT

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------ synthetic data


def _node(node_id, parent_id, depth, text, prior, terminal=False, final_answer=None, correct=None):
    return {
        "node_id": node_id,
        "parent_id": parent_id,
        "depth": depth,
        "text": text,
        "q_value": 0.0,
        "visit_count": 0,
        "prior": prior,
        "is_terminal": terminal,
        "final_answer": final_answer,
        "reward": None if correct is None else (1.0 if correct else -1.0),
        "correct": correct,
    }


def synthetic_tree(
    seed: int = 0,
    simulations: int = 60,
    children: int = 5,
    max_depth: int = 8,
    question_id: str = "q0",
    tree_index: int = 0,
    gold: int = 42,
) -> dict:
    """A ``trees`` row from a small MCTS run with the paper's rules (A.1 defaults: 60 simulations, 5 children,
    depth 8), so Q and N are real Eq. 6 backups: PUCT selection (Eq. 4, c_puct 1.25), expansion of 5
    children, terminal children rewarded ±1 (Eq. 5), the expanded leaf evaluated 0, backups to the root.

    A hidden "sound" flag per node decides whether its answers can be right, so correct terminals
    cluster in subtrees; about one step in 40 is malformed (terminal, no answer).
    """
    rng = random.Random(seed)
    nodes = [_node(0, -1, 0, "", 1.0)]
    kids: dict[int, list[int]] = {0: []}
    sound = {0: True}

    def backup(node_id: int, value: float) -> None:
        while node_id != -1:
            n = nodes[node_id]
            n["visit_count"] += 1
            n["q_value"] += (value - n["q_value"]) / n["visit_count"]
            node_id = n["parent_id"]

    def select() -> int | None:
        node_id = 0
        while kids[node_id]:
            open_kids = [c for c in kids[node_id] if not nodes[c]["is_terminal"]]
            if not open_kids:
                return None
            parent_n = nodes[node_id]["visit_count"]
            node_id = max(
                open_kids,
                key=lambda c: (
                    nodes[c]["q_value"]
                    + 1.25 * nodes[c]["prior"] * math.sqrt(parent_n) / (1 + nodes[c]["visit_count"])
                ),
            )
        return node_id

    for _ in range(simulations):
        leaf = select()
        if leaf is None:
            break
        depth = nodes[leaf]["depth"] + 1
        terminal_children = []
        for _ in range(children):
            node_id = len(nodes)
            prior = round(rng.uniform(0.3, 0.95), 3)
            child_sound = sound[leaf] and rng.random() < 0.75
            a, b = rng.randint(2, 20), rng.randint(2, 20)
            roll = rng.random()
            if depth >= max_depth or roll < 0.12 + 0.05 * depth:
                if roll < 0.025:
                    text = "<step>\n<p>\nI will compute it\n</p>\n</step>\n"  # neither code nor answer
                    node = _node(node_id, leaf, depth, text, prior, terminal=True)
                else:
                    correct = child_sound and rng.random() < 0.8
                    answer = gold if correct else gold + rng.choice([-3, -1, 1, 2, 5])
                    text = DEFAULT_FORMAT.render_answer_step(f"So the answer is {answer}.", str(answer))
                    node = _node(node_id, leaf, depth, text, prior, True, str(answer), correct)
                terminal_children.append(node)
            else:
                op = rng.choice(["+", "-", "*"])
                value = eval(f"{a} {op} {b}")
                text = DEFAULT_FORMAT.render_code_step(
                    f"Step {depth}: combine {a} and {b} with {op}.", f"x = {a} {op} {b}\nprint(x)", str(value)
                )
                node = _node(node_id, leaf, depth, text, prior)
            nodes.append(node)
            kids[node_id] = []
            kids[leaf].append(node_id)
            sound[node_id] = child_sound
        for node in terminal_children:
            backup(node["node_id"], node["reward"] if node["reward"] is not None else -1.0)
        backup(leaf, 0.0)
    return {
        "id": question_id,
        "question": f"Tom has {gold - 7} apples and buys 7 more. How many apples does he have?",
        "answer": str(gold),
        "tree_index": tree_index,
        "nodes": nodes,
    }


def synthetic_pairs(tree: dict, prompt: str | None = None) -> list[dict]:
    """Pairs in the ``pairs`` schema: per expanded node one sibling pair (best vs worst visited child by Q),
    one terminal pair (a correct vs an incorrect terminal), one cousin pair (children of two siblings)."""
    nodes = {n["node_id"]: n for n in tree["nodes"]}
    kids: dict[int, list[int]] = {i: [] for i in nodes}
    for n in tree["nodes"]:
        if n["parent_id"] >= 0:
            kids[n["parent_id"]].append(n["node_id"])

    def solution(node_id: int) -> str:
        chain = []
        while node_id > 0:
            chain.append(nodes[node_id]["text"])
            node_id = nodes[node_id]["parent_id"]
        return "".join(reversed(chain))

    def value(node_id: int) -> float:
        n = nodes[node_id]
        return n["reward"] if n["is_terminal"] and n["reward"] is not None else n["q_value"]

    found = []
    for _parent, children in kids.items():
        visited = [c for c in children if nodes[c]["visit_count"] > 0]
        if len(visited) >= 2:
            best, worst = max(visited, key=value), min(visited, key=value)
            if value(best) > value(worst):
                found.append(("sibling", best, worst))
        inner = [c for c in children if kids[c]]
        if len(inner) >= 2:
            cousins = [g for c in inner[:2] for g in kids[c] if nodes[g]["visit_count"] > 0]
            if len(cousins) >= 2:
                best, worst = max(cousins, key=value), min(cousins, key=value)
                if value(best) > value(worst) and nodes[best]["parent_id"] != nodes[worst]["parent_id"]:
                    found.append(("cousin", best, worst))
    right = [i for i, n in nodes.items() if n["is_terminal"] and n["correct"] is True]
    wrong = [i for i, n in nodes.items() if n["is_terminal"] and n["correct"] is False]
    for a, b in zip(right, wrong):
        if nodes[a]["depth"] != nodes[b]["depth"]:
            found.append(("terminal", a, b))
    prompt = prompt if prompt is not None else DEFAULT_FORMAT.prompt(tree["question"])
    return [
        {
            "id": tree["id"],
            "prompt": prompt,
            "chosen": solution(c),
            "rejected": solution(r),
            "chosen_value": value(c),
            "rejected_value": value(r),
            "pair_type": kind,
            "tree_index": tree["tree_index"],
            "chosen_node_id": c,
            "rejected_node_id": r,
        }
        for kind, c, r in found
    ]
