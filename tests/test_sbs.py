"""Step-level beam search (§3.3) and greedy decoding, hand-traced on a scripted tree."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from svpo_trl.search.sbs import SBSConfig, SBSGenerator, greedy
from svpo_trl.search.testing import ScriptedBackend


@dataclass
class FakeExecResult:
    stdout: str = ""
    error: str | None = None
    timed_out: bool = False


class FakeSandbox:
    """Stand-in for the sandbox collaborator: every snippet prints 1."""

    def __init__(self):
        self.calls = 0

    def run_many(self, snippet_lists, max_workers=None):
        self.calls += 1
        return [FakeExecResult(stdout="1\n") for _ in snippet_lists]


def code(label: str) -> str:
    return f"<step>\n<p>\nlabel={label}\n</p>\n<code>\n```python\nprint(1)\n```\n</code>"


def answer(label: str, value: str) -> str:
    return f"<step>\n<p>\nlabel={label}\n</p>\n<p>\nFinal Answer: ${value}$\n</p>\n</step>"


def malformed(label: str) -> str:
    return f"label={label} no tags</step>"


# Per question, the completions after each state (keyed by the last step's label) and each state's value.
TREES = {
    "Q": {
        "ROOT": [answer("A1", "7"), code("C1"), code("C2"), answer("A2", "8"), malformed("M1")],
        "C1": [answer("A3", "7"), answer("A4", "9"), code("C3")],
        "C2": [answer("A5", "10"), code("C4")],
    },
    "G": {"ROOT": [code("C1")], "C1": [answer("A1", "42")]},
    "D": {"ROOT": [code("C1")], "C1": [code("C2")], "C2": [code("C3")]},
    "M": {"ROOT": [malformed("M1"), answer("A1", "5")]},
    "MM": {"ROOT": [malformed("M1"), malformed("M2")]},
}
VALUES = {
    "M2": 0.1, "A1": 0.2, "C1": 0.9, "C2": 0.5, "A2": 0.7, "M1": 0.95,
    "A3": 0.6, "A4": 0.8, "C3": 0.3, "A5": 0.85, "C4": 0.75,
}  # fmt: skip


def _question(text: str) -> str:
    return re.search(r"<question>(.*?)</question>", text, re.DOTALL).group(1)


def _last_label(text: str) -> str:
    labels = re.findall(r"label=(\w+)", text)
    return labels[-1] if labels else "ROOT"


class RecordingBackend(ScriptedBackend):
    """The scripted backend, also recording each call's n/temperature and every values() batch."""

    def __init__(self, use_values: bool = True):
        super().__init__(
            script=lambda prompt: TREES[_question(prompt)][_last_label(prompt)],
            value_fn=(lambda text: VALUES[_last_label(text)]) if use_values else None,
        )
        self.settings: list[tuple[int, float]] = []
        self.value_batches: list[list[str]] = []

    def generate(self, prompts, *, n, temperature=1.0, max_new_tokens=256, stop=None):
        self.settings.append((n, temperature))
        return super().generate(
            prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, stop=stop
        )

    def values(self, texts):
        self.value_batches.append(list(texts))
        return super().values(texts)


def _labels(result) -> list[str]:
    return [_last_label(s.text) for s in result.steps]


def test_b1_1_trace():
    backend = RecordingBackend()
    sbs = SBSGenerator(backend, SBSConfig(beam_width=1, num_samples=4), sandbox=FakeSandbox())
    [result] = sbs.generate(["Q"])
    # B2 = 4 leaves M1 out. Round 1: C1 (0.9) > A2 (0.7) > C2 (0.5) > A1 (0.2): keep C1.
    # Round 2 from C1 (A3, A4, C3, A3 -> deduplicated A3, A4, C3): A4 (0.8) is terminal and the best.
    assert _labels(result) == ["C1", "A4"]
    assert result.final_answer == "9"
    assert result.value == pytest.approx(0.8)
    assert result.finished
    assert result.solution == "".join(s.text for s in result.steps)
    assert "<output>\n1\n</output>" in result.steps[0].text
    assert [len(b) for b in backend.calls] == [1, 1]
    assert backend.settings == [(4, 0.6), (4, 0.6)]
    assert [len(b) for b in backend.value_batches] == [4, 3]
    assert result.num_tokens == backend.tokens_generated
    assert [c["final_answer"] for c in result.candidates] == ["9"]


