"""MCTS step-level preference annotation (§3.1, Eq. 3-6, Appendix A.1) writing the ``trees``,
``pairs`` (Algorithm 1) and ``values`` (Eq. 7) datasets of DESIGN.md.

One simulation of a tree is:

- **selection**: PUCT (Eq. 4) from the root to an unexpanded non-terminal node; terminal children
  are never selected, ties go to the child created first (see :meth:`Tree.select_child`);
- **expansion**: ``num_children`` next steps sampled by the `StepSampler` (code executed);
  identical step texts become one child (AlphaMath keeps one child per distinct step), which
  records how many samples it stands for in ``num_samples``; a step at depth ``max_depth`` is
  terminal;
- **evaluation** (Eq. 5, a one-step rollout reusing the children): a terminal child gets R = +1
  when its final answer is equivalent to the gold answer, else -1 (unanswered, malformed and
  depth-cut steps are wrong); the expanded leaf gets V = 0, or the value head's estimate when
  ``value_leaf_evaluation`` is on (AlphaMath rounds);
- **backup** (Eq. 6): for every terminal child and for the leaf, N += 1, Q += (V - Q) / N on
  every node from there up to the root.

Many trees advance in lock-step: each round selects one leaf in every live tree (across up to
``num_parallel_questions`` questions) and expands all of them with one sampler call per
temperature level. A question's trees are built one after the other, because the stop rule
(``target_correct`` correct solutions or ``max_trees`` trees) depends on the earlier ones.

Every finished tree is written at once to ``<output_dir>/shards/<question>/tree_<k>.json``
(temporary file, fsync, atomic rename). A run started again with the same arguments loads the
shards, continues each question at its next tree, and builds the datasets from the shard files in
problem order, so nothing is lost or duplicated. All randomness of a tree (its temperature) and
of pair extraction is seeded from ``(seed, question id, tree index)``, independent of batching.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..distributed import ProcessShard
from ..steps import DEFAULT_FORMAT, StepFormat
from .pairs import NEGATIVE_RULES, PAIR_TYPES, question_preference_pairs, value_rows
from .sampler import StepSampler
from .tree import Node, Tree

Grader = Callable[[str, Any], bool]

# Fields that change what a run produces: a resumed run must use the same values.
_RESULT_FIELDS = (
    "c_puct",
    "max_depth",
    "num_children",
    "max_simulations",
    "temperature_range",
    "temperature_levels",
    "max_trees",
    "target_correct",
    "max_new_tokens",
    "value_leaf_evaluation",
    "num_sibling_pairs",
    "num_cousin_pairs",
    "num_terminal_pairs",
    "borrow_negatives",
    "negatives",
    "seed",
)


@dataclass
class MCTSConfig:
    """Configuration of :class:`MCTSAnnotator`. Defaults follow Appendix A.1 / A.2 of the paper."""

    c_puct: float = field(
        default=1.25, metadata={"help": "Exploration constant of PUCT, Eq. 4 (paper: 1.25)."}
    )
    max_depth: int = field(
        default=8, metadata={"help": "Maximum tree depth; a step at this depth is terminal (paper: 8)."}
    )
    num_children: int = field(default=5, metadata={"help": "Children sampled per expansion (paper: 5)."})
    max_simulations: int = field(default=60, metadata={"help": "Simulations per tree, at most (paper: 60)."})
    temperature_range: list[float] = field(
        default_factory=lambda: [0.6, 1.0],
        metadata={"help": "Sampling temperatures for expansion (paper: 0.6 to 1)."},
    )
    temperature_levels: int = field(
        default=3,
        metadata={
            "help": "Each tree samples at one temperature drawn (seeded by question id and tree index) "
            "from this many evenly spaced levels of temperature_range (3: 0.6, 0.8, 1.0). One level uses "
            "the middle of the range. Each round makes one sampler call per level in use."
        },
    )
    max_trees: int = field(default=10, metadata={"help": "Trees per question, at most (paper: 10)."})
    target_correct: int = field(
        default=4,
        metadata={
            "help": "Stop building trees for a question once this many correct terminals exist (paper: 4)."
        },
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "Token budget of one step (not in the paper)."}
    )
    num_parallel_questions: int = field(
        default=32,
        metadata={
            "help": "Questions searched in lock-step; each round's batch holds one leaf per live tree."
        },
    )
    value_leaf_evaluation: bool = field(
        default=False,
        metadata={
            "help": "Evaluate a non-terminal expanded leaf with the backend's value head instead of 0 "
            "(AlphaMath rounds; off in the paper's SVPO annotation)."
        },
    )
    num_sibling_pairs: int = field(
        default=2, metadata={"help": "Sibling negatives per layer, Algorithm 1 (A.2: 2)."}
    )
    num_cousin_pairs: int = field(
        default=1, metadata={"help": "Cousin negatives per layer, Algorithm 1 (A.2: 1)."}
    )
    num_terminal_pairs: int = field(
        default=1, metadata={"help": "Non-same-level terminal negatives per layer, Algorithm 1 (A.2: 1)."}
    )
    borrow_negatives: bool = field(
        default=False,
        metadata={
            "help": "Algorithm 1 line 22: borrow an incorrect terminal from another tree of the question."
        },
    )
    negatives: str = field(
        default="all",
        metadata={
            "help": "Which non-correct nodes Algorithm 1 may reject: all (the paper as written, unvisited "
            "nodes included), explored (visited: N >= 1), refuted (Q < 0: a wrong answer below and no right "
            "one). Default all: once identical samples are one child, the three rules gave 643/640/638 "
            "sibling pairs of the same label precision on the toy task (docs/annotation.md)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seeds every random choice of the annotation."})
    output_dir: str | None = field(default=None, metadata={"help": "Where shards, datasets and summary go."})
    push_to_hub: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset repo to push the datasets to, one config each, with a card "
            "(svpo_trl.hub.push_annotation); a failed push leaves the local annotation and is retried by a rerun."
        },
    )
    report_to: list[str] = field(
        default_factory=list, metadata={"help": 'Loggers for the running summary: "tensorboard" or none.'}
    )
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar over questions."})

    def __post_init__(self):
        if len(self.temperature_range) != 2:
            raise ValueError(f"temperature_range must be [low, high], got {self.temperature_range}")
        low, high = self.temperature_range
        if not 0 <= low <= high:
            raise ValueError(
                f"temperature_range must be (low, high) with 0 <= low <= high, got {self.temperature_range}"
            )
        for name in (
            "max_depth",
            "num_children",
            "max_trees",
            "temperature_levels",
            "num_parallel_questions",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"MCTSConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_simulations < 1:
            raise ValueError(f"MCTSConfig.max_simulations must be >= 1, got {self.max_simulations}")
        if self.negatives not in NEGATIVE_RULES:
            raise ValueError(f"MCTSConfig.negatives must be one of {NEGATIVE_RULES}, got {self.negatives!r}")
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to in ("none", "") else [self.report_to]

    @property
    def temperatures(self) -> list[float]:
        """The temperature levels a tree draws from."""
        low, high = self.temperature_range
        if self.temperature_levels == 1:
            return [round((low + high) / 2, 6)]
        step = (high - low) / (self.temperature_levels - 1)
        return [round(low + i * step, 6) for i in range(self.temperature_levels)]


def seeded_rng(seed: int, *keys: Any) -> random.Random:
    """A `random.Random` seeded from ``seed`` and ``keys`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(k) for k in (seed, *keys)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _default_grader() -> Grader:
    try:
        from ..grading import is_equiv
    except ImportError as error:  # pragma: no cover - grading.py ships with the package
        raise ImportError("MCTSAnnotator needs svpo_trl.grading.is_equiv or an explicit grader=") from error
    return is_equiv


@dataclass
class _Problem:
    position: int
    id: str
    question: str
    answer: Any  # str or list of acceptable strings


@dataclass
class _QuestionRun:
    """Search progress of one question: its finished trees and the tree being built."""

    problem: _Problem
    prompt: str
    trees: list[dict[str, Any]]
    tree: Tree | None = None
    temperature: float = 1.0
    simulations: int = 0

    def num_correct(self) -> int:
        return sum(
            1 for row in self.trees for n in row["nodes"] if n["is_terminal"] and (n["reward"] or 0) > 0
        )

    def done(self, config: MCTSConfig) -> bool:
        return len(self.trees) >= config.max_trees or self.num_correct() >= config.target_correct


def _node_features():
    from datasets import Value

    return {
        "node_id": Value("int64"),
        "parent_id": Value("int64"),
        "depth": Value("int64"),
        "text": Value("string"),
        "q_value": Value("float64"),
        "visit_count": Value("int64"),
        "prior": Value("float64"),
        "is_terminal": Value("bool"),
        "final_answer": Value("string"),
        "reward": Value("float64"),
        "correct": Value("bool"),
        "num_samples": Value("int64"),
    }


def dataset_features() -> dict[str, Any]:
    """The `datasets.Features` of ``trees``, ``pairs`` and ``values``."""
    from datasets import Features, List, Value

    return {
        "trees": Features(
            {
                "id": Value("string"),
                "question": Value("string"),
                "answer": Value("string"),
                "tree_index": Value("int64"),
                "nodes": List(_node_features()),
                "num_tokens": Value("int64"),
            }
        ),
        "pairs": Features(
            {
                "id": Value("string"),
                "prompt": Value("string"),
                "chosen": Value("string"),
                "rejected": Value("string"),
                "chosen_value": Value("float64"),
                "rejected_value": Value("float64"),
                "pair_type": Value("string"),
                "tree_index": Value("int64"),
                "chosen_node_id": Value("int64"),
                "rejected_node_id": Value("int64"),
                "rejected_tree_index": Value("int64"),
            }
        ),
        "values": Features(
            {
                "id": Value("string"),
                "prompt": Value("string"),
                "steps": List(Value("string")),
                "step_values": List(Value("float64")),
                "correct": Value("bool"),
            }
        ),
    }


def _to_dataset(rows: list[dict[str, Any]], features):
    """A `Dataset` with exactly ``features`` (columns kept even when there are no rows)."""
    from datasets import Dataset

    return Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)


def _distinct_steps(steps: list) -> list[list]:
    """The expansion's samples grouped by step text, in order of first appearance.

    One child per distinct step: duplicates as separate children made 46% of all children on the toy
    task, let a pair prefer a step to itself, and spread PUCT's visits over copies (a breadth-first
    search that never got deeper than depth 3). The child keeps the first sample's prior: the prior
    (Eq. 4, mean token probability under the raw policy) is a function of the text, so every copy
    has the same one (up to a rare other tokenization of the same text); how many samples agreed is kept in ``num_samples`` and is not added to it,
    so PUCT stays Eq. 4 exactly.
    """
    groups: dict[str, list] = {}
    for step in steps:
        groups.setdefault(step.text, []).append(step)
    return list(groups.values())


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` holds either nothing or all of it, whenever the process dies."""
    # One temporary name per process: several ranks may write the same file (annotation_config.json).
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class MCTSAnnotator:
    """Builds MCTS trees for math problems and turns them into step-level training data.

    Args:
        sampler: a `StepSampler`, or a `GenerationBackend` that is wrapped into one (with
            ``sandbox``, ``step_format`` and ``config.max_new_tokens``).
        config: an `MCTSConfig` (paper defaults when None).
        grader: ``grader(prediction, gold) -> bool``, answer equivalence; default
            ``svpo_trl.grading.is_equiv``.
        sandbox, step_format: passed to the `StepSampler` built from a backend.

    Example::

        annotator = MCTSAnnotator(HFBackend(model, tokenizer), MCTSConfig(output_dir="annotation"))
        data = annotator.annotate([{"id": "0", "question": "What is 3 + 4?", "answer": "7"}])
        data["pairs"][0]  # {"prompt": ..., "chosen": ..., "rejected": ..., "pair_type": ...}
    """

    def __init__(
        self,
        sampler: StepSampler | Any,
        config: MCTSConfig | None = None,
        *,
        grader: Grader | None = None,
        sandbox: Any = None,
        step_format: StepFormat = DEFAULT_FORMAT,
    ):
        self.config = config if config is not None else MCTSConfig()
        if not hasattr(sampler, "next_steps"):
            sampler = StepSampler(
                sampler, sandbox=sandbox, step_format=step_format, max_new_tokens=self.config.max_new_tokens
            )
        self.sampler = sampler
        self.step_format = getattr(sampler, "step_format", step_format)
        self.grader = grader if grader is not None else _default_grader()
        self.timings: dict[str, float] = {}
        self.summary: dict[str, Any] = {}

    # ------------------------------------------------------------------ public API
    def annotate(
        self,
        problems: Iterable[dict[str, Any]],
        output_dir: str | os.PathLike | None = None,
        *,
        shard: ProcessShard | None = None,
    ):
        """Search every problem, write the shards, and build ``DatasetDict(trees, pairs, values)``.

        ``problems`` rows need ``question`` and ``answer`` (a string or a list of acceptable
        strings) and may carry ``id`` (default: the row's position). The datasets are saved under
        ``output_dir`` (or ``config.output_dir``) as ``trees/``, ``pairs/``, ``values/`` plus
        ``summary.json``. Run it again with the same arguments after a crash to resume.

        With ``shard`` (:meth:`svpo_trl.distributed.ProcessShard.from_environment` under
        ``accelerate launch``), every process searches its share of the problems (by id) into the
        same ``output_dir``; rank 0 then merges all trees into the datasets, which every process
        returns. Resume works per problem, so per shard, whatever the number of processes.
        """
        config = self.config
        shard = shard if shard is not None else ProcessShard()
        output = Path(output_dir if output_dir is not None else (config.output_dir or ""))
        if not str(output):
            raise ValueError("MCTSAnnotator.annotate needs an output_dir (argument or MCTSConfig.output_dir)")
        problem_list = self._problems(problems)
        output.mkdir(parents=True, exist_ok=True)
        self._check_run_config(output)
        mine = [problem_list[i] for i in shard.positions([p.id for p in problem_list])]
        self._run_search(mine, output, shard=shard)
        if not shard.is_distributed:
            return self._build_datasets(problem_list, output)
        self._session = _merge_sessions(shard.gather(self._session))
        error = None
        if shard.is_main:
            try:
                data = self._build_datasets(problem_list, output)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                shard.broadcast(error)
                raise
        if shard.broadcast(error) is not None:
            raise RuntimeError(f"{shard.label}: rank 0 could not merge the shards: {error}")
        if not shard.is_main:
            data = self._load_datasets(output)
            with open(output / "summary.json") as f:
                self.summary = json.load(f)
        return data

    # ------------------------------------------------------------------ inputs and resume
    @staticmethod
    def _problems(problems: Iterable[dict[str, Any]]) -> list[_Problem]:
        result: list[_Problem] = []
        seen: dict[str, int] = {}
        for position, row in enumerate(problems):
            for key in ("question", "answer"):
                if key not in row or row[key] is None:
                    raise ValueError(
                        f"problem {position} has no {key!r} field (expected columns id, question, answer)"
                    )
            if not isinstance(row["question"], str) or not row["question"].strip():
                raise ValueError(
                    f"problem {position}: 'question' must be a non-empty string, got {row['question']!r}"
                )
            # Every acceptable gold counts (MATH rows list several in `answers`, see svpo_trl.data)
            answer = row.get("answers") or row["answer"]
            if not (
                isinstance(answer, str)
                or (isinstance(answer, list) and all(isinstance(a, str) for a in answer))
            ):
                raise ValueError(
                    f"problem {position}: 'answer' must be a string or a list of strings, got {answer!r}"
                )
            problem_id = str(row["id"]) if row.get("id") is not None else str(position)
            if problem_id in seen:
                raise ValueError(
                    f"problem {position} repeats id {problem_id!r} of problem {seen[problem_id]}"
                )
            seen[problem_id] = position
            result.append(_Problem(position, problem_id, row["question"], answer))
        return result

    def _check_run_config(self, output: Path) -> None:
        settings = {name: getattr(self.config, name) for name in _RESULT_FIELDS}
        settings["temperature_range"] = list(settings["temperature_range"])
        path = output / "annotation_config.json"
        if path.exists():
            with open(path) as f:
                saved = json.load(f)
            changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
            if changed:
                details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
                raise ValueError(
                    f"{output} holds an annotation made with other settings ({details}); "
                    "resume with the same MCTSConfig or use a new output_dir"
                )
        else:
            _write_atomic(path, json.dumps(settings, indent=2))

    @staticmethod
    def _shard_dir(output: Path, problem: _Problem) -> Path:
        return output / "shards" / f"{problem.position:07d}"

    def _load_trees(self, output: Path, problem: _Problem) -> list[dict[str, Any]]:
        directory = self._shard_dir(output, problem)
        rows: list[dict[str, Any]] = []
        if not directory.is_dir():
            return rows
        while (path := directory / f"tree_{len(rows):03d}.json").exists():
            with open(path) as f:
                row = json.load(f)
            if row["id"] != problem.id:
                raise ValueError(
                    f"{path} belongs to problem id {row['id']!r}, but problem {problem.position} now has id "
                    f"{problem.id!r}: resume with the same problems in the same order or use a new output_dir"
                )
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ search
    def _start_tree(self, run: _QuestionRun) -> None:
        tree_index = len(run.trees)
        rng = seeded_rng(self.config.seed, run.problem.id, tree_index, "temperature")
        run.temperature = rng.choice(self.config.temperatures)
        run.tree = Tree(run.prompt)
        run.simulations = 0

    def _finish_tree(self, run: _QuestionRun, output: Path) -> None:
        tree = run.tree
        assert tree is not None
        tree.label_correct()
        problem = run.problem
        row = {
            "id": problem.id,
            "question": problem.question,
            "answer": problem.answer if isinstance(problem.answer, str) else json.dumps(problem.answer),
            "tree_index": len(run.trees),
            "nodes": tree.to_nodes(),
            "num_tokens": sum(n.num_tokens for n in tree),
        }
        directory = self._shard_dir(output, problem)
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / f"tree_{row['tree_index']:03d}.json", json.dumps(row))
        run.trees.append(row)
        run.tree = None
        self._running["trees"] += 1
        self._running["nodes"] += len(tree)

    def _select(self, run: _QuestionRun, output: Path) -> Node | None:
        """The next leaf to expand for this question, finishing and starting trees as needed."""
        while True:
            if run.tree is None:
                if run.done(self.config):
                    return None
                self._start_tree(run)
            assert run.tree is not None
            if run.simulations < self.config.max_simulations:
                leaf = run.tree.select_leaf(self.config.c_puct)
                if leaf is not None:
                    return leaf
            self._finish_tree(run, output)

    def _reward(self, node: Node, gold: Any) -> float:
        """R of Eq. 5: +1 if the terminal's final answer is equivalent to the gold answer, else -1."""
        if node.final_answer is None or (node.step is not None and node.step.is_malformed):
            return -1.0
        try:
            return 1.0 if self.grader(node.final_answer, gold) else -1.0
        except Exception:
            # A grader crash on odd model output must not stop a long search: count it as wrong.
            self._running["grading_errors"] += 1
            return -1.0

    def _expand_evaluate_backup(self, run: _QuestionRun, leaf: Node, steps: list, leaf_value: float) -> None:
        tree = run.tree
        assert tree is not None
        terminals = []
        for same in _distinct_steps(steps):
            child = tree.add_child(
                leaf, same[0], num_tokens=sum(s.num_tokens for s in same), num_samples=len(same)
            )
            if child.depth >= self.config.max_depth:
                child.is_terminal = True
            if child.is_terminal:
                child.reward = self._reward(child, run.problem.answer)
                terminals.append(child)
        if not steps:
            leaf.expanded = True  # nothing came back: never select it again
        for child in terminals:  # Eq. 6 for each terminal child reached (V = R, Eq. 5)
            tree.backup(child, child.reward)
        tree.backup(leaf, leaf_value)  # ... and for the expanded leaf (V = 0 or the value head)
        run.simulations += 1

    def _run_search(self, problems: list[_Problem], output: Path, shard: ProcessShard) -> None:
        config = self.config
        self._running: Counter = Counter()
        self.timings = {"generation": 0.0, "value": 0.0, "total": 0.0}
        tokens_before = getattr(self.sampler, "tokens_generated", 0)
        executions_before = getattr(self.sampler, "executions", 0)
        calls_before = getattr(self.sampler, "backend_calls", 0)
        start = time.perf_counter()
        # One progress bar and one TensorBoard writer (rank 0's share stands for the whole run).
        writer = self._tensorboard(output) if shard.is_main else None
        bar = None
        if config.progress and shard.is_main:
            from tqdm.auto import tqdm

            desc = "MCTS annotation" + (f" ({shard.label})" if shard.is_distributed else "")
            bar = tqdm(total=len(problems), desc=desc, unit="question")
        pending = deque(problems)
        active: list[_QuestionRun] = []
        finished = 0

        def close(run: _QuestionRun) -> None:
            nonlocal finished
            finished += 1
            self._running["solved"] += int(run.num_correct() > 0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(solved=self._running["solved"], trees=self._running["trees"])
            if writer is not None:
                elapsed = time.perf_counter() - start
                tokens = getattr(self.sampler, "tokens_generated", 0) - tokens_before
                for key, value in (
                    ("questions", finished),
                    ("solved", self._running["solved"]),
                    ("trees", self._running["trees"]),
                    ("nodes", self._running["nodes"]),
                    ("tokens", tokens),
                    ("tokens_per_second", tokens / max(elapsed, 1e-9)),
                ):
                    writer.add_scalar(f"annotation/{key}", value, finished)

        while pending or active:
            while pending and len(active) < config.num_parallel_questions:
                problem = pending.popleft()
                run = _QuestionRun(
                    problem, self.step_format.prompt(problem.question), self._load_trees(output, problem)
                )
                self._running["trees_resumed"] += len(run.trees)
                if run.done(config):
                    close(run)
                else:
                    active.append(run)
            requests: list[tuple[_QuestionRun, Node]] = []
            for run in list(active):
                leaf = self._select(run, output)
                if leaf is None:
                    active.remove(run)
                    close(run)
                else:
                    requests.append((run, leaf))
            if not requests:
                continue
            by_temperature: dict[float, list[int]] = defaultdict(list)
            for i, (run, _) in enumerate(requests):
                by_temperature[run.temperature].append(i)
            states = [run.tree.state(leaf) for run, leaf in requests]
            steps: list[list] = [[] for _ in requests]
            tick = time.perf_counter()
            for temperature in sorted(by_temperature):
                indices = by_temperature[temperature]
                sampled = self.sampler.next_steps(
                    [states[i] for i in indices], n=config.num_children, temperature=temperature
                )
                for i, group in zip(indices, sampled):
                    steps[i] = group
            self.timings["generation"] += time.perf_counter() - tick
            leaf_values = [0.0] * len(requests)
            if config.value_leaf_evaluation:
                tick = time.perf_counter()
                leaf_values = [float(v) for v in self.sampler.backend.values([s.text for s in states])]
                self.timings["value"] += time.perf_counter() - tick
            for (run, leaf), group, value in zip(requests, steps, leaf_values):
                self._expand_evaluate_backup(run, leaf, group, value)
        if bar is not None:
            bar.close()
        self.timings["total"] = time.perf_counter() - start
        self._session = {
            "seconds": self.timings["total"],
            "generation_seconds": self.timings["generation"],
            "tokens_this_run": getattr(self.sampler, "tokens_generated", 0) - tokens_before,
            "sandbox_executions": getattr(self.sampler, "executions", 0) - executions_before,
            "backend_calls": getattr(self.sampler, "backend_calls", 0) - calls_before,
            "trees_resumed": self._running["trees_resumed"],
            "grading_errors": self._running["grading_errors"],
            "processes": shard.world_size,
        }
        if writer is not None:
            writer.close()

    def _tensorboard(self, output: Path):
        if "tensorboard" not in self.config.report_to:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(log_dir=str(output / "runs"))

    # ------------------------------------------------------------------ datasets
    def _build_datasets(self, problems: list[_Problem], output: Path):
        from datasets import DatasetDict

        config = self.config
        tree_rows: list[dict[str, Any]] = []
        pair_rows: list[dict[str, Any]] = []
        value_rows_: list[dict[str, Any]] = []
        solved = 0
        positives: set[tuple] = set()
        negatives: set[tuple] = set()
        missing = []
        for problem in problems:
            rows = self._load_trees(output, problem)
            if not _QuestionRun(problem, "", rows).done(config):
                missing.append(problem.id)
                continue
            trees = [Tree.from_nodes(self.step_format.prompt(problem.question), row["nodes"]) for row in rows]
            tree_rows.extend(rows)
            solved += int(any(t.num_correct_terminals() > 0 for t in trees))
            question_pairs = question_preference_pairs(
                trees,
                question_id=problem.id,
                rng=seeded_rng(config.seed, problem.id, "pairs"),
                num_sibling=config.num_sibling_pairs,
                num_cousin=config.num_cousin_pairs,
                num_terminal=config.num_terminal_pairs,
                borrow_negatives=config.borrow_negatives,
                negatives=config.negatives,
            )
            pair_rows.extend(question_pairs)
            positives.update((problem.position, p["tree_index"], p["chosen_node_id"]) for p in question_pairs)
            negatives.update(
                (problem.position, p["rejected_tree_index"], p["rejected_node_id"]) for p in question_pairs
            )
            value_rows_.extend(value_rows(trees, question_id=problem.id))
        if missing:
            shown = ", ".join(repr(m) for m in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise RuntimeError(
                f"{len(missing)} of {len(problems)} problems have unfinished trees under {output / 'shards'} "
                f"({shown}): every process must write to the same output_dir (multi-node annotation needs "
                "a filesystem shared by the nodes); run the annotation again to finish them"
            )
        features = dataset_features()
        data = DatasetDict(
            {
                "trees": _to_dataset(tree_rows, features["trees"]),
                "pairs": _to_dataset(pair_rows, features["pairs"]),
                "values": _to_dataset(value_rows_, features["values"]),
            }
        )
        for name, dataset in data.items():
            dataset.save_to_disk(str(output / name))
        self.summary = self._summary(problems, tree_rows, pair_rows, solved, len(positives), len(negatives))
        _write_atomic(output / "summary.json", json.dumps(self.summary, indent=2))
        if config.progress:
            print(format_summary(self.summary))
        if config.push_to_hub:
            from ..hub import push_annotation

            # One config per dataset (their schemas differ); a failed push is reported, never raised.
            push_annotation(output, config.push_to_hub, datasets=list(data), settings={"mcts": config})
        return data

    @staticmethod
    def _load_datasets(output: Path):
        """The datasets another process built in ``output`` (see :meth:`_build_datasets`)."""
        from datasets import DatasetDict

        from ..data import load_saved_dataset

        return DatasetDict({name: load_saved_dataset(output / name) for name in ("trees", "pairs", "values")})

    def _summary(self, problems, tree_rows, pair_rows, solved, positives, negatives) -> dict[str, Any]:
        """Totals of the run; positives/negatives count distinct chosen/rejected nodes."""
        session = getattr(self, "_session", {})
        pairs_by_type = Counter(p["pair_type"] for p in pair_rows)
        seconds = session.get("seconds", 0.0)
        tokens_run = session.get("tokens_this_run", 0)
        return {
            "problems": len(problems),
            "solved": solved,
            "trees": len(tree_rows),
            "nodes": sum(len(r["nodes"]) for r in tree_rows),
            "correct_terminals": sum(
                1 for r in tree_rows for n in r["nodes"] if n["is_terminal"] and (n["reward"] or 0) > 0
            ),
            "pairs": len(pair_rows),
            "pairs_by_type": {t: pairs_by_type.get(t, 0) for t in PAIR_TYPES},
            "positives": positives,
            "negatives": negatives,
            "positive_negative_ratio": f"1:{negatives / positives:.2f}" if positives else "n/a",
            "tokens": sum(r["num_tokens"] for r in tree_rows),
            "tokens_this_run": tokens_run,
            "tokens_per_second": tokens_run / seconds if seconds > 0 else 0.0,
            "sandbox_executions": session.get("sandbox_executions", 0),
            "backend_calls": session.get("backend_calls", 0),
            "seconds": seconds,
            "generation_seconds": session.get("generation_seconds", 0.0),
            "trees_resumed": session.get("trees_resumed", 0),
            "grading_errors": session.get("grading_errors", 0),
            "processes": session.get("processes", 1),
            "config": {k: v for k, v in dataclasses.asdict(self.config).items() if k in _RESULT_FIELDS},
        }


def _merge_sessions(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """One session from every process's: wall time is the slowest process's, counts add up."""
    merged = {key: sum(s[key] for s in sessions) for key in sessions[0]}
    merged["seconds"] = max(s["seconds"] for s in sessions)
    merged["processes"] = len(sessions)
    return merged


def format_summary(summary: dict[str, Any]) -> str:
    """The run summary as a few readable lines."""
    by_type = ", ".join(f"{k} {v}" for k, v in summary["pairs_by_type"].items())
    return (
        f"MCTS annotation: {summary['solved']}/{summary['problems']} problems solved, {summary['trees']} trees, "
        f"{summary['nodes']} nodes, {summary['correct_terminals']} correct terminals\n"
        f"pairs: {summary['pairs']} ({by_type}); positive:negative {summary['positive_negative_ratio']}\n"
        f"tokens: {summary['tokens']} ({summary['tokens_this_run']} this run, "
        f"{summary['tokens_per_second']:.0f} tok/s); sandbox executions: {summary['sandbox_executions']}; "
        f"{summary['seconds']:.1f} s"
    )


def annotate(
    problems: Sequence[dict[str, Any]],
    backend: Any,
    output_dir: str | os.PathLike,
    config: MCTSConfig | None = None,
    **kwargs: Any,
):
    """Shortcut: ``MCTSAnnotator(backend, config, **kwargs).annotate(problems, output_dir)``."""
    return MCTSAnnotator(backend, config, **kwargs).annotate(problems, output_dir)
