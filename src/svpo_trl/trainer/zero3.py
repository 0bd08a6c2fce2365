"""DeepSpeed ZeRO-3 helpers: models whose parameters ``deepspeed.zero.Init`` has partitioned across processes.

Under ZeRO-3 with ``zero3_init_flag`` (accelerate) every process holds a shard of each parameter and the
parameter itself is an empty placeholder until gathered. ``copy.deepcopy`` of such a model copies the
placeholders, not the weights, and the copy cannot run (DeepSpeed finds its parameters "NOT_AVAILABLE").
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

__all__ = ["frozen_copy", "gathered", "is_partitioned", "warn_if_save_has_no_weights"]


def is_partitioned(model: nn.Module) -> bool:
    """Whether ZeRO-3 has partitioned ``model``'s parameters (they carry DeepSpeed's ``ds_id``)."""
    return any(hasattr(param, "ds_id") for param in model.parameters())


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters inside the block (``deepspeed.zero.GatheredParameters``); a no-op without ZeRO-3."""
    params = list(params)
    if not any(hasattr(param, "ds_id") for param in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of ``model`` with the same weights, frozen and in eval mode (a DPO reference model).

    Under ZeRO-3 the copy is built partitioned (``_from_config`` runs under ``deepspeed.zero.Init`` while
    ZeRO-3 is configured) and filled one gathered parameter at a time, so no process ever holds more than
    one full parameter of each model at once.
    """
    if not is_partitioned(model):
        ref = copy.deepcopy(model)
    else:
        ref = type(model)._from_config(model.config, dtype=model.dtype)
        source = dict(model.named_parameters())
        for name, param in ref.named_parameters():
            with gathered([source[name]]), gathered([param], modifier_rank=0), torch.no_grad():
                param.copy_(source[name])
        for name, buffer in ref.named_buffers():  # buffers are never partitioned (e.g. rotary frequencies)
            buffer.copy_(model.get_buffer(name))
    ref.requires_grad_(False)
    ref.eval()
    return ref


def warn_if_save_has_no_weights(accelerator: Any) -> None:
    """Warn when ZeRO-3 will not gather the weights on ``save_model``.

    Without ``stage3_gather_16bit_weights_on_model_save`` transformers writes the config and a DeepSpeed
    checkpoint but no ``model.safetensors``: the output directory looks like a model and does not load.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        return
    gather = plugin.deepspeed_config.get("zero_optimization", {}).get(
        "stage3_gather_16bit_weights_on_model_save"
    )
    if str(gather).lower() != "true":
        warnings.warn(
            "DeepSpeed ZeRO-3 without zero3_save_16bit_model: save_model will write no model weights, only a "
            "DeepSpeed checkpoint (convert it with zero_to_fp32.py). Set zero3_save_16bit_model: true in the "
            "accelerate config (stage3_gather_16bit_weights_on_model_save in a DeepSpeed JSON) to save a "
            "checkpoint ValueHeadForCausalLM.from_pretrained loads.",
            stacklevel=3,
        )
