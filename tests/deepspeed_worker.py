"""A few training steps of SVPOTrainer or ValueSFTTrainer; launched by tests/test_deepspeed.py.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3_cpu.yaml tests/deepspeed_worker.py \
        --trainer svpo --model CHECKPOINT --output DIR

Each process writes ``DIR/rank{N}.json``: the log history, the value head right after loading and after
training, and the names of the parameters training left unchanged (every parameter gathered under ZeRO-3).
Rank 0 also saves the model with ``trainer.save_model`` in ``DIR/final``. Without ``accelerate launch``
(:func:`train` with ``single_process=True``) it is the single-process, non-DeepSpeed reference.

The data are chosen so that splitting a batch of 4 over 2 processes changes no loss: the per-process means
of every term (SVPO: all chosen completions have the same tokens; value SFT: every solution has 2 steps and
the NLL is normalised over the whole batch) average to the mean over the whole batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))

from svpo_trl.models import ValueHeadForCausalLM
from svpo_trl.steps import DEFAULT_FORMAT as FMT
from svpo_trl.trainer import SVPOConfig, SVPOTrainer, ValueSFTConfig, ValueSFTTrainer
from svpo_trl.trainer.zero3 import gathered

from conftest import FIGURE5_QUESTION, FIGURE5_STEPS

PROMPT = FMT.prompt(FIGURE5_QUESTION)
CODE_OK, ANSWER_OK = FIGURE5_STEPS
CODE_BAD = FMT.render_code_step("I add the growth rate once.", "print(20 + 3)", "23")
ANSWER_BAD = FMT.render_answer_step("Haley will be 30 inches tall.", "30")

PAIRS = [
    {"prompt": PROMPT, "chosen": CODE_OK, "rejected": rejected, "chosen_value": 0.6, "rejected_value": value}
    for rejected, value in [
        (CODE_BAD, -0.4),
        (FMT.render_code_step("Multiply height by years.", "print(20 * 10)", "200"), -0.2),
        (ANSWER_BAD, -1.0),
        (FMT.render_answer_step("So the height is 23.", "23"), -1.0),
    ]
]
VALUES = [
    {"prompt": PROMPT, "steps": [CODE_OK, ANSWER_OK], "step_values": [0.6, 1.0], "correct": True},
    {"prompt": PROMPT, "steps": [CODE_OK, ANSWER_BAD], "step_values": [0.6, -1.0], "correct": False},
    {"prompt": PROMPT, "steps": [CODE_BAD, ANSWER_BAD], "step_values": [-0.4, -1.0], "correct": False},
    {"prompt": PROMPT, "steps": [CODE_BAD, ANSWER_OK], "step_values": [-0.4, 1.0], "correct": True},
]
GLOBAL_BATCH = 4


def train(
    trainer_name: str,
    model_path: str,
    output_dir: str,
    *,
    steps: int = 3,
    single_process: bool = False,
    v_head: dict[str, list[float]] | None = None,
    **config_overrides: Any,
) -> dict[str, Any]:
    """Train a few steps and return this process's record (see the module docstring).

    ``v_head`` replaces the loaded head (e.g. by the one a DeepSpeed run initialised), so that a reference
    run starts from the same weights.
    """
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    # accelerate's config decides the precision under DeepSpeed: bf16 there must match TrainingArguments.bf16
    bf16 = os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16" and not single_process
    kwargs = {
        "output_dir": output_dir,
        "report_to": "none",
        "per_device_train_batch_size": GLOBAL_BATCH // world,
        "max_steps": steps,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
        "disable_tqdm": True,
        "bf16": False,
        **config_overrides,
    }
    if single_process:
        kwargs["use_cpu"] = True
    else:
        # Without a GPU accelerate picks no process-group backend of its own; DeepSpeed's CPU accelerator
        # talks gloo (oneCCL when installed)
        kwargs["ddp_backend"] = "gloo"
    config_class = SVPOConfig if trainer_name == "svpo" else ValueSFTConfig
    args = config_class(**kwargs)
    if bf16:
        # transformers refuses bf16=True without a GPU unless use_cpu=True, which turns DeepSpeed off; set it
        # after validation so that DeepSpeed's bf16 (from the accelerate config) matches the Trainer's
        args.bf16 = True

    # Loaded after the config: with ZeRO-3 and zero3_init_flag this runs under deepspeed.zero.Init
    model = ValueHeadForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if v_head is not None:
        with torch.no_grad():
            for name, param in model.v_head.named_parameters():
                param.copy_(torch.tensor(v_head[name]).view_as(param))
    record: dict[str, Any] = {
        "v_head_loaded": _v_head(model),
        "loaded_dtype": str(model.dtype),  # ZeRO-3 Init already casts to bf16
        "world_size": world,
    }
    dtype = torch.bfloat16 if bf16 else torch.float32
    initial = {}
    for name, param in model.named_parameters():
        with gathered([param]):
            initial[name] = param.detach().to(dtype).clone()  # DeepSpeed bf16 trains bf16 copies

    if trainer_name == "svpo":
        trainer = SVPOTrainer(
            model, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer
        )
    else:
        trainer = ValueSFTTrainer(
            model, args=args, train_dataset=Dataset.from_list(VALUES), processing_class=tokenizer
        )
    trainer.train()

    unchanged = []
    for name, param in model.named_parameters():
        with gathered([param]):
            if torch.equal(param.detach().to(dtype), initial[name]):
                unchanged.append(name)
    record.update(
        log_history=trainer.state.log_history,
        unchanged=unchanged,
        num_parameters=len(initial),
        v_head_trained=_v_head(model),
        param_dtype=str(next(model.parameters()).dtype),
        rank=trainer.accelerator.process_index,
    )
    trainer.save_model(os.path.join(output_dir, "final"))
    Path(output_dir, f"rank{record['rank']}.json").write_text(json.dumps(record))
    if torch.distributed.is_initialized():
        # A process group left to the interpreter's exit now and then aborts it there ("terminate called
        # without an active exception", seen with gloo), failing the launch after the work is done
        trainer.accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
    return record


def _v_head(model: ValueHeadForCausalLM) -> dict[str, list[float]]:
    with gathered(model.v_head.parameters()):
        return {name: p.detach().float().flatten().tolist() for name, p in model.v_head.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trainer", choices=["svpo", "value_sft"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    cli = parser.parse_args()
    train(
        cli.trainer,
        cli.model,
        cli.output,
        steps=cli.steps,
        gradient_checkpointing=cli.gradient_checkpointing,
    )


if __name__ == "__main__":
    main()
