"""`make demo` over seeds: the table a user sees, how much it varies, and the paired claims it checks.

Runs the demo's setting (``recipes/configs/toy.yaml`` by default) once per seed, each seed under its own
output root (stage 0 included, so seeds differ from the first weight on), and keeps, per seed, the demo's
rows and every row's per-problem 0/1 (in problem order, the same problems for every row and seed). Settings
being compared can be tried without editing the file: ``--set sft.max_steps=1500`` (repeatable) changes one
key of the setting, and ``--name`` files the variant under its own key of the results.

    python benchmarks/demo_seeds.py --seeds 0 1 2                       # the demo setting as committed
    python benchmarks/demo_seeds.py --name steps1500 --set sft.max_steps=1500 --seeds 0
    python benchmarks/demo_seeds.py --render-only                        # tables from the saved JSON

Writes ``benchmarks/results/demo_seeds.json`` (``variants[name]``: the overrides, and ``seeds[seed]``:
``rows``, ``correct``, ``seconds``) and ``demo_seeds.md`` (one table per variant: every row's mean, range and
per-seed values, and the demo's paired claims per seed). ``--publish NAME`` copies that variant's seeds into
``benchmarks/results/demo.json``, the file the README's demo block renders.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import torch
import yaml

from svpo_trl.cli import load_setting, seed_setting
from svpo_trl.pipeline import run_pipeline
from svpo_trl.pipeline.claims import claim_lines, correct_by_row

RESULTS = "benchmarks/results/demo_seeds"


def apply_overrides(setting: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``section.key=value`` (or ``key=value`` at the top level), the value read as YAML."""
    for override in overrides:
        path, sep, raw = override.partition("=")
        if not sep:
            raise SystemExit(f"--set {override!r}: expected section.key=value")
        *sections, key = path.split(".")
        target = setting
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = yaml.safe_load(raw)
    return setting


def run_seed(setting: dict[str, Any], seed: int, root: str) -> dict[str, Any]:
    """The demo's whole pipeline for one seed under ``root``: its rows and per-problem correctness."""
    seeded = seed_setting(setting, seed, root)
    os.makedirs(root, exist_ok=True)
    config_path = os.path.join(root, "setting.yaml")
    with open(config_path, "w") as handle:
        yaml.safe_dump(seeded, handle, sort_keys=False)
    # Stages finished by an earlier run of the same settings are skipped: their time is not in ``seconds``.
    done_before = [
        stage for stage in ("sft", "annotate", "value_sft", "svpo", "dpo") if stage_done_with(seeded, stage)
    ]
    began = time.perf_counter()
    rows = run_pipeline(config_path)
    seconds = time.perf_counter() - began
    correct = correct_by_row(rows)
    keep = ("system", "strategy", "dataset", "accuracy", "tokens_per_question", "seconds_per_question")
    return {
        "rows": [{k: r[k] for k in keep} for r in rows],
        "correct": correct,
        "seconds": seconds,
        "resumed": done_before,
    }


def stage_done_with(setting: dict[str, Any], stage: str) -> bool:
    """Whether the stage's output folder holds a finished stage (it may still run again with other settings:
    then its time is in the seed's seconds after all, and the figure errs on the short side)."""
    from svpo_trl.pipeline import stage_done

    output_dir = (setting.get(stage) or {}).get("output_dir")
    return bool(output_dir) and stage_done(output_dir)


def _load() -> dict[str, Any]:
    if not os.path.exists(RESULTS + ".json"):
        return {"variants": {}}
    with open(RESULTS + ".json") as handle:
        return json.load(handle)


def _save(results: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".json.tmp", "w") as handle:
        json.dump(results, handle)
    os.replace(RESULTS + ".json.tmp", RESULTS + ".json")


