"""Stage 3: SVPO (paper Eq. 10) on step-level pairs; ``--recipe`` picks an ablation or the DPO baseline.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/svpo.py --config recipes/configs/toy.yaml
    # solution-level DPO (Table 3): the `dpo` section of the same file
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/svpo.py --config recipes/configs/toy.yaml \
        --section dpo
"""

import sys

from svpo_trl.cli import parse_stage_args
from svpo_trl.pipeline import TrainScriptArguments, run_svpo
from svpo_trl.trainer.svpo_config import SVPOConfig


def main(args: list[str] | None = None) -> dict:
    args = list(sys.argv[1:] if args is None else args)
    section = "svpo"
    if "--section" in args:
        index = args.index("--section")
        args.pop(index)
        section = args.pop(index)
    script_args, training_args = parse_stage_args(section, [TrainScriptArguments, SVPOConfig], args)
    return run_svpo(script_args, training_args)


if __name__ == "__main__":
    main()
