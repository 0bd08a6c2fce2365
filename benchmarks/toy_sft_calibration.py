"""Calibrate the embedded default's stage 0: is the toy SFT policy mid-range (greedy 20–70%)?

For each seed: bootstrap the tiny SFT policy (``svpo_trl.toy.bootstrap_sft_policy``), reload it
with ``from_pretrained``, and measure on the toy ``test`` split, really executing the code steps:

- greedy accuracy: greedy-generate one step at a time (stop at ``</code>`` / ``</step>``), run the
  step's code after the earlier steps' code in ``svpo_trl.sandbox.PythonSandbox``, append the
  output (``DEFAULT_FORMAT.close_step``), parse, up to 8 steps; compare the final answer numerically;
- pass@5 at T=0.8 and the share of problems whose 5 samples are mixed (some right, some wrong),
  which is what MCTS pair extraction (Algorithm 1) needs.

Usage::

    python benchmarks/toy_sft_calibration.py --seeds 0 1 2 --max-steps 600 --threads 2
    # the reproduction's stage 0: misread solutions, and the room left for a step ranker
    python benchmarks/toy_sft_calibration.py --seeds 0 --max-steps 1000 --diagnostic 300 \
        --misreadings "keeps one out of every=-" "trades each one for=+" --misreading-rate 0.667

``--diagnostic N`` adds the value diagnostic of the policy without a value head on the first N test problems
(``svpo_trl.value_diagnostic``: SBS(1,5) at T=0.6 with gold step labels): the SBS oracle ceiling and how well the
policy's own prior ranks candidate steps (within-group accuracy; 0.5 is chance).

Writes ``benchmarks/results/toy_sft_calibration.{json,md}``. This is a benchmark, not library code:
the library's own sampler and evaluation live in ``svpo_trl.search`` / ``svpo_trl.evaluation``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, replace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from svpo_trl.pipeline import SFTScriptArguments
from svpo_trl.sandbox import PythonSandbox
from svpo_trl.search.sampler import format_execution_output
from svpo_trl.steps import DEFAULT_FORMAT
from svpo_trl.toy.bootstrap import ToySFTConfig, bootstrap_sft_policy
from svpo_trl.toy.task import ToyTaskConfig, load_toy_problems

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def numerically_equal(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    try:
        return abs(float(predicted.replace(",", "")) - float(gold)) < 1e-6
    except ValueError:
        return False


@torch.no_grad()
def solve(
    model,
    tokenizer,
    sandbox: PythonSandbox,
    questions: list[str],
    *,
    temperature: float,
    max_depth: int = 8,
    max_new_tokens: int = 96,
    batch_size: int = 256,
) -> list[str | None]:
    """Final answers of step-by-step solutions (None when none was given within ``max_depth`` steps)."""
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in DEFAULT_FORMAT.stop] + [tokenizer.eos_token_id]
    texts = [DEFAULT_FORMAT.prompt(q) for q in questions]
    snippets: list[list[str]] = [[] for _ in questions]
    answers: list[str | None] = [None] * len(questions)
    active = list(range(len(questions)))
    for _depth in range(max_depth):
        if not active:
            break
        generated: dict[int, str] = {}
        for start in range(0, len(active), batch_size):
            chunk = active[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False
            )
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
            new = out[:, enc["input_ids"].shape[1] :]
            for i, row in zip(chunk, new.tolist()):
                text = tokenizer.decode(row, skip_special_tokens=True)
                # Cut right after the first stop string: a finished row is padded, not continued.
                cuts = [text.find(s) + len(s) for s in DEFAULT_FORMAT.stop if s in text]
                generated[i] = text[: min(cuts)] if cuts else text
        code_rows = [i for i in active if DEFAULT_FORMAT.code_to_run(generated[i]) is not None]
        results = sandbox.run_many(
            [[*snippets[i], DEFAULT_FORMAT.code_to_run(generated[i])] for i in code_rows]
        )
        outputs = {i: format_execution_output(r) for i, r in zip(code_rows, results)}
        still_active = []
        for i in active:
            step_text = DEFAULT_FORMAT.close_step(generated[i], outputs.get(i))
            step = DEFAULT_FORMAT.parse(step_text)
            texts[i] += step_text
            if step.kind == "code":
                snippets[i].append(step.code)
                still_active.append(i)
            elif step.kind == "answer":
                answers[i] = step.final_answer
        active = still_active
    return answers


def evaluate_policy(
    model_dir: str, num_test: int, num_samples: int, temperature: float, seed: int, task: ToyTaskConfig
) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    test = load_toy_problems("test", num_test, config=task)
    questions, gold = test["question"], test["answer"]
    with PythonSandbox(timeout_s=5) as sandbox:
        start = time.perf_counter()
        greedy = solve(model, tokenizer, sandbox, questions, temperature=0.0)
        greedy_seconds = time.perf_counter() - start
        torch.manual_seed(seed)
        start = time.perf_counter()
        sampled = solve(
            model,
            tokenizer,
            sandbox,
            [q for q in questions for _ in range(num_samples)],
            temperature=temperature,
        )
        sample_seconds = time.perf_counter() - start
    greedy_correct = [numerically_equal(a, g) for a, g in zip(greedy, gold)]
    per_problem = [
        [numerically_equal(a, g) for a in sampled[k * num_samples : (k + 1) * num_samples]]
        for k, g in enumerate(gold)
    ]
    return {
        "greedy_accuracy": sum(greedy_correct) / len(gold),
        "greedy_answered": sum(a is not None for a in greedy) / len(gold),
        f"pass@{num_samples}": sum(any(c) for c in per_problem) / len(gold),
        f"sample_accuracy_T{temperature}": sum(map(sum, per_problem)) / (len(gold) * num_samples),
        "mixed_outcome_share": sum(any(c) and not all(c) for c in per_problem) / len(gold),
        "greedy_eval_seconds": greedy_seconds,
        "sample_eval_seconds": sample_seconds,
    }


def room_for_a_ranker(model_dir: str, num_problems: int, seed: int, task: ToyTaskConfig) -> dict:
    """The SBS(1,5) oracle ceiling and the prior's within-group ranking accuracy (no value head needed)."""
    from svpo_trl.models.loading import load_policy
    from svpo_trl.search.backends import HFBackend
    from svpo_trl.value_diagnostic import value_diagnostic

    model, tokenizer = load_policy(model_dir)
    backend = HFBackend(model, tokenizer, batch_size=256, seed=seed)
    problems = load_toy_problems("test", num_problems, config=task)
    diag = value_diagnostic(backend, problems, "gold", use_value=False, max_new_tokens=96, temperature=0.6)
    return {
        "diagnostic_problems": num_problems,
        "oracle_ceiling": diag.metrics["oracle_ceiling"],
        "prior_within_group_accuracy": diag.metrics["prior_within_group_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=ToySFTConfig.max_steps)
    parser.add_argument("--hidden-size", type=int, default=ToySFTConfig.hidden_size)
    parser.add_argument("--num-layers", type=int, default=ToySFTConfig.num_layers)
    parser.add_argument("--num-train", type=int, default=ToySFTConfig.num_train_problems)
    parser.add_argument("--learning-rate", type=float, default=ToySFTConfig.learning_rate)
    parser.add_argument("--batch-size", type=int, default=ToySFTConfig.batch_size)
    parser.add_argument("--max-ops", type=int, default=ToyTaskConfig.max_ops)
    parser.add_argument("--max-operand", type=int, default=ToyTaskConfig.max_operand)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--misreadings", nargs="*", default=[], help="'phrase=op' entries, as the SFT recipe")
    parser.add_argument("--misreading-rate", type=float, default=0.0)
    parser.add_argument(
        "--diagnostic", type=int, default=0, help="value diagnostic on this many test problems"
    )
    parser.add_argument("--tag", default="toy_sft_calibration", help="results file name")
    parser.add_argument("--keep-dir", default=None, help="keep checkpoints under this folder")
    parser.add_argument("--merge", nargs="+", default=None, help="only merge these result tags into --tag")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.tag)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = ToyTaskConfig(max_ops=args.max_ops, max_operand=args.max_operand)
    base = ToySFTConfig(
        max_steps=args.max_steps,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_train_problems=args.num_train,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        task=task,
        misreadings=SFTScriptArguments(toy_misreadings=args.misreadings).toy_misreading_map(),
        misreading_rate=args.misreading_rate,
    )
    runs = []
    for seed in args.seeds:
        config = replace(base, seed=seed, num_threads=args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            out_dir = os.path.join(args.keep_dir, f"seed{seed}") if args.keep_dir else tmp
            result = bootstrap_sft_policy(out_dir, config=config)
            metrics = evaluate_policy(out_dir, args.num_test, args.num_samples, args.temperature, seed, task)
            if args.diagnostic:
                metrics.update(room_for_a_ranker(out_dir, args.diagnostic, seed, task))
        run = {
            "seed": seed,
            "train_seconds": result.train_seconds,
            "train_cpu_seconds": result.train_cpu_seconds,
            "final_train_loss": result.final_train_loss,
            "num_parameters": result.num_parameters,
            **metrics,
        }
        print(json.dumps(run), flush=True)
        runs.append(run)
    report = {
        "config": {
            **asdict(base),
            "num_test": args.num_test,
            "num_samples": args.num_samples,
            "temperature": args.temperature,
            "threads": torch.get_num_threads(),
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, shared with other jobs",
        "load_average_at_end": os.getloadavg(),
        "runs": runs,
    }
    write_report(report, args.tag)


def write_report(report: dict, tag: str) -> None:
    """``results/{tag}.json`` and a markdown table ``results/{tag}.md``."""
    cfg, runs = report["config"], report["runs"]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{tag}.json"), "w") as f:
        json.dump(report, f, indent=2)
    pass_key = f"pass@{cfg['num_samples']}"
    lines = [
        f"# Toy SFT calibration ({tag})",
        "",
        f"Tiny Llama hidden {cfg['hidden_size']}, {cfg['num_layers']} layers, {cfg['num_train_problems']} train "
        f"problems, {cfg['max_steps']} steps, batch {cfg['batch_size']}, lr {cfg['learning_rate']}, "
        f"{cfg['threads']} torch thread(s); test = first {cfg['num_test']} toy test problems; "
        f"{cfg['num_samples']} samples at T={cfg['temperature']}. Machine: {report['machine']}; wall-clock "
        "times are disturbed by other jobs, CPU seconds are what training costs on a quiet core.",
        "",
        f"| seed | params | train s (wall) | train CPU s | final loss | greedy acc | {pass_key} | mixed outcome |",
        "|---|---|---|---|---|---|---|---|",
    ]
    diagnosed = all("oracle_ceiling" in r for r in runs)
    if diagnosed:
        lines[-2] += " SBS oracle ceiling | prior within-group |"
        lines[-1] += "---|---|"
        lines[2] += (
            f" Diagnostic on the first {runs[0]['diagnostic_problems']} test problems, SBS(1,5) at T=0.6."
        )
    if cfg.get("misreadings"):
        lines[2] += f" Stage-0 data misread {cfg['misreadings']} at rate {cfg['misreading_rate']}."
    for r in runs:
        lines.append(
            f"| {r['seed']} | {r['num_parameters'] / 1e6:.2f}M | {r['train_seconds']:.0f} | "
            f"{r.get('train_cpu_seconds', float('nan')):.0f} | {r['final_train_loss']:.3f} | "
            f"{r['greedy_accuracy']:.3f} | {r[pass_key]:.3f} | {r['mixed_outcome_share']:.3f} |"
            + (
                f" {_num(r['oracle_ceiling'])} | {_num(r['prior_within_group_accuracy'])} |"
                if diagnosed
                else ""
            )
        )
    with open(os.path.join(RESULTS, f"{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _num(value: float | None) -> str:
    """Three decimals; '-' where there was nothing to measure (no state mixed right and wrong steps)."""
    return "-" if value is None else f"{value:.3f}"


def merge(tags: list[str], tag: str) -> None:
    """Merge the runs of several result files (e.g. one process per seed) into ``results/{tag}``."""
    reports = []
    for name in tags:
        with open(os.path.join(RESULTS, f"{name}.json")) as f:
            reports.append(json.load(f))
    merged = {
        **reports[0],
        "runs": [run for report in reports for run in report["runs"]],
        "merged_from": tags,
    }
    write_report(merged, tag)


if __name__ == "__main__":
    sys.exit(main())
