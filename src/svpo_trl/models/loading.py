"""Loading a policy for search and evaluation: below both the pipeline and the search backends.

``svpo_trl.pipeline`` (the stages) and ``svpo_trl.search.vllm_backend`` (``make_backend``) both load
policies through :func:`load_policy`; keeping it here keeps the package free of import cycles.
"""

from __future__ import annotations

from typing import Any

from ..errors import require_path


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` value: ``auto`` is bfloat16 on a GPU that has it, else float32."""
    import torch

    if name == "auto":
        return (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    return getattr(torch, name)


def load_policy(
    model_name_or_path: str,
    dtype: str = "auto",
    *,
    value_head: bool | None = None,
    device: str | None = None,
    **kwargs: Any,
):
    """Load a model and its tokenizer for search/evaluation, in eval mode on ``device``.

    ``value_head=None`` loads a value head when the checkpoint has one (SBS needs it), a plain
    causal LM otherwise. ``device=None`` is the first GPU when there is one, else the CPU (under
    ``accelerate launch`` pass :attr:`ProcessShard.device`, the process's own GPU). A local path
    that does not exist fails at once (:func:`svpo_trl.errors.require_path`).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .value_head import ValueHeadForCausalLM

    require_path(model_name_or_path, "model_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if value_head is None:
        value_head = bool(getattr(AutoConfig.from_pretrained(model_name_or_path), "has_value_head", False))
    loader = ValueHeadForCausalLM if value_head else AutoModelForCausalLM
    model = loader.from_pretrained(model_name_or_path, dtype=torch_dtype(dtype), **kwargs)
    if device is None and torch.cuda.is_available():
        device = "cuda"
    if device is not None:
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
