"""Sharding annotation and evaluation across processes: assignment, merge, resume per shard.

The multi-process tests start real processes with ``accelerate launch`` (torchrun, gloo on the CPU)
running ``tests/sharded_worker.py``, whose scripted policy makes the result independent of how the
problems are split, so a sharded run must equal a single-process run exactly.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from datasets import load_from_disk

from svpo_trl.distributed import ProcessShard, shard_positions
from svpo_trl.evaluation import evaluate

import sharded_worker
from conftest import accelerate_launch

REPO = Path(__file__).resolve().parents[1]
LAUNCH_CONFIG = REPO / "accelerate_configs" / "multi_process_cpu.yaml"


def launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [*accelerate_launch(LAUNCH_CONFIG, processes), str(REPO / "tests" / "sharded_worker.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


def datasets_of(path: Path) -> dict[str, list]:
    return {name: load_from_disk(str(path / name)).to_list() for name in ("trees", "pairs", "values")}


def records_of(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


# ---------------------------------------------------------------------------- assignment
def test_shards_partition_the_problems_evenly_whatever_their_order():
    ids = [f"gsm8k-{i}" for i in range(101)]
    for world in (1, 2, 3, 8):
        shares = [shard_positions(ids, rank, world) for rank in range(world)]
        flat = [p for share in shares for p in share]
        assert sorted(flat) == list(range(101))  # disjoint and complete
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert all(share == sorted(share) for share in shares)  # each rank works in dataset order
    # The assignment follows the ids, not the rows' order.
    reversed_ids = ids[::-1]
    for rank in range(3):
        forward = {ids[p] for p in shard_positions(ids, rank, 3)}
        backward = {reversed_ids[p] for p in shard_positions(reversed_ids, rank, 3)}
        assert forward == backward
    # Hashing mixes the dataset order: rank 0 of 2 does not just take the first half.
    first = shard_positions(ids, 0, 2)
    assert 20 < sum(p < 50 for p in first) < 31


def test_shard_arguments_are_checked():
    with pytest.raises(ValueError, match="rank must be in"):
        shard_positions(["a"], 2, 2)
    with pytest.raises(ValueError, match="world_size must be"):
        shard_positions(["a"], 0, 0)
    single = ProcessShard.from_environment()
    assert (single.rank, single.world_size, single.is_main, single.is_distributed) == (0, 1, True, False)
    assert single.gather({"x": 1}) == [{"x": 1}] and single.broadcast(5) == 5


# ---------------------------------------------------------------------------- annotation
@pytest.fixture(scope="module")
def single_annotation(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    annotator = sharded_worker.annotator()
    annotator.annotate(sharded_worker.PROBLEMS, out)
    return out, annotator.summary


@pytest.mark.distributed
def test_two_processes_annotate_exactly_what_one_does(tmp_path, single_annotation):
    single, summary = single_annotation
    done = launch("annotate", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert datasets_of(tmp_path) == datasets_of(single)
    reports = [json.loads((tmp_path / f"report-{r}.json").read_text()) for r in (0, 1)]
    # Every process returns the merged datasets and the merged summary.
    assert reports[0]["rows"] == reports[1]["rows"] == {"trees": 18, "pairs": 62, "values": 108}
    merged = reports[1]["summary"]
    assert merged["processes"] == 2 and summary["processes"] == 1
    # Counts add up over the processes: the same tokens as one process, in two backend streams.
    assert merged["tokens_this_run"] == summary["tokens_this_run"] == merged["tokens"]
    assert merged["trees"] == summary["trees"] == 18


@pytest.mark.distributed
def test_a_killed_process_resumes_its_shard_with_another_process_count(tmp_path, single_annotation):
    single, summary = single_annotation
    crashed = launch("annotate", str(tmp_path), "--crash-rank", "1", "--crash-after", "3")
    assert crashed.returncode != 0
    written = len(list((tmp_path / "shards").rglob("tree_*.json")))
    assert 3 <= written < 18 and not (tmp_path / "trees").exists()
    resumed = launch("annotate", str(tmp_path), processes=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert datasets_of(tmp_path) == datasets_of(single)
    report = json.loads((tmp_path / "report-2.json").read_text())["summary"]
    assert report["processes"] == 3 and report["trees_resumed"] == written
    # Only the lost work ran again.
    assert 0 < report["tokens_this_run"] < summary["tokens_this_run"]


def test_rank_zero_names_problems_whose_trees_it_cannot_find(tmp_path):
    annotator = sharded_worker.annotator()
    problems = annotator._problems(sharded_worker.PROBLEMS)
    annotator._session = {}
    with pytest.raises(RuntimeError, match=r"9 of 9 problems have unfinished trees .*'q0', 'q1'.*shared"):
        annotator._build_datasets(problems, tmp_path)


# ---------------------------------------------------------------------------- evaluation
def run_eval(out: Path, **kwargs):
    backend = sharded_worker.backend()
    result = evaluate(
        backend,
        sharded_worker.PROBLEMS,
        "sbs(2,3)",
        sandbox=sharded_worker.ConstantSandbox(),
        max_depth=3,
        batch_size=2,
        grader=sharded_worker.exact_match,
        output_jsonl=out / "eval.jsonl",
        progress=False,
        **kwargs,
    )
    asked = Counter(prompt.split("What is ")[1].split(" +")[0] for call in backend.calls for prompt in call)
    return result, asked


@pytest.mark.distributed
def test_sharded_evaluation_equals_one_process_and_resumes_a_killed_shard(tmp_path):
    single, asked = run_eval(tmp_path / "one")
    assert set(asked) == {str(i) for i in range(9)} and 0 < single.metrics["accuracy"] < 1
    expected = records_of(tmp_path / "one" / "eval.jsonl")
    assert [r["id"] for r in expected] == [p["id"] for p in sharded_worker.PROBLEMS]

    two = tmp_path / "two"
    done = launch("evaluate", str(two), "--strategy", "sbs(2,3)")
    assert done.returncode == 0, done.stderr[-3000:]
    assert records_of(two / "eval.jsonl") == expected
    reports = [json.loads((two / f"report-{r}.json").read_text()) for r in (0, 1)]
    assert (
        reports[0]["metrics"]["accuracy"] == reports[1]["metrics"]["accuracy"] == single.metrics["accuracy"]
    )
    assert sorted(reports[0]["asked"] + reports[1]["asked"]) == [str(i) for i in range(9)]  # disjoint shares
    assert not list(two.glob("*.part-*"))

    killed = tmp_path / "killed"
    crashed = launch(
        "evaluate", str(killed), "--strategy", "sbs(2,3)", "--crash-rank", "1", "--crash-after", "1"
    )
    assert crashed.returncode != 0 and not (killed / "eval.jsonl").exists()
    saved = sum(len(p.read_text().splitlines()) for p in killed.glob("eval.jsonl.part-*"))
    assert 0 < saved < 9
    resumed = launch("evaluate", str(killed), "--strategy", "sbs(2,3)")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert records_of(killed / "eval.jsonl") == expected
    reports = [json.loads((killed / f"report-{r}.json").read_text()) for r in (0, 1)]
    assert len(reports[0]["asked"]) + len(reports[1]["asked"]) == 9 - saved  # only the lost problems
    assert not list(killed.glob("*.part-*"))


def test_evaluation_resumes_from_part_files_in_one_process(tmp_path):
    full, _ = run_eval(tmp_path / "full")
    expected = records_of(tmp_path / "full" / "eval.jsonl")
    out = tmp_path / "resume"
    out.mkdir()
    lines = (tmp_path / "full" / "eval.jsonl").read_text().splitlines()
    # A previous run recorded q0, q3 and q4, then died in the middle of writing a line.
    (out / "eval.jsonl.part-00003").write_text("\n".join([lines[0], lines[3], lines[4], lines[5][:40]]))
    result, asked = run_eval(out)
    assert set(asked) == {"1", "2", "5", "6", "7", "8"}
    assert records_of(out / "eval.jsonl") == expected and result.metrics == full.metrics | {
        "seconds_per_question": result.metrics["seconds_per_question"]
    }
    assert not list(out.glob("*.part-*"))
    # Records of another strategy are not taken for this one, and resume=False starts over.
    (out / "eval.jsonl.part-00000").write_text(lines[0].replace("SBS (B1=2, B2=3)", "greedy") + "\n")
    _, asked = run_eval(out)
    assert "0" in asked
    (out / "eval.jsonl.part-00000").write_text(lines[0] + "\n")
    _, asked = run_eval(out, resume=False)
    assert len(asked) == 9


def test_resuming_with_repeated_ids_is_refused(tmp_path):
    problems = [*sharded_worker.PROBLEMS[:2], {**sharded_worker.PROBLEMS[2], "id": "q0"}]
    (tmp_path / "eval.jsonl.part-00000").write_text(
        json.dumps({"id": "q0", "strategy": "greedy", "correct": True}) + "\n"
    )
    with pytest.raises(ValueError, match=r"problem ids repeat \(\['q0'\]\)"):
        evaluate(
            sharded_worker.backend(),
            problems,
            "greedy",
            sandbox=sharded_worker.ConstantSandbox(),
            output_jsonl=tmp_path / "eval.jsonl",
            progress=False,
        )
    # Without part files, repeated ids are fine: records are kept by position.
    (tmp_path / "eval.jsonl.part-00000").unlink()
    result = evaluate(
        sharded_worker.backend(),
        problems,
        "greedy",
        sandbox=sharded_worker.ConstantSandbox(),
        max_depth=3,
        grader=sharded_worker.exact_match,
        output_jsonl=tmp_path / "eval.jsonl",
        progress=False,
    )
    assert [r["question"] for r in result.records] == [p["question"] for p in problems]
