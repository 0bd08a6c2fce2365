"""Value-guided search refuses a value head that was never trained (a checkpoint without v_head.*, a head
added in memory, or an all-zero head saved to a checkpoint), on every path: HFBackend used directly, SBS,
evaluate, MCTS value_leaf_evaluation, make_backend (hf and vllm) and the pipeline stages."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from svpo_trl.models.value_head import (
    UntrainedValueHeadError,
    ValueHeadForCausalLM,
    untrained_value_head_reason,
    value_head_class,
)
from svpo_trl.search.backends import HFBackend
from svpo_trl.search.vllm_backend import make_backend, untrained_head_reason
from svpo_trl.toy import tiny_llama

from conftest import ConstantSandbox, randomize_value_head

HAS_VLLM = importlib.util.find_spec("vllm") is not None
TEXTS = ["<question>What is 1 + 1?</question>\n", "<question>What is 2 * 3?</question>\n<step>\n"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    """plain (no v_head.*), zero (an untrained head saved), trained (a head whose weight moved)."""
    root = tmp_path_factory.mktemp("heads")
    model = tiny_llama(tiny_tokenizer, seed=0)
    model.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
    paths = {name: root / name for name in ("plain", "zero", "trained")}
    model.save_pretrained(paths["plain"])
    model = ValueHeadForCausalLM.from_causal_lm(model)
    model.save_pretrained(paths["zero"])
    randomize_value_head(model).save_pretrained(paths["trained"])
    for path in paths.values():
        tiny_tokenizer.save_pretrained(path)
    return {name: str(path) for name, path in paths.items()}


def test_every_untrained_head_is_recognised(tiny_tokenizer, checkpoints):
    new = ValueHeadForCausalLM.from_causal_lm(tiny_llama(tiny_tokenizer, seed=0))
    assert "no v_head.* weights" in untrained_value_head_reason(new)
    from_config = value_head_class(type(new).__mro__[2])(new.config)
    assert from_config.value_head_loaded is False
    assert "no v_head.* weights" in untrained_value_head_reason(from_config)
    plain = ValueHeadForCausalLM.from_pretrained(checkpoints["plain"])
    assert "no v_head.* weights" in untrained_value_head_reason(plain)
    zero = ValueHeadForCausalLM.from_pretrained(checkpoints["zero"])
    assert zero.value_head_loaded is True  # loaded from the checkpoint, but never trained
    assert (
        untrained_value_head_reason(zero) == "its v_head weights are all zero: V is the same for every state"
    )
    assert untrained_value_head_reason(ValueHeadForCausalLM.from_pretrained(checkpoints["trained"])) is None
    assert untrained_value_head_reason(tiny_llama(tiny_tokenizer)) is None  # no head: not judged here
    # A head trained in memory counts as trained: one step of a value loss moves the zero weight.
    ids = tiny_tokenizer(TEXTS[:1], return_tensors="pt")["input_ids"]
    optimizer = torch.optim.SGD(new.v_head.parameters(), lr=0.1)
    ((new(input_ids=ids).values[0, -1] - 1.0) ** 2).backward()
    optimizer.step()
    assert untrained_value_head_reason(new) is None
    # The checkpoint files alone (what the vLLM path reads) tell the same.
    assert untrained_head_reason(checkpoints["zero"]) == untrained_value_head_reason(zero)
    assert untrained_head_reason(checkpoints["trained"]) is None
    assert untrained_head_reason(checkpoints["plain"]) is None  # no head tensors: "no value head" elsewhere


def test_hf_backend_refuses_values_from_an_untrained_head(checkpoints, tiny_tokenizer):
    model = ValueHeadForCausalLM.from_pretrained(checkpoints["plain"]).eval()
    backend = HFBackend(model, tiny_tokenizer)
    with pytest.raises(UntrainedValueHeadError) as caught:
        backend.values(TEXTS)
    message = str(caught.value)
    assert checkpoints["plain"] in message  # names the checkpoint
    assert "value_sft" in message and "svpo" in message and "allow_untrained_value_head" in message
    with pytest.raises(UntrainedValueHeadError, match="all zero"):
        HFBackend(ValueHeadForCausalLM.from_pretrained(checkpoints["zero"]), tiny_tokenizer).values(TEXTS)
    with pytest.raises(UntrainedValueHeadError, match="built in memory"):
        HFBackend(ValueHeadForCausalLM.from_causal_lm(tiny_llama(tiny_tokenizer)), tiny_tokenizer).values(
            TEXTS
        )
    # The opt-out warns (once) and returns the constant values.
    allowed = HFBackend(model, tiny_tokenizer, allow_untrained_value_head=True)
    with pytest.warns(UserWarning, match="never trained"):
        values = allowed.values(TEXTS)
    assert values == [0.0, 0.0]
    trained = HFBackend(ValueHeadForCausalLM.from_pretrained(checkpoints["trained"]), tiny_tokenizer)
    values = trained.values(TEXTS)
    assert len(set(values)) == 2  # a trained head tells the states apart


def test_sbs_evaluate_and_mcts_refuse_before_searching(checkpoints, tiny_tokenizer, tmp_path):
    from svpo_trl.evaluation import evaluate
    from svpo_trl.search.mcts import MCTSAnnotator, MCTSConfig
    from svpo_trl.search.sbs import SBSConfig, SBSGenerator

    model = ValueHeadForCausalLM.from_pretrained(checkpoints["plain"]).eval()
    backend = HFBackend(model, tiny_tokenizer, seed=0)
    with pytest.raises(UntrainedValueHeadError, match="value_sft"):
        SBSGenerator(backend, SBSConfig(beam_width=1, num_samples=2), sandbox=ConstantSandbox())
    problems = [{"id": "q", "question": "What is 1 + 1?", "answer": "2"}]
    with pytest.raises(UntrainedValueHeadError):
        evaluate(backend, problems, "sbs(1,2)", sandbox=ConstantSandbox(), progress=False)
    assert backend.calls == 0  # refused before the first generate call
    # Strategies without values still run with the same backend.
    greedy = evaluate(backend, problems, "greedy", sandbox=ConstantSandbox(), max_depth=1, max_new_tokens=4)
    assert greedy.metrics["num_problems"] == 1 and greedy.records[0]["value"] is None
    config = MCTSConfig(max_simulations=1, max_trees=1, num_children=2, max_new_tokens=4, progress=False)
    config.value_leaf_evaluation = True
    with pytest.raises(UntrainedValueHeadError):
        MCTSAnnotator(backend, config, sandbox=ConstantSandbox()).annotate(problems, tmp_path / "ann")
    assert not list((tmp_path / "ann" / "shards").glob("*/tree_*.json"))


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_make_backend_refuses_before_any_engine(checkpoints, backend):
    # vLLM is never imported on the refused paths: these run without it.
    with pytest.raises(UntrainedValueHeadError, match="all zero") as caught:
        make_backend(backend, checkpoints["zero"], require_value_head=True)
    assert checkpoints["zero"] in str(caught.value)
    with pytest.raises(ValueError, match=r"no value head.*value_sft or svpo"):
        make_backend(backend, checkpoints["plain"], require_value_head=True)


def test_make_backend_hf_value_leaf_evaluation_and_opt_out(checkpoints):
    # annotate with value_leaf_evaluation asks for a head (value_head=True): a plain checkpoint gets a new,
    # untrained one, refused.
    with pytest.raises(UntrainedValueHeadError, match=r"no v_head\.\* weights") as caught:
        make_backend("hf", checkpoints["plain"], value_head=True)
    assert checkpoints["plain"] in str(caught.value)
    backend = make_backend(
        "hf", checkpoints["zero"], require_value_head=True, allow_untrained_value_head=True
    )
    with pytest.warns(UserWarning, match="never trained"):
        assert backend.values(TEXTS) == [0.0, 0.0]
    assert make_backend("hf", checkpoints["trained"], require_value_head=True).values(TEXTS)[0] != 0.0
    # Generation without values never looks at the head.
    assert isinstance(make_backend("hf", checkpoints["zero"]), HFBackend)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed: the engine would start")
def test_make_backend_vllm_passes_a_trained_head_to_the_engine(checkpoints):
    # Past the head checks, the next thing is starting vLLM: without it, its install hint.
    with pytest.raises(ImportError, match=r"svpo_trl\[vllm\]"):
        make_backend("vllm", checkpoints["trained"], require_value_head=True)
    with pytest.raises(ImportError, match=r"svpo_trl\[vllm\]"):
        make_backend("vllm", checkpoints["zero"], require_value_head=True, allow_untrained_value_head=True)


def test_pipeline_stages_refuse_an_untrained_head(checkpoints, tmp_path):
    from svpo_trl.pipeline import AnnotateScriptArguments, EvaluateArguments, run_annotate, run_evaluate
    from svpo_trl.search.mcts import MCTSConfig

    args = EvaluateArguments(
        model_name_or_path=checkpoints["zero"],
        output_dir=str(tmp_path / "eval"),
        datasets=["toy"],
        strategies=["greedy", "sbs(1,2)"],
        limit=1,
        max_depth=1,
        max_new_tokens=4,
    )
    with pytest.raises(UntrainedValueHeadError, match="all zero"):
        run_evaluate(args)
    assert not (tmp_path / "eval").exists()  # refused before greedy ran either
    args.allow_untrained_value_head = True
    with pytest.warns(UserWarning, match="never trained"):
        rows = run_evaluate(args)
    assert [r["strategy"] for r in rows] == ["greedy", "SBS (B1=1, B2=2)"]
    annotate = AnnotateScriptArguments(model_name_or_path=checkpoints["plain"], limit=1)
    config = MCTSConfig(output_dir=str(tmp_path / "ann"), value_leaf_evaluation=True, progress=False)
    with pytest.raises(UntrainedValueHeadError, match=r"no v_head\.\* weights"):
        run_annotate(annotate, config)
