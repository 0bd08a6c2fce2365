"""Value-guided step-level beam search (SBS, paper §3.3) and greedy decoding through the same loop.

Every round, each live beam samples ``B2`` next steps (one `StepSampler` call for all beams of all
questions), every candidate state is scored by the value head (one ``backend.values`` call), and each
question keeps its best ``B1`` candidates. As in AlphaMath's step beam search (``SBSREACT``), a kept
candidate that is terminal leaves the beam for the finished list and the question's beam width
shrinks by one; the answer is the best-valued finished solution. Greedy decoding is
``B1 = B2 = 1`` at temperature 0 with no value calls: the policy alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..steps import DEFAULT_FORMAT, Step, StepFormat
from .backends import GenerationBackend
from .sampler import StepSampler
from .state import State

RANKERS = ("value", "prior", "value+prior")
"""The rankers of :attr:`SBSConfig.ranker`: the paper's value head, the policy's prior, or both."""


@dataclass
class SBSConfig:
    """Step-level beam search settings (§3.3, Table 2).

    Args:
        beam_width: ``B1``, beams kept per question. Paper: 1 and 3 (Table 2); default 1.
        num_samples: ``B2``, steps sampled per beam each round. Paper: 5 ("By default B2 = 5").
        temperature: sampling temperature of the ``B2`` candidates. The paper does not state it; the
            default 0.6 is AlphaMath's SBS setting (``configs/sbs_sft.yaml``), the search this paper
            reuses: sampling is needed for ``B2`` distinct candidates, a low temperature keeps them on
            the policy's likely paths.
        max_depth: most steps in a solution; beams that reach it are finished. Paper (A.1): 8.
        max_new_tokens: token budget of one step; a step that exhausts it is malformed.
        use_value: rank candidates by the value head (SBS). Without it (greedy) no value is computed and
            candidates are ranked by their step's prior (Eq. 4, mean token probability).
        remove_duplicates: drop candidates whose text repeats another candidate of the same question
            before ranking (AlphaMath's ``remove_duplicate: True``), so duplicates do not crowd out beams.
        ranker: what orders a question's candidates (with ``use_value``; :data:`RANKERS`):

            - ``"value"`` (default, the paper, §3.3): V of the value head at the candidate's step end.
            - ``"prior"``: the step's prior, Eq. 4's mean token probability under the policy; needs no value
              head and makes no value call. Measured on the miniature (``benchmarks/value_lab.py``, 3 seeds,
              held-out states of 300 test problems, B2 = 5): it orders on-track above off-track siblings in
              71-83% of pairs, the SVPO value head in 41-59%; see docs/value_lab.md for SBS accuracy.
            - ``"value+prior"``: both, standardised over the question's candidates of the round (z-scores),
              ``z(prior) + value_weight * z(V)``.
        value_weight: weight of V in ``"value+prior"`` (default 0.5: in the lab, 0.5 matched the prior, more
            weight on V ranked worse).
    """

    beam_width: int = 1
    num_samples: int = 5
    temperature: float = 0.6
    max_depth: int = 8
    max_new_tokens: int = 256
    use_value: bool = True
    remove_duplicates: bool = True
    ranker: str = "value"
    value_weight: float = 0.5

    def __post_init__(self):
        if self.ranker not in RANKERS:
            raise ValueError(f"SBSConfig.ranker must be one of {', '.join(RANKERS)}, got {self.ranker!r}")
        for name in ("beam_width", "num_samples", "max_depth", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SBSConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"SBSConfig.temperature must be >= 0, got {self.temperature}")

    @property
    def needs_value(self) -> bool:
        """Whether ranking reads the value head (``use_value`` and a ranker other than ``"prior"``)."""
        return self.use_value and self.ranker != "prior"

    @classmethod
    def greedy(cls, **overrides: Any) -> SBSConfig:
        """Greedy decoding (Table 2, "Greedy"): ``B1 = B2 = 1``, temperature 0, no value calls."""
        settings = {"beam_width": 1, "num_samples": 1, "temperature": 0.0, "use_value": False}
        return cls(**{**settings, **overrides})


@dataclass
class SBSResult:
    """The chosen solution of one question.

    ``solution`` is the steps' text (without the prompt); ``value`` the value head's estimate of the
    final state (None without a value head); ``num_tokens`` every token generated for this question,
    all candidates and rounds included (the compute spent; the chosen path's own tokens are
    ``sum(s.num_tokens for s in steps)``); ``finished`` whether the solution ends in a terminal step
    (an answer or a malformed step) rather than at ``max_depth``; ``candidates`` one summary
    (``final_answer``, ``value``, ``depth``) per finished beam, in the order they finished.
    """

    question: str
    solution: str
    steps: list[Step]
    final_answer: str | None
    value: float | None
    num_tokens: int
    finished: bool
    candidates: list[dict] = field(default_factory=list)


Ranker = Callable[[list[int], list[State], list[float | None]], list[float]]
"""``ranker(owners, candidates, values) -> scores``: one score per candidate state (higher is better).

``owners[i]`` is the index (in the searched batch) of the question ``candidates[i]`` belongs to and
``values[i]`` its value-head estimate (None without ``use_value``). Called once per round with every
candidate of every question, so a ranker can batch its own work (e.g. oracle labels, rollouts)."""


@dataclass
class _Beam:
    state: State
    score: float
    value: float | None


class SBSGenerator:
    """Step-level beam search over many questions at once (§3.3).

    Args:
        backend: a `GenerationBackend`; with ``config.use_value`` it must implement ``values`` (a backend with
            ``check_value_head``, e.g. `HFBackend`, is checked here: an untrained head is refused).
        config: an `SBSConfig` (default: ``B1 = 1``, ``B2 = 5``); ``SBSConfig.greedy()`` for greedy.
        sampler: a `StepSampler` to reuse (its sandbox and step format); built from ``backend``,
            ``sandbox``, ``step_format`` and ``config.max_new_tokens`` when None.
        sandbox: the code sandbox when the sampler is built here (None: a ``PythonSandbox`` on first use).
        step_format: the step format when the sampler is built here.
        progress: show a tqdm bar over rounds.
    """

    def __init__(
        self,
        backend: GenerationBackend,
        config: SBSConfig | None = None,
        *,
        sampler: StepSampler | None = None,
        sandbox: Any = None,
        step_format: StepFormat = DEFAULT_FORMAT,
        progress: bool = False,
    ):
        self.backend = backend
        self.config = config if config is not None else SBSConfig()
        if sampler is None:
            sampler = StepSampler(
                backend, sandbox=sandbox, step_format=step_format, max_new_tokens=self.config.max_new_tokens
            )
        self.sampler = sampler
        self.step_format = sampler.step_format
        self.progress = progress
        self.value_calls = 0
        check = getattr(backend, "check_value_head", None)
        if self.config.needs_value and check is not None:
            check()  # refuse a head that was never trained before any search, not after the first round

    def generate(self, questions: list[str], *, ranker: Ranker | None = None) -> list[SBSResult]:
        """Solve every question; one result per question, in order.

        ``ranker`` replaces the ranking score (value, or prior without ``use_value``): the value
        diagnostic ranks by oracle labels to measure what a perfect ranker would reach.
        """
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"questions[{i}] must be a non-empty string, got {q!r}")
        states = [State(self.step_format.prompt(q)) for q in questions]
        return self._search(states, questions, ranker)

    def search(self, states: list[State], *, ranker: Ranker | None = None) -> list[SBSResult]:
        """Continue every state until it is terminal or ``max_depth`` steps deep; one result per state.

        :meth:`generate` starts from the questions' prompts; a state that already has steps (a rollout
        from a candidate step, say) keeps them in its result. A terminal state, or one already
        ``max_depth`` steps deep, is its own result. ``question`` of a result is the state's prompt.
        """
        return self._search(states, [s.prompt for s in states], ranker)

    def _search(self, states: list[State], questions: list[str], ranker: Ranker | None) -> list[SBSResult]:
        cfg = self.config
        done = [s.is_terminal or s.depth >= cfg.max_depth for s in states]
        live = [[] if d else [_Beam(s, 0.0, None)] for s, d in zip(states, done)]
        finished: list[list[_Beam]] = [[_Beam(s, 0.0, None)] if d else [] for s, d in zip(states, done)]
        width = [cfg.beam_width] * len(states)
        tokens = [0] * len(states)

        rounds = range(cfg.max_depth)
        if self.progress:
            from tqdm.auto import tqdm

            rounds = tqdm(rounds, desc="SBS rounds", unit="round")
        for _ in rounds:
            owners = [q for q, beams in enumerate(live) for _ in beams]
            if not owners:
                break
            parents = [beam.state for beams in live for beam in beams]
            next_steps = self.sampler.next_steps(parents, n=cfg.num_samples, temperature=cfg.temperature)

            candidates: list[list[State]] = [[] for _ in states]
            for q, state, steps in zip(owners, parents, next_steps):
                for step in steps:
                    tokens[q] += step.num_tokens
                    candidates[q].append(state.child(step))
            if cfg.remove_duplicates:
                candidates = [
                    list({c.text: c for c in reversed(cands)}.values())[::-1] for cands in candidates
                ]
            flat = [c for cands in candidates for c in cands]
            values = self._values([c.text for c in flat]) if cfg.needs_value else [None] * len(flat)
            if ranker is not None:
                flat_owners = [q for q, cands in enumerate(candidates) for _ in cands]
                scores = [float(s) for s in ranker(flat_owners, flat, values)]
                if len(scores) != len(flat):
                    raise RuntimeError(f"ranker returned {len(scores)} scores for {len(flat)} candidates")
            elif cfg.ranker == "value+prior" and cfg.needs_value:
                scores = _value_plus_prior(candidates, values, cfg.value_weight)
            else:
                scores = [v if v is not None else c.steps[-1].prior for c, v in zip(flat, values)]

            cursor = 0
            for q, cands in enumerate(candidates):
                scored = []
                for c in cands:
                    scored.append(_Beam(c, scores[cursor], values[cursor]))
                    cursor += 1
                # A malformed candidate is terminal and known to be wrong: it never takes a beam slot from a
                # well-formed one, whatever its value (a top-valued off-format step used to end the search
                # with no answer). Stable sort: ties keep sampling order, so results are reproducible.
                scored.sort(key=lambda b: (b.state.steps[-1].is_malformed, -b.score))
                live[q] = []
                for beam in scored[: width[q]]:
                    if beam.state.is_terminal:
                        finished[q].append(beam)
                        width[q] -= 1
                    elif beam.state.depth >= cfg.max_depth:
                        finished[q].append(beam)
                    else:
                        live[q].append(beam)
        return [
            self._result(state, question, beams, n)
            for state, question, beams, n in zip(states, questions, finished, tokens)
        ]

    def _values(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        self.value_calls += 1
        values = self.backend.values(texts)
        if len(values) != len(texts):
            raise RuntimeError(f"backend.values returned {len(values)} values for {len(texts)} texts")
        return [float(v) for v in values]

    def _result(self, start: State, question: str, finished: list[_Beam], num_tokens: int) -> SBSResult:
        # Best-valued finished solution; one with a final answer beats one without (a malformed or
        # depth-capped path cannot be right), as AlphaMath only answers from final-answer nodes.
        best = max(
            finished or [_Beam(start, 0.0, None)],
            key=lambda b: (bool(b.state.steps) and b.state.steps[-1].final_answer is not None, b.score),
        )
        steps = best.state.steps
        if not steps:  # max_depth 0 steps away, or nothing came back: no solution at all
            return SBSResult(question, "", [], None, None, num_tokens, False, [])
        return SBSResult(
            question=question,
            solution="".join(s.text for s in steps),
            steps=list(steps),
            final_answer=steps[-1].final_answer if steps[-1].is_terminal else None,
            value=best.value,
            num_tokens=num_tokens,
            finished=best.state.is_terminal,
            candidates=[
                {"final_answer": b.state.steps[-1].final_answer, "value": b.value, "depth": b.state.depth}
                for b in finished
            ],
        )


def zscores(xs: list[float]) -> list[float]:
    """``(x - mean) / std`` (population std); all 0 when the values are all equal."""
    mean = sum(xs) / len(xs)
    std = (sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5
    return [(x - mean) / std if std > 1e-12 else 0.0 for x in xs]


def _value_plus_prior(
    candidates: list[list[State]], values: list[float | None], weight: float
) -> list[float]:
    """``z(prior) + weight * z(V)`` over each question's candidates of one round (flat, in order)."""
    scores: list[float] = []
    cursor = 0
    for cands in candidates:
        if not cands:
            continue
        own = values[cursor : cursor + len(cands)]
        cursor += len(cands)
        priors = zscores([c.steps[-1].prior for c in cands])
        vs = zscores([float(v) for v in own])
        scores += [p + weight * v for p, v in zip(priors, vs)]
    return scores


def greedy(
    backend: GenerationBackend,
    questions: list[str],
    *,
    sandbox: Any = None,
    sampler: StepSampler | None = None,
    step_format: StepFormat = DEFAULT_FORMAT,
    max_depth: int = 8,
    max_new_tokens: int = 256,
    progress: bool = False,
) -> list[SBSResult]:
    """Greedy decoding of the policy alone (Table 2, "Greedy"), batched across questions."""
    config = SBSConfig.greedy(max_depth=max_depth, max_new_tokens=max_new_tokens)
    generator = SBSGenerator(
        backend, config, sampler=sampler, sandbox=sandbox, step_format=step_format, progress=progress
    )
    return generator.generate(questions)
