"""Value pre-training via SFT (paper §3.2 "Pre-Training", Eq. 7; Appendix A.1, A.3).

The policy and the value head share weights, so pre-training is multi-task::

    L = L_SFT + mse_weight · E[(V_φ(s_{t+1}) − V̂(s_{t+1}))²]        V̂ = R if the step is terminal, else Q

on the ``values`` dataset (DESIGN.md). ``L_SFT`` is the NLL of the model-written tokens of correct
solutions; incorrect solutions enter the value term only (no NLL: the policy must not imitate them; the
value gradient still reaches the shared backbone, as in the paper's weight-sharing design). V is read at
the last token of each step (A.3).

The forward goes through TRL's fused LM head (``add_fused_lm_head``): per-token log-probabilities are
computed in tiles without the ``(B, T, vocab)`` logits, and the values come from the same forward via
:attr:`ValueHeadForCausalLM.last_values`.

Metrics (per logging window, averaged over micro-batches and processes): ``nll``, ``mse``,
``value_ranking_accuracy``: over every pair of step ends in the micro-batch whose labels differ, how often
V orders them as the labels do (ties half; 0.5 is chance). A sign accuracy would say little: with most
labels negative, a head that outputs -0.1 everywhere scores the share of negative labels.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import torch
from datasets import Dataset
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Trainer
from trl.trainer.utils import add_fused_lm_head

from ..models.value_head import ValueHeadForCausalLM
from ..steps import DEFAULT_FORMAT, StepFormat
from .data_utils import TOKENIZED_COLUMNS, ValueSFTCollator, tokenize_values_dataset
from .losses import value_mse
from .value_sft_config import ValueSFTConfig
from .zero3 import warn_if_save_has_no_weights


def value_ranking_accuracy(values: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pairwise ranking accuracy of V against its labels (for ±1 labels, the AUC).

    Over every pair (i, j) of real entries with ``labels[i] > labels[j]``, the share with
    ``values[i] > values[j]``, ties counting half. NaN when all labels are equal.
    """
    v, y = values[mask.bool()].float(), labels[mask.bool()].float()
    higher = y[:, None] > y[None, :]
    if not higher.any():
        return torch.tensor(float("nan"), device=values.device)
    wins = (v[:, None] > v[None, :]).float() + 0.5 * (v[:, None] == v[None, :]).float()
    return (wins * higher).sum() / higher.sum()


