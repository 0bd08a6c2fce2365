"""Configuration of :class:`~svpo_trl.trainer.svpo_trainer.SVPOTrainer` (paper §3.2, Eq. 10; Appendix A.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig

# The paper's ablations (Table 3, Table 5) and its solution-level DPO baseline, as weight overrides.
RECIPES: dict[str, dict[str, float]] = {
    "svpo": {},
    "svpo_no_margin": {"margin_weight": 0.0},
    "svpo_no_mse": {"mse_weight": 0.0},
    "svpo_no_regularization": {"regularization_weight": 0.0},
    # Table 3's "DPO" row: the same trainer with the value terms off, trained on pairs of complete
    # solutions (the data decides "solution-level"; nothing in the loss does). The SFT term stays,
    # as the paper adds it to every preference-optimisation run (A.1).
    "dpo": {"margin_weight": 0.0, "mse_weight": 0.0, "regularization_weight": 0.0},
}


@dataclass
class SVPOConfig(DPOConfig):
    r"""
    Configuration for [`SVPOTrainer`]: TRL's [`~trl.DPOConfig`] plus the weights of Eq. 10's extra terms.

    The loss per batch is (means over the batch's preference pairs)

        dpo + margin_weight·margin + regularization_weight·regularization + sft_weight·SFT + mse_weight·MSE

    with ``dpo = −log σ(Δr_π)``, ``margin = max(0, γ − Δr_φ)``, ``regularization = (Δr_π − sg[Δr_φ])²``
    (Eq. 8–10), ``SFT`` the NLL of the chosen completion's model-written tokens averaged over those
    tokens in the batch (TRL's ``sft`` loss type), and ``MSE`` the mean of ``(V_c − chosen_value)²`` and
    ``(V_l − rejected_value)²`` (Eq. 7). A weight of 0 removes its term from the loss (it is still logged).

    Defaults are the paper's (Appendix A.1). Only the fields below differ from [`~trl.DPOConfig`];
    DPO's own options that change the loss (``loss_type`` other than ``["sigmoid"]``, ``ld_alpha``,
    ``use_weighting``, ``f_divergence_type``) are rejected by the trainer.

    Parameters:
        beta (`float`, *optional*, defaults to `0.1`):
            β of Eq. 8, the scale of the implicit reward. Paper: 0.1.
        margin (`float`, *optional*, defaults to `0.5`):
            γ ≥ 0 of Eq. 10, the value margin the chosen state should exceed the rejected one by. Paper: 0.5.
        margin_weight (`float`, *optional*, defaults to `0.25`):
            Weight of the margin loss ``max(0, γ − Δr_φ)``. Paper: 0.25. 0 is the "w/o margin" ablation.
        regularization_weight (`float`, *optional*, defaults to `0.001`):
            Weight of ``(Δr_π − sg[Δr_φ])²``. Paper: 0.001. 0 is the "w/o regularization" ablation.
        sft_weight (`float`, *optional*, defaults to `5.0`):
            Weight of the SFT NLL on the chosen completion's model-written tokens. Paper: 5.
        mse_weight (`float`, *optional*, defaults to `0.25`):
            Weight of the value MSE against the ``chosen_value`` / ``rejected_value`` labels. Paper: 0.25.
            0 is the "w/o MSE" ablation, and the label columns are then optional.
        learning_rate (`float`, *optional*, defaults to `5e-6`):
            Paper: 5e-6.
        num_train_epochs (`float`, *optional*, defaults to `1`):
            Paper: 1.
        lr_scheduler_type (`str`, *optional*, defaults to `"cosine"`):
            Paper: cosine.
        warmup_steps (`float`, *optional*, defaults to `0.03`):
            A float in [0, 1) is a ratio of the total steps (transformers ≥ 5). Paper: warm-up rate 0.03.

    Use [`SVPOConfig.from_recipe`] for the paper's variants: ``"svpo"``, ``"svpo_no_margin"``, ``"svpo_no_mse"``,
    ``"svpo_no_regularization"`` and ``"dpo"`` (solution-level DPO + SFT: value weights 0; train it on pairs of
    complete solutions).
    """

    beta: float = field(default=0.1, metadata={"help": "β of Eq. 8 (implicit reward scale). Paper: 0.1."})
    margin: float = field(default=0.5, metadata={"help": "γ ≥ 0 of Eq. 10 (value margin). Paper: 0.5."})
    margin_weight: float = field(
        default=0.25, metadata={"help": "Weight of the value margin loss max(0, γ − Δr_φ). Paper: 0.25."}
    )
    regularization_weight: float = field(
        default=0.001, metadata={"help": "Weight of the regularization (Δr_π − sg[Δr_φ])². Paper: 0.001."}
    )
    sft_weight: float = field(
        default=5.0, metadata={"help": "Weight of the SFT NLL on the chosen completion. Paper: 5."}
    )
    mse_weight: float = field(
        default=0.25,
        metadata={"help": "Weight of the value MSE against chosen_value/rejected_value. Paper: 0.25."},
    )
    learning_rate: float = field(default=5e-6, metadata={"help": "AdamW learning rate. Paper: 5e-6."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Training epochs. Paper: 1."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Scheduler. Paper: cosine."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warm-up (ratio if < 1). Paper: 0.03."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("margin", "margin_weight", "regularization_weight", "sft_weight", "mse_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"SVPOConfig.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_recipe(cls, recipe: str, **kwargs: Any) -> SVPOConfig:
        """A config for one of the paper's variants (see ``RECIPES``); ``kwargs`` override anything.

        >>> SVPOConfig.from_recipe("svpo_no_mse", output_dir="out").mse_weight
        0.0
        """
        if recipe not in RECIPES:
            raise ValueError(f"Unknown SVPO recipe {recipe!r}; expected one of {sorted(RECIPES)}")
        return cls(**{**RECIPES[recipe], **kwargs})
