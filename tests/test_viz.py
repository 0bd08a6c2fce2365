"""Tree viewer (HTML, checked in headless Chromium) and annotation report (JSON numbers, PNG plots)."""

from __future__ import annotations

import json
import math
import random
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def partial_solution(tree: dict, node_id: int) -> str:
    """The step texts from the root to a node, as the ``chosen``/``rejected`` columns hold them."""
    nodes = {n["node_id"]: n for n in tree["nodes"]}
    chain = []
    while node_id > 0:
        chain.append(nodes[node_id]["text"])
        node_id = nodes[node_id]["parent_id"]
    return "".join(reversed(chain))


def synthetic_pairs(tree: dict, prompt: str | None = None) -> list[dict]:
    """Pairs in the ``pairs`` schema: per expanded node one sibling pair (best vs worst visited child by Q),
    one terminal pair (a correct vs an incorrect terminal), one cousin pair (children of two siblings)."""
    nodes = {n["node_id"]: n for n in tree["nodes"]}
    kids: dict[int, list[int]] = {i: [] for i in nodes}
    for n in tree["nodes"]:
        if n["parent_id"] >= 0:
            kids[n["parent_id"]].append(n["node_id"])

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
            "chosen": partial_solution(tree, c),
            "rejected": partial_solution(tree, r),
            "chosen_value": value(c),
            "rejected_value": value(r),
            "pair_type": kind,
            "tree_index": tree["tree_index"],
            "chosen_node_id": c,
            "rejected_node_id": r,
        }
        for kind, c, r in found
    ]


def backup_invariants_hold(nodes: list[dict]) -> bool:
    """Eq. 6 backups with leaf value 0: an expanded node was a leaf once, so N = 1 + sum N(children) and
    N * Q = sum N(child) * Q(child); a visited terminal has N 1 and Q = R."""
    children: dict[int, list[dict]] = {n["node_id"]: [] for n in nodes}
    for n in nodes:
        if n["parent_id"] >= 0:
            children[n["parent_id"]].append(n)
    for n in nodes:
        kids = children[n["node_id"]]
        if kids:
            if n["visit_count"] != 1 + sum(c["visit_count"] for c in kids):
                return False
            total = sum(c["visit_count"] * c["q_value"] for c in kids)
            if not math.isclose(n["visit_count"] * n["q_value"], total, abs_tol=1e-9):
                return False
        elif (
            n["is_terminal"]
            and n["visit_count"]
            and (n["visit_count"], n["q_value"]) != (1, n["reward"] or -1.0)
        ):
            return False
    return True


def hand_node(node_id, parent_id, depth, q, n, terminal=False, correct=None, answer=None):
    """A node of the hand-computed trees below; text is a C-step or an A-step in the step format."""
    if terminal:
        text = DEFAULT_FORMAT.render_answer_step(f"answer {node_id}", answer or "?")
    elif depth:
        text = DEFAULT_FORMAT.render_code_step(f"step {node_id}", "print(1)", "1")
    else:
        text = ""
    reward = None if correct is None else (1.0 if correct else -1.0)
    return {
        "node_id": node_id,
        "parent_id": parent_id,
        "depth": depth,
        "text": text,
        "q_value": q,
        "visit_count": n,
        "prior": 0.5,
        "is_terminal": terminal,
        "final_answer": answer,
        "reward": reward,
        "correct": correct,
    }


