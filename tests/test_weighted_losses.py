"""
Tests of every TRL 1.16 loss type on token-weighted sums (SPEC §3): hand-worked values, independent per-row loops over
token lists, and parity with TRL's own `DPOTrainer` loss, gradients and reward metrics on a tiny Llama.
"""

import math

import pytest
import torch

from trl_tidpo.ops.weighted_losses import (
    F_DIVERGENCE_LOSS_TYPES,
    KL_LOSS_TYPES,
    LOSS_TYPES,
    combined_preference_loss,
    f_divergence_scores,
    length_desensitized_logps,
    pair_rewards,
    preference_losses,
    weight_sums,
    weighted_sequence_logps,
    wpo_pair_weights,
)


BETA = 0.5


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return math.exp(_log_sigmoid(x))


# ------------------------------------------------------------------------------------- token lists and their tensors

# Scored completion tokens per row (chosen rows 0..2, then rejected rows 0..2) and where they start on the shifted axis
STARTS = [1, 3, 0, 2, 0, 4]
LENGTHS = [4, 2, 5, 3, 6, 1]
WIDTH = 9  # shifted axis, T - 1
B = 3


def _token_lists(seed: int = 0) -> list[dict[str, list[float]]]:
    """Per row: `lp`, `lr` (policy/reference log-probs) and `w` (weights) of its scored completion tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in LENGTHS:
        rows.append(
            {
                "lp": (-3 * torch.rand(n, generator=generator, dtype=torch.float64)).tolist(),
                "lr": (-3 * torch.rand(n, generator=generator, dtype=torch.float64)).tolist(),
                "w": (0.2 + 1.8 * torch.rand(n, generator=generator, dtype=torch.float64)).tolist(),
            }
        )
    return rows


def _tensors(rows: list[dict[str, list[float]]]) -> dict[str, torch.Tensor]:
    """`[2B, WIDTH]` float64 tensors of the rows, with garbage outside the completion (it must never count)."""
    lp = torch.full((2 * B, WIDTH), -50.0, dtype=torch.float64)
    lr = torch.full((2 * B, WIDTH), 50.0, dtype=torch.float64)
    w = torch.full((2 * B, WIDTH), 1e3, dtype=torch.float64)
    mask = torch.zeros(2 * B, WIDTH, dtype=torch.long)
    for r, (row, start) in enumerate(zip(rows, STARTS, strict=True)):
        end = start + len(row["w"])
        lp[r, start:end] = torch.tensor(row["lp"], dtype=torch.float64)
        lr[r, start:end] = torch.tensor(row["lr"], dtype=torch.float64)
        w[r, start:end] = torch.tensor(row["w"], dtype=torch.float64)
        mask[r, start:end] = 1
    return {"lp": lp, "lr": lr, "w": w, "mask": mask}


def _loop_sums(rows: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Σ w·lp, Σ w·lr and Σ w of every row, by loops over the token lists."""
    return {
        "logps": [sum(w * lp for w, lp in zip(row["w"], row["lp"], strict=True)) for row in rows],
        "ref_logps": [sum(w * lr for w, lr in zip(row["w"], row["lr"], strict=True)) for row in rows],
        "weight_sum": [sum(row["w"]) for row in rows],
    }


def _length(weight_sum: float) -> float:
    """SPEC §3: the weight sum itself, 1 only for an empty row (not TRL's max(S, 1), which depends on the scale)."""
    return weight_sum if weight_sum > 0 else 1.0


