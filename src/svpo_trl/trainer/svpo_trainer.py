"""SVPO: step-level value preference optimization (paper §3.2, Eq. 8–10) as a subclass of TRL's ``DPOTrainer``.

What differs from ``DPOTrainer`` (everything else — reference model handling, PEFT, ``precompute_ref_log_probs``,
the fused LM head, logging, saving — is TRL's):

- **Data.** The ``pairs`` dataset (DESIGN.md): ``prompt, chosen, rejected, chosen_value, rejected_value`` (other
  columns such as ``id, pair_type, tree_index, chosen_node_id, rejected_node_id`` are tolerated and dropped).
  ``chosen`` / ``rejected`` are partial solutions from the root, concatenated steps in the step format. Each is
  split into steps and tokenized step by step (:func:`svpo_trl.tokenization.tokenize_solution`):

  * steps shared by chosen and rejected (their common step prefix, always leaving each side at least one
    step) move into the prompt. Their log-ratios would cancel in Δr_π anyway, so this is exact for the DPO
    term, and it is exact for sibling pairs, which differ in their last step only (§3.2);
  * a side ends with EOS only when its last step is an answer step (a complete solution); partial solutions
    get none;
  * **log-probabilities exclude the environment-written ``<output>`` blocks** (and the ``</step>`` after them),
    for DPO, the regularization and SFT alike: the policy does not write them, so they are not its actions;
  * the value of each side is read at the last token of its last step (Appendix A.3), not at the EOS.

- **Loss** (Eq. 10 + the pre-training loss of Eq. 7, weights from :class:`SVPOConfig`), from ONE forward pass:
  the same fused-LM-head forward that gives the policy log-probs also runs the value head
  (:attr:`ValueHeadForCausalLM.last_values`), so the value terms cost no extra forward::

      dpo + margin_weight·margin + regularization_weight·regularization + sft_weight·SFT + mse_weight·MSE

  ``dpo`` is computed exactly as TRL's ``sigmoid`` loss (bit-identical; with every other weight 0 the trainer
  equals ``DPOTrainer``). ``SFT`` is TRL's ``sft`` loss type: the NLL of the chosen completions' model-written
  tokens, averaged over all such tokens of the batch. ``MSE`` is the mean over the batch's 2B states of
  ``(V − label)²``. A weight of 0 leaves its term out of the loss; every term is still logged.

- **Metrics** (TRL's ``_metrics``, so ``report_to`` gets them): ``loss/dpo``, ``loss/margin``,
  ``loss/regularization``, ``loss/sft``, ``loss/mse`` (unweighted batch means), ``values/chosen``,
  ``values/rejected``, ``values/margins``, ``values/accuracy`` (the value head's pairwise ranking accuracy: share of pairs with V_c > V_l, ties
  half), plus TRL's
  ``rewards/*`` (``rewards/accuracies`` is the implicit-reward accuracy), ``logps/*``, ``logits/*``,
  ``entropy``, ``mean_token_accuracy``, ``num_tokens``.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOTrainer
from trl.trainer.utils import pad

from ..models.value_head import ValueHeadForCausalLM
from ..steps import DEFAULT_FORMAT, StepFormat
from ..tokenization import tokenize_solution
from .losses import svpo_loss_terms, value_margin, value_mse
from .svpo_config import SVPOConfig
from .zero3 import frozen_copy, warn_if_save_has_no_weights

# Keys the collator adds for the value terms; they are not model inputs.
VALUE_KEYS = ("value_index", "value_labels")
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *VALUE_KEYS}
_WHITESPACE = re.compile(r"\s+")


@dataclass
class DataCollatorForStepPreference(DataCollatorMixin):
    """Pads step-level preference examples into one batch of 2B sequences: the B chosen, then the B rejected.

    Like TRL's ``DataCollatorForPreference`` (right padding, same keys), except that ``completion_mask`` comes from
    the examples (``chosen_mask`` / ``rejected_mask``: 0 on environment-written ``<output>`` tokens) and that it
    adds ``value_index`` (2B,), the position in the padded batch of the token whose value is read, and
    ``value_labels`` (2B,), the Eq. 7 labels ``chosen_value`` then ``rejected_value``.

    It does not truncate: :class:`SVPOTrainer` drops over-long pairs when it prepares the dataset, because a
    truncated state has no value position.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences, masks, value_index, value_labels = [], [], [], []
        for side in ("chosen", "rejected"):
            for example in examples:
                prompt_len = len(example["prompt_ids"])
                sequences.append(torch.tensor(example["prompt_ids"] + example[f"{side}_ids"]))
                masks.append(torch.tensor([0] * prompt_len + list(example[f"{side}_mask"]), dtype=torch.long))
                value_index.append(prompt_len + example[f"{side}_value_index"])
                value_labels.append(example[f"{side}_value"])
        attention = [torch.ones(len(s), dtype=torch.long) for s in sequences]
        kwargs = {"padding_side": "right", "pad_to_multiple_of": self.pad_to_multiple_of}
        output = {
            "input_ids": pad(sequences, padding_value=self.pad_token_id, **kwargs),
            "attention_mask": pad(attention, padding_value=0, **kwargs),
            "completion_mask": pad(masks, padding_value=0, **kwargs),
            "value_index": torch.tensor(value_index, dtype=torch.long),
            "value_labels": torch.tensor(value_labels, dtype=torch.float32),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                output[key] = torch.tensor([example[key] for example in examples])
        return output


def tokenize_step_pair(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    chosen_steps: list[str],
    rejected_steps: list[str],
    *,
    step_format: StepFormat = DEFAULT_FORMAT,
) -> dict[str, Any]:
    """Tokenize one step-level preference pair; the common step prefix becomes part of the prompt.

    Returns ``prompt_ids``, ``{chosen,rejected}_ids``, ``{chosen,rejected}_mask`` (1 on model-written tokens) and
    ``{chosen,rejected}_value_index`` (index, within the completion, of the last token of the last step).
    """
    shared = 0
    while (
        shared < min(len(chosen_steps), len(rejected_steps)) - 1
        and chosen_steps[shared] == rejected_steps[shared]
    ):
        shared += 1
    prompt_ids = tokenize_solution(tokenizer, prompt, chosen_steps[:shared], add_eos=False).input_ids
    output: dict[str, Any] = {"prompt_ids": prompt_ids}
    for side, steps in (("chosen", chosen_steps), ("rejected", rejected_steps)):
        complete = step_format.parse(steps[-1]).kind == "answer"
        full = tokenize_solution(tokenizer, prompt, steps, add_eos=complete, step_format=step_format)
        # Step-wise tokenization makes the shared prefix's tokens identical on both sides.
        assert full.input_ids[: len(prompt_ids)] == prompt_ids
        output[f"{side}_ids"] = full.input_ids[len(prompt_ids) :]
        output[f"{side}_mask"] = full.completion_mask[len(prompt_ids) :]
        output[f"{side}_value_index"] = full.step_ends[-1] - len(prompt_ids)
    return output


def _split_checked(text: Any, row: int, column: str, step_format: StepFormat) -> list[str]:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"Row {row}, column {column!r}: empty completion ({text!r}); expected one or more steps."
        )
    steps = step_format.split_steps(text)
    # Only the last step of a path may be malformed (a malformed step is terminal, and a search keeps
    # it as a negative: even one that never opened a <step>); text around an earlier step means the
    # column is not a concatenation of steps.
    for step in steps[:-1]:
        if not (
            step.lstrip().startswith(step_format.step_open) and step.rstrip().endswith(step_format.step_close)
        ):
            raise ValueError(
                f"Row {row}, column {column!r}: text outside {step_format.step_open}...{step_format.step_close} "
                f"blocks in {step[:80]!r}...; chosen/rejected must be concatenated steps."
            )
    return steps


