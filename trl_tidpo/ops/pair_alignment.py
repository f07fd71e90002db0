"""
What a pair's two completions share: the aligned common prefix and suffix of the chosen and rejected token sequences,
and the weights that follow from it (`token_weighting="difference"`).

Pure tensor functions on TRL's pair layout (rows `[chosen_0..chosen_{B-1}; rejected_0..rejected_{B-1}]`).
"""

from dataclasses import dataclass

import torch

from .importance import HybridWeights


@dataclass
class PairAlignment:
    """
    Where the chosen and rejected completions of each pair agree, token by token.

    Attributes:
        shared_prefix: `[2B, T]` bool, completion tokens of the common prefix (the same tokens, in the same order, from
            the first completion token on, in both rows of the pair).
        shared_suffix: `[2B, T]` bool, completion tokens of the common suffix (counted from the last completion token
            backwards), never overlapping the prefix.
        first_divergent: `[2B]` long, the position (unshifted axis) of each row's first completion token after the
            common prefix, or -1 when the row has none (its completion is a prefix of the other's).
    """

    shared_prefix: torch.Tensor
    shared_suffix: torch.Tensor
    first_divergent: torch.Tensor

    @property
    def shared(self) -> torch.Tensor:
        """`[2B, T]` bool, the tokens of the common prefix or suffix."""
        return self.shared_prefix | self.shared_suffix


def _completion_first_order(completion_mask: torch.Tensor) -> torch.Tensor:
    """`[R, T]` permutation of each row's positions that lists its completion positions first, in order."""
    return torch.argsort((~completion_mask.bool()).to(torch.int8), dim=-1, stable=True)


