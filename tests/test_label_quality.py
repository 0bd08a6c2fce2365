"""The toy task's step oracle, the label precision of pairs, and how deep a search reached."""

from __future__ import annotations

import pytest

from svpo_trl.search.label_quality import format_label_quality, pair_label_precision, search_reach
from svpo_trl.search.tree import Tree
from svpo_trl.steps import DEFAULT_FORMAT as F
from svpo_trl.toy.oracle import ToyStepOracle
from svpo_trl.toy.task import load_toy_problems


@pytest.fixture(scope="module")
def problem():
    # A toy problem written out by hand: 20 -> 15 -> 3 -> 7
    steps = [
        F.render_code_step("Start with 20 flowers. Subtract 5.", "flowers = 20 - 5\nprint(flowers)", "15"),
        F.render_code_step("Divide by 5.", "flowers = flowers // 5\nprint(flowers)", "3"),
        F.render_code_step("Add 4.", "flowers = flowers + 4\nprint(flowers)", "7"),
        F.render_answer_step("Ruby ends with 7.", "7"),
    ]
    question = (
        "Ruby has 20 flowers. She sells 5 of the flowers. She splits them into 5 equal piles and keeps one, "
        "giving the rest away. She finds 4 more flowers. How many flowers does Ruby have now?"
    )
    return {"id": "toy-x", "question": question, "answer": "7", "solution": "".join(steps)}


@pytest.fixture(scope="module")
def oracle(problem):
    return ToyStepOracle([problem])


def test_the_oracle_reads_real_toy_problems():
    problems = load_toy_problems("test", 20)
    oracle = ToyStepOracle(problems)
    for row in problems:
        steps = F.split_steps(row["solution"])
        assert oracle.step_labels(row["question"], steps) == [True] * len(steps)
        assert oracle.num_operations(row["question"]) == len(steps) - 1


def step(output: str) -> str:
    return F.render_code_step("Compute.", "print(0)", output)


def test_gold_solution_is_on_track_at_every_step(problem, oracle):
    steps = F.split_steps(problem["solution"])
    assert [F.parse(s).output for s in steps[:-1]] == ["15", "3", "7"]
    assert oracle.step_labels(problem["question"], steps) == [True] * 4
    assert oracle.on_track(F.prompt(problem["question"]), steps)  # the formatted prompt works as well
    assert oracle.num_operations(problem["question"]) == 3
    assert oracle.on_track(problem["question"], [])


def test_off_track_steps_and_what_stays_on_track(problem, oracle):
    q = problem["question"]
    assert oracle.step_labels(q, [step("15"), step("4"), step("7")]) == [True, False, False]  # no recovery
    assert oracle.step_labels(q, [step("3")]) == [True]  # two operations in one step: ahead on the chain
    no_op = oracle.step_labels(q, [step("15"), step("15"), step("3")])
    assert no_op == [True, False, False]  # printing the current value again does not follow the problem
    assert oracle.step_labels(q, [step("20")]) == [False]  # the starting quantity again
    assert oracle.step_labels(q, [step("15"), step("20")]) == [True, False]  # back to an earlier value
    assert oracle.step_labels(q, [step("ZeroDivisionError: division by zero")]) == [False]
    assert oracle.step_labels(q, [F.render_answer_step("So", "7")]) == [True]
    assert oracle.step_labels(q, [step("15"), F.render_answer_step("So", "3")]) == [True, False]
    assert oracle.step_labels(q, ["not a step at all</step>\n"]) == [False]  # malformed
    with pytest.raises(KeyError, match="no toy problem"):
        oracle.step_labels("What is 1 + 1?", [])
    with pytest.raises(ValueError, match="no gold 'solution'"):
        ToyStepOracle([{"id": "x", "question": "Q 3", "answer": "3"}])


def test_pair_label_precision_per_type(problem, oracle):
    prompt = F.prompt(problem["question"])
    gold = F.split_steps(problem["solution"])
    pairs = [
        {"prompt": prompt, "chosen": gold[0], "rejected": step("8"), "pair_type": "sibling"},  # right
        {
            "prompt": prompt,
            "chosen": gold[0],
            "rejected": step("3"),
            "pair_type": "sibling",
        },  # rejected is right
        {
            "prompt": prompt,
            "chosen": step("9"),
            "rejected": step("8"),
            "pair_type": "cousin",
        },  # chosen is wrong
        {"prompt": prompt, "chosen": gold[0], "rejected": gold[0], "pair_type": "terminal"},  # a self-pair
    ]
    precision = pair_label_precision(pairs, oracle)
    assert precision["sibling"] == {
        "pairs": 2,
        "chosen_on_track": 1.0,
        "rejected_off_track": 0.5,
        "identical": 0,
    }
    assert precision["cousin"]["chosen_on_track"] == 0.0 and precision["cousin"]["rejected_off_track"] == 1.0
    assert precision["terminal"]["identical"] == 1 and precision["terminal"]["rejected_off_track"] == 0.0
    assert precision["all"]["pairs"] == 4 and precision["all"]["rejected_off_track"] == pytest.approx(0.5)
    table = format_label_quality(precision, {})
    assert "| sibling | 2 | 100.0% | 50.0% | 0 |" in table


def test_search_reach(problem, oracle):
    t = Tree(F.prompt(problem["question"]))
    a = t.add_child(t.root, text="a;")
    t.add_child(t.root, text="a;")  # a duplicate sibling, as trees had before identical samples merged
    b = t.add_child(a, text="b;")
    right = t.add_child(b, text="c;", is_terminal=True)
    right.reward = 1.0
    row = {"id": "q", "question": problem["question"], "nodes": t.to_nodes()}
    empty = {"id": "q2", "question": problem["question"], "nodes": Tree("P").to_nodes()}
    reach = search_reach([row, empty], oracle)
    assert reach["deepest"] == 3 and reach["deepest_node_per_tree"] == {0: 1, 3: 1}
    assert reach["duplicate_children"] == 1
    assert reach["solved_by_operations"] == {3: {"problems": 2, "solved": 1}}
    assert "3 ops 1/2" in format_label_quality({}, reach)
