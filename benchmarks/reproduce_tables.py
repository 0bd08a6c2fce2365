"""Miniature reproduction of the paper's Tables 3 and 5, over seeds, with paired intervals.

Every seed runs the whole pipeline of a setting file (stage 0 included, so seeds differ from the first
weight on) under its own output root, trains the ablations from the same value-pre-trained model on the
same annotation, evaluates every row on the same held-out problems, and runs the value diagnostic
(``svpo_trl.value_diagnostic``: does V rank candidate steps better than the policy's prior?). Finished
stages and evaluations are skipped, so a stopped run resumes.

Writes ``<results>.json`` with, per seed, ``runs[seed]["correct"][row]`` (0/1 per problem, in problem
order) for every row (``"SFT/greedy"``, ``"DPO/greedy"``, ``"SVPO/greedy"``, ``"SVPO/sbs(1,5)"``, ...),
``runs[seed]["value"]`` (the SVPO model's value diagnostic) and ``runs[seed]["seconds"]``, and
``<results>.md`` with the tables: accuracy per row, and paired bootstrap 95% intervals of the differences
that matter (SBS - greedy, SVPO - DPO, SVPO - SFT, each ablation - full SVPO), per seed and pooled.

    python benchmarks/reproduce_tables.py --config recipes/configs/toy_reproduce.yaml --seeds 0 1 2
    python benchmarks/reproduce_tables.py --render-only --readme docs/results.md   # tables from the saved JSON
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from typing import Any

import yaml

from svpo_trl.cli import load_setting, parse_stage_args, seed_setting
from svpo_trl.pipeline import (
    EvaluateArguments,
    SVPOScriptArguments,
    apply_recipe,
    describe_changes,
    mark_stage_done,
    move_aside,
    run_evaluate,
    run_pipeline,
    run_svpo,
    stage_changes,
)
from svpo_trl.pipeline.claims import read_correct
from svpo_trl.stats import format_difference, paired_bootstrap
from svpo_trl.trainer.svpo_config import SVPOConfig

# SVPO trained otherwise from the same value-pre-trained model on the same annotation:
# output folder -> (row name, arguments of recipes/train_svpo.py on top of the setting's svpo section).
ABLATIONS = {
    "svpo_no_margin": ("SVPO w/o margin", ["--recipe", "svpo_no_margin"]),
    "svpo_no_mse": ("SVPO w/o MSE", ["--recipe", "svpo_no_mse"]),
    "svpo_no_reg": ("SVPO w/o regularization", ["--recipe", "svpo_no_regularization"]),
    # The learning rate: at the setting's 1e-4 SVPO fell 12 points below value SFT on seed 1 while DPO did
    # not; both again at 2e-5 (value SFT's rate in the paper, 4x its SVPO rate of 5e-6).
    "svpo_lr2e-5": ("SVPO (lr 2e-5)", ["--learning_rate", "2e-5"]),
    "dpo_lr2e-5": (
        "DPO (lr 2e-5)",
        ["--recipe", "dpo", "--dataset_config", "solution_pairs", "--learning_rate", "2e-5"],
    ),
}
# Model folders under a seed's root, and the rows evaluated on each: "<system>/<strategy>".
ROWS: dict[str, tuple[str, list[str]]] = {
    "SFT": ("sft", ["greedy"]),
    "Value SFT": ("value_sft", ["greedy"]),
    "DPO": ("dpo", ["greedy"]),
    "SVPO": ("svpo", ["greedy", "sbs(1,5)", "sbs(3,5)", "sbs(1,5,prior)", "sbs(1,5,reference)"]),
    # The ablations are evaluated greedily: on 1000 problems their three SBS(1,5) rows would cost ~15 of a
    # seed's 60 minutes (about 5 minutes each, measured), and their value heads are judged by the diagnostic.
    "SVPO w/o margin": ("svpo_no_margin", ["greedy"]),
    "SVPO w/o MSE": ("svpo_no_mse", ["greedy"]),
    "SVPO w/o regularization": ("svpo_no_reg", ["greedy"]),
    "SVPO (lr 2e-5)": ("svpo_lr2e-5", ["greedy", "sbs(1,5,reference)"]),
    "DPO (lr 2e-5)": ("dpo_lr2e-5", ["greedy"]),
}
# Rows added once a system's other rows existed: (system, model folder, strategies, evaluation folder). An
# evaluation folder of their own leaves the earlier ones fresh (a changed strategy list re-runs a folder).
LATER_ROWS = [("SVPO (lr 2e-5)", "svpo_lr2e-5", ["sbs(1,5,prior)"], "svpo_lr2e-5_prior")]
SLUGS = {
    "greedy": "greedy",
    "sbs(1,5)": "sbs1x5",
    "sbs(3,5)": "sbs3x5",
    "sbs(1,5,prior)": "sbs1x5-prior",
    "sbs(1,5,reference)": "sbs1x5-reference",
}
# The policy whose prior ranks a system's sbs(B1,B2,reference) rows: SVPO's starting point.
REFERENCE = {"svpo": "value_sft", "svpo_lr2e-5": "value_sft"}
# The differences the issue asks for: (label, first row, second row).
COMPARISONS = [
    ("SVPO: SBS(1,5) - greedy", "SVPO/sbs(1,5)", "SVPO/greedy"),
    ("SVPO: SBS(3,5) - greedy", "SVPO/sbs(3,5)", "SVPO/greedy"),
    ("SVPO: SBS(1,5) ranked by the prior - greedy", "SVPO/sbs(1,5,prior)", "SVPO/greedy"),
    ("SVPO: SBS(1,5) ranked by the value-SFT prior - greedy", "SVPO/sbs(1,5,reference)", "SVPO/greedy"),
    ("greedy: SVPO - SFT", "SVPO/greedy", "SFT/greedy"),
    ("greedy: SVPO - DPO", "SVPO/greedy", "DPO/greedy"),
    ("greedy: Value SFT - SFT", "Value SFT/greedy", "SFT/greedy"),
    ("greedy: w/o margin - SVPO", "SVPO w/o margin/greedy", "SVPO/greedy"),
    ("greedy: w/o MSE - SVPO", "SVPO w/o MSE/greedy", "SVPO/greedy"),
    ("greedy: w/o regularization - SVPO", "SVPO w/o regularization/greedy", "SVPO/greedy"),
    ("greedy: SVPO - value SFT", "SVPO/greedy", "Value SFT/greedy"),
    ("greedy (lr 2e-5): SVPO - DPO", "SVPO (lr 2e-5)/greedy", "DPO (lr 2e-5)/greedy"),
    ("greedy (lr 2e-5): SVPO - value SFT", "SVPO (lr 2e-5)/greedy", "Value SFT/greedy"),
    (
        "SVPO (lr 2e-5): SBS(1,5) ranked by the value-SFT prior - greedy",
        "SVPO (lr 2e-5)/sbs(1,5,reference)",
        "SVPO (lr 2e-5)/greedy",
    ),
    (
        "SVPO (lr 2e-5): SBS(1,5) ranked by the prior - greedy",
        "SVPO (lr 2e-5)/sbs(1,5,prior)",
        "SVPO (lr 2e-5)/greedy",
    ),
]
README_BEGIN, README_END = "<!-- reproduce_tables:begin -->", "<!-- reproduce_tables:end -->"


def _fresh(output_dir: str, stage: str, configs: dict[str, Any]) -> bool:
    """Whether ``output_dir`` holds this stage made with these very settings (from these inputs); an output
    made otherwise is moved aside, so that it runs again."""
    changes = stage_changes(output_dir, stage, configs)
    if changes:
        print(
            f"[reproduce] {output_dir}: other settings ({describe_changes(changes)}), moved to {move_aside(output_dir)}"
        )
    return changes == {}


def run_seed(config_path: str, root: str) -> dict[str, Any]:
    """Every stage, ablation, evaluation and the value diagnostic of one seed (resuming what is done)."""
    began, cpu_began = time.perf_counter(), time.process_time()
    run_pipeline(config_path, stages=["sft", "annotate", "value_sft", "svpo", "dpo"])
    for folder, (_, extra) in ABLATIONS.items():
        out = os.path.join(root, folder)
        args = ["--config", config_path, *extra, "--output_dir", out]
        script_args, training_args = parse_stage_args("svpo", [SVPOScriptArguments, SVPOConfig], args)
        apply_recipe(script_args, training_args)
        # Skipped only when made with these very settings (an ablation of a stale model runs again).
        if _fresh(out, "svpo", {"script": script_args, "training": training_args.to_dict()}):
            continue
        run_svpo(script_args, training_args)
    correct: dict[str, list[int]] = {}
    value: dict[str, Any] = {}
    evaluations = [(system, folder, strategies, folder) for system, (folder, strategies) in ROWS.items()]
    for system, folder, strategies, eval_name in [*evaluations, *LATER_ROWS]:
        eval_dir = os.path.join(root, "eval_tables", eval_name)
        diagnose = eval_name in ("sft", "svpo")  # the stage-0 policy and the model SBS decodes with
        args = ["--config", config_path, "--model_name_or_path", os.path.join(root, folder)]
        args += ["--system_name", folder, "--output_dir", eval_dir, "--strategies", *strategies]
        args += ["--value_diagnostic"] if diagnose else []
        args += ["--reference_model", os.path.join(root, REFERENCE[folder])] if folder in REFERENCE else []
        (eval_args,) = parse_stage_args("evaluate", [EvaluateArguments], args)
        if not _fresh(eval_dir, "evaluate", {"script": eval_args}):
            rows = run_evaluate(eval_args)
            mark_stage_done(eval_dir, "evaluate", {"script": eval_args}, {"rows": rows})
        for strategy in strategies:
            [path] = [p for p in os.listdir(eval_dir) if p.endswith(f"__{SLUGS[strategy]}.jsonl")]
            correct[f"{system}/{strategy}"] = read_correct(os.path.join(eval_dir, path))
        if diagnose:
            [path] = [p for p in os.listdir(eval_dir) if p.endswith("__value_diagnostic.json")]
            with open(os.path.join(eval_dir, path)) as handle:
                value[system] = json.load(handle)
    return {
        "correct": correct,
        "value": value.get("SVPO"),
        "value_by_model": value,
        "seconds": time.perf_counter() - began,
        # Machine time: what the seed cost however many seeds shared the cores.
        "cpu_seconds": time.process_time() - cpu_began,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def tables(runs: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Markdown tables and the computed summary from the per-seed runs (keys: seeds as strings)."""
    seeds = sorted(runs, key=int)
    rows = [r for r in runs[seeds[0]]["correct"] if all(r in runs[s]["correct"] for s in seeds)]
    n = len(runs[seeds[0]]["correct"][rows[0]])
    lines = [
        f"#### Accuracy, % ({n} held-out problems, the same for every row; seeds {', '.join(seeds)})",
        "",
    ]
    lines += ["| Model | Decoding | mean ± std | per seed |", "|---|---|---|---|"]
    summary: dict[str, Any] = {"accuracy": {}, "differences": {}, "value": {}}
    for row in rows:
        values = [statistics.fmean(runs[s]["correct"][row]) for s in seeds]
        summary["accuracy"][row] = values
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        system, strategy = row.rsplit("/", 1)
        lines.append(
            f"| {system} | {strategy} | {100 * statistics.fmean(values):.1f} ± {100 * std:.1f} | "
            f"{', '.join(_pct(v) for v in values)} |"
        )
    lines += ["", "#### Paired differences, points, with bootstrap 95% intervals", ""]
    lines += ["| Difference | " + " | ".join(f"seed {s}" for s in seeds) + " | all seeds |"]
    lines += ["|---|" + "---|" * (len(seeds) + 1)]
    for label, first, second in COMPARISONS:
        if first not in rows or second not in rows:
            continue
        per_seed = [paired_bootstrap(runs[s]["correct"][first], runs[s]["correct"][second]) for s in seeds]
        pooled = paired_bootstrap(
            [runs[s]["correct"][first] for s in seeds], [runs[s]["correct"][second] for s in seeds]
        )
        summary["differences"][label] = {"per_seed": per_seed, "pooled": pooled}
        cells = [format_difference(d) for d in [*per_seed, pooled]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if all(runs[s].get("value_by_model") for s in seeds):
        lines += [
            "",
            "#### Value diagnostic (held-out states, B2 = 5 candidates per state, gold step labels)",
            "",
        ]
        lines += [
            "| seed | model | V within-group | prior within-group | V top-1 | prior top-1 | V AUC | "
            "SBS oracle ceiling | greedy |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in seeds:
            for system, m in runs[s]["value_by_model"].items():
                greedy = statistics.fmean(runs[s]["correct"][f"{system}/greedy"])
                lines.append(
                    f"| {s} | {system} | {_pct(m['within_group_accuracy'])} | "
                    f"{_pct(m['prior_within_group_accuracy'])} | {_pct(m['top1_accuracy'])} | "
                    f"{_pct(m['prior_top1_accuracy'])} | {_pct(m['value_auc'])} | {_pct(m['oracle_ceiling'])} | "
                    f"{_pct(greedy)} |"
                )
                summary["value"].setdefault(system, {})[s] = m
    seconds = [runs[s].get("seconds") for s in seeds]
    cpu = [runs[s].get("cpu_seconds") for s in seeds]
    if all(seconds):
        timing = f"Wall time per seed: {', '.join(f'{t / 60:.0f} min' for t in seconds)}"
        if all(cpu):
            timing += f"; CPU time {', '.join(f'{t / 60:.0f} min' for t in cpu)}"
        lines += ["", timing + " (2 CPU cores, shared by the seeds that ran as parallel processes)."]
    return "\n".join(lines), summary


def update_readme(readme: str, markdown: str) -> None:
    """Replace the block between the reproduce_tables markers of ``readme`` (any markdown file holding them;
    docs/results.md in this repository) with ``markdown``."""
    with open(readme) as handle:
        text = handle.read()
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {README_BEGIN} ... {README_END} block to regenerate")
    block = f"{README_BEGIN}\n{markdown}\n{README_END}"
    with open(readme, "w") as handle:
        handle.write(pattern.sub(lambda _: block, text))


def _saved_runs(path: str, config: str) -> dict[str, dict[str, Any]]:
    """The per-seed runs saved in ``path`` for this setting file as it reads now (none if ``path`` holds another
    file's, or this file's under other contents: seeds of two settings never share a table)."""
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        saved = json.load(handle)
    same = saved.get("config") == config and saved.get("setting") == load_setting(config)
    return saved.get("runs", {}) if same else {}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="recipes/configs/toy_reproduce.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="outputs/reproduce")
    parser.add_argument("--results", default="benchmarks/results/reproduce_tables")
    parser.add_argument("--render-only", action="store_true", help="tables from the saved JSON, no runs")
    parser.add_argument(
        "--readme",
        default=None,
        help="also regenerate the results block of this markdown file (docs/results.md)",
    )
    args = parser.parse_args()
    path = args.results + ".json"
    runs: dict[str, dict[str, Any]] = {}
    setting = load_setting(args.config)
    if not args.render_only:
        for seed in args.seeds:
            root = os.path.join(args.root, f"seed{seed}")
            os.makedirs(root, exist_ok=True)
            config_path = os.path.join(root, "setting.yaml")
            with open(config_path, "w") as handle:
                yaml.safe_dump(seed_setting(setting, seed, root), handle, sort_keys=False)
            run = run_seed(config_path, root)
            print(f"[reproduce] seed {seed} done in {run['seconds']:.0f}s", flush=True)
            saved = _saved_runs(path, args.config)
            earlier = saved.get(str(seed))
            if earlier:  # a resumed seed: its cost is every invocation's, not only the last one's
                run["invocations"] = earlier.get("invocations", 1) + 1
                for key in ("seconds", "cpu_seconds"):
                    run[key] += earlier.get(key, 0.0)
            # After every seed, merged with what is on disk now: a stopped run keeps what it finished, and
            # seeds run as parallel processes (one --seeds each) end up in one file.
            runs = {**saved, str(seed): run}
            os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
            with open(path + ".tmp", "w") as handle:
                json.dump({"config": args.config, "setting": setting, "runs": runs}, handle)
            os.replace(path + ".tmp", path)
    # What is on disk now (every seed, this process's and parallel ones'), this process's own runs on top.
    runs = {**_saved_runs(path, args.config), **runs}
    if not runs:
        raise SystemExit(f"no runs of {args.config} in {path}: run without --render-only first")
    markdown, summary = tables(runs)
    with open(path, "w") as handle:
        json.dump({"config": args.config, "setting": setting, "runs": runs, "summary": summary}, handle)
    with open(args.results + ".md", "w") as handle:
        handle.write(f"# Miniature reproduction of Tables 3 and 5 (`{args.config}`)\n\n{markdown}\n")
    if args.readme:
        update_readme(args.readme, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
