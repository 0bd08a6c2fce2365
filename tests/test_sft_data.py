"""Stage-0 data: step-format rows in the natural layouts, refusals that name file/row/field, GSM8K conversion."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from svpo_trl.errors import PathNotFoundError, UsageError
from svpo_trl.sft_data import gsm8k_to_step_format, gsm8k_to_steps, load_sft_dataset, step_format_error
from svpo_trl.steps import DEFAULT_FORMAT as F

from conftest import FIGURE5_QUESTION, FIGURE5_STEPS, SHARED_DATA

GSM8K = os.path.join(SHARED_DATA, "gsm8k")
SOLUTION = "".join(FIGURE5_STEPS)  # the paper's Figure 5: a code step, then "Final Answer: $50$"
BOXED = SOLUTION.replace("Final Answer: $50$", "Final Answer: $\\boxed{50}$")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    "row",
    [
        {"question": FIGURE5_QUESTION, "solution": SOLUTION},
        {"question": FIGURE5_QUESTION, "answer": "50", "solution": SOLUTION},
        # an answer that looks like GSM8K's used to make the file GSM8K: the solution became ""
        {"question": FIGURE5_QUESTION, "answer": "20 + 30 = 50\n#### 50", "solution": SOLUTION},
        {"problem": FIGURE5_QUESTION, "solution": SOLUTION},  # the README's Final Answer: $…$ form, no \boxed
        {"problem": FIGURE5_QUESTION, "solution": BOXED, "answer": 50, "id": 7},
    ],
)
def test_natural_layouts_keep_the_step_format_solution(tmp_path, row):
    data = load_sft_dataset(str(write_jsonl(tmp_path / "steps.jsonl", [row, row])))
    assert data.dataset.column_names == ["question", "solution"]
    assert data.dataset[0] == {"question": FIGURE5_QUESTION, "solution": row["solution"]}
    assert (len(data.dataset), data.dropped) == (2, 0)


def test_files_folders_and_saved_datasets(tmp_path):
    rows = [{"question": f"{FIGURE5_QUESTION} ({i})", "solution": SOLUTION} for i in range(3)]
    (tmp_path / "array.json").write_text(json.dumps(rows))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved_dict"))
    for source in ("array.json", "folder", "saved", "saved_dict"):
        data = load_sft_dataset(str(tmp_path / source), "train")
        assert data.dataset["question"] == [r["question"] for r in rows], source
    with pytest.raises(UsageError, match=r"saved_dict: no split 'test' \(has \['train'\]\)"):
        load_sft_dataset(str(tmp_path / "saved_dict"), "test")


@pytest.mark.parametrize(
    ("solution", "reason"),
    [
        ("", "it is empty"),
        ("Natalia sold 48/2 = 24 clips. #### 24", "it does not start with <step>"),
        (FIGURE5_STEPS[0], r"no answer step \(Final Answer: \$...\$\) at the end"),
        (FIGURE5_STEPS[1] + FIGURE5_STEPS[0], "step 1 gives the final answer but 1 more step"),
        (
            FIGURE5_STEPS[0].replace("<output>\n50\n</output>\n", ""),
            r"step 1 is malformed \(code without <output>\)",
        ),
        (None, "it is empty"),
    ],
)
def test_rows_not_in_the_step_format_are_refused_naming_file_row_and_field(tmp_path, solution, reason):
    good = {"question": FIGURE5_QUESTION, "solution": SOLUTION}
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, {"question": "Q?", "solution": solution}, good])
    prefix = "mixed.jsonl, line 2: field 'solution' is not a step-format solution: "
    with pytest.raises(UsageError, match=prefix + reason):
        load_sft_dataset(str(path))


def test_missing_fields_are_named(tmp_path):
    gsm8k_like = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "1 + 1 = 2\n#### 2"}])
    with pytest.raises(UsageError, match=r"g.jsonl, line 1: no 'solution' field.*--convert_gsm8k"):
        load_sft_dataset(str(gsm8k_like))
    no_question = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Q?", "solution": SOLUTION}])
    with pytest.raises(UsageError, match=r"q.jsonl, line 1: no 'question' \(or 'problem'\) field"):
        load_sft_dataset(str(no_question))
    with pytest.raises(
        PathNotFoundError, match=r"--dataset_name: path does not exist: ./missing/steps.jsonl"
    ):
        load_sft_dataset("./missing/steps.jsonl")


def test_the_gsm8k_folder_is_refused_without_conversion():
    """It used to train on GSM8K's calculator text (not the step format) and mark the stage done."""
    with pytest.raises(UsageError, match=r"gsm8k/train.jsonl, line 1: no 'solution' field.*--convert_gsm8k"):
        load_sft_dataset(GSM8K, "train")


