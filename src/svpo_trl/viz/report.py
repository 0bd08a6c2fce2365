"""The annotation report: what the MCTS annotation (§3.1) produced, as numbers (JSON) and plots (PNG).

- Q-value histogram by depth: the Eq. 6 estimates of all visited nodes (N > 0; an unvisited
  child keeps its initial Q and says nothing), one panel per depth.
- Solve rate by problem: per question, correct terminals / all terminals over its trees; a
  question is solved when at least one terminal is correct (it then yields positive pairs).
- Pairs per type: Algorithm 1's ``sibling`` / ``cousin`` / ``terminal`` pairs, and their mean
  value gap (chosen_value - rejected_value, the Eq. 9 quantity the margin acts on).
- Tree size distribution: nodes per tree.
- Tokens and time per question: from the ``num_tokens`` / ``seconds`` columns of ``trees`` when the
  annotator recorded them, summed over the question's trees; totals from ``summary.json`` otherwise.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .data import PAIR_LINK_COLUMNS, Annotation, load_annotation, pair_question_id, tree_nodes

Q_BINS = 20  # histogram bins over [-1, 1]: 0.1 wide


def _describe(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "min": None, "max": None, "mean": None, "median": None}
    return {
        "count": len(values),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
    }


def _histogram(values: list[float], low: float = -1.0, high: float = 1.0, bins: int = Q_BINS) -> dict:
    """Counts per bin over [low, high]; the last bin includes ``high`` (as numpy's histogram)."""
    counts = [0] * bins
    width = (high - low) / bins
    for v in values:
        index = min(bins - 1, max(0, math.floor((v - low) / width)))
        counts[index] += 1
    return {"edges": [round(low + i * width, 10) for i in range(bins + 1)], "counts": counts}


def annotation_statistics(annotation: Annotation) -> dict:
    """All report numbers for one annotation (JSON-serialisable)."""
    trees = annotation.trees
    q_by_depth: dict[int, list[float]] = defaultdict(list)
    unvisited = 0
    per_tree = []
    per_problem: dict[Any, dict] = {}
    terminal_counts = Counter()
    tokens: dict[Any, float] = defaultdict(float)
    seconds: dict[Any, float] = defaultdict(float)
    has_tokens = "num_tokens" in trees.column_names
    has_seconds = "seconds" in trees.column_names
    for row_index, row in enumerate(trees):
        nodes = tree_nodes(row, where=f"trees row {row_index}")
        for n in nodes:
            if (n["visit_count"] or 0) > 0:
                q_by_depth[n["depth"]].append(float(n["q_value"]))
            else:
                unvisited += 1
        terminals = [n for n in nodes if n["is_terminal"]]
        correct = sum(1 for n in terminals if n["correct"] is True)
        incorrect = sum(1 for n in terminals if n["correct"] is False)
        terminal_counts.update(
            correct=correct, incorrect=incorrect, other=len(terminals) - correct - incorrect
        )
        per_tree.append(
            {
                "id": row["id"],
                "tree_index": row["tree_index"],
                "nodes": len(nodes),
                "max_depth": max(n["depth"] for n in nodes),
                "correct_terminals": correct,
                "terminals": len(terminals),
            }
        )
        problem = per_problem.setdefault(
            row["id"], {"id": row["id"], "trees": 0, "terminals": 0, "correct_terminals": 0}
        )
        problem["trees"] += 1
        problem["terminals"] += len(terminals)
        problem["correct_terminals"] += correct
        if has_tokens and row["num_tokens"] is not None:
            tokens[row["id"]] += row["num_tokens"]
        if has_seconds and row["seconds"] is not None:
            seconds[row["id"]] += row["seconds"]
    for problem in per_problem.values():
        problem["solve_rate"] = (
            problem["correct_terminals"] / problem["terminals"] if problem["terminals"] else 0.0
        )
        problem["solved"] = problem["correct_terminals"] > 0
    problems = list(per_problem.values())
    sizes = [t["nodes"] for t in per_tree]

    stats: dict[str, Any] = {
        "source": annotation.source,
        "problems": len(problems),
        "trees": len(per_tree),
        "nodes": sum(sizes),
        "tree_size": {**_describe(sizes), "per_tree": per_tree},
        "q_by_depth": {
            str(depth): {**_describe(values), "histogram": _histogram(values)}
            for depth, values in sorted(q_by_depth.items())
        },
        "unvisited_nodes": unvisited,
        "terminals": {**terminal_counts, "total": sum(terminal_counts.values())},
        "solve_rate": {
            "problems_solved": sum(1 for p in problems if p["solved"]),
            "fraction_solved": sum(1 for p in problems if p["solved"]) / len(problems) if problems else 0.0,
            "mean_solve_rate": statistics.fmean(p["solve_rate"] for p in problems) if problems else 0.0,
            "per_problem": problems,
        },
        "pairs": _pair_statistics(annotation.pairs),
        "values": _value_statistics(annotation.values),
        "cost": {
            "tokens": _cost(tokens, annotation.summary.get("tokens"))
            if has_tokens or "tokens" in annotation.summary
            else None,
            "seconds": _cost(seconds, annotation.summary.get("seconds"))
            if has_seconds or "seconds" in annotation.summary
            else None,
        },
        "summary": annotation.summary or None,
        "deepest_node": max((t["max_depth"] for t in per_tree), default=0),
        "label_quality": (annotation.summary or {}).get("label_quality"),
    }
    return stats


def _cost(per_question: dict, summary_total: Any) -> dict:
    values = list(per_question.values())
    total = sum(values) if values else (summary_total if isinstance(summary_total, int | float) else None)
    return {
        "total": total,
        "per_question": {str(k): v for k, v in per_question.items()},
        **{f"per_question_{k}": v for k, v in _describe(values).items() if k != "count"},
    }


def _pair_statistics(pairs: Any) -> dict | None:
    if pairs is None:
        return None
    if "pair_type" not in pairs.column_names:
        raise ValueError(f"pairs: missing column 'pair_type' (columns: {pairs.column_names})")
    types = pairs["pair_type"]
    by_type = Counter(types)
    gaps: dict[str, list[float]] = defaultdict(list)
    if "chosen_value" in pairs.column_names and "rejected_value" in pairs.column_names:
        for t, c, r in zip(types, pairs["chosen_value"], pairs["rejected_value"]):
            if c is not None and r is not None:
                gaps[t].append(c - r)
    per_problem = (
        Counter(pair_question_id(i) for i in pairs["id"]) if "id" in pairs.column_names else Counter()
    )
    return {
        "total": len(types),
        "by_type": {t: by_type.get(t, 0) for t in ("sibling", "cousin", "terminal")}
        | {t: c for t, c in by_type.items() if t not in ("sibling", "cousin", "terminal")},
        "mean_value_gap_by_type": {t: statistics.fmean(v) for t, v in sorted(gaps.items())},
        "problems_with_pairs": len(per_problem),
        "linked_to_nodes": all(c in pairs.column_names for c in PAIR_LINK_COLUMNS),
    }


def _value_statistics(values: Any) -> dict | None:
    if values is None:
        return None
    correct = values["correct"] if "correct" in values.column_names else []
    steps = [len(s) for s in values["steps"]] if "steps" in values.column_names else []
    return {
        "rows": len(values),
        "correct": sum(1 for c in correct if c),
        "steps": sum(steps),
        "mean_steps": statistics.fmean(steps) if steps else None,
    }


# ---------------------------------------------------------------------------------------------- plots
def _q_caption(stats: dict) -> str:
    """What the Q histogram counts: an unvisited child keeps its initial Q and says nothing, so it is left out."""
    return f"Q of visited nodes only (N > 0); {stats['unvisited_nodes']} unvisited nodes left out"


def _plot_q_by_depth(stats: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    depths = list(stats["q_by_depth"])
    cols = min(3, max(1, len(depths)))
    rows = max(1, math.ceil(len(depths) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.4 * rows), squeeze=False, sharex=True)
    for ax in axes.flat[len(depths) :]:
        ax.axis("off")
    for ax, depth in zip(axes.flat, depths):
        h = stats["q_by_depth"][depth]["histogram"]
        edges, counts = h["edges"], h["counts"]
        centers = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
        colors = [plt.cm.RdYlGn((c + 1) / 2) for c in centers]
        ax.bar(centers, counts, width=edges[1] - edges[0], color=colors, edgecolor="#555", linewidth=0.4)
        d = stats["q_by_depth"][depth]
        ax.set_title(f"depth {depth}: {d['count']} visited nodes, mean Q {d['mean']:.2f}", fontsize=9)
        ax.set_xlim(-1.05, 1.05)
    if not depths:
        axes[0, 0].text(0.5, 0.5, "no visited nodes", ha="center", va="center")
    fig.suptitle(_q_caption(stats), fontsize=9)
    fig.supxlabel("Q(s, a) (Eq. 6)", fontsize=9)
    fig.supylabel("visited nodes", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_solve_rate(stats: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    problems = sorted(stats["solve_rate"]["per_problem"], key=lambda p: -p["solve_rate"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    if len(problems) <= 60:
        rates = [p["solve_rate"] for p in problems]
        colors = ["#1a9850" if p["solved"] else "#d73027" for p in problems]
        ax.bar(range(len(problems)), rates, color=colors)
        if len(problems) <= 20:
            ax.set_xticks(
                range(len(problems)), [str(p["id"]) for p in problems], rotation=45, ha="right", fontsize=7
            )
        else:
            ax.set_xticks([])
        ax.set_xlabel("problem (sorted)")
        ax.set_ylabel("correct / all terminals")
    else:
        ax.hist([p["solve_rate"] for p in problems], bins=20, range=(0, 1), color="#4575b4")
        ax.set_xlabel("correct / all terminals")
        ax.set_ylabel("problems")
    s = stats["solve_rate"]
    ax.set_title(f"solve rate by problem: {s['problems_solved']}/{stats['problems']} solved", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_pairs(stats: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    by_type = (stats["pairs"] or {}).get("by_type", {})
    colors = {"sibling": "#1f78b4", "cousin": "#8e44ad", "terminal": "#ff7f00"}
    bars = ax.bar(list(by_type), list(by_type.values()), color=[colors.get(t, "#777") for t in by_type])
    ax.bar_label(bars)
    ax.set_ylabel("pairs")
    total = (stats["pairs"] or {}).get("total", 0)
    ax.set_title(f"pairs per type ({total} in all)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tree_size(stats: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    sizes = [t["nodes"] for t in stats["tree_size"]["per_tree"]]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.hist(sizes, bins=min(20, max(1, len(set(sizes)))), color="#4575b4", edgecolor="white")
    ax.set_xlabel("nodes per tree")
    ax.set_ylabel("trees")
    ax.set_title(f"tree size: {len(sizes)} trees, median {stats['tree_size']['median']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_cost(stats: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, label, total_format in zip(
        axes, ("tokens", "seconds"), ("generated tokens", "seconds"), ("{:,.0f}", "{:,.1f} s")
    ):
        cost = stats["cost"][key]
        values = list(cost["per_question"].values()) if cost else []
        if values:
            ax.hist(values, bins=min(20, max(1, len(values))), color="#66a61e", edgecolor="white")
            ax.set_title(f"{label} per question (total {total_format.format(cost['total'])})", fontsize=10)
        else:
            total = cost["total"] if cost else None
            note = (
                f"not recorded per question\n(total {total_format.format(total)})"
                if total is not None
                else "not recorded"
            )
            ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"{label} per question", fontsize=10)
        ax.set_xlabel(label)
        ax.set_ylabel("questions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {
    "q_by_depth": ("Q-value histogram by depth (visited nodes)", _plot_q_by_depth),
    "solve_rate": ("Solve rate by problem", _plot_solve_rate),
    "pairs_per_type": ("Pairs per type", _plot_pairs),
    "tree_size": ("Tree size distribution", _plot_tree_size),
    "tokens_time": ("Tokens and time per question", _plot_cost),
}


def _markdown(stats: dict) -> str:
    s = stats["solve_rate"]
    lines = [
        "# Annotation report",
        "",
        f"Source: `{stats['source']}`",
        "",
        "| | |",
        "|---|---|",
        f"| problems | {stats['problems']} |",
        f"| solved (≥1 correct terminal) | {s['problems_solved']} ({s['fraction_solved']:.1%}) |",
        f"| trees | {stats['trees']} |",
        f"| nodes | {stats['nodes']} (median {stats['tree_size']['median']} per tree) |",
        f"| terminals ✓ / ✗ / no answer | {stats['terminals'].get('correct', 0)} / "
        f"{stats['terminals'].get('incorrect', 0)} / {stats['terminals'].get('other', 0)} |",
    ]
    if stats["pairs"]:
        by_type = ", ".join(f"{t} {c}" for t, c in stats["pairs"]["by_type"].items())
        lines.append(f"| pairs | {stats['pairs']['total']} ({by_type}) |")
    if stats["values"]:
        lines.append(f"| value rows | {stats['values']['rows']} ({stats['values']['correct']} correct) |")
    for key, unit in (("tokens", "tokens"), ("seconds", "s")):
        cost = stats["cost"][key]
        if cost and cost["total"] is not None:
            lines.append(f"| {key} | {cost['total']:.6g} {unit} |")
    lines.append(f"| deepest node | depth {stats['deepest_node']} |")
    lines.append("")
    if stats.get("label_quality"):
        lines += _label_quality_markdown(stats["label_quality"])
    for name, (title, _) in PLOTS.items():
        lines += [f"## {title}", ""]
        if name == "q_by_depth":
            lines += [_q_caption(stats) + ".", ""]
        lines += [f"![{title}]({stats['plots'][name]})", ""]
    return "\n".join(lines)


def _label_quality_markdown(quality: dict) -> list[str]:
    """The label precision of the pairs against gold step values (toy task) and what the search solved."""
    from ..search.label_quality import format_label_quality

    precision = dict(quality["precision"].get("pairs", {}))
    solution = quality["precision"].get("solution_pairs", {})
    if "all" in solution:
        precision["solution"] = solution["all"]
    return [
        "## Label precision against the gold steps",
        "",
        "Share of chosen partial solutions that are on track and of rejected ones that are off track,",
        "per pair type (`solution`: the DPO baseline's complete-solution pairs).",
        "",
        format_label_quality(precision, quality["reach"]),
        "",
    ]


def _html(markdown_text: str, stats: dict, out_dir: Path) -> str:
    """A standalone HTML version: the same table, plots inlined as base64 PNG."""
    body = []
    table_rows = []
    for line in markdown_text.splitlines():
        if line.startswith("| ") and not line.startswith("| |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            table_rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    body.append("<h1>Annotation report</h1>")
    body.append(f"<p>Source: <code>{html.escape(stats['source'])}</code></p>")
    body.append("<table>" + "".join(table_rows) + "</table>")
    for name, (title, _) in PLOTS.items():
        data = base64.b64encode((out_dir / stats["plots"][name]).read_bytes()).decode()
        caption = f"<p>{html.escape(_q_caption(stats))}.</p>" if name == "q_by_depth" else ""
        body.append(
            f'<h2>{html.escape(title)}</h2>{caption}<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
        )
    style = (
        "body{font:14px/1.4 system-ui,sans-serif;max-width:960px;margin:24px auto;color:#222}"
        "table{border-collapse:collapse}td{border:1px solid #ddd;padding:3px 8px}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Annotation report</title>'
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )


def annotation_report(annotation_dir: str | Path | Annotation, out_dir: str | Path) -> dict:
    """Write ``report.json``, ``report.md``, ``report.html`` and the PNG plots to ``out_dir``; return the numbers.

    ``annotation_dir`` is anything :func:`load_annotation` reads (or an :class:`Annotation`).
    """
    try:
        import matplotlib
    except ImportError as error:
        from ..errors import MissingExtraError

        raise MissingExtraError(
            "the annotation report draws its plots with matplotlib, which is not installed: "
            "pip install 'svpo_trl[viz]' (or pip install matplotlib)"
        ) from error

    matplotlib.use("Agg")
    annotation = annotation_dir if isinstance(annotation_dir, Annotation) else load_annotation(annotation_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = annotation_statistics(annotation)
    stats["plots"] = {name: f"{name}.png" for name in PLOTS}
    for name, (_, plot) in PLOTS.items():
        plot(stats, out_dir / stats["plots"][name])
    markdown_text = _markdown(stats)
    (out_dir / "report.md").write_text(markdown_text, encoding="utf-8")
    (out_dir / "report.html").write_text(_html(markdown_text, stats, out_dir), encoding="utf-8")
    with open(out_dir / "report.json", "w") as f:
        json.dump(stats, f, indent=2, default=str)
    return stats
