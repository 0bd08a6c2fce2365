"""Stage 0: an SFT policy that writes solutions in the step format (paper §4.1, A.5).

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft.py --config recipes/configs/toy.yaml

``model_name_or_path: toy`` bootstraps the embedded default's tiny Llama from scratch on the toy task;
any other model is fine-tuned with TRL's ``SFTTrainer`` on ``question`` + step-format ``solution`` rows.
"""

from trl import SFTConfig

from svpo_trl.cli import parse_stage_args
from svpo_trl.pipeline import SFTScriptArguments, run_sft


def main(args: list[str] | None = None) -> dict:
    script_args, training_args = parse_stage_args("sft", [SFTScriptArguments, SFTConfig], args)
    return run_sft(script_args, training_args)


if __name__ == "__main__":
    main()
