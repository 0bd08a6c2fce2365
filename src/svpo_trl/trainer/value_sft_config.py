"""Configuration of :class:`~svpo_trl.trainer.value_sft_trainer.ValueSFTTrainer`: value pre-training via SFT (Eq. 7, Appendix A.1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class ValueSFTConfig(TrainingArguments):
    r"""
    Configuration for [`ValueSFTTrainer`]: [`~transformers.TrainingArguments`] plus the Eq. 7 fields.

    The loss per batch is ``nll + mse_weight · mse``: ``nll`` the mean NLL over the model-written tokens
    of the batch's correct solutions, ``mse`` the mean of ``(V_φ(s) − V̂(s))²`` over every step end of
    every solution (V read at the last token of the step, A.3; ``V̂`` the step's Q-value, or R if terminal).

    Defaults are the paper's (Appendix A.1: "learning rate 2e-5, batch size 512, MSE weight 0.01, 10 epochs,
    AdamW, cosine schedule, warm-up rate 0.03") where it gives one. The paper's batch of 512 is
    ``per_device_train_batch_size × gradient_accumulation_steps × number of processes``; set those for
    your hardware (the defaults below are TrainingArguments' 8 × 1).

    Parameters:
        mse_weight (`float`, *optional*, defaults to `0.01`):
            Weight of the value MSE term of Eq. 7. Paper: 0.01. 0 removes the term (still logged).
        max_length (`int` or `None`, *optional*, defaults to `1024`):
            Maximum tokens per solution (prompt included); longer ones are cut on the right and the steps
            whose last token is cut lose their label. `None` keeps everything. Paper: not stated.
        dataset_num_proc (`int` or `None`, *optional*, defaults to `None`):
            Processes used to tokenize the dataset.
        learning_rate (`float`, *optional*, defaults to `2e-5`):
            Paper: 2e-5.
        num_train_epochs (`float`, *optional*, defaults to `10`):
            Paper: 10.
        lr_scheduler_type (`str`, *optional*, defaults to `"cosine"`):
            Paper: cosine.
        warmup_steps (`float`, *optional*, defaults to `0.03`):
            A value below 1 is a fraction of the training steps (transformers ≥ 5 replaced `warmup_ratio` by
            this). Paper: warm-up rate 0.03.
        logging_steps (`float`, *optional*, defaults to `10`):
            Log every this many optimizer steps (TRL's default).
        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            The trainer tokenizes into its own columns and keeps exactly those.
        ddp_find_unused_parameters (`bool` or `None`, *optional*, defaults to `False`):
            Every parameter is used (the head on every forward), and the search for unused ones would walk
            the outputs with ``.values()``, which the ``values`` field shadows.
    """

    mse_weight: float = field(
        default=0.01, metadata={"help": "Weight of the value MSE term of Eq. 7 (paper: 0.01); 0 removes it."}
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Maximum tokens per solution; longer ones are cut on the right. None: no limit."},
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Number of processes used to tokenize the dataset."}
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate (paper: 2e-5)."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Training epochs (paper: 10)."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule (paper: cosine)."}
    )
    warmup_steps: float = field(
        default=0.03,
        metadata={"help": "Warm-up steps, or a fraction of training steps if < 1 (paper: 0.03)."},
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the trainer tokenizes into its own columns."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every parameter is used; the search for unused ones is not needed."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.mse_weight < 0:
            raise ValueError(f"mse_weight must be >= 0, got {self.mse_weight}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {self.max_length}")
