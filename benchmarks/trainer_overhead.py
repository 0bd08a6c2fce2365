"""Overhead of SVPOTrainer over TRL's DPOTrainer (sigmoid + sft): step time and peak memory, same batch.

Both trainers train the same Llama (built from a config, ~40M parameters, nothing downloaded) with a frozen
reference copy, on the SAME collated batch of step-level pairs, in the same process, steps interleaved
(DPO, SVPO, DPO, SVPO, ...) so that load from other processes hits both alike. SVPO runs with every term on
(paper weights); DPO with ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, 5]`` (the paper's SFT weight).
A step is ``trainer.training_step`` (forward of policy and reference, loss, backward) plus the optimizer step.

Memory (CPU): glibc is told to serve every allocation above 64 KiB with its own mmap
(``mallopt(M_MMAP_THRESHOLD)``), so freed tensors return to the OS at once and the resident set size (RSS)
tracks live memory. A thread samples RSS every millisecond during a step; the step's working memory is the
peak minus the RSS at the step's start. The persistent memory (parameters, gradients, optimizer states,
reference model) is counted exactly from the tensors. Peak = persistent + working. On CUDA,
``torch.cuda.max_memory_allocated`` is used instead.

    python benchmarks/trainer_overhead.py            # writes benchmarks/results/trainer_overhead.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import psutil  # a dependency of accelerate
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

from svpo_trl.steps import DEFAULT_FORMAT
from svpo_trl.toy import tiny_llama_config, train_tokenizer
from svpo_trl.trainer.svpo_config import SVPOConfig
from svpo_trl.trainer.svpo_trainer import VALUE_KEYS, SVPOTrainer

RESULTS = Path(__file__).parent / "results"
_NAMES = ["Ann", "Bob", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana"]
_OBJECTS = ["apples", "marbles", "coins", "books", "shells", "stamps"]


def _use_mmap_for_large_allocations() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD: fixed, no dynamic growth
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def synthetic_pairs(num_pairs: int, seed: int, step_repeats: int) -> list[dict]:
    """Sibling pairs in the step format: a shared code step, then a right and a wrong next step."""
    rng = random.Random(seed)
    fmt = DEFAULT_FORMAT
    rows = []
    for i in range(num_pairs):
        name, obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        question = (
            f"{name} has {a} {obj} and buys {b} more, then gives away a {c}th of them. How many are left?"
        )
        pad = " ".join(f"{name} counts {rng.randint(1, 99)} {obj}." for _ in range(step_repeats))
        shared = fmt.render_code_step(
            f"First add the {obj}. {pad}", f"total = {a} + {b}\nprint(total)", str(a + b)
        )
        right = fmt.render_code_step(
            f"Now remove a {c}th. {pad}",
            f"left = total - total // {c}\nprint(left)",
            str(a + b - (a + b) // c),
        )
        wrong = fmt.render_code_step(
            f"Now remove {c}. {pad}", f"left = total - {c}\nprint(left)", str(a + b - c)
        )
        rows.append(
            {
                "id": f"p{i}",
                "prompt": fmt.prompt(question),
                "chosen": shared + right,
                "rejected": shared + wrong,
                "chosen_value": 0.5,
                "rejected_value": -0.5,
                "pair_type": "sibling",
            }
        )
    return rows


class PeakRSS:
    """Peak resident set size while the block runs, sampled by a thread."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.process = psutil.Process()

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def persistent_bytes(trainer) -> int:
    """Parameters, gradients (of trainable parameters), optimizer states and reference model, in bytes."""
    tensors = {id(p): p for p in trainer.model.parameters()}
    total = sum(p.numel() * p.element_size() for p in tensors.values())
    total += sum(p.numel() * p.element_size() for p in tensors.values() if p.requires_grad)  # grads
    for state in trainer.optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    if trainer.ref_model is not None:
        total += sum(p.numel() * p.element_size() for p in trainer.ref_model.parameters())
    return total