def test_malformed_candidate_never_takes_the_slot():
    # B2 = 5 includes M1 (0.95, malformed: terminal and known wrong). It must not take B1 = 1's only slot
    # (that ended the search with no answer); C1 (0.9) does, then A4 (0.8) as in the B2 = 4 trace.
    backend = RecordingBackend()
    [result] = SBSGenerator(backend, SBSConfig(beam_width=1, num_samples=5), sandbox=FakeSandbox()).generate(
        ["Q"]
    )
    assert _labels(result) == ["C1", "A4"]
    assert result.final_answer == "9" and result.finished
    assert len(backend.calls) == 2


def test_malformed_candidates_only_when_nothing_else():
    # Every candidate malformed: one is still kept (the search ends, with no answer).
    backend = RecordingBackend()
    [result] = SBSGenerator(backend, SBSConfig(beam_width=1, num_samples=2), sandbox=FakeSandbox()).generate(
        ["MM"]
    )
    assert _labels(result) == ["M1"]  # the higher-valued of the two
    assert result.final_answer is None and result.finished


def test_b1_3_trace():
    backend = RecordingBackend()
    sbs = SBSGenerator(backend, SBSConfig(beam_width=3, num_samples=4), sandbox=FakeSandbox())
    [result] = sbs.generate(["Q"])
    # Round 1 keeps C1 (0.9), A2 (0.7, terminal: finished, width 3 -> 2), C2 (0.5).
    # Round 2: from C1 A3 0.6, A4 0.8, C3 0.3; from C2 A5 0.85, C4 0.75 (C2's list cycles: A5, C4, A5, C4).
    # Width 2 keeps A5 (finished, -> 1) and A4 (finished, -> 0); C4 (0.75) is not kept.
    assert len(backend.calls) == 2
    assert [_last_label(p) for p in backend.calls[1]] == ["C1", "C2"]
    assert [len(b) for b in backend.value_batches] == [4, 5]
    assert [(c["final_answer"], c["value"]) for c in result.candidates] == [
        ("8", 0.7),
        ("10", 0.85),
        ("9", 0.8),
    ]
    # The answer is the best-valued finished solution.
    assert _labels(result) == ["C2", "A5"]
    assert result.final_answer == "10"
    assert result.value == pytest.approx(0.85)


def test_duplicates_are_scored_only_when_kept():
    backend = RecordingBackend()
    config = SBSConfig(beam_width=3, num_samples=4, remove_duplicates=False)
    [result] = SBSGenerator(backend, config, sandbox=FakeSandbox()).generate(["Q"])
    assert [len(b) for b in backend.value_batches] == [4, 8]
    # Duplicates of A4 (0.8) now fill the second slot: A5 then A4, same answer as with deduplication.
    assert result.final_answer == "10"


def test_answer_beats_higher_valued_malformed():
    backend = RecordingBackend()
    [result] = SBSGenerator(backend, SBSConfig(beam_width=2, num_samples=2), sandbox=FakeSandbox()).generate(
        ["M"]
    )
    # Both candidates finish in round 1: M1 (0.95, malformed) and A1 (0.2, answer 5): the answer wins.
    assert result.final_answer == "5"
    assert result.value == pytest.approx(0.2)
    assert len(result.candidates) == 2


def test_greedy_path_through_the_same_code():
    backend = RecordingBackend(use_values=False)  # values() would raise: greedy must not call it
    [result] = greedy(backend, ["G"], sandbox=FakeSandbox())
    assert _labels(result) == ["C1", "A1"]
    assert result.final_answer == "42"
    assert result.value is None
    assert backend.settings == [(1, 0.0), (1, 0.0)]
    config = SBSConfig.greedy()
    assert (config.beam_width, config.num_samples, config.temperature, config.use_value) == (1, 1, 0.0, False)


