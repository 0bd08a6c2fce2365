"""Executions per second of ``PythonSandbox.run_many`` against a naive ``subprocess.run`` per path.

The workload is what a search sends: 200 solution paths of three small arithmetic snippets each
(the last one prints). The naive baseline starts a fresh interpreter per path,
``subprocess.run([python, "-c", code])``, one after another; a thread-pooled variant of it is
reported too. Writes ``benchmarks/results/sandbox_throughput.{json,md}`` and prints the table.

    python benchmarks/sandbox_throughput.py [--paths 200] [--rounds 3] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from svpo_trl.sandbox import PythonSandbox

RESULTS = Path(__file__).parent / "results"


def make_paths(n: int) -> tuple[list[list[str]], list[str]]:
    """``n`` three-snippet paths of small arithmetic and the output each must print."""
    paths, expected = [], []
    for i in range(n):
        a, b, c = i % 17 + 2, i % 11 + 3, i % 7 + 1
        paths.append([f"apples = {a} * {b}", f"eaten = apples // {c} - {c}", "print(apples - eaten + 1)"])
        expected.append(f"{a * b - (a * b // c - c) + 1}\n")
    return paths, expected


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (workers, forked executions, subprocesses)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def naive_run(path: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "\n".join(path)], capture_output=True, text=True, timeout=30)
    return done.stdout, time.perf_counter() - start


def timed_run(sandbox: PythonSandbox, path: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    result = sandbox.run(path)
    return result.stdout, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--paths", type=int, default=200, help="solution paths per measurement")
    parser.add_argument(
        "--rounds", type=int, default=3, help="measurements of each method; the median is kept"
    )
    parser.add_argument("--workers", type=int, default=None, help="run_many max_workers (default: cpu count)")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    args = parser.parse_args()

    cpu_count = os.cpu_count() or 1
    workers = args.workers or cpu_count
    paths, expected = make_paths(args.paths)
    load_before = os.getloadavg()

    rates: dict[str, list[float]] = {"sandbox": [], "naive": [], "naive_threads": []}
    # CPU time per execution does not depend on how busy the machine is, unlike the rates.
    cpu_start, sandbox_executions = cpu_seconds(), 20 + args.rounds * len(paths) + len(paths) + 50
    with PythonSandbox(num_workers=workers) as sandbox:
        start = time.perf_counter()
        sandbox.warmup(workers)
        startup_s = time.perf_counter() - start
        sandbox.run_many(paths[:20], max_workers=workers)
        for _ in range(args.rounds):
            start = time.perf_counter()
            results = sandbox.run_many(paths, max_workers=workers)
            rates["sandbox"].append(len(paths) / (time.perf_counter() - start))
            wrong = [i for i, (r, e) in enumerate(zip(results, expected)) if r.stdout != e or r.error]
            if wrong:
                raise SystemExit(f"sandbox gave wrong output on paths {wrong[:5]}: {results[wrong[0]]}")
        # Latency of one execution as a search sees it inside run_many (all workers busy).
        with ThreadPoolExecutor(workers) as pool:
            sandbox_latency = [t for _, t in pool.map(lambda p: timed_run(sandbox, p), paths)]
        single_latency = [timed_run(sandbox, p)[1] for p in paths[:50]]
    # The workers are reaped by close(), so their CPU time (and their children's) is counted here.
    sandbox_cpu_ms = 1000 * (cpu_seconds() - cpu_start) / sandbox_executions

    naive_latency: list[float] = []
    cpu_start = cpu_seconds()
    for _ in range(args.rounds):
        start = time.perf_counter()
        outs = [naive_run(p) for p in paths]
        rates["naive"].append(len(paths) / (time.perf_counter() - start))
        naive_latency = [t for _, t in outs]
        if [o for o, _ in outs] != expected:
            raise SystemExit("naive subprocess gave wrong output")
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            outs = list(pool.map(naive_run, paths))
        rates["naive_threads"].append(len(paths) / (time.perf_counter() - start))

    naive_cpu_ms = 1000 * (cpu_seconds() - cpu_start) / (2 * args.rounds * len(paths))
    median = {k: statistics.median(v) for k, v in rates.items()}
    report = {
        "benchmark": "sandbox_throughput",
        "workload": f"{args.paths} paths x 3 snippets of small arithmetic (last prints)",
        "rounds": args.rounds,
        "workers": workers,
        "cpu_count": cpu_count,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": args.note,
        "run_many_exec_per_s": round(median["sandbox"], 1),
        "naive_subprocess_exec_per_s": round(median["naive"], 1),
        "naive_subprocess_threads_exec_per_s": round(median["naive_threads"], 1),
        "speedup_vs_naive": round(median["sandbox"] / median["naive"], 2),
        "speedup_vs_naive_threads": round(median["sandbox"] / median["naive_threads"], 2),
        "run_many_latency_ms_p50": round(1000 * percentile(sandbox_latency, 0.5), 2),
        "run_many_latency_ms_p95": round(1000 * percentile(sandbox_latency, 0.95), 2),
        "single_run_latency_ms_p50": round(1000 * percentile(single_latency, 0.5), 2),
        "single_run_latency_ms_p95": round(1000 * percentile(single_latency, 0.95), 2),
        "naive_latency_ms_p50": round(1000 * percentile(naive_latency, 0.5), 2),
        "naive_latency_ms_p95": round(1000 * percentile(naive_latency, 0.95), 2),
        "run_many_cpu_ms_per_exec": round(sandbox_cpu_ms, 2),
        "naive_cpu_ms_per_exec": round(naive_cpu_ms, 2),
        "cpu_efficiency_vs_naive": round(naive_cpu_ms / sandbox_cpu_ms, 2),
        "pool_startup_s": round(startup_s, 3),
        "all_rounds_exec_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
    }

    table = "\n".join(
        [
            "| method | exec/s | vs naive | latency p50 (ms) | latency p95 (ms) | CPU ms / exec |",
            "|---|---|---|---|---|---|",
            f"| `PythonSandbox.run_many` ({workers} workers) | {report['run_many_exec_per_s']} | "
            f"{report['speedup_vs_naive']}x | {report['run_many_latency_ms_p50']} | "
            f"{report['run_many_latency_ms_p95']} | {report['run_many_cpu_ms_per_exec']} |",
            f"| `PythonSandbox.run`, one at a time | {round(1000 / report['single_run_latency_ms_p50'], 1)} (1/p50) "
            f"| | {report['single_run_latency_ms_p50']} | {report['single_run_latency_ms_p95']} | |",
            f"| naive `subprocess.run([python, '-c', code])`, sequential | {report['naive_subprocess_exec_per_s']} | "
            f"1.0x | {report['naive_latency_ms_p50']} | {report['naive_latency_ms_p95']} | "
            f"{report['naive_cpu_ms_per_exec']} |",
            f"| naive `subprocess.run`, {workers} threads | {report['naive_subprocess_threads_exec_per_s']} | "
            f"{round(median['naive_threads'] / median['naive'], 2)}x | | | |",
        ]
    )
    header = (
        f"# Sandbox throughput\n\n{report['workload']}; median of {args.rounds} rounds; {cpu_count} CPUs, "
        f"Python {report['python']}; load average before/after: {report['load_average_before']} / "
        f"{report['load_average_after']}. Pool start-up ({workers} workers): {report['pool_startup_s']} s."
        + (f"\n\n{args.note}" if args.note else "")
    )
    markdown = f"{header}\n\n{table}\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sandbox_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "sandbox_throughput.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
