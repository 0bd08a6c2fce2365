"""The stage functions the recipes run: :func:`run_sft`, :func:`run_annotate`, :func:`run_value_sft`,
:func:`run_svpo` and :func:`run_evaluate`. Each checks its inputs before loading a model, runs its stage
and writes its marker (:mod:`svpo_trl.pipeline.markers`) when it has finished."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict
from typing import Any

from ..distributed import ProcessShard
from ..errors import PathNotFoundError, UsageError, require_path
from .arguments import (
    AnnotateScriptArguments,
    EvaluateArguments,
    SFTScriptArguments,
    SVPOScriptArguments,
    TrainScriptArguments,
)
from .markers import STAGE_MARKER, mark_stage_done


def _load_annotation(annotation_dir: str, name: str):
    from datasets import load_dataset

    from ..data import load_saved_dataset

    path = os.path.join(annotation_dir, name)
    if os.path.isdir(path):
        return load_saved_dataset(path)
    if os.path.isdir(annotation_dir):
        raise PathNotFoundError(
            f"{annotation_dir} has no '{name}' dataset: run the annotation stage first "
            f"(expected {path}, found {sorted(os.listdir(annotation_dir))})"
        )
    return load_dataset(annotation_dir, name, split="train")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


# ---------------------------------------------------------------------------- stages
def _prepare_sft(script_args: SFTScriptArguments, training_args) -> None:
    """What run_sft sets on the arguments before it trains (also before the pipeline compares settings)."""
    del script_args
    # The question and the environment-written <output> blocks are context, not targets.
    training_args.completion_only_loss = True


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_sft(script_args: SFTScriptArguments, training_args) -> dict[str, Any]:
    """Stage 0: an SFT policy that writes solutions in the step format (TRL ``SFTTrainer``).

    The data is read and checked before the model loads (:func:`svpo_trl.sft_data.load_sft_dataset`): a
    row that is not in the step format stops the stage with the file, row and field named; with
    ``convert_gsm8k`` GSM8K answers are converted and the rows that do not convert are dropped and counted.
    """
    from ..toy.bootstrap import ToySFTConfig, bootstrap_sft_policy, tokenize_sft_dataset

    _prepare_sft(script_args, training_args)
    output_dir = training_args.output_dir
    configs = {"script": script_args, "training": training_args.to_dict()}
    if script_args.model_name_or_path == "toy":
        toy = ToySFTConfig(
            num_train_problems=script_args.toy_num_train_problems,
            max_steps=training_args.max_steps if training_args.max_steps > 0 else ToySFTConfig.max_steps,
            batch_size=training_args.per_device_train_batch_size,
            learning_rate=training_args.learning_rate,
            hidden_size=script_args.toy_hidden_size,
            num_layers=script_args.toy_num_layers,
            misreadings=script_args.toy_misreading_map(),
            misreading_rate=script_args.toy_misreading_rate,
            seed=training_args.seed,
            logging_steps=int(training_args.logging_steps),
        )
        result = bootstrap_sft_policy(output_dir, config=toy)
        results = {"final_train_loss": result.final_train_loss, "train_seconds": result.train_seconds}
        mark_stage_done(output_dir, "sft", {**configs, "toy": toy}, results)
        return results
    require_path(script_args.model_name_or_path, "model_name_or_path")
    from ..sft_data import load_sft_dataset

    data = load_sft_dataset(
        script_args.dataset_name, script_args.dataset_split, convert_gsm8k=script_args.convert_gsm8k
    )
    if _is_main_process():
        print(f"[sft] {data.summary()}", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenize_sft_dataset(data.dataset, tokenizer),
        processing_class=tokenizer,
    )
    began = time.perf_counter()
    trainer.train()
    trainer.save_model(output_dir)
    tokenizer.save_pretrained(output_dir)
    logs = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    results = {
        "final_train_loss": logs[-1] if logs else None,
        "train_seconds": time.perf_counter() - began,
        "train_rows": len(data.dataset),
        "dropped_rows": data.dropped,
        "dropped_by_reason": data.drop_reasons,
    }
    mark_stage_done(output_dir, "sft", configs, results)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return results


def run_annotate(script_args: AnnotateScriptArguments, mcts_config) -> dict[str, Any]:
    """Stage 1: MCTS trees, step-level pairs (Algorithm 1), value rows (Eq. 7), solution-level pairs.

    With ``hub_dataset_id`` (or ``push_to_hub``) the four datasets go to the Hub after everything is saved
    locally, one config each, with a card (:func:`svpo_trl.hub.push_annotation`). A failed push says so in
    one line and leaves the stage unmarked; running the stage again with the same settings then only
    retries the push (no model is loaded, nothing is searched or rebuilt).
    """
    from datasets import DatasetDict

    from ..data import load_problems
    from ..hub import push_pending
    from ..search.mcts import _RESULT_FIELDS, MCTSAnnotator
    from ..search.solution_pairs import solution_level_pairs
    from ..search.vllm_backend import make_backend, vllm_options_from

    require_path(script_args.model_name_or_path, "model_name_or_path")
    output_dir = mcts_config.output_dir
    if not output_dir:
        raise UsageError("annotate: set output_dir (where trees/, pairs/, values/ are written)")
    repo_id = script_args.hub_dataset_id or mcts_config.push_to_hub
    if (
        script_args.hub_dataset_id
        and mcts_config.push_to_hub
        and script_args.hub_dataset_id != mcts_config.push_to_hub
    ):
        raise UsageError(
            f"annotate: hub_dataset_id {script_args.hub_dataset_id!r} and push_to_hub {mcts_config.push_to_hub!r} "
            "name two repos; set one (both push the same way: one config per dataset)"
        )
    configs = {"script": script_args, "mcts": mcts_config}
    # What determines the data: a rerun with the same key after a failed push only pushes.
    push_key = {
        "script": {
            name: getattr(script_args, name)
            for name in (
                "model_name_or_path",
                "dataset_name",
                "dataset_split",
                "limit",
                "solution_pairs_per_question",
            )
        },
        "mcts": {name: getattr(mcts_config, name) for name in _RESULT_FIELDS},
    }
    shard = ProcessShard.from_environment(script_args.distributed_timeout_hours)
    if repo_id and push_pending(output_dir, push_key):
        if shard.is_main:
            print(f"[annotate] {output_dir} is complete; retrying its push to {repo_id} only", flush=True)
            _push_annotation_and_mark(output_dir, repo_id, configs, push_key)
        shard.barrier()
        return _annotate_results(output_dir)
    problems = load_problems(script_args.dataset_name, script_args.dataset_split)
    if script_args.limit is not None:
        problems = problems.select(range(min(script_args.limit, len(problems))))
    # Each process its own sampling stream (the same seed would replay the same noise on every shard).
    seed = mcts_config.seed + shard.rank
    backend = make_backend(
        script_args.backend,
        script_args.model_name_or_path,
        dtype=script_args.dtype,
        value_head=mcts_config.value_leaf_evaluation,
        device=shard.device,
        batch_size=script_args.generation_batch_size,
        seed=seed,
        vllm_options=vllm_options_from(script_args),
        allow_untrained_value_head=script_args.allow_untrained_value_head,
    )
    # The stage pushes once, below, with the solution pairs: not the annotator, before they exist.
    search_config = dataclasses.replace(mcts_config, push_to_hub=None)
    data = MCTSAnnotator(backend, search_config).annotate(problems, output_dir, shard=shard)
    summary_path = os.path.join(output_dir, "summary.json")
    if shard.is_main:
        data = DatasetDict(dict(data))
        data["solution_pairs"] = solution_level_pairs(
            data["values"], per_question=script_args.solution_pairs_per_question, seed=mcts_config.seed
        )
        data["solution_pairs"].save_to_disk(os.path.join(output_dir, "solution_pairs"))
        with open(summary_path) as handle:
            summary = json.load(handle)
        summary["solution_pairs"] = len(data["solution_pairs"])
        if script_args.dataset_name.split(":")[0] == "toy":
            summary["label_quality"] = _toy_label_quality(problems, data, output_dir)
        with open(summary_path, "w") as handle:  # the annotation report reads these too
            json.dump(summary, handle, indent=2)
        if repo_id:
            _push_annotation_and_mark(output_dir, repo_id, configs, push_key)
        else:
            mark_stage_done(output_dir, "annotate", configs, summary)
    # No process moves on (e.g. to training on solution_pairs) before rank 0 has written everything.
    shard.barrier()
    return _annotate_results(output_dir)


def _push_annotation_and_mark(
    output_dir: str, repo_id: str, configs: dict[str, Any], key: dict[str, Any]
) -> bool:
    """Push the saved annotation; the stage is done (marked) only once the push went through."""
    from ..hub import push_annotation

    result = push_annotation(output_dir, repo_id, settings=configs, key=key)
    if result.ok:
        with open(os.path.join(output_dir, "summary.json")) as handle:
            summary = json.load(handle)
        mark_stage_done(output_dir, "annotate", configs, {**summary, "hub_dataset_id": repo_id})
    return result.ok


def _annotate_results(output_dir: str) -> dict[str, Any]:
    """The stage's results: the marker's, or (a push still pending) the saved summary."""
    marker = os.path.join(output_dir, STAGE_MARKER)
    if os.path.exists(marker):
        with open(marker) as handle:
            return json.load(handle)["results"]
    with open(os.path.join(output_dir, "summary.json")) as handle:
        return json.load(handle)


def _toy_label_quality(problems, data, output_dir: str) -> dict[str, Any]:
    """On the toy task every step's truth is known: the precision of the pairs' labels and the search's reach,
    printed and written to ``label_quality.json``."""
    from ..search.label_quality import annotation_label_quality, format_label_quality
    from ..toy.oracle import ToyStepOracle

    quality = annotation_label_quality(
        ToyStepOracle(problems),
        data["trees"],
        {"pairs": data["pairs"], "solution_pairs": data["solution_pairs"]},
    )
    with open(os.path.join(output_dir, "label_quality.json"), "w") as handle:
        json.dump(quality, handle, indent=2)
    precision = {**quality["precision"]["pairs"]}
    if "all" in quality["precision"]["solution_pairs"]:
        precision["solution"] = quality["precision"]["solution_pairs"]["all"]
    print(
        "[annotate] label precision against the toy task's gold steps:\n"
        + format_label_quality(precision, quality["reach"])
    )
    return quality


def _train_and_save(trainer, tokenizer, stage: str, script_args, **results: Any) -> dict[str, Any]:
    """Train, save model + tokenizer, mark the stage done (with the card), push when asked."""
    args = trainer.args
    trainer.train()
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    results = {
        "train_steps": trainer.state.global_step,
        "final_log": logs[-1] if logs else None,
        "train_runtime": next(
            (log["train_runtime"] for log in trainer.state.log_history if "train_runtime" in log), None
        ),
        **results,
    }
    mark_stage_done(args.output_dir, stage, {"script": script_args, "training": args.to_dict()}, results)
    if args.push_to_hub:
        trainer.push_to_hub()
    return results


def _require_inputs(script_args: TrainScriptArguments) -> None:
    """A missing local model or annotation folder stops a training stage before anything loads."""
    require_path(script_args.model_name_or_path, "model_name_or_path")
    require_path(script_args.annotation_dir, "annotation_dir")


def _load_trainable(script_args: TrainScriptArguments, seed: int = 0):
    from transformers import AutoTokenizer, set_seed

    from ..models.loading import torch_dtype
    from ..models.value_head import ValueHeadForCausalLM

    # Seeded before loading, so that anything a model draws while it is built is the same on every run and
    # every process (a new value head itself starts at zero).
    set_seed(seed)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(script_args.dtype)}
    if script_args.attn_implementation:
        kwargs["attn_implementation"] = script_args.attn_implementation
    model = ValueHeadForCausalLM.from_pretrained(script_args.model_name_or_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def run_value_sft(script_args: TrainScriptArguments, training_args) -> dict[str, Any]:
    """Stage 2: SFT on correct solutions + MSE of the value head on every step (Eq. 7)."""
    from ..trainer.value_sft_trainer import ValueSFTTrainer

    _require_inputs(script_args)
    model, tokenizer = _load_trainable(script_args, training_args.seed)
    values = _load_annotation(script_args.annotation_dir, "values")
    trainer = ValueSFTTrainer(model, args=training_args, train_dataset=values, processing_class=tokenizer)
    return _train_and_save(trainer, tokenizer, "value_sft", script_args)


def apply_recipe(script_args: SVPOScriptArguments, training_args) -> None:
    """Set the weights of ``--recipe`` (an ablation, or ``dpo``) on ``training_args``; idempotent."""
    from ..trainer.svpo_config import RECIPES

    if script_args.recipe is None:
        return
    if script_args.recipe not in RECIPES:
        raise UsageError(f"recipe {script_args.recipe!r} unknown: expected one of {sorted(RECIPES)}")
    for name, value in RECIPES[script_args.recipe].items():
        setattr(training_args, name, value)


def run_svpo(script_args: SVPOScriptArguments, training_args) -> dict[str, Any]:
    """Stage 3: SVPO (Eq. 10) on step-level pairs, or a named ablation / the solution-level DPO baseline."""
    from ..trainer.svpo_trainer import SVPOTrainer

    apply_recipe(script_args, training_args)
    _require_inputs(script_args)
    model, tokenizer = _load_trainable(script_args, training_args.seed)
    pairs = _load_annotation(script_args.annotation_dir, script_args.dataset_config)
    if len(pairs) == 0:
        raise UsageError(
            f"{script_args.annotation_dir}/{script_args.dataset_config} has no pairs: MCTS found no question with "
            "both a correct and an incorrect step (annotate more problems or more simulations)"
        )
    trainer = SVPOTrainer(model, args=training_args, train_dataset=pairs, processing_class=tokenizer)
    return _train_and_save(trainer, tokenizer, "svpo", script_args, num_pairs=len(pairs))


def run_evaluate(args: EvaluateArguments) -> list[dict[str, Any]]:
    """Stage 4: every strategy on every dataset; per-problem JSONL, ``results.json`` and ``results.md``.

    Strategies, the model path and every problem set are checked before any solving starts.
    """
    from ..data import load_problems
    from ..evaluation import Strategy, evaluate, results_table, summary_row
    from ..search.vllm_backend import make_backend, vllm_options_from

    strategies = [Strategy.parse(s) for s in args.strategies]
    if args.sbs_temperature is not None:
        strategies = [
            Strategy(**{**asdict(s), "temperature": args.sbs_temperature}) if s.kind == "sbs" else s
            for s in strategies
        ]
    require_path(args.model_name_or_path, "model_name_or_path")
    problem_sets = []
    for dataset_name in args.datasets:
        problems = load_problems(dataset_name, args.dataset_split)
        if args.limit is not None:
            problems = problems.select(range(min(args.limit, len(problems))))
        problem_sets.append((os.path.basename(os.path.normpath(dataset_name)), problems))
    shard = ProcessShard.from_environment(args.distributed_timeout_hours)
    reference = _reference_ranker(args, strategies, shard.device)
    backend = make_backend(
        args.backend,
        args.model_name_or_path,
        dtype=args.dtype,
        device=shard.device,
        batch_size=args.generation_batch_size,
        seed=args.seed + shard.rank,
        vllm_options=vllm_options_from(args),
        require_value_head=any(s.needs_value for s in strategies),
        allow_untrained_value_head=args.allow_untrained_value_head,
    )
    system = args.system_name or os.path.basename(os.path.normpath(args.model_name_or_path))
    rows = []
    for label, problems in problem_sets:
        for strategy in strategies:
            predictions = os.path.join(args.output_dir, f"{_slug(system)}__{label}__{strategy.slug}.jsonl")
            result = evaluate(
                backend,
                problems,
                strategy,
                max_depth=args.max_depth,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                output_jsonl=predictions,
                shard=shard,
                resume=args.resume,
                ranker=reference if strategy.needs_reference else None,
            )
            # Where the per-problem records are: what pipeline.claims compares problem by problem.
            rows.append({**summary_row(system, label, result), "predictions": predictions})
            if shard.is_main:
                accuracy = 100 * result.metrics["accuracy"]
                print(f"[evaluate] {system} {strategy.label} on {label}: {accuracy:.1f}%")
        if args.value_diagnostic and shard.is_main:
            _run_value_diagnostic(
                args, backend, problems, os.path.join(args.output_dir, f"{_slug(system)}__{label}")
            )
    if shard.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
            json.dump(rows, handle, indent=2)
        with open(os.path.join(args.output_dir, "results.md"), "w") as handle:
            handle.write(results_table(rows) + "\n")
    shard.barrier()
    return rows


def _reference_ranker(args: EvaluateArguments, strategies: list, device: Any):
    """The reference policy's prior for ``sbs(B1,B2,reference)`` strategies (None when none asks for it)."""
    wanting = [s.label for s in strategies if s.needs_reference]
    if not wanting:
        if args.reference_model is not None:
            print(
                f"[evaluate] --reference_model {args.reference_model} is not used: no strategy ranks by it "
                "(add e.g. 'sbs(1,5,reference)')"
            )
        return None
    if args.reference_model is None:
        raise UsageError(
            f"{', '.join(wanting)}: ranks by a reference policy's prior: give --reference_model PATH "
            "(for an SVPO model, the value-SFT checkpoint it started from)"
        )
    from ..models.loading import load_policy
    from ..search.rankers import PolicyPriorRanker

    require_path(args.reference_model, "reference_model")
    model, tokenizer = load_policy(args.reference_model, args.dtype, value_head=False, device=device)
    return PolicyPriorRanker(model, tokenizer, batch_size=args.generation_batch_size)