def test_max_depth_finishes_beams():
    backend = RecordingBackend(use_values=False)
    [result] = greedy(backend, ["D"], sandbox=FakeSandbox(), max_depth=2)
    assert _labels(result) == ["C1", "C2"]
    assert not result.finished
    assert result.final_answer is None
    assert len(backend.calls) == 2


def test_batched_across_questions():
    backend = RecordingBackend()
    sandbox = FakeSandbox()
    sbs = SBSGenerator(backend, SBSConfig(beam_width=3, num_samples=4), sandbox=sandbox)
    results = sbs.generate(["Q", "G"])
    # One sampler call and one values call per round, for all live beams of both questions.
    assert [len(c) for c in backend.calls] == [2, 3]
    assert len(backend.value_batches) == 2 and sbs.value_calls == 2
    assert sandbox.calls == 2
    assert [r.final_answer for r in results] == ["10", "42"]
    assert [r.question for r in results] == ["Q", "G"]


def test_prior_ranking_without_value():
    backend = ScriptedBackend(
        {"<question>P</question>\n": [(answer("X", "1"), 0.2), (answer("Y", "2"), 0.9)]}
    )
    config = SBSConfig(beam_width=1, num_samples=2, use_value=False)
    [result] = SBSGenerator(backend, config, sandbox=FakeSandbox()).generate(["P"])
    assert result.final_answer == "2"
    assert result.steps[0].prior == pytest.approx(0.9)


RANKED = {
    "<question>R</question>\n": [(answer("X", "1"), 0.2), (answer("Y", "2"), 0.9), (answer("Z", "3"), 0.5)]
}
RANKED_VALUES = {"X": 0.9, "Y": 0.1, "Z": 0.5}


@pytest.mark.parametrize(
    ("ranker", "weight", "expected"),
    [
        ("value", 0.5, "1"),  # the paper: V picks X (0.9)
        ("prior", 0.5, "2"),  # the policy's prior picks Y (0.9)
        # z(prior) = (-1.16, 1.28, -0.12), z(V) = (1.22, -1.22, 0): Y at weight 0.5 (0.67 > -0.12 > -0.55) ...
        ("value+prior", 0.5, "2"),
        ("value+prior", 2.0, "1"),  # ... X at weight 2 (1.29 > -0.12 > -1.17)
    ],
)
def test_rankers_order_the_candidates(ranker, weight, expected):
    backend = ScriptedBackend(RANKED, value_fn=lambda text: RANKED_VALUES[_last_label(text)])
    calls = []
    backend_values = backend.values
    backend.values = lambda texts: calls.append(texts) or backend_values(texts)
    config = SBSConfig(beam_width=1, num_samples=3, ranker=ranker, value_weight=weight)
    generator = SBSGenerator(backend, config, sandbox=FakeSandbox())
    [result] = generator.generate(["R"])
    assert result.final_answer == expected
    # the prior ranker reads no value head at all: it runs on a policy without one
    assert (len(calls), generator.value_calls) == ((0, 0) if ranker == "prior" else (1, 1))


def test_prior_ranker_needs_no_value_head():
    backend = ScriptedBackend(RANKED)  # no value_fn: values() raises
    [result] = SBSGenerator(
        backend, SBSConfig(num_samples=3, ranker="prior"), sandbox=FakeSandbox()
    ).generate(["R"])
    assert result.final_answer == "2" and result.value is None
    with pytest.raises(ValueError, match="ranker must be one of value, prior, value\\+prior, got 'vaule'"):
        SBSConfig(ranker="vaule")


