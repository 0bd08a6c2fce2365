"""One self-contained HTML page per question: the MCTS trees of the annotation, drawn like Figure 1.

Node colour is Q(s, a) (Eq. 6 backups, red -1 / grey 0 / green +1), radius grows with sqrt(N),
terminals carry ✓/✗ (reward R of Eq. 5), the correct paths (root to a correct terminal, which
Algorithm 1 labels correct) are highlighted, and the step-level preference pairs extracted from the
tree are dashed chosen -> rejected links. The page is inline SVG + vanilla JS + CSS: no network,
works offline. All model text goes into the page as JSON and reaches the DOM through
``textContent`` only, so step text cannot inject markup or script.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..steps import DEFAULT_FORMAT, StepFormat
from .data import correct_path_nodes, pairs_for_tree, tree_nodes
from .template import PAGE_CSS, PAGE_JS, PAGE_TEMPLATE


@dataclass
class TreeViewConfig:
    """How the tree page is laid out.

    Args:
        max_visible_leaves: trees with more leaves open partly collapsed: first the path to the most visited
            correct terminal, then the most visited nodes, while at most this many leaves show; the rest
            expand on click ("Expand all", or ``#expand=all`` in the URL). Default 40 (fits a laptop screen
            at full size; a 60-simulation, 5-children tree of the paper's A.1 settings has about 230 leaves).
        node_spacing: horizontal distance between neighbouring leaves, in SVG pixels. Default 40.
        level_spacing: vertical distance between depths, in SVG pixels. Default 110.
        max_radius: radius of the most visited node; others scale with sqrt(N / N_max). Default 16.
        min_radius: radius of unvisited nodes (N = 0). Default 5.
    """

    max_visible_leaves: int = 40
    node_spacing: int = 40
    level_spacing: int = 110
    max_radius: int = 16
    min_radius: int = 5


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf, and ``JSON.parse`` rejects them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _node_payload(node: dict, step_format: StepFormat, on_path: set[int]) -> dict:
    text = node["text"] or ""
    entry = {
        "id": node["node_id"],
        "parent": node["parent_id"],
        "depth": node["depth"],
        "q": _finite(float(node["q_value"])) if node["q_value"] is not None else None,
        "n": int(node["visit_count"] or 0),
        "prior": _finite(float(node["prior"])) if node["prior"] is not None else None,
        "terminal": bool(node["is_terminal"]),
        "correct": node["correct"],
        "final_answer": node["final_answer"],
        "reward": _finite(node["reward"]),
        "on_path": node["node_id"] in on_path,
        "text": text,
    }
    if text.strip():
        step = step_format.parse(text)
        entry.update(
            kind=step.kind, analysis=step.analysis, code=step.code, output=step.output, error=step.error
        )
    return entry


def tree_payload(
    tree_row: dict, pairs: Any = None, step_format: StepFormat = DEFAULT_FORMAT, where: str = "trees row"
) -> dict:
    """The JSON the page draws for one ``trees`` row: nodes with parsed steps, pairs, per-tree stats."""
    nodes = tree_nodes(tree_row, where)
    on_path = correct_path_nodes(nodes)
    tree_pairs = pairs_for_tree(pairs, tree_row["id"], tree_row["tree_index"], nodes)
    terminals = [n for n in nodes if n["is_terminal"]]
    stats = {
        "nodes": len(nodes),
        "max_depth": max(n["depth"] for n in nodes),
        "correct_terminals": sum(1 for n in terminals if n["correct"] is True),
        "incorrect_terminals": sum(1 for n in terminals if n["correct"] is False),
        "other_terminals": sum(1 for n in terminals if n["correct"] is None),
        "pairs": len(tree_pairs),
    }
    for column in ("num_tokens", "seconds"):
        if tree_row.get(column) is not None:
            stats[column] = _finite(tree_row[column])
    return {
        "tree_index": tree_row["tree_index"],
        "nodes": [_node_payload(n, step_format, on_path) for n in nodes],
        "pairs": tree_pairs,
        "stats": stats,
    }


def _json_for_script(data: Any) -> str:
    """JSON safe inside ``<script type="application/json">``: no ``</script>``, no comment or CDATA openers."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _page(payloads: list[dict], question: str, answer: Any, question_id: Any, config: TreeViewConfig) -> str:
    data = {
        "id": question_id,
        "question": question,
        "answer": None if answer is None else str(answer),
        "trees": payloads,
        "config": asdict(config),
    }
    title = f"SVPO search tree · {question_id}"
    return (
        PAGE_TEMPLATE.replace("{{TITLE}}", html.escape(title))
        .replace("{{CSS}}", PAGE_CSS)
        .replace("{{JS}}", PAGE_JS)
        .replace("{{DATA}}", _json_for_script(data))
    )


def _write(page: str, path: str | Path | None) -> str:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(page, encoding="utf-8")
    return page


def render_tree_html(
    tree_row: dict,
    pairs: Any = None,
    path: str | Path | None = None,
    *,
    step_format: StepFormat = DEFAULT_FORMAT,
    config: TreeViewConfig | None = None,
) -> str:
    """Render one ``trees`` row (one MCTS tree) as a self-contained HTML page; write it to ``path`` if given.

    ``pairs`` is the ``pairs`` dataset (or a list of its rows); the pairs of this tree are drawn as links.
    Returns the HTML text. The page opens the node given by a URL hash such as ``#node=5``
    (also ``expand=all``, ``depth=k`` to collapse below depth k).
    """
    config = config or TreeViewConfig()
    payload = tree_payload(tree_row, pairs, step_format)
    page = _page([payload], tree_row["question"], tree_row["answer"], tree_row["id"], config)
    return _write(page, path)


def render_question_html(
    trees: Any,
    question_id: Any,
    pairs: Any = None,
    path: str | Path | None = None,
    *,
    tree_index: int | None = None,
    step_format: StepFormat = DEFAULT_FORMAT,
    config: TreeViewConfig | None = None,
) -> str:
    """Render all trees of one question (or only ``tree_index``) into one HTML page with a tree selector.

    ``trees`` is the ``trees`` dataset or a list of its rows. Raises ``ValueError`` when the question
    (or the tree index) is not there, listing what is.
    """
    config = config or TreeViewConfig()
    if hasattr(trees, "filter") and hasattr(trees, "column_names"):
        if "id" not in trees.column_names:
            raise ValueError(f"trees: missing column 'id' (columns: {trees.column_names})")
        rows = [trees[i] for i, qid in enumerate(trees["id"]) if qid == question_id]
        all_ids = trees["id"]
    else:
        rows = [row for row in trees if row["id"] == question_id]
        all_ids = [row["id"] for row in trees]
    if not rows:
        known = sorted({str(i) for i in all_ids})
        shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
        raise ValueError(f"question id {question_id!r} is not in the trees dataset (known ids: {shown})")
    if tree_index is not None:
        indices = [row["tree_index"] for row in rows]
        rows = [row for row in rows if row["tree_index"] == tree_index]
        if not rows:
            raise ValueError(
                f"question {question_id!r} has no tree with tree_index {tree_index} (has {indices})"
            )
    rows.sort(key=lambda r: r["tree_index"])
    payloads = [
        tree_payload(
            row, pairs, step_format, where=f"trees row for id={question_id!r} tree {row['tree_index']}"
        )
        for row in rows
    ]
    page = _page(payloads, rows[0]["question"], rows[0]["answer"], question_id, config)
    return _write(page, path)