def _loop_expected(loss_type: str, rows, beta: float, eps: float, tau: float) -> list[float]:
    """Per-pair losses from the formulas written out, one pair at a time (TRL 1.16 `_compute_loss`, weighted sums)."""
    sums = _loop_sums(rows)
    lc, lrj = sums["logps"][:B], sums["logps"][B:]
    rc, rrj = sums["ref_logps"][:B], sums["ref_logps"][B:]
    sc, sr = sums["weight_sum"][:B], sums["weight_sum"][B:]
    wc = [lc[b] - rc[b] for b in range(B)]
    wr = [lrj[b] - rrj[b] for b in range(B)]
    if loss_type == "aot":
        policy_sorted = sorted(lc[b] - lrj[b] for b in range(B))
        ref_sorted = sorted(rc[b] - rrj[b] for b in range(B))
        d = [p - q for p, q in zip(policy_sorted, ref_sorted, strict=True)]
        return [-(1 - eps) * _log_sigmoid(beta * x) - eps * _log_sigmoid(-beta * x) for x in d]
    if loss_type == "aot_unpaired":
        d = [p - q for p, q in zip(sorted(wc), sorted(wr), strict=True)]
        return [-(1 - eps) * _log_sigmoid(beta * x) - eps * _log_sigmoid(-beta * x) for x in d]
    if loss_type == "sft":
        chosen_tokens = [(w, lp) for row in rows[:B] for w, lp in zip(row["w"], row["lp"], strict=True)]
        value = -sum(w * lp for w, lp in chosen_tokens) / sum(w for w, _ in chosen_tokens)
        return [value] * B
    out = []
    for b in range(B):
        z = beta * (wc[b] - wr[b])
        if loss_type == "sigmoid":
            out.append(-_log_sigmoid(z))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - z))
        elif loss_type == "ipo":
            out.append((wc[b] / _length(sc[b]) - wr[b] / _length(sr[b]) - 1 / (2 * beta)) ** 2)
        elif loss_type == "sigmoid_norm":
            out.append(-_log_sigmoid(beta * (wc[b] / _length(sc[b]) - wr[b] / _length(sr[b]))))
        elif loss_type == "exo_pair":
            out.append(
                _sigmoid(z) * (_log_sigmoid(z) - math.log(1 - eps)) + _sigmoid(-z) * (_log_sigmoid(-z) - math.log(eps))
            )
        elif loss_type == "robust":
            out.append((-(1 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1 - 2 * eps))
        elif loss_type == "discopop":
            m = _sigmoid(z / tau)
            out.append((1 - m) * -_log_sigmoid(z) + m * math.exp(-z))
        elif loss_type == "nca_pair":
            out.append(
                -_log_sigmoid(beta * wc[b]) - 0.5 * _log_sigmoid(-beta * wc[b]) - 0.5 * _log_sigmoid(-beta * wr[b])
            )
        elif loss_type == "bco_pair":
            out.append(-_log_sigmoid(beta * wc[b]) - _log_sigmoid(-beta * wr[b]))
        elif loss_type == "sppo_hard":
            out.append((wc[b] - 0.5 / beta) ** 2 + (wr[b] + 0.5 / beta) ** 2)
        elif loss_type == "apo_zero":
            out.append(1 - _sigmoid(beta * wc[b]) + _sigmoid(beta * wr[b]))
        elif loss_type == "apo_down":
            out.append(_sigmoid(beta * wc[b]) + 1 - _sigmoid(beta * (wc[b] - wr[b])))
    return out


def _ours(loss_type: str, t: dict[str, torch.Tensor], **options) -> torch.Tensor:
    """The module's losses on the tensors, with lengths from the weight sums (no position-0 completion here)."""
    logps = weighted_sequence_logps(t["lp"], t["w"], t["mask"])
    ref_logps = weighted_sequence_logps(t["lr"], t["w"], t["mask"])
    # Unshifted mask whose first column is empty: lengths are plain weight sums
    lengths = weight_sums(t["w"], torch.cat([torch.zeros_like(t["mask"][:, :1]), t["mask"]], dim=1))
    scored = weight_sums(t["w"], torch.cat([torch.zeros_like(t["mask"][:, :1]), t["mask"]], dim=1), scored_only=True)
    return preference_losses(
        loss_type,
        logps[:B],
        logps[B:],
        ref_logps[:B],
        ref_logps[B:],
        beta=options.pop("beta", BETA),
        chosen_weight_sum=lengths[:B],
        rejected_weight_sum=lengths[B:],
        sft_logps=logps[:B],
        sft_weight_sum=scored[:B],
        **options,
    )


# ------------------------------------------------------------------------------------------------- every loss type


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_matches_token_loop(loss_type):
    """Non-uniform weights, garbage outside the completion: every loss type equals its formula on loop sums."""
    rows = _token_lists()
    losses = _ours(loss_type, _tensors(rows), label_smoothing=0.1, discopop_tau=0.3)
    expected = torch.tensor(_loop_expected(loss_type, rows, BETA, 0.1, 0.3), dtype=torch.float64)
    assert losses.shape == (B,)
    torch.testing.assert_close(losses, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("loss_type", sorted(set(LOSS_TYPES) - {"sft"}))
def test_weights_change_every_loss(loss_type):
    """Weights are not silently ignored: skewing them changes every pair-dependent loss type."""
    rows = _token_lists()
    skewed = [{**row, "w": [w**3 for w in row["w"]]} for row in rows]
    a = _ours(loss_type, _tensors(rows), label_smoothing=0.1)
    b = _ours(loss_type, _tensors(skewed), label_smoothing=0.1)
    assert not torch.allclose(a, b)


def test_sft_changes_with_weights():
    rows = _token_lists()
    skewed = [{**row, "w": [w**3 for w in row["w"]]} for row in rows]
    assert not torch.allclose(_ours("sft", _tensors(rows)), _ours("sft", _tensors(skewed)))


def _pair(loss_type: str, w_c: float, w_r: float, **options) -> float:
    """One pair given its weighted log-ratios directly (reference sums 0)."""
    zero = torch.zeros(1, dtype=torch.float64)
    return preference_losses(
        loss_type,
        torch.tensor([w_c], dtype=torch.float64),
        torch.tensor([w_r], dtype=torch.float64),
        zero,
        zero,
        beta=BETA,
        **options,
    ).item()


def test_pair_losses_hand_computed():
    """
    W_c = 2, W_r = −1, β = 0.5: βW_c = 1, βW_r = −0.5, βΔ = 1.5. σ(1) = 0.7310586, σ(−0.5) = 0.3775407,
    σ(1.5) = 0.8175745; −log σ(1) = 0.3132617, −log σ(−1) = 1.3132617, −log σ(0.5) = 0.4740770.
      nca_pair:  0.3132617 + ½·1.3132617 + ½·0.4740770 = 1.2069310
      bco_pair:  0.3132617 + 0.4740770 = 0.7873387
      sppo_hard: (2 − 1)² + (−1 + 1)² = 1
      apo_zero:  1 − 0.7310586 + 0.3775407 = 0.6464821
      apo_down:  0.7310586 + 1 − 0.8175745 = 0.9134841
      exo_pair (ε = 0.1): 0.8175745·(−0.2014133 + 0.1053605) + 0.1824255·(−1.7014133 + 2.3025851) = 0.0311388
      discopop (τ = 1): m = σ(1.5) = 0.8175745; 0.1824255·0.2014133 + 0.8175745·e^−1.5 (0.2231302) = 0.2191684
      discopop (τ = 0.05): m = σ(30) ≈ 1, so ≈ e^−1.5 = 0.2231302
    """
    assert _pair("nca_pair", 2, -1) == pytest.approx(1.2069310, abs=1e-7)
    assert _pair("bco_pair", 2, -1) == pytest.approx(0.7873387, abs=1e-7)
    assert _pair("sppo_hard", 2, -1) == pytest.approx(1.0, abs=1e-12)
    assert _pair("apo_zero", 2, -1) == pytest.approx(0.6464821, abs=1e-7)
    assert _pair("apo_down", 2, -1) == pytest.approx(0.9134841, abs=1e-7)
    assert _pair("exo_pair", 2, -1, label_smoothing=0.1) == pytest.approx(0.0311388, abs=1e-7)
    assert _pair("discopop", 2, -1, discopop_tau=1.0) == pytest.approx(0.2191684, abs=1e-7)
    assert _pair("discopop", 2, -1, discopop_tau=0.05) == pytest.approx(0.2231302, abs=1e-7)


def test_discopop_tau_changes_the_blend():
    assert _pair("discopop", 2, -1, discopop_tau=0.05) != pytest.approx(_pair("discopop", 2, -1, discopop_tau=1.0))


def test_ipo_and_sigmoid_norm_hand_computed_with_weight_sums():
    """
    W_c = 2, W_r = −1, S_c = 4, S_r = 2, β = 0.5: s_c/S_c − s_r/S_r = 0.5 + 0.5 = 1.
      ipo: (1 − 1/(2·0.5))² = 0;  β = 0.1: (1 − 5)² = 16
      sigmoid_norm: −log σ(0.5) = 0.4740770
    """
    sums = {"chosen_weight_sum": torch.tensor([4.0]), "rejected_weight_sum": torch.tensor([2.0])}
    args = (torch.tensor([2.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1))
    assert preference_losses("ipo", *args, beta=0.5, **sums).item() == pytest.approx(0.0, abs=1e-7)
    assert preference_losses("ipo", *args, beta=0.1, **sums).item() == pytest.approx(16.0, abs=1e-5)
    assert preference_losses("sigmoid_norm", *args, beta=0.5, **sums).item() == pytest.approx(0.4740770, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_ipo_and_sigmoid_norm_are_scale_consistent_for_weights_summing_below_one(loss_type):
    """
    Weights summing below 1 (here `"sum"`-normalised: each row's weights sum to 1, then scaled by 0.25) divide by
    their own sum, not by TRL's `max(S, 1)`: scaling every weight by c scales W and S alike, so the loss is unchanged.
    Compared with an explicit per-row loop; an empty row (S = 0) divides by 1 (its score is 0).
    """
    logps = [[-1.0, -2.0, -0.5], [-3.0, -1.0, -0.2], [-0.7, -0.1, -2.5], [0.0, 0.0, 0.0]]
    ref = [[-1.5, -1.0, -0.5], [-2.0, -2.0, -1.0], [-0.2, -0.4, -2.0], [0.0, 0.0, 0.0]]
    base_weights = [[0.2, 0.5, 0.3], [0.6, 0.4, 0.0], [0.1, 0.1, 0.8], [0.0, 0.0, 0.0]]  # rows: c0, c1, r0, r1
    beta = 0.5

    def loop(scale: float) -> list[float]:
        normalised = []
        for row in range(4):
            w = [scale * x for x in base_weights[row]]
            s = sum(wj * (p - q) for wj, p, q in zip(w, logps[row], ref[row], strict=True))
            total = sum(w)
            normalised.append(s / (total if total > 0 else 1.0))
        out = []
        for b in range(2):
            d = normalised[b] - normalised[b + 2]
            out.append((d - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -_log_sigmoid(beta * d))
        return out

    def trainer_path(scale: float) -> torch.Tensor:
        w = scale * torch.tensor(base_weights)
        mask = torch.ones(4, 3)
        policy = weighted_sequence_logps(torch.tensor(logps), w, mask)
        reference = weighted_sequence_logps(torch.tensor(ref), w, mask)
        sums = w.sum(dim=1)
        return preference_losses(
            loss_type, policy[:2], policy[2:], reference[:2], reference[2:], beta=beta,
            chosen_weight_sum=sums[:2], rejected_weight_sum=sums[2:],
        )  # fmt: skip

    for scale in (0.25, 1.0, 3.0):
        assert trainer_path(scale).tolist() == pytest.approx(loop(scale), abs=1e-6)
    assert trainer_path(0.25).tolist() == pytest.approx(trainer_path(1.0).tolist(), abs=1e-6)
    assert loop(0.25) == pytest.approx(loop(1.0), abs=1e-9)  # the loop itself: scale-free


def test_aot_sorts_over_the_batch():
    """
    Policy logps c = [−1, −3], r = [−6, −4]: differences [5, 1] → sorted [1, 5]. Reference c = [−2, −2], r = [−2, −5]:
    [0, 3] → sorted [0, 3]. d = [1, 2], β = 0.5: −log σ(0.5) = 0.4740770, −log σ(1) = 0.3132617 (unsorted pairing would
    give d = [5, −2]).
    """
    losses = preference_losses(
        "aot",
        torch.tensor([-1.0, -3.0]),
        torch.tensor([-6.0, -4.0]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([-2.0, -5.0]),
        beta=BETA,
    )
    torch.testing.assert_close(losses, torch.tensor([0.4740770, 0.3132617]), atol=1e-6, rtol=0)


def test_sft_is_a_token_level_mean_over_the_batch():
    """
    Chosen rows: tokens log p = [−1, −2] with w = [1, 3], and [−4] with w = 2:
    −(−1·1 − 2·3 − 4·2) / (1 + 3 + 2) = 15/6 = 2.5 for every pair (TRL's batch mean, not a per-row mean: that would
    be ½(7/4 + 4) = 2.875).
    """
    lp = torch.tensor([[-1.0, -2.0], [-4.0, 0.0]])
    w = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])  # unshifted, [B, T]
    sft_logps = weighted_sequence_logps(lp, w, mask[:, 1:])
    sft_weight_sum = weight_sums(w, mask, scored_only=True)
    losses = preference_losses(
        "sft", torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=BETA,
        sft_logps=sft_logps, sft_weight_sum=sft_weight_sum,
    )  # fmt: skip
    torch.testing.assert_close(losses, torch.tensor([2.5, 2.5]))


def test_sft_gradient_reaches_every_chosen_token():
    """d(2.5)/d log p_j = −w_j / Σw: [−1/6, −3/6] and [−2/6]."""
    lp = torch.tensor([[-1.0, -2.0], [-4.0, 0.0]], requires_grad=True)
    w = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    losses = preference_losses(
        "sft", torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=BETA,
        sft_logps=weighted_sequence_logps(lp, w, mask[:, 1:]), sft_weight_sum=weight_sums(w, mask, scored_only=True),
    )  # fmt: skip
    losses.mean().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1 / 6, -3 / 6], [-2 / 6, 0.0]]))