def _label_checked(value: Any, row: int, column: str) -> float:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Row {row}, column {column!r}: value label {value!r} is not a number in [-1, 1].")
    if not (-1.0 <= float(value) <= 1.0):  # also rejects NaN
        raise ValueError(f"Row {row}, column {column!r}: value label {value!r} is outside [-1, 1].")
    return float(value)


def _tokenize_row(
    example: dict[str, Any],
    row: int,
    *,
    tokenizer: PreTrainedTokenizerBase,
    step_format: StepFormat,
    with_labels: bool,
) -> dict[str, Any]:
    prompt = example["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(
            f"Row {row}, column 'prompt': expected the formatted question as a string, got {prompt!r}."
        )
    chosen = _split_checked(example["chosen"], row, "chosen", step_format)
    rejected = _split_checked(example["rejected"], row, "rejected", step_format)
    output = tokenize_step_pair(tokenizer, prompt, chosen, rejected, step_format=step_format)
    for column in ("chosen_value", "rejected_value"):
        output[column] = _label_checked(example[column], row, column) if with_labels else math.nan
    return output


class SVPOTrainer(DPOTrainer):
    """Trainer for SVPO (Eq. 10), the paper's ablations and its solution-level DPO baseline.

    Args:
        model: a ``ValueHeadForCausalLM``, a plain causal LM (given a fresh value head in place, see
            ``ValueHeadForCausalLM.from_causal_lm``), a model id or path (loaded with
            ``ValueHeadForCausalLM.from_pretrained``: a saved head is restored), or a PEFT model around a
            ``ValueHeadForCausalLM``.
        ref_model: the frozen reference π'. Default: a frozen copy of ``model`` (its value head is unused); none
            with PEFT (the adapter is disabled instead) or with ``precompute_ref_log_probs=True``, as in TRL.
        args: an :class:`SVPOConfig`.
        train_dataset, eval_dataset: ``pairs`` datasets (see the module docstring).
        processing_class: the tokenizer.
        step_format: how completions split into steps and which steps are answers (default: the paper's).
        Other arguments are ``DPOTrainer``'s. With PEFT, put ``"v_head"`` in ``modules_to_save``.

    Example::

        trainer = SVPOTrainer(model, args=SVPOConfig(output_dir="out"), train_dataset=pairs,
                              processing_class=tokenizer)
        trainer.train()
    """

    _tag_names: ClassVar[list[str]] = ["trl", "svpo"]
    _name = "SVPO"
    _paper: ClassVar[dict[str, str]] = {
        "title": "Step-level Value Preference Optimization for Mathematical Reasoning",
        "id": "2406.10858",
        "citation": (
            "@article{chen2024svpo,\n    title={Step-level Value Preference Optimization for Mathematical "
            "Reasoning},\n    author={Guoxin Chen and Minpeng Liao and Chengxi Li and Kai Fan},\n    journal="
            "{arXiv preprint arXiv:2406.10858},\n    year={2024}\n}"
        ),
    }

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: PreTrainedModel | None = None,
        args: SVPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        step_format: StepFormat = DEFAULT_FORMAT,
    ):
        if args is None:
            args = SVPOConfig("svpo-output")
        elif not isinstance(args, SVPOConfig):
            raise TypeError(f"`args` must be an SVPOConfig, got {type(args).__name__}")
        unsupported = {
            "loss_type": (args.loss_type, ["sigmoid"]),
            "ld_alpha": (args.ld_alpha, None),
            "use_weighting": (args.use_weighting, False),
            "f_divergence_type": (args.f_divergence_type, "reverse_kl"),
        }
        for name, (value, expected) in unsupported.items():
            if value != expected:
                raise ValueError(
                    f"SVPOConfig.{name}={value!r} is not supported: SVPO's first term is the sigmoid DPO loss "
                    f"(Eq. 10); leave {name} at {expected!r}. Use sft_weight for an SFT term."
                )
        if processing_class is None:
            raise ValueError(
                "SVPOTrainer needs `processing_class` (the tokenizer the pairs are tokenized with)."
            )
        self.step_format = step_format
        if data_collator is None:
            if processing_class.pad_token is None:
                processing_class.pad_token = processing_class.eos_token  # as DPOTrainer does
            data_collator = DataCollatorForStepPreference(
                pad_token_id=processing_class.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of
            )

        if isinstance(model, str):
            init_kwargs = dict(args.model_init_kwargs or {})
            if quantization_config is not None:  # applied here, since the model is loaded here
                init_kwargs["quantization_config"], quantization_config = quantization_config, None
            model = ValueHeadForCausalLM.from_pretrained(model, **init_kwargs)
        elif is_peft_model(model):
            if not isinstance(model.get_base_model(), ValueHeadForCausalLM):
                raise TypeError(
                    "A PEFT `model` must wrap a ValueHeadForCausalLM (with 'v_head' in modules_to_save); got a "
                    f"PEFT model around {type(model.get_base_model()).__name__}."
                )
        elif not isinstance(model, ValueHeadForCausalLM):
            model = ValueHeadForCausalLM.from_causal_lm(model)
        # TRL builds the reference from the model's Hub id, which an in-memory model does not have: copy it.
        no_ref_needed = peft_config is not None or is_peft_model(model) or args.precompute_ref_log_probs
        if ref_model is None and not no_ref_needed:
            ref_model = frozen_copy(model)  # a deepcopy under ZeRO-3 would copy empty parameter shards

        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        warn_if_save_has_no_weights(self.accelerator)

    # ------------------------------------------------------------------ data
    def _prepare_dataset(
        self,
        dataset: Dataset | IterableDataset,
        processing_class: PreTrainedTokenizerBase,
        args: SVPOConfig,
        dataset_name: str,
    ) -> Dataset | IterableDataset:
        first = next(iter(dataset))
        if "chosen_ids" in first:  # already prepared (e.g. passed again to `evaluate`)
            return dataset
        columns = list(dataset.column_names or first) if isinstance(dataset, Dataset) else list(first)
        required = ["prompt", "chosen", "rejected"]
        with_labels = "chosen_value" in columns or "rejected_value" in columns or args.mse_weight > 0
        if with_labels:
            required += ["chosen_value", "rejected_value"]
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(
                f"The {dataset_name} dataset has no column(s) {missing} (it has {columns}). SVPOTrainer trains on a "
                "`pairs` dataset: prompt, chosen, rejected, chosen_value, rejected_value (the value labels may be "
                "left out only when mse_weight is 0)."
            )
        map_kwargs: dict[str, Any] = {"with_indices": True}
        if isinstance(dataset, Dataset):
            map_kwargs.update(num_proc=args.dataset_num_proc, desc=f"Tokenizing {dataset_name} pairs by step")
        dataset = dataset.map(
            _tokenize_row,
            fn_kwargs={
                "tokenizer": self._tokenizer,
                "step_format": self.step_format,
                "with_labels": with_labels,
            },
            **map_kwargs,
        )
        if args.max_length is not None:
            # A truncated state has no last token to read its value at, so over-long pairs are dropped.
            def fits(example):
                longest = max(len(example["chosen_ids"]), len(example["rejected_ids"]))
                return len(example["prompt_ids"]) + longest <= args.max_length

            before = len(dataset) if isinstance(dataset, Dataset) else None
            filter_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
            dataset = dataset.filter(fits, **filter_kwargs)
            if before is not None and len(dataset) < before:
                warnings.warn(
                    f"{before - len(dataset)} of {before} pairs in the {dataset_name} dataset are longer than "
                    f"max_length={args.max_length} tokens and were dropped.",
                    stacklevel=2,
                )
        return dataset

    def _set_signature_columns_if_needed(self):
        # Keep what the collator needs when `remove_unused_columns` drops the rest.
        if self._signature_columns is None:
            self._signature_columns = [
                "prompt_ids",
                *(
                    f"{side}_{what}"
                    for side in ("chosen", "rejected")
                    for what in ("ids", "mask", "value_index")
                ),
                "chosen_value",
                "rejected_value",
                "ref_chosen_logps",
                "ref_rejected_logps",
            ]

    # ------------------------------------------------------------------ loss
    def compute_ref_log_probs(self, model, inputs):
        """TRL's reference log-probs; the value keys are not model inputs."""
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k not in VALUE_KEYS})

    def _value_model(self, model) -> ValueHeadForCausalLM:
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_completion_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        # Read the values of THIS forward now: a PEFT reference forward (adapter disabled) would overwrite them.
        all_values = self._value_model(model).last_values
        seq_len = shift_completion_mask.size(1)
        per_token_logps = outputs.log_probs[:, -seq_len:]
        logps = per_token_logps.sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)

        all_values = all_values[
            :, -inputs["input_ids"].size(1) :
        ]  # prompt-learning PEFT prepends virtual tokens
        state_values = all_values.gather(1, inputs["value_index"].unsqueeze(1)).squeeze(1)
        chosen_values, rejected_values = state_values.chunk(2, dim=0)

        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(
                self.ref_model or self.model, inputs
            )

        terms = svpo_loss_terms(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            chosen_values,
            rejected_values,
            beta=self.beta,
            margin=self.args.margin,
        )
        # TRL's `sft` loss type: mean NLL over every model-written chosen token of the batch.
        chosen_token_mask, _ = shift_completion_mask.chunk(2, dim=0)
        chosen_per_token_logps, _ = per_token_logps.chunk(2, dim=0)
        sft = -chosen_per_token_logps[chosen_token_mask.bool()].mean()
        mse = value_mse(state_values, inputs["value_labels"]).mean()

        means = {name: term.mean() for name, term in terms.items()}
        means.update(sft=sft, mse=mse)
        weights = {
            "dpo": 1.0,
            "margin": self.args.margin_weight,
            "regularization": self.args.regularization_weight,
            "sft": self.args.sft_weight,
            "mse": self.args.mse_weight,
        }
        # Same accumulation as DPOTrainer (0.0 + term.mean() * weight) so that DPO alone is bit-identical.
        loss = 0.0
        for name, weight in weights.items():
            if weight != 0.0:  # a zero weight removes the term (and, for MSE, the need for labels)
                loss += means[name] * weight
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item()
            )

        self._log_svpo_metrics(
            mode,
            inputs,
            outputs,
            means,
            chosen_logps=chosen_logps,
            rejected_logps=rejected_logps,
            chosen_rewards=self.beta * (chosen_logps - ref_chosen_logps).detach(),
            rejected_rewards=self.beta * (rejected_logps - ref_rejected_logps).detach(),
            chosen_values=chosen_values.detach(),
            rejected_values=rejected_values.detach(),
        )
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_svpo_metrics(self, mode, inputs, outputs, means, **tensors) -> None:
        metrics = self._metrics[mode]
        gather = self.accelerator.gather_for_metrics
        for name, value in means.items():
            if name == "mse" and torch.isnan(inputs["value_labels"]).any():
                continue  # no value labels in this dataset (allowed when mse_weight is 0)
            metrics[f"loss/{name}"].append(gather(value.detach()).mean().item())

        chosen_values, rejected_values = tensors["chosen_values"], tensors["rejected_values"]
        metrics["values/chosen"].append(gather(chosen_values).mean().item())
        metrics["values/rejected"].append(gather(rejected_values).mean().item())
        metrics["values/margins"].append(gather(value_margin(chosen_values, rejected_values)).mean().item())
        # Pairwise ranking accuracy of the value head on this batch's labelled pairs (ties half: a new head
        # is V = 0 everywhere and scores 0.5, chance, not 0)
        agreement = (chosen_values > rejected_values).float() + 0.5 * (
            chosen_values == rejected_values
        ).float()
        metrics["values/accuracy"].append(gather(agreement).mean().item())

        chosen_rewards, rejected_rewards = tensors["chosen_rewards"], tensors["rejected_rewards"]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(
            gather((chosen_rewards > rejected_rewards).float()).mean().item()
        )
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(tensors["chosen_logps"].detach()).mean().item())
        metrics["logps/rejected"].append(gather(tensors["rejected_logps"].detach()).mean().item())

        # TRL's token-level diagnostics, on model-written tokens only.
        shift_mask = inputs["completion_mask"][..., 1:]
        seq_len = shift_mask.size(1)
        total_tokens = gather(shift_mask.sum()).sum()
        entropy_sum = gather((outputs.entropy[:, -seq_len:].detach() * shift_mask).sum()).sum()
        metrics["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)
        if mode == "train":
            num_tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_mask, rejected_mask = shift_mask.bool().chunk(2, dim=0)
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].detach().chunk(2, dim=0)
        for name, logits, mask in (
            ("chosen", chosen_logits, chosen_mask),
            ("rejected", rejected_logits, rejected_mask),
        ):
            total, count = gather(logits[mask].sum()).sum().item(), gather(mask.sum()).sum().item()
            metrics[f"logits/{name}"].append(total / count if count > 0 else 0.0)
        chosen_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
        correct, count = gather((chosen_top1 & chosen_mask).sum()).sum(), gather(chosen_mask.sum()).sum()
        metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)
