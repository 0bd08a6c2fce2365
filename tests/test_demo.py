"""The demo's promises (issue 19): its setting fixes the thread count, stage 0 is deterministic by seed, and
the paired claims it prints after its table say what the rows show."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from svpo_trl.cli import load_setting, parse_stage_args
from svpo_trl.errors import UsageError
from svpo_trl.pipeline.claims import claim_lines

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "configs" / "toy.yaml"


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- the thread count
def test_the_demo_setting_fixes_the_thread_count(restore_threads):
    from trl import SFTConfig

    from svpo_trl.pipeline import SFTScriptArguments

    threads = load_setting(str(DEMO))["num_threads"]
    assert isinstance(threads, int) and threads >= 1
    torch.set_num_threads(threads + 1)  # whatever the machine or the caller had set
    parse_stage_args("sft", [SFTScriptArguments, SFTConfig], ["--config", str(DEMO)])
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("value", [0, -2, "two", 1.5, True])
def test_a_bad_thread_count_names_the_file(tmp_path, value, restore_threads):
    from trl import SFTConfig

    from svpo_trl.pipeline import SFTScriptArguments

    path = tmp_path / "setting.yaml"
    path.write_text(yaml.safe_dump({"num_threads": value, "sft": {"output_dir": str(tmp_path / "sft")}}))
    with pytest.raises(UsageError, match=r"setting\.yaml: num_threads must be a positive integer"):
        parse_stage_args("sft", [SFTScriptArguments, SFTConfig], ["--config", str(path)])


# ---------------------------------------------------------------------------- determinism of stage 0
def test_two_stage0_runs_with_the_same_seed_give_the_same_weights(tmp_path, restore_threads):
    """Stage 0 through the pipeline, as the demo runs it, twice with one seed: the same saved weights (a third
    run with another seed differs, so the comparison can fail)."""
    from svpo_trl.pipeline import run_pipeline

    weights = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        root = tmp_path / name
        setting = {
            "seed": seed,
            "bf16": False,
            "num_threads": 1,
            "sft": {
                "model_name_or_path": "toy",
                "output_dir": str(root / "sft"),
                "toy_num_train_problems": 32,
                "toy_hidden_size": 32,
                "toy_num_layers": 1,
                "max_steps": 3,
                "per_device_train_batch_size": 8,
                "learning_rate": 2e-3,
                "logging_steps": 1,
                "report_to": "none",
            },
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(setting))
        run_pipeline(str(path), stages=["sft"])
        weights[name] = load_file(str(root / "sft" / "model.safetensors"))
    assert weights["a"].keys() == weights["b"].keys()
    for key, tensor in weights["a"].items():
        assert torch.equal(tensor, weights["b"][key]), f"{key} differs between two runs of seed 0"
    assert any(not torch.equal(t, weights["c"][k]) for k, t in weights["a"].items()), (
        "seed 1 gave seed 0's weights"
    )


# ---------------------------------------------------------------------------- paired claims
CORRECT = {
    "Value SFT (Eq. 7)/greedy": [1] * 80 + [0] * 20,
    "SFT/greedy": [1] * 40 + [0] * 60,
    "SVPO/greedy": [1, 0] * 50,
    "SVPO/SBS (B1=1, B2=5)": [0, 1] * 50,
    "DPO (solution-level)/greedy": [1] * 100,
}


def test_a_claim_line_gives_both_accuracies_the_difference_and_the_verdict():
    lines = claim_lines(
        CORRECT,
        [
            {
                "claim": "value pre-training vs SFT",
                "first": ["Value SFT (Eq. 7)", "greedy"],
                "second": ["SFT", "greedy"],
            },
            {
                "claim": "SVPO vs DPO",
                "first": ["SVPO", "greedy"],
                "second": ["DPO (solution-level)", "greedy"],
            },
            {"claim": "SBS vs greedy", "first": ["SVPO", "sbs(1,5)"], "second": ["SVPO", "greedy"]},
        ],
    )
    first, second, third = lines
    assert first.startswith("value pre-training vs SFT: 80.0 vs 40.0, +40.0 [")
    assert first.endswith("100 problems): Value SFT (Eq. 7) is better")
    assert second.startswith("SVPO vs DPO: 50.0 vs 100.0, -50.0 [") and second.endswith(
        "DPO (solution-level) is better"
    )
    # One model under two decodings: equal accuracies on disjoint problems, an interval around zero.
    assert third.startswith("SBS vs greedy: 50.0 vs 50.0, +0.0 [") and third.endswith(
        "no difference this run can tell"
    )


def test_a_claim_on_rows_that_were_not_evaluated_names_them():
    with pytest.raises(UsageError, match=r"not evaluated: \['SVPO/SBS \(B1=3, B2=5\)'\]"):
        claim_lines(CORRECT, [{"claim": "x", "first": ["SVPO", "sbs(3,5)"], "second": ["SVPO", "greedy"]}])
    with pytest.raises(UsageError, match=r"'first' must be \[system, strategy\]"):
        claim_lines(CORRECT, [{"claim": "x", "first": "SVPO", "second": ["SVPO", "greedy"]}])


def test_the_demo_claims_name_rows_the_demo_evaluates():
    plan = load_setting(str(DEMO))["pipeline"]
    evaluated = {(s["name"], strategy) for s in plan["evaluate_systems"] for strategy in s["strategies"]}
    assert len(plan["claims"]) >= 3
    for claim in plan["claims"]:
        assert tuple(claim["first"]) in evaluated and tuple(claim["second"]) in evaluated, claim


# ---------------------------------------------------------------------------- the committed demo figures
def test_the_committed_demo_figures_were_measured_with_the_committed_setting():
    """benchmarks/results/demo.json (the README's demo block) holds 3 seeds of the setting toy.yaml holds now,
    each with every row's per-problem results: change the setting and this fails until the seeds are rerun."""
    import json

    demo = json.loads((ROOT / "benchmarks" / "results" / "demo.json").read_text())
    setting = load_setting(str(DEMO))
    assert demo["setting_content"] == {k: v for k, v in setting.items() if k != "seed"}
    assert demo["num_threads"] == setting["num_threads"] and demo["overrides"] == []
    assert len(demo["seeds"]) >= 3
    for seed, run in demo["seeds"].items():
        assert len(run["correct"]) == len(run["rows"]), seed
        for row in run["rows"]:
            correct = run["correct"][f"{row['system']}/{row['decoding']}"]
            assert len(correct) == demo["problems"] == 300
            assert round(100 * sum(correct) / len(correct), 1) == row["accuracy"], (seed, row)


def test_demo_seeds_overrides_reach_the_setting():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_seeds", ROOT / "benchmarks" / "demo_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    setting = module.apply_overrides(
        {"sft": {"max_steps": 600}}, ["sft.max_steps=1500", "num_threads=2", 'sft.toy_misreadings=["a=+"]']
    )
    assert setting == {"sft": {"max_steps": 1500, "toy_misreadings": ["a=+"]}, "num_threads": 2}
    with pytest.raises(SystemExit, match=r"expected section\.key=value"):
        module.apply_overrides({}, ["sft.max_steps"])
