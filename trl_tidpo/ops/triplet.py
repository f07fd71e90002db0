"""
The triplet loss of TI-DPO (paper Eq. 13-14; SPEC §4).

The anchor `a` is a policy-sampled (or dataset-given) response to the same prompt. With per-token log-ratio vectors
`ℓ = log πθ - sg(log πref)` of the completion tokens, indexed from the first completion token:

    d_pos = sum_{t < min(n_a, n_c)} (ℓ^a_t - ℓ^c_t)^2
    d_neg = sum_{t < min(n_a, n_r)} (ℓ^a_t - ℓ^r_t)^2
    L_trip = max(0, d_pos - d_neg + m)

On on-policy pairs the policy's anchor is often a token copy of the rejected (or chosen) completion. A copy of the
rejected gives `ℓ^a = ℓ^r`, `d_neg = 0`, and the loss then minimises `d_pos = Σ (ℓ^r_t - ℓ^c_t)^2`: it pulls the pair's
log-ratios together, against the DPO margin (SPEC §4). `completion_copies` finds those rows, so that they can be counted
and, with `triplet_skip_copy_anchors`, left out.
"""

import torch


def left_align(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Move each row's masked-in entries to the front, in order, so that index `t` is the row's `t`-th completion token.

    Args:
        values (`torch.Tensor`): `[R, L]`.
        mask (`torch.Tensor`): `[R, L]`, 1 on the entries to keep.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: aligned values `[R, L]` (0 past each row's count) and the aligned mask
        `[R, L]` bool (a prefix of ones).
    """
    keep = mask.bool()
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # kept entries first, original order
    aligned_mask = torch.gather(keep, -1, order)
    aligned = torch.gather(values, -1, order)
    aligned = torch.where(aligned_mask, aligned, torch.zeros_like(aligned))  # where, not *: inf outside stays out
    return aligned, aligned_mask


def _prefix_sq_distance(
    a: torch.Tensor, a_mask: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor
) -> torch.Tensor:
    """Sum over the overlapping aligned prefix of `(a_t - b_t)^2`; inputs `[B, L_a]`, `[B, L_b]`; returns `[B]`."""
    width = min(a.size(-1), b.size(-1))
    overlap = a_mask[:, :width] & b_mask[:, :width]
    sq = (a[:, :width] - b[:, :width]) ** 2
    return torch.where(overlap, sq, torch.zeros_like(sq)).sum(dim=-1)


def triplet_distances(
    anchor_logratios: torch.Tensor,
    anchor_mask: torch.Tensor,
    chosen_logratios: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_logratios: torch.Tensor,
    rejected_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Squared distances between the anchor's per-token log-ratios and the chosen / rejected ones (Eq. 13).

    Inputs are per-token log-ratios on the model's (shifted) token axis with their completion masks; completion
    tokens are located from the masks, never from token ids.

    Args:
        anchor_logratios, chosen_logratios, rejected_logratios (`torch.Tensor`): `[B, L]` each (widths may differ).
        anchor_mask, chosen_mask, rejected_mask (`torch.Tensor`): `[B, L]`, 1 on completion tokens.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `d_pos` and `d_neg`, `[B]` each.
    """
    a, a_mask = left_align(anchor_logratios, anchor_mask)
    c, c_mask = left_align(chosen_logratios, chosen_mask)
    r, r_mask = left_align(rejected_logratios, rejected_mask)
    return _prefix_sq_distance(a, a_mask, c, c_mask), _prefix_sq_distance(a, a_mask, r, r_mask)


def triplet_loss(dist_pos: torch.Tensor, dist_neg: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-pair triplet loss `max(0, d_pos - d_neg + margin)` (Eq. 14); inputs and output `[B]`."""
    return torch.relu(dist_pos - dist_neg + margin)


def completion_copies(
    anchor_ids: torch.Tensor, anchor_mask: torch.Tensor, other_ids: torch.Tensor, other_mask: torch.Tensor
) -> torch.Tensor:
    """
    Rows whose anchor completion is token-for-token the other completion (same tokens, same length).

    Completion tokens are located from the masks, never from token ids (pad can equal EOS).

    Args:
        anchor_ids (`torch.Tensor`): `[B, L_a]` token ids of the anchor rows.
        anchor_mask (`torch.Tensor`): `[B, L_a]`, 1 on the anchor's completion tokens.
        other_ids (`torch.Tensor`): `[B, L_o]` token ids of the chosen (or rejected) rows.
        other_mask (`torch.Tensor`): `[B, L_o]`, 1 on their completion tokens.

    Returns:
        `torch.Tensor`: `[B]` bool, True where the two completions are identical. Two empty completions are identical.
    """
    a, a_mask = left_align(anchor_ids, anchor_mask)
    o, o_mask = left_align(other_ids, other_mask)
    same_length = a_mask.sum(dim=-1) == o_mask.sum(dim=-1)
    width = min(a.size(-1), o.size(-1))
    # past `width` the longer row must be empty for the lengths to match, so the overlap decides
    differ = (a[:, :width] != o[:, :width]) & a_mask[:, :width] & o_mask[:, :width]
    return same_length & ~differ.any(dim=-1)
