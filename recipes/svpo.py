r"""Stage 3: SVPO (paper Eq. 10) on step-level pairs; ``--recipe`` picks an ablation or the DPO baseline.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/svpo.py --config recipes/configs/toy.yaml
    # solution-level DPO (Table 3): the `dpo` section of the same file
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/svpo.py --config recipes/configs/toy.yaml \
        --section dpo
"""

from svpo_trl.cli import parse_stage_args, run_recipe
from svpo_trl.pipeline import SVPOScriptArguments, run_svpo
from svpo_trl.trainer.svpo_config import SVPOConfig


def main(args: list[str] | None = None) -> dict:
    script_args, training_args = parse_stage_args(
        "svpo", [SVPOScriptArguments, SVPOConfig], args, description=__doc__
    )
    return run_svpo(script_args, training_args)


if __name__ == "__main__":
    run_recipe(main)
