"""Look inside an MCTS annotation: one question's search trees as an HTML page, or a report with plots.

    python recipes/inspect_search.py tree out/annotation --id q3 --out q3.html [--tree_index 0] [--screenshot q3.png]
    python recipes/inspect_search.py report out/annotation --out out/report

``tree`` reads a local annotation directory (a ``DatasetDict`` folder, or ``trees/``, ``pairs/``,
``values/`` folders) or a Hub dataset id; ``report`` writes ``report.{md,html,json}`` and PNG plots (it
needs matplotlib: ``pip install 'svpo_trl[viz]'``). Flags take underscores like every other recipe
(``--tree_index``); the hyphenated forms (``--tree-index``) work too.
"""

import argparse

from svpo_trl.cli import run_recipe


def _given(**values):
    """The keyword arguments that were given on the command line (the rest keep their defaults)."""
    return {key: value for key, value in values.items() if value is not None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    tree = commands.add_parser("tree", help="render one question's trees as a self-contained HTML page")
    tree.add_argument("source", help="annotation directory or Hub dataset id")
    tree.add_argument("--id", required=True, help="question id (the `id` column of `trees`)")
    tree.add_argument(
        "--tree_index",
        "--tree-index",
        type=int,
        default=None,
        help="only this tree (default: all, with a selector)",
    )
    tree.add_argument("--out", required=True, help="HTML file to write")
    tree.add_argument(
        "--max_visible_leaves",
        "--max-visible-leaves",
        type=int,
        default=None,
        help="open large trees partly collapsed beyond this many leaves (default: TreeViewConfig's)",
    )
    tree.add_argument("--screenshot", default=None, help="also save a PNG taken with headless chromium")
    report = commands.add_parser("report", help="write report.md/.html/.json and PNG plots")
    report.add_argument("source", help="annotation directory or Hub dataset id")
    report.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)

    from svpo_trl.viz import TreeViewConfig, annotation_report, load_annotation, render_question_html

    if args.command == "tree":
        annotation = load_annotation(args.source)
        question_id = args.id
        if question_id not in set(annotation.trees["id"]):
            # Hub and JSON ids may be integers; the CLI always gives a string.
            question_id = next((i for i in set(annotation.trees["id"]) if str(i) == args.id), args.id)
        render_question_html(
            annotation.trees,
            question_id,
            annotation.pairs,
            args.out,
            tree_index=args.tree_index,
            config=TreeViewConfig(**_given(max_visible_leaves=args.max_visible_leaves)),
        )
        print(f"wrote {args.out}")
        if args.screenshot:
            from svpo_trl.viz.browser import screenshot

            screenshot(args.out, args.screenshot)
            print(f"wrote {args.screenshot}")
    else:
        stats = annotation_report(args.source, args.out)
        solved = stats["solve_rate"]
        print(
            f"{stats['problems']} problems ({solved['problems_solved']} solved), {stats['trees']} trees, "
            f"{stats['nodes']} nodes, {(stats['pairs'] or {}).get('total', 0)} pairs -> {args.out}/report.md"
        )


if __name__ == "__main__":
    run_recipe(main)
