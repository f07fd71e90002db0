"""Tests of the importance reduction, its normalisation and the hybrid weights (SPEC §2 steps 3-9, Eq. 6-8)."""

import math

import pytest
import torch

from trl_tidpo.ops.importance import hybrid_token_weights, importance_from_gradients, normalize_importance


def _reference_weights(raw, span_mask, lam, rho, normalization):
    """
    Explicit per-row loop of SPEC §2 steps 4-8 in Python floats.

    Returns (weights [R, T] float32, fallback list[bool]).
    """
    weights = torch.zeros(raw.shape, dtype=torch.float64)
    fallback = []
    for r in range(raw.size(0)):
        cols = [j for j in range(raw.size(1)) if bool(span_mask[r, j])]
        n = len(cols)
        total = sum(float(raw[r, j]) for j in cols)
        bad = not math.isfinite(total) or total <= 0
        fallback.append(bad)
        if n == 0:
            continue
        mu, sigma = (n - 1) / 2, max(1.0, rho * n)
        dens = [math.exp(-0.5 * ((p - mu) / sigma) ** 2) for p in range(n)]
        row_lam = 0.0 if bad else lam
        for p, j in enumerate(cols):
            imp = 0.0 if bad else float(raw[r, j]) / total
            h = row_lam * imp + (1 - row_lam) * dens[p] / sum(dens)
            weights[r, j] = h * n if normalization == "mean" else h
    return weights.float(), fallback


def _random_case(seed=0, rows=6, length=17):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.rand(rows, length, generator=gen) * 3.0
    span = torch.rand(rows, length, generator=gen) > 0.35
    span[0, :5] = False  # a prompt-like prefix outside the span
    span[1] = False  # an empty span
    span[1, 3] = True  # ... made a single-token span
    return raw, span


# --- importance_from_gradients ---------------------------------------------------------------------------------------


def test_importance_is_l1_over_hidden_against_loop():
    torch.manual_seed(0)
    grads = torch.randn(3, 5, 7)
    result = importance_from_gradients(grads)
    expected = torch.zeros(3, 5)
    for r in range(3):
        for j in range(5):
            expected[r, j] = sum(abs(float(grads[r, j, k])) for k in range(7))
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-6)


def test_importance_accumulates_bf16_in_float32():
    """
    257 entries of −1 in bf16: Σ|g| = 257 exactly in float32, but 257 is not representable in bf16 (8-bit mantissa:
    256 and 258 are its neighbours), so a bf16 result could not be 257.
    """
    grads = -torch.ones(2, 1, 257, dtype=torch.bfloat16)
    result = importance_from_gradients(grads)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, torch.full((2, 1), 257.0), atol=0, rtol=0)


# --- normalize_importance --------------------------------------------------------------------------------------------


def test_normalize_sums_to_one_over_span_and_zero_outside():
    """raw = [5, 1, 3, 1], span = positions 1..3: Σ_S = 1 + 3 + 1 = 5 → Î = [0, 0.2, 0.6, 0.2]."""
    raw = torch.tensor([[5.0, 1.0, 3.0, 1.0]])
    span = torch.tensor([[0, 1, 1, 1]])
    normalized, invalid = normalize_importance(raw, span)
    torch.testing.assert_close(normalized, torch.tensor([[0.0, 0.2, 0.6, 0.2]]))
    assert invalid.tolist() == [False]


def test_normalize_random_rows_sum_to_one():
    raw, span = _random_case()
    normalized, invalid = normalize_importance(raw, span)
    assert not invalid.any()
    torch.testing.assert_close(normalized.sum(-1), torch.ones(raw.size(0)), atol=1e-6, rtol=0)
    assert (normalized[~span] == 0).all()
    for r in range(raw.size(0)):
        total = float(raw[r][span[r]].sum())
        torch.testing.assert_close(normalized[r][span[r]], raw[r][span[r]] / total)


