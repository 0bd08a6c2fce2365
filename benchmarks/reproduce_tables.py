"""Miniature reproduction of the paper's Table 3 and Table 5 on the embedded toy task, over seeds.

Table 3 (greedy): SFT / solution-level DPO / SVPO / SVPO w/o regularization.
Table 5 (SBS, B2 = 5, B1 = 1 and 3): SVPO / w/o margin / w/o MSE.

Every seed runs the whole pipeline of ``recipes/configs/toy.yaml`` under its own output root
(stage 0 bootstrap included, so seeds differ from the first weight onwards), trains the ablations
from the same value-pre-trained model on the same annotation, and evaluates on the same held-out
problems. Finished stages are skipped, so a stopped run resumes. Writes
``benchmarks/results/reproduce_tables.{json,md}`` with mean ± std over seeds.

    python benchmarks/reproduce_tables.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import yaml

from svpo_trl.cli import load_setting, parse_stage_args
from svpo_trl.pipeline import (
    EvaluateArguments,
    SVPOScriptArguments,
    apply_recipe,
    move_aside,
    run_evaluate,
    run_pipeline,
    run_svpo,
    stage_changes,
)
from svpo_trl.trainer.svpo_config import SVPOConfig

ABLATIONS = {
    "svpo_no_regularization": "svpo_no_reg",
    "svpo_no_margin": "svpo_no_margin",
    "svpo_no_mse": "svpo_no_mse",
}
TABLE3 = [("SFT", "sft"), ("DPO", "dpo"), ("SVPO", "svpo"), ("SVPO w/o regularization", "svpo_no_reg")]
TABLE5 = [("SVPO", "svpo"), ("SVPO w/o margin", "svpo_no_margin"), ("SVPO w/o MSE", "svpo_no_mse")]
SBS = ["sbs(1,5)", "sbs(3,5)"]


def _relocate(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    return value


def seed_setting(base: dict[str, Any], seed: int, root: str) -> dict[str, Any]:
    """The toy setting with every output under ``root`` and every stage seeded with ``seed``."""
    old = base.get("pipeline", {}).get("output_dir", "outputs/toy")
    setting = _relocate(base, old, root)
    setting["seed"] = seed
    return setting


def run_seed(config_path: str, root: str) -> dict[str, dict[str, float]]:
    """All stages, ablations and evaluations of one seed: ``{system/strategy: accuracy}``."""
    run_pipeline(config_path, stages=["sft", "annotate", "value_sft", "svpo", "dpo"])
    for recipe, name in ABLATIONS.items():
        out = os.path.join(root, name)
        args = ["--config", config_path, "--recipe", recipe, "--output_dir", out]
        script_args, training_args = parse_stage_args("svpo", [SVPOScriptArguments, SVPOConfig], args)
        apply_recipe(script_args, training_args)
        # Skipped only when made with these very settings (an ablation of a stale model runs again).
        changes = stage_changes(out, "svpo", {"script": script_args, "training": training_args.to_dict()})
        if changes == {}:
            continue
        if changes:
            move_aside(out)
        run_svpo(script_args, training_args)
    plan: dict[str, list[str]] = {}
    for _, model in TABLE3:
        plan.setdefault(model, []).append("greedy")
    for _, model in TABLE5:
        plan.setdefault(model, []).extend(SBS)
    results: dict[str, dict[str, float]] = {}
    for model, strategies in plan.items():
        eval_dir = os.path.join(root, "eval_tables", model)
        path = os.path.join(eval_dir, "results.json")
        if not os.path.exists(path):
            args = ["--config", config_path, "--model_name_or_path", os.path.join(root, model)]
            args += ["--system_name", model, "--output_dir", eval_dir, "--strategies", *strategies]
            run_evaluate(*parse_stage_args("evaluate", [EvaluateArguments], args))
        with open(path) as handle:
            for row in json.load(handle):
                results[f"{model}/{row['strategy']}"] = row
    return results


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def tables(per_seed: dict[int, dict[str, dict[str, float]]]) -> tuple[str, dict[str, Any]]:
    """Markdown tables (mean ± std of accuracy over seeds) and the same numbers as a dict."""
    seeds = sorted(per_seed)
    summary: dict[str, Any] = {}

    def accuracies(key: str) -> list[float]:
        return [per_seed[s][key]["accuracy"] for s in seeds if key in per_seed[s]]

    lines = [f"### Table 3 (toy): greedy accuracy, % (mean ± std over seeds {seeds})", ""]
    lines += ["| Model | Greedy | per seed |", "|---|---|---|"]
    for label, model in TABLE3:
        values = accuracies(f"{model}/greedy")
        summary[f"table3/{label}"] = values
        lines.append(f"| {label} | {_cell(values)} | {', '.join(f'{100 * v:.1f}' for v in values)} |")
    lines += ["", f"### Table 5 (toy): SBS accuracy, % (B2 = 5; mean ± std over seeds {seeds})", ""]
    lines += ["| Model | SBS B1=1 | SBS B1=3 |", "|---|---|---|"]
    for label, model in TABLE5:
        cells = []
        for strategy in ("SBS (B1=1, B2=5)", "SBS (B1=3, B2=5)"):
            values = accuracies(f"{model}/{strategy}")
            summary[f"table5/{label}/{strategy}"] = values
            cells.append(_cell(values))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="recipes/configs/toy.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="outputs/reproduce")
    parser.add_argument("--results", default="benchmarks/results/reproduce_tables")
    args = parser.parse_args()
    base = load_setting(args.config)
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    timings: dict[int, float] = {}
    for seed in args.seeds:
        root = os.path.join(args.root, f"seed{seed}")
        os.makedirs(root, exist_ok=True)
        config_path = os.path.join(root, "setting.yaml")
        with open(config_path, "w") as handle:
            yaml.safe_dump(seed_setting(base, seed, root), handle, sort_keys=False)
        began = time.perf_counter()
        per_seed[seed] = run_seed(config_path, root)
        timings[seed] = time.perf_counter() - began
        print(f"[reproduce] seed {seed} done in {timings[seed]:.0f}s", flush=True)
    markdown, summary = tables(per_seed)
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    with open(args.results + ".json", "w") as handle:
        json.dump(
            {"seeds": args.seeds, "seconds": timings, "tables": summary, "runs": per_seed}, handle, indent=2
        )
    with open(args.results + ".md", "w") as handle:
        handle.write(
            f"# Miniature reproduction of Tables 3 and 5 (`python benchmarks/reproduce_tables.py`)\n\n{markdown}\n"
        )
    print(markdown)


if __name__ == "__main__":
    main()
