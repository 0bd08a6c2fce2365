"""The pipeline runner: the stages of one setting file in order, each skipped when its marker says it is
up to date (``recipes/pipeline.py``)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ..distributed import ProcessShard
from ..errors import UsageError
from .arguments import (
    AnnotateScriptArguments,
    EvaluateArguments,
    SFTScriptArguments,
    SVPOScriptArguments,
    TrainScriptArguments,
)
from .markers import describe_changes, mark_stage_done, move_aside, stage_changes
from .stages import (
    _prepare_sft,
    _slug,
    apply_recipe,
    run_annotate,
    run_evaluate,
    run_sft,
    run_svpo,
    run_value_sft,
)

# ---------------------------------------------------------------------------- the whole pipeline
PIPELINE_STAGES = ("sft", "annotate", "value_sft", "svpo", "dpo", "evaluate")


# The stage whose runner a pipeline stage uses, as its marker names it (dpo is SVPO with the dpo recipe).
_MARKER_STAGE = {"dpo": "svpo"}


def _stage_configs(stage: str, parsed: tuple) -> dict[str, Any]:
    """What the stage's runner records in its marker, from its parsed arguments (after its preparation)."""
    script_args, config = parsed
    if stage == "annotate":
        return {"script": script_args, "mcts": config}
    return {"script": script_args, "training": config.to_dict()}


def _prepare(stage: str, parsed: tuple) -> None:
    """The changes a runner makes to its arguments before it records them (idempotent)."""
    if stage == "sft":
        _prepare_sft(*parsed)
    elif stage in ("svpo", "dpo"):
        apply_recipe(*parsed)


def _out_of_date(
    name: str, output_dir: str, stage: str, configs: dict[str, Any], force: bool, shard: ProcessShard
) -> bool:
    """Whether to run a stage: not finished, finished with other settings, or forced. A finished output that
    runs again is moved aside first (on the main process) and the reason is printed."""
    changes = stage_changes(output_dir, stage, configs)
    if changes is None:
        return True
    if not changes and not force:
        print(f"[pipeline] {name}: done already in {output_dir} (same settings), skipping")
        return False
    reason = "--force" if not changes else f"made with other settings ({describe_changes(changes)})"
    if shard.is_main:
        moved = move_aside(output_dir)
        print(f"[pipeline] {name}: {output_dir} was {reason}; running it again (old output kept in {moved})")
    shard.barrier()
    return True


