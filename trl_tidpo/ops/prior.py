"""The Gaussian positional prior of TI-DPO (paper §4.2; SPEC §2 step 6)."""

import torch


def gaussian_prior(span_mask: torch.Tensor, sigma_ratio: float) -> torch.Tensor:
    """
    Gaussian prior over the positions of each row's span, normalised to sum to 1 over the span.

    For a span of `n` tokens, positions `p = 0..n-1` get `exp(-0.5 * ((p - mu) / sigma) ** 2)` with
    `mu = (n - 1) / 2` and `sigma = max(1, sigma_ratio * n)`. Positions outside the span get 0. The span need not be
    contiguous: positions are counted over the span's tokens in order.

    Args:
        span_mask (`torch.Tensor`): `[R, T]`, 1 (or True) on the span's tokens.
        sigma_ratio (`float`): ρ, the prior's width as a fraction of the span length (paper: 1/4).

    Returns:
        `torch.Tensor`: `[R, T]` float32 prior `P̂`; each row sums to 1 over its span, or is all 0 when the span is
        empty.
    """
    mask = span_mask.bool()
    maskf = mask.float()
    position = maskf.cumsum(dim=-1) - 1.0  # p = 0..n-1 on the span, [R, T]
    n = maskf.sum(dim=-1, keepdim=True)  # [R, 1]
    mu = (n - 1.0) / 2.0
    sigma = (sigma_ratio * n).clamp(min=1.0)
    density = torch.exp(-0.5 * ((position - mu) / sigma) ** 2) * maskf
    return density / density.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