def _agreeing_run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`[B]` length of the leading run where the `[B, L]` sequences `a` and `b` are equal."""
    return (a == b).long().cumprod(dim=-1).sum(dim=-1)


def align_pair_completions(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> PairAlignment:
    """
    The common prefix and suffix of the chosen and rejected completions of each pair.

    Completion tokens are compared after left-aligning them (so a prompt truncated differently in the two rows does
    not misalign them); the suffix is compared right-aligned and stops where the prefix ends, so that a token is
    never in both.

    Args:
        input_ids (`torch.Tensor`): `[2B, T]` token ids, chosen rows then rejected rows.
        completion_mask (`torch.Tensor`): `[2B, T]` unshifted, 1 on completion tokens.

    Returns:
        `PairAlignment`.
    """
    rows, length = input_ids.shape
    if rows % 2:
        raise ValueError(f"Expected chosen rows then rejected rows (an even count), got {rows} rows.")
    mask = completion_mask.bool()
    order = _completion_first_order(mask)
    counts = mask.sum(dim=-1)  # [2B]
    index = torch.arange(length, device=input_ids.device).expand(rows, length)
    inside = index < counts.unsqueeze(-1)
    # Padding never matches: -1 in chosen rows, -2 in rejected rows
    pad = torch.cat([torch.full((rows // 2, 1), -1), torch.full((rows // 2, 1), -2)]).to(input_ids.device)
    aligned = torch.where(inside, input_ids.gather(1, order), pad)
    reversed_index = (counts.unsqueeze(-1) - 1 - index).clamp(min=0)
    right_aligned = torch.where(inside, aligned.gather(1, reversed_index), pad)

    n_chosen, n_rejected = counts.chunk(2)
    prefix = _agreeing_run(*aligned.chunk(2))  # [B]
    suffix = torch.minimum(_agreeing_run(*right_aligned.chunk(2)), torch.minimum(n_chosen, n_rejected) - prefix)
    prefix, suffix = prefix.repeat(2).unsqueeze(-1), suffix.repeat(2).unsqueeze(-1)  # [2B, 1]

    in_prefix = index < prefix
    in_suffix = inside & (index >= counts.unsqueeze(-1) - suffix)
    shared_prefix = torch.zeros_like(mask).scatter(1, order, in_prefix)
    shared_suffix = torch.zeros_like(mask).scatter(1, order, in_suffix)
    diverges = prefix.squeeze(-1) < counts
    first = order.gather(1, prefix.clamp(max=length - 1)).squeeze(-1)
    first_divergent = torch.where(diverges, first, torch.full_like(first, -1))
    return PairAlignment(shared_prefix & mask, shared_suffix & mask, first_divergent)


def difference_token_weights(
    shared: torch.Tensor,
    completion_mask: torch.Tensor,
    shared_weight: float,
    differing_weight: float,
    normalization: str = "mean",
) -> HybridWeights:
    """
    Weights from the pair's own difference: `shared_weight` on the tokens both completions share (aligned common
    prefix and suffix), `differing_weight` on the rest, normalised per row like TI-DPO's weights (`"mean"`: average 1
    over the row's scored completion tokens; `"sum"`: sum to 1).

    A row whose raw weights sum to 0 (for example `shared_weight=0` on a completion that is all shared) gets uniform
    weights and is flagged as a fallback row, as a zero attribution falls back to the prior.

    Args:
        shared (`torch.Tensor`): `[R, T]` bool on the unshifted axis (`PairAlignment.shared`).
        completion_mask (`torch.Tensor`): `[R, T-1]` shifted completion mask (entry `i` scores token `i+1`).
        shared_weight, differing_weight (`float`): the raw weights, ≥ 0.
        normalization (`str`): `"mean"` or `"sum"`.

    Returns:
        `HybridWeights` with `weights` `[R, T-1]` on the shifted axis (0 off the completion), no importance or prior.
    """
    if normalization not in ("mean", "sum"):
        raise ValueError(f"`normalization` must be 'mean' or 'sum', got {normalization!r}.")
    maskf = completion_mask.float()
    raw = torch.where(shared[:, 1:].bool(), shared_weight, differing_weight).float() * maskf
    total = raw.sum(dim=-1, keepdim=True)
    count = maskf.sum(dim=-1, keepdim=True)
    empty = count.squeeze(-1) == 0
    fallback = (total.squeeze(-1) <= 0) & ~empty
    raw = torch.where(fallback.unsqueeze(-1), maskf, raw)
    total = torch.where(fallback.unsqueeze(-1), count, total).clamp(min=torch.finfo(torch.float32).tiny)
    weights = raw / total
    if normalization == "mean":
        weights = weights * count
    return HybridWeights(weights, None, None, fallback, empty)


def pair_difference_weights(
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    shared_weight: float,
    differing_weight: float,
    normalization: str = "mean",
) -> HybridWeights:
    """
    `token_weighting="difference"` for a batch of pairs: align each pair's completions (`align_pair_completions`),
    then weigh the shared and the differing tokens (`difference_token_weights`). The trainer and `explain` call this.

    Args:
        input_ids (`torch.Tensor`): `[2B, T]` token ids, chosen rows then rejected rows.
        completion_mask (`torch.Tensor`): `[2B, T-1]` shifted completion mask (entry `i` scores token `i+1`).
        shared_weight, differing_weight (`float`): the raw weights, ≥ 0.
        normalization (`str`): `"mean"` or `"sum"`.

    Returns:
        `HybridWeights` with `weights` `[2B, T-1]` on the shifted axis.
    """
    unshifted = torch.nn.functional.pad(completion_mask, (1, 0), value=0)  # [2B, T]; token 0 is never scored
    alignment = align_pair_completions(input_ids, unshifted)
    return difference_token_weights(alignment.shared, completion_mask, shared_weight, differing_weight, normalization)


def tie_shared_prefix(weights: torch.Tensor, shared_prefix: torch.Tensor) -> torch.Tensor:
    """
    Give the two rows of a pair one weight on each token of their common prefix: the mean of the two.

    Identical prefix tokens have identical contexts, so their log-ratios are equal in both rows; with per-row weights
    `w_c ≠ w_r` they leave a term `(w_c − w_r)·ℓ` in the margin that uniform weights cancel. Tying removes it.

    Args:
        weights (`torch.Tensor`): `[2B, T-1]` shifted weights.
        shared_prefix (`torch.Tensor`): `[2B, T]` bool, unshifted (`PairAlignment.shared_prefix`). The prefix sits at
            the same positions in both rows when the prompt is the same; rows where it does not are left as they are.

    Returns:
        `torch.Tensor`: `[2B, T-1]` weights with the prefix tied.
    """
    prefix = shared_prefix[:, 1:]
    chosen_prefix, rejected_prefix = prefix.chunk(2)
    same_positions = (chosen_prefix == rejected_prefix).all(dim=-1, keepdim=True)  # [B, 1]
    tie = (chosen_prefix & same_positions).repeat(2, 1)
    chosen, rejected = weights.chunk(2)
    mean = ((chosen + rejected) / 2).repeat(2, 1)
    return torch.where(tie, mean, weights)

