"""Tests of the Gaussian positional prior (SPEC §2 step 6) against hand arithmetic and explicit loops."""

import math

import pytest
import torch

from trl_tidpo.ops.prior import gaussian_prior


def _reference_prior(span_mask: torch.Tensor, sigma_ratio: float) -> torch.Tensor:
    """Explicit per-row, per-position loop in Python floats (independent of the vectorised code)."""
    out = torch.zeros(span_mask.shape, dtype=torch.float64)
    for r in range(span_mask.size(0)):
        cols = [j for j in range(span_mask.size(1)) if bool(span_mask[r, j])]
        n = len(cols)
        if n == 0:
            continue
        mu = (n - 1) / 2
        sigma = max(1.0, sigma_ratio * n)
        dens = [math.exp(-0.5 * ((p - mu) / sigma) ** 2) for p in range(n)]
        total = sum(dens)
        for p, j in enumerate(cols):
            out[r, j] = dens[p] / total
    return out.float()


def test_hand_computed_span_of_four():
    """
    Span of n = 4 tokens after a 2-token prompt, ρ = 0.25:
        σ = max(1, 0.25·4) = 1, μ = (4 − 1)/2 = 1.5
        z = (p − μ)/σ = −1.5, −0.5, 0.5, 1.5
        P = exp(−z²/2) = e^−1.125, e^−0.125, e^−0.125, e^−1.125 = 0.3246525, 0.8824969, 0.8824969, 0.3246525
        ΣP = 2.4142987
        P̂ = 0.1344707, 0.3655293, 0.3655293, 0.1344707; prompt positions get 0.
    """
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    expected = torch.tensor([[0.0, 0.0, 0.1344707, 0.3655293, 0.3655293, 0.1344707]])
    torch.testing.assert_close(gaussian_prior(mask, 0.25), expected, atol=1e-6, rtol=0)


def test_hand_computed_span_of_three_with_floor():
    """
    n = 3, ρ = 0.25: ρn = 0.75 < 1, so σ = 1; μ = 1.
        P = e^−0.5, 1, e^−0.5 = 0.6065307, 1, 0.6065307; ΣP = 2.2130613
        P̂ = 0.2740686, 0.4518628, 0.2740686
    """
    mask = torch.tensor([[1, 1, 1, 0]])
    expected = torch.tensor([[0.2740686, 0.4518628, 0.2740686, 0.0]])
    torch.testing.assert_close(gaussian_prior(mask, 0.25), expected, atol=1e-6, rtol=0)


def test_sigma_floor_is_one():
    """With ρn < 1 the prior is the σ = 1 prior, whatever ρ is (σ = max(1, ρn))."""
    mask = torch.ones(1, 4)
    # ρ = 0.1 and ρ = 0.2 give ρn = 0.4 and 0.8, both floored to 1: the σ = 1 values of the hand-worked case.
    expected = torch.tensor([[0.1344707, 0.3655293, 0.3655293, 0.1344707]])
    for rho in (0.01, 0.1, 0.2, 0.25):
        torch.testing.assert_close(gaussian_prior(mask, rho), expected, atol=1e-6, rtol=0)


def test_sigma_above_floor_uses_ratio():
    """n = 8, ρ = 0.5: σ = 4 (no floor), μ = 3.5; compared with the explicit formula, and it differs from σ = 1."""
    mask = torch.ones(1, 8)
    dens = [math.exp(-0.5 * ((p - 3.5) / 4.0) ** 2) for p in range(8)]
    expected = torch.tensor([[d / sum(dens) for d in dens]])
    result = gaussian_prior(mask, 0.5)
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(result, gaussian_prior(mask, 0.1), atol=1e-3)


def test_non_contiguous_span_counts_span_positions():
    """Positions are counted over the span's tokens only: a gapped span of 4 gets the contiguous n = 4 values."""
    mask = torch.tensor([[0, 1, 0, 1, 1, 0, 0, 1]])
    expected = torch.tensor([[0.0, 0.1344707, 0.0, 0.3655293, 0.3655293, 0.0, 0.0, 0.1344707]])
    torch.testing.assert_close(gaussian_prior(mask, 0.25), expected, atol=1e-6, rtol=0)


def test_empty_span_gives_zeros_not_nan():
    mask = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0]])
    result = gaussian_prior(mask, 0.25)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result[0], torch.zeros(4))
    torch.testing.assert_close(result[1].sum(), torch.tensor(1.0))


def test_rows_sum_to_one_and_match_loop():
    torch.manual_seed(0)
    mask = torch.rand(16, 23) > 0.4
    mask[0] = False  # one empty row
    mask[1] = True  # one full row
    result = gaussian_prior(mask, 0.25)
    torch.testing.assert_close(result, _reference_prior(mask, 0.25), atol=1e-6, rtol=0)
    sums = result.sum(dim=-1)
    nonempty = mask.any(dim=-1)
    torch.testing.assert_close(sums[nonempty], torch.ones(int(nonempty.sum())), atol=1e-6, rtol=0)
    assert (result[~mask] == 0).all()


@pytest.mark.parametrize("rho", [0.125, 0.25, 1.0])
def test_bool_and_int_masks_agree_with_loop(rho):
    torch.manual_seed(1)
    mask = (torch.rand(5, 40) > 0.3).long()
    torch.testing.assert_close(gaussian_prior(mask, rho), _reference_prior(mask, rho), atol=1e-6, rtol=0)
    torch.testing.assert_close(gaussian_prior(mask.bool(), rho), gaussian_prior(mask, rho))
    assert gaussian_prior(mask, rho).dtype == torch.float32
