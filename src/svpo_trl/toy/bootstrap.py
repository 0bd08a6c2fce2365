"""Stage 0 of the embedded default: bootstrap a tiny SFT policy from scratch on the toy task.

The paper starts from an SFT model that already writes solutions in the step format (§4.1, A.5).
Here a small Llama built from a config, with a tokenizer trained locally, is fine-tuned with TRL's
``SFTTrainer`` on the gold solutions of the toy ``train`` split. Loss covers the model-written
tokens only (``completion_mask`` from :func:`svpo_trl.tokenization.tokenize_solution`: the question
and the environment-written ``<output>`` blocks are masked), as at every later stage. The result is
saved with ``save_pretrained`` so that MCTS annotation, value pre-training, SVPO and evaluation load
it with ``from_pretrained`` exactly as they would load a real SFT checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..steps import DEFAULT_FORMAT
from ..tokenization import tokenize_solution
from .task import ToyTaskConfig, build_toy_tokenizer, load_toy_problems


@dataclass
class ToySFTConfig:
    """Stage-0 settings. Not in the paper (its SFT model is given); the defaults are the calibrated
    ones: greedy accuracy of the result on the toy ``test`` split lands mid-range (20–70%) so that
    MCTS finds both right and wrong steps (see benchmarks/results/toy_sft_calibration.md).

    num_train_problems: toy ``train`` problems used (default 2000: 4000 gave greedy 0.12–0.31 over 3 seeds).
    max_steps: optimizer steps (default 600); accuracy rises steeply with this (300 steps -> ~0%).
    batch_size: problems per step (default 32).
    learning_rate: AdamW peak learning rate, cosine decay (default 2e-3).
    warmup_ratio: share of steps with linear warmup (default 0.03, as the paper's SFT stages).
    weight_decay: AdamW weight decay (default 0.0).
    hidden_size / num_layers / num_heads: the tiny Llama (default 128 / 2 / 4, ~0.5M parameters).
    vocab_size: byte-level BPE vocabulary trained on toy solutions (default 800, tags as tokens).
    tokenizer_texts: toy solutions the tokenizer is trained on (default 2000).
    task: the toy task's difficulty (``ToyTaskConfig``: 2–4 operations, operands <= 20).
    misreadings / misreading_rate: imperfect SFT data: solutions written by someone who misreads these
        phrasings (phrase -> op, e.g. ``{"trades each one for": "+"}``) with this probability per occurrence
        (default none). The questions and their answers stay true; only the demonstrations are wrong.
    seed: model init, data order and dropout (default 0).
    logging_steps: log the train loss every this many steps (default 50).
    num_threads: torch CPU threads (default None: leave torch's setting).
    """

    num_train_problems: int = 2000
    max_steps: int = 600
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 800
    tokenizer_texts: int = 2000
    task: ToyTaskConfig = field(default_factory=ToyTaskConfig)
    misreadings: dict[str, str] = field(default_factory=dict)
    misreading_rate: float = 0.0
    seed: int = 0
    logging_steps: int = 50
    num_threads: int | None = None


@dataclass
class ToySFTResult:
    """What stage 0 produced: where the checkpoint is, the final train loss and the loss curve."""

    output_dir: str
    final_train_loss: float
    train_seconds: float
    train_cpu_seconds: float
    num_parameters: int
    loss_history: list[tuple[int, float]]
    model: Any = field(default=None, repr=False)
    """The trained model in memory (the same weights as the checkpoint)."""


def tokenize_sft_dataset(problems: Dataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Pre-tokenized SFT rows ``input_ids, completion_mask`` (1 on model-written tokens, EOS included)
    from rows with ``question`` and a step-format ``solution`` (any dataset, not only the toy task)."""

    def encode(row: dict) -> dict:
        tokenized = tokenize_solution(
            tokenizer,
            DEFAULT_FORMAT.prompt(row["question"]),
            DEFAULT_FORMAT.split_steps(row["solution"]),
            add_eos=True,
        )
        return {"input_ids": tokenized.input_ids, "completion_mask": tokenized.completion_mask}

    return problems.map(encode, remove_columns=problems.column_names)


tokenize_toy_sft_dataset = tokenize_sft_dataset


def bootstrap_sft_policy(output_dir: str, *, config: ToySFTConfig | None = None) -> ToySFTResult:
    """Train the tiny toy SFT policy from scratch and ``save_pretrained`` it (model + tokenizer).

    Uses TRL's ``SFTTrainer`` on pre-tokenized rows with ``completion_only_loss=True``, so the NLL
    is taken over model-written tokens only. Deterministic given ``config.seed`` on one device.
    Prints progress (a bar and the loss every ``logging_steps``) and returns the final train loss.
    """
    import torch
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from .model import tiny_llama

    cfg = config or ToySFTConfig()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed)
    tokenizer = build_toy_tokenizer(cfg.vocab_size, cfg.tokenizer_texts)
    problems = load_toy_problems(
        "train",
        cfg.num_train_problems,
        config=cfg.task,
        misreadings=cfg.misreadings,
        misreading_rate=cfg.misreading_rate,
    )
    train_dataset = tokenize_sft_dataset(problems, tokenizer)
    model = tiny_llama(
        tokenizer,
        seed=cfg.seed,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
    )
    # generate() with the saved checkpoint stops at EOS and pads with the tokenizer's pad token.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        completion_only_loss=True,
        # TRL's SFTConfig turns activation checkpointing on by default; for a 0.5M-parameter model it
        # only recomputes the forward pass (measured ~1/3 slower on CPU) and saves no memory worth having.
        activation_checkpointing=False,
        max_length=None,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        dataset_num_proc=None,
        bf16=False,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer.train()
    # CPU seconds as well: on a shared machine they say what training costs when the machine is quiet.
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    losses = [(int(log["step"]), float(log["loss"])) for log in trainer.state.log_history if "loss" in log]
    final_loss = losses[-1][1] if losses else float("nan")
    trainer.model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "toy_sft_config.json"), "w") as f:
        json.dump(
            {
                **asdict(cfg),
                "final_train_loss": final_loss,
                "train_seconds": train_seconds,
                "train_cpu_seconds": train_cpu_seconds,
            },
            f,
            indent=2,
        )
    num_parameters = sum(p.numel() for p in model.parameters())
    print(
        f"[toy SFT] {num_parameters / 1e6:.2f}M params, {cfg.max_steps} steps in {train_seconds:.0f}s "
        f"({train_cpu_seconds:.0f} CPU s), "
        f"final train loss {final_loss:.4f}; saved to {output_dir}"
    )
    return ToySFTResult(
        output_dir=output_dir,
        final_train_loss=final_loss,
        train_seconds=train_seconds,
        train_cpu_seconds=train_cpu_seconds,
        num_parameters=num_parameters,
        loss_history=losses,
        model=trainer.model,
    )
