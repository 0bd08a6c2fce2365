"""benchmarks/reproduce_tables.py: tables and paired differences from per-problem results, and the results page block."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location(
        "reproduce_tables", ROOT / "benchmarks" / "reproduce_tables.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _diagnostic(within: float, prior: float) -> dict:
    return {
        "within_group_accuracy": within,
        "prior_within_group_accuracy": prior,
        "top1_accuracy": within,
        "prior_top1_accuracy": prior,
        "value_auc": within,
        "oracle_ceiling": 0.9,
    }


def _runs(reproduce) -> dict:
    n = 40
    runs = {}
    for seed in range(3):
        greedy = [1 if i < 20 else 0 for i in range(n)]
        # SBS(1,5) solves 4 more problems than greedy on every seed (problems 20-23) and loses none.
        sbs = [1 if i < 24 else 0 for i in range(n)]
        correct = {
            row: list(greedy) for row in [f"{s}/{t}" for s, (_, ts) in reproduce.ROWS.items() for t in ts]
        }
        correct["SVPO/sbs(1,5)"] = sbs
        correct["SFT/greedy"] = [1 if i < 20 - seed else 0 for i in range(n)]
        runs[str(seed)] = {
            "correct": correct,
            "value": _diagnostic(0.7, 0.6),
            "value_by_model": {"SVPO": _diagnostic(0.7, 0.6)},
            "seconds": 60.0 * (seed + 1),
        }
    return runs


def test_tables_report_accuracies_and_paired_differences(reproduce):
    runs = _runs(reproduce)
    markdown, summary = reproduce.tables(runs)
    assert "(40 held-out problems, the same for every row; seeds 0, 1, 2)" in markdown
    assert summary["accuracy"]["SVPO/sbs(1,5)"] == [0.6, 0.6, 0.6]
    sbs = summary["differences"]["SVPO: SBS(1,5) - greedy"]
    assert [d["difference"] for d in sbs["per_seed"]] == pytest.approx([0.1, 0.1, 0.1])
    # Four problems gained and none lost: no resample loses, and fewer than 2.5% of them draw none of the four.
    assert 0.0 < sbs["pooled"]["low"] < 0.1 < sbs["pooled"]["high"] < 0.25
    sft = summary["differences"]["greedy: SVPO - SFT"]
    assert [round(d["difference"], 3) for d in sft["per_seed"]] == [0.0, 0.025, 0.05]
    assert sft["pooled"]["difference"] == pytest.approx(0.025)
    assert "| SVPO: SBS(1,5) - greedy | +10.0 [" in markdown
    assert "| 0 | SVPO | 70.0 | 60.0 |" in markdown
    assert "Wall time per seed: 1 min, 2 min, 3 min (2 CPU cores" in markdown


def test_readme_block_is_replaced_and_a_missing_block_is_named(reproduce, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{reproduce.README_BEGIN}\nold\n{reproduce.README_END}\nafter\n")
    reproduce.update_readme(str(readme), "NEW TABLE")
    assert (
        readme.read_text() == f"before\n{reproduce.README_BEGIN}\nNEW TABLE\n{reproduce.README_END}\nafter\n"
    )
    (tmp_path / "plain.md").write_text("no block\n")
    with pytest.raises(ValueError, match=r"plain\.md has no"):
        reproduce.update_readme(str(tmp_path / "plain.md"), "x")


@pytest.fixture(scope="module")
def committed() -> dict:
    path = ROOT / "benchmarks" / "results" / "reproduce_tables.json"
    if not path.exists():
        pytest.skip("no committed reproduction results")
    return json.loads(path.read_text())


def test_committed_results_have_the_keys_the_readme_promises(committed):
    for seed, run in committed["runs"].items():
        lengths = {len(v) for v in run["correct"].values()}
        assert len(lengths) == 1, f"seed {seed}: rows on different numbers of problems {lengths}"
        for row in (
            "SFT/greedy",
            "DPO/greedy",
            "SVPO/greedy",
            "SVPO/sbs(1,5)",
            "SVPO/sbs(3,5)",
            "SVPO/sbs(1,5,reference)",
        ):
            assert row in run["correct"] and set(run["correct"][row]) <= {0, 1}, (seed, row)
        assert {"within_group_accuracy", "prior_within_group_accuracy"} <= set(run["value"])


def test_committed_results_were_made_with_the_setting_in_the_repository(committed):
    """Every seed in the file ran toy_reproduce.yaml as it reads now (a changed setting drops older seeds)."""
    import yaml

    setting = yaml.safe_load((ROOT / committed["config"]).read_text())
    assert committed["setting"] == setting, (
        f"{committed['config']} changed since the committed runs: rerun them"
    )
    for seed, run in committed["runs"].items():
        assert 0 < run["cpu_seconds"] <= 60 * 60, f"seed {seed}: {run['cpu_seconds'] / 60:.0f} CPU minutes"


def test_results_page_block_is_rendered_from_the_committed_results(reproduce, committed):
    """docs/results.md holds the reproduction block (the README a headline of it, checked in test_docs)."""
    saved = committed
    assert len(saved["runs"]) >= 3, "the reproduction needs at least three seeds"
    assert all(len(row) >= 1000 for run in saved["runs"].values() for row in run["correct"].values())
    markdown, _ = reproduce.tables(saved["runs"])
    page = (ROOT / "docs" / "results.md").read_text()
    block = page.split(reproduce.README_BEGIN, 1)[1].split(reproduce.README_END, 1)[0]
    assert block.strip() == markdown.strip(), (
        "docs/results.md reproduction block is stale: run --render-only --readme docs/results.md"
    )


def test_saved_seeds_of_another_setting_are_not_merged(reproduce, tmp_path):
    config = tmp_path / "setting.yaml"
    config.write_text("seed: 0\nsft: {max_steps: 10}\n")
    saved = tmp_path / "results.json"
    runs = {"0": {"correct": {"SFT/greedy": [1, 0]}}}
    saved.write_text(
        json.dumps({"config": str(config), "setting": {"seed": 0, "sft": {"max_steps": 10}}, "runs": runs})
    )
    assert reproduce._saved_runs(str(saved), str(config)) == runs
    config.write_text("seed: 0\nsft: {max_steps: 20}\n")  # the same file, edited since: its seeds would mix
    assert reproduce._saved_runs(str(saved), str(config)) == {}
    saved.write_text(json.dumps({"config": str(config), "runs": runs}))  # written before settings were kept
    assert reproduce._saved_runs(str(saved), str(config)) == {}
