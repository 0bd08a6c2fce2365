r"""Stage 0: an SFT policy that writes solutions in the step format (paper §4.1, A.5).

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft.py --config recipes/configs/toy.yaml

``model_name_or_path: toy`` bootstraps the embedded default's tiny Llama from scratch on the toy task;
any other model is fine-tuned with TRL's ``SFTTrainer`` on ``question`` (or ``problem``) + step-format
``solution`` rows (a JSONL/JSON file, a folder, a saved dataset or a Hub id), checked before training:

    accelerate launch recipes/sft.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name my_steps.jsonl \
        --output_dir outputs/sft
    # GSM8K's calculator answers converted to the step format (about 96% of the training split converts)
    accelerate launch recipes/sft.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name gsm8k \
        --convert_gsm8k --output_dir outputs/sft
"""

from trl import SFTConfig

from svpo_trl.cli import parse_stage_args, run_recipe
from svpo_trl.pipeline import SFTScriptArguments, run_sft


def main(args: list[str] | None = None) -> dict:
    script_args, training_args = parse_stage_args(
        "sft", [SFTScriptArguments, SFTConfig], args, description=__doc__
    )
    return run_sft(script_args, training_args)


if __name__ == "__main__":
    run_recipe(main)
