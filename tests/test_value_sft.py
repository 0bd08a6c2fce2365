"""ValueSFTTrainer (Eq. 7): data validation, collation, hand-computed terms, training behaviour."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from datasets import Dataset

from svpo_trl.models import ValueHeadForCausalLM
from svpo_trl.steps import DEFAULT_FORMAT
from svpo_trl.tokenization import tokenize_solution
from svpo_trl.toy import tiny_llama
from svpo_trl.trainer.data_utils import ValueSFTCollator, tokenize_values_dataset
from svpo_trl.trainer.value_sft_config import ValueSFTConfig
from svpo_trl.trainer.value_sft_trainer import ValueSFTTrainer, value_ranking_accuracy

from conftest import FIGURE5_QUESTION, FIGURE5_STEPS, count_forwards, randomize_value_head

PROMPT = DEFAULT_FORMAT.prompt(FIGURE5_QUESTION)
CODE_STEP, ANSWER_STEP = FIGURE5_STEPS
WRONG_ANSWER_STEP = ANSWER_STEP.replace("$50$", "$60$")

ROWS = [
    {"id": "good", "prompt": PROMPT, "steps": [CODE_STEP, ANSWER_STEP], "step_values": [0.6, 1.0], "correct": True},
    {"id": "bad", "prompt": PROMPT, "steps": [CODE_STEP, WRONG_ANSWER_STEP], "step_values": [0.0, -1.0], "correct": False},
    {"id": "partial", "prompt": PROMPT, "steps": [CODE_STEP], "step_values": [-0.4], "correct": False},
]  # fmt: skip


def config(tmp_path, **overrides) -> ValueSFTConfig:
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(ROWS),
        max_steps=2,
        learning_rate=1e-2,
        warmup_steps=0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    return ValueSFTConfig(**{**kwargs, **overrides})


def hand_computed_terms(model, tokenizer, rows) -> dict[str, float]:
    """Eq. 7's terms from ordinary, unpadded forwards, one solution at a time."""
    nll_sum, nll_count, sq_sum, steps = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for row in rows:
            complete = DEFAULT_FORMAT.parse(row["steps"][-1]).kind == "answer"
            tok = tokenize_solution(tokenizer, row["prompt"], row["steps"], add_eos=complete)
            out = model(torch.tensor([tok.input_ids]))
            logp = out.logits[0].log_softmax(-1)
            if row["correct"]:
                for t in range(1, len(tok.input_ids)):
                    if tok.completion_mask[t]:
                        nll_sum -= logp[t - 1, tok.input_ids[t]].item()
                        nll_count += 1
            for end, label in zip(tok.step_ends, row["step_values"]):
                sq_sum += (out.values[0, end].item() - label) ** 2
                steps += 1
    return {"nll": nll_sum / nll_count if nll_count else float("nan"), "mse": sq_sum / steps}


@pytest.fixture()
def dataset():
    return Dataset.from_list(ROWS)


# -- data ------------------------------------------------------------------------------------------------
def test_tokenized_rows_and_collated_batch(tiny_tokenizer, dataset):
    tokenized = tokenize_values_dataset(dataset, tiny_tokenizer)
    assert tokenized.column_names == ["step_values", "correct", "input_ids", "completion_mask", "step_ends"]
    good, bad, partial = (tokenized[i] for i in range(3))
    eos = tiny_tokenizer.eos_token_id
    assert good["input_ids"][-1] == eos and bad["input_ids"][-1] == eos  # complete solutions end
    assert partial["input_ids"][-1] != eos
    assert partial["input_ids"] == good["input_ids"][: len(partial["input_ids"])]
    assert good["step_ends"] == [partial["step_ends"][0], len(good["input_ids"]) - 2]  # the last before EOS
    assert tiny_tokenizer.decode(good["input_ids"][: good["step_ends"][0] + 1]).endswith("</step>\n")

    batch = ValueSFTCollator(tiny_tokenizer.pad_token_id)([good, bad, partial])
    T = max(len(r["input_ids"]) for r in (good, bad, partial))
    assert batch["input_ids"].shape == (3, T)
    assert batch["attention_mask"][2].sum() == len(partial["input_ids"])  # right padding
    assert batch["input_ids"][2, -1] == tiny_tokenizer.pad_token_id
    # NLL labels on model-written tokens of the correct solution only
    expected = torch.tensor(good["input_ids"]).masked_fill(
        ~torch.tensor(good["completion_mask"]).bool(), -100
    )
    assert torch.equal(batch["labels"][0, : len(expected)], expected)
    assert torch.all(batch["labels"][0, len(expected) :] == -100)
    assert torch.all(batch["labels"][1:] == -100)
    assert batch["step_ends"].tolist() == [good["step_ends"], bad["step_ends"], [partial["step_ends"][0], 0]]
    assert batch["step_mask"].tolist() == [[True, True], [True, True], [True, False]]
    torch.testing.assert_close(batch["step_values"], torch.tensor([[0.6, 1.0], [0.0, -1.0], [-0.4, 0.0]]))


