"""Text generation backends (DESIGN.md): one protocol, HF transformers for CPU/GPU, vLLM for scale."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Completion:
    """One sampled continuation.

    ``text`` includes the stop string that ended it (if any); ``token_logprobs`` holds the log-prob
    of every generated token; ``finish_reason`` is ``"stop"`` (a stop string or EOS) or ``"length"``.
    """

    text: str
    token_logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "stop"

    @property
    def num_tokens(self) -> int:
        return len(self.token_logprobs)


@dataclass
class TokenCompletion(Completion):
    """A `Completion` that also keeps the generated token ids (``HFBackend``; useful for caching and checks)."""

    token_ids: list[int] = field(default_factory=list)


@runtime_checkable
class GenerationBackend(Protocol):
    """What search needs from a model: sampled continuations and (for value-head models) state values."""

    def generate(
        self,
        prompts: list[str],
        *,
        n: int,
        temperature: float,
        max_new_tokens: int,
        stop: list[str],
    ) -> list[list[Completion]]:
        """``n`` completions per prompt; temperature 0 means greedy."""
        ...

    def values(self, texts: list[str]) -> list[float]:
        """The value head's output at the last token of each text, in [-1, 1]."""
        ...


class HFBackend:
    """`GenerationBackend` on transformers ``generate``: any causal LM, CPU or GPU.

    Prompts are repeated ``n`` times, sorted by length and run in chunks of ``batch_size``
    sequences with left padding and the KV cache. Generation stops at the first stop string
    (``stop_strings=`` of ``generate``) or EOS; the text is cut right after the stop string, and
    ``finish_reason`` is ``"stop"`` for a stop string or EOS, ``"length"`` when the budget ran out.
    ``temperature == 0`` is greedy decoding; otherwise pure sampling at that temperature (no top-k
    or top-p, whatever the checkpoint's generation config says), since search wants the policy's
    own distribution.

    ``token_logprobs`` are the log-probs of the generated tokens under the model's *raw*
    distribution (temperature 1, before any logits processor): the prior of Eq. 4 is
    ``pi(a_j | s, a_<j)``, the policy itself, not the tempered sampling distribution. They come from
    ``generate``'s unprocessed logits, so a chunk holds ``batch_size x max_new_tokens x vocab``
    logits in memory at once; lower ``batch_size`` for large vocabularies.

    Args:
        model: a causal LM (or ``ValueHeadForCausalLM``, whose value head ``values`` reads).
        tokenizer: its tokenizer; a BOS is prepended when the tokenizer adds one by default, as in
            `svpo_trl.tokenization.tokenize_solution`.
        batch_size: sequences per ``generate`` / forward call.
        seed: with a seed, call ``k`` samples under ``torch`` seed ``seed + k`` in a forked RNG, so the
            same seed and the same calls give the same samples, and the global RNG is untouched.
        device: where inputs go; defaults to the model's device.
        allow_untrained_value_head: let ``values`` read a head that was never trained (weight all zero, see
            `svpo_trl.models.value_head.untrained_value_head_reason`), with a warning, instead of refusing.
            Value-guided search with such a head ranks every candidate the same.

    The model is used in whatever mode it is in (call ``model.eval()`` to disable dropout).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 64,
        seed: int | None = None,
        device: str | torch.device | None = None,
        allow_untrained_value_head: bool = False,
    ):
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither pad_token_id nor eos_token_id: cannot pad batches")
        self.pad_token_id = int(pad)
        eos = (
            getattr(model.generation_config, "eos_token_id", None)
            if hasattr(model, "generation_config")
            else None
        )
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._bos = _bos_to_prepend(tokenizer)
        self.allow_untrained_value_head = allow_untrained_value_head
        self._value_head_checked = False
        self.calls = 0
        self.tokens_generated = 0

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: list[str],
        *,
        n: int,
        temperature: float,
        max_new_tokens: int,
        stop: list[str],
    ) -> list[list[Completion]]:
        """``n`` completions per prompt (see the class docstring for stop, temperature, log-probs)."""
        import torch

        check_generate_args(n, temperature, max_new_tokens)
        self.calls += 1
        if not prompts:
            return []
        greedy = temperature == 0
        # Greedy samples are identical: decode each prompt once and copy.
        copies = 1 if greedy else n
        encoded = [self._encode(p) for p in prompts]
        jobs = [(i, j) for i in range(len(prompts)) for j in range(copies)]
        # Similar lengths share a chunk, so little compute goes to padding.
        order = sorted(range(len(jobs)), key=lambda k: -len(encoded[jobs[k][0]]))
        results: list[Completion | None] = [None] * len(jobs)

        rng = contextlib.nullcontext()
        if self.seed is not None:
            devices = [self.device] if self.device.type == "cuda" else []
            rng = torch.random.fork_rng(devices=devices)
        with rng, torch.inference_mode():
            if self.seed is not None:
                torch.manual_seed(self.seed + self.calls - 1)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                completions = self._generate_chunk(
                    [encoded[jobs[k][0]] for k in chunk], greedy, temperature, max_new_tokens, stop
                )
                for k, completion in zip(chunk, completions):
                    results[k] = completion

        grouped: list[list[Completion]] = [[] for _ in prompts]
        for (i, _), completion in zip(jobs, results):
            grouped[i].append(completion)
        if greedy and n > 1:
            grouped = [[copy.deepcopy(g[0]) for _ in range(n)] for g in grouped]
        return grouped

    def _generate_chunk(
        self, ids: list[list[int]], greedy: bool, temperature: float, max_new_tokens: int, stop: list[str]
    ) -> list[Completion]:
        import torch

        input_ids, attention_mask = self._pad(ids, side="left")
        kwargs: dict[str, Any] = {"do_sample": False} if greedy else {
            "do_sample": True,
            "temperature": float(temperature),
            "top_k": 0,
            "top_p": 1.0,
        }  # fmt: skip
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            num_beams=1,
            repetition_penalty=1.0,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )
        generated = out.sequences[:, input_ids.shape[1] :]
        # Raw (unprocessed) logits -> log-probs of the chosen tokens, one step at a time to bound memory.
        logprobs = torch.stack(
            [
                torch.log_softmax(step_logits.float(), dim=-1).gather(1, generated[:, t : t + 1]).squeeze(1)
                for t, step_logits in enumerate(out.logits)
            ],
            dim=1,
        ).cpu()
        generated = generated.cpu().tolist()
        return [self._to_completion(tokens, lps, stop) for tokens, lps in zip(generated, logprobs.tolist())]

    def _to_completion(self, tokens: list[int], logprobs: list[float], stop: list[str]) -> Completion:
        """Cut one generated row at its end: the first stop string (right after it) or EOS, else the budget."""
        end = next((t + 1 for t, tok in enumerate(tokens) if tok in self.eos_token_ids), None)
        limit = end if end is not None else len(tokens)
        text = self._decode(tokens[:limit])
        cut = _first_stop_end(text, stop)
        if cut is not None:
            # The fewest tokens whose text already contains a stop string: where generation halted
            # (later positions in the row are padding from the batch).
            lo, hi = 1, limit
            while lo < hi:
                mid = (lo + hi) // 2
                if _first_stop_end(self._decode(tokens[:mid]), stop) is not None:
                    hi = mid
                else:
                    lo = mid + 1
            num, text, reason = lo, text[:cut], "stop"
        elif end is not None:
            num, reason = end, "stop"
        else:
            num, reason = limit, "length"
        self.tokens_generated += num
        return TokenCompletion(
            text=text, token_logprobs=logprobs[:num], finish_reason=reason, token_ids=tokens[:num]
        )

    # ------------------------------------------------------------------ values
    def check_value_head(self) -> None:
        """Raise unless ``values`` can rank states: the model has a value head, and it was trained.

        Value-guided search (`SBSGenerator`, MCTS ``value_leaf_evaluation``) calls it before searching;
        ``values`` calls it too. An untrained head (weight all zero: a checkpoint without ``v_head.*``, or
        a head added in memory) raises `UntrainedValueHeadError` naming the checkpoint, unless the backend
        was built with ``allow_untrained_value_head=True`` (then it warns once).
        """
        if self._value_head_checked:
            return
        from ..models.value_head import model_source, refuse_untrained_value_head, untrained_value_head_reason

        if getattr(self.model, "v_head", None) is None:
            raise TypeError(
                f"{model_source(self.model)} ({type(self.model).__name__}) has no value head (v_head): values() "
                "needs a svpo_trl.models.value_head.ValueHeadForCausalLM whose head was trained (value_sft / svpo)"
            )
        refuse_untrained_value_head(
            model_source(self.model),
            untrained_value_head_reason(self.model),
            allow=self.allow_untrained_value_head,
        )
        # A trained head stays trained (and the opt-out warned once): no reduction over the weight per call.
        self._value_head_checked = True

    def values(self, texts: list[str]) -> list[float]:
        """The value head's output at the last token of each text (batched, right-padded forward)."""
        import torch

        self.check_value_head()
        encoded = [self._encode(t) for t in texts]
        result: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(encoded), self.batch_size):
                chunk = encoded[start : start + self.batch_size]
                # Right padding keeps every real token's position and attention exactly as unbatched.
                input_ids, attention_mask = self._pad(chunk, side="right")
                values = self._forward_values(input_ids, attention_mask)
                if not isinstance(values, torch.Tensor):
                    raise TypeError(f"{type(self.model).__name__}.forward returned no `values` tensor")
                last = torch.tensor([len(ids) - 1 for ids in chunk], device=values.device)
                picked = values.reshape(values.shape[0], -1)[
                    torch.arange(len(chunk), device=values.device), last
                ]
                result += picked.float().cpu().tolist()
        return result

    def _forward_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        from ..models.value_head import ValueHeadForCausalLM

        if isinstance(self.model, ValueHeadForCausalLM):
            # The backbone alone: the head reads its last hidden state (a forward hook), and the LM
            # head's (batch, length, vocab) logits, useless here, are never computed.
            self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return self.model.last_values
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out["values"] if isinstance(out, dict) and "values" in out else getattr(out, "values", None)

    # ------------------------------------------------------------------ helpers
    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self._bos, *ids] if self._bos is not None else ids

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _pad(self, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        width = max(len(r) for r in rows)
        ids, mask = [], []
        for r in rows:
            pad = [self.pad_token_id] * (width - len(r))
            ids.append(pad + r if side == "left" else r + pad)
            ones, zeros = [1] * len(r), [0] * len(pad)
            mask.append(zeros + ones if side == "left" else ones + zeros)
        return (
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.tensor(mask, dtype=torch.long, device=self.device),
        )


def check_generate_args(n: int, temperature: float, max_new_tokens: int) -> None:
    """The arguments of `GenerationBackend.generate` that every backend rejects alike."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _first_stop_end(text: str, stop: list[str]) -> int | None:
    """End index of the stop string that occurs first in ``text``, or None."""
    hits = [(text.find(s), -len(s), s) for s in stop if s and s in text]
    if not hits:
        return None
    start, _, first = min(hits)
    return start + len(first)


def _bos_to_prepend(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id if the tokenizer adds one by default (as `tokenize_solution` does), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if probe and probe[0] == bos else None
