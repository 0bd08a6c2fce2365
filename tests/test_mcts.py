"""MCTSAnnotator with a scripted backend: exact N and Q (Eq. 4-6), stop rule, lock-step, resume."""

from __future__ import annotations

import filecmp
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from svpo_trl.search.mcts import MCTSAnnotator, MCTSConfig
from svpo_trl.search.sampler import StepSampler
from svpo_trl.search.testing import ScriptedBackend
from svpo_trl.steps import DEFAULT_FORMAT

from conftest import ConstantSandbox

QUESTION = "What is 3 + 4?"
PROMPT = DEFAULT_FORMAT.prompt(QUESTION)


def code(label: str) -> str:
    return f"<step>\n<p>\n{label}\n</p>\n<code>\n```python\nprint(1)\n```\n</code>"


def answer(label: str, value: str) -> str:
    return f"<step>\n<p>\n{label}\n</p>\n<p>\nFinal Answer: ${value}$\n</p>\n</step>"


# The search tree the scripted "policy" grows, keyed by the labels of the steps taken so far.
# Gold answer 7. Children are (completion, prior); priors matter for PUCT only.
SCRIPT = {
    (): [(code("A"), 0.5), (answer("B", "8"), 0.9), (answer("C", "8"), 0.8)],
    ("A",): [(code("D"), 0.6), (answer("E", "9"), 0.3), (code("F"), 0.1)],
    ("A", "D"): [(answer("G", "9"), 0.5), (answer("H", "7"), 0.5), (answer("I", "7"), 0.5)],
    ("A", "F"): [(code("J"), 0.5), (answer("K", "7"), 0.5), (code("L"), 0.5)],
}
WRONG_ONLY = {(): [(answer("X", "1"), 0.5), (answer("Y", "2"), 0.5)]}


def scripted(tables: dict[str, dict]) -> ScriptedBackend:
    """Completions looked up by (question, labels of the steps so far)."""

    def script(prompt: str):
        question = re.match(r"<question>(.*?)</question>", prompt, re.DOTALL).group(1)
        labels = tuple(re.findall(r"<step>\n<p>\n(\w+)\n</p>", prompt))
        return tables[question][labels]

    return ScriptedBackend(script)


def exact_match(prediction: str, gold) -> bool:
    return prediction.strip() == str(gold).strip()


def make_annotator(backend, **overrides) -> MCTSAnnotator:
    settings = {"num_children": 3, "max_depth": 3, "temperature_levels": 1, "progress": False}
    config = MCTSConfig(**{**settings, **overrides})
    sampler = StepSampler(backend, sandbox=ConstantSandbox())
    return MCTSAnnotator(sampler, config, grader=exact_match)


def labels_of(row: dict) -> dict[str, dict]:
    """Nodes of a ``trees`` row keyed by the label of their step ("root" for the root)."""
    out = {}
    for node in row["nodes"]:
        match = re.search(r"<p>\n(\w+)\n</p>", node["text"])
        out[match.group(1) if match else "root"] = node
    return out