# --------------------------------------------------------------------------------------------------- f-divergences


@pytest.mark.parametrize(
    "f_divergence_type, coef, formula",
    [
        ("reverse_kl", 0.5, lambda x: x),
        ("forward_kl", 0.5, lambda x: 1 - math.exp(-x)),
        ("js_divergence", 0.5, lambda x: math.log(2) + _log_sigmoid(x)),
        ("alpha_divergence", 0.5, lambda x: (math.exp(-0.5 * x) - 1) / -0.5),
        ("alpha_divergence", 2.0, lambda x: math.exp(x) - 1),
        ("alpha_divergence", 1.0, lambda x: x),  # the limit a → 1 is reverse KL
    ],
)
def test_f_divergence_scores_match_formula(f_divergence_type, coef, formula):
    x = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0], dtype=torch.float64)
    expected = torch.tensor([formula(v) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(f_divergence_scores(x, f_divergence_type, coef), expected, atol=1e-12, rtol=1e-12)


def test_alpha_divergence_clamp():
    """
    t = (a−1)W is clamped at 80 (fp32/bf16) or 11 (fp16) before exp, as TRL.
    a = 0.5, W = −400 in fp32: t = 200 → 80, score (e^80 − 1)/(−0.5).
    a = 3, W = 400 in fp16: t = 800 → 11, score (e^11 − 1)/2 = 29936.57 (finite; fp16 max is 65504).
    TRL quirk kept: the cast back happens before the 1/(a−1) factor, so a = 0.5 in fp16 overflows to −inf.
    """
    torch.testing.assert_close(
        f_divergence_scores(torch.tensor([-400.0]), "alpha_divergence", 0.5),
        torch.tensor([-2 * math.expm1(80.0)]),
        rtol=1e-6,
        atol=0,
    )
    half = f_divergence_scores(torch.tensor([400.0], dtype=torch.float16), "alpha_divergence", 3.0)
    assert half.dtype == torch.float16
    assert half.item() == pytest.approx(math.expm1(11.0) / 2, rel=1e-3)
    overflow = f_divergence_scores(torch.tensor([-400.0], dtype=torch.float16), "alpha_divergence", 0.5)
    assert overflow.item() == -math.inf


@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSS_TYPES)
def test_f_divergence_losses_use_scores_of_weighted_logratios(loss_type, f_divergence_type):
    """The loss with an f-divergence is the reverse-KL loss evaluated on the scores f'(e^W) of the weighted W."""
    rows = _token_lists(seed=1)
    t = _tensors(rows)
    losses = _ours(loss_type, t, label_smoothing=0.1, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=0.3)
    w_sums = _loop_sums(rows)
    logratios = [a - b for a, b in zip(w_sums["logps"], w_sums["ref_logps"], strict=True)]
    scores = f_divergence_scores(torch.tensor(logratios, dtype=torch.float64), f_divergence_type, 0.3)
    if loss_type == "sft":  # sft ignores the scores
        expected = _ours("sft", t)
    else:
        lengths = torch.tensor(w_sums["weight_sum"], dtype=torch.float64)
        zero = torch.zeros(B, dtype=torch.float64)
        expected = preference_losses(
            loss_type, scores[:B], scores[B:], zero, zero, beta=BETA, label_smoothing=0.1,
            chosen_weight_sum=lengths[:B], rejected_weight_sum=lengths[B:],
        )  # fmt: skip
    torch.testing.assert_close(losses, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("loss_type", sorted(set(LOSS_TYPES) - set(F_DIVERGENCE_LOSS_TYPES)))
def test_f_divergence_refused_where_trl_refuses(loss_type):
    with pytest.raises(ValueError, match=loss_type):
        _pair(loss_type, 2, -1, f_divergence_type="forward_kl", label_smoothing=0.1)


def test_unknown_f_divergence_raises():
    with pytest.raises(ValueError, match="chi_squared"):
        _pair("sigmoid", 2, -1, f_divergence_type="chi_squared")


# ------------------------------------------------------------------------------------------------- label smoothing


@pytest.mark.parametrize("loss_type", ["robust", "aot", "aot_unpaired", "exo_pair"])
def test_label_smoothing_matches_loop_and_matters(loss_type):
    rows = _token_lists(seed=2)
    for eps in (0.05, 0.3):
        expected = torch.tensor(_loop_expected(loss_type, rows, BETA, eps, 0.05), dtype=torch.float64)
        torch.testing.assert_close(_ours(loss_type, _tensors(rows), label_smoothing=eps), expected)
    assert not torch.allclose(
        _ours(loss_type, _tensors(rows), label_smoothing=0.05), _ours(loss_type, _tensors(rows), label_smoothing=0.3)
    )


def test_robust_hand_computed():
    """ε = 0.1, βΔ = 1.5: (0.9·0.2014133 − 0.1·1.7014133)/0.8 = 0.0139133."""
    assert _pair("robust", 2, -1, label_smoothing=0.1) == pytest.approx(0.0139133, abs=1e-7)


def test_exo_pair_without_smoothing_raises():
    with pytest.raises(ValueError, match="label_smoothing"):
        _pair("exo_pair", 2, -1)


# ------------------------------------------------------------------------------------------------------- weight sums


def test_weight_sums_uniform_is_trl_unshifted_count():
    """
    w ≡ 1: the length is TRL's `completion_mask.sum(1)`, also when the completion starts at position 0 (empty prompt
    without BOS), whose first token is never scored; the scored sum is the shifted mask's count.
    """
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    ones = torch.ones(4, 3)
    torch.testing.assert_close(weight_sums(ones, mask), torch.tensor([3.0, 3.0, 1.0, 0.0]))
    torch.testing.assert_close(weight_sums(ones, mask, scored_only=True), torch.tensor([2.0, 3.0, 0.0, 0.0]))


def test_weight_sums_fill_the_unscored_first_token_with_the_row_mean():
    """
    Row 0: completion at positions 0..2, scored weights (shifted entries 0, 1) = [0.5, 2.5], n = 3, n' = 2:
    3.0 + 1 · 3.0/2 = 4.5. Row 1: prompt first, weights [_, 0.4, 1.6] on positions 2, 3: 2.0. Outside the mask w = 9
    is ignored.
    """
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    w = torch.tensor([[0.5, 2.5, 9.0], [9.0, 0.4, 1.6]])
    torch.testing.assert_close(weight_sums(w, mask), torch.tensor([4.5, 2.0]))
    torch.testing.assert_close(weight_sums(w, mask, scored_only=True), torch.tensor([3.0, 2.0]))


def test_weight_sums_need_the_unshifted_mask():
    with pytest.raises(ValueError, match="unshifted"):
        weight_sums(torch.ones(2, 4), torch.ones(2, 4))


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_length_normalised_losses_need_weight_sums(loss_type):
    with pytest.raises(ValueError, match="weight_sum"):
        _pair(loss_type, 2, -1)


def test_sft_needs_its_sums():
    with pytest.raises(ValueError, match="sft_logps"):
        _pair("sft", 2, -1)


# ------------------------------------------------------------------------------------------------------------ LD-DPO


def _ld_loop(rows, key: str, ld_alpha: float) -> list[float]:
    """Σ_{first ℓ tokens} w·x + ld_alpha·Σ_{rest} w·x, ℓ = min(n_c, n_r) of the row's pair, by loops."""
    out = []
    for r, row in enumerate(rows):
        shared = min(len(rows[r % B]["w"]), len(rows[r % B + B]["w"]))
        terms = [w * x for w, x in zip(row["w"], row[key], strict=True)]
        out.append(sum(terms[:shared]) + ld_alpha * sum(terms[shared:]))
    return out


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
def test_length_desensitized_logps_match_loop(ld_alpha):
    rows = _token_lists(seed=3)
    t = _tensors(rows)
    for key, values in (("lp", t["lp"]), ("lr", t["lr"])):
        expected = torch.tensor(_ld_loop(rows, key, ld_alpha), dtype=torch.float64)
        torch.testing.assert_close(length_desensitized_logps(values, t["w"], t["mask"], ld_alpha), expected)


def test_length_desensitized_logps_hand_computed():
    """
    Pair 0: chosen tokens [−1, −2, −3] with w [1, 2, 1] (starting at position 1), rejected [−4] with w [0.5]; ℓ = 1.
    Chosen: 1·(−1) + 0.5·(2·(−2) + 1·(−3)) = −4.5; rejected: 0.5·(−4) = −2. Padding (−9, w = 7) never counts, even
    right after the shorter completion, where TRL's position counter still equals ℓ.
    """
    lp = torch.tensor([[-9.0, -1.0, -2.0, -3.0], [-4.0, -9.0, -9.0, -9.0]])
    w = torch.tensor([[7.0, 1.0, 2.0, 1.0], [0.5, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0]])
    torch.testing.assert_close(length_desensitized_logps(lp, w, mask, 0.5), torch.tensor([-4.5, -2.0]))


def test_ld_alpha_one_is_the_weighted_sum():
    t = _tensors(_token_lists(seed=4))
    torch.testing.assert_close(
        length_desensitized_logps(t["lp"], t["w"], t["mask"], 1.0), weighted_sequence_logps(t["lp"], t["w"], t["mask"])
    )


# --------------------------------------------------------------------------------------------------------------- WPO


def test_wpo_pair_weights_match_loop_and_ignore_token_weights():
    """ω_b = exp(mean_j (lp − log Σp²) over chosen b) · exp(same over rejected b); token weights never enter."""
    rows = _token_lists(seed=5)
    t = _tensors(rows)
    generator = torch.Generator().manual_seed(6)
    log_sum_sq = -2 * torch.rand(2 * B, WIDTH, generator=generator, dtype=torch.float64)
    row_means = []
    for r, row in enumerate(rows):
        start = STARTS[r]
        aligned = [lp - log_sum_sq[r, start + j].item() for j, lp in enumerate(row["lp"])]
        row_means.append(math.exp(sum(aligned) / len(aligned)))
    expected = torch.tensor([row_means[b] * row_means[b + B] for b in range(B)], dtype=torch.float64)
    torch.testing.assert_close(wpo_pair_weights(t["lp"], log_sum_sq, t["mask"]), expected)


def test_wpo_pair_weights_hand_computed_and_detached():
    """
    Chosen: lp = [−1, −3], log Σp² = [−0.5, −1.5] → mean(−0.5, −1.5) = −1; rejected: lp = [−2], log Σp² = [−1] → −1.
    ω = e^−1 · e^−1 = e^−2 = 0.1353353, with no gradient to the policy.
    """
    lp = torch.tensor([[-1.0, -3.0], [-2.0, 0.0]], requires_grad=True)
    log_sum_sq = torch.tensor([[-0.5, -1.5], [-1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    weights = wpo_pair_weights(lp, log_sum_sq, mask)
    torch.testing.assert_close(weights, torch.tensor([math.exp(-2.0)]))
    assert not weights.requires_grad


# ---------------------------------------------------------------------------------------- several loss types, rewards


def test_combined_loss_is_weighted_sum_of_type_means():
    """MPO-style: L = Σ_k λ_k mean_b(ω_b L_k[b]), checked against the per-type loops."""
    rows = _token_lists(seed=7)
    t = _tensors(rows)
    logps = weighted_sequence_logps(t["lp"], t["w"], t["mask"])
    ref_logps = weighted_sequence_logps(t["lr"], t["w"], t["mask"])
    scored = weight_sums(t["w"], torch.cat([torch.zeros_like(t["mask"][:, :1]), t["mask"]], dim=1), scored_only=True)
    omega = [0.5, 1.0, 2.0]
    loss = combined_preference_loss(
        ["sigmoid", "sft", "bco_pair"],
        logps[:B], logps[B:], ref_logps[:B], ref_logps[B:],
        loss_weights=[0.8, 0.2, 1.0],
        pair_weights=torch.tensor(omega, dtype=torch.float64),
        beta=BETA, sft_logps=logps[:B], sft_weight_sum=scored[:B],
    )  # fmt: skip
    expected = 0.0
    for loss_type, lam in (("sigmoid", 0.8), ("sft", 0.2), ("bco_pair", 1.0)):
        per_pair = _loop_expected(loss_type, rows, BETA, 0.0, 0.05)
        expected += lam * sum(o * x for o, x in zip(omega, per_pair, strict=True)) / B
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_combined_default_weights_are_one():
    args = (torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.zeros(2), torch.zeros(2))
    loss = combined_preference_loss(["sigmoid", "hinge"], *args, beta=BETA)
    sigmoid = preference_losses("sigmoid", *args, beta=BETA)
    hinge = preference_losses("hinge", *args, beta=BETA)
    expected = sigmoid.mean() + hinge.mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("loss_type", ["hinge", "sft"])
def test_wpo_with_hinge_and_sft_backpropagates(loss_type):
    """TRL 1.16's in-place `per_sequence_loss *= weights` fails for these two; the out-of-place product does not."""
    w_c = torch.tensor([2.0, 0.0], requires_grad=True)
    args = (w_c, torch.tensor([-1.0, 1.0]), torch.zeros(2), torch.zeros(2))
    loss = combined_preference_loss(
        [loss_type], *args, pair_weights=torch.tensor([0.5, 2.0]), beta=BETA,
        sft_logps=w_c, sft_weight_sum=torch.tensor([2.0, 2.0]),
    )  # fmt: skip
    loss.backward()
    assert w_c.grad is not None and torch.isfinite(w_c.grad).all() and (w_c.grad != 0).any()


def test_combined_loss_weights_length_mismatch_raises():
    with pytest.raises(ValueError, match="loss_weights"):
        combined_preference_loss(["sigmoid", "hinge"], *([torch.zeros(2)] * 4), loss_weights=[1.0], beta=BETA)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_wpo_with_sorting_losses_raises(loss_type):
    with pytest.raises(ValueError, match=loss_type):
        combined_preference_loss([loss_type], *([torch.zeros(2)] * 4), pair_weights=torch.ones(2), beta=BETA)


def test_pair_rewards_are_beta_logratios_detached():
    """β = 0.5: chosen 0.5·(−3 − (−5)) = 1, rejected 0.5·(−4 − (−3)) = −0.5; no gradient."""
    chosen = torch.tensor([-3.0], requires_grad=True)
    c, r = pair_rewards(chosen, torch.tensor([-4.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), BETA)
    torch.testing.assert_close(c, torch.tensor([1.0]))
    torch.testing.assert_close(r, torch.tensor([-0.5]))
    assert not c.requires_grad


# ------------------------------------------------------------------------------------------ TDPO sequential-KL term


@pytest.mark.parametrize("loss_type", KL_LOSS_TYPES)
def test_alpha_shifts_the_margin(loss_type):
    """α = 0.5, K_c = 0.5, K_r = 1.5: each KL loss type equals its α = 0 loss at margin Δ − α(K_r − K_c) = Δ − 0.5."""
    kls = {"kl_chosen": torch.tensor([0.5]), "kl_rejected": torch.tensor([1.5])}
    shifted = _pair(loss_type, 2, -1, alpha=0.5, label_smoothing=0.1, **kls)
    assert shifted == pytest.approx(_pair(loss_type, 1.5, -1, label_smoothing=0.1), abs=1e-12)


def test_alpha_sigmoid_hand_value_and_gradients():
    """
    W_c = 2, W_r = −1, K_c = 0.5, K_r = 1.5, α = 0.5, β = 0.1: z = 3 − 0.5 = 2.5, βz = 0.25, L = log(1 + e^−0.25) =
    0.5759394; ∂L/∂K_r = αβσ(−0.25) = 0.0218912; K_c gets no gradient (sg).
    """
    k_c = torch.tensor([0.5], requires_grad=True)
    k_r = torch.tensor([1.5], requires_grad=True)
    loss = preference_losses(
        "sigmoid", torch.tensor([2.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1), beta=0.1,
        kl_chosen=k_c, kl_rejected=k_r, alpha=0.5,
    )  # fmt: skip
    assert loss.item() == pytest.approx(0.5759394, abs=1e-6)
    g_kr, g_kc = torch.autograd.grad(loss.sum(), [k_r, k_c], allow_unused=True)
    assert g_kr.item() == pytest.approx(0.0218912, abs=1e-6)
    assert g_kc is None


@pytest.mark.parametrize("loss_type", sorted(set(LOSS_TYPES) - set(KL_LOSS_TYPES)))
def test_alpha_refused_where_it_has_no_meaning(loss_type):
    with pytest.raises(ValueError, match=loss_type):
        _pair(loss_type, 2, -1, alpha=0.5, kl_chosen=torch.zeros(1), kl_rejected=torch.zeros(1))


def test_alpha_with_f_divergence_raises():
    with pytest.raises(ValueError, match="forward_kl"):
        kls = {"kl_chosen": torch.zeros(1), "kl_rejected": torch.zeros(1)}
        _pair("sigmoid", 2, -1, alpha=0.5, f_divergence_type="forward_kl", **kls)


def test_alpha_without_kl_raises():
    with pytest.raises(ValueError, match="kl_chosen"):
        _pair("sigmoid", 2, -1, alpha=0.5)


def test_alpha_zero_ignores_kl():
    kls = {"kl_chosen": torch.tensor([9.0]), "kl_rejected": torch.tensor([-9.0])}
    assert _pair("sigmoid", 2, -1, **kls) == _pair("sigmoid", 2, -1)


@pytest.mark.parametrize("loss_type", ["not_a_loss", "simpo", "kto_pair"])
def test_unknown_loss_type_raises(loss_type):
    with pytest.raises(ValueError, match=loss_type):
        _pair(loss_type, 2, -1)


# ------------------------------------------------------------------------------- parity with TRL 1.16's DPOTrainer


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory, tokenizer):
    """
    One `DPOTrainer` (tiny Llama policy, another seed as reference) and one batch of 4 pairs, the first with an empty
    prompt so its completion starts at position 0 (TRL counts that unscored token in the ipo/sigmoid_norm length).
    Built with `use_weighting=True` so the fused head also returns `log_sum_sq_probs`; each test then sets the loss
    options on the trainer, which `_compute_loss` reads at call time.
    """
    from datasets import Dataset
    from helpers_trainer import CPU_ARGS
    from trl import DPOConfig, DPOTrainer

    from trl_tidpo.tools.demo.tiny_models import build_tiny_llama

    dataset = Dataset.from_dict(
        {
            "prompt": ["", "the sky is", "hello", "what"],
            "chosen": ["rest and drink water .", " blue .", " hello world , how good !", " yes"],
            "rejected": ["take pills", " green and red and bad .", " bad", " no maybe"],
        }
    )
    trainer = DPOTrainer(
        model=build_tiny_llama(len(tokenizer), seed=0),
        ref_model=build_tiny_llama(len(tokenizer), seed=1),
        args=DPOConfig(output_dir=str(tmp_path_factory.mktemp("dpo")), **{**CPU_ARGS, "use_weighting": True}),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["completion_mask"][0, 0] == 1 and batch["completion_mask"][4, 0] == 1
    return trainer, batch


def _full_logits_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """`[2B, T-1]` log p(token i+1) and log Σ_v p_v² at every position, from the model's full (unfused) logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    log_dist = logits.log_softmax(dim=-1)
    logps = log_dist.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return logps, torch.logsumexp(2 * log_dist, dim=-1)


def _ours_on_batch(trainer, batch, loss_types, loss_weights, ld_alpha, use_weighting, options):
    """This module's loss with w ≡ 1 on full-logits log-probs of TRL's batch; also its rewards and policy sums."""
    lp, log_sum_sq = _full_logits_logps(trainer.model, batch)
    with torch.no_grad():
        lr, _ = _full_logits_logps(trainer.ref_model, batch)
    mask = batch["completion_mask"]
    shift_mask = mask[:, 1:]
    w = torch.ones_like(lp)
    if ld_alpha is None:
        logps, ref_logps = weighted_sequence_logps(lp, w, shift_mask), weighted_sequence_logps(lr, w, shift_mask)
    else:
        logps = length_desensitized_logps(lp, w, shift_mask, ld_alpha)
        ref_logps = length_desensitized_logps(lr, w, shift_mask, ld_alpha)
    lengths = weight_sums(w, mask)
    n = lp.size(0) // 2
    loss = combined_preference_loss(
        loss_types,
        logps[:n],
        logps[n:],
        ref_logps[:n],
        ref_logps[n:],
        loss_weights=loss_weights,
        pair_weights=wpo_pair_weights(lp, log_sum_sq, shift_mask) if use_weighting else None,
        chosen_weight_sum=lengths[:n],
        rejected_weight_sum=lengths[n:],
        sft_logps=weighted_sequence_logps(lp, w, shift_mask)[:n],
        sft_weight_sum=weight_sums(w, mask, scored_only=True)[:n],
        **options,
    )
    rewards = pair_rewards(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], options["beta"])
    return loss, rewards, logps


PARITY_CASES = (
    [pytest.param([lt], {}, id=lt) for lt in LOSS_TYPES]
    + [
        pytest.param([lt], {"f_divergence_type": f}, id=f"{lt}-{f}")
        for f in ("forward_kl", "js_divergence", "alpha_divergence")
        for lt in ("sigmoid", "ipo", "sigmoid_norm", "exo_pair", "discopop", "sft")  # hinge, robust: as sigmoid
    ]
    + [
        pytest.param(["sigmoid"], {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": a}, id=f"a={a}")
        for a in (1.0, 2.0)
    ]
    + [pytest.param(["discopop"], {"discopop_tau": 0.5}, id="discopop-tau")]
    + [pytest.param([lt], {"ld_alpha": 0.5}, id=f"{lt}-ld") for lt in ("sigmoid", "ipo", "aot", "sft", "apo_down")]
    + [
        pytest.param([lt], {"use_weighting": True}, id=f"{lt}-wpo")
        for lt in LOSS_TYPES
        if lt not in ("aot", "aot_unpaired", "hinge", "sft")  # TRL refuses aot*, and fails for hinge/sft (in place)
    ]
    + [
        pytest.param(["sigmoid", "sft", "bco_pair"], {"loss_weights": [0.8, 0.2, 1.0]}, id="mpo"),
        pytest.param(["sigmoid", "sft", "ipo"], {"loss_weights": [0.8, 0.2, 1.0], "ld_alpha": 0.3}, id="mpo-ld"),
        pytest.param(["ipo", "sigmoid_norm", "apo_zero"], {"use_weighting": True}, id="multi-wpo"),
    ]
)


@pytest.mark.parametrize("loss_types, config", PARITY_CASES)
def test_uniform_weights_reproduce_dpo_trainer(trl_trainer, loss_types, config):
    """
    w ≡ 1 on TRL's own batch: the loss, every parameter's gradient and the reward/logps metrics equal those of TRL
    1.16's `DPOTrainer._compute_loss` for the same options (full logits here, TRL's fused LM head there).
    """
    trainer, batch = trl_trainer
    loss_weights = config.get("loss_weights")
    ld_alpha = config.get("ld_alpha")
    use_weighting = config.get("use_weighting", False)
    options = {
        "beta": BETA,
        "label_smoothing": 0.1,
        "f_divergence_type": config.get("f_divergence_type", "reverse_kl"),
        "f_alpha_divergence_coef": config.get("f_alpha_divergence_coef", 0.5),
        "discopop_tau": config.get("discopop_tau", 0.05),
    }
    trainer.beta = BETA
    trainer.loss_types = loss_types
    trainer.loss_weights = loss_weights or [1.0] * len(loss_types)
    trainer.label_smoothing = options["label_smoothing"]
    trainer.f_divergence_type = options["f_divergence_type"]
    trainer.f_alpha_divergence_coef = options["f_alpha_divergence_coef"]
    trainer.args.discopop_tau = options["discopop_tau"]
    trainer.ld_alpha = ld_alpha
    trainer.use_weighting = use_weighting

    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    loss, (chosen_rewards, rejected_rewards), logps = _ours_on_batch(
        trainer, batch, loss_types, loss_weights, ld_alpha, use_weighting, options
    )
    loss.backward()
    torch.testing.assert_close(loss, trl_loss.detach(), atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert any(g.abs().sum() > 0 for g in trl_grads.values())

    metrics = trainer._metrics["train"]
    assert metrics["rewards/chosen"][-1] == pytest.approx(chosen_rewards.mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"][-1] == pytest.approx(rejected_rewards.mean().item(), abs=1e-5)
    assert metrics["rewards/margins"][-1] == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), abs=1e-5)
    assert metrics["logps/chosen"][-1] == pytest.approx(logps[:4].mean().item(), abs=1e-4)
    model.zero_grad(set_to_none=True)