def one_step(trainer, batch) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one optimisation step."""
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=False)  # keep gradient buffers: they are persistent memory
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument(
        "--vocab-size", type=int, default=16000, help="model vocabulary (synthetic beyond the BPE)"
    )
    parser.add_argument("--pairs-per-batch", type=int, default=2)
    parser.add_argument("--step-repeats", type=int, default=6, help="filler sentences per step (sets length)")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per trainer first")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per trainer for the memory pass")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: robust when other processes share the cores)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "trainer_overhead")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    mmap_ok = _use_mmap_for_large_allocations()
    cuda = torch.cuda.is_available()

    rows = synthetic_pairs(64, seed=0, step_repeats=args.step_repeats)
    corpus = [r["prompt"] + r["chosen"] + r["rejected"] for r in rows]
    tokenizer = train_tokenizer(corpus, vocab_size=1000)
    config = tiny_llama_config(
        tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.hidden_size // 64
    )
    config.vocab_size = max(args.vocab_size, len(tokenizer))
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    num_params = sum(p.numel() for p in base.parameters())
    dataset = Dataset.from_list(rows[: args.pairs_per_batch])

    common = {
        "output_dir": "/tmp/svpo_trainer_overhead",
        "report_to": "none",
        "use_cpu": not cuda,
        "bf16": cuda,
        "gradient_checkpointing": False,
        "per_device_train_batch_size": args.pairs_per_batch,
        "learning_rate": 1e-5,
        "max_length": None,
        "disable_tqdm": True,
        "seed": 0,
    }
    svpo = SVPOTrainer(
        copy.deepcopy(base),
        ref_model=copy.deepcopy(base),
        args=SVPOConfig(**common),  # paper weights: every term on
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    dpo_model = copy.deepcopy(base)
    dpo = DPOTrainer(
        dpo_model,
        ref_model=copy.deepcopy(base),
        args=DPOConfig(**common, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 5.0]),
        train_dataset=dataset.select_columns(["prompt", "chosen", "rejected"]),
        processing_class=tokenizer,
    )
    del base
    batch = svpo.data_collator([svpo.train_dataset[i] for i in range(args.pairs_per_batch)])
    batches = {"svpo": batch, "dpo": {k: v for k, v in batch.items() if k not in VALUE_KEYS}}
    trainers = {"dpo": dpo, "svpo": svpo}
    for trainer in trainers.values():
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is bypassed here
        trainer.model.train()

    def fresh(name):
        return {k: v.clone() for k, v in batches[name].items()}

    # Timing and memory are measured in separate passes, so the RSS sampler's thread does not slow the timing.
    times: dict[str, list[float]] = {"dpo": [], "svpo": []}
    cpu_times: dict[str, list[float]] = {"dpo": [], "svpo": []}
    paired: list[float] = []
    load_before = os.getloadavg()
    for step in range(args.warmup + args.steps):
        order = ["dpo", "svpo"] if step % 2 == 0 else ["svpo", "dpo"]  # alternate who goes first
        this_round = {}
        for name in order:
            this_round[name] = one_step(trainers[name], fresh(name))
        if step >= args.warmup:
            for name, (wall, cpu_s) in this_round.items():
                times[name].append(wall)
                cpu_times[name].append(cpu_s)
            paired.append(this_round["svpo"][0] / this_round["dpo"][0])
        print(f"step {step}: {this_round}", file=sys.stderr, flush=True)
    working: dict[str, list[int]] = {"dpo": [], "svpo": []}
    for _ in range(args.memory_steps):
        for name in ("dpo", "svpo"):
            _trim()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                start_mem = torch.cuda.memory_allocated()
            with PeakRSS() as rss:
                one_step(trainers[name], fresh(name))
            working[name].append(
                torch.cuda.max_memory_allocated() - start_mem if cuda else rss.peak - rss.start
            )
    load_after = os.getloadavg()

    def summary(name: str) -> dict:
        ts = sorted(times[name])
        persistent = persistent_bytes(trainers[name])
        work = statistics.median(working[name])
        return {
            "median_step_s": statistics.median(ts),
            "min_step_s": ts[0],
            "p25_step_s": ts[len(ts) // 4],
            "p75_step_s": ts[(3 * len(ts)) // 4],
            "median_step_cpu_s": statistics.median(cpu_times[name]),
            "step_times_s": times[name],
            "step_cpu_times_s": cpu_times[name],
            "persistent_mib": persistent / 2**20,
            "working_mib_median": work / 2**20,
            "working_mib_samples": [w / 2**20 for w in working[name]],
            "peak_mib": (persistent + work) / 2**20,
        }

    result = {
        "dpo": summary("dpo"),
        "svpo": summary("svpo"),
        "setup": {
            "model": f"Llama hidden {args.hidden_size}, {args.num_layers} layers, vocab {config.vocab_size}",
            "parameters": num_params,
            "pairs_per_batch": args.pairs_per_batch,
            "sequence_lengths": batch["attention_mask"].sum(1).tolist(),
            "padded_length": batch["input_ids"].shape[1],
            "measured_steps": args.steps,
            "memory_steps": args.memory_steps,
            "warmup_steps": args.warmup,
            "device": torch.cuda.get_device_name()
            if cuda
            else f"CPU, {os.cpu_count()} cores ({platform.processor()})",
            "torch_threads": torch.get_num_threads(),
            "memory_method": "cuda max_memory_allocated"
            if cuda
            else f"persistent tensors + RSS peak delta per step (mmap threshold fixed: {mmap_ok})",
            "load_average_before": load_before,
            "load_average_after": load_after,
            "versions": {"torch": torch.__version__, "trl": __import__("trl").__version__},
        },
    }
    result["ratio"] = {
        "time": result["svpo"]["median_step_s"] / result["dpo"]["median_step_s"],
        "time_paired_median": statistics.median(paired),
        "time_min": result["svpo"]["min_step_s"] / result["dpo"]["min_step_s"],
        "cpu_time": result["svpo"]["median_step_cpu_s"] / result["dpo"]["median_step_cpu_s"],
        "memory": result["svpo"]["peak_mib"] / result["dpo"]["peak_mib"],
        "working_memory": result["svpo"]["working_mib_median"] / result["dpo"]["working_mib_median"],
    }
    table = markdown(result)
    print(table)
    if not args.no_save:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.output.with_suffix(".md").write_text(table)
    return result


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        "# SVPOTrainer vs TRL DPOTrainer (sigmoid + sft): overhead per training step",
        "",
        f"{s['model']} ({s['parameters'] / 1e6:.1f}M parameters), {s['pairs_per_batch']} pairs per batch "
        f"(sequence lengths {s['sequence_lengths']}), {s['measured_steps']} measured steps each after "
        f"{s['warmup_steps']} warm-up, interleaved; {s['device']}, {s['torch_threads']} torch threads. "
        f"Load average before/after: {[round(x, 1) for x in s['load_average_before']]} / "
        f"{[round(x, 1) for x in s['load_average_after']]}. Memory: {s['memory_method']}.",
        "",
        "| trainer | median step (s) | p25-p75 (s) | min (s) | median CPU (s) | persistent (MiB) "
        "| working, median (MiB) | peak (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (("dpo", "DPOTrainer sigmoid+sft"), ("svpo", "SVPOTrainer (all terms)")):
        r = result[name]
        lines.append(
            f"| {label} | {r['median_step_s']:.3f} | {r['p25_step_s']:.3f}-{r['p75_step_s']:.3f} | "
            f"{r['min_step_s']:.3f} | {r['median_step_cpu_s']:.3f} | {r['persistent_mib']:.1f} | "
            f"{r['working_mib_median']:.1f} | {r['peak_mib']:.1f} |"
        )
    ratio = result["ratio"]
    lines += [
        f"| **ratio SVPO/DPO** | **{ratio['time']:.3f}** | paired: {ratio['time_paired_median']:.3f} | "
        f"{ratio['time_min']:.3f} | {ratio['cpu_time']:.3f} | | {ratio['working_memory']:.3f} | "
        f"**{ratio['memory']:.3f}** |",
        "",
        "Median step: wall clock (the target's measure); paired: median over rounds of SVPO/DPO for the two "
        "adjacent steps of a round; CPU: process CPU time, less sensitive to other processes' load.",
        "",
        "Targets: time ratio <= 1.10, memory ratio <= 1.05.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
