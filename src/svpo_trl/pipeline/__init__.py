"""The pipeline's stages as functions: what each recipe in ``recipes/`` runs.

A package split by concern; every name is importable from ``svpo_trl.pipeline`` as before:

- :mod:`.arguments`: the recipes' script-argument dataclasses;
- :mod:`.markers`: stage markers (``svpo_stage.json``), settings, fingerprints, ``move_aside``;
- :mod:`.stages`: the stage functions ``run_sft`` … ``run_evaluate``;
- :mod:`.runner`: ``run_pipeline``, the stages of a setting file in order.

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

from typing import Any

from .arguments import (
    AnnotateScriptArguments,
    EvaluateArguments,
    SearchBackendArguments,
    SFTScriptArguments,
    SVPOScriptArguments,
    TrainScriptArguments,
)
from .markers import (
    STAGE_MARKER,
    describe_changes,
    mark_stage_done,
    move_aside,
    read_marker,
    stage_changes,
    stage_done,
    stage_settings,
)
from .runner import PIPELINE_STAGES, run_pipeline

# The private helpers tests and callers reached as svpo_trl.pipeline._name before the split.
from .stages import _load_annotation as _load_annotation
from .stages import _load_trainable as _load_trainable
from .stages import _prepare_sft as _prepare_sft
from .stages import _require_inputs as _require_inputs
from .stages import (
    apply_recipe,
    run_annotate,
    run_evaluate,
    run_sft,
    run_svpo,
    run_value_sft,
)

__all__ = [
    "PIPELINE_STAGES",
    "STAGE_MARKER",
    "AnnotateScriptArguments",
    "EvaluateArguments",
    "SFTScriptArguments",
    "SVPOScriptArguments",
    "SearchBackendArguments",
    "TrainScriptArguments",
    "apply_recipe",
    "describe_changes",
    "mark_stage_done",
    "move_aside",
    "read_marker",
    "run_annotate",
    "run_evaluate",
    "run_pipeline",
    "run_sft",
    "run_svpo",
    "run_value_sft",
    "stage_changes",
    "stage_done",
    "stage_settings",
]


def __getattr__(name: str) -> Any:
    # load_policy moved below the pipeline and the search backends (no import cycle); old imports still work.
    if name == "load_policy":
        from ..models.loading import load_policy

        return load_policy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
