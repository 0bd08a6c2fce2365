"""Every recipe with tiny sizes: sft -> annotate -> value_sft -> svpo / dpo -> evaluate, and the pipeline.

The annotation of a few-step policy holds almost no correct solutions, so the training stages read
an annotation written here from the toy task's gold solutions (chosen) and corrupted copies of
them (rejected), in the exact layout the annotate stage writes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, load_from_disk

from svpo_trl.errors import PathNotFoundError, UsageError
from svpo_trl.pipeline import stage_done
from svpo_trl.steps import DEFAULT_FORMAT as F
from svpo_trl.toy.task import load_toy_problems

from conftest import SHARED_DATA, accelerate_launch

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
    """Stages the recipes finished with the same setting are up to date for the pipeline: what a trainer
    does to its arguments while it trains does not make its own marker look stale."""
    root, config = setting
    from svpo_trl.pipeline import run_pipeline

    stages = ["sft", "value_sft", "svpo", "dpo"]
    run_pipeline(config, stages=stages)
    out = capsys.readouterr().out
    assert all(f"{stage}: done already" in out for stage in stages), out
    rows = run_pipeline(config, stages=["evaluate"])
    out = capsys.readouterr().out
    assert [r["system"] for r in rows] == ["SVPO", "SVPO"]
    assert "| SVPO | greedy |" in out and (root / "results.md").exists()
    assert run_pipeline(config, stages=["evaluate"]) == rows
    assert "evaluate SVPO: done already" in capsys.readouterr().out


def test_pipeline_reruns_a_stage_made_with_other_settings(tmp_path, capsys):
    """A 3-step SFT is not reused for a 4-step setting: it runs again, the old output kept aside."""
    from svpo_trl.pipeline import read_marker, run_pipeline

    setting = tiny_setting(tmp_path)
    path = tmp_path / "setting.yaml"
    path.write_text(yaml.safe_dump(setting))
    run_pipeline(str(path), stages=["sft"])
    first = read_marker(str(tmp_path / "sft"))
    assert first["settings"]["training"]["max_steps"] == 3
    run_pipeline(str(path), stages=["sft"])
    assert "sft: done already" in capsys.readouterr().out

    setting["sft"]["max_steps"] = 4
    setting["sft"]["logging_steps"] = 2  # how a stage logs does not decide its output
    path.write_text(yaml.safe_dump(setting))
    run_pipeline(str(path), stages=["sft"])
    out = capsys.readouterr().out
    assert "made with other settings (max_steps: 3 -> 4); running it again" in out, out
    assert "logging_steps" not in out
    assert read_marker(str(tmp_path / "sft"))["settings"]["training"]["max_steps"] == 4
    assert read_marker(str(tmp_path / "sft.stale-1")) == first  # moved aside, not deleted


def test_stage_changes_follow_settings_and_inputs(tmp_path):
    from svpo_trl.pipeline import (
        AnnotateScriptArguments,
        TrainScriptArguments,
        mark_stage_done,
        stage_changes,
    )
    from svpo_trl.search.mcts import MCTSConfig
    from svpo_trl.trainer.value_sft_config import ValueSFTConfig

    def annotate(**script):
        args = AnnotateScriptArguments(model_name_or_path=str(tmp_path / "sft"), **script)
        return {"script": args, "mcts": MCTSConfig(max_simulations=20, output_dir=str(tmp_path / "ann"))}

    mark_stage_done(str(tmp_path / "sft"), "sft", {"script": {"model_name_or_path": "toy"}}, {})
    mark_stage_done(str(tmp_path / "ann"), "annotate", annotate(limit=6), {})
    assert stage_changes(str(tmp_path / "ann"), "annotate", annotate(limit=6, generation_batch_size=7)) == {}
    assert stage_changes(str(tmp_path / "ann"), "annotate", annotate(limit=200)) == {"limit": (6, 200)}
    assert stage_changes(str(tmp_path / "nowhere"), "annotate", annotate(limit=6)) is None
    # A field a newer svpo_trl added, unset (None) now, does not make a finished stage stale; set, it does.
    marker = tmp_path / "ann" / "svpo_stage.json"
    recorded = json.loads(marker.read_text())
    recorded["settings"]["script"]["an_added_field"] = "x"
    marker.write_text(json.dumps(recorded))
    assert stage_changes(str(tmp_path / "ann"), "annotate", annotate(limit=6)) == {
        "an_added_field": ("x", None)
    }
    del recorded["settings"]["script"]["an_added_field"]
    del recorded["settings"]["script"]["limit"]
    marker.write_text(json.dumps(recorded))
    assert stage_changes(str(tmp_path / "ann"), "annotate", annotate(limit=None)) == {}
    assert stage_changes(str(tmp_path / "ann"), "annotate", annotate(limit=6)) == {"limit": (None, 6)}
    mark_stage_done(str(tmp_path / "ann"), "annotate", annotate(limit=6), {})

    def value_sft(**training):
        script = TrainScriptArguments(
            model_name_or_path=str(tmp_path / "sft"), annotation_dir=str(tmp_path / "ann")
        )
        args = ValueSFTConfig(output_dir=str(tmp_path / "v"), use_cpu=True, report_to="none", **training)
        return {"script": script, "training": args.to_dict()}

    mark_stage_done(str(tmp_path / "v"), "value_sft", value_sft(), {})
    assert (
        stage_changes(str(tmp_path / "v"), "value_sft", value_sft(logging_steps=3, save_strategy="no")) == {}
    )
    assert stage_changes(str(tmp_path / "v"), "value_sft", value_sft(mse_weight=0.5)) == {
        "mse_weight": (0.01, 0.5)
    }
    # The annotation it was trained on is made again with other settings: the value model is out of date.
    mark_stage_done(str(tmp_path / "ann"), "annotate", annotate(limit=200), {})
    assert list(stage_changes(str(tmp_path / "v"), "value_sft", value_sft())) == ["input annotation_dir"]
    # A marker from before settings were recorded is never taken as up to date.
    marker = tmp_path / "v" / "svpo_stage.json"
    marker.write_text(json.dumps({"stage": "value_sft", "configs": {}, "results": {}}))
    assert "settings" in stage_changes(str(tmp_path / "v"), "value_sft", value_sft())


def test_svpo_recipe_names_an_unknown_recipe(setting):
    _, config = setting
    import svpo

    with pytest.raises(ValueError, match="recipe 'nope' unknown"):
        svpo.main(["--config", config, "--recipe", "nope", "--output_dir", os.devnull + "_x"])


def test_missing_local_paths_fail_before_anything_loads(setting):
    root, config = setting
    import annotate
    import evaluate
    import sft
    import svpo
    import value_sft

    missing = str(root / "not_run_yet" / "sft")
    for recipe, extra in [
        (annotate, []),
        (evaluate, ["--output_dir", str(root / "eval_missing")]),
        (value_sft, []),
        (svpo, []),
        (sft, ["--dataset_name", str(root / "steps.jsonl")]),
    ]:
        with pytest.raises(PathNotFoundError, match=f"--model_name_or_path: path does not exist: {missing}$"):
            recipe.main(["--config", config, "--model_name_or_path", missing, *extra])
    with pytest.raises(
        PathNotFoundError, match=r"--annotation_dir: path does not exist: outputs_x/toy/annotation"
    ):
        value_sft.main(["--config", config, "--annotation_dir", "outputs_x/toy/annotation"])


def test_a_user_error_is_one_line_without_traceback(tmp_path):
    """The README's annotate example before stage 0 ran: an error line naming the path, in seconds (it was a
    minute of Hub retries, then "Repo id must be in the form ...")."""
    missing = "outputs/toy_not_there/sft"
    cmd = [sys.executable, str(REPO / "recipes" / "annotate.py"), "--model_name_or_path", missing]
    done = subprocess.run(
        [*cmd, "--output_dir", str(tmp_path / "a")], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"annotate.py: error: --model_name_or_path: path does not exist: {missing} ({tmp_path / missing})"
    )
    assert "Traceback" not in done.stderr


def test_evaluation_strategies_are_checked_before_any_solving(setting):
    root, config = setting
    import evaluate

    args = [
        "--config",
        config,
        "--model_name_or_path",
        str(root / "sft"),
        "--output_dir",
        str(root / "eval_bad"),
    ]
    for bad, message in [
        ("sbs(0,5)", "B1 and the samples per beam B2 must both be at least 1"),
        ("maj@0", "maj@0"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            evaluate.main([*args, "--strategies", "greedy", bad])
    assert not (root / "eval_bad").exists()  # greedy did not run first


def test_sft_recipe_trains_on_step_format_files_and_converted_gsm8k(setting):
    """Stage 0 on a real (here: the tiny toy) checkpoint, from a {question, answer, solution} file and from
    GSM8K rows converted by --convert_gsm8k; the GSM8K folder without it is refused and not marked done."""
    root, config = setting
    import sft

    rows = [
        {**row, "answer": f"{row['answer']}\n#### {row['answer']}"} for row in load_toy_problems("train", 8)
    ]
    steps = root / "steps.jsonl"
    steps.write_text(
        "".join(json.dumps({k: r[k] for k in ("question", "answer", "solution")}) + "\n" for r in rows)
    )
    base = ["--config", config, "--model_name_or_path", str(root / "sft"), "--max_steps", "1"]
    results = sft.main([*base, "--dataset_name", str(steps), "--output_dir", str(root / "sft_steps")])
    assert (results["train_rows"], results["dropped_rows"]) == (8, 0)
    assert stage_done(str(root / "sft_steps"))

    gsm8k = root / "gsm8k_head.jsonl"
    gsm8k.write_text("".join((Path(SHARED_DATA) / "gsm8k" / "train.jsonl").read_text().splitlines(True)[:40]))
    out = root / "sft_gsm8k"
    results = sft.main([*base, "--dataset_name", str(gsm8k), "--convert_gsm8k", "--output_dir", str(out)])
    assert (results["train_rows"], results["dropped_rows"]) == (38, 2)
    assert results["dropped_by_reason"] == {"no calculation": 1, "no calculation gives the gold": 1}

    refused = root / "sft_calculator_text"
    with pytest.raises(UsageError, match=r"train.jsonl, line 1: no 'solution' field.*--convert_gsm8k"):
        sft.main([*base, "--dataset_name", str(Path(SHARED_DATA) / "gsm8k"), "--output_dir", str(refused)])
    assert not stage_done(str(refused))


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


def test_pipeline_prints_its_claims_and_where_its_outputs_are(setting, tmp_path, capsys):
    """After the table: one paired line per claim of ``pipeline.claims``, the output folder, a tree command."""
    root, config = setting
    from svpo_trl.pipeline import run_pipeline

    with_claims = yaml.safe_load(Path(config).read_text())
    with_claims["pipeline"]["claims"] = [
        {"claim": "SBS vs greedy", "first": ["SVPO", "sbs(1,2)"], "second": ["SVPO", "greedy"]}
    ]
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(with_claims))
    rows = run_pipeline(str(path), stages=["evaluate"])
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.startswith("  - SBS vs greedy: ")]
    greedy, sbs = (100 * r["accuracy"] for r in rows)  # the rows in the order the setting lists them
    assert line.startswith(f"  - SBS vs greedy: {sbs:.1f} vs {greedy:.1f}, ") and "2 problems" in line
    assert f"outputs: checkpoints, annotation and per-problem JSONL under {root}/" in out


def test_evaluate_ranks_sbs_by_a_reference_policy(setting):
    """sbs(1,2,reference) with --reference_model: a row of its own, read from the reference's prior; without
    the flag it stops before loading anything, naming the strategy and the flag."""
    root, config = setting
    import evaluate

    args = [
        "--config",
        config,
        "--model_name_or_path",
        str(root / "svpo"),
        "--strategies",
        "sbs(1,2,reference)",
    ]
    with pytest.raises(UsageError, match=r"SBS \(B1=1, B2=2, reference\): .*give --reference_model PATH"):
        evaluate.main([*args, "--output_dir", str(root / "eval_reference_missing")])
    rows = evaluate.main(
        [*args, "--output_dir", str(root / "eval_reference"), "--reference_model", str(root / "sft")]
    )
    assert [r["strategy"] for r in rows] == ["SBS (B1=1, B2=2, reference)"]
    records = (root / "eval_reference" / "svpo__toy__sbs1x2-reference.jsonl").read_text().splitlines()
    assert len(records) == 2 and rows[0]["num_problems"] == 2
