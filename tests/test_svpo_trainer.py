"""SVPOTrainer (Eq. 8-10 + SFT + MSE) on a tiny Llama: data preparation, loss, training, saving, PEFT."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from svpo_trl.models.value_head import ValueHeadForCausalLM
from svpo_trl.steps import DEFAULT_FORMAT
from svpo_trl.tokenization import tokenize_solution
from svpo_trl.toy import tiny_llama
from svpo_trl.trainer.losses import svpo_loss_terms, value_mse
from svpo_trl.trainer.svpo_config import RECIPES, SVPOConfig
from svpo_trl.trainer.svpo_trainer import (
    VALUE_KEYS,
    DataCollatorForStepPreference,
    SVPOTrainer,
    _tokenize_row,
    tokenize_step_pair,
)

from conftest import FIGURE5_QUESTION, FIGURE5_STEPS, count_forwards

FMT = DEFAULT_FORMAT
PROMPT = FMT.prompt(FIGURE5_QUESTION)
CODE_OK = FIGURE5_STEPS[0]
ANSWER_OK = FIGURE5_STEPS[1]
CODE_BAD = FMT.render_code_step("I add the growth rate once.", "print(20 + 3)", "23")
CODE_BAD2 = FMT.render_code_step("Multiply height by years.", "print(20 * 10)", "200")
ANSWER_BAD = FMT.render_answer_step("Haley will be 30 inches tall.", "30")
ANSWER_BAD2 = FMT.render_answer_step("So the height is 23.", "23")


def _pairs_rows() -> list[dict]:
    """A hand-made `pairs` dataset: sibling pairs at depth 1 and 2, a cousin and a cross-level terminal pair."""
    rows = [
        ("sibling", CODE_OK, CODE_BAD, 0.6, -0.4),
        ("sibling", CODE_OK + ANSWER_OK, CODE_OK + ANSWER_BAD, 1.0, -1.0),
        ("cousin", CODE_OK + ANSWER_OK, CODE_BAD + ANSWER_BAD2, 1.0, -1.0),
        ("terminal", CODE_OK + ANSWER_OK, CODE_BAD2, 1.0, -0.2),
    ]
    return [
        {
            "id": f"q{i}",
            "prompt": PROMPT,
            "chosen": chosen,
            "rejected": rejected,
            "chosen_value": cv,
            "rejected_value": rv,
            "pair_type": kind,
            "tree_index": 0,
            "chosen_node_id": 2 * i + 1,
            "rejected_node_id": 2 * i + 2,
        }
        for i, (kind, chosen, rejected, cv, rv) in enumerate(rows)
    ]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The tiny models gain nothing from intra-op threads, and threads thrash when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def pairs() -> Dataset:
    return Dataset.from_list(_pairs_rows())


def _config(tmp_path, **kwargs) -> SVPOConfig:
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "per_device_train_batch_size": 4,
        "max_steps": 3,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "gradient_checkpointing": False,
        "seed": 0,
        "disable_tqdm": True,
    }
    return SVPOConfig(**{**defaults, **kwargs})


def _trainer(tokenizer, tmp_path, dataset, model=None, **kwargs) -> SVPOTrainer:
    peft_config = kwargs.pop("peft_config", None)
    model = model if model is not None else tiny_llama(tokenizer, seed=0)
    return SVPOTrainer(
        model,
        args=_config(tmp_path, **kwargs),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _batch(trainer, n: int = 4) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


# ---------------------------------------------------------------------------------------------- data


def test_sibling_pair_moves_shared_steps_into_prompt_exactly(tiny_tokenizer):
    out = tokenize_step_pair(tiny_tokenizer, PROMPT, [CODE_OK, ANSWER_OK], [CODE_OK, ANSWER_BAD])
    assert out["prompt_ids"] == tokenize_solution(tiny_tokenizer, PROMPT, [CODE_OK], add_eos=False).input_ids
    eos = tiny_tokenizer.eos_token_id
    # Both sides are complete solutions (answer steps): the last step's tokens, then EOS.
    for side, step in (("chosen", ANSWER_OK), ("rejected", ANSWER_BAD)):
        step_ids = tiny_tokenizer(step, add_special_tokens=False)["input_ids"]
        assert out[f"{side}_ids"] == [*step_ids, eos]
        assert out[f"{side}_mask"] == [1] * (len(step_ids) + 1)
        assert out[f"{side}_value_index"] == len(step_ids) - 1  # last token of the step, not the EOS
    assert tiny_tokenizer.decode(out["prompt_ids"]) == PROMPT + CODE_OK


def test_partial_code_steps_get_no_eos_and_mask_the_output_block(tiny_tokenizer):
    out = tokenize_step_pair(tiny_tokenizer, PROMPT, [CODE_OK], [CODE_BAD])
    assert out["prompt_ids"] == tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    for side, step in (("chosen", CODE_OK), ("rejected", CODE_BAD)):
        ids, mask = out[f"{side}_ids"], out[f"{side}_mask"]
        assert tiny_tokenizer.eos_token_id not in ids
        assert tiny_tokenizer.decode(ids) == step
        model_written = tiny_tokenizer.decode([t for t, m in zip(ids, mask) if m])
        environment = tiny_tokenizer.decode([t for t, m in zip(ids, mask) if not m])
        assert model_written == step[: step.index("</code>") + len("</code>")]
        assert environment.startswith("\n<output>") and environment.endswith("</output>\n</step>\n")
        assert out[f"{side}_value_index"] == len(ids) - 1


def test_rejected_ending_in_an_unclosed_step_is_a_valid_negative(tiny_tokenizer, tmp_path):
    # A search node cut by the token limit has no </step>: it is still the last step of its path.
    truncated = "<step>\n<p>\nMultiply\n</p>\n<code>\n```python\nprint(2 *\n"
    row = {"prompt": PROMPT, "chosen": CODE_OK, "rejected": CODE_OK + truncated, "chosen_value": 0.5}
    out = _tokenize_row(
        {**row, "rejected_value": -1.0},
        0,
        tokenizer=tiny_tokenizer,
        step_format=DEFAULT_FORMAT,
        with_labels=True,
    )
    assert tiny_tokenizer.decode(out["rejected_ids"]) == CODE_OK + truncated
    assert tiny_tokenizer.eos_token_id not in out["rejected_ids"]
    assert out["rejected_value_index"] == len(out["rejected_ids"]) - 1


def test_cousin_pair_shares_no_step_and_keeps_one_step_per_side(tiny_tokenizer):
    cousin = tokenize_step_pair(tiny_tokenizer, PROMPT, [CODE_OK, ANSWER_OK], [CODE_BAD, ANSWER_BAD2])
    assert cousin["prompt_ids"] == tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    # Identical sides still keep their last step as the completion.
    same = tokenize_step_pair(tiny_tokenizer, PROMPT, [CODE_OK, ANSWER_OK], [CODE_OK, ANSWER_OK])
    assert same["chosen_ids"] == same["rejected_ids"] and len(same["chosen_ids"]) > 1


def test_collator_positions_and_labels():
    collator = DataCollatorForStepPreference(pad_token_id=0)
    examples = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10], "chosen_mask": [1, 0, 0],
         "rejected_mask": [1], "chosen_value_index": 2, "rejected_value_index": 0, "chosen_value": 0.5,
         "rejected_value": -1.0},
        {"prompt_ids": [11], "chosen_ids": [12], "rejected_ids": [13, 14], "chosen_mask": [1],
         "rejected_mask": [1, 1], "chosen_value_index": 0, "rejected_value_index": 1, "chosen_value": 1.0,
         "rejected_value": 0.25},
    ]  # fmt: skip
    batch = collator(examples)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 9],
        [11, 12, 0, 0, 0],
        [5, 6, 10, 0, 0],
        [11, 13, 14, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["completion_mask"].tolist() == [
        [0, 0, 1, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 1, 1, 0, 0],
    ]
    assert batch["value_index"].tolist() == [4, 1, 2, 2]
    assert batch["value_labels"].tolist() == [0.5, 1.0, -1.0, 0.25]


def test_extra_columns_dropped_and_value_columns_survive(tiny_tokenizer, tmp_path, pairs):
    trainer = _trainer(tiny_tokenizer, tmp_path, pairs)
    loader = trainer.get_train_dataloader()
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", *VALUE_KEYS}
    expected = sorted([0.6, 1.0, 1.0, 1.0, -0.4, -1.0, -1.0, -0.2])
    assert sorted(batch["value_labels"].tolist()) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("chosen", "", "Row 2, column 'chosen': empty completion"),
        ("rejected", "   ", "Row 2, column 'rejected': empty completion"),
        ("chosen_value", 1.5, "Row 2, column 'chosen_value': value label 1.5 is outside [-1, 1]"),
        ("rejected_value", float("nan"), "Row 2, column 'rejected_value': value label nan is outside"),
        ("rejected", "junk" + CODE_BAD + ANSWER_BAD2, "Row 2, column 'rejected': text outside <step>"),
        (
            "chosen",
            "leading words" + CODE_OK + ANSWER_OK,
            "Row 2, column 'chosen': text outside <step>...</step> blocks",
        ),
    ],
)
def test_bad_rows_fail_early_naming_row_and_column(tiny_tokenizer, tmp_path, column, value, message):
    rows = _pairs_rows()
    rows[2][column] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        _trainer(tiny_tokenizer, tmp_path, Dataset.from_list(rows))


def test_missing_column_names_it(tiny_tokenizer, tmp_path, pairs):
    with pytest.raises(ValueError, match=r"no column\(s\) \['rejected_value'\]"):
        _trainer(tiny_tokenizer, tmp_path, pairs.remove_columns("rejected_value"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['chosen'\]"):
        _trainer(tiny_tokenizer, tmp_path, pairs.remove_columns("chosen"))
    # Without MSE the labels are optional (solution-level DPO on plain preference data).
    trainer = _trainer(
        tiny_tokenizer,
        tmp_path,
        pairs.remove_columns(["chosen_value", "rejected_value"]),
        mse_weight=0.0,
        max_steps=1,
    )
    trainer.train()
    assert "loss/mse" not in trainer.state.log_history[0]


def test_over_long_pairs_are_dropped(tiny_tokenizer, tmp_path, pairs):
    with pytest.warns(UserWarning, match="longer than max_length=140"):
        trainer = _trainer(tiny_tokenizer, tmp_path, pairs, max_length=140)
    lengths = [
        len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
        for r in trainer.train_dataset
    ]
    assert 0 < len(lengths) < 4 and max(lengths) <= 140


def test_unsupported_dpo_options_rejected(tiny_tokenizer, tmp_path, pairs):
    with pytest.raises(ValueError, match="loss_type"):
        _trainer(tiny_tokenizer, tmp_path, pairs, loss_type=["ipo"])


def test_recipes_and_paper_defaults(tmp_path):
    cfg = SVPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    paper = {"beta": 0.1, "margin": 0.5, "margin_weight": 0.25, "mse_weight": 0.25, "regularization_weight": 0.001,
             "sft_weight": 5.0, "learning_rate": 5e-6, "num_train_epochs": 1.0, "warmup_steps": 0.03}  # fmt: skip
    assert {k: getattr(cfg, k) for k in paper} == paper
    assert cfg.lr_scheduler_type == "cosine" and cfg.loss_type == ["sigmoid"]
    dpo = SVPOConfig.from_recipe("dpo", output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert (dpo.margin_weight, dpo.mse_weight, dpo.regularization_weight, dpo.sft_weight) == (0, 0, 0, 5.0)
    assert set(RECIPES) == {"svpo", "svpo_no_margin", "svpo_no_mse", "svpo_no_regularization", "dpo"}
    with pytest.raises(ValueError, match="Unknown SVPO recipe"):
        SVPOConfig.from_recipe("ppo", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="margin_weight must be >= 0"):
        SVPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, margin_weight=-1)


# ---------------------------------------------------------------------------------------------- loss


def _reference_terms(trainer: SVPOTrainer, batch: dict) -> dict[str, torch.Tensor]:
    """Every term recomputed independently: ordinary forwards (full logits, log_softmax), no fused head."""
    model = trainer.model
    ref = trainer.ref_model
    mask = batch["completion_mask"][:, 1:].float()
    targets = batch["input_ids"][:, 1:].unsqueeze(-1)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ref_out = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    token_logps = F.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, targets).squeeze(-1) * mask
    ref_logps = (
        F.log_softmax(ref_out.logits[:, :-1].float(), -1).gather(-1, targets).squeeze(-1) * mask
    ).sum(1)
    values = out.values[torch.arange(len(batch["value_index"])), batch["value_index"]]
    pc, pl = token_logps.sum(1).chunk(2)
    rc, rl = ref_logps.chunk(2)
    vc, vl = values.chunk(2)
    terms = {k: v.mean() for k, v in svpo_loss_terms(pc, pl, rc, rl, vc, vl, beta=0.1, margin=0.5).items()}
    chosen_mask = mask.chunk(2)[0]
    terms["sft"] = -(token_logps.chunk(2)[0] * chosen_mask).sum() / chosen_mask.sum()
    terms["mse"] = value_mse(values, batch["value_labels"]).mean()
    terms["values/accuracy"] = ((vc > vl).float() + 0.5 * (vc == vl).float()).mean()
    terms["rewards/accuracies"] = ((pc - rc) > (pl - rl)).float().mean()
    return terms


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    # A freshly initialised policy equals its reference; move it so that Δr_π ≠ 0.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def test_logged_terms_equal_independent_computation(tiny_tokenizer, tmp_path, pairs):
    trainer = _trainer(tiny_tokenizer, tmp_path, pairs)
    _perturb(trainer.model)
    batch = _batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    expected = _reference_terms(trainer, batch)
    for name in ("dpo", "margin", "regularization", "sft", "mse"):
        assert logged[f"loss/{name}"] == pytest.approx(expected[name].item(), rel=1e-4, abs=1e-6), name
    assert logged["values/accuracy"] == expected["values/accuracy"].item()
    assert logged["rewards/accuracies"] == expected["rewards/accuracies"].item()
    assert expected["regularization"] > 0 and expected["margin"] > 0  # the comparison is not vacuous
    weights = {"dpo": 1, "margin": 0.25, "regularization": 0.001, "sft": 5, "mse": 0.25}
    total = sum(w * expected[k] for k, w in weights.items())
    assert loss.item() == pytest.approx(total.item(), rel=1e-4)


@pytest.mark.parametrize("term", ["margin", "regularization", "sft", "mse"])
def test_zero_weight_removes_its_term(tiny_tokenizer, tmp_path, pairs, term):
    weight = 2.0  # a weight large enough to show above float32 rounding of the total loss
    full = _trainer(tiny_tokenizer, tmp_path, pairs, **{f"{term}_weight": weight})
    ablated = _trainer(tiny_tokenizer, tmp_path, pairs, **{f"{term}_weight": 0.0})
    for trainer in (full, ablated):
        _perturb(trainer.model)
        trainer.model.train()
    batch = _batch(full)
    loss_full = full.compute_loss(full.model, batch)
    loss_ablated = ablated.compute_loss(ablated.model, batch)
    logged_term = ablated._metrics["train"][f"loss/{term}"][-1]  # still logged, just not in the loss
    assert logged_term > 0
    assert (loss_full - loss_ablated).item() == pytest.approx(weight * logged_term, rel=1e-4)


def test_without_value_terms_the_value_head_gets_no_gradient(tiny_tokenizer, tmp_path, pairs):
    trainer = _trainer(tiny_tokenizer, tmp_path, pairs, margin_weight=0.0, mse_weight=0.0)
    _perturb(trainer.model)
    trainer.model.train()
    trainer.compute_loss(trainer.model, _batch(trainer)).backward()
    # The regularization term stops its gradient at Δr_φ, so the head is untouched...
    assert trainer.model.v_head.weight.grad is None or not trainer.model.v_head.weight.grad.any()
    assert trainer.model.lm_head.weight.grad.abs().sum() > 0
    trainer.model.zero_grad(set_to_none=True)
    # ...while the margin term alone trains it.
    trainer.args.margin_weight = 0.25
    trainer.compute_loss(trainer.model, _batch(trainer)).backward()
    assert trainer.model.v_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sft_weight", [0.0, 5.0])
def test_dpo_only_equals_trl_dpo_trainer_bit_for_bit(tiny_tokenizer, tmp_path, pairs, sft_weight):
    svpo = _trainer(
        tiny_tokenizer, tmp_path, pairs, margin_weight=0.0, mse_weight=0.0, regularization_weight=0.0,
        sft_weight=sft_weight,
    )  # fmt: skip
    policy = tiny_llama(tiny_tokenizer, seed=0)
    dpo_args = DPOConfig(
        output_dir=str(tmp_path / "dpo"), report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
        loss_type=["sigmoid", "sft"] if sft_weight else ["sigmoid"], loss_weights=[1.0, sft_weight] if sft_weight else None,
    )  # fmt: skip
    dpo = DPOTrainer(
        policy,
        ref_model=copy.deepcopy(policy),
        args=dpo_args,
        train_dataset=pairs.select_columns(["prompt", "chosen", "rejected"]),
        processing_class=tiny_tokenizer,
    )
    for trainer in (svpo, dpo):
        _perturb(trainer.model)
        trainer.model.train()
    batch = _batch(svpo)
    loss_svpo = svpo.compute_loss(svpo.model, batch)
    loss_dpo = dpo.compute_loss(dpo.model, {k: v for k, v in batch.items() if k not in VALUE_KEYS})
    assert torch.equal(loss_svpo, loss_dpo)
    loss_svpo.backward()
    loss_dpo.backward()
    torch.testing.assert_close(svpo.model.lm_head.weight.grad, dpo.model.lm_head.weight.grad, rtol=0, atol=0)
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "entropy", "mean_token_accuracy"):
        assert svpo._metrics["train"][key] == dpo._metrics["train"][key], key


# ---------------------------------------------------------------------------------------------- training


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_moves_every_parameter_including_v_head(tiny_tokenizer, tmp_path, pairs):
    trainer = _trainer(tiny_tokenizer, tmp_path, pairs)
    before = _snapshot(trainer.model)
    assert any("v_head" in n for n in before)
    ref_before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    for log in trainer.state.log_history[:-1]:
        assert torch.isfinite(torch.tensor(log["loss"]))
        for key in (
            "loss/dpo",
            "loss/margin",
            "loss/regularization",
            "loss/sft",
            "loss/mse",
            "values/accuracy",
        ):
            assert key in log
    not_moved = [
        n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])
    ]
    assert not_moved == []
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.ref_model.named_parameters())  # frozen


def test_save_and_load_restore_identical_outputs(tiny_tokenizer, tmp_path, pairs):
    trainer = _trainer(tiny_tokenizer, tmp_path, pairs, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded = ValueHeadForCausalLM.from_pretrained(str(tmp_path / "saved"))
    batch = _batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        a = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        b = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.values, b.values)
    # A checkpoint path works as `model` too (head restored), and evaluation logs every term.
    resumed = SVPOTrainer(
        str(tmp_path / "saved"),
        args=_config(tmp_path),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tiny_tokenizer,
    )
    assert torch.equal(resumed.model.v_head.weight, trainer.model.v_head.weight)
    metrics = resumed.evaluate()
    for key in ("eval_loss", "eval_loss/dpo", "eval_loss/margin", "eval_loss/mse", "eval_values/accuracy"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["eval_loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)  # policy == its own reference


def test_precompute_ref_log_probs(tiny_tokenizer, tmp_path, pairs):
    live = _trainer(tiny_tokenizer, tmp_path, pairs)
    pre = _trainer(tiny_tokenizer, tmp_path, pairs, precompute_ref_log_probs=True)
    assert pre.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(pre.train_dataset.column_names)
    batch = _batch(pre)
    assert "ref_chosen_logps" in batch
    live_ref = live.compute_ref_log_probs(live.ref_model, batch)
    torch.testing.assert_close(batch["ref_chosen_logps"], live_ref[0])
    torch.testing.assert_close(batch["ref_rejected_logps"], live_ref[1])
    pre.train()
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in pre.state.log_history[:-1])


def test_lora_with_value_head_trains(tiny_tokenizer, tmp_path, pairs):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["v_head"]
    )
    trainer = _trainer(tiny_tokenizer, tmp_path, pairs, peft_config=config)
    assert trainer.ref_model is None  # reference = adapter disabled
    before = _snapshot(trainer.model)
    assert any("v_head" in n for n in before) and any("lora_B" in n for n in before)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    not_moved = [
        n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])
    ]
    assert not_moved == []
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)
    log = trainer.state.log_history[-2]
    assert (
        torch.isfinite(torch.tensor(log["loss"])) and log["rewards/chosen"] != 0.0
    )  # policy left the reference


def test_every_term_reaches_tensorboard(tiny_tokenizer, tmp_path, pairs):
    """Issue 7 §3: each loss term, value accuracy and implicit-reward accuracy go through report_to."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(tiny_tokenizer, tmp_path, pairs, report_to="tensorboard")
    trainer.train()
    events = EventAccumulator(str(next(p for p in tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for term in ("dpo", "margin", "regularization", "sft", "mse"):
        assert f"train/loss/{term}" in tags
    assert {"train/values/accuracy", "train/rewards/accuracies"} <= tags
    first = trainer.state.log_history[0]
    assert events.Scalars("train/loss/margin")[0].value == pytest.approx(first["loss/margin"])


# ------------------------------------------------------------------ training at scale: memory, attention, bf16


def test_gradient_checkpointing_recomputes_and_gives_the_same_loss(tiny_tokenizer, tmp_path, pairs):
    runs = {}
    for checkpointing in (False, True):
        trainer = _trainer(tiny_tokenizer, tmp_path, pairs, gradient_checkpointing=checkpointing)
        calls = count_forwards(trainer.model.model.layers[0].mlp)  # the policy's, not the reference's
        before = _snapshot(trainer.model)
        trainer.train()
        not_moved = [n for n, p in trainer.model.named_parameters() if torch.equal(p, before[n])]
        assert not_moved == [], checkpointing
        runs[checkpointing] = trainer.state.log_history[0], len(calls)
    (plain, plain_calls), (checkpointed, checkpointed_calls) = runs[False], runs[True]
    assert (plain_calls, checkpointed_calls) == (3, 6)  # one forward a step, plus its recomputation
    for key in ("loss", "loss/dpo", "loss/mse", "values/chosen"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-6), key


@pytest.fixture()
def head_checkpoint(tiny_tokenizer, tmp_path):
    path = tmp_path / "checkpoint"
    ValueHeadForCausalLM.from_causal_lm(tiny_llama(tiny_tokenizer, seed=0)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def test_attn_implementation_reaches_both_models_and_sdpa_equals_eager(
    tiny_tokenizer, tmp_path, pairs, head_checkpoint
):
    losses = {}
    for implementation in ("eager", "sdpa"):
        args = _config(tmp_path, model_init_kwargs={"attn_implementation": implementation})
        trainer = SVPOTrainer(
            head_checkpoint, args=args, train_dataset=pairs, processing_class=tiny_tokenizer
        )
        assert trainer.model.config._attn_implementation == implementation
        assert trainer.ref_model.config._attn_implementation == implementation
        _perturb(trainer.model)  # policy ≠ reference, so that the DPO term depends on both forwards
        trainer.model.train()
        losses[implementation] = trainer.compute_loss(trainer.model, _batch(trainer)).item()
    assert losses["sdpa"] == pytest.approx(losses["eager"], rel=1e-5)


def test_flash_attention_without_flash_attn_names_the_extra(tiny_tokenizer, tmp_path, pairs, head_checkpoint):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    args = _config(tmp_path, model_init_kwargs={"attn_implementation": "flash_attention_2"})
    with pytest.raises(ImportError, match=r"pip install 'svpo_trl\[flash-attn\]'"):
        SVPOTrainer(head_checkpoint, args=args, train_dataset=pairs, processing_class=tiny_tokenizer)


def test_bf16_autocast_trains_saves_and_keeps_values_fp32(tiny_tokenizer, tmp_path, pairs):
    fp32 = _trainer(tiny_tokenizer, tmp_path, pairs, max_steps=1)
    fp32.train()
    trainer = _trainer(tiny_tokenizer, tmp_path, pairs, bf16=True)
    before = _snapshot(trainer.model)
    trainer.train()
    assert [n for n, p in trainer.model.named_parameters() if torch.equal(p, before[n])] == []
    # Autocast ran the backbone in bf16 (the loss moved a little) around fp32 weights, and the head in fp32
    expected, first = fp32.state.log_history[0], trainer.state.log_history[0]
    assert first["loss"] != expected["loss"]
    for key in ("loss", "loss/sft", "loss/mse", "values/chosen", "values/rejected"):
        assert first[key] == pytest.approx(expected[key], rel=2e-2, abs=2e-3), key
    assert trainer.model.dtype == torch.float32
    assert trainer.model.last_values.dtype == torch.float32

    trainer.save_model(str(tmp_path / "saved"))
    loaded = ValueHeadForCausalLM.from_pretrained(str(tmp_path / "saved"))
    assert loaded.config.has_value_head and loaded.dtype == torch.float32
    assert torch.equal(loaded.v_head.weight, trainer.model.v_head.weight)
    assert torch.equal(loaded.v_head.bias, trainer.model.v_head.bias)
