"""Step rankers for SBS beyond ``SBSConfig.ranker``: scores computed by another model than the searching policy.

A ranker is what :meth:`SBSGenerator.generate(..., ranker=) <svpo_trl.search.sbs.SBSGenerator.generate>` takes:
``ranker(owners, candidates, values) -> scores``, one score per candidate state, higher is better.
"""

from __future__ import annotations

from typing import Any

from .state import State


def last_step_groups(candidates: list[State]) -> list[dict[str, Any]]:
    """Each candidate state as a one-candidate group of :func:`svpo_trl.value_lab.score_candidates`: its last
    step, after the prompt and the steps before it."""
    return [
        {
            "prompt": state.prompt,
            "prefix": [s.text for s in state.steps[:-1]],
            "candidates": [{"text": state.steps[-1].text}],
        }
        for state in candidates
    ]


class PolicyPriorRanker:
    """Rank candidates by their last step's prior under another policy (Eq. 4's mean token probability).

    In the value lab (docs/value_lab.md) the prior of the SVPO run's *reference* policy (the value-SFT
    checkpoint SVPO starts from) ranked the SVPO policy's sampled siblings better than the SVPO policy's own
    prior. In the reproduction (3 seeds x 1000 problems) SBS(1,5) ranked this way beat greedy by +3.4 points
    pooled for SVPO at lr 1e-4, where SVPO had fallen below its reference; for SVPO at lr 2e-5 (better than
    its reference) it lost 2.9. Use it when the searching policy has drifted below its reference.
    Search with the SVPO policy, rank with the reference::

        ranker = PolicyPriorRanker(reference_model, reference_tokenizer)
        SBSGenerator(policy_backend, SBSConfig(use_value=False)).generate(questions, ranker=ranker)

    Scores are read as in training (:func:`svpo_trl.value_lab.score_candidates`): the step's model-written
    tokens, without the environment's output block or the newline the sampler appends to an answer step.
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def __call__(self, owners: list[int], candidates: list[State], values: list[float | None]) -> list[float]:
        from ..value_lab import score_candidates

        del owners, values
        if not candidates:
            return []
        scores = score_candidates(
            self.model, self.tokenizer, last_step_groups(candidates), batch_size=self.batch_size
        )
        return [float(p) for p in scores["prob_mean"]]
