"""
Token importance: from embedding gradients to TI-DPO's hybrid token weights (paper §4.2, Eq. 6-8; SPEC §2).

Pure tensor functions. The model-facing half (hooks, the attribution target, the backward) is in `attribution.py`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


@dataclass
class HybridWeights:
    """
    Token weights of `R` rows: what `hybrid_token_weights` computed (TI-DPO), or the trainer's other weightings in
    the same form. Every tensor `[R, T]` float32 and detached unless said otherwise.

    Attributes:
        weights: the token weights `w` (TI-DPO: Eq. 8, scaled per the normalisation), 0 outside the span.
        importance: the normalised attribution `Î` (Eq. 7), 0 outside the span and on fallback rows (None for
            weights that are not TI-DPO's: uniform, dataset, TIS-DPO, difference).
        prior: the normalised Gaussian prior `P̂` (None likewise).
        fallback: `[R]` bool, rows whose weights fell back. TI-DPO (`hybrid_token_weights`): the attribution over a
            non-empty span summed to 0 or was not finite (e.g. an fp16 overflow), so the row's weights are the prior
            alone. Difference weights (`difference_token_weights`): every token of the row weighed 0 (only shared
            tokens, with `difference_shared_weight=0`), so its weights are uniform.
        empty: `[R]` bool, rows with an empty span (no token to weigh; e.g. a completion truncated away). Not
            fallbacks: there is nothing to attribute.
    """

    weights: torch.Tensor
    importance: torch.Tensor | None
    prior: torch.Tensor | None
    fallback: torch.Tensor
    empty: torch.Tensor


def hybrid_token_weights(
    raw_importance: torch.Tensor,
    span_mask: torch.Tensor,
    importance_lambda: float,
    prior_sigma_ratio: float,
    normalization: str = "mean",
) -> HybridWeights:
    """
    TI-DPO's hybrid token weights `w = scale * (λ·Î + (1-λ)·P̂)` (Eq. 8), detached.

    Args:
        raw_importance (`torch.Tensor` or None): `[R, T]` raw gradient attribution (see `importance_from_gradients`);
            None with `importance_lambda=0` (prior only: no attribution was computed, `Î` is reported as 0).
        span_mask (`torch.Tensor`): `[R, T]`, 1 on the tokens the weights are spread over.
        importance_lambda (`float`): λ in [0, 1]; 1 is gradient-only, 0 prior-only.
        prior_sigma_ratio (`float`): ρ of the Gaussian prior.
        normalization (`str`): `"mean"` multiplies by the span length `n` so weights average 1 over the span (official
            code); `"sum"` leaves them summing to 1 (paper text).

    Returns:
        `HybridWeights`: the weights and what they were mixed from; rows that fell back to the prior are flagged.
    """
    if normalization not in ("mean", "sum"):
        raise ValueError(f"`normalization` must be 'mean' or 'sum', got {normalization!r}.")
    prior = gaussian_prior(span_mask, prior_sigma_ratio)
    if raw_importance is None:
        if importance_lambda != 0:
            raise ValueError(f"`raw_importance` is needed for `importance_lambda={importance_lambda}` (> 0).")
        raw_importance = torch.zeros_like(prior)
        importance, invalid = raw_importance, torch.zeros(prior.size(0), dtype=torch.bool, device=prior.device)
    else:
        importance, invalid = normalize_importance(raw_importance, span_mask)
    empty = ~span_mask.bool().any(dim=-1)
    lam = torch.full_like(invalid, importance_lambda, dtype=torch.float32)
    lam = torch.where(invalid, torch.zeros_like(lam), lam).unsqueeze(-1)  # fallback rows: prior alone
    weights = lam * importance + (1.0 - lam) * prior
    if normalization == "mean":
        weights = weights * span_mask.float().sum(dim=-1, keepdim=True)
    return HybridWeights(weights.detach(), importance.detach(), prior.detach(), invalid & ~empty, empty)


def completion_token_weights(
    raw_importance: torch.Tensor,
    completion_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    importance_lambda: float,
    prior_sigma_ratio: float,
    weight_span: str = "completion",
    weight_normalization: str = "mean",
) -> HybridWeights:
    """
    The hybrid weights of right-padded rows, on TRL's shifted token axis (entry `i` weighs token `i+1`).

    Args:
        raw_importance (`torch.Tensor` or None): `[R, T]` raw attribution, unshifted (entry `j` is token `j`); None
            with `importance_lambda=0`.
        completion_mask (`torch.Tensor`): `[R, T-1]`, shifted: 1 where entry `i` scores a completion token.
        attention_mask (`torch.Tensor`): `[R, T]`, unshifted.
        weight_span (`str`): normalise over the scored `"completion"` tokens or every attended token of the
            `"sequence"`.

    Returns:
        `HybridWeights` whose `weights`, `importance` and `prior` are `[R, T-1]` (shifted; weights 0 off the completion).
    """
    if weight_span == "completion":
        # Completion tokens that are scored (position 0 never is), on the unshifted axis of the importance
        span = F.pad(completion_mask, (1, 0), value=0)
    else:
        span = attention_mask
    mixed = hybrid_token_weights(raw_importance, span, importance_lambda, prior_sigma_ratio, weight_normalization)
    return HybridWeights(
        weights=mixed.weights[:, 1:] * completion_mask,
        importance=mixed.importance[:, 1:],
        prior=mixed.prior[:, 1:],
        fallback=mixed.fallback,
        empty=mixed.empty,
    )