def run_pipeline(
    config_path: str, stages: list[str] | None = None, force: bool = False
) -> list[dict[str, Any]]:
    """Run the stages of a setting file in order, skipping those already done; return the table rows.

    A stage is done when its output directory holds a marker with the settings the file now gives
    (:func:`stage_changes`); one made with other settings, or from an input stage that ran again since, runs
    again, its old output moved to ``<dir>.stale-<n>``. ``force`` runs every listed stage again.

    The ``pipeline`` section lists the systems to evaluate, each ``{name, model, strategies}``;
    their rows go into ``<pipeline.output_dir>/results.{json,md}``, printed at the end.
    """
    from trl import SFTConfig

    from ..cli import load_setting, parse_stage_args
    from ..evaluation import results_table
    from ..search.mcts import MCTSConfig
    from ..trainer.svpo_config import SVPOConfig
    from ..trainer.value_sft_config import ValueSFTConfig

    setting = load_setting(config_path)
    plan = setting.get("pipeline") or {}
    stages = list(stages or plan.get("stages") or PIPELINE_STAGES)
    unknown = [s for s in stages if s not in PIPELINE_STAGES]
    if unknown:
        raise UsageError(f"unknown stages {unknown}: expected some of {list(PIPELINE_STAGES)}")
    config = ["--config", config_path]
    runners = {
        "sft": ([SFTScriptArguments, SFTConfig], run_sft),
        "annotate": ([AnnotateScriptArguments, MCTSConfig], run_annotate),
        "value_sft": ([TrainScriptArguments, ValueSFTConfig], run_value_sft),
        "svpo": ([SVPOScriptArguments, SVPOConfig], run_svpo),
        "dpo": ([SVPOScriptArguments, SVPOConfig], run_svpo),
    }
    shard = ProcessShard.from_environment()
    began = time.perf_counter()
    for stage in stages:
        if stage == "evaluate":
            continue
        types, runner = runners[stage]
        parsed = parse_stage_args(stage, types, config)
        _prepare(stage, parsed)
        output_dir = parsed[-1].output_dir
        configs = _stage_configs(stage, parsed)
        if not _out_of_date(stage, output_dir, _MARKER_STAGE.get(stage, stage), configs, force, shard):
            continue
        print(f"[pipeline] {stage} -> {output_dir} ({time.perf_counter() - began:.0f}s elapsed)", flush=True)
        runner(*parsed)
    rows: list[dict[str, Any]] = []
    if "evaluate" in stages:
        out = plan.get("output_dir") or "outputs"
        for system in plan.get("evaluate_systems") or []:
            eval_dir = os.path.join(out, "eval", _slug(system["name"]))
            overrides = ["--model_name_or_path", system["model"], "--system_name", system["name"]]
            overrides += ["--output_dir", eval_dir, "--strategies", *system.get("strategies", ["greedy"])]
            if system.get("reference_model"):  # the policy whose prior ranks sbs(B1,B2,reference)
                overrides += ["--reference_model", system["reference_model"]]
            (eval_args,) = parse_stage_args("evaluate", [EvaluateArguments], [*config, *overrides])
            configs = {"script": eval_args}
            name = f"evaluate {system['name']}"
            if not _out_of_date(name, eval_dir, "evaluate", configs, force, shard):
                with open(os.path.join(eval_dir, "results.json")) as handle:
                    rows += json.load(handle)
                continue
            print(f"[pipeline] {name} ({time.perf_counter() - began:.0f}s elapsed)", flush=True)
            system_rows = run_evaluate(eval_args)
            if shard.is_main:
                mark_stage_done(eval_dir, "evaluate", configs, {"rows": system_rows})
            shard.barrier()
            rows += system_rows
        table = results_table(rows)
        if shard.is_main:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "results.json"), "w") as handle:
                json.dump(rows, handle, indent=2)
            with open(os.path.join(out, "results.md"), "w") as handle:
                handle.write(table + "\n")
            print(
                f"\n[pipeline] finished in {time.perf_counter() - began:.0f}s. Results ({out}/results.md):\n"
            )
            print(table)
            print_claims(rows, plan, out)
    return rows


def print_claims(rows: list[dict[str, Any]], plan: dict[str, Any], out: str) -> None:
    """After the table: the paired difference of every claim in ``pipeline.claims``, then where the outputs
    are and how to open one search tree."""
    from .claims import claim_lines, correct_by_row, row_key

    claims = plan.get("claims") or []
    unrecorded = [row_key(r) for r in rows if not r.get("predictions")]
    if claims and unrecorded:
        # Rows read back from an evaluation made before its rows named their per-problem files.
        print(
            f"\n[pipeline] claims skipped: {unrecorded} name no per-problem file; evaluate again (--stages evaluate --force)"
        )
    elif claims:
        print("\n[pipeline] what this run shows (paired on the same problems):")
        for line in claim_lines(correct_by_row(rows), claims):
            print(f"  - {line}")
    print(f"\n[pipeline] outputs: checkpoints, annotation and per-problem JSONL under {out}/")
    trees = os.path.join(out, "annotation", "trees")
    if os.path.isdir(trees):
        from ..data import load_saved_dataset

        saved = load_saved_dataset(trees)
        if len(saved) == 0:
            return
        first = saved[0]["id"]
        print(
            "[pipeline] open one search tree: python recipes/inspect_search.py tree "
            f"{os.path.dirname(trees)} --id {first} --out tree.html"
        )
