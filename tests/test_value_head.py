"""ValueHeadForCausalLM: values, loading/saving, generate, TRL's fused LM head, PEFT."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from svpo_trl.models import ValueHead, ValueHeadForCausalLM
from svpo_trl.toy import tiny_llama

TEXTS = ["<question>What is 3 + 4?</question>\n<step>\n<p>\n", "a = 3\nb = 4\nprint(a + b)"]


@pytest.fixture()
def batch(tiny_tokenizer):
    return tiny_tokenizer(TEXTS, return_tensors="pt", padding=True)


@pytest.fixture()
def head_model(tiny_model):
    model = ValueHeadForCausalLM.from_causal_lm(tiny_model)
    with torch.no_grad():  # a head that is not all zeros (a new one is), so that values differ
        model.v_head.weight.copy_(
            torch.randn(model.v_head.weight.shape, generator=torch.Generator().manual_seed(0))
        )
    return model


def test_values_are_tanh_of_head_on_last_hidden_state(head_model, batch):
    out = head_model(**batch, output_hidden_states=True)
    B, T = batch["input_ids"].shape
    assert out.values.shape == (B, T)
    assert out.logits.shape[:2] == (B, T)
    assert out.values.abs().max() <= 1
    # V = tanh(w·h + b) on the final (normed) hidden state, by hand
    h = out.hidden_states[-1]
    expected = torch.tanh(h @ head_model.v_head.weight[0] + head_model.v_head.bias[0])
    torch.testing.assert_close(out.values, expected)
    assert head_model.last_values is out.values
    assert isinstance(head_model, ValueHeadForCausalLM)
    assert isinstance(head_model, LlamaForCausalLM)
    assert isinstance(head_model.v_head, ValueHead)
    assert head_model.v_head.weight.dtype == head_model.dtype


def test_values_span_the_range_when_head_is_large(head_model, batch):
    with torch.no_grad():
        head_model.v_head.weight.mul_(1e4)
    values = head_model(**batch).values
    assert values.min() >= -1 and values.max() <= 1
    assert values.abs().max() > 0.99  # the tanh really bounds, it is not a clamp of small values


def test_from_causal_lm_keeps_weights_and_initialises_head(tiny_tokenizer, batch):
    base = tiny_llama(tiny_tokenizer, seed=0, hidden_size=256)
    reference = copy.deepcopy(base)
    model = ValueHeadForCausalLM.from_causal_lm(base)
    assert model is base  # in place, no copy
    assert ValueHeadForCausalLM.from_causal_lm(model) is model
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
    assert torch.all(model.v_head.bias == 0) and torch.all(model.v_head.weight == 0)
    assert model.value_head_loaded is False
    assert torch.all(model(**batch).values == 0)  # V = 0 before any training, whatever the backbone


def test_from_causal_lm_follows_model_dtype(tiny_tokenizer, batch):
    model = ValueHeadForCausalLM.from_causal_lm(tiny_llama(tiny_tokenizer).to(torch.bfloat16))
    assert model.v_head.weight.dtype == torch.bfloat16
    assert model(**batch).values.dtype == torch.bfloat16


def test_from_causal_lm_rejects_non_causal_lm():
    with pytest.raises(TypeError, match="causal LM"):
        ValueHeadForCausalLM.from_causal_lm(torch.nn.Linear(2, 2))


def test_from_pretrained_plain_checkpoint_gets_fresh_head(tiny_tokenizer, tmp_path, batch):
    base = tiny_llama(tiny_tokenizer, seed=0, hidden_size=256)
    base.config.initializer_range = 0.05
    base.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = ValueHeadForCausalLM.from_pretrained(tmp_path)
    assert type(model).__name__ == "LlamaForCausalLMWithValueHead"
    assert torch.all(model.v_head.bias == 0) and torch.all(model.v_head.weight == 0)
    assert model.value_head_loaded is False  # the checkpoint had no v_head.*: search must know
    torch.testing.assert_close(model(**batch).logits, base(**batch).logits)


def test_save_and_load_restores_head_exactly(head_model, tmp_path, batch):
    with torch.no_grad():
        head_model.v_head.bias.fill_(0.3)  # a head that differs from any fresh initialisation
    expected = head_model(**batch)
    head_model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["has_value_head"] is True
    weights = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert {"v_head.weight", "v_head.bias"} <= set(weights)

    torch.manual_seed(123)  # a different seed: a re-initialised head would differ
    loaded = ValueHeadForCausalLM.from_pretrained(tmp_path)
    assert loaded.value_head_loaded is True
    assert torch.equal(loaded.v_head.weight, head_model.v_head.weight)
    assert torch.equal(loaded.v_head.bias, head_model.v_head.bias)
    out = loaded(**batch)
    assert torch.equal(out.values, expected.values)
    assert torch.equal(out.logits, expected.logits)
    assert loaded.config.has_value_head is True

    # The policy alone still loads with the stock auto class (the head is ignored)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(policy) is LlamaForCausalLM
    assert torch.equal(policy(**batch).logits, expected.logits)


def test_generate_is_the_base_models_greedy(tiny_model, tiny_tokenizer, batch):
    reference = copy.deepcopy(tiny_model)
    model = ValueHeadForCausalLM.from_causal_lm(tiny_model)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    ours = model.generate(**batch, **kwargs)
    theirs = reference.generate(**batch, **kwargs)
    assert torch.equal(ours, theirs)
    assert ours.shape[1] == batch["input_ids"].shape[1] + 8
    assert model.last_values.shape == (2, 1)  # the last decoding step's position, with KV cache


def test_fused_lm_head_values_equal_ordinary_forward(head_model, batch):
    from trl.trainer.utils import add_fused_lm_head

    expected = head_model(**batch).values.detach()
    add_fused_lm_head(head_model)
    head_model(batch["input_ids"][:1, :3])  # leave other values behind: the fused pass must replace them
    assert head_model.last_values.shape == (1, 3)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = head_model(**batch, labels=labels, fused_lm_head=True)
    assert out.log_probs is not None and "values" not in out  # TRL's output has no values: read last_values
    values = head_model.last_values
    torch.testing.assert_close(values, expected)
    # ... and it carries the graph: a loss on it reaches the head and the backbone
    (values.sum() + out.loss).backward()
    assert head_model.v_head.weight.grad.abs().sum() > 0
    assert head_model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    # The ordinary forward is untouched by the patch
    torch.testing.assert_close(head_model(**batch).values, expected)


def test_tuple_outputs_and_pytree(head_model, batch):
    import torch.utils._pytree as pytree

    out = head_model(**batch)
    as_tuple = head_model(**batch, return_dict=False)
    assert torch.equal(as_tuple[-1], out.values)
    assert torch.equal(out.to_tuple()[-1], out.values)
    assert [k for k, _ in out.items()][-1] == "values"
    leaves, spec = pytree.tree_flatten(out)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert type(rebuilt) is type(out) and torch.equal(rebuilt.values, out.values)


def test_deepcopy_keeps_its_own_values(head_model, batch):
    twin = copy.deepcopy(head_model)
    with torch.no_grad():
        twin.v_head.bias.fill_(0.5)
    twin(**batch)
    head_model(**batch)
    assert not torch.equal(twin.last_values, head_model.last_values)
    assert twin.last_values is not head_model.last_values


def test_lora_with_modules_to_save_trains_adapter_and_head(head_model, batch):
    from peft import LoraConfig, get_peft_model

    base_before = {k: v.clone() for k, v in head_model.state_dict().items()}
    model = get_peft_model(
        head_model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["v_head"]),
    )
    trainable = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in trainable) and any("v_head" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model(**batch, labels=batch["input_ids"])
        loss = out.loss + (out.values - 0.5).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, trainable[name]), f"{name} did not move"
    # Base weights (incl. the original head, kept beside its trainable copy) did not move
    for key, value in model.get_base_model().state_dict().items():
        original = key.replace(".base_layer", "").replace("v_head.original_module.", "v_head.")
        if "lora_" in key or "modules_to_save" in key:
            continue
        assert torch.equal(value, base_before[original]), f"{key} moved"
    assert model.last_values.shape == batch["input_ids"].shape
