"""The SVPO loss terms (Eq. 7-10) against hand-computed numbers, and their gradient isolation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from svpo_trl.trainer.losses import implicit_reward_margin, svpo_loss_terms, value_margin, value_mse

# Three pairs. Per pair: policy/reference log-probs of chosen and rejected, values of chosen and rejected.
POLICY_C = [-10.0, -5.0, -3.0]
POLICY_L = [-12.0, -4.0, -9.0]
REF_C = [-11.0, -5.0, -4.0]
REF_L = [-11.0, -5.0, -6.0]
V_C = [0.3, -0.5, 0.9]
V_L = [0.1, 0.5, -0.2]
BETA, GAMMA = 0.1, 0.5
# By hand: log-ratios (1, -1), (0, 1), (1, -3) -> Δr_π = 0.1 * (2, -1, 4) = (0.2, -0.1, 0.4);
# Δr_φ = (0.2, -1.0, 1.1).
EXPECTED_REWARD_MARGIN = [0.2, -0.1, 0.4]
EXPECTED_VALUE_MARGIN = [0.2, -1.0, 1.1]
EXPECTED_DPO = [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.1)), math.log(1 + math.exp(-0.4))]
EXPECTED_MARGIN = [0.3, 1.5, 0.0]  # relu(0.5 - Δr_φ)
EXPECTED_REG = [0.0, 0.81, 0.49]  # (Δr_π - Δr_φ)²


def _inputs(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    names = ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]
    tensors = {
        n: torch.tensor(v, dtype=torch.float64) for n, v in zip(names, [POLICY_C, POLICY_L, REF_C, REF_L])
    }
    tensors["chosen_values"] = torch.tensor(V_C, dtype=torch.float64)
    tensors["rejected_values"] = torch.tensor(V_L, dtype=torch.float64)
    if requires_grad:
        for name in ("policy_chosen_logps", "policy_rejected_logps", "chosen_values", "rejected_values"):
            tensors[name].requires_grad_(True)
    return tensors


def test_margins_match_hand_computation():
    t = _inputs()
    reward = implicit_reward_margin(
        t["policy_chosen_logps"],
        t["policy_rejected_logps"],
        t["ref_chosen_logps"],
        t["ref_rejected_logps"],
        beta=BETA,
    )
    torch.testing.assert_close(reward, torch.tensor(EXPECTED_REWARD_MARGIN, dtype=torch.float64))
    torch.testing.assert_close(
        value_margin(t["chosen_values"], t["rejected_values"]),
        torch.tensor(EXPECTED_VALUE_MARGIN, dtype=torch.float64),
    )


def test_loss_terms_match_hand_computation():
    terms = svpo_loss_terms(**_inputs(), beta=BETA, margin=GAMMA)
    assert set(terms) == {"dpo", "margin", "regularization"}
    for name, expected in [
        ("dpo", EXPECTED_DPO),
        ("margin", EXPECTED_MARGIN),
        ("regularization", EXPECTED_REG),
    ]:
        assert terms[name].shape == (3,), name  # per example, no reduction
        torch.testing.assert_close(terms[name], torch.tensor(expected, dtype=torch.float64), msg=name)


def test_margin_zero_gamma_and_no_negative_loss():
    terms = svpo_loss_terms(**_inputs(), beta=BETA, margin=0.0)
    torch.testing.assert_close(terms["margin"], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_dpo_term_is_bit_identical_to_trl_sigmoid_loss():
    # TRL 1.16 DPOTrainer, loss_type="sigmoid": -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    g = torch.Generator().manual_seed(0)
    pc, pl, rc, rl = (torch.randn(64, generator=g) * 20 for _ in range(4))
    trl = -F.logsigmoid(0.1 * ((pc - rc) - (pl - rl)))
    ours = svpo_loss_terms(pc, pl, rc, rl, torch.zeros(64), torch.zeros(64), beta=0.1, margin=0.5)["dpo"]
    assert torch.equal(ours, trl)


def test_regularization_sends_no_gradient_into_values():
    t = _inputs(requires_grad=True)
    svpo_loss_terms(**t, beta=BETA, margin=GAMMA)["regularization"].sum().backward()
    assert t["chosen_values"].grad is None and t["rejected_values"].grad is None
    # d/dπ_c (Δr_π − Δr_φ)² = 2(Δr_π − Δr_φ)·β; d/dπ_l = −that.
    expected = torch.tensor(
        [2 * (r - v) * BETA for r, v in zip(EXPECTED_REWARD_MARGIN, EXPECTED_VALUE_MARGIN)]
    )
    torch.testing.assert_close(t["policy_chosen_logps"].grad, expected.double())
    torch.testing.assert_close(t["policy_rejected_logps"].grad, -expected.double())


def test_margin_sends_no_gradient_into_policy():
    t = _inputs(requires_grad=True)
    svpo_loss_terms(**t, beta=BETA, margin=GAMMA)["margin"].sum().backward()
    assert t["policy_chosen_logps"].grad is None and t["policy_rejected_logps"].grad is None
    # relu(γ − (V_c − V_l)) is active on pairs 0 and 1 only: dV_c = −1, dV_l = +1 there.
    torch.testing.assert_close(t["chosen_values"].grad, torch.tensor([-1.0, -1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(t["rejected_values"].grad, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))


def test_dpo_sends_no_gradient_into_values():
    t = _inputs(requires_grad=True)
    svpo_loss_terms(**t, beta=BETA, margin=GAMMA)["dpo"].sum().backward()
    assert t["chosen_values"].grad is None and t["rejected_values"].grad is None
    # d/dπ_c −logσ(Δr_π) = −β·σ(−Δr_π)
    expected = torch.tensor([-BETA / (1 + math.exp(r)) for r in EXPECTED_REWARD_MARGIN], dtype=torch.float64)
    torch.testing.assert_close(t["policy_chosen_logps"].grad, expected)


def test_value_mse_hand_computed_and_gradient():
    values = torch.tensor([0.5, -0.25, 0.0], requires_grad=True)
    labels = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)  # labels may come as float64 from datasets
    mse = value_mse(values, labels)
    assert mse.dtype == torch.float32
    torch.testing.assert_close(mse, torch.tensor([0.25, 0.5625, 0.0]))
    mse.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([-1.0, 1.5, 0.0]))  # 2(V − V̂)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_terms_keep_dtype(dtype):
    t = {k: v.to(dtype) for k, v in _inputs().items()}
    terms = svpo_loss_terms(**t, beta=BETA, margin=GAMMA)
    assert all(term.dtype == dtype for term in terms.values())