def hand_annotation() -> dict[str, list[dict]]:
    """Three small trees whose N and Q follow Eq. 6 (leaf value 0), numbers checked by hand in the tests."""
    q1_tree0 = [
        hand_node(0, -1, 0, -0.2, 5),  # (0*3 + -1*1 + own leaf 0) / 5
        hand_node(1, 0, 1, 0.0, 3),  # (1 - 1 + own leaf 0) / 3
        hand_node(2, 0, 1, -1.0, 1, True, False, "8"),
        hand_node(3, 1, 2, 1.0, 1, True, True, "7"),
        hand_node(4, 1, 2, -1.0, 1, True, False, "9"),
        hand_node(5, 1, 2, 0.0, 0),  # expanded, never visited
    ]
    q1_tree1 = [hand_node(0, -1, 0, 0.5, 2), hand_node(1, 0, 1, 1.0, 1, True, True, "7")]
    q2_tree0 = [
        hand_node(0, -1, 0, -2 / 3, 3),
        hand_node(1, 0, 1, -1.0, 1, True, False, "1"),
        hand_node(2, 0, 1, -1.0, 1, True, False, "2"),
        hand_node(3, 0, 1, 0.0, 0, True, None, None),  # malformed: terminal, no answer
    ]
    trees = [
        {
            "id": "q1",
            "question": "3 + 4?",
            "answer": "7",
            "tree_index": 0,
            "nodes": q1_tree0,
            "num_tokens": 100,
        },
        {
            "id": "q1",
            "question": "3 + 4?",
            "answer": "7",
            "tree_index": 1,
            "nodes": q1_tree1,
            "num_tokens": 50,
        },
        {
            "id": "q2",
            "question": "1 + 2?",
            "answer": "3",
            "tree_index": 0,
            "nodes": q2_tree0,
            "num_tokens": 30,
        },
    ]

    def pair(chosen, rejected, kind, chosen_value, rejected_value, tree=0, rejected_tree=0):
        return {
            "id": f"q1/{tree}/{chosen}-{rejected_tree}/{rejected}",
            "prompt": DEFAULT_FORMAT.prompt("3 + 4?"),
            "chosen": "",
            "rejected": "",
            "chosen_value": chosen_value,
            "rejected_value": rejected_value,
            "pair_type": kind,
            "tree_index": tree,
            "chosen_node_id": chosen,
            "rejected_node_id": rejected,
            "rejected_tree_index": rejected_tree,
        }

    pairs = [
        pair(3, 4, "sibling", 1.0, -1.0),
        pair(1, 2, "sibling", 0.0, -1.0),
        pair(1, 4, "terminal", 1.0, -1.0, tree=1, rejected_tree=0),  # negative borrowed from tree 0
    ]
    values = [
        {"id": "q1", "prompt": "p", "steps": ["a", "b"], "step_values": [0.0, 1.0], "correct": True},
        {"id": "q1", "prompt": "p", "steps": ["c"], "step_values": [1.0], "correct": True},
        {"id": "q2", "prompt": "p", "steps": ["d"], "step_values": [-1.0], "correct": False},
    ]
    return {"trees": trees, "pairs": pairs, "values": values}


SUMMARY = {"problems": 2, "trees": 3, "nodes": 12, "tokens": 180, "seconds": 12.5}


def save_annotation(directory: Path, layout: str = "folders") -> Path:
    """The hand annotation on disk: ``folders`` (trees/ pairs/ values/), ``dict`` (DatasetDict), or a Hub repo
    layout (``hub``, ``hub-splits``) of parquet files and a README."""
    from datasets import Dataset, DatasetDict

    data = DatasetDict({name: Dataset.from_list(rows) for name, rows in hand_annotation().items()})
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "folders":
        for name, dataset in data.items():
            dataset.save_to_disk(str(directory / name))
    elif layout == "dict":
        data.save_to_disk(str(directory))
    else:
        # A Hub repo: ``hub`` has one config per dataset (``push_to_hub(repo, config_name=...)``);
        # ``hub-splits`` has them as splits of one config (``DatasetDict.push_to_hub``), which cannot load
        # as a whole because the three schemas differ.
        (directory / "data").mkdir()
        card = (
            ["---", "configs:"]
            if layout == "hub"
            else ["---", "configs:", "- config_name: default", "  data_files:"]
        )
        for name, dataset in data.items():
            dataset.to_parquet(str(directory / "data" / f"{name}-00000-of-00001.parquet"))
            if layout == "hub":
                card += [
                    f"- config_name: {name}",
                    "  data_files:",
                    "  - split: train",
                    f"    path: data/{name}-*",
                ]
            else:
                card += [f"  - split: {name}", f"    path: data/{name}-*"]
        (directory / "README.md").write_text("\n".join([*card, "---", ""]))
    if not layout.startswith("hub"):
        (directory / "summary.json").write_text(json.dumps(SUMMARY))
    return directory


# ------------------------------------------------------------------------------------ data access