@pytest.mark.parametrize(
    "bad_row",
    [
        [0.0, 0.0, 0.0, 0.0],  # zero total
        [1.0, float("inf"), 1.0, 1.0],  # e.g. fp16 overflow
        [1.0, float("nan"), 1.0, 1.0],
        [float("inf"), float("-inf"), 1.0, 1.0],  # inf - inf = nan total
    ],
    ids=["zero", "inf", "nan", "inf_minus_inf"],
)
def test_normalize_flags_invalid_totals_and_gives_zeros(bad_row):
    raw = torch.tensor([bad_row, [1.0, 2.0, 3.0, 4.0]])
    span = torch.ones(2, 4, dtype=torch.bool)
    normalized, invalid = normalize_importance(raw, span)
    assert invalid.tolist() == [True, False]
    assert torch.isfinite(normalized).all()
    torch.testing.assert_close(normalized[0], torch.zeros(4))
    torch.testing.assert_close(normalized[1], torch.tensor([0.1, 0.2, 0.3, 0.4]))


def test_normalize_ignores_non_finite_values_outside_span():
    """A NaN/inf on a prompt position must not poison a row whose span is finite."""
    raw = torch.tensor([[float("nan"), float("inf"), 1.0, 3.0]])
    span = torch.tensor([[0, 0, 1, 1]])
    normalized, invalid = normalize_importance(raw, span)
    assert invalid.tolist() == [False]
    torch.testing.assert_close(normalized, torch.tensor([[0.0, 0.0, 0.25, 0.75]]))


def test_normalize_empty_span_is_flagged():
    normalized, invalid = normalize_importance(torch.ones(1, 3), torch.zeros(1, 3))
    assert invalid.tolist() == [True]
    torch.testing.assert_close(normalized, torch.zeros(1, 3))


# --- hybrid_token_weights --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["mean", "sum"])
@pytest.mark.parametrize("lam", [0.0, 0.2, 0.7, 1.0])
def test_hybrid_matches_per_row_loop(lam, normalization):
    raw, span = _random_case(seed=3)
    mixed = hybrid_token_weights(raw, span, lam, 0.25, normalization)
    weights, fallback = mixed.weights, mixed.fallback
    expected, expected_fallback = _reference_weights(raw, span, lam, 0.25, normalization)
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)
    assert fallback.tolist() == expected_fallback


def test_hybrid_hand_computed():
    """
    Span of 4 (σ = 1), P̂ = [0.1344707, 0.3655293, 0.3655293, 0.1344707]; raw = [1, 0, 0, 3] → Î = [0.25, 0, 0, 0.75].
    λ = 0.5: h = 0.5·Î + 0.5·P̂ = [0.1922354, 0.1827646, 0.1827646, 0.4422354]; "mean" ×4 =
    [0.7689414, 0.7310587, 0.7310587, 1.7689414].
    """
    raw = torch.tensor([[1.0, 0.0, 0.0, 3.0]])
    span = torch.ones(1, 4)
    mixed = hybrid_token_weights(raw, span, 0.5, 0.25, "mean")
    weights = mixed.weights
    expected = torch.tensor([[0.7689414, 0.7310587, 0.7310587, 1.7689414]])
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)
    mixed = hybrid_token_weights(raw, span, 0.5, 0.25, "sum")
    weights = mixed.weights
    expected = torch.tensor([[0.1922354, 0.1827646, 0.1827646, 0.4422354]])
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)