def variant_table(name: str, variant: dict[str, Any]) -> str:
    """One variant: every row's mean, range and per-seed accuracy; its claims' paired differences per seed."""
    claims = (variant["setting"].get("pipeline") or {}).get("claims") or []
    seeds = sorted(variant["seeds"], key=int)
    overrides = ", ".join(f"`{o}`" for o in variant["overrides"]) or "none"
    lines = [f"## {name}", "", f"Seeds {', '.join(seeds)}; `{variant['config']}`, overrides: {overrides}."]
    lines += [variant["note"], ""] if variant.get("note") else [""]
    lines += ["| row | mean | range (max - min) | per seed |", "|---|---|---|---|"]
    keys = list(variant["seeds"][seeds[0]]["correct"])
    for key in keys:
        values = [
            100 * statistics.fmean(variant["seeds"][s]["correct"][key])
            for s in seeds
            if key in variant["seeds"][s]["correct"]
        ]
        lines.append(
            f"| {key} | {statistics.fmean(values):.1f} | {max(values) - min(values):.1f} | "
            f"{', '.join(f'{v:.1f}' for v in values)} |"
        )
    minutes = []
    for s in seeds:
        run = variant["seeds"][s]
        resumed = f" (after {', '.join(run['resumed'])} of an earlier run)" if run.get("resumed") else ""
        minutes.append(f"{run['seconds'] / 60:.1f}{resumed}")
    lines += ["", f"Pipeline minutes per seed: {', '.join(minutes)}.", ""]
    for seed in seeds:
        run = variant["seeds"][seed]
        for line in claim_lines(run["correct"], claims):
            lines.append(f"- seed {seed}: {line}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="recipes/configs/toy.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="demo", help="the variant's key in the results (default: demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--root", default="outputs/demo_seeds")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--publish", metavar="NAME", help="copy this variant's seeds into demo.json")
    args = parser.parse_args()
    if not args.render_only:
        setting = apply_overrides(load_setting(args.config), args.overrides)
        for seed in args.seeds:
            run = run_seed(setting, seed, os.path.join(args.root, args.name, f"seed{seed}"))
            print(f"[demo_seeds] {args.name} seed {seed}: {run['seconds']:.0f}s", flush=True)
            # Merged with what is on disk now, so that seeds run as parallel processes land in one file.
            results = _load()
            variant = results["variants"].setdefault(
                args.name,
                {"config": args.config, "overrides": args.overrides, "setting": setting, "seeds": {}},
            )
            if variant["overrides"] != args.overrides or variant["config"] != args.config:
                raise SystemExit(f"variant {args.name!r} was saved with other settings: pick another --name")
            variant["seeds"][str(seed)] = run
            _save(results)
    results = _load()
    markdown = "\n\n".join(variant_table(n, v) for n, v in results["variants"].items())
    with open(RESULTS + ".md", "w") as handle:
        handle.write("# The demo over seeds (`benchmarks/demo_seeds.py`)\n\n" + markdown + "\n")
    print(markdown)
    if args.publish:
        publish(results["variants"][args.publish], args.publish)


def publish(variant: dict[str, Any], name: str) -> None:
    """Write ``benchmarks/results/demo.json``: the variant's per-seed rows and per-problem results, the claims
    and the setting they were measured with, in the shape the README's demo blocks render."""
    seeds = {}
    for seed, run in sorted(variant["seeds"].items(), key=lambda item: int(item[0])):
        rows = [
            {
                "system": r["system"],
                "decoding": r["strategy"],
                "accuracy": round(100 * r["accuracy"], 1),
                "tokens_per_question": round(r["tokens_per_question"]),
                "seconds_per_question": round(r["seconds_per_question"], 3),
            }
            for r in run["rows"]
        ]
        seeds[seed] = {
            "rows": rows,
            "correct": run["correct"],
            "pipeline_minutes": round(run["seconds"] / 60, 1),
            "resumed": run.get("resumed", []),  # stages reused from an earlier run: not in the minutes
        }
    setting = variant["setting"]
    first = next(iter(seeds.values()))
    demo = {
        "source": f"benchmarks/demo_seeds.py --publish {name}",
        "command": "make demo",
        "setting": variant["config"],
        "overrides": variant["overrides"],
        # What ran, minus the seed: a test checks that the committed setting file still says this.
        "setting_content": {k: v for k, v in setting.items() if k != "seed"},
        "num_threads": setting.get("num_threads"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "dataset": "toy test split",
        "problems": len(next(iter(first["correct"].values()))),
        "claims": (setting.get("pipeline") or {}).get("claims") or [],
        "seeds": seeds,
    }
    path = "benchmarks/results/demo.json"
    if os.path.exists(path):  # a timing of make demo on a fresh clone, measured apart, stays
        with open(path) as handle:
            previous = json.load(handle)
        if "fresh_clone" in previous:
            demo["fresh_clone"] = previous["fresh_clone"]
    with open(path, "w") as handle:
        json.dump(demo, handle)


if __name__ == "__main__":
    main()
