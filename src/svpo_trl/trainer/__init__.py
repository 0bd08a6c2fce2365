"""svpo_trl.trainer: the paper's loss terms (Eq. 7–10) and trainers (value pre-training, SVPO)."""

from .losses import svpo_loss_terms, value_mse
from .svpo_config import RECIPES, SVPOConfig
from .svpo_trainer import SVPOTrainer
from .value_sft_config import ValueSFTConfig
from .value_sft_trainer import ValueSFTTrainer

__all__ = [
    "RECIPES",
    "SVPOConfig",
    "SVPOTrainer",
    "ValueSFTConfig",
    "ValueSFTTrainer",
    "svpo_loss_terms",
    "value_mse",
]
