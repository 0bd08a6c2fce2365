"""HFBackend on the tiny Llama: shapes, stop strings, seeds, greedy, log-probs, padding, values."""

from __future__ import annotations

import pytest
import torch

from svpo_trl.search.backends import Completion, GenerationBackend, HFBackend
from svpo_trl.steps import DEFAULT_FORMAT

from conftest import FIGURE5_QUESTION, randomize_value_head

PROMPTS = [
    DEFAULT_FORMAT.prompt(FIGURE5_QUESTION),
    "<step>\n<p>\n",
    "a = 3\nb = 4\nprint(a + b * 2 - 7 // 2)\n",
]


def _greedy_reference(model, backend, prompt, max_new_tokens):
    """Greedy decoding by hand (argmax over full forwards, no cache) with raw log-probs."""
    ids = backend._encode(prompt)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids + tokens])).logits[0, -1]
        lp = torch.log_softmax(logits.float(), -1)
        tok = int(lp.argmax())
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        if tok == backend.tokenizer.eos_token_id:
            break
    return tokens, logprobs


def test_protocol_and_shapes(tiny_model, tiny_tokenizer):
    backend = HFBackend(tiny_model, tiny_tokenizer, batch_size=4, seed=0)
    assert isinstance(backend, GenerationBackend)
    out = backend.generate(PROMPTS[:2], n=3, temperature=1.0, max_new_tokens=6, stop=[])
    assert [len(group) for group in out] == [3, 3]
    for group in out:
        for c in group:
            assert isinstance(c, Completion)
            assert 1 <= c.num_tokens <= 6
            assert len(c.token_ids) == c.num_tokens
            assert all(lp <= 0 for lp in c.token_logprobs)
            # Without stop strings a row ends at EOS ("stop") or at the budget ("length").
            ended_by_eos = c.token_ids[-1] == tiny_tokenizer.eos_token_id
            assert c.finish_reason == ("stop" if ended_by_eos else "length")
            if not ended_by_eos:
                assert c.num_tokens == 6
    assert backend.tokens_generated == sum(c.num_tokens for g in out for c in g)


def test_greedy_equals_model_generate_and_manual_logprobs(tiny_model, tiny_tokenizer):
    backend = HFBackend(tiny_model, tiny_tokenizer)
    [[c]] = backend.generate(PROMPTS[:1], n=1, temperature=0.0, max_new_tokens=12, stop=[])
    ids = torch.tensor([backend._encode(PROMPTS[0])])
    reference = tiny_model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12
    )
    assert c.token_ids == reference[0, ids.shape[1] :].tolist()
    tokens, logprobs = _greedy_reference(tiny_model, backend, PROMPTS[0], 12)
    assert c.token_ids == tokens
    assert c.token_logprobs == pytest.approx(logprobs, abs=1e-4)
    assert c.text == tiny_tokenizer.decode(tokens, skip_special_tokens=True)


def test_sampled_logprobs_are_raw_policy_logprobs(tiny_model, tiny_tokenizer):
    # Sampled at temperature 2, but the log-probs are those of the untempered model (Eq. 4's pi).
    backend = HFBackend(tiny_model, tiny_tokenizer, seed=3)
    out = backend.generate(PROMPTS[:2], n=2, temperature=2.0, max_new_tokens=8, stop=[])
    for prompt, group in zip(PROMPTS, out):
        for c in group:
            ids = backend._encode(prompt) + c.token_ids
            with torch.no_grad():
                logits = tiny_model(torch.tensor([ids])).logits[0]
            start = len(ids) - c.num_tokens
            lp = torch.log_softmax(logits[start - 1 : -1].float(), -1)
            manual = lp.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1).tolist()
            assert c.token_logprobs == pytest.approx(manual, abs=1e-4)


def test_stop_string_cuts_text_and_tokens(tiny_model, tiny_tokenizer):
    backend = HFBackend(tiny_model, tiny_tokenizer)
    [[free]] = backend.generate(PROMPTS[:1], n=1, temperature=0.0, max_new_tokens=16, stop=[])
    # A stop string that greedy decoding is known to produce: two characters from the middle.
    mid = len(free.text) // 2
    stop = free.text[mid : mid + 2]
    assert len(stop) == 2
    cut = free.text.find(stop) + len(stop)
    [[c]] = backend.generate(PROMPTS[:1], n=1, temperature=0.0, max_new_tokens=16, stop=["never-there", stop])
    assert c.finish_reason == "stop"
    assert c.text == free.text[:cut]
    # Generation halted at the token completing the stop string: a prefix of the free run, no padding.
    assert c.token_ids == free.token_ids[: c.num_tokens]
    assert stop in tiny_tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert stop not in tiny_tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
    assert c.token_logprobs == pytest.approx(free.token_logprobs[: c.num_tokens], abs=1e-5)