def test_hub_ids_are_looked_up(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if args[0] == "openai/gsm8k":
            return Dataset.from_list([{"question": "Q?", "answer": "2 * 3 = <<2*3=6>>6 eggs.\n#### 6"}])
        return Dataset.from_list([{"problem": "Q?", "solution": SOLUTION}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_sft_dataset("someone/step-solutions", "train").dataset["solution"] == [SOLUTION]
    assert load_sft_dataset("gsm8k", "train", convert_gsm8k=True).dataset["question"] == ["Q?"]
    assert calls == [
        (("someone/step-solutions",), {"split": "train"}),
        (("openai/gsm8k", "main"), {"split": "train"}),
    ]


# ------------------------------------------------------------------------------------ GSM8K conversion
NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def test_gsm8k_answer_becomes_code_steps_and_an_answer_step():
    steps, gold = gsm8k_to_steps(NATALIA)
    assert gold == "72"
    assert steps == [
        F.render_code_step("Natalia sold 48/2 = 24 clips in May.", "print(48/2)", "24.0"),
        F.render_code_step(
            "Natalia sold 48+24 = 72 clips altogether in April and May.", "print(48+24)", "72"
        ),
        F.render_answer_step("The answer is 72.", "72"),
    ]
    assert step_format_error("".join(steps)) is None
    assert [F.parse(s).kind for s in steps] == ["code", "code", "answer"]


@pytest.mark.parametrize(
    ("answer", "steps"),
    [
        # several marks on one line: one print each; text lines join the next step; $ and 1,000 are cleaned
        (
            "He has 3 boxes.\nThey cost 3*$1,000=$<<3*1000=3000>>3000 and 2^3=<<2^3=8>>8.\n#### 3,000",
            [
                (
                    "He has 3 boxes. They cost 3*$1,000=$3000 and 2^3=8.",
                    "print(3*1000)\nprint(2**3)",
                    "3000\n8",
                )
            ],
        ),
        # a calculation written out without a mark, and a statement rounded to its decimals
        ("Each gets 10/3=<<10/3=3.33>>3.33 cups.\nSo 20/4 = $5 each.\n#### 5", None),
    ],
)
def test_gsm8k_conversion_details(answer, steps):
    texts, _ = gsm8k_to_steps(answer)
    parsed = [F.parse(t) for t in texts]
    if steps is not None:
        assert [(p.analysis, p.code, p.output) for p in parsed[:-1]] == steps
    else:
        assert [p.code for p in parsed[:-1]] == ["print(10/3)", "print(20/4)"]
        assert parsed[0].output == "3.3333333333333335" and parsed[1].output == "5.0"
    assert parsed[-1].final_answer == answer.rsplit("####", 1)[1].strip().replace(",", "")


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ("She has five apples.\n#### 5", "no <<expr=value>> calculator marks"),
        ("2 + 2 = <<2+2=4>>4 and then some.\n#### 9", "no calculation gives the gold 9"),
        ("2 + 2 = <<2+2=5>>5.\n#### 5", r"<<2\+2=5>> computes 4, not 5"),
        ("x = <<a*2=4>>4\n#### 4", "not a Python expression|not plain arithmetic"),
        ("no gold here", "no '#### <gold>' line"),
    ],
)
def test_gsm8k_rows_that_do_not_convert_say_why(answer, error):
    converted = gsm8k_to_step_format({"question": "Q?", "answer": answer})
    assert converted["solution"] == ""
    assert re.search(error, converted["conversion_error"]), converted["conversion_error"]


def test_share_of_gsm8k_train_that_converts():
    """The figure the README quotes: 7,200 of 7,473 problems (96.3%); the rest dropped and counted."""
    data = load_sft_dataset(GSM8K, "train", convert_gsm8k=True)
    assert (data.rows_read, len(data.dataset), data.dropped) == (7473, 7200, 273)
    assert data.drop_reasons == {"no calculation gives the gold": 189, "no calculation": 84}
    assert "7,200 of 7,473 rows converted to the step format; 273 dropped" in data.summary()
    assert all(step_format_error(s) is None for s in data.dataset["solution"][::50])


def test_converted_solutions_run_in_the_sandbox_to_the_gold():
    """The first 60 converted training problems: every code step prints, in the real sandbox, exactly the
    output the conversion wrote, and the answer step states the gold (benchmarks/gsm8k_step_conversion.py
    checks all of them)."""
    from svpo_trl.grading import is_equiv
    from svpo_trl.sandbox import PythonSandbox

    rows = [json.loads(line) for line in Path(GSM8K, "train.jsonl").read_text().splitlines()[:60]]
    converted = [c for c in map(gsm8k_to_step_format, rows) if c["solution"]]
    assert len(converted) >= 55
    paths, expected = [], []
    for row in converted:
        steps = [F.parse(t) for t in F.split_steps(row["solution"])]
        codes = [s.code for s in steps[:-1]]
        paths += [codes[: k + 1] for k in range(len(codes))]
        expected += [s.output for s in steps[:-1]]
        assert is_equiv(steps[-1].final_answer, row["gold"])
    with PythonSandbox(timeout_s=5) as sandbox:
        results = sandbox.run_many(paths, max_workers=2)
    assert [r.stdout.strip() for r in results] == expected
    assert not any(r.error for r in results)
