"""Policy-value model: any causal LM plus a value head ``V_φ`` (paper §3.2, Appendix A.3, Figure 4).

``V_φ`` is one linear layer with a tanh, parallel to the LM head, reading the final hidden state; the
value of a partial solution is read at the last token of its last step (A.3). It is pre-trained with
Eq. 7 (:class:`~svpo_trl.trainer.value_sft_trainer.ValueSFTTrainer`) and trained jointly with the policy by SVPO (Eq. 9–10).

Contract (what the trainers and the search rely on)
---------------------------------------------------
- ``ValueHeadForCausalLM.from_pretrained(name_or_path, **kwargs)`` loads a plain causal-LM checkpoint
  (a new head: weight 0, bias 0, so V = 0 on any model) or one saved with a head (restored exactly).
  ``model.value_head_loaded`` tells which: False when the checkpoint had no ``v_head.*`` weights.
  A head whose weight is all zero was never trained (V is the same for every state): value-guided search
  refuses it (:func:`untrained_value_head_reason`, ``allow_untrained_value_head`` to opt out).
  ``kwargs`` are those of ``PreTrainedModel.from_pretrained`` (``dtype``, ``device_map``, ...).
- ``ValueHeadForCausalLM.from_causal_lm(model)`` adds a fresh head to an in-memory causal LM **in place**
  (no copy of its weights; the same object is returned, now an instance of the head class). Wrap before
  PEFT. ``copy.deepcopy`` the model first if you still need it without a head.
- ``model.v_head``: a :class:`ValueHead` (``nn.Linear(hidden, 1)`` then tanh), in the model's dtype,
  called as a module (so DeepSpeed ZeRO-3 gathers its weights and PEFT ``modules_to_save`` can wrap it).
- ``outputs = model(input_ids, attention_mask=...)``: the base model's output plus ``outputs.values``,
  shape ``(B, T)``, in [-1, 1]; ``values[b, t]`` is V of the prefix ending at token ``t``. Values are in
  the head's dtype, also under autocast (bf16 mixed precision with fp32 weights gives fp32 values).
- ``model.last_values``: the ``(B, T)`` values of the most recent forward of the backbone, whatever
  called it: our forward, ``generate`` (then ``T`` is the number of new positions of the last step), or
  TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, which ``DPOTrainer`` installs and whose
  output has no ``values``). Read it right after the forward you care about: the next forward of the same
  module (e.g. a reference pass with the LoRA adapter disabled) replaces it. It carries the autograd graph
  when the forward did, so a loss built on it trains ``v_head`` and the backbone.
- ``save_pretrained`` / ``push_to_hub`` write the head as ``v_head.weight`` / ``v_head.bias`` next to
  the base weights (safetensors). ``config.architectures`` keeps the base class name, so
  ``AutoModelForCausalLM.from_pretrained`` still loads the policy (ignoring the head);
  ``config.has_value_head = True`` records that the checkpoint has one.
- ``isinstance(model, ValueHeadForCausalLM)`` holds; so does ``isinstance(model, LlamaForCausalLM)``
  (etc.): the class is made on the fly as ``LlamaForCausalLMWithValueHead(ValueHeadForCausalLM,
  LlamaForCausalLM)``, so TRL, PEFT, accelerate and DeepSpeed see an ordinary model with one more module,
  and ``generate`` is the base model's.

Why a forward hook on the backbone
----------------------------------
The head needs the last hidden state. ``output_hidden_states=True`` would keep every layer's states, and
TRL's fused LM head bypasses the model's forward altogether: it calls ``model.base_model`` and projects
through the LM head in tiles. A forward hook on ``model.base_model`` (the decoder backbone, the module both
paths call) sees ``last_hidden_state`` in both cases, at the cost of one ``hidden -> 1`` projection per
forward (also during generation).

Caveat: ``values`` is a field of the output, which shadows the mapping method ``outputs.values()``. Use
``outputs.items()`` / ``outputs.to_tuple()`` instead; the output classes register a pytree flattening that
does not call it. PyTorch DDP with ``find_unused_parameters=True`` walks outputs with ``.values()``: keep it
``False`` (the head is always used, so there is nothing unused to find), as ``ValueSFTConfig`` does.
vLLM rejects unknown weights: `svpo_trl.search.vllm_backend.VLLMBackend` serves a head checkpoint's policy from a
cached copy without ``v_head.*`` (``policy_checkpoint``) and reads the head's tensors itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import warnings
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.models.auto.auto_factory import _get_model_class

__all__ = [
    "UntrainedValueHeadError",
    "ValueHead",
    "ValueHeadForCausalLM",
    "refuse_untrained_value_head",
    "untrained_value_head_message",
    "untrained_value_head_reason",
    "value_head_class",
]

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "revision", "subfolder", "token")


class ValueHead(nn.Linear):
    """``V_φ(s) = tanh(w·h + b)`` on the final hidden state ``h`` (§3.2): ``(..., hidden) -> (...)`` in [-1, 1]."""

    def __init__(self, hidden_size: int, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__(hidden_size, 1, bias=True, device=device, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The backbone may run in another dtype than the head (e.g. fp32 hidden states after an upcast norm).
        # Autocast (bf16 mixed precision) would run the projection in bf16 and round V to ~3 digits, which the
        # margin and MSE terms compare; one hidden -> 1 projection costs nothing in the weights' own dtype.
        with _without_autocast(hidden_states.device.type):
            return torch.tanh(super().forward(hidden_states.to(self.weight.dtype))).squeeze(-1)


def _without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    # torch.autocast raises for device types it does not know (e.g. "meta"); torch < 2.4 lacks the query
    available = getattr(torch.amp, "is_autocast_available", lambda device: device in ("cpu", "cuda"))
    return torch.autocast(device_type, enabled=False) if available(device_type) else contextlib.nullcontext()


class ValueHeadForCausalLM:
    """Mixin adding ``v_head`` to a causal LM; concrete classes come from :func:`value_head_class`.

    See the module docstring for the contract. ``ValueHeadForCausalLM.from_pretrained`` and
    ``ValueHeadForCausalLM.from_causal_lm`` pick the concrete class from the checkpoint / the model.
    """

    _value_head_base: type[PreTrainedModel]

    # -- construction -------------------------------------------------------------------------------
    def post_init(self) -> None:
        # Added before the base's post_init so that weight initialisation (or, in from_pretrained, the
        # missing-key initialisation) covers the head like any other module
        self.v_head = ValueHead(self.config.get_text_config().hidden_size)
        self.value_head_loaded = False
        self._last_values = None
        self._attach_value_hook()
        super().post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *model_args: Any, **kwargs: Any):
        """Load a causal LM checkpoint with a value head (restored if saved, else initialised)."""
        _check_attn_implementation(kwargs.get("attn_implementation"))
        if "_value_head_base" in cls.__dict__:  # a concrete class: plain transformers loading
            want_info = kwargs.pop("output_loading_info", False)
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
            # Search must know whether V was ever trained: a checkpoint without v_head.* gets a new head
            model.value_head_loaded = not any(k.startswith("v_head.") for k in info.get("missing_keys", ()))
            return (model, info) if want_info else model
        config = kwargs.pop("config", None)
        if config is None:
            hub_kwargs = {k: kwargs[k] for k in (*_HUB_KWARGS, "trust_remote_code") if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        try:
            base = _get_model_class(config, AutoModelForCausalLM._model_mapping)
        except KeyError as err:
            raise ValueError(
                f"{pretrained_model_name_or_path!r} has config {type(config).__name__}, which has no causal-LM "
                "class in transformers' AutoModelForCausalLM mapping (remote code?). Load it yourself and call "
                "ValueHeadForCausalLM.from_causal_lm(model)."
            ) from err
        return value_head_class(base).from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, **kwargs
        )

    @classmethod
    def from_causal_lm(cls, model: PreTrainedModel) -> ValueHeadForCausalLM:
        """Give ``model`` (an in-memory causal LM) a fresh value head, in place, keeping its weights."""
        if isinstance(model, ValueHeadForCausalLM):
            return model
        if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
            raise TypeError(
                f"from_causal_lm expects a transformers causal LM (a PreTrainedModel with an LM head), got "
                f"{type(model).__name__}. Add the value head before wrapping the model with PEFT."
            )
        lm_head_weight = model.get_output_embeddings().weight
        model.__class__ = value_head_class(type(model))
        model.v_head = ValueHead(
            model.config.get_text_config().hidden_size,
            device=lm_head_weight.device,
            dtype=lm_head_weight.dtype,
        )
        model._init_weights(model.v_head)
        model.value_head_loaded = False
        model._last_values = None
        model._attach_value_hook()
        return model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ValueHead):
            # A new head starts at V = 0 on any backbone. N(0, initializer_range) weights gave pre-tanh
            # values of std ~0.9 on a real 135M model (final hidden RMS ~1.9): |V| 0.4-0.6 before any
            # training, i.e. confident random rankings. With w = 0 the head still learns at once
            # (dV/dw = h), and the backbone gets value gradients as soon as w moves.
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    # -- values -------------------------------------------------------------------------------------
    def _attach_value_hook(self) -> None:
        backbone = self.base_model
        if backbone is self:
            raise TypeError(
                f"{type(self).__name__} has no separate backbone (base_model) to read hidden states from"
            )
        for hook in backbone._forward_hooks.values():
            if getattr(hook, "__func__", None) is ValueHeadForCausalLM._value_hook and hook.__self__ is self:
                return
        backbone.register_forward_hook(self._value_hook)

    def _value_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = output.last_hidden_state if isinstance(output, ModelOutput) else output[0]
        self._last_values = self.v_head(hidden)

    @property
    def last_values(self) -> torch.Tensor | None:
        """``(B, T)`` values of the backbone's most recent forward (any caller, incl. TRL's fused LM head)."""
        return self._last_values

    def _attach_values(self, outputs: Any) -> Any:
        if isinstance(outputs, tuple):
            return (*outputs, self._last_values)
        return _with_values_class(type(outputs))(**outputs, values=self._last_values)

    # -- saving -------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> Any:
        """Save base weights + ``v_head.*`` (safetensors); the config keeps the base architecture name."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        # transformers writes our class name; AutoModelForCausalLM / vLLM need the base one
        self.config.architectures = [self._value_head_base.__name__]
        self.config.has_value_head = True
        if kwargs.get("is_main_process", True):
            self.config.save_pretrained(save_directory)
        return result


