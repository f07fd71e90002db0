"""
The triplet terms of one batch (SPEC §4), from the policy's and the reference's forwards of the pair and anchor rows:
the distances, the per-pair loss, which anchors copy a completion, and the opt-in fixes for on-policy pairs.

- `skip_copy_anchors`: rows whose anchor completion is token-identical to the chosen or the rejected completion get no
  triplet loss. A copy of the rejected turns the loss into `Σ (ℓ^r - ℓ^c)^2`, which pulls the pair together against
  the DPO margin; a copy of the chosen helps only until `d_neg` reaches the margin.
- `gradient="anchor"`: the chosen and rejected log-ratios are detached inside the triplet, so it moves the anchor's
  log-ratios toward the chosen ones and away from the rejected ones, and never moves the pair's directly. Not a
  `TIDPOConfig` option: on the tiny benchmark it lost to the paper's form (docs/triplet.md), so only the benchmarks'
  `AnchorGradientTIDPOTrainer` uses it.
"""

import torch

from ..modeling.forwards import AnchorForward, PairForward
from ..ops.triplet import completion_copies, triplet_distances, triplet_loss
from .loss_parts import TripletTerms

TRIPLET_GRADIENTS = ("full", "anchor")


def triplet_terms(
    policy: PairForward,
    ref: PairForward,
    anchor: AnchorForward,
    ref_anchor: AnchorForward,
    pair_token_ids: torch.Tensor,
    *,
    margin: float,
    skip_copy_anchors: bool = False,
    gradient: str = "full",
) -> TripletTerms:
    """
    The triplet terms of each pair (Eq. 13-14).

    Args:
        policy, ref: the pair rows' forwards (chosen rows then rejected rows), `per_token_logps` `[2B, T-1]`.
        anchor, ref_anchor: the anchor rows' forwards, `per_token_logps` `[B, T_a-1]`.
        pair_token_ids (`torch.Tensor`): `[2B, T]` the pair rows' token ids (unshifted), to find copy anchors.
        margin: the triplet margin `m`.
        skip_copy_anchors: give no triplet loss to rows whose anchor copies the chosen or rejected completion.
        gradient: `"full"` (the paper's) or `"anchor"` (chosen and rejected log-ratios detached inside the triplet).

    Returns:
        `TripletTerms`: `[B]` tensors; `loss` is 0 on skipped rows.
    """
    if gradient not in TRIPLET_GRADIENTS:
        raise ValueError(f"`gradient` must be one of {TRIPLET_GRADIENTS}, got {gradient!r}.")
    logratios = policy.per_token_logps - ref.per_token_logps.detach()
    if gradient == "anchor":
        logratios = logratios.detach()
    chosen, rejected = logratios.chunk(2)
    chosen_mask, rejected_mask = policy.completion_mask.chunk(2)
    anchor_logratios = anchor.per_token_logps - ref_anchor.per_token_logps.detach()
    dist_pos, dist_neg = triplet_distances(
        anchor_logratios, anchor.completion_mask, chosen, chosen_mask, rejected, rejected_mask
    )
    loss = triplet_loss(dist_pos, dist_neg, margin)
    equals_chosen = equals_rejected = skipped = None
    if anchor.token_ids is not None:
        chosen_ids, rejected_ids = pair_token_ids[:, 1:].chunk(2)  # shifted, like the masks
        equals_chosen = completion_copies(anchor.token_ids, anchor.completion_mask, chosen_ids, chosen_mask)
        equals_rejected = completion_copies(anchor.token_ids, anchor.completion_mask, rejected_ids, rejected_mask)
    if skip_copy_anchors:
        if equals_chosen is None:
            raise ValueError("`triplet_skip_copy_anchors=True` compares token ids: the anchor forward carries none.")
        skipped = equals_chosen | equals_rejected
        loss = torch.where(skipped, torch.zeros_like(loss), loss)  # where, not *: a skipped row adds no gradient
    return TripletTerms(
        dist_pos=dist_pos,
        dist_neg=dist_neg,
        loss=loss,
        anchor_tokens=anchor.completion_mask.sum(dim=-1).float(),
        anchor_equals_chosen=equals_chosen,
        anchor_equals_rejected=equals_rejected,
        skipped=skipped,
    )
