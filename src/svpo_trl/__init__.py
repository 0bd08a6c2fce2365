"""svpo_trl: Step-level Value Preference Optimization (arXiv 2406.10858) on TRL.

``from svpo_trl import SVPOTrainer`` works as in TRL; heavy modules (torch, transformers, TRL) are
imported on first use of the name that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

from .steps import DEFAULT_FORMAT, Step, StepFormat, extract_final_answer

__version__ = "0.1.0"

_LAZY = {
    "PythonSandbox": "sandbox",
    "ExecResult": "sandbox",
    "is_equiv": "grading",
    "extract_gold": "grading",
    "load_problems": "data",
    "load_saved_dataset": "data",
    "load_sft_dataset": "sft_data",
    "gsm8k_to_step_format": "sft_data",
    "UsageError": "errors",
    "ProcessShard": "distributed",
    "tokenize_solution": "tokenization",
    "ValueHeadForCausalLM": "models.value_head",
    "ValueSFTConfig": "trainer.value_sft_config",
    "ValueSFTTrainer": "trainer.value_sft_trainer",
    "SVPOConfig": "trainer.svpo_config",
    "SVPOTrainer": "trainer.svpo_trainer",
    "svpo_loss_terms": "trainer.losses",
    "value_mse": "trainer.losses",
    "Completion": "search.backends",
    "GenerationBackend": "search.backends",
    "HFBackend": "search.backends",
    "VLLMBackend": "search.vllm_backend",
    "State": "search.state",
    "StepSampler": "search.sampler",
    "MCTSConfig": "search.mcts",
    "MCTSAnnotator": "search.mcts",
    "extract_preference_pairs": "search.pairs",
    "solution_level_pairs": "search.solution_pairs",
    "SBSConfig": "search.sbs",
    "SBSGenerator": "search.sbs",
    "Strategy": "evaluation",
    "evaluate": "evaluation",
    "results_table": "evaluation",
}

__all__ = ["DEFAULT_FORMAT", "Step", "StepFormat", "__version__", "extract_final_answer", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'svpo_trl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
