"""Looking inside the search: interactive HTML tree pages and an annotation report with plots."""

from .data import Annotation, correct_path_nodes, load_annotation, pairs_for_tree, tree_nodes
from .tree_html import TreeViewConfig, render_question_html, render_tree_html, tree_payload

__all__ = [
    "Annotation",
    "TreeViewConfig",
    "annotation_report",
    "correct_path_nodes",
    "load_annotation",
    "pairs_for_tree",
    "render_question_html",
    "render_tree_html",
    "tree_nodes",
    "tree_payload",
]


def __getattr__(name: str):
    # The report imports matplotlib; keep `import svpo_trl.viz` light for the HTML viewer.
    if name == "annotation_report":
        from .report import annotation_report

        return annotation_report
    raise AttributeError(name)