class UntrainedValueHeadError(ValueError):
    """Value-guided search asked for values from a head that was never trained (see `untrained_value_head_reason`)."""


def untrained_value_head_reason(model: Any) -> str | None:
    """Why ``model.v_head`` cannot rank states (it was never trained), or None when it can.

    A new head starts at weight 0 (:meth:`ValueHeadForCausalLM._init_weights`), so V = tanh(b) is the same
    for every state until training moves the weight (the gradient of any value loss reaches it at once).
    So a head whose weight is all zero was never trained, whether it is new (``value_head_loaded`` False:
    the checkpoint had no ``v_head.*``, or the head was added in memory) or came from a checkpoint that
    saved an untrained head; any other head counts as trained (trained in memory included). A model
    without ``v_head`` is not judged here (callers say it has no head), nor is a weight that is not
    materialised here (DeepSpeed ZeRO-3 partitions, the meta device).
    """
    head = getattr(model, "v_head", None)
    weight = getattr(head, "weight", None)
    if weight is None or weight.numel() == 0 or weight.device.type == "meta":
        return None
    if bool(torch.count_nonzero(weight.detach())):
        return None
    if getattr(model, "value_head_loaded", True) is False:
        return (
            "the checkpoint has no v_head.* weights, so a new head was added: V is the same for every state"
        )
    return "its v_head weights are all zero: V is the same for every state"