def test_seeds_reproducible(tiny_model, tiny_tokenizer):
    def run(seed):
        backend = HFBackend(tiny_model, tiny_tokenizer, batch_size=4, seed=seed)
        first = backend.generate(PROMPTS[:2], n=2, temperature=1.0, max_new_tokens=5, stop=[])
        second = backend.generate(PROMPTS[:2], n=2, temperature=1.0, max_new_tokens=5, stop=[])
        return [[c.token_ids for c in g] for g in first], [[c.token_ids for c in g] for g in second]

    torch.manual_seed(123)
    before = torch.rand(1)
    a1, a2 = run(7)
    b1, b2 = run(7)
    c1, _ = run(8)
    assert (a1, a2) == (b1, b2)
    assert a1 != a2  # successive calls draw fresh samples
    assert a1 != c1
    # The backend's seeding leaves the global RNG alone.
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)


def test_left_padding_matches_unbatched(tiny_model, tiny_tokenizer):
    backend = HFBackend(tiny_model, tiny_tokenizer, batch_size=8)
    batched = backend.generate(PROMPTS, n=2, temperature=0.0, max_new_tokens=10, stop=["</step>"])
    for prompt, group in zip(PROMPTS, batched):
        [[single]] = backend.generate([prompt], n=1, temperature=0.0, max_new_tokens=10, stop=["</step>"])
        for c in group:
            assert c.token_ids == single.token_ids
            assert c.text == single.text
            assert c.token_logprobs == pytest.approx(single.token_logprobs, abs=1e-4)


def test_chunking_keeps_prompt_order(tiny_model, tiny_tokenizer):
    # batch_size 1 vs 8: same greedy results, in prompt order.
    small = HFBackend(tiny_model, tiny_tokenizer, batch_size=1)
    big = HFBackend(tiny_model, tiny_tokenizer, batch_size=8)
    a = small.generate(PROMPTS, n=1, temperature=0.0, max_new_tokens=5, stop=[])
    b = big.generate(PROMPTS, n=1, temperature=0.0, max_new_tokens=5, stop=[])
    assert [g[0].token_ids for g in a] == [g[0].token_ids for g in b]
    assert small.generate([], n=1, temperature=0.0, max_new_tokens=5, stop=[]) == []


def test_bad_arguments(tiny_model, tiny_tokenizer):
    backend = HFBackend(tiny_model, tiny_tokenizer)
    with pytest.raises(ValueError, match="n must be >= 1"):
        backend.generate(PROMPTS, n=0, temperature=1.0, max_new_tokens=4, stop=[])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        backend.generate(PROMPTS, n=1, temperature=-1.0, max_new_tokens=4, stop=[])
    with pytest.raises(ValueError, match="batch_size"):
        HFBackend(tiny_model, tiny_tokenizer, batch_size=0)


def test_values_needs_a_value_head(tiny_model, tiny_tokenizer):
    backend = HFBackend(tiny_model, tiny_tokenizer)
    with pytest.raises(TypeError, match="has no value head"):
        backend.values(PROMPTS)


def test_values_at_last_token_batched_equals_unbatched(tiny_model, tiny_tokenizer):
    from svpo_trl.models.value_head import ValueHeadForCausalLM

    model = randomize_value_head(ValueHeadForCausalLM.from_causal_lm(tiny_model))
    backend = HFBackend(model, tiny_tokenizer, batch_size=2)
    texts = [PROMPTS[0] + "<step>\n<p>\n", PROMPTS[1], PROMPTS[2]]
    values = backend.values(texts)
    assert len(values) == 3
    for text, value in zip(texts, values):
        ids = torch.tensor([backend._encode(text)])
        with torch.no_grad():
            expected = model(input_ids=ids).values[0, -1].item()
        assert value == pytest.approx(expected, abs=1e-5)
        assert -1.0 <= value <= 1.0
    assert len({round(v, 6) for v in values}) == 3  # different states, different values


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_model, tiny_tokenizer):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from svpo_trl.models.value_head import ValueHeadForCausalLM

    model = randomize_value_head(ValueHeadForCausalLM.from_causal_lm(tiny_model))
    cpu = HFBackend(model, tiny_tokenizer)
    expected = cpu.generate(PROMPTS, n=2, temperature=0.0, max_new_tokens=8, stop=["</step>"])
    expected_values = cpu.values(PROMPTS)
    gpu = HFBackend(model.to("cuda"), tiny_tokenizer)
    assert gpu.device.type == "cuda"
    got = gpu.generate(PROMPTS, n=2, temperature=0.0, max_new_tokens=8, stop=["</step>"])
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in expected]
    assert gpu.values(PROMPTS) == pytest.approx(expected_values, abs=1e-4)
    sampled = HFBackend(model, tiny_tokenizer, seed=1).generate(
        PROMPTS, n=2, temperature=1.0, max_new_tokens=8, stop=[]
    )
    again = HFBackend(model, tiny_tokenizer, seed=1).generate(
        PROMPTS, n=2, temperature=1.0, max_new_tokens=8, stop=[]
    )
    assert [[c.token_ids for c in g] for g in sampled] == [[c.token_ids for c in g] for g in again]
