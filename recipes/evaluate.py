r"""Stage 4: greedy / SBS(B1, B2) / maj@k on test sets (paper §3.3, Table 2).

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/evaluate.py \
        --model_name_or_path outputs/toy/svpo --datasets toy --strategies greedy "sbs(1,5)" "sbs(3,5)" \
        --output_dir outputs/toy/eval
    python recipes/evaluate.py --model_name_or_path MODEL --datasets gsm8k math gaokao2023en ocw \
        --strategies greedy "sbs(1,5)" --output_dir eval   # or local copies: ../shared/data/gsm8k ...
"""

from svpo_trl.cli import parse_stage_args, run_recipe
from svpo_trl.pipeline import EvaluateArguments, run_evaluate


def main(args: list[str] | None = None) -> list[dict]:
    (eval_args,) = parse_stage_args("evaluate", [EvaluateArguments], args, description=__doc__)
    return run_evaluate(eval_args)


if __name__ == "__main__":
    run_recipe(main)
