"""Stage 2: value pre-training, SFT on correct solutions + MSE of the value head (paper Eq. 7).

accelerate launch --config_file accelerate_configs/cpu.yaml recipes/value_sft.py --config recipes/configs/toy.yaml
"""

from svpo_trl.cli import parse_stage_args, run_recipe
from svpo_trl.pipeline import TrainScriptArguments, run_value_sft
from svpo_trl.trainer.value_sft_config import ValueSFTConfig


def main(args: list[str] | None = None) -> dict:
    script_args, training_args = parse_stage_args(
        "value_sft", [TrainScriptArguments, ValueSFTConfig], args, description=__doc__
    )
    return run_value_sft(script_args, training_args)


if __name__ == "__main__":
    run_recipe(main)