def _run_value_diagnostic(args: EvaluateArguments, backend, problems, prefix: str) -> dict[str, Any]:
    """The value diagnostic of one dataset: ``<prefix>__value_diagnostic.{json,jsonl}``, printed too."""
    from ..value_diagnostic import format_value_diagnostic, has_trained_value_head, value_diagnostic

    if args.value_diagnostic_limit is not None:
        problems = problems.select(range(min(args.value_diagnostic_limit, len(problems))))
    use_value = has_trained_value_head(backend)
    if not use_value:
        print(
            f"[evaluate] {args.model_name_or_path} has no trained value head: the diagnostic reports the prior"
        )
    result = value_diagnostic(
        backend,
        problems,
        args.value_diagnostic_labels,
        num_samples=args.value_diagnostic_samples,
        temperature=args.sbs_temperature if args.sbs_temperature is not None else 0.6,
        max_depth=args.max_depth,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        use_value=use_value,
        num_rollouts=args.value_diagnostic_rollouts,
        output_jsonl=f"{prefix}__value_diagnostic.jsonl",
    )
    with open(f"{prefix}__value_diagnostic.json", "w") as handle:
        json.dump(result.metrics, handle, indent=2)
    print(f"[evaluate] {format_value_diagnostic(result.metrics)}")
    return result.metrics