def untrained_value_head_message(source: str, reason: str) -> str:
    """The error (or, with the opt-out, warning) text for value-guided search with an untrained head."""
    return (
        f"{source}: the value head was never trained ({reason}), so value-guided search (SBS, MCTS "
        "value_leaf_evaluation) would rank candidates by a constant. Train the head first: the value_sft stage "
        "(recipes/value_sft.py, Eq. 7) or the svpo stage (recipes/svpo.py) saves a checkpoint with a trained "
        "head. To search with it anyway, pass allow_untrained_value_head=True (recipes: "
        "--allow_untrained_value_head true)."
    )


def refuse_untrained_value_head(source: str, reason: str | None, *, allow: bool) -> None:
    """Raise `UntrainedValueHeadError` for a head that was never trained (``reason`` not None), or warn
    instead with ``allow`` (``allow_untrained_value_head``). The backends' ``check_value_head`` call it."""
    if reason is None:
        return
    message = untrained_value_head_message(source, reason)
    if not allow:
        raise UntrainedValueHeadError(message)
    # Points at whoever asked the backend for values (caller -> check_value_head -> here).
    warnings.warn(message, stacklevel=4)


def model_source(model: Any) -> str:
    """How to name ``model`` in a message: its checkpoint path / Hub id, or that it was built in memory."""
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return repr(name) if name else f"{type(model).__name__} (built in memory, no checkpoint)"


