"""Every recipe with tiny sizes: sft -> annotate -> value_sft -> svpo / dpo -> evaluate, and the pipeline.

The annotation of a few-step policy holds almost no correct solutions, so the training stages read
an annotation written here from the toy task's gold solutions (chosen) and corrupted copies of
them (rejected), in the exact layout the annotate stage writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, load_from_disk

from svpo_trl.pipeline import stage_done
from svpo_trl.steps import DEFAULT_FORMAT as F
from svpo_trl.toy.task import load_toy_problems

from conftest import accelerate_launch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))


def _wrong(step: str) -> str:
    """The same step with a different final answer (an incorrect solution)."""
    answer = F.parse(step).final_answer
    return step.replace(f"Final Answer: ${answer}$", f"Final Answer: ${int(answer) + 1}$")


def write_annotation(path: Path, num: int = 6) -> None:
    """pairs / solution_pairs / values built from gold toy solutions, as the annotate stage lays them out."""
    problems = load_toy_problems("train", num)
    pairs, values, solution_pairs = [], [], []
    for row in problems:
        prompt = F.prompt(row["question"])
        steps = F.split_steps(row["solution"])
        bad = [*steps[:-1], _wrong(steps[-1])]
        pairs.append(
            {
                "id": row["id"],
                "prompt": prompt,
                "chosen": "".join(steps[:1]),
                "rejected": "".join(bad[:1]).replace("print(", "print(1 + "),
                "chosen_value": 0.5,
                "rejected_value": -0.5,
                "pair_type": "sibling",
            }
        )
        solution_pairs.append(
            {
                "id": row["id"],
                "prompt": prompt,
                "chosen": "".join(steps),
                "rejected": "".join(bad),
                "chosen_value": 1.0,
                "rejected_value": -1.0,
                "pair_type": "solution",
            }
        )
        values.append(
            {
                "id": f"{row['id']}/0/1",
                "prompt": prompt,
                "steps": steps,
                "step_values": [0.5] * (len(steps) - 1) + [1.0],
                "correct": True,
            }
        )
        values.append(
            {
                "id": f"{row['id']}/0/2",
                "prompt": prompt,
                "steps": bad,
                "step_values": [0.5] * (len(bad) - 1) + [-1.0],
                "correct": False,
            }
        )
    for name, rows in [("pairs", pairs), ("solution_pairs", solution_pairs), ("values", values)]:
        Dataset.from_list(rows).save_to_disk(str(path / name))


def tiny_setting(root: Path) -> dict:
    train = {
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
    }
    return {
        "seed": 0,
        "bf16": False,
        "pipeline": {
            "output_dir": str(root),
            "evaluate_systems": [
                {"name": "SVPO", "model": str(root / "svpo"), "strategies": ["greedy", "sbs(1,2)"]}
            ],
        },
        "sft": {
            "model_name_or_path": "toy",
            "output_dir": str(root / "sft"),
            "toy_num_train_problems": 32,
            "toy_hidden_size": 32,
            "max_steps": 3,
            "per_device_train_batch_size": 8,
            "learning_rate": 2e-3,
            "logging_steps": 1,
            "report_to": "none",
        },
        "annotate": {
            "model_name_or_path": str(root / "sft"),
            "dataset_split": "annotate",
            "limit": 2,
            "output_dir": str(root / "annotation_mcts"),
            "max_simulations": 2,
            "max_trees": 1,
            "num_children": 2,
            "max_depth": 2,
            "max_new_tokens": 24,
            "progress": False,
        },
        "value_sft": {
            "model_name_or_path": str(root / "sft"),
            "annotation_dir": str(root / "annotation"),
            "output_dir": str(root / "value_sft"),
            **train,
        },
        "svpo": {
            "model_name_or_path": str(root / "value_sft"),
            "annotation_dir": str(root / "annotation"),
            "output_dir": str(root / "svpo"),
            **train,
        },
        "dpo": {
            "model_name_or_path": str(root / "value_sft"),
            "annotation_dir": str(root / "annotation"),
            "dataset_config": "solution_pairs",
            "recipe": "dpo",
            "output_dir": str(root / "dpo"),
            **train,
        },
        "evaluate": {"datasets": ["toy"], "limit": 2, "max_depth": 2, "max_new_tokens": 16},
    }


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    path = root / "setting.yaml"
    path.write_text(yaml.safe_dump(tiny_setting(root)))
    write_annotation(root / "annotation")
    return root, str(path)


def test_each_recipe_in_order(setting):
    root, config = setting
    import annotate
    import evaluate
    import sft
    import svpo
    import value_sft

    sft_results = sft.main(["--config", config])
    assert stage_done(str(root / "sft")) and sft_results["final_train_loss"] > 0
    assert (root / "sft" / "tokenizer.json").exists()

    summary = annotate.main(["--config", config])
    for name in ("trees", "pairs", "values", "solution_pairs"):
        assert (root / "annotation_mcts" / name / "dataset_info.json").exists(), name
    assert summary["problems"] == 2 and summary["trees"] == 2
    # On the toy task the stage checks its own labels against the gold steps
    quality = json.loads((root / "annotation_mcts" / "label_quality.json").read_text())
    assert summary["label_quality"] == quality
    assert set(quality["precision"]) == {"pairs", "solution_pairs"}
    assert quality["reach"]["deepest"] <= 2 and sum(quality["reach"]["deepest_node_per_tree"].values()) == 2
    assert sum(v["problems"] for v in quality["reach"]["solved_by_operations"].values()) == 2

    value_sft.main(["--config", config])
    marker = json.loads((root / "value_sft" / "svpo_stage.json").read_text())
    assert marker["stage"] == "value_sft" and marker["results"]["train_steps"] == 2
    saved = json.loads((root / "value_sft" / "config.json").read_text())
    assert saved["has_value_head"] is True

    svpo_results = svpo.main(["--config", config])
    assert svpo_results["num_pairs"] == 6
    dpo_results = svpo.main(["--config", config, "--section", "dpo"])
    dpo_marker = json.loads((root / "dpo" / "svpo_stage.json").read_text())
    assert (
        dpo_marker["configs"]["training"]["margin_weight"] == 0.0
    )  # the dpo recipe switched the value terms off
    assert dpo_results["num_pairs"] == 6

    eval_dir = root / "eval_svpo"
    args = ["--config", config, "--model_name_or_path", str(root / "svpo"), "--output_dir", str(eval_dir)]
    rows = evaluate.main([*args, "--strategies", "greedy", "sbs(1,2)"])
    assert [r["strategy"] for r in rows] == ["greedy", "SBS (B1=1, B2=2)"]
    assert all(r["num_problems"] == 2 for r in rows)
    records = [json.loads(line) for line in (eval_dir / "svpo__toy__sbs1x2.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["value"] is None or -1 <= r["value"] <= 1 for r in records)
    assert "| svpo | greedy |" in (eval_dir / "results.md").read_text()

    evaluate.main(
        [
            *args,
            "--output_dir",
            str(root / "eval_diag"),
            "--value_diagnostic",
            "--value_diagnostic_samples",
            "2",
        ]
    )
    metrics = json.loads((root / "eval_diag" / "svpo__toy__value_diagnostic.json").read_text())
    assert metrics["num_problems"] == 2 and metrics["labels"] == "GoldLabeler" and metrics["num_samples"] == 2
    assert 0 <= metrics["oracle_ceiling"] <= 1 and metrics["groups"] >= 2
    for key in ("within_group_accuracy", "prior_within_group_accuracy"):
        assert metrics[key] is None or 0 <= metrics[key] <= 1
    diag = (root / "eval_diag" / "svpo__toy__value_diagnostic.jsonl").read_text().splitlines()
    assert len(diag) == 2 and "candidates" in diag[0]


def test_pipeline_skips_finished_stages_and_prints_the_table(setting, capsys):
    root, config = setting
    from svpo_trl.pipeline import run_pipeline

    run_pipeline(config, stages=["sft"])
    assert "sft: done already" in capsys.readouterr().out
    rows = run_pipeline(config, stages=["evaluate"])
    out = capsys.readouterr().out
    assert [r["system"] for r in rows] == ["SVPO", "SVPO"]
    assert "| SVPO | greedy |" in out and (root / "results.md").exists()


def test_svpo_recipe_names_an_unknown_recipe(setting):
    _, config = setting
    import svpo

    with pytest.raises(ValueError, match="recipe 'nope' unknown"):
        svpo.main(["--config", config, "--recipe", "nope", "--output_dir", os.devnull + "_x"])


def test_evaluate_runs_under_accelerate_launch(setting):
    root, config = setting
    out = root / "eval_accelerate"
    cmd = accelerate_launch(REPO / "accelerate_configs" / "cpu.yaml")
    cmd += [
        str(REPO / "recipes" / "evaluate.py"),
        "--config",
        config,
        "--model_name_or_path",
        str(root / "sft"),
    ]
    cmd += ["--output_dir", str(out), "--strategies", "greedy"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())[0]["num_problems"] == 2


def launch_recipe(recipe: str, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [*accelerate_launch(REPO / "accelerate_configs" / "multi_process_cpu.yaml", processes)]
    cmd += [str(REPO / "recipes" / recipe), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.distributed
def test_annotate_and_evaluate_recipes_shard_across_two_processes(setting):
    root, config = setting
    out = root / "annotation_2proc"
    done = launch_recipe("annotate.py", "--config", config, "--limit", "4", "--output_dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    marker = json.loads((out / "svpo_stage.json").read_text())
    assert marker["results"]["processes"] == 2 and marker["results"]["problems"] == 4
    trees = load_from_disk(str(out / "trees"))
    assert trees["id"] == [row["id"] for row in load_toy_problems("annotate", 4)]
    assert (out / "solution_pairs" / "dataset_info.json").exists()

    one, two = root / "eval_1proc", root / "eval_2proc"
    args = ["--config", config, "--model_name_or_path", str(root / "sft"), "--limit", "4"]
    for path, processes in ((one, 1), (two, 2)):
        done = launch_recipe("evaluate.py", *args, "--output_dir", str(path), processes=processes)
        assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (two / "sft__toy__greedy.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [row["id"] for row in load_toy_problems("test", 4)]
    assert json.loads((two / "results.json").read_text())[0]["num_problems"] == 4
    assert not list(two.glob("*.part-*"))
    # Greedy decoding of the same questions: the same solutions whichever process ran them.
    single = [json.loads(line) for line in (one / "sft__toy__greedy.jsonl").read_text().splitlines()]
    assert [r["solution"] for r in lines] == [r["solution"] for r in single]