def value_sft_terms(
    log_probs: torch.Tensor,
    label_mask: torch.Tensor,
    values: torch.Tensor,
    step_ends: torch.Tensor,
    step_values: torch.Tensor,
    step_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The two terms of Eq. 7 and the sign accuracy, reduced over a batch.

    Args:
        log_probs: ``(B, T-1)`` log-probability of each next token (0 where not trained).
        label_mask: ``(B, T-1)`` which next tokens the NLL covers (model-written, correct solutions).
        values: ``(B, T)`` value-head outputs.
        step_ends, step_values, step_mask: ``(B, S)`` step-end positions, their labels, real entries.

    Returns:
        ``nll`` (mean over covered tokens; 0 with none), ``mse`` (mean over real step ends; 0 with none),
        ``value_ranking_accuracy`` (see :func:`value_ranking_accuracy`), and the counts ``num_nll_tokens``,
        ``num_steps``.
    """
    num_tokens = label_mask.sum()
    nll = -(log_probs * label_mask).sum() / num_tokens.clamp(min=1)
    step_v = values.gather(1, step_ends).float()
    squared = value_mse(step_v, step_values)
    num_steps = step_mask.sum()
    mse = (squared * step_mask).sum() / num_steps.clamp(min=1)
    return {
        "nll": nll,
        "mse": mse,
        "value_ranking_accuracy": value_ranking_accuracy(step_v.detach(), step_values, step_mask),
        "num_nll_tokens": num_tokens,
        "num_steps": num_steps,
    }


class ValueSFTTrainer(Trainer):
    """Trainer for Eq. 7: SFT NLL on correct solutions + ``mse_weight`` × value MSE at step ends.

    Args:
        model: a :class:`ValueHeadForCausalLM`, a plain causal LM (given a fresh value head, in place), or a
            model id / path (loaded with ``ValueHeadForCausalLM.from_pretrained``).
        args: a :class:`ValueSFTConfig` (paper defaults).
        train_dataset, eval_dataset: ``values`` datasets (``prompt, steps, step_values, correct``, optional
            ``id``); validated and tokenized here, with errors naming the row and column.
        processing_class: the tokenizer (loaded from ``model`` when omitted); needs a pad or EOS token.
        peft_config: optional PEFT config; include ``modules_to_save=["v_head"]`` to train the head.
        step_format: the step format (decides whether a solution is complete, i.e. ends with EOS).

    Example::

        trainer = ValueSFTTrainer(model, ValueSFTConfig(output_dir="out"), train_dataset=values,
                                  processing_class=tokenizer)
        trainer.train()
    """

    _tag_names: ClassVar[list[str]] = ["trl", "svpo", "value-sft"]

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: ValueSFTConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any | None = None,
        step_format: StepFormat = DEFAULT_FORMAT,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = ValueSFTConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1] or 'model'}-ValueSFT")
        if isinstance(model, str):
            model = ValueHeadForCausalLM.from_pretrained(model)
        elif _is_peft_model(model):
            if not isinstance(model.get_base_model(), ValueHeadForCausalLM):
                raise TypeError(
                    "A PEFT `model` must wrap a ValueHeadForCausalLM (with 'v_head' in modules_to_save)"
                )
        elif not isinstance(model, ValueHeadForCausalLM):
            model = ValueHeadForCausalLM.from_causal_lm(model)
        # Log-probs without materialising the logits; values come from the same backbone pass (hook)
        add_fused_lm_head(model.get_base_model() if _is_peft_model(model) else model)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)

        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(_value_model(model).config._name_or_path)
        pad_token_id = processing_class.pad_token_id
        if pad_token_id is None:
            pad_token_id = processing_class.eos_token_id
        if pad_token_id is None:
            raise ValueError("processing_class has neither pad_token_id nor eos_token_id to pad with")

        def prepare(dataset):
            return tokenize_values_dataset(
                dataset,
                processing_class,
                max_length=args.max_length,
                step_format=step_format,
                num_proc=args.dataset_num_proc,
            )

        if train_dataset is not None:
            train_dataset = prepare(train_dataset)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: prepare(v) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = prepare(eval_dataset)

        super().__init__(
            model=model,
            args=args,
            data_collator=ValueSFTCollator(pad_token_id),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        warn_if_save_has_no_weights(self.accelerator)
        # Trainer then counts the NLL tokens of the whole accumulated batch (`num_items_in_batch`), and
        # compute_loss scales both terms for gradient accumulation itself
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def _set_signature_columns_if_needed(self) -> None:
        # Keep exactly the tokenized columns, whatever `remove_unused_columns` says
        if self._signature_columns is None:
            self._signature_columns = list(TOKENIZED_COLUMNS)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ):
        """Eq. 7: ``nll + mse_weight · mse`` (the MSE term is left out entirely when its weight is 0).

        In training, the NLL is summed over tokens and divided by the NLL-token count of the whole
        accumulated batch (all micro-batches and processes: TRL's SFT normalisation), so a micro-batch of
        incorrect solutions does not dilute it; the MSE is the micro-batch mean divided by the
        accumulation steps (a mean of micro-batch means). In evaluation both are micro-batch means.
        """
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=inputs["labels"],
            fused_lm_head=True,
        )
        values = _value_model(model).last_values
        terms = value_sft_terms(
            outputs.log_probs,
            outputs.label_mask,
            values,
            inputs["step_ends"],
            inputs["step_values"],
            inputs["step_mask"],
        )
        nll, mse = terms["nll"], terms["mse"]
        steps = getattr(self, "current_gradient_accumulation_steps", 1)
        if model.training and num_items_in_batch is not None:
            # A batch of incorrect solutions only has no NLL tokens at all: 0 / 1, not 0 / 0
            count = (
                num_items_in_batch.clamp(min=1)
                if torch.is_tensor(num_items_in_batch)
                else max(num_items_in_batch, 1)
            )
            nll = -(outputs.log_probs * outputs.label_mask).sum() / count
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                nll = nll * self.accelerator.num_processes  # DDP averages gradients over processes
            mse = mse / steps
        elif model.training:
            nll, mse = (
                nll / steps,
                mse / steps,
            )
        loss = nll
        if self.args.mse_weight != 0:
            loss = loss + self.args.mse_weight * mse

        mode = "train" if self.model.training else "eval"
        self._record_metrics(mode, terms)
        return (loss, outputs) if return_outputs else loss

    def _record_metrics(self, mode: str, terms: dict[str, torch.Tensor]) -> None:
        gather = self.accelerator.gather_for_metrics
        nan = torch.tensor(float("nan"), device=terms["nll"].device)
        # A micro-batch without correct solutions (or without labels) has no NLL (MSE) to report
        nll = terms["nll"].detach() if terms["num_nll_tokens"] > 0 else nan
        mse = terms["mse"].detach() if terms["num_steps"] > 0 else nan
        for name, value in (
            ("nll", nll),
            ("mse", mse),
            ("value_ranking_accuracy", terms["value_ranking_accuracy"]),
        ):
            gathered = gather(value.float().reshape(1))
            if not torch.isnan(gathered).all():
                self._metrics[mode][name].append(gathered.nanmean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        # Put the Eq. 7 terms in evaluate()'s return value too, not only in the logs
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        prefix = metric_key_prefix
        for key, val in self._metrics["eval"].items():
            if val:
                output.metrics[f"{prefix}_{key}"] = sum(val) / len(val)
        self._metrics["eval"].clear()
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(val) / len(val) for key, val in self._metrics[mode].items() if val}
        if mode == "eval":
            metrics = {f"eval_{key}": val for key, val in metrics.items()}
        logs = {**logs, **metrics}
        super().log(logs, start_time)
        self._metrics[mode].clear()


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _value_model(model: nn.Module) -> ValueHeadForCausalLM:
    """The ValueHeadForCausalLM inside accelerate / DDP / PEFT wrappers."""
    while not isinstance(model, ValueHeadForCausalLM):
        if hasattr(model, "module"):
            model = model.module
        elif _is_peft_model(model):
            model = model.get_base_model()
        else:
            raise TypeError(f"no ValueHeadForCausalLM inside {type(model).__name__}")
    return model
