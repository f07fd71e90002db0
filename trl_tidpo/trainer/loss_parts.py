"""What one TI-DPO step computed, typed: read by the loss and by the metrics alike."""

from dataclasses import dataclass

import torch

from ..ops.importance import HybridWeights


@dataclass
class TripletTerms:
    """
    The triplet loss of each pair (Eq. 13-14).

    Attributes:
        dist_pos, dist_neg: `[B]` the squared distances of the anchor's log-ratios to the chosen and rejected ones.
        loss: `[B]` `max(0, d_pos - d_neg + m)`; 0 on the rows `skipped` leaves out.
        anchor_tokens: `[B]` the anchors' completion lengths.
        anchor_equals_chosen, anchor_equals_rejected: `[B]` bool, the anchor completion is token-identical to the
            chosen / rejected one (None when the anchor's token ids are unknown).
        skipped: `[B]` bool, the rows left out of the triplet (`triplet_skip_copy_anchors`), or None.
    """

    dist_pos: torch.Tensor
    dist_neg: torch.Tensor
    loss: torch.Tensor
    anchor_tokens: torch.Tensor
    anchor_equals_chosen: torch.Tensor | None = None
    anchor_equals_rejected: torch.Tensor | None = None
    skipped: torch.Tensor | None = None


@dataclass
class LossParts:
    """
    The parts of one batch's TI-DPO loss.

    Attributes:
        dpo_losses: `[B]` the token-weighted DPO loss of each pair (Eq. 12).
        policy_logps: `[2B]` the policy's unweighted sequence log-probs (LD-DPO's sums with `ld_alpha`), TRL's
            `logps/*`.
        chosen_rewards, rejected_rewards: `[B]` β times the weighted log-ratios, detached.
        weights: the token weights `[2B, T-1]` (shifted axis) and the rows that fell back or had no span.
        completion_mask: `[2B, T-1]` the pair rows' shifted completion mask.
        triplet: the triplet terms, or None when `triplet_gamma = 0`.
        kl_chosen, kl_rejected: `[B]` TDPO's sequential KL, or None when `tdpo_alpha = 0`.
        dataset_pair_weights: `[B]` the dataset's `pair_weight` column alone, without WPO's weights (already applied
            to `dpo_losses`, with WPO's; the triplet term is scaled by it in the loss), or None without the column.
    """

    dpo_losses: torch.Tensor
    policy_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    weights: HybridWeights
    completion_mask: torch.Tensor
    triplet: TripletTerms | None = None
    kl_chosen: torch.Tensor | None = None
    kl_rejected: torch.Tensor | None = None
    dataset_pair_weights: torch.Tensor | None = None
