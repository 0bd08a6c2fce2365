"""svpo_trl.models: the policy-value model (paper §3.2, A.3)."""

from .value_head import ValueHead, ValueHeadForCausalLM, value_head_class

__all__ = ["ValueHead", "ValueHeadForCausalLM", "value_head_class"]
