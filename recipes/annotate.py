"""Stage 1: MCTS annotation (paper §3.1, Eq. 3–6, Algorithm 1) -> trees, pairs, values, solution_pairs.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/annotate.py --config recipes/configs/toy.yaml

A killed run started again with the same arguments resumes where it stopped.
"""

from svpo_trl.cli import parse_stage_args, run_recipe
from svpo_trl.pipeline import AnnotateScriptArguments, run_annotate
from svpo_trl.search.mcts import MCTSConfig


def main(args: list[str] | None = None) -> dict:
    script_args, mcts_config = parse_stage_args(
        "annotate", [AnnotateScriptArguments, MCTSConfig], args, description=__doc__
    )
    return run_annotate(script_args, mcts_config)


if __name__ == "__main__":
    run_recipe(main)
