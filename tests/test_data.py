"""Tests of the problem loaders: local copies of the four benchmarks, the Hub dispatch, bad input."""

from __future__ import annotations

import json
import os
import sys

import datasets
import pytest

from svpo_trl.data import HUB_SOURCES, ProblemFormatError, detect_schema, load_problems
from svpo_trl.grading import is_equiv

from conftest import SHARED_DATA

# (directory, split, rows, index checked, gold answer of that row): counts of Table 6 and the README.
LOCAL_SETS = [
    ("gsm8k", "test", 1319, 0, "18"),
    ("gsm8k", "train", 7473, 0, "72"),
    ("math", "test", 5000, 0, "2"),
    ("gaokao2023en", "test", 385, 5, "\\frac{\\pi}{3}"),
    ("ocw", "test", 272, 1, "4.5e33"),
]


@pytest.mark.parametrize(("name", "split", "rows", "index", "gold"), LOCAL_SETS)
def test_local_sets_load_with_gold_answers(name, split, rows, index, gold):
    problems = load_problems(os.path.join(SHARED_DATA, name), split)
    assert len(problems) == rows
    assert {"id", "question", "answer", "answers"} <= set(problems.column_names)
    assert problems[index]["answer"] == gold
    assert problems[index]["answers"][0] == gold
    assert problems[index]["id"] == f"{name}/{split}/{index}"
    ids = problems["id"]
    assert len(set(ids)) == rows
    assert all(isinstance(q, str) and q for q in problems["question"])