def test_synthetic_tree_follows_the_backup_rule():
    tree = synthetic_tree(seed=0)
    nodes = tree["nodes"]
    assert len(nodes) == 301  # 60 simulations x 5 children + root
    assert max(n["depth"] for n in nodes) <= 8
    assert backup_invariants_hold(nodes)
    assert {True, False} <= {n["correct"] for n in nodes if n["is_terminal"]}
    broken = [dict(n) for n in nodes]
    broken[0]["q_value"] += 0.01
    assert not backup_invariants_hold(broken)  # the check can fail
    assert backup_invariants_hold(hand_annotation()["trees"][0]["nodes"])


def test_tree_nodes_validation_names_row_and_field():
    from svpo_trl.viz import tree_nodes

    row = synthetic_tree(seed=1)
    assert [n["node_id"] for n in tree_nodes(row)] == list(range(301))
    missing = {**row, "nodes": [{k: v for k, v in n.items() if k != "q_value"} for n in row["nodes"]]}
    with pytest.raises(
        ValueError, match=r"trees row \(id='q0', tree_index=0\): node at position 0 lacks.*q_value"
    ):
        tree_nodes(missing)
    orphan = {**row, "nodes": [*row["nodes"], {**row["nodes"][5], "node_id": 999, "parent_id": 555}]}
    with pytest.raises(ValueError, match="node 999 has parent_id 555"):
        tree_nodes(orphan)
    with pytest.raises(ValueError, match="missing column 'nodes'"):
        tree_nodes({"id": "x", "question": "", "answer": "", "tree_index": 0})
    # The legacy Sequence(struct) layout (a dict of lists) is read the same.
    columns = {k: [n[k] for n in row["nodes"]] for k in row["nodes"][0]}
    assert tree_nodes({**row, "nodes": columns}) == tree_nodes(row)


def test_correct_path_and_pairs_linked_by_columns_or_text():
    from svpo_trl.viz import correct_path_nodes, pairs_for_tree

    nodes = hand_annotation()["trees"][0]["nodes"]
    assert correct_path_nodes(nodes) == {0, 1, 3}  # root -> 1 -> correct terminal 3
    tree = synthetic_tree(seed=2)
    pairs = synthetic_pairs(tree)
    linked = pairs_for_tree(pairs, "q0", 0, tree["nodes"])
    expected = [(p["chosen_node_id"], p["rejected_node_id"], p["pair_type"]) for p in pairs]
    assert [(p["chosen"], p["rejected"], p["type"]) for p in linked] == expected
    # Without the link columns, pairs are found by their partial-solution text (identical sibling steps
    # are the same state, so either node is a right answer).
    unlinked = [
        {k: v for k, v in p.items() if k not in ("tree_index", "chosen_node_id", "rejected_node_id")}
        for p in pairs
    ]
    found = pairs_for_tree(unlinked, "q0", 0, tree["nodes"])
    assert len(found) == len(pairs)
    for pair, match in zip(pairs, found):
        assert partial_solution(tree, match["chosen"]) == pair["chosen"]
        assert partial_solution(tree, match["rejected"]) == pair["rejected"]
    assert pairs_for_tree(pairs, "other-question", 0, tree["nodes"]) == []
    # Annotator ids "{question}/{tree}/{chosen}-{tree}/{rejected}"; a negative borrowed from tree 0.
    hand = hand_annotation()
    in_tree1 = pairs_for_tree(hand["pairs"], "q1", 1, hand["trees"][1]["nodes"])
    assert in_tree1 == [
        {
            "chosen": 1,
            "rejected": None,
            "chosen_tree": 1,
            "rejected_tree": 0,
            "type": "terminal",
            "chosen_value": 1.0,
            "rejected_value": -1.0,
        }
    ]
    bad = [{**hand["pairs"][0], "rejected_node_id": 77}]
    with pytest.raises(ValueError, match="rejected_node_id=77 is not a node of tree 0"):
        pairs_for_tree(bad, "q1", 0, hand["trees"][0]["nodes"])


