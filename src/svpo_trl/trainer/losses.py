"""The loss terms of SVPO (paper §3.2) as pure functions of per-example tensors.

Nothing here reduces over the batch: the trainers decide how terms are averaged and weighted.

- Eq. 7, value pre-training: ``value_mse = (V_φ(s) − V̂(s))²``.
- Eq. 8, implicit reward margin of the policy: ``Δr_π = β[(log π(y_w) − log π'(y_w)) − (log π(y_l) − log π'(y_l))]``.
- Eq. 9, explicit value margin: ``Δr_φ = V_φ(s_w) − V_φ(s_l)``.
- Eq. 10, the SVPO loss: ``−log σ(Δr_π) + max(0, γ − Δr_φ) + (Δr_π − sg[Δr_φ])²``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def implicit_reward_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """``Δr_π`` of Eq. 8: β times the difference of the chosen and rejected policy/reference log-ratios.

    Computed in the same order of operations as TRL's ``DPOTrainer`` (log-ratios first, then their
    difference, then β), so that ``−logsigmoid`` of it is bit-identical to TRL's ``sigmoid`` loss.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    return beta * (chosen_logratios - rejected_logratios)


def value_margin(chosen_values: torch.Tensor, rejected_values: torch.Tensor) -> torch.Tensor:
    """``Δr_φ`` of Eq. 9: the value of the preferred state minus the value of the dispreferred one."""
    return chosen_values - rejected_values


def svpo_loss_terms(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_values: torch.Tensor,
    rejected_values: torch.Tensor,
    *,
    beta: float,
    margin: float,
) -> dict[str, torch.Tensor]:
    """The three objectives of Eq. 10, one value per preference pair, unweighted and unreduced.

    Args:
        policy_chosen_logps, policy_rejected_logps: summed log-probabilities of the chosen / rejected
            completion under the policy π, shape ``(B,)``.
        ref_chosen_logps, ref_rejected_logps: the same under the frozen reference π', shape ``(B,)``.
        chosen_values, rejected_values: the value head's output ``V_φ`` at the last token of the chosen /
            rejected state, shape ``(B,)``.
        beta: β of Eq. 8 (paper: 0.1).
        margin: γ ≥ 0 of Eq. 10 (paper: 0.5).

    Returns:
        ``{"dpo": −logsigmoid(Δr_π), "margin": relu(γ − Δr_φ), "regularization": (Δr_π − sg[Δr_φ])²}``,
        each of shape ``(B,)``. ``margin`` depends on the values only, so it sends no gradient into the
        policy log-probabilities; ``regularization`` stops the gradient at ``Δr_φ`` ("to prevent model
        degeneration", §3.2), so it trains the policy towards the value scale and never the reverse.
    """
    reward_margin = implicit_reward_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
    )
    explicit_margin = value_margin(chosen_values, rejected_values)
    return {
        "dpo": -F.logsigmoid(reward_margin),
        "margin": torch.relu(margin - explicit_margin),
        "regularization": (reward_margin - explicit_margin.detach()) ** 2,
    }


def value_mse(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The value term of Eq. 7: ``(V_φ(s) − V̂(s))²`` element-wise, where ``V̂`` is the Q-value of the state's
    node in the search tree, or the reward R ∈ {−1, +1} when the state is terminal."""
    return (values - labels.to(values.dtype)) ** 2
