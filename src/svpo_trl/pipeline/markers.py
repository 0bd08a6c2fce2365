"""Stage markers: what a finished stage records in ``svpo_stage.json`` and how the pipeline decides
whether it is up to date.

A marker holds the settings that decide the stage's output (:func:`stage_settings`: model, data,
training hyper-parameters, MCTS settings; not logging, saving or batch sizes of generation), their
fingerprint, and the fingerprints of its inputs' markers. :func:`stage_changes` compares a marker with
what a setting file now gives; :func:`move_aside` keeps an out-of-date output as ``<dir>.stale-<n>``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from typing import Any

from ..jsonable import jsonable as _jsonable

STAGE_MARKER = "svpo_stage.json"

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
    from ..search.mcts import _RESULT_FIELDS

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
    # A setting the marker does not know that is unset now (a field a newer svpo_trl added, at its None
    # default) changes nothing the stage made.
    added_unset = {key for key in set(new) - set(old) if new[key] is None}
    return {
        key: (None if old.get(key, missing) is missing else old[key], new.get(key))
        for key in sorted((set(old) | set(new)) - added_unset)
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