@pytest.mark.parametrize("layout", ["folders", "dict", "hub", "hub-splits"])
def test_load_annotation_layouts(tmp_path, layout):
    from svpo_trl.viz import load_annotation

    annotation = load_annotation(save_annotation(tmp_path / layout, layout))
    assert annotation.trees["id"] == ["q1", "q1", "q2"]
    assert len(annotation.pairs) == 3 and len(annotation.values) == 3
    assert annotation.summary == ({} if layout.startswith("hub") else SUMMARY)
    with pytest.raises(ValueError, match="not loadable"):
        load_annotation(tmp_path / "does-not-exist")


def test_load_annotation_with_no_pairs(tmp_path):
    """An annotation whose policy made no mistakes has an empty ``pairs``: ``save_to_disk`` writes no Arrow
    file for it, and loading it raised an IndexError inside ``datasets``."""
    from datasets import Dataset

    from svpo_trl.viz import load_annotation

    directory = save_annotation(tmp_path / "annotation")
    pairs = Dataset.from_list(hand_annotation()["pairs"])
    shutil.rmtree(directory / "pairs")
    pairs.select([]).save_to_disk(str(directory / "pairs"))
    annotation = load_annotation(directory)
    assert len(annotation.pairs) == 0 and annotation.pairs.features == pairs.features
    assert annotation.trees["id"] == ["q1", "q1", "q2"]


# ------------------------------------------------------------------------------------ HTML page

XSS = "</script><script>document.title='pwned'</script><img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"


def tree_with_hostile_text(seed: int = 0) -> tuple[dict, int]:
    """The synthetic tree with model text that tries to break out of the page; returns (row, node id)."""
    tree = synthetic_tree(seed=seed)
    target = next(n for n in tree["nodes"] if n["depth"] == 2 and not n["is_terminal"])
    target["text"] = DEFAULT_FORMAT.render_code_step(f"Analysis {XSS} <b>bold</b>", f"print('{XSS}')", XSS)
    return tree, target["node_id"]


def test_page_is_self_contained_and_escapes_model_text(tmp_path):
    from svpo_trl.viz import render_tree_html

    tree, _ = tree_with_hostile_text()
    page = render_tree_html(tree, synthetic_pairs(tree), tmp_path / "tree.html")
    assert (tmp_path / "tree.html").read_text(encoding="utf-8") == page
    assert page.count("</script>") == 2  # the data block and the viewer's own script
    assert "<img" not in page and "<b>bold" not in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page, re.I)  # no external resources
    assert not re.search(r"@import|url\(\s*[\"']?https?:", page)
    data = json.loads(
        re.search(r'<script type="application/json" id="tree-data">(.*?)</script>', page, re.S)[1]
    )
    assert len(data["trees"][0]["nodes"]) == 301
    assert data["trees"][0]["stats"]["pairs"] == len(synthetic_pairs(tree))


def test_question_page_errors_name_what_is_there(tmp_path):
    from svpo_trl.viz import render_question_html

    trees = [synthetic_tree(seed=0, question_id="a"), synthetic_tree(seed=1, question_id="b")]
    with pytest.raises(
        ValueError, match=r"question id 'zzz' is not in the trees dataset \(known ids: a, b\)"
    ):
        render_question_html(trees, "zzz")
    with pytest.raises(ValueError, match=r"question 'a' has no tree with tree_index 4 \(has \[0\]\)"):
        render_question_html(trees, "a", tree_index=4)


def _chromium():
    from svpo_trl.viz.browser import find_chromium

    path = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else find_chromium()
    if path is None:
        pytest.skip(
            "chromium not found at /usr/bin/chromium: run `make install-test` (installs Debian's chromium)"
        )
    return path


def _panel(dom: str, field: str) -> str:
    match = re.search(rf'<(?:dd|pre|div) [^>]*data-field="{field}"[^>]*>(.*?)</(?:dd|pre|div)>', dom, re.S)
    assert match, f"no detail field {field!r} in the page"
    return match[1]


