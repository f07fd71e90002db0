"""
Token importance: from embedding gradients to TI-DPO's hybrid token weights (paper §4.2, Eq. 6-8; SPEC §2).

Pure tensor functions. The model-facing half (hooks, the attribution target, the backward) is in `attribution.py`.
"""

import torch

from .prior import gaussian_prior


def importance_from_gradients(embedding_grads: torch.Tensor) -> torch.Tensor:
    """
    Raw importance `I[r, j] = sum_k |d s_r / d e[r, j, k]|`, the L1 norm over the hidden dimension (Eq. 6).

    Args:
        embedding_grads (`torch.Tensor`): `[R, T, H]` gradient of the attribution target w.r.t. the embedding
            activations, any floating dtype.

    Returns:
        `torch.Tensor`: `[R, T]` float32 raw importance (accumulated in float32).
    """
    return embedding_grads.float().abs().sum(dim=-1)


def normalize_importance(raw_importance: torch.Tensor, span_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Normalise raw importance to sum to 1 over each row's span (Eq. 7, "normalised by their sum").

    Args:
        raw_importance (`torch.Tensor`): `[R, T]` non-negative raw importance.
        span_mask (`torch.Tensor`): `[R, T]`, 1 on the span.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the normalised importance `Î` `[R, T]` float32 (0 outside the span), and a
        `[R]` bool tensor marking the rows whose span sum was 0 or not finite (for example after an fp16 overflow).
        Those rows are all 0 in `Î`, never NaN: the caller falls back to the prior for them.
    """
    maskf = span_mask.float()
    masked = torch.where(span_mask.bool(), raw_importance.float(), torch.zeros_like(maskf))
    total = masked.sum(dim=-1)  # [R]
    invalid = ~torch.isfinite(total) | (total <= 0)
    safe_total = torch.where(invalid, torch.ones_like(total), total)
    normalized = torch.where(invalid.unsqueeze(-1), torch.zeros_like(masked), masked / safe_total.unsqueeze(-1))
    return normalized, invalid


def hybrid_token_weights(
    raw_importance: torch.Tensor,
    span_mask: torch.Tensor,
    importance_lambda: float,
    prior_sigma_ratio: float,
    normalization: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    TI-DPO's hybrid token weights `w = scale * (λ·Î + (1-λ)·P̂)` (Eq. 8), detached.

    Args:
        raw_importance (`torch.Tensor`): `[R, T]` raw gradient attribution (see `importance_from_gradients`).
        span_mask (`torch.Tensor`): `[R, T]`, 1 on the tokens the weights are spread over.
        importance_lambda (`float`): λ in [0, 1]; 1 is gradient-only, 0 prior-only.
        prior_sigma_ratio (`float`): ρ of the Gaussian prior.
        normalization (`str`): `"mean"` multiplies by the span length `n` so weights average 1 over the span (official
            code); `"sum"` leaves them summing to 1 (paper text).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: weights `[R, T]` float32 (0 outside the span), and the `[R]` bool
        tensor of rows that fell back to the prior alone because their importance could not be normalised.
    """
    if normalization not in ("mean", "sum"):
        raise ValueError(f"`normalization` must be 'mean' or 'sum', got {normalization!r}.")
    prior = gaussian_prior(span_mask, prior_sigma_ratio)
    importance, fallback = normalize_importance(raw_importance, span_mask)
    lam = torch.full_like(fallback, importance_lambda, dtype=torch.float32)
    lam = torch.where(fallback, torch.zeros_like(lam), lam).unsqueeze(-1)  # fallback rows: prior alone
    weights = lam * importance + (1.0 - lam) * prior
    if normalization == "mean":
        weights = weights * span_mask.float().sum(dim=-1, keepdim=True)
    return weights.detach(), fallback
