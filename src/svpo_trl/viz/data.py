"""Reading what the MCTS annotator writes: the ``trees``, ``pairs`` and ``values`` datasets.

An annotation lives in one of three places:

- a directory written by ``DatasetDict.save_to_disk`` (it holds ``dataset_dict.json``);
- a directory with one ``save_to_disk`` folder per dataset: ``trees/``, ``pairs/``, ``values/``;
- a Hub dataset (or a local folder laid out like one) with splits or configs named ``trees``,
  ``pairs``, ``values``, read with ``datasets.load_dataset``.

Next to the datasets, an optional ``summary.json`` holds the annotator's totals.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASET_NAMES = ("trees", "pairs", "values")

# Fields every node of a ``trees`` row must carry (DESIGN.md, "Datasets the annotator writes").
REQUIRED_NODE_FIELDS = (
    "node_id",
    "parent_id",
    "depth",
    "text",
    "q_value",
    "visit_count",
    "prior",
    "is_terminal",
)
OPTIONAL_NODE_FIELDS = ("final_answer", "reward", "correct")
REQUIRED_TREE_COLUMNS = ("id", "question", "answer", "tree_index", "nodes")
PAIR_LINK_COLUMNS = ("tree_index", "chosen_node_id", "rejected_node_id")


@dataclass
class Annotation:
    """The datasets of one annotation run; ``pairs``/``values`` are None when absent."""

    trees: Any
    pairs: Any = None
    values: Any = None
    summary: dict = field(default_factory=dict)
    source: str = ""


def _load_summary(directory: Path) -> dict:
    path = directory / "summary.json"
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


def load_annotation(source: str | Path) -> Annotation:
    """Load an annotation from a local directory (either layout) or a Hub dataset id.

    Raises ``ValueError`` naming the source when no ``trees`` dataset can be found.
    """
    import datasets

    path = Path(source)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        parts = {name: loaded[name] for name in DATASET_NAMES if name in loaded}
        summary = _load_summary(path)
    elif path.is_dir() and (path / "trees").is_dir():
        from ..data import load_saved_dataset  # an annotation may have no pairs: an empty dataset on disk

        parts = {name: load_saved_dataset(path / name) for name in DATASET_NAMES if (path / name).is_dir()}
        summary = _load_summary(path)
    else:
        parts = _load_hub(str(source))
        summary = _load_summary(path) if path.is_dir() else {}
    if "trees" not in parts:
        raise ValueError(
            f"{source!s}: no 'trees' dataset found (expected a DatasetDict with a 'trees' split, a 'trees/' "
            f"save_to_disk folder, or a Hub dataset with a 'trees' split or config); found {sorted(parts)}"
        )
    return Annotation(
        trees=parts["trees"],
        pairs=parts.get("pairs"),
        values=parts.get("values"),
        summary=summary,
        source=str(source),
    )


def _load_hub(name: str) -> dict:
    """``trees``/``pairs``/``values`` as splits of one config (``DatasetDict.push_to_hub``) or as configs."""
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as error:
        # A repo with one config per dataset has no default config; try those by name below.
        first_error: Exception | None = error
        loaded = {}
    else:
        first_error = None
    parts = {split: loaded[split] for split in DATASET_NAMES if split in loaded}
    if parts:
        return parts
    for split in DATASET_NAMES:
        # ``DatasetDict.push_to_hub`` puts the three datasets in one config as splits, but their schemas
        # differ, so the config cannot load as a whole: read each split's files on their own.
        try:
            parts[split] = datasets.load_dataset(name, data_files={split: f"data/{split}-*"}, split=split)
        except Exception:
            continue
    if parts:
        return parts
    for config in DATASET_NAMES:
        try:
            ds = datasets.load_dataset(name, config)
        except Exception:
            continue
        parts[config] = ds[next(iter(ds))] if isinstance(ds, datasets.DatasetDict) else ds
    if not parts and first_error is not None:
        raise ValueError(
            f"{name}: not a local annotation directory and not loadable as a dataset: {first_error}"
        )
    return parts


def _as_node_list(nodes: Any, where: str) -> list[dict]:
    """Accept a list of dicts (``List(struct)``) or a dict of lists (legacy ``Sequence(struct)``)."""
    if isinstance(nodes, dict):
        keys = list(nodes)
        length = len(nodes[keys[0]]) if keys else 0
        return [{k: nodes[k][i] for k in keys} for i in range(length)]
    if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
        raise ValueError(f"{where}: column 'nodes' must be a list of dicts, got {type(nodes).__name__}")
    return nodes


def tree_nodes(row: dict, where: str = "trees row") -> list[dict]:
    """The validated nodes of one ``trees`` row, sorted by ``node_id``, optional fields filled with None.

    Checks that the required fields exist, node ids are unique, exactly one root (``parent_id`` -1,
    ``node_id`` 0) exists, and every parent exists; errors name the row and the node.
    """
    for column in REQUIRED_TREE_COLUMNS:
        if column not in row:
            raise ValueError(
                f"{where}: missing column {column!r} (expected columns {list(REQUIRED_TREE_COLUMNS)})"
            )
    where = f"{where} (id={row['id']!r}, tree_index={row['tree_index']})"
    nodes = []
    for position, raw in enumerate(_as_node_list(row["nodes"], where)):
        missing = [k for k in REQUIRED_NODE_FIELDS if k not in raw]
        if missing:
            raise ValueError(f"{where}: node at position {position} lacks field(s) {missing}")
        node = dict(raw)
        for key in OPTIONAL_NODE_FIELDS:
            node.setdefault(key, None)
        nodes.append(node)
    if not nodes:
        raise ValueError(f"{where}: 'nodes' is empty (a tree has at least its root)")
    nodes.sort(key=lambda n: n["node_id"])
    ids = [n["node_id"] for n in nodes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: duplicate node_id values")
    roots = [n for n in nodes if n["parent_id"] == -1]
    if len(roots) != 1 or roots[0]["node_id"] != 0:
        raise ValueError(
            f"{where}: expected exactly one root with node_id 0 and parent_id -1, found {len(roots)}"
        )
    known = set(ids)
    for n in nodes:
        if n["parent_id"] != -1 and n["parent_id"] not in known:
            raise ValueError(
                f"{where}: node {n['node_id']} has parent_id {n['parent_id']}, which is not a node"
            )
    return nodes


def correct_path_nodes(nodes: list[dict]) -> set[int]:
    """Ids of the nodes on a path from the root to a correct terminal (Algorithm 1 labels them correct)."""
    parent = {n["node_id"]: n["parent_id"] for n in nodes}
    on_path: set[int] = set()
    for n in nodes:
        if n["is_terminal"] and n["correct"]:
            node_id = n["node_id"]
            while node_id != -1 and node_id not in on_path:
                on_path.add(node_id)
                node_id = parent[node_id]
    return on_path


def path_texts(nodes: list[dict]) -> dict[str, int]:
    """Map from the concatenated step texts root..node (a partial solution) to the node id."""
    by_id = {n["node_id"]: n for n in nodes}
    texts: dict[int, str] = {}
    for n in nodes:  # sorted by id; a parent may still come later, so resolve recursively
        chain = []
        node_id = n["node_id"]
        while node_id != -1 and node_id not in texts:
            chain.append(node_id)
            node_id = by_id[node_id]["parent_id"]
        prefix = texts.get(node_id, "") if node_id != -1 else ""
        for link in reversed(chain):
            prefix = prefix + (by_id[link]["text"] or "")
            texts[link] = prefix
    return {text: node_id for node_id, text in texts.items() if node_id != 0}


_PAIR_ID_SUFFIX = re.compile(r"/\d+/\d+-\d+/\d+$")


def pair_question_id(pair_id: Any) -> Any:
    """The question id of a ``pairs`` row: the annotator writes ``{question}/{tree}/{chosen}-{tree}/{rejected}``."""
    if isinstance(pair_id, str) and _PAIR_ID_SUFFIX.search(pair_id):
        return _PAIR_ID_SUFFIX.sub("", pair_id)
    return pair_id


def pairs_for_tree(pairs: Any, question_id: Any, tree_index: int, nodes: list[dict]) -> list[dict]:
    """The preference pairs (Algorithm 1) with an end in this tree, ends given as node ids.

    Uses the ``tree_index``, ``chosen_node_id``, ``rejected_node_id`` (and optional
    ``rejected_tree_index``, for a negative borrowed from another tree of the question) columns when
    present; otherwise matches the ``chosen``/``rejected`` partial solutions against the tree's
    root-to-node texts. An end in another tree is None, with its tree in ``chosen_tree``/``rejected_tree``.
    """
    if pairs is None:
        return []
    if hasattr(pairs, "column_names"):
        columns = set(pairs.column_names)
        if "id" not in columns:
            raise ValueError(f"pairs: missing column 'id' (columns: {sorted(columns)})")
        rows = [pairs[i] for i, pid in enumerate(pairs["id"]) if pair_question_id(pid) == question_id]
    else:
        rows = [row for row in pairs if pair_question_id(row.get("id")) == question_id]
        columns = set().union(*(row.keys() for row in rows))
    if not rows:
        return []
    for column in ("chosen", "rejected", "pair_type"):
        if column not in columns:
            raise ValueError(f"pairs: missing column {column!r} (columns: {sorted(columns)})")
    known = {n["node_id"] for n in nodes}
    linked = all(c in columns for c in PAIR_LINK_COLUMNS)
    by_text = None if linked else path_texts(nodes)
    result = []
    for row in rows:
        if linked:
            chosen_tree = row["tree_index"]
            rejected_tree = row.get("rejected_tree_index")
            rejected_tree = chosen_tree if rejected_tree is None else rejected_tree
            if tree_index not in (chosen_tree, rejected_tree):
                continue
            chosen = row["chosen_node_id"] if chosen_tree == tree_index else None
            rejected = row["rejected_node_id"] if rejected_tree == tree_index else None
            for name, node_id in (("chosen_node_id", chosen), ("rejected_node_id", rejected)):
                if node_id is not None and node_id not in known:
                    raise ValueError(
                        f"pairs row {row['id']!r}: {name}={node_id} is not a node of tree {tree_index} "
                        f"of question {question_id!r}"
                    )
        else:
            prompt = row.get("prompt") or ""
            chosen = by_text.get(row["chosen"].removeprefix(prompt))
            rejected = by_text.get(row["rejected"].removeprefix(prompt))
            if chosen is None or rejected is None:
                continue  # the pair comes from another tree of this question
            chosen_tree = rejected_tree = tree_index
        result.append(
            {
                "chosen": chosen,
                "rejected": rejected,
                "chosen_tree": chosen_tree,
                "rejected_tree": rejected_tree,
                "type": row["pair_type"],
                "chosen_value": row.get("chosen_value"),
                "rejected_value": row.get("rejected_value"),
            }
        )
    return result
