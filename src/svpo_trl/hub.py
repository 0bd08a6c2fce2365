"""Pushing an annotation to the Hugging Face Hub: one config per dataset, a card, and a push that can fail.

The annotation stage writes ``trees``, ``pairs``, ``values`` and ``solution_pairs`` under its
``output_dir``; :func:`push_annotation` pushes each as its own config of one Hub dataset repo (their
schemas differ, so they cannot be splits of one config), split ``train`` (what
``load_dataset(repo, "pairs", split="train")`` and the training stages read), then a dataset card that
records the settings and the summary.

A push needs the network and a token, and a long annotation must not be lost to either: the push runs
after everything is saved locally, never raises, and says in one line what failed. What was pushed is
recorded in ``<output_dir>/hub_push.json``, so running the stage again pushes only what is missing
(:func:`push_pending` tells whether a finished annotation still waits for its push).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .jsonable import jsonable as _jsonable

__all__ = [
    "ANNOTATION_DATASETS",
    "PUSH_RECORD",
    "PushResult",
    "annotation_card",
    "push_annotation",
    "push_pending",
    "read_push_record",
]

ANNOTATION_DATASETS = ("trees", "pairs", "values", "solution_pairs")
PUSH_RECORD = "hub_push.json"


@dataclass
class PushResult:
    """What :func:`push_annotation` did: ``pushed`` configs (this call and earlier ones), the card, any error."""

    repo_id: str
    pushed: list[str] = field(default_factory=list)
    card: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def read_push_record(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The push record of ``output_dir`` (None when nothing was pushed or tried there)."""
    path = Path(output_dir) / PUSH_RECORD
    if not path.is_file():
        return None
    with open(path) as handle:
        return json.load(handle)


def _write_record(output_dir: Path, record: dict[str, Any]) -> None:
    tmp = output_dir / f"{PUSH_RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, output_dir / PUSH_RECORD)


def push_pending(output_dir: str | os.PathLike, key: dict[str, Any] | None = None) -> bool:
    """Whether ``output_dir`` holds an annotation saved for a push that has not (all) gone through.

    With ``key`` (what determines the data: model, problems, search settings), only when the
    annotation was made with the same one (:func:`push_annotation` records it).
    """
    record = read_push_record(output_dir)
    if not record or not record.get("saved") or record.get("done"):
        return False
    if key is not None and record.get("key") != _jsonable(key):
        return False
    return all((Path(output_dir) / name).is_dir() for name in record.get("datasets", ()))


def annotation_card(repo_id: str, summary: dict[str, Any], settings: dict[str, Any]) -> str:
    """The dataset card's text (markdown, no metadata header): what the configs hold, summary, settings."""
    names = ", ".join(f"`{name}`" for name in ANNOTATION_DATASETS)
    return "\n".join(
        [
            f"# {repo_id.split('/')[-1]}: SVPO step-level preference annotation",
            "",
            "MCTS step-level preference annotation made by svpo_trl (Step-level Value Preference Optimization, "
            "arXiv 2406.10858). One config per dataset, split `train`: "
            f"{names}; load one with `datasets.load_dataset({repo_id!r}, 'pairs', split='train')`.",
            "",
            "| config | one row per |",
            "|---|---|",
            "| `trees` | search tree (nodes with Q, N, prior, reward, correctness) |",
            "| `pairs` | step-level preference (Algorithm 1): prompt, chosen, rejected, their values, pair type |",
            "| `values` | root-to-terminal path with the Eq. 7 value label of every step |",
            "| `solution_pairs` | complete-solution pair (the solution-level DPO baseline) |",
            "",
            "## Summary",
            "",
            "```json",
            json.dumps(_jsonable(summary), indent=2),
            "```",
            "",
            "## Settings",
            "",
            "```json",
            json.dumps(_jsonable(settings), indent=2),
            "```",
            "",
        ]
    )


def push_annotation(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    datasets: Iterable[str] = ANNOTATION_DATASETS,
    settings: dict[str, Any] | None = None,
    key: dict[str, Any] | None = None,
    token: str | None = None,
    log: Any = print,
) -> PushResult:
    """Push the annotation saved in ``output_dir`` to ``repo_id``: one config per dataset, then the card.

    Never raises for a failed push (no network, no token, a refused repo): the error goes into the
    result, into ``hub_push.json`` and, through ``log``, into one line saying that everything is saved
    locally and that running again retries the push. Configs already pushed to the same ``repo_id`` (by
    an earlier, interrupted call) are not pushed again. ``datasets`` not saved in ``output_dir`` are
    skipped; ``settings`` go into the card, ``key`` into the record (for :func:`push_pending`).
    """
    from datasets import load_from_disk

    output = Path(output_dir)
    names = [name for name in datasets if (output / name).is_dir()]
    record = read_push_record(output) or {}
    if record.get("repo_id") != repo_id:
        record = {"repo_id": repo_id, "pushed": [], "card": False}
    record.update(
        {"saved": True, "done": False, "datasets": names, "key": _jsonable(key or {}), "error": None}
    )
    _write_record(output, record)
    result = PushResult(repo_id, pushed=list(record["pushed"]), card=bool(record["card"]))
    try:
        for name in names:
            if name in record["pushed"]:
                continue
            load_from_disk(str(output / name)).push_to_hub(
                repo_id, config_name=name, split="train", token=token
            )
            record["pushed"].append(name)
            result.pushed.append(name)
            _write_record(output, record)
        summary_path = output / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        _upload_card(repo_id, annotation_card(repo_id, summary, settings or {}), token)
        record["card"] = result.card = True
        record["done"] = True
    except Exception as error:  # no network, no token, a refused repo: the local annotation stands
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        result.error = record["error"] = f"{type(error).__name__}: {first_line}"
        remaining = [name for name in names if name not in record["pushed"]]
        log(
            f"[hub] push to {repo_id} failed ({result.error}); everything is saved in {output}; run the same "
            f"command again to retry the push only (left: {', '.join(remaining) or 'the card'})"
        )
    _write_record(output, record)
    return result


def _upload_card(repo_id: str, text: str, token: str | None) -> None:
    """Replace the card's text, keeping the metadata header that ``push_to_hub`` wrote (the configs map)."""
    from huggingface_hub import DatasetCard
    from huggingface_hub.errors import EntryNotFoundError

    try:
        metadata = DatasetCard.load(repo_id, token=token).data.to_yaml()
    except EntryNotFoundError:
        metadata = ""
    header = f"---\n{metadata}\n---\n" if metadata.strip() else ""
    DatasetCard(header + text).push_to_hub(repo_id, token=token, commit_message="svpo_trl annotation card")
