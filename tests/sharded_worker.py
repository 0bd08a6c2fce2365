"""One process of a sharded annotation or evaluation, for tests/test_distributed.py.

    accelerate launch --config_file accelerate_configs/multi_process_cpu.yaml tests/sharded_worker.py \
        annotate OUTPUT_DIR [--crash-rank R --crash-after K]

The "policy" is a scripted backend whose completions depend only on the state text, so a sharded run
must give exactly the datasets of a single-process run. ``--crash-rank R --crash-after K`` makes rank
R die after finishing K trees (annotate) or K batches (evaluate), as a killed worker would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from svpo_trl.distributed import ProcessShard
from svpo_trl.evaluation import evaluate
from svpo_trl.search.mcts import MCTSAnnotator, MCTSConfig
from svpo_trl.search.sampler import StepSampler
from svpo_trl.search.testing import ScriptedBackend

from conftest import ConstantSandbox

PROBLEMS = [
    {"id": f"q{i}", "question": f"What is {i} + {2 * i + 1}?", "answer": str(3 * i + 1)} for i in range(9)
]


def code(label: str) -> str:
    return f"<step>\n<p>\n{label}\n</p>\n<code>\n```python\nprint(1)\n```\n</code>"


def answer(label: str, value: int) -> str:
    return f"<step>\n<p>\n{label}\n</p>\n<p>\nFinal Answer: ${value}$\n</p>\n</step>"


def script(prompt: str):
    """Children of a state, from its question and its depth alone: deterministic in any batch."""
    a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups())
    depth = len(re.findall(r"<step>\n<p>\n(\w+)\n</p>", prompt))
    gold = a + b
    if depth >= 2:
        return [(answer(f"T{depth}{k}", gold + (k + a) % 2), 0.3 + 0.2 * k) for k in range(3)]
    return [
        (code(f"C{depth}0"), 0.5),
        (answer(f"A{depth}", gold + (a % 3 == 0)), 0.4),
        (code(f"C{depth}2"), 0.2 + 0.1 * (a % 4)),
    ]


def backend() -> ScriptedBackend:
    return ScriptedBackend(script, value_fn=lambda text: ((len(text) * 7) % 11) / 11 - 0.5)


def exact_match(prediction, gold) -> bool:
    golds = gold if isinstance(gold, list) else [gold]
    return prediction is not None and prediction.strip() in [str(g).strip() for g in golds]


def annotator() -> MCTSAnnotator:
    config = MCTSConfig(
        num_children=3,
        max_depth=3,
        temperature_levels=2,
        max_simulations=6,
        max_trees=2,
        target_correct=50,
        progress=False,
    )
    return MCTSAnnotator(StepSampler(backend(), sandbox=ConstantSandbox()), config, grader=exact_match)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["annotate", "evaluate"])
    parser.add_argument("output_dir")
    parser.add_argument("--strategy", default="greedy")
    parser.add_argument("--crash-rank", type=int, default=-1)
    parser.add_argument("--crash-after", type=int, default=0)
    args = parser.parse_args()
    shard = ProcessShard.from_environment()
    crash = shard.rank == args.crash_rank
    if args.mode == "annotate":
        worker = annotator()
        if crash:
            finish = worker._finish_tree
            done = []

            def finish_then_die(run, output):
                finish(run, output)
                done.append(run.problem.id)
                if len(done) >= args.crash_after:
                    os._exit(3)

            worker._finish_tree = finish_then_die
        data = worker.annotate(PROBLEMS, args.output_dir, shard=shard)
        report = {"summary": worker.summary, "rows": {k: len(v) for k, v in data.items()}}
    else:
        scripted = backend()
        if crash:
            generate = scripted.generate
            batches = []

            def generate_then_die(prompts, **kwargs):
                # Let about K batches through (a batch takes at most 4 backend rounds at max_depth 3).
                batches.append(1)
                if len(batches) > 4 * args.crash_after:
                    os._exit(3)
                return generate(prompts, **kwargs)

            scripted.generate = generate_then_die
        result = evaluate(
            scripted,
            PROBLEMS,
            args.strategy,
            sandbox=ConstantSandbox(),
            max_depth=3,
            batch_size=2,
            grader=exact_match,
            output_jsonl=os.path.join(args.output_dir, "eval.jsonl"),
            progress=False,
            shard=shard,
        )
        asked = sorted({re.search(r"What is (\d+) \+", p).group(1) for call in scripted.calls for p in call})
        report = {"metrics": result.metrics, "ids": [r["id"] for r in result.records], "asked": asked}
    with open(os.path.join(args.output_dir, f"report-{shard.rank}.json"), "w") as handle:
        json.dump(report, handle)
    sys.exit(0)


if __name__ == "__main__":
    main()
