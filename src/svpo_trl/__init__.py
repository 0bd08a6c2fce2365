"""svpo_trl: Step-level Value Preference Optimization on TRL."""

__version__ = "0.1.0"

from .steps import DEFAULT_FORMAT, Step, StepFormat, extract_final_answer

__all__ = ["DEFAULT_FORMAT", "Step", "StepFormat", "__version__", "extract_final_answer"]
