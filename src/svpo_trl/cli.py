"""Argument parsing for the recipes: TRL's `TrlParser`, with one YAML file per setting.

A setting (``recipes/configs/toy.yaml``) holds one section per pipeline stage (``sft``, ``annotate``,
``value_sft``, ``svpo``, ``dpo``, ``evaluate``) and optional top-level keys shared by every stage
(e.g. ``seed``). Each recipe reads its own section, so the same file drives a single stage
(``accelerate launch recipes/svpo.py --config recipes/configs/toy.yaml``) and the whole pipeline.
A flat YAML file without sections works as with plain TRL. Command-line flags override the file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

import yaml
from trl import TrlParser

# Sections of a setting file: one per stage, and ``pipeline`` (read by the pipeline alone).
STAGES = ("sft", "annotate", "value_sft", "svpo", "dpo", "evaluate", "pipeline")


def load_setting(path: str) -> dict[str, Any]:
    """Read a setting YAML file; a clear error names the file when it is not a mapping."""
    with open(path) as handle:
        setting = yaml.safe_load(handle)
    if not isinstance(setting, dict):
        raise ValueError(f"{path}: expected a YAML mapping of stage sections, got {type(setting).__name__}")
    return setting


def stage_section(setting: dict[str, Any], stage: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shared, own)``: the top-level keys shared by all stages, and the keys of ``stage``'s section.

    A setting without any stage section is a flat TRL-style file: all of it is the stage's own.
    """
    if not any(name in setting for name in STAGES):
        return {}, {k: v for k, v in setting.items() if k != "env"}
    shared = {k: v for k, v in setting.items() if k not in STAGES and k != "env"}
    own = setting.get(stage) or {}
    if not isinstance(own, dict):
        raise ValueError(f"section '{stage}' must be a mapping, got {type(own).__name__}")
    return shared, own


def parse_stage_args(stage: str, dataclass_types: Iterable[type], args: list[str] | None = None) -> tuple:
    """Parse ``--config setting.yaml`` (the ``stage`` section) plus CLI overrides into the dataclasses.

    Unknown keys in the section raise a ``ValueError`` that names them and the stage, as TRL does.
    """
    args = list(sys.argv[1:] if args is None else args)
    parser = TrlParser(list(dataclass_types))
    if "--config" in args:
        index = args.index("--config")
        args.pop(index)
        path = args.pop(index)
        setting = load_setting(path)
        for key, value in (setting.get("env") or {}).items():
            os.environ[key] = str(value)
        shared, own = stage_section(setting, stage)
        known = {action.dest for action in parser._actions}
        # Shared keys go to the stages that have such a field; a stage's own keys must all be known.
        shared = {k: v for k, v in shared.items() if k in known}
        unknown = parser.set_defaults_with_config(**{**shared, **own})
        if unknown:
            raise ValueError(
                f"{path}: unknown keys for stage '{stage}': {unknown[::2]} — remove them or fix their names"
            )
    return parser.parse_args_into_dataclasses(args=args)
