"""The toy task (generator, splits, gold solutions, tokenizer) and the stage-0 SFT bootstrap."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

from svpo_trl.steps import DEFAULT_FORMAT
from svpo_trl.tokenization import tokenize_solution
from svpo_trl.toy import FORMAT_TAGS
from svpo_trl.toy.task import (
    TOY_SPLIT_SIZES,
    ToyTaskConfig,
    build_toy_tokenizer,
    load_toy_problems,
    make_toy_problems,
    toy_split_of,
    toy_tokenizer_corpus,
)


@pytest.fixture(scope="module")
def splits():
    return {split: load_toy_problems(split) for split in TOY_SPLIT_SIZES}


@pytest.fixture(scope="module")
def toy_tokenizer():
    return build_toy_tokenizer(vocab_size=800, num_texts=500)


# ---------------------------------------------------------------------------- generator and splits
def test_generation_is_deterministic_by_seed():
    a = make_toy_problems(30, seed=7)
    b = make_toy_problems(30, seed=7)
    c = make_toy_problems(30, seed=8)
    assert a.to_dict() == b.to_dict()
    assert a["question"] != c["question"]
    assert a.column_names == ["id", "question", "answer", "solution"]
    assert a["id"][:2] == ["toy-s7-00000", "toy-s7-00001"]
    assert len(set(a["question"])) == 30  # distinct within a set


def test_fixed_splits_have_their_sizes_and_share_no_question(splits):
    assert {s: len(d) for s, d in splits.items()} == {"train": 4000, "annotate": 3000, "test": 1000}
    questions = {s: set(d["question"]) for s, d in splits.items()}
    assert all(len(q) == len(splits[s]) for s, q in questions.items())
    assert not questions["train"] & questions["test"]
    assert not questions["train"] & questions["annotate"]
    assert not questions["annotate"] & questions["test"]
    # Disjoint by construction: every question is hashed to its own split, whatever the sizes.
    bigger_test = load_toy_problems("test", 1200)
    assert bigger_test["question"][:1000] == splits["test"]["question"]
    assert not set(bigger_test["question"]) & questions["train"]
    assert all(toy_split_of(q) == "annotate" for q in splits["annotate"]["question"])
    assert load_toy_problems("test").to_dict() == splits["test"].to_dict()


def test_difficulty_knobs_bound_operations_and_operands():
    ds = make_toy_problems(200, seed=1, config=ToyTaskConfig(min_ops=3, max_ops=3, max_operand=9))
    for row in ds:
        steps = DEFAULT_FORMAT.split_steps(row["solution"])
        assert len(steps) == 4
        assert max(int(n) for n in re.findall(r"\d+", row["question"])) <= 9


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown toy split 'dev'"):
        load_toy_problems("dev")
    with pytest.raises(ValueError, match="min_ops <= max_ops"):
        ToyTaskConfig(min_ops=3, max_ops=2)
    with pytest.raises(ValueError, match="max_operand"):
        ToyTaskConfig(max_operand=1)


# ---------------------------------------------------------------------------- gold solutions
def _gold_rows(splits):
    return [*splits["test"], *splits["annotate"].select(range(500)), *splits["train"].select(range(300))]


def test_gold_solutions_parse_into_code_steps_then_one_answer_step(splits):
    for row in _gold_rows(splits):
        texts = DEFAULT_FORMAT.split_steps(row["solution"])
        assert "".join(texts) == row["solution"]
        steps = [DEFAULT_FORMAT.parse(t) for t in texts]
        assert 2 <= len(steps) - 1 <= 4, row["id"]
        assert [s.kind for s in steps] == ["code"] * (len(steps) - 1) + ["answer"], row["id"]
        assert steps[-1].final_answer == row["answer"], row["id"]
        assert steps[-2].output == row["answer"], row["id"]
        assert int(row["answer"]) >= 1


def test_gold_code_run_cumulatively_prints_exactly_its_output(splits):
    for row in _gold_rows(splits):
        namespace: dict = {}
        for step in map(DEFAULT_FORMAT.parse, DEFAULT_FORMAT.split_steps(row["solution"])[:-1]):
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                exec(step.code, namespace)
            assert buffer.getvalue().strip() == step.output, row["id"]


_PHRASES = [  # an independent reading of the question: phrase -> operation
    (r"buys (\d+) more", "+"), (r"finds (\d+) more", "+"), (r"gives (?:him|her) (\d+)", "+"),
    (r"gives away (\d+)", "-"), (r"loses (\d+)", "-"), (r"sells (\d+)", "-"),
    (r"becomes (\d+) times", "*"), (r"for (\d+) new", "*"),
    (r"into (\d+) equal piles", "//"), (r"one out of every (\d+)", "//"),
]  # fmt: skip


def test_answers_follow_from_the_question_text(splits):
    for row in splits["test"]:
        sentences = row["question"].split(". ")
        value = int(re.search(r"\d+", sentences[0]).group())
        for sentence in [*sentences[1:-1], sentences[-1].split("?")[0].rsplit(". ", 1)[0]]:
            matches = [(op, re.search(p, sentence)) for p, op in _PHRASES if re.search(p, sentence)]
            if sentence.startswith("How many"):
                continue
            assert len(matches) == 1, (row["id"], sentence)
            op, match = matches[0]
            b = int(match.group(1))
            value = {"+": value + b, "-": value - b, "*": value * b, "//": value // b}[op]
        assert str(value) == row["answer"], row["question"]


def test_hand_checked_problem():
    row = make_toy_problems(1, seed=0)[0]
    assert row["question"] == (
        "There are 3 eggs in Ella's box. She loses 2 eggs. The number of eggs becomes 13 times as large. "
        "She trades each one for 6 new eggs. She sells 4 of the eggs. How many eggs does Ella have at the end?"
    )
    assert row["answer"] == "74"  # 3 - 2 = 1; 1 * 13 = 13; 13 * 6 = 78; 78 - 4 = 74
    steps = [DEFAULT_FORMAT.parse(t) for t in DEFAULT_FORMAT.split_steps(row["solution"])]
    assert [s.code for s in steps[:-1]] == [
        "eggs = 3 - 2\nprint(eggs)",
        "eggs = eggs * 13\nprint(eggs)",
        "eggs = eggs * 6\nprint(eggs)",
        "eggs = eggs - 4\nprint(eggs)",
    ]
    assert [s.output for s in steps[:-1]] == ["1", "13", "78", "74"]
    assert steps[-1].text == DEFAULT_FORMAT.render_answer_step("Ella ends with 74.", "74")


def test_divisions_are_exact(splits):
    # A flooring division maps many wrong values onto the gold one, so wrong reasoning would reach the
    # right answer by chance: every division in the toy task divides exactly, by 2..value/2.
    divisions = 0
    for row in _gold_rows(splits):
        value = None
        for step in map(DEFAULT_FORMAT.parse, DEFAULT_FORMAT.split_steps(row["solution"])[:-1]):
            match = re.fullmatch(r"\w+ = (\w+) // (\d+)\nprint\(\w+\)", step.code)
            if match:
                divisions += 1
                previous = int(match.group(1)) if match.group(1).isdigit() else value
                divisor = int(match.group(2))
                assert previous % divisor == 0 and 2 <= divisor <= previous // 2, row["id"]
            value = int(step.output)
    assert divisions > 50


# ---------------------------------------------------------------------------- tokenizer
def test_toy_tokenizer_keeps_tags_whole_and_round_trips(splits, toy_tokenizer):
    for tag in FORMAT_TAGS:
        assert len(toy_tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    assert 800 < len(toy_tokenizer) <= 800 + len(FORMAT_TAGS)  # a tag BPE already learned is not re-added
    for row in splits["test"].select(range(50)):
        text = DEFAULT_FORMAT.prompt(row["question"]) + row["solution"]
        ids = toy_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert toy_tokenizer.decode(ids) == text
        # the step format's stop strings are single tokens, so generation can stop on them
        for stop in DEFAULT_FORMAT.stop:
            assert toy_tokenizer.convert_tokens_to_ids(stop) in ids
    assert next(iter(toy_tokenizer_corpus(1))).startswith("<question>")
    assert toy_tokenizer.padding_side == "left"


def test_toy_tokenizer_is_deterministic(toy_tokenizer):
    again = build_toy_tokenizer(vocab_size=800, num_texts=500)
    assert again.get_vocab() == toy_tokenizer.get_vocab()


# ---------------------------------------------------------------------------- stage-0 bootstrap
_TINY = dict(
    num_train_problems=64, max_steps=20, batch_size=4, learning_rate=3e-3, hidden_size=32, num_layers=1,
    num_heads=2, vocab_size=400, tokenizer_texts=200, logging_steps=5,
)  # fmt: skip


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory):
    from svpo_trl.toy.bootstrap import ToySFTConfig, bootstrap_sft_policy

    out = tmp_path_factory.mktemp("toy_sft")
    return bootstrap_sft_policy(str(out), config=ToySFTConfig(seed=3, **_TINY))


def test_bootstrap_trains_every_parameter_and_lowers_the_loss(bootstrapped):
    from svpo_trl.toy.model import tiny_llama

    losses = [loss for _, loss in bootstrapped.loss_history]
    assert [step for step, _ in bootstrapped.loss_history] == [1, 5, 10, 15, 20]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5
    assert bootstrapped.final_train_loss == losses[-1]
    tokenizer = build_toy_tokenizer(vocab_size=400, num_texts=200)
    initial = tiny_llama(tokenizer, seed=3, hidden_size=32, num_layers=1, num_heads=2)
    trained = dict(bootstrapped.model.named_parameters())
    for name, param in initial.named_parameters():
        assert not torch.equal(param, trained[name].detach().cpu()), f"{name} did not move"
    assert bootstrapped.num_parameters == sum(p.numel() for p in initial.parameters())


def test_bootstrap_checkpoint_reloads_with_identical_logits(bootstrapped):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bootstrapped.output_dir)
    model = AutoModelForCausalLM.from_pretrained(bootstrapped.output_dir).eval()
    assert tokenizer.padding_side == "left"
    assert tokenizer.convert_tokens_to_ids("</code>") != tokenizer.unk_token_id
    row = load_toy_problems("test", 1)[0]
    ids = torch.tensor([tokenizer(DEFAULT_FORMAT.prompt(row["question"]) + row["solution"])["input_ids"]])
    trained = bootstrapped.model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained(ids.to(trained.device)).logits.cpu())
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_bootstrap_is_deterministic_by_seed(tmp_path):
    from svpo_trl.toy.bootstrap import ToySFTConfig, bootstrap_sft_policy

    short = {**_TINY, "max_steps": 4, "logging_steps": 1}
    first = bootstrap_sft_policy(str(tmp_path / "a"), config=ToySFTConfig(seed=5, **short))
    second = bootstrap_sft_policy(str(tmp_path / "b"), config=ToySFTConfig(seed=5, **short))
    other = bootstrap_sft_policy(str(tmp_path / "c"), config=ToySFTConfig(seed=6, **short))
    assert len(first.loss_history) == 4 and first.loss_history == second.loss_history
    assert other.loss_history != first.loss_history
    for (name, a), b in zip(first.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name


def test_sft_rows_mask_question_and_outputs(toy_tokenizer):
    from svpo_trl.toy.bootstrap import tokenize_sft_dataset

    problems = load_toy_problems("test", 2)
    rows = tokenize_sft_dataset(problems, toy_tokenizer)
    row, problem = rows[0], problems[0]
    expected = tokenize_solution(
        toy_tokenizer,
        DEFAULT_FORMAT.prompt(problem["question"]),
        DEFAULT_FORMAT.split_steps(problem["solution"]),
        add_eos=True,
    )
    assert row["input_ids"] == expected.input_ids and row["completion_mask"] == expected.completion_mask
    learned = toy_tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m])
    assert "<question>" not in learned and "<output>" not in learned
    assert "print(" in learned and f"Final Answer: ${problem['answer']}$" in learned
    assert row["input_ids"][-1] == toy_tokenizer.eos_token_id and row["completion_mask"][-1] == 1


def test_misread_solutions_are_consistent_wrong_demonstrations():
    misreadings = {"trades each one for": "+", "keeps one out of every": "-"}
    gold = load_toy_problems("train", 300)
    always = load_toy_problems("train", 300, misreadings=misreadings, misreading_rate=1.0)
    assert always["question"] == gold["question"] and always["answer"] == gold["answer"]
    changed = 0
    for g, m in zip(gold, always):
        misread = any(phrase in g["question"] for phrase in misreadings)
        changed += int(m["solution"] != g["solution"])
        assert (m["solution"] != g["solution"]) == misread, g["id"]
        steps = [DEFAULT_FORMAT.parse(s) for s in DEFAULT_FORMAT.split_steps(m["solution"])]
        # A misread step uses the misread op on the sentence's operand, and the rest follows from it
        namespace: dict = {}
        for step in steps[:-1]:
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                exec(step.code, namespace)
            assert buffer.getvalue().strip() == step.output
        assert steps[-1].final_answer == steps[-2].output
        sentences = g["question"].split(". ")[1:-1]  # the operation sentences, in order
        for sentence, step in zip(sentences, steps):
            op = re.search(r" (\+|-|\*|//) \d+\n", step.code).group(1)
            expected = next((wrong for phrase, wrong in misreadings.items() if phrase in sentence), None)
            if expected is not None:
                assert op == expected, (g["id"], sentence, step.code)
    assert changed > 100
    never = load_toy_problems("train", 300, misreadings=misreadings, misreading_rate=0.0)
    assert never["solution"] == gold["solution"]
    # The draws do not depend on the batch: a prefix gets the same misread solutions
    assert (
        load_toy_problems("train", 50, misreadings=misreadings, misreading_rate=0.5)["solution"]
        == (load_toy_problems("train", 300, misreadings=misreadings, misreading_rate=0.5)["solution"][:50])
    )
    with pytest.raises(ValueError, match="must occur in a toy template"):
        load_toy_problems("train", 5, misreadings={"eats": "-"}, misreading_rate=0.5)
    with pytest.raises(ValueError, match="misreading_rate"):
        load_toy_problems("train", 5, misreadings=misreadings, misreading_rate=1.5)


def test_sft_recipe_misreadings_flag_parses_phrase_equals_op():
    from svpo_trl.errors import UsageError
    from svpo_trl.pipeline import SFTScriptArguments

    args = SFTScriptArguments(toy_misreadings=["trades each one for=+", "keeps one out of every = -"])
    assert args.toy_misreading_map() == {"trades each one for": "+", "keeps one out of every": "-"}
    assert SFTScriptArguments().toy_misreading_map() == {}
    with pytest.raises(UsageError, match="'trades each one for' is not 'phrase=op'"):
        SFTScriptArguments(toy_misreadings=["trades each one for"]).toy_misreading_map()
    with pytest.raises(UsageError, match="toy_misreadings: misreading 'eats'"):
        SFTScriptArguments(toy_misreadings=["eats=-"]).toy_misreading_map()
    with pytest.raises(UsageError, match="op be one of"):
        SFTScriptArguments(toy_misreadings=["trades each one for=^"]).toy_misreading_map()