def test_bad_config_and_questions():
    with pytest.raises(ValueError, match="beam_width"):
        SBSConfig(beam_width=0)
    with pytest.raises(ValueError, match="temperature"):
        SBSConfig(temperature=-0.1)
    sbs = SBSGenerator(RecordingBackend(), sandbox=FakeSandbox())
    with pytest.raises(ValueError, match=r"questions\[1\]"):
        sbs.generate(["Q", ""])


# ---------------------------------------------------------------------- with a real tiny model
def _value_model(tokenizer, memorize_figure5: bool):
    """A tiny Llama with a value head; optionally overfit on the Figure 5 solution so it writes steps."""
    import torch

    from svpo_trl.models.value_head import ValueHeadForCausalLM
    from svpo_trl.steps import DEFAULT_FORMAT
    from svpo_trl.tokenization import tokenize_solution
    from svpo_trl.toy import tiny_llama

    from conftest import FIGURE5_QUESTION, FIGURE5_STEPS, randomize_value_head

    # A head with seeded random weights stands in for a trained one (SBS refuses a head never trained).
    model = randomize_value_head(ValueHeadForCausalLM.from_causal_lm(tiny_llama(tokenizer, seed=0)))
    if memorize_figure5:
        tok = tokenize_solution(
            tokenizer, DEFAULT_FORMAT.prompt(FIGURE5_QUESTION), FIGURE5_STEPS, add_eos=True
        )
        ids = torch.tensor([tok.input_ids])
        labels = torch.tensor([[i if m else -100 for i, m in zip(tok.input_ids, tok.completion_mask)]])
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
        torch.manual_seed(0)
        for _ in range(90):
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model


def test_sbs_with_real_value_head_model(tiny_tokenizer):
    # An untrained model never closes a step within 6 tokens: every candidate is malformed and
    # finishes in round 1; the answer is the best-valued of the finished beams, valued by the head.
    from svpo_trl.search.backends import HFBackend

    backend = HFBackend(_value_model(tiny_tokenizer, memorize_figure5=False), tiny_tokenizer, seed=0)
    config = SBSConfig(beam_width=2, num_samples=3, max_new_tokens=6)
    results = SBSGenerator(backend, config, sandbox=FakeSandbox()).generate(
        ["What is 1 + 1?", "What is 2 * 3?"]
    )
    for question, result in zip(["What is 1 + 1?", "What is 2 * 3?"], results):
        assert result.steps[0].is_malformed and result.finished and result.final_answer is None
        assert len(result.candidates) == 2
        assert result.value == max(c["value"] for c in result.candidates)
        [expected] = backend.values([f"<question>{question}</question>\n" + result.solution])
        assert result.value == pytest.approx(expected, abs=1e-5)
        assert 1 <= result.num_tokens <= 3 * 6


@pytest.mark.slow
def test_sbs_and_greedy_end_to_end_with_real_sandbox(tiny_tokenizer):
    # A tiny policy that memorized Figure 5 writes the code step, the real sandbox prints 50, and the
    # policy reads it into its final answer: generation, stop strings, execution, values, beams.
    from svpo_trl.sandbox import PythonSandbox
    from svpo_trl.search.backends import HFBackend

    from conftest import FIGURE5_QUESTION, FIGURE5_STEPS

    backend = HFBackend(_value_model(tiny_tokenizer, memorize_figure5=True), tiny_tokenizer, seed=0)
    with PythonSandbox() as sandbox:
        [g] = greedy(backend, [FIGURE5_QUESTION], sandbox=sandbox)
        results = SBSGenerator(backend, SBSConfig(beam_width=2, num_samples=3), sandbox=sandbox).generate(
            [FIGURE5_QUESTION, FIGURE5_QUESTION]
        )
    assert g.final_answer == "50" and g.value is None
    assert g.solution == "".join(FIGURE5_STEPS)
    assert g.steps[0].output == "50"
    for r in results:
        assert r.final_answer == "50"
        assert r.steps[0].kind == "code" and r.steps[0].output == "50"
        assert -1.0 <= r.value <= 1.0
        assert r.num_tokens >= sum(s.num_tokens for s in r.steps)