def test_tree_page_in_headless_chromium(tmp_path):
    from svpo_trl.viz import render_question_html
    from svpo_trl.viz.browser import dump_dom, screenshot

    chromium = _chromium()
    tree, hostile = tree_with_hostile_text(seed=0)
    second = synthetic_tree(seed=3, tree_index=1)
    page = tmp_path / "question.html"
    render_question_html([second, tree], "q0", synthetic_pairs(tree) + synthetic_pairs(second), page)
    nodes = {n["node_id"]: n for n in tree["nodes"]}

    # Everything expanded: one SVG group per node; the detail panel of the hostile node shows its text as text.
    dom = dump_dom(page, f"tree=0&expand=all&node={hostile}", chromium=chromium)
    assert len(re.findall(r'<g class="node[ "]', dom)) == 301
    assert re.search(r'id="stats" data-total="301" data-visible="301"', dom)
    assert re.search(rf'<aside id="detail" data-node="{hostile}"', dom)
    assert _panel(dom, "q") == f"{nodes[hostile]['q_value']:.3f}"
    assert _panel(dom, "n") == str(nodes[hostile]["visit_count"])
    assert _panel(dom, "prior") == f"{nodes[hostile]['prior']:.3f}"
    assert _panel(dom, "depth") == "2"
    assert "&lt;img src=x onerror=" in _panel(dom, "output")
    assert _panel(dom, "code").startswith("print('&lt;/script&gt;")
    assert 'data-pwned="1"' not in dom and "<title>pwned" not in dom and "<b>bold" not in dom

    # Default view of a 301-node tree: partly collapsed (at most 40 leaves), correct path drawn.
    dom = dump_dom(page, "tree=0", chromium=chromium)
    visible = int(re.search(r'data-visible="(\d+)"', dom)[1])
    assert len(re.findall(r'<g class="node[ "]', dom)) == visible and 10 < visible < 301
    assert 'class="edge correct' in dom

    # "Collapse below depth 2": exactly the nodes of depth <= 2 show. Tree 1 is picked by the hash.
    dom = dump_dom(page, "tree=1&depth=2&node=3", chromium=chromium)
    assert len(re.findall(r'<g class="node[ "]', dom)) == sum(1 for n in second["nodes"] if n["depth"] <= 2)
    assert _panel(dom, "q") == f"{second['nodes'][3]['q_value']:.3f}"

    png = screenshot(page, tmp_path / "tree.png", "tree=0&node=53", chromium=chromium)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_tree_page_fills_the_window_with_legible_labels(tmp_path):
    """A 1400x900 window: the default view of a 301-node tree spans most of the canvas both ways (it filled
    the top ~40%), and its node labels are at least 10 px on screen (they were ~6 px)."""
    from svpo_trl.viz import render_question_html
    from svpo_trl.viz.browser import dump_dom

    chromium = _chromium()
    tree = synthetic_tree(seed=0)
    page = tmp_path / "question.html"
    render_question_html([tree], "q0", synthetic_pairs(tree), page)
    dom = dump_dom(page, "tree=0", width=1400, height=900, chromium=chromium)
    width, height = map(float, re.search(r'data-size="([\d.]+)x([\d.]+)"', dom).groups())
    tx, ty, k = map(
        float,
        re.search(
            r'id="viewport" transform="translate\(([-\d.e]+),([-\d.e]+)\) scale\(([\d.e]+)\)"', dom
        ).groups(),
    )
    nodes = [
        tuple(map(float, xy))
        for xy in re.findall(
            r'<g class="node[^"]*" data-id="\d+" transform="translate\(([-\d.]+),([-\d.]+)\)"', dom
        )
    ]
    xs, ys = [tx + k * x for x, _ in nodes], [ty + k * y for _, y in nodes]
    assert (max(xs) - min(xs)) / width > 0.85 and (max(ys) - min(ys)) / height > 0.75
    assert min(xs) >= 0 and max(xs) <= width and min(ys) >= 0 and max(ys) <= height
    fonts = {float(f) for f in re.findall(r'<text class="label" y="[\d.]+" font-size="([\d.]+)"', dom)}
    assert len(fonts) == 1 and fonts.pop() * k >= 10
    assert float(re.search(r'data-label-px="([\d.]+)"', dom)[1]) >= 10


# ------------------------------------------------------------------------------------ report