def test_exact_visit_counts_and_q_values(tmp_path):
    backend = scripted({QUESTION: SCRIPT})
    data = make_annotator(backend, target_correct=3).annotate(
        [{"id": "q0", "question": QUESTION, "answer": "7"}], tmp_path
    )
    assert len(data["trees"]) == 1  # 3 correct terminals (H, I, K) meet target_correct=3
    nodes = labels_of(data["trees"][0])
    # Hand computation (c_puct 1.25; each simulation backs up every terminal child's R and the leaf's 0):
    # sim 1 expands the root: B -1, C -1, leaf 0.
    # sim 2 selects A (the only non-terminal child): E -1, leaf 0.
    # sim 3 at A (N 2): PUCT D = 1.25*.6*sqrt(2) > F = 1.25*.1*sqrt(2) -> D: G -1, H +1, I +1, leaf 0.
    # sim 4 at A (N 6): D = 1/4 + 1.25*.6*sqrt(6)/5 = .617 > F = 1.25*.1*sqrt(6) = .306, but D's children are
    #   all terminal: D is exhausted and selection restarts, reaching F: J (depth 3, cut, -1), K +1, L -1, leaf 0.
    # sim 5 finds the whole tree exhausted: the tree ends after 4 simulations.
    expected = {
        "root": (13, -3 / 13),  # values -1 -1 0 | -1 0 | -1 1 1 0 | -1 1 -1 0
        "A": (10, -1 / 10),
        "B": (1, -1.0),
        "C": (1, -1.0),
        "D": (4, 1 / 4),
        "E": (1, -1.0),
        "F": (4, -1 / 4),
        "G": (1, -1.0),
        "H": (1, 1.0),
        "I": (1, 1.0),
        "J": (1, -1.0),
        "K": (1, 1.0),
        "L": (1, -1.0),
    }
    assert set(nodes) == set(expected)
    for label, (visits, q) in expected.items():
        assert nodes[label]["visit_count"] == visits, label
        assert nodes[label]["q_value"] == pytest.approx(q), label
    assert [n["node_id"] for n in data["trees"][0]["nodes"]] == list(range(13))
    order = [next(iter(labels_of({"nodes": [n]}))) for n in data["trees"][0]["nodes"]]
    assert order == ["root", "A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K", "L"]  # creation order
    assert nodes["J"]["is_terminal"] and nodes["J"]["final_answer"] is None  # cut at max_depth 3
    assert nodes["D"]["depth"] == 2 and nodes["J"]["depth"] == 3 and nodes["root"]["parent_id"] == -1
    assert {k for k, n in nodes.items() if n["correct"]} == {"root", "A", "D", "F", "H", "I", "K"}
    assert nodes["B"]["reward"] == -1.0 and nodes["H"]["reward"] == 1.0 and nodes["A"]["reward"] is None
    assert nodes["B"]["prior"] == pytest.approx(0.9)
    # One backend call per simulation round (one live tree, one temperature level).
    assert len(backend.calls) == 4


