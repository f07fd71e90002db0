"""Tests of the token-weighted DPO term (SPEC §3, Eq. 9-12) against hand arithmetic, loops and TRL 1.16's formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from trl_tidpo.ops.weighted_losses import token_weighted_dpo_losses, weighted_sequence_logps


BETA = 0.1
# Two pairs: W_c = [2, -1], W_r = [-1, 4] → margins z = [3, -5], βz = [0.3, -0.5].
W_C = torch.tensor([2.0, -1.0])
W_R = torch.tensor([-1.0, 4.0])


def _trl_reference_losses(per_token_logps, ref_per_token_logps, completion_mask, loss_type, beta, label_smoothing):
    """
    TRL 1.16 `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py), copied for the loss types TI-DPO supports, with
    `f_divergence_type="reverse_kl"` and `ld_alpha=None`. The fused LM head returns per-token log-probs that are 0
    where the label is -100 (outside the completion), so they are masked here the same way.
    """
    shift_completion_mask = completion_mask[..., 1:]
    per_token_logps = per_token_logps * shift_completion_mask
    ref_per_token_logps = ref_per_token_logps * shift_completion_mask
    logps = per_token_logps.sum(dim=1)  # sum over sequence length
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # batch is [chosen, rejected]
    ref_logps = ref_per_token_logps.sum(dim=1)
    ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2, dim=0)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = chosen_logratios
    rejected_scores = rejected_logratios
    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        per_sequence_loss = -F.logsigmoid(beta * delta_score)
    elif loss_type == "hinge":
        per_sequence_loss = torch.relu(1 - beta * delta_score)
    elif loss_type == "ipo":
        # NB: TRL 1.16 uses the *unshifted* completion_mask here.
        chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
        chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
        rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
        ipo_delta = chosen_avg_score - rejected_avg_score
        per_sequence_loss = (ipo_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean_loss_term = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
        flipped_loss_term = -label_smoothing * F.logsigmoid(-beta * delta_score)
        per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * label_smoothing)
    return per_sequence_loss


def test_weighted_sequence_logps_matches_loop():
    torch.manual_seed(0)
    logps = -torch.rand(4, 9) * 5
    weights = torch.rand(4, 9) * 2
    mask = torch.rand(4, 9) > 0.4
    expected = torch.zeros(4)
    for r in range(4):
        expected[r] = sum(float(logps[r, j]) * float(weights[r, j]) for j in range(9) if mask[r, j])
    torch.testing.assert_close(weighted_sequence_logps(logps, weights, mask), expected, atol=1e-5, rtol=1e-6)


def test_weighted_sequence_logps_ignores_weights_outside_mask():
    """Weights are often garbage (or NaN-free but huge) outside the completion: only masked tokens count."""
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    weights = torch.tensor([[100.0, 0.5, 2.0]])
    mask = torch.tensor([[0, 1, 1]])
    # 0.5·(−2) + 2·(−3) = −7
    torch.testing.assert_close(weighted_sequence_logps(logps, weights, mask), torch.tensor([-7.0]))


def test_weighted_sequence_logps_gradient_is_weight():
    logps = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    weights = torch.tensor([[0.3, 0.5, 2.0]])
    mask = torch.tensor([[1, 0, 1]])
    weighted_sequence_logps(logps, weights, mask).sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.3, 0.0, 2.0]]))


def test_sigmoid_hand_computed():
    """
    −log σ(βz) = log(1 + e^{−βz}): βz = 0.3 → log(1 + e^−0.3) = 0.5543552; βz = −0.5 → log(1 + e^0.5) = 0.9740770.
    """
    losses = token_weighted_dpo_losses(W_C, W_R, BETA, "sigmoid")
    torch.testing.assert_close(losses, torch.tensor([0.5543552, 0.9740770]), atol=1e-6, rtol=0)


def test_hinge_hand_computed():
    """relu(1 − βz): 1 − 0.3 = 0.7; 1 + 0.5 = 1.5. A large margin (βz = 2) gives 0."""
    losses = token_weighted_dpo_losses(W_C, W_R, BETA, "hinge")
    torch.testing.assert_close(losses, torch.tensor([0.7, 1.5]), atol=1e-6, rtol=0)
    zero = token_weighted_dpo_losses(torch.tensor([20.0]), torch.tensor([0.0]), BETA, "hinge")
    torch.testing.assert_close(zero, torch.tensor([0.0]))


def test_ipo_hand_computed_with_weight_sums():
    """
    (W_c/S_c − W_r/S_r − 1/(2β))², 1/(2β) = 5.
    Pair 1: S = (4, 2): 2/4 − (−1)/2 = 1.0 → (1 − 5)² = 16.
    Pair 2: S = (5, 8): −1/5 − 4/8 = −0.7 → (−0.7 − 5)² = 32.49.
    """
    losses = token_weighted_dpo_losses(
        W_C,
        W_R,
        BETA,
        "ipo",
        chosen_weight_sum=torch.tensor([4.0, 5.0]),
        rejected_weight_sum=torch.tensor([2.0, 8.0]),
    )
    torch.testing.assert_close(losses, torch.tensor([16.0, 32.49]), atol=1e-4, rtol=0)


def test_ipo_needs_weight_sums():
    with pytest.raises(ValueError, match="weight_sum"):
        token_weighted_dpo_losses(W_C, W_R, BETA, "ipo")


def test_robust_hand_computed():
    """
    ε = 0.1: [−0.9·log σ(βz) + 0.1·log σ(−βz)] / 0.8.
    βz = 0.3: (0.9·0.5543552 − 0.1·0.8543552)/0.8 = 0.5168552.
    βz = −0.5: (0.9·0.9740770 − 0.1·0.4740770)/0.8 = 1.0365770.
    """
    losses = token_weighted_dpo_losses(W_C, W_R, BETA, "robust", label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.5168552, 1.0365770]), atol=1e-6, rtol=0)


def test_robust_without_smoothing_is_sigmoid():
    robust = token_weighted_dpo_losses(W_C, W_R, BETA, "robust", label_smoothing=0.0)
    torch.testing.assert_close(robust, token_weighted_dpo_losses(W_C, W_R, BETA, "sigmoid"))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_uniform_weights_reproduce_trl(loss_type):
    """With w ≡ 1 (and Σw = token count) every supported loss equals TRL 1.16's formula on the same log-probs."""
    torch.manual_seed(0)
    batch, length = 3, 11
    completion_mask = torch.zeros(2 * batch, length, dtype=torch.long)
    for r, (start, end) in enumerate([(2, 9), (4, 11), (1, 3), (3, 7), (2, 11), (5, 6)]):
        completion_mask[r, start:end] = 1
    policy = -torch.rand(2 * batch, length - 1) * 4
    ref = -torch.rand(2 * batch, length - 1) * 4
    expected = _trl_reference_losses(policy, ref, completion_mask, loss_type, BETA, 0.2)

    shift_mask = completion_mask[:, 1:]
    ones = torch.ones_like(policy)
    weighted = weighted_sequence_logps(policy - ref, ones, shift_mask)
    chosen, rejected = weighted.chunk(2)
    # TRL's IPO divides by the unshifted mask's count; with uniform weights TI-DPO's Σw must be that count.
    weight_sums = completion_mask.sum(-1).float()
    losses = token_weighted_dpo_losses(
        chosen,
        rejected,
        BETA,
        loss_type,
        chosen_weight_sum=weight_sums[:batch],
        rejected_weight_sum=weight_sums[batch:],
        label_smoothing=0.2,
    )
    torch.testing.assert_close(losses, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust"])
def test_alpha_subtracts_sequential_kl(loss_type):
    """
    α = 0.5, K_c = 0.5, K_r = 1.5: z = (W_c − W_r) − α(K_r − K_c) = 3 − 0.5 = 2.5 for pair 1 and −5.5 for pair 2; the
    loss is the α = 0 loss evaluated at that margin.
    """
    k_c = torch.tensor([0.5, 0.5])
    k_r = torch.tensor([1.5, 1.5])
    losses = token_weighted_dpo_losses(
        W_C, W_R, BETA, loss_type, kl_chosen=k_c, kl_rejected=k_r, alpha=0.5, label_smoothing=0.1
    )
    # The shifted margin as chosen − rejected with rejected = 0 and no KL.
    expected = token_weighted_dpo_losses(
        torch.tensor([2.5, -5.5]), torch.zeros(2), BETA, loss_type, label_smoothing=0.1
    )
    torch.testing.assert_close(losses, expected)


def test_alpha_sigmoid_hand_value_and_gradients():
    """
    W_c = 2, W_r = −1, K_c = 0.5, K_r = 1.5, α = 0.5, β = 0.1: z = 3 − 0.5·1 = 2.5, βz = 0.25,
    L = log(1 + e^−0.25) = 0.5759394. σ(−0.25) = 0.4378235, so
    ∂L/∂K_r = αβσ(−βz) = 0.0218912, ∂L/∂W_c = −βσ(−βz) = −0.0437823, and K_c gets no gradient (sg).
    """
    w_c = torch.tensor([2.0], requires_grad=True)
    w_r = torch.tensor([-1.0], requires_grad=True)
    k_c = torch.tensor([0.5], requires_grad=True)
    k_r = torch.tensor([1.5], requires_grad=True)
    loss = token_weighted_dpo_losses(w_c, w_r, BETA, "sigmoid", kl_chosen=k_c, kl_rejected=k_r, alpha=0.5)
    torch.testing.assert_close(loss, torch.tensor([0.5759394]), atol=1e-6, rtol=0)
    g_wc, g_kr, g_kc = torch.autograd.grad(loss.sum(), [w_c, k_r, k_c], allow_unused=True)
    torch.testing.assert_close(g_kr, torch.tensor([0.0218912]), atol=1e-6, rtol=0)
    torch.testing.assert_close(g_wc, torch.tensor([-0.0437823]), atol=1e-6, rtol=0)
    assert g_kc is None


def test_alpha_kc_gets_no_gradient_through_backward():
    k_c = torch.tensor([0.5, 0.2], requires_grad=True)
    k_r = torch.tensor([1.5, 0.1], requires_grad=True)
    token_weighted_dpo_losses(W_C, W_R, BETA, "sigmoid", kl_chosen=k_c, kl_rejected=k_r, alpha=0.5).sum().backward()
    assert k_c.grad is None
    assert k_r.grad is not None and (k_r.grad != 0).all()


def test_alpha_zero_ignores_kl():
    losses = token_weighted_dpo_losses(
        W_C, W_R, BETA, "sigmoid", kl_chosen=torch.tensor([9.0, 9.0]), kl_rejected=torch.tensor([-9.0, 3.0])
    )
    torch.testing.assert_close(losses, token_weighted_dpo_losses(W_C, W_R, BETA, "sigmoid"))


def test_ipo_with_alpha_raises():
    with pytest.raises(ValueError, match="ipo"):
        token_weighted_dpo_losses(
            W_C,
            W_R,
            BETA,
            "ipo",
            chosen_weight_sum=torch.ones(2),
            rejected_weight_sum=torch.ones(2),
            kl_chosen=torch.zeros(2),
            kl_rejected=torch.zeros(2),
            alpha=0.5,
        )


def test_alpha_without_kl_raises():
    with pytest.raises(ValueError, match="kl_chosen"):
        token_weighted_dpo_losses(W_C, W_R, BETA, "sigmoid", alpha=0.5)


@pytest.mark.parametrize("loss_type", ["exo_pair", "nca_pair", "bco_pair", "apo_zero", "not_a_loss"])
def test_unknown_loss_type_raises(loss_type):
    with pytest.raises(ValueError, match=loss_type):
        token_weighted_dpo_losses(W_C, W_R, BETA, loss_type)


def test_weighted_margin_changes_loss():
    """Non-uniform weights change W and so the loss: weights are not silently ignored."""
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -2.0]])
    mask = torch.ones(2, 3)
    uniform = weighted_sequence_logps(logps, torch.ones(2, 3), mask)
    skewed = weighted_sequence_logps(logps, torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]]), mask)
    # uniform: W = [−3.5, −6]; skewed: W = [−3, −6]
    torch.testing.assert_close(uniform, torch.tensor([-3.5, -6.0]))
    torch.testing.assert_close(skewed, torch.tensor([-3.0, -6.0]))
    assert not math.isclose(
        float(token_weighted_dpo_losses(uniform[:1], uniform[1:], BETA)),
        float(token_weighted_dpo_losses(skewed[:1], skewed[1:], BETA)),
    )
