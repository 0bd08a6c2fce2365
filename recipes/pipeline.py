"""The whole pipeline: SFT -> MCTS annotation -> value pre-training -> SVPO (+ DPO baseline) -> evaluation.

    python recipes/pipeline.py --config recipes/configs/toy.yaml          # the embedded default (make demo)
    python recipes/pipeline.py --config recipes/configs/toy.yaml --stages evaluate --force

A stage whose output holds a marker with the same settings is skipped, so a stopped pipeline resumes where
it stopped; a stage made with other settings (or from an input that ran again) runs again, and its old
output is moved to ``<dir>.stale-<n>``.
"""

import argparse

from svpo_trl.cli import run_recipe
from svpo_trl.pipeline import PIPELINE_STAGES, run_pipeline


def main(args: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="setting YAML with one section per stage")
    parser.add_argument("--stages", nargs="+", choices=PIPELINE_STAGES, help="run only these stages")
    parser.add_argument(
        "--force", action="store_true", help="run the stages again even when their output is up to date"
    )
    parsed = parser.parse_args(args)
    return run_pipeline(parsed.config, stages=parsed.stages, force=parsed.force)


if __name__ == "__main__":
    run_recipe(main)