def test_pairs_and_values_from_the_annotated_tree(tmp_path):
    data = make_annotator(scripted({QUESTION: SCRIPT}), target_correct=3).annotate(
        [{"id": "q0", "question": QUESTION, "answer": "7"}], tmp_path
    )
    pairs = data["pairs"].to_list()
    # Layer 1 chosen A: siblings B, C + 1 terminal; layer 2 chosen D: sibling E + 1 terminal;
    # layer 3 chosen H (ties with I, created first): sibling G, cousin J or L, 1 terminal.
    assert Counter(p["pair_type"] for p in pairs) == {"sibling": 4, "cousin": 1, "terminal": 3}
    nodes = data["trees"][0]["nodes"]
    label = {n["node_id"]: next(iter(labels_of({"nodes": [n]}))) for n in nodes}
    chosen = Counter(label[p["chosen_node_id"]] for p in pairs)
    assert chosen == {"A": 3, "D": 2, "H": 3}
    sibling = next(p for p in pairs if p["pair_type"] == "sibling" and label[p["rejected_node_id"]] == "G")
    assert sibling["prompt"] == PROMPT
    assert sibling["chosen"].startswith(nodes[1]["text"] + nodes[4]["text"])
    assert (sibling["chosen_value"], sibling["rejected_value"]) == (1.0, -1.0)
    values = data["values"].to_list()
    assert len(values) == 9  # one per terminal: B C E G H I J K L
    by_last = {re.search(r"<p>\n(\w+)\n</p>", r["steps"][-1]).group(1): r for r in values}
    assert by_last["H"]["step_values"] == pytest.approx([-0.1, 0.25, 1.0])
    assert by_last["H"]["correct"] and not by_last["J"]["correct"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pairs_by_type"] == {"sibling": 4, "cousin": 1, "terminal": 3}
    assert (
        summary["positives"] == 3
        and summary["positive_negative_ratio"] == f"1:{summary['negatives'] / 3:.2f}"
    )
    assert summary["solved"] == 1 and summary["trees"] == 1 and summary["nodes"] == 13
    assert summary["sandbox_executions"] == 5  # code steps A, D, F, J, L
    assert summary["tokens"] == sum(r["num_tokens"] for r in data["trees"].to_list()) > 0


def test_stop_rule_per_question(tmp_path):
    tables = {QUESTION: SCRIPT, "Never right?": WRONG_ONLY}
    problems = [
        {"id": "a", "question": QUESTION, "answer": "7"},
        {"id": "b", "question": "Never right?", "answer": "7"},
    ]
    data = make_annotator(scripted(tables), max_trees=3).annotate(problems, tmp_path / "run1")
    trees = Counter(data["trees"]["id"])
    # a: 3 correct per tree -> 4 reached in tree 2; b: never correct -> max_trees trees.
    assert trees == {"a": 2, "b": 3}
    assert data["trees"]["tree_index"] == [0, 1, 0, 1, 2]
    data = make_annotator(scripted(tables), max_trees=5, target_correct=7).annotate(
        problems, tmp_path / "run2"
    )
    assert Counter(data["trees"]["id"]) == {"a": 3, "b": 5}
    # The simulation limit ends a tree too: one simulation expands the root only.
    data = make_annotator(scripted(tables), max_trees=2, max_simulations=1).annotate(
        problems, tmp_path / "run3"
    )
    # (b's two completions cycle to X, Y, X: the repeated X is one child, so b's trees have 3 nodes)
    assert [len(r["nodes"]) for r in data["trees"].to_list()] == [4, 4, 3, 3]


def test_identical_samples_become_one_child(tmp_path):
    # 5 samples at the root: A twice, B twice, C once -> 3 children; A's second sample is not a child.
    table = {
        (): [
            (code("A"), 0.5),
            (answer("B", "8"), 0.9),
            (code("A"), 0.5),
            (answer("B", "8"), 0.9),
            (answer("C", "7"), 0.4),
        ],
        ("A",): [(answer("D", "7"), 0.5)],
    }
    backend = scripted({QUESTION: table})
    data = make_annotator(backend, num_children=5, max_trees=1, max_simulations=2).annotate(
        [{"id": "q0", "question": QUESTION, "answer": "7"}], tmp_path
    )
    nodes = data["trees"][0]["nodes"]
    texts = [n["text"] for n in nodes[1:] if n["parent_id"] == 0]
    assert len(texts) == len(set(texts)) == 3
    by_label = labels_of(data["trees"][0])
    assert (by_label["A"]["num_samples"], by_label["B"]["num_samples"], by_label["C"]["num_samples"]) == (
        2,
        2,
        1,
    )
    assert by_label["A"]["prior"] == pytest.approx(0.5)  # the prior of the text (Eq. 4), not a sum
    # Eq. 6 once per distinct terminal child: B (-1) and C (+1) and the leaf (0) -> root N 3 after sim 1,
    # then sim 2 expands A: D (+1) and A itself (0) -> root N 5, Q = (-1 + 1 + 0 + 1 + 0) / 5.
    assert by_label["root"]["visit_count"] == 5 and by_label["root"]["q_value"] == pytest.approx(0.2)
    assert by_label["B"]["visit_count"] == 1
    # Every sample's tokens still count as generated.
    assert data["trees"][0]["num_tokens"] == backend.tokens_generated
    # No pair has the same text on both sides; each rejected step differs from the chosen one.
    assert all(p["chosen"] != p["rejected"] for p in data["pairs"])


def test_trees_advance_in_lock_step(tmp_path):
    tables = {QUESTION: SCRIPT, "Never right?": WRONG_ONLY}
    problems = [
        {"id": "a", "question": QUESTION, "answer": "7"},
        {"id": "b", "question": "Never right?", "answer": "7"},
    ]
    backend = scripted(tables)
    make_annotator(backend, max_trees=2, target_correct=3).annotate(problems, tmp_path)
    # Round 1 expands both roots in one call; b's tree is exhausted after one simulation and its
    # second tree joins round 2 next to a's first tree.
    assert [len(call) for call in backend.calls] == [2, 2, 1, 1]
    assert backend.calls[0][1].startswith("<question>Never right?")


def test_temperature_levels_split_calls_and_are_seeded():
    config = MCTSConfig()
    assert config.temperatures == [0.6, 0.8, 1.0]
    assert MCTSConfig(temperature_levels=1).temperatures == [0.8]
    assert MCTSConfig(temperature_levels=5).temperatures == [0.6, 0.7, 0.8, 0.9, 1.0]


class Crash(RuntimeError):
    pass


class CrashingBackend(ScriptedBackend):
    def __init__(self, script, crash_after: int):
        super().__init__(script)
        self.crash_after = crash_after

    def generate(self, prompts, **kwargs):
        if len(self.calls) >= self.crash_after:
            raise Crash(f"killed after {self.crash_after} calls")
        return super().generate(prompts, **kwargs)


def _problems():
    return [
        {"id": "a", "question": QUESTION, "answer": "7"},
        {"id": "b", "question": "Never right?", "answer": "7"},
        {"id": "c", "question": "Also 7?", "answer": "7"},
    ]


TABLES = {QUESTION: SCRIPT, "Never right?": WRONG_ONLY, "Also 7?": SCRIPT}


@pytest.mark.parametrize("crash_after", [1, 5])
def test_resume_after_a_crash_gives_identical_datasets(tmp_path, crash_after):
    # Three temperature levels: the scripted backend ignores temperature, but calls get grouped by it.
    kwargs = {"max_trees": 3, "num_parallel_questions": 2, "temperature_levels": 3}
    crashing = make_annotator(CrashingBackend(scripted(TABLES).script, crash_after), **kwargs)
    with pytest.raises(Crash):
        crashing.annotate(_problems(), tmp_path / "resumed")
    annotator = make_annotator(scripted(TABLES), **kwargs)
    resumed = annotator.annotate(_problems(), tmp_path / "resumed")
    if crash_after == 5:
        assert annotator.summary["trees_resumed"] > 0
    # Batching (parallel questions, temperature grouping) does not change results either.
    reference = make_annotator(scripted(TABLES), **{**kwargs, "num_parallel_questions": 1})
    full = reference.annotate(_problems(), tmp_path / "full")
    for name in ("trees", "pairs", "values"):
        assert resumed[name].to_list() == full[name].to_list(), name
        arrow = sorted(p.name for p in (tmp_path / "full" / name).glob("*.arrow"))
        assert arrow
        for file in arrow:
            assert filecmp.cmp(
                tmp_path / "full" / name / file, tmp_path / "resumed" / name / file, shallow=False
            )
    assert Counter(resumed["trees"]["id"]) == {"a": 2, "b": 3, "c": 2}


def test_resume_refuses_other_settings_and_other_problems(tmp_path):
    problems = _problems()[:1]
    make_annotator(scripted(TABLES)).annotate(problems, tmp_path)
    with pytest.raises(ValueError, match=r"c_puct: 1.25 -> 2.0"):
        make_annotator(scripted(TABLES), c_puct=2.0).annotate(problems, tmp_path)
    with pytest.raises(ValueError, match="belongs to problem id 'a'"):
        make_annotator(scripted(TABLES)).annotate([dict(problems[0], id="other")], tmp_path)


def test_bad_problems_are_named(tmp_path):
    annotator = make_annotator(scripted(TABLES))
    with pytest.raises(ValueError, match="problem 1 has no 'answer' field"):
        annotator.annotate([{"question": "x", "answer": "1"}, {"question": "y"}], tmp_path)
    with pytest.raises(ValueError, match="problem 1 repeats id 'a'"):
        annotator.annotate([{"id": "a", "question": "x", "answer": "1"}] * 2, tmp_path)


def test_value_head_leaf_evaluation(tmp_path):
    backend = scripted({QUESTION: SCRIPT})
    backend.value_fn = lambda text: 0.5
    data = make_annotator(backend, target_correct=3, value_leaf_evaluation=True).annotate(
        [{"question": QUESTION, "answer": "7"}], tmp_path
    )
    nodes = labels_of(data["trees"][0])
    # Each leaf now backs up 0.5 instead of 0: root sums -3 + 4 * 0.5 over 13 visits.
    assert nodes["root"]["q_value"] == pytest.approx(-1 / 13)
    assert nodes["D"]["q_value"] == pytest.approx((1 + 0.5) / 4)
    assert nodes["A"]["q_value"] == pytest.approx((-1 + 3 * 0.5) / 10)


def test_saved_layout_and_reload(tmp_path):
    import datasets

    data = make_annotator(scripted(TABLES)).annotate(_problems()[:1], tmp_path)
    for name in ("trees", "pairs", "values"):
        assert datasets.load_from_disk(str(tmp_path / name)).to_list() == data[name].to_list()
    assert sorted(p.name for p in (tmp_path / "shards" / "0000000").iterdir()) == [
        "tree_000.json",
        "tree_001.json",
    ]
    assert set(data["pairs"].column_names) >= {
        "id",
        "prompt",
        "chosen",
        "rejected",
        "chosen_value",
        "rejected_value",
        "pair_type",
        "tree_index",
        "chosen_node_id",
        "rejected_node_id",
    }
    assert Path(tmp_path / "summary.json").exists()


def _check_tree_statistics(nodes: list[dict]) -> None:
    """Eq. 6 invariants: N(node) = [expanded] + Σ N(children); N·Q = Σ N·Q (leaves back up 0)."""
    children: dict[int, list[dict]] = {n["node_id"]: [] for n in nodes}
    for n in nodes[1:]:
        children[n["parent_id"]].append(n)
    for n in nodes:
        kids = children[n["node_id"]]
        if n["is_terminal"]:
            assert not kids and n["visit_count"] == 1 and n["q_value"] == n["reward"] == -1.0
            continue
        expanded = 1 if kids else 0
        assert n["visit_count"] == expanded + sum(k["visit_count"] for k in kids)
        total = sum(k["visit_count"] * k["q_value"] for k in kids)
        assert n["visit_count"] * n["q_value"] == pytest.approx(total)


def test_end_to_end_with_a_tiny_real_model(tmp_path, tiny_tokenizer, tiny_model):
    from svpo_trl.search.backends import HFBackend

    tiny_model.eval()
    backend = HFBackend(tiny_model, tiny_tokenizer, seed=0)
    config = MCTSConfig(
        num_children=3, max_simulations=3, max_trees=2, max_new_tokens=12, progress=False, seed=1
    )
    problems = [
        {"id": "add", "question": "What is 3 + 4?", "answer": "7"},
        {"id": "mul", "question": "What is 2 * 5?", "answer": "10"},
    ]
    data = MCTSAnnotator(backend, config, grader=exact_match).annotate(problems, tmp_path)
    # An untrained model writes no well-formed answer: every terminal is wrong, each question
    # gets max_trees trees, and there are no pairs, but every Eq. 7 path is labelled -1.
    assert Counter(data["trees"]["id"]) == {"add": 2, "mul": 2}
    for row in data["trees"].to_list():
        assert row["nodes"][0]["text"] == "" and row["nodes"][0]["visit_count"] >= 3
        assert row["num_tokens"] > 0
        _check_tree_statistics(row["nodes"])
    assert len(data["pairs"]) == 0
    assert len(data["values"]) > 0 and not any(data["values"]["correct"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tokens_this_run"] == summary["tokens"] > 0 and summary["solved"] == 0


@pytest.mark.slow  # importing torch.utils.tensorboard alone takes seconds
def test_running_summary_goes_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_annotator(scripted(TABLES), report_to=["tensorboard"], max_trees=2).annotate(_problems(), tmp_path)
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    solved = [e.value for e in events.Scalars("annotation/solved")]
    trees = [e.value for e in events.Scalars("annotation/trees")]
    assert len(solved) == 3 and solved[-1] == 2  # a and c are solved, b never
    assert trees[-1] == 6


def test_default_grader_is_answer_equivalence(tmp_path):
    sampler = StepSampler(scripted({QUESTION: SCRIPT}), sandbox=ConstantSandbox())
    config = MCTSConfig(num_children=3, max_depth=3, temperature_levels=1, progress=False, target_correct=3)
    data = MCTSAnnotator(sampler, config).annotate([{"question": QUESTION, "answer": "7.0"}], tmp_path)
    nodes = labels_of(data["trees"][0])
    assert {k for k, n in nodes.items() if n["reward"] == 1.0} == {
        "H",
        "I",
        "K",
    }  # "7" is equivalent to "7.0"