def test_max_length_cuts_steps_and_labels(tiny_tokenizer, dataset):
    full = tokenize_values_dataset(dataset, tiny_tokenizer)[0]
    cut = full["step_ends"][0] + 3
    row = tokenize_values_dataset(dataset, tiny_tokenizer, max_length=cut)[0]
    assert row["input_ids"] == full["input_ids"][:cut]
    assert row["step_ends"] == full["step_ends"][:1] and row["step_values"] == [0.6]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step_values": [0.5]}, r"row 1 \(id='bad'\): column 'step_values' has 1 labels but 'steps' has 2"),
        (
            {"step_values": [0.5, 1.5]},
            r"row 1 \(id='bad'\): column 'step_values'\[1\] = 1.5 is outside \[-1, 1\]",
        ),
        ({"steps": [], "step_values": []}, r"row 1 \(id='bad'\): column 'steps' is empty"),
        ({"steps": ["  ", CODE_STEP]}, r"row 1 \(id='bad'\): column 'steps'\[0\] is empty"),
        ({"steps": [CODE_STEP, ""]}, r"row 1 \(id='bad'\): column 'steps'\[1\] is empty"),
    ],
)
def test_bad_rows_are_named(tiny_tokenizer, change, message):
    rows = [ROWS[0], {**ROWS[1], **change}]
    with pytest.raises(ValueError, match=message):
        tokenize_values_dataset(Dataset.from_list(rows), tiny_tokenizer)


def test_missing_columns_are_named(tiny_tokenizer):
    rows = [{k: v for k, v in ROWS[0].items() if k != "step_values"}]
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['step_values'\]"):
        tokenize_values_dataset(Dataset.from_list(rows), tiny_tokenizer)


def test_config_defaults_are_the_papers(tmp_path):
    args = ValueSFTConfig(output_dir=str(tmp_path))
    assert args.mse_weight == 0.01 and args.learning_rate == 2e-5 and args.num_train_epochs == 10
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 0.03
    assert args.get_warmup_steps(1000) == 30
    with pytest.raises(ValueError, match="mse_weight"):
        ValueSFTConfig(output_dir=str(tmp_path), mse_weight=-1)