def test_lambda_zero_is_prior():
    """λ = 0: the hybrid is the prior; "mean" multiplies by n. Prior from the explicit formula, σ = max(1, ρn)."""
    raw, span = _random_case(seed=4)
    expected_sum = torch.zeros_like(raw)
    for r in range(raw.size(0)):
        cols = span[r].nonzero().flatten().tolist()
        n = len(cols)
        mu, sigma = (n - 1) / 2, max(1.0, 0.25 * n)
        dens = [math.exp(-0.5 * ((p - mu) / sigma) ** 2) for p in range(n)]
        for p, j in enumerate(cols):
            expected_sum[r, j] = dens[p] / sum(dens)
    mixed = hybrid_token_weights(raw, span, 0.0, 0.25, "sum")
    weights = mixed.weights
    torch.testing.assert_close(weights, expected_sum, atol=1e-6, rtol=0)
    mixed = hybrid_token_weights(raw, span, 0.0, 0.25, "mean")
    weights = mixed.weights
    torch.testing.assert_close(weights, expected_sum * span.sum(-1, keepdim=True), atol=1e-5, rtol=0)


def test_lambda_one_is_normalised_importance():
    raw, span = _random_case(seed=5)
    expected = torch.zeros_like(raw)
    for r in range(raw.size(0)):
        total = sum(float(raw[r, j]) for j in range(raw.size(1)) if span[r, j])
        for j in range(raw.size(1)):
            if span[r, j]:
                expected[r, j] = float(raw[r, j]) / total
    mixed = hybrid_token_weights(raw, span, 1.0, 0.25, "sum")
    weights = mixed.weights
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)


def test_mean_weights_average_one_and_sum_weights_sum_to_one():
    raw, span = _random_case(seed=6)
    n = span.sum(-1).float()
    mixed = hybrid_token_weights(raw, span, 0.7, 0.25, "mean")
    mean_w = mixed.weights
    mixed = hybrid_token_weights(raw, span, 0.7, 0.25, "sum")
    sum_w = mixed.weights
    torch.testing.assert_close(mean_w.sum(-1) / n, torch.ones_like(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(sum_w.sum(-1), torch.ones_like(n), atol=1e-6, rtol=0)
    assert (mean_w[~span] == 0).all() and (sum_w[~span] == 0).all()


def test_fallback_rows_equal_prior():
    """Rows whose importance is 0 / inf / nan get the prior alone (λ ignored) and are flagged; others are not."""
    raw = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [1.0, float("inf"), 1.0, 1.0], [float("nan"), 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 3.0]]
    )
    span = torch.ones(4, 4)
    mixed = hybrid_token_weights(raw, span, 0.7, 0.25, "mean")
    weights, fallback = mixed.weights, mixed.fallback
    assert fallback.tolist() == [True, True, True, False]
    prior_times_n = 4 * torch.tensor([0.1344707, 0.3655293, 0.3655293, 0.1344707])
    for r in range(3):
        torch.testing.assert_close(weights[r], prior_times_n, atol=1e-5, rtol=0)
    assert torch.isfinite(weights).all()
    assert not torch.allclose(weights[3], prior_times_n, atol=1e-3)


def test_empty_span_rows_are_zero_not_nan_and_not_fallbacks():
    """A row with no token in its span has nothing to attribute: weights 0, flagged `empty`, not an attribution
    fallback (whose warning says the attribution "sums to 0 or is not finite")."""
    raw = torch.ones(3, 5)
    raw[2] = 0.0  # a real fallback: a non-empty span whose attribution sums to 0
    span = torch.tensor([[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 0, 0]])
    mixed = hybrid_token_weights(raw, span, 0.7, 0.25, "mean")
    assert torch.isfinite(mixed.weights).all()
    torch.testing.assert_close(mixed.weights[0], torch.zeros(5))
    assert mixed.empty.tolist() == [True, False, False]
    assert mixed.fallback.tolist() == [False, False, True]


def test_weights_are_detached():
    raw, span = _random_case(seed=7)
    raw = raw.clone().requires_grad_(True)
    mixed = hybrid_token_weights(raw * 2.0, span, 0.7, 0.25, "mean")
    weights = mixed.weights
    assert not weights.requires_grad
    assert weights.grad_fn is None


def test_unknown_normalization_raises():
    with pytest.raises(ValueError, match="normalization"):
        hybrid_token_weights(torch.ones(1, 3), torch.ones(1, 3), 0.7, 0.25, "max")