def test_annotation_report_numbers(tmp_path):
    from svpo_trl.viz import annotation_report

    stats = annotation_report(save_annotation(tmp_path / "ann"), tmp_path / "report")
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["q_by_depth"] == stats["q_by_depth"]
    assert (stats["problems"], stats["trees"], stats["nodes"]) == (2, 3, 12)
    assert (
        stats["tree_size"]["min"] == 2
        and stats["tree_size"]["max"] == 6
        and stats["tree_size"]["median"] == 4
    )
    q = saved["q_by_depth"]
    assert list(q) == ["0", "1", "2"]
    assert q["0"]["count"] == 3 and q["0"]["mean"] == pytest.approx((-0.2 + 0.5 - 2 / 3) / 3)
    assert q["1"]["count"] == 5 and q["1"]["mean"] == pytest.approx(-0.4)  # 0, -1, 1, -1, -1
    assert q["2"]["count"] == 2 and q["2"]["mean"] == pytest.approx(0.0)  # the unvisited node is left out
    counts = q["1"]["histogram"]["counts"]
    assert (counts[0], counts[10], counts[19], sum(counts)) == (3, 1, 1, 5)
    assert saved["unvisited_nodes"] == 2
    assert saved["terminals"] == {"correct": 2, "incorrect": 4, "other": 1, "total": 7}
    solve = saved["solve_rate"]
    assert (solve["problems_solved"], solve["fraction_solved"], solve["mean_solve_rate"]) == (1, 0.5, 0.25)
    assert [(p["id"], p["terminals"], p["correct_terminals"]) for p in solve["per_problem"]] == [
        ("q1", 4, 2),
        ("q2", 3, 0),
    ]
    assert saved["pairs"]["by_type"] == {"sibling": 2, "cousin": 0, "terminal": 1}
    assert saved["pairs"]["mean_value_gap_by_type"] == {"sibling": 1.5, "terminal": 2.0}
    assert saved["pairs"]["problems_with_pairs"] == 1
    assert saved["values"] == {"rows": 3, "correct": 2, "steps": 4, "mean_steps": 4 / 3}
    assert saved["cost"]["tokens"]["per_question"] == {"q1": 150, "q2": 30}
    assert saved["cost"]["tokens"]["total"] == 180
    assert saved["cost"]["seconds"]["total"] == 12.5 and saved["cost"]["seconds"]["per_question"] == {}
    assert saved["summary"] == SUMMARY
    for name in ("q_by_depth", "solve_rate", "pairs_per_type", "tree_size", "tokens_time"):
        png = tmp_path / "report" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5_000
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert (
        "| solved (≥1 correct terminal) | 1 (50.0%) |" in markdown
        and "![Pairs per type](pairs_per_type.png)" in markdown
    )
    assert (tmp_path / "report" / "report.html").read_text().count("data:image/png;base64,") == 5
    # The Q plot says what it counts (it counted visited nodes only without saying so)
    caption = "Q of visited nodes only (N > 0); 2 unvisited nodes left out"
    assert "## Q-value histogram by depth (visited nodes)\n\n" + caption in markdown
    assert caption.replace(">", "&gt;") in (tmp_path / "report" / "report.html").read_text()


# ------------------------------------------------------------------------------------ the annotator's output

SCRIPT_QUESTION = "What is 3 + 4?"


def _code(label: str) -> str:
    return f"<step>\n<p>\n{label}\n</p>\n<code>\n```python\nprint(1)\n```\n</code>"


def _answer(label: str, value: str) -> str:
    return f"<step>\n<p>\n{label}\n</p>\n<p>\nFinal Answer: ${value}$\n</p>\n</step>"


# What the scripted "policy" writes, keyed by the labels of the steps so far (gold answer 7).
SCRIPT = {
    (): [(_code("A"), 0.5), (_answer("B", "8"), 0.9), (_answer("C", "8"), 0.8)],
    ("A",): [(_code("D"), 0.6), (_answer("E", "9"), 0.3), (_code("F"), 0.1)],
    ("A", "D"): [(_answer("G", "9"), 0.5), (_answer("H", "7"), 0.5), (_answer("I", "7"), 0.5)],
    ("A", "F"): [(_code("J"), 0.5), (_answer("K", "7"), 0.5), (_code("L"), 0.5)],
}