# -- training --------------------------------------------------------------------------------------------
def test_trains_every_parameter_and_logs_hand_computed_terms(tiny_model, tiny_tokenizer, dataset, tmp_path):
    model = ValueHeadForCausalLM.from_causal_lm(tiny_model)
    initial = copy.deepcopy(model)
    expected = hand_computed_terms(initial, tiny_tokenizer, ROWS)
    trainer = ValueSFTTrainer(
        model, config(tmp_path, mse_weight=0.5), train_dataset=dataset, processing_class=tiny_tokenizer
    )
    trainer.train()

    first = trainer.state.log_history[0]
    assert first["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert first["mse"] == pytest.approx(expected["mse"], rel=1e-5)
    assert first["loss"] == pytest.approx(expected["nll"] + 0.5 * expected["mse"], rel=1e-5)
    # A new head is V = 0 everywhere: every pair of differently labelled step ends is a tie
    assert first["value_ranking_accuracy"] == pytest.approx(0.5)
    for entry in trainer.state.log_history[:-1]:
        assert torch.isfinite(torch.tensor(entry["loss"]))

    before = dict(initial.named_parameters())
    for name, param in model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not move"


def test_ranking_accuracy_by_hand(tiny_model, tiny_tokenizer, dataset, tmp_path):
    model = randomize_value_head(ValueHeadForCausalLM.from_causal_lm(tiny_model))
    trainer = ValueSFTTrainer(
        model,
        config(tmp_path, per_device_eval_batch_size=2),
        eval_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    metrics = trainer.evaluate()  # two micro-batches (rows 1-2, row 3): the metric is per micro-batch
    values = []
    with torch.no_grad():
        for row in ROWS[:2]:
            complete = DEFAULT_FORMAT.parse(row["steps"][-1]).kind == "answer"
            tok = tokenize_solution(tiny_tokenizer, row["prompt"], row["steps"], add_eos=complete)
            out = model(torch.tensor([tok.input_ids]))
            values += [(out.values[0, end].item(), y) for end, y in zip(tok.step_ends, row["step_values"])]
    pairs = [(a, b) for a in values for b in values if a[1] > b[1]]  # labels .6, 1, 0, -1: 6 ordered pairs
    wins = sum(1.0 if a[0] > b[0] else 0.5 if a[0] == b[0] else 0.0 for a, b in pairs)
    # The second micro-batch has one step end: no pair, no entry, so the mean is the first batch's
    assert len(pairs) == 6 and metrics["eval_value_ranking_accuracy"] == pytest.approx(wins / 6)
    assert value_ranking_accuracy(
        torch.tensor([[0.1, 0.9, -0.5]]), torch.tensor([[1.0, -1.0, -1.0]]), torch.tensor([[1, 1, 1]])
    ) == pytest.approx(0.5)  # 1 > -1: right against -0.5, wrong against 0.9
    assert torch.isnan(value_ranking_accuracy(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)))


def test_gradient_accumulation_normalises_nll_over_the_whole_batch(tiny_model, tiny_tokenizer, tmp_path):
    model = ValueHeadForCausalLM.from_causal_lm(tiny_model)
    rows = ROWS[:2]  # one correct, one incorrect: two micro-batches of one solution
    good, bad = (hand_computed_terms(copy.deepcopy(model), tiny_tokenizer, [row]) for row in rows)
    args = config(
        tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1, mse_weight=0.5
    )
    trainer = ValueSFTTrainer(
        model, args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer
    )
    trainer.train()
    # All NLL tokens are the correct solution's: its full NLL, not half of it; the MSE is the mean of the two
    expected = good["nll"] + 0.5 * (good["mse"] + bad["mse"]) / 2
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_zero_mse_weight_removes_the_value_term(tiny_model, tiny_tokenizer, dataset, tmp_path):
    model = ValueHeadForCausalLM.from_causal_lm(tiny_model)
    head = copy.deepcopy(model.v_head)
    trainer = ValueSFTTrainer(
        model, config(tmp_path, mse_weight=0.0), train_dataset=dataset, processing_class=tiny_tokenizer
    )
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(first["nll"], rel=1e-6)  # still logged, not in the loss
    assert first["mse"] > 0
    assert torch.equal(model.v_head.weight, head.weight) and torch.equal(model.v_head.bias, head.bias)
    assert model.v_head.weight.grad is None or torch.all(model.v_head.weight.grad == 0)


def test_incorrect_solutions_give_no_nll(tiny_model, tiny_tokenizer, tmp_path):
    model = ValueHeadForCausalLM.from_causal_lm(tiny_model)
    initial = copy.deepcopy(model)
    rows = ROWS[1:]  # incorrect ones only
    expected = hand_computed_terms(initial, tiny_tokenizer, rows)
    trainer = ValueSFTTrainer(
        model,
        config(tmp_path, mse_weight=1.0),
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    first = trainer.state.log_history[0]
    assert "nll" not in first
    assert first["loss"] == pytest.approx(expected["mse"], rel=1e-5)
    # The LM head only feeds the NLL: untouched; the value head and the shared backbone learn
    assert torch.equal(model.lm_head.weight, initial.lm_head.weight)
    assert not torch.equal(model.v_head.weight, initial.v_head.weight)
    assert not torch.equal(
        model.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight
    )


def test_save_and_load_after_training(tiny_model, tiny_tokenizer, dataset, tmp_path):
    trainer = ValueSFTTrainer(
        tiny_model, config(tmp_path), train_dataset=dataset, processing_class=tiny_tokenizer
    )
    assert isinstance(trainer.model, ValueHeadForCausalLM)  # a plain causal LM was given a head
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = ValueHeadForCausalLM.from_pretrained(tmp_path / "final")
    ids = torch.tensor([tokenize_values_dataset(dataset, tiny_tokenizer)[0]["input_ids"]])
    trained = trainer.model
    trained.eval()
    # Exact: the checkpoint restores every tensor bit for bit, the trained head included.
    saved, restored = trained.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    # Exact: the same tensors in memory torch allocated (64-byte aligned, as the trained model's) compute
    # the same function.
    realigned = copy.deepcopy(loaded)
    with torch.no_grad():
        expected, again, out = trained(ids), realigned(ids), loaded(ids)
    assert torch.equal(again.values, expected.values) and torch.equal(again.logits, expected.logits)
    # Tolerant: from_pretrained leaves the tensors as views into the memory-mapped safetensors file, and
    # v_head.weight sits right after the 4-byte v_head.bias there, off the alignment of torch's own
    # allocations. The CPU GEMM (MKL / oneDNN) takes another code path for an unaligned operand and sums in
    # another order: V differed in the last bit (3e-8) on some runs. The math is the same, the bits need not be.
    torch.testing.assert_close(out.values, expected.values, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-5)


def test_evaluate_reports_the_terms(tiny_model, tiny_tokenizer, dataset, tmp_path):
    model = ValueHeadForCausalLM.from_causal_lm(tiny_model)
    expected = hand_computed_terms(copy.deepcopy(model), tiny_tokenizer, ROWS)
    trainer = ValueSFTTrainer(
        model,
        config(tmp_path, per_device_eval_batch_size=3),
        eval_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert metrics["eval_mse"] == pytest.approx(expected["mse"], rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(expected["nll"] + 0.01 * expected["mse"], rel=1e-5)


def test_lora_trains_adapter_and_head(tiny_model, tiny_tokenizer, dataset, tmp_path):
    from peft import LoraConfig

    model = ValueHeadForCausalLM.from_causal_lm(tiny_model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["v_head"]
    )
    trainer = ValueSFTTrainer(
        model,
        config(tmp_path, mse_weight=1.0),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
        peft_config=peft_config,
    )
    trainable = {n: p.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in trainable) and any("v_head.modules_to_save" in n for n in trainable)
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, trainable[name]), f"{name} did not move"
    for key, value in trainer.model.get_base_model().state_dict().items():
        if "lora_" in key or "modules_to_save" in key:
            continue
        original = key.replace(".base_layer", "").replace("v_head.original_module.", "v_head.")
        assert torch.equal(value, base[original]), f"{key} moved"


# -- training at scale: memory, attention, bf16 -----------------------------------------------------------
def test_gradient_checkpointing_recomputes_and_gives_the_same_loss(tiny_tokenizer, dataset, tmp_path):
    runs = {}
    for checkpointing in (False, True):
        model = ValueHeadForCausalLM.from_causal_lm(tiny_llama(tiny_tokenizer, seed=0))
        before = copy.deepcopy(model)
        calls = count_forwards(model.model.layers[0].mlp)
        trainer = ValueSFTTrainer(
            model,
            config(tmp_path, gradient_checkpointing=checkpointing, max_steps=3),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
        trainer.train()
        initial = dict(before.named_parameters())
        assert [n for n, p in model.named_parameters() if torch.equal(p, initial[n])] == []
        runs[checkpointing] = trainer.state.log_history[0], len(calls)
    (plain, plain_calls), (checkpointed, checkpointed_calls) = runs[False], runs[True]
    assert (plain_calls, checkpointed_calls) == (3, 6)  # one forward a step, plus its recomputation
    for key in ("loss", "nll", "mse"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-6), key


@pytest.fixture()
def plain_checkpoint(tiny_model, tiny_tokenizer, tmp_path):
    path = tmp_path / "sft"
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def _script_args(path: str, **kwargs):
    from svpo_trl.pipeline import TrainScriptArguments

    return TrainScriptArguments(model_name_or_path=path, annotation_dir="unused", **kwargs)


def test_attn_implementation_reaches_the_model_and_sdpa_equals_eager(
    tiny_tokenizer, dataset, tmp_path, plain_checkpoint
):
    from svpo_trl.pipeline import _load_trainable

    losses, head = {}, None
    for implementation in ("eager", "sdpa"):
        model, _ = _load_trainable(_script_args(plain_checkpoint, attn_implementation=implementation))
        assert model.config._attn_implementation == implementation
        if head is None:
            head = copy.deepcopy(model.v_head.state_dict())
        model.v_head.load_state_dict(head)  # the checkpoint has no head: give both the same fresh one
        trainer = ValueSFTTrainer(
            model, config(tmp_path), train_dataset=dataset, processing_class=tiny_tokenizer
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
        losses[implementation] = trainer.compute_loss(model, batch).item()
    assert losses["sdpa"] == pytest.approx(losses["eager"], rel=1e-5)


def test_flash_attention_without_flash_attn_names_the_extra(plain_checkpoint):
    from svpo_trl.pipeline import _load_trainable

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    with pytest.raises(ImportError, match=r"pip install 'svpo_trl\[flash-attn\]'"):
        _load_trainable(_script_args(plain_checkpoint, attn_implementation="flash_attention_2"))


def test_bf16_autocast_trains_saves_and_keeps_values_fp32(tiny_tokenizer, dataset, tmp_path):
    logs = {}
    for bf16 in (False, True):
        model = ValueHeadForCausalLM.from_causal_lm(tiny_llama(tiny_tokenizer, seed=0))
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = ValueSFTTrainer(
            model,
            config(tmp_path / str(bf16), bf16=bf16, mse_weight=1.0),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
        trainer.train()
        logs[bf16] = trainer.state.log_history[0]
    assert [n for n, p in model.named_parameters() if torch.equal(p, initial[n])] == []
    # Autocast ran the backbone in bf16 (the loss moved a little) around fp32 weights, and the head in fp32
    assert logs[True]["loss"] != logs[False]["loss"]
    for key in ("loss", "nll", "mse"):
        assert logs[True][key] == pytest.approx(logs[False][key], rel=2e-2), key
    assert model.dtype == torch.float32 and model.last_values.dtype == torch.float32

    trainer.save_model(str(tmp_path / "saved"))
    loaded = ValueHeadForCausalLM.from_pretrained(tmp_path / "saved")
    assert loaded.config.has_value_head and loaded.dtype == torch.float32
    assert torch.equal(loaded.v_head.weight, model.v_head.weight)
    assert torch.equal(loaded.v_head.bias, model.v_head.bias)


def test_a_new_value_head_starts_at_zero_whatever_the_seed(plain_checkpoint):
    from svpo_trl.pipeline import _load_trainable

    def head(seed: int):
        model, _ = _load_trainable(_script_args(plain_checkpoint), seed)
        assert model.value_head_loaded is False
        return model.v_head.weight.detach().clone()

    first, other = head(3), head(4)
    # The same new head on every run and every process of a distributed run: V = 0 until trained.
    assert torch.equal(first, other) and torch.all(first == 0)
