"""The package's import graph: no module imports one that imports it back (at module or function level)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "svpo_trl"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """svpo_trl modules that ``path`` imports anywhere in its code (relative or absolute)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            parts = candidate.split(".")
            if parts[0] != "svpo_trl":
                continue
            found.add(candidate)
            # From outside a subpackage, importing svpo_trl.search.mcts runs svpo_trl/search/__init__.py first
            # (the root's __init__ imports lazily; inside a package its __init__ is already running).
            parents = (".".join(parts[:i]) for i in range(2, len(parts)))
            found.update(p for p in parents if not name.startswith(p + ".") and name != p)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in _imports(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    # the cycle this replaced: search.vllm_backend imported load_policy from pipeline, which imports it back
    assert "svpo_trl.pipeline" not in graph["svpo_trl.search.vllm_backend"]
    assert "svpo_trl.models.loading" in graph["svpo_trl.search.vllm_backend"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_load_policy_still_imports_from_the_pipeline():
    from svpo_trl.models.loading import load_policy
    from svpo_trl.pipeline import load_policy as old_name

    assert old_name is load_policy


# Every name code imported from the single-module svpo_trl.pipeline before it became a package.
PIPELINE_NAMES = [
    "STAGE_MARKER",
    "PIPELINE_STAGES",
    "SearchBackendArguments",
    "SFTScriptArguments",
    "AnnotateScriptArguments",
    "TrainScriptArguments",
    "SVPOScriptArguments",
    "EvaluateArguments",
    "stage_done",
    "read_marker",
    "stage_settings",
    "stage_changes",
    "describe_changes",
    "mark_stage_done",
    "move_aside",
    "apply_recipe",
    "run_sft",
    "run_annotate",
    "run_value_sft",
    "run_svpo",
    "run_evaluate",
    "run_pipeline",
    "load_policy",
    "_load_trainable",
]


def test_the_pipeline_package_keeps_every_name_and_small_modules():
    import svpo_trl.pipeline as pipeline

    missing = [name for name in PIPELINE_NAMES if not hasattr(pipeline, name)]
    assert missing == [], f"no longer importable from svpo_trl.pipeline: {missing}"
    from svpo_trl.pipeline.runner import run_pipeline
    from svpo_trl.pipeline.stages import run_sft

    assert pipeline.run_pipeline is run_pipeline and pipeline.run_sft is run_sft
    for path in sorted((PACKAGE / "pipeline").glob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        head = text[:2000]
        assert lines <= 500 or "longer than 500 lines because" in head, (
            f"{path.name} has {lines} lines: split it, or say at its top why it is longer than 500 lines because ..."
        )