class _PrintsOne:
    """Every snippet prints 1: the scripted code steps need an output, not a real interpreter."""

    def run_many(self, snippet_lists):
        from types import SimpleNamespace

        return [SimpleNamespace(stdout="1", error=None, timed_out=False) for _ in snippet_lists]


def test_cli_on_the_annotators_output(tmp_path):
    """recipes/inspect_search.py on what MCTSAnnotator writes: the page holds its tree, the report its totals."""
    from svpo_trl.search.mcts import MCTSAnnotator, MCTSConfig
    from svpo_trl.search.sampler import StepSampler
    from svpo_trl.search.testing import ScriptedBackend

    def script(prompt: str):
        return SCRIPT[tuple(re.findall(r"<step>\n<p>\n(\w+)\n</p>", prompt))]

    config = MCTSConfig(num_children=3, max_depth=3, temperature_levels=1, progress=False, target_correct=3)
    annotator = MCTSAnnotator(
        StepSampler(ScriptedBackend(script), sandbox=_PrintsOne()),
        config,
        grader=lambda p, g: p.strip() == str(g),
    )
    annotation = tmp_path / "annotation"
    annotator.annotate([{"id": "q0", "question": SCRIPT_QUESTION, "answer": "7"}], annotation)
    summary = json.loads((annotation / "summary.json").read_text())

    page = tmp_path / "q0.html"
    inspect = [sys.executable, str(REPO / "recipes" / "inspect_search.py")]
    run = subprocess.run(
        [*inspect, "tree", str(annotation), "--id", "q0", "--out", str(page)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(re.search(r'id="tree-data">(.*?)</script>', page.read_text(), re.S)[1])
    nodes = data["trees"][0]["nodes"]
    assert len(nodes) == summary["nodes"] == 13  # root + A..L, as test_mcts computes by hand
    by_label = {re.search(r"^(\w+)$", n.get("analysis") or "root")[1]: n for n in nodes}
    assert (
        by_label["D"]["q"] == pytest.approx(0.25)
        and by_label["D"]["n"] == 4
        and by_label["D"]["code"] == "print(1)"
    )
    assert {k for k, n in by_label.items() if n["on_path"]} == {"root", "A", "D", "F", "H", "I", "K"}
    assert len(data["trees"][0]["pairs"]) == summary["pairs"]

    cli = runpy.run_path(str(REPO / "recipes" / "inspect_search.py"), run_name="inspect_recipe")
    cli["main"](["report", str(annotation), "--out", str(tmp_path / "report")])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert (report["problems"], report["trees"], report["nodes"]) == (1, summary["trees"], summary["nodes"])
    assert report["pairs"]["total"] == summary["pairs"]
    assert {k: v for k, v in report["pairs"]["by_type"].items() if v} == {
        k: v for k, v in summary["pairs_by_type"].items() if v
    }
    assert report["cost"]["tokens"]["total"] == summary["tokens"]
    assert (
        report["terminals"]["correct"] == 3
        and report["solve_rate"]["problems_solved"] == summary["solved"] == 1
    )


@pytest.mark.parametrize("flag", ["--tree_index", "--tree-index"])
def test_inspect_recipe_takes_underscore_flags_and_keeps_hyphen_aliases(tmp_path, flag):
    cli = runpy.run_path(str(REPO / "recipes" / "inspect_search.py"), run_name="inspect_recipe")
    annotation = save_annotation(tmp_path / "ann")
    page = tmp_path / "q.html"
    cli["main"](
        ["tree", str(annotation), "--id", "q1", flag, "1", "--max_visible_leaves", "5", "--out", str(page)]
    )
    data = json.loads(re.search(r'id="tree-data">(.*?)</script>', page.read_text(), re.S)[1])
    assert [t["tree_index"] for t in data["trees"]] == [1] and data["config"]["max_visible_leaves"] == 5


def test_report_without_matplotlib_names_the_viz_extra(tmp_path, monkeypatch):
    from svpo_trl.errors import MissingExtraError
    from svpo_trl.viz import annotation_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(
        MissingExtraError, match=r"matplotlib, which is not installed: pip install 'svpo_trl\[viz\]'"
    ):
        annotation_report(save_annotation(tmp_path / "ann"), tmp_path / "report")
    assert not (tmp_path / "report").exists()
