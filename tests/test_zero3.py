"""ZeRO-3 helpers without DeepSpeed: the plain paths, and the save warning read from the plugin's config.

Their ZeRO-3 paths run in tests/test_deepspeed.py (2 processes under accelerate launch).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from svpo_trl.models import ValueHeadForCausalLM
from svpo_trl.trainer.zero3 import frozen_copy, gathered, is_partitioned, warn_if_save_has_no_weights


def test_frozen_copy_of_an_unpartitioned_model(tiny_model):
    model = ValueHeadForCausalLM.from_causal_lm(tiny_model)
    assert not is_partitioned(model)
    ref = frozen_copy(model)
    assert ref is not model and type(ref) is type(model) and not ref.training
    for (name, param), (ref_name, ref_param) in zip(model.named_parameters(), ref.named_parameters()):
        assert name == ref_name and torch.equal(param, ref_param) and not ref_param.requires_grad
        assert ref_param.data_ptr() != param.data_ptr()
    with gathered(model.v_head.parameters()):  # a no-op without ZeRO-3
        assert model.v_head.weight.shape == (1, model.config.hidden_size)


def _accelerator(stage: int | None, gather: object = None) -> SimpleNamespace:
    plugin = None
    if stage is not None:
        config = {"zero_optimization": {"stage": stage}}
        if gather is not None:
            config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = gather
        plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize(("stage", "gather"), [(None, None), (2, None), (3, True), (3, "true")])
def test_no_save_warning_when_save_model_writes_weights(stage, gather):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_save_has_no_weights(_accelerator(stage, gather))


@pytest.mark.parametrize("gather", [None, False])
def test_zero3_without_16bit_gather_warns(gather):
    with pytest.warns(UserWarning, match="zero3_save_16bit_model: true"):
        warn_if_save_has_no_weights(_accelerator(3, gather))
