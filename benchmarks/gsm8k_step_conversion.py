"""How much of GSM8K's training split converts to step-format SFT data, checked in the sandbox.

``svpo_trl.sft_data.gsm8k_to_step_format`` turns a GSM8K answer (rationale with ``<<expr=value>>``
calculator marks, then ``#### gold``) into code steps and an answer step. This script converts every
training problem with ``Dataset.map``, then runs every converted solution in ``PythonSandbox``: each code
step is executed after the earlier ones (as the step sampler does) and its printed output must be exactly
the ``<output>`` the conversion wrote, and the final answer must be equivalent to the gold and printed by
some step. Writes ``benchmarks/results/gsm8k_step_conversion.{json,md}`` and prints the table.

    python benchmarks/gsm8k_step_conversion.py [--dataset ../shared/data/gsm8k] [--split train]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from svpo_trl.grading import is_equiv
from svpo_trl.sandbox import PythonSandbox
from svpo_trl.sft_data import conversion_failure_kind, gsm8k_to_step_format
from svpo_trl.steps import DEFAULT_FORMAT

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def load_rows(dataset: str, split: str):
    """GSM8K rows as a ``datasets.Dataset``: a local folder/file of the Hub layout, or ``gsm8k`` from the Hub."""
    import datasets

    if os.path.isdir(dataset):
        return datasets.load_dataset(
            "json", data_files=os.path.join(dataset, f"{split}.jsonl"), split="train"
        )
    if os.path.isfile(dataset):
        return datasets.load_dataset("json", data_files=dataset, split="train")
    return datasets.load_dataset("openai/gsm8k", "main", split=split)


def verify(solutions: list[str], golds: list[str], workers: int) -> dict:
    """Run every code step of every solution in the sandbox; compare outputs and final answers."""
    paths, owners = [], []
    expected: list[str] = []
    for index, solution in enumerate(solutions):
        steps = [DEFAULT_FORMAT.parse(text) for text in DEFAULT_FORMAT.split_steps(solution)]
        codes = [step.code for step in steps if step.kind == "code"]
        outputs = [step.output for step in steps if step.kind == "code"]
        for k in range(len(codes)):
            paths.append(codes[: k + 1])
            owners.append(index)
            expected.append(outputs[k])
    began = time.perf_counter()
    results = []
    with PythonSandbox(timeout_s=5, max_output_chars=1000) as sandbox:
        for start in tqdm(range(0, len(paths), 2000), desc="sandbox", unit="batch"):
            results += sandbox.run_many(paths[start : start + 2000], max_workers=workers)
    seconds = time.perf_counter() - began
    identical = [not r.error and r.stdout.strip() == e for r, e in zip(results, expected)]
    mismatched = {owner for owner, same in zip(owners, identical) if not same}
    printed: dict[int, list[str]] = {}
    for owner, result in zip(owners, results):
        printed.setdefault(owner, []).append(result.stdout.strip())
    reached, answer_equivalent = 0, 0
    for index, (solution, gold) in enumerate(zip(solutions, golds)):
        final = DEFAULT_FORMAT.parse(DEFAULT_FORMAT.split_steps(solution)[-1]).final_answer
        answer_equivalent += bool(is_equiv(final, gold))
        reached += any(is_equiv(line, gold) for out in printed.get(index, []) for line in out.splitlines())
    return {
        "code_steps_run": len(paths),
        "code_steps_with_identical_output": sum(identical),
        "solutions_with_a_mismatched_step": len(mismatched),
        "solutions_whose_final_answer_is_the_gold": answer_equivalent,
        "solutions_whose_run_prints_the_gold": reached,
        "sandbox_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET), help="GSM8K folder/file, or 'gsm8k' (Hub)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="sandbox workers")
    args = parser.parse_args()

    rows = load_rows(args.dataset, args.split)
    began = time.perf_counter()
    # No cache: a cached map would report what an earlier version of the conversion made.
    converted = rows.map(gsm8k_to_step_format, desc="converting", load_from_cache_file=False)
    convert_seconds = time.perf_counter() - began
    kept = converted.filter(lambda row: row["solution"] != "", load_from_cache_file=False)
    reasons = Counter(conversion_failure_kind(e) for e in converted["conversion_error"] if e)
    checks = verify(kept["solution"], kept["gold"], args.workers)
    total, ok = len(rows), len(kept)
    report = {
        "dataset": args.dataset,
        "split": args.split,
        "problems": total,
        "converted": ok,
        "converted_share": round(ok / total, 4),
        "dropped_by_reason": dict(reasons.most_common()),
        "conversion_seconds": round(convert_seconds, 1),
        **checks,
        "example": kept[0]["solution"] if ok else None,
    }
    lines = [
        f"# GSM8K {args.split} in the step format (`gsm8k_to_step_format`)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| problems | {total:,} |",
        f"| converted | **{ok:,} ({100 * ok / total:.1f}%)** |",
        *[f"| dropped: {reason} | {count:,} |" for reason, count in reasons.most_common()],
        f"| code steps run in the sandbox | {checks['code_steps_run']:,} |",
        f"| ... printing exactly the converted output | {checks['code_steps_with_identical_output']:,} |",
        f"| converted solutions whose final answer is the gold (`is_equiv`) | "
        f"{checks['solutions_whose_final_answer_is_the_gold']:,} of {ok:,} |",
        f"| converted solutions whose sandbox run prints the gold | "
        f"{checks['solutions_whose_run_prints_the_gold']:,} of {ok:,} |",
        f"| time: conversion / sandbox | {convert_seconds:.1f} s / {checks['sandbox_seconds']:.1f} s |",
        "",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gsm8k_step_conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "gsm8k_step_conversion.md").write_text(markdown)


if __name__ == "__main__":
    main()