def test_local_set_details():
    gsm8k = load_problems(os.path.join(SHARED_DATA, "gsm8k"))  # default split: test
    assert gsm8k[0]["question"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert gsm8k[0]["solution"].endswith("every day at the farmer\u2019s market.")
    math = load_problems(os.path.join(SHARED_DATA, "math"), "test")
    assert math[333]["answers"] == ["3", "-3"] and math[333]["answer"] == "3"
    assert math[0]["type"] == "Real"
    assert is_equiv("-3", math[333]["answers"])
    ocw = load_problems(os.path.join(SHARED_DATA, "ocw"))
    assert ocw[0]["question"].startswith("Each of the two Magellan telescopes")
    assert ocw[0]["type"] == "Introduction to Astronomy (8.282J Spring 2006)"
    gaokao = load_problems(os.path.join(SHARED_DATA, "gaokao2023en"))
    assert gaokao[0]["answer"] == "\\{x|-2\\leq x < 1\\}"
    # The published file has two rows whose answer leaked into the question; they stay, empty.
    assert [row["id"] for row in gaokao if not row["answer"]] == [
        "gaokao2023en/test/167",
        "gaokao2023en/test/192",
    ]


def test_a_file_path_loads_like_its_directory():
    by_file = load_problems(os.path.join(SHARED_DATA, "math", "test_annotated.json"))
    assert len(by_file) == 5000
    assert by_file[2912]["id"] == "math/test/2912"
    assert by_file[2912]["answers"][0] == "\\left(\\tfrac32, -\\tfrac52\\right)"
    by_file = load_problems(os.path.join(SHARED_DATA, "gsm8k", "train.jsonl"))
    assert len(by_file) == 7473 and by_file[7472]["id"] == "gsm8k/train/7472"


@pytest.mark.parametrize(
    ("row", "schema"),
    [
        ({"question": "q", "answer": "so\n#### 3"}, "gsm8k"),
        ({"index": 1, "question": "q", "answer": ["3", "-3"], "human_type": "Real"}, "math"),
        ({"source": "s", "question": "q", "lang": "en", "answer": "$1$"}, "gaokao2023en"),
        ({"problem": "p", "solution": "\\boxed{1}", "type": "t", "idx": 0}, "ocw"),
        ({"problem": "p", "solution": "\\boxed{1}", "level": "Level 1", "type": "Algebra"}, "math_solution"),
        ({"question": "q", "answer": "1"}, "generic"),
    ],
)
def test_detect_schema(row, schema):
    assert detect_schema(row) == schema


# ----------------------------------------------------------------------------- bad input
def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_missing_field_names_file_line_and_field(tmp_path):
    file = _write(
        tmp_path / "test.jsonl",
        [json.dumps({"question": "a", "answer": "x\n#### 1"}), json.dumps({"question": "b"})],
    )
    with pytest.raises(ProblemFormatError) as error:
        load_problems(file)
    message = str(error.value)
    assert file in message and "line 2" in message and "'answer'" in message


def test_malformed_json_line_names_file_and_line(tmp_path):
    file = _write(
        tmp_path / "test.jsonl",
        [json.dumps({"question": "a", "answer": "#### 1"}), "", '{"question": "b", "answer": '],
    )
    with pytest.raises(ProblemFormatError, match=r"test\.jsonl, line 3: malformed JSON"):
        load_problems(file)


def test_malformed_field_in_json_array_names_row(tmp_path):
    rows = [{"index": 1, "question": "q", "answer": "1"}, {"index": 2, "question": "q", "answer": {"a": 1}}]
    file = tmp_path / "test_annotated.json"
    file.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(ProblemFormatError, match=r"test_annotated\.json, row 1: .*'answer' must be a string"):
        load_problems(str(tmp_path))


def test_gsm8k_row_without_marker_and_ocw_row_without_box(tmp_path):
    gsm = _write(tmp_path / "a.jsonl", [json.dumps({"question": "q", "answer": "1\n#### 1"})] * 2)
    bad = _write(
        tmp_path / "b.jsonl",
        [
            json.dumps({"question": "q", "answer": "1\n#### 1"}),
            json.dumps({"question": "q", "answer": "no marker"}),
        ],
    )
    assert len(load_problems(gsm)) == 2
    with pytest.raises(ProblemFormatError, match=r"b\.jsonl, line 2: .*####"):
        load_problems(bad)
    ocw = _write(
        tmp_path / "c.jsonl", [json.dumps({"problem": "p", "solution": "none", "type": "t", "idx": 0})]
    )
    with pytest.raises(ProblemFormatError, match=r"c\.jsonl, line 1: .*boxed"):
        load_problems(ocw)


def test_unknown_name_missing_split_and_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file, a directory, nor a known benchmark"):
        load_problems("no_such_benchmark")
    with pytest.raises(FileNotFoundError, match="no file for split 'valid'"):
        load_problems(os.path.join(SHARED_DATA, "gsm8k"), "valid")
    with pytest.raises(ProblemFormatError, match="no problems"):
        load_problems(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ValueError, match="gaokao2023en has no split 'train'"):
        load_problems("gaokao2023en", "train")


# ----------------------------------------------------------------------------- Hub dispatch
def test_hub_names_dispatch_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path == "openai/gsm8k":
            return datasets.Dataset.from_list([{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
        return datasets.Dataset.from_list(
            [{"problem": f"{name}?", "level": "Level 1", "type": "Algebra", "solution": "so $\\boxed{5}$"}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    gsm8k = load_problems("gsm8k", "train")
    assert calls == [("openai/gsm8k", "main", "train")]
    assert gsm8k[0] == {
        "id": "gsm8k/train/0",
        "question": "1+1?",
        "answer": "2",
        "answers": ["2"],
        "solution": "1+1=2",
    }
    calls.clear()
    math = load_problems("math", "train")
    assert [c[0] for c in calls] == ["EleutherAI/hendrycks_math"] * 7 and {c[2] for c in calls} == {"train"}
    assert len(math) == 7 and math[6]["id"] == "math/train/6"
    assert math[0]["question"] == "algebra?" and math["answer"] == ["5"] * 7 and math[0]["level"] == "Level 1"


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("math", "math/test_annotated.json"),
        ("gaokao2023en", "gaokao2023en/test.jsonl"),
        ("ocw", "ocw/test.jsonl"),
    ],
)
def test_published_files_go_through_the_download_manager(monkeypatch, name, local):
    urls = []

    def fake_download(self, url):
        urls.append(url)
        return os.path.join(SHARED_DATA, local)  # the same file, as the download would cache it

    monkeypatch.setattr(datasets.DownloadManager, "download", fake_download)
    problems = load_problems(name)
    assert urls == [HUB_SOURCES[name]["test"]["url"]]
    assert urls[0].startswith("https://raw.githubusercontent.com/")
    assert problems[:3] == load_problems(os.path.join(SHARED_DATA, local))[:3]


# ----------------------------------------------------------------------------- toy hook
def test_toy_hook(monkeypatch):
    calls = []
    fake = type(sys)("svpo_trl.toy.task")
    fake.load_toy_problems = lambda split: calls.append(split) or split
    monkeypatch.setitem(sys.modules, "svpo_trl.toy.task", fake)
    assert load_problems("toy", "train") == "train"
    assert load_problems("toy:annotate") == "annotate"
    assert load_problems("toy") == "test"
    monkeypatch.setitem(sys.modules, "svpo_trl.toy.task", None)  # import fails
    with pytest.raises(ImportError, match="load_toy_problems"):
        load_problems("toy")


@pytest.mark.slow  # generating the 300 toy test problems takes ~10 s on a loaded 2-core machine
def test_toy_name_serves_the_real_toy_task():
    problems = load_problems("toy", "test")
    assert {"id", "question", "answer"} <= set(problems.column_names)
    assert len(problems) == 300 and len(set(problems["id"])) == 300


def test_a_dataset_saved_without_rows_loads_back_empty(tmp_path):
    from datasets import Dataset, Features, Value

    from svpo_trl.data import load_saved_dataset

    features = Features({"prompt": Value("string"), "chosen_value": Value("float64")})
    Dataset.from_dict({"prompt": [], "chosen_value": []}, features=features).save_to_disk(tmp_path / "empty")
    empty = load_saved_dataset(tmp_path / "empty")
    assert len(empty) == 0 and empty.features == features
    Dataset.from_dict({"prompt": ["a"], "chosen_value": [0.5]}, features=features).save_to_disk(
        tmp_path / "one"
    )
    assert load_saved_dataset(tmp_path / "one").to_list() == [{"prompt": "a", "chosen_value": 0.5}]