def _check_attn_implementation(name: str | None) -> None:
    # transformers fails deep inside from_pretrained with a message that does not say how to install it
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (NVIDIA GPUs only): "
            "pip install 'svpo_trl[flash-attn]'. Or use attn_implementation='sdpa' (the default) or 'eager'."
        )


_VALUE_HEAD_CLASSES: dict[type, type] = {}


def value_head_class(base: type[PreTrainedModel]) -> type:
    """The class ``{Base}WithValueHead(ValueHeadForCausalLM, base)``, made once per base class."""
    if issubclass(base, ValueHeadForCausalLM):
        return base
    if base not in _VALUE_HEAD_CLASSES:

        def forward(self, *args, **kwargs):
            return self._attach_values(base.forward(self, *args, **kwargs))

        # Keep the base signature: Trainer prunes dataset columns and generate() validates kwargs by it
        functools.update_wrapper(forward, base.forward)
        name = f"{base.__name__}WithValueHead"
        cls = type(name, (ValueHeadForCausalLM, base), {"forward": forward, "_value_head_base": base})
        cls.__module__ = __name__
        cls.__qualname__ = name
        globals()[name] = cls  # importable by name, so the model pickles
        _VALUE_HEAD_CLASSES[base] = cls
    return _VALUE_HEAD_CLASSES[base]


# -- outputs with values -------------------------------------------------------------------------------
class _ValuesOutput:
    """Base of the ``{Output}WithValues`` classes: registers a pytree flattening that avoids ``.values()``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # ModelOutput's own registration flattens with `output.values()`, which the `values` field shadows
        import torch.utils._pytree as pytree
        from transformers.utils import generic

        def flatten(output):
            return list(dict.values(output)), list(output.keys())

        def flatten_with_keys(output):
            return [(pytree.MappingKey(k), v) for k, v in dict.items(output)], list(output.keys())

        def unflatten(values, context):
            return cls(**dict(zip(context, values)))

        pytree.register_pytree_node(
            cls,
            flatten,
            unflatten,
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
            flatten_with_keys_fn=flatten_with_keys,
        )
        generic._registered_model_output_types.add(cls)


@functools.cache
def _with_values_class(output_class: type[ModelOutput]) -> type[ModelOutput]:
    """``output_class`` plus a ``values`` field (``(B, T)`` value-head outputs)."""
    name = f"{output_class.__name__}WithValues"
    cls = dataclasses.make_dataclass(
        name,
        [("values", torch.Tensor | None, dataclasses.field(default=None))],
        bases=(_ValuesOutput, output_class),
        namespace={"__module__": __name__},
    )
    globals()[name] = cls
    return cls
