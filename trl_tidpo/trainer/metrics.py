"""
The metrics of one batch, gathered across processes: TRL's DPO metrics (computed as `DPOTrainer` computes them) and
TI-DPO's `token_weights/*`, `triplet/*` and `kl/*`; and the warning when rows' weights fell back.
"""

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from ..modeling.forwards import PairForward
from .loss_parts import LossParts


logger = get_logger(__name__)

class Gather:
    """Reductions of per-process tensors to floats over every process."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def mean(self, tensor: torch.Tensor) -> float:
        return self.accelerator.gather(tensor.detach().float().reshape(-1)).mean().item()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather_for_metrics(tensor.detach().float().reshape(1)).sum()

    def ratio(self, numerator: torch.Tensor, denominator: torch.Tensor) -> float:
        num, den = self.sum(numerator), self.sum(denominator)
        return (num / den).item() if den > 0 else 0.0


def dpo_metrics(gather: Gather, policy: PairForward, parts: LossParts) -> dict[str, float]:
    """TRL's DPO metrics of the chosen and rejected rows."""
    chosen_mask, rejected_mask = policy.completion_mask.bool().chunk(2)
    pair_mask = policy.completion_mask.bool()
    chosen_logits, rejected_logits = policy.mean_logits.chunk(2)
    chosen_top1, _ = policy.is_top1.chunk(2)
    chosen_logps, rejected_logps = parts.policy_logps.chunk(2)
    chosen_rewards, rejected_rewards = parts.chosen_rewards, parts.rejected_rewards
    return {
        "entropy": gather.ratio(policy.entropy[pair_mask].sum(), pair_mask.sum()),
        "logits/chosen": gather.ratio(chosen_logits[chosen_mask].sum(), chosen_mask.sum()),
        "logits/rejected": gather.ratio(rejected_logits[rejected_mask].sum(), rejected_mask.sum()),
        "mean_token_accuracy": gather.ratio((chosen_top1 & chosen_mask).sum(), chosen_mask.sum()),
        "rewards/chosen": gather.mean(chosen_rewards),
        "rewards/rejected": gather.mean(rejected_rewards),
        "rewards/accuracies": gather.mean((chosen_rewards > rejected_rewards).float()),
        "rewards/margins": gather.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": gather.mean(chosen_logps),
        "logps/rejected": gather.mean(rejected_logps),
    }


def token_weight_metrics(gather: Gather, parts: LossParts) -> dict[str, float]:
    """`token_weights/*`: mean, std, max and per-row entropy of the weights on completion tokens, and the counts of
    rows that fell back to the prior or had no token to weigh."""
    weights, mask = parts.weights.weights, parts.completion_mask
    on = mask.bool()
    w = weights[on]
    count = gather.sum(on.sum())
    total = gather.sum(w.sum())
    mean = total / count.clamp(min=1)
    var = gather.sum(((w - mean) ** 2).sum()) / (count - 1).clamp(min=1)
    share = weights * mask / (weights * mask).sum(dim=-1, keepdim=True).clamp(min=1e-12)
    row_entropy = -(share * share.clamp(min=1e-12).log()).sum(dim=-1)
    row_max = w.max().reshape(1) if w.numel() else mask.new_zeros(1).float()
    return {
        "token_weights/mean": mean.item(),
        "token_weights/std": var.sqrt().item(),
        "token_weights/max": gather.accelerator.gather(row_max).max().item(),
        "token_weights/entropy": gather.mean(row_entropy),
        "token_weights/fallback_rows": float(gather.sum(parts.weights.fallback.sum()).item()),
        "token_weights/empty_rows": float(gather.sum(parts.weights.empty.sum()).item()),
    }


def triplet_and_kl_metrics(gather: Gather, parts: LossParts) -> dict[str, float]:
    """`triplet/*` when the triplet loss is on (with the shares of rows whose anchor copies the chosen / rejected
    completion, and of rows `triplet_skip_copy_anchors` left out), `kl/*` when the sequential KL is."""
    metrics = {}
    if parts.triplet is not None:
        metrics.update(
            {
                "triplet/loss": gather.mean(parts.triplet.loss),
                "triplet/dist_pos": gather.mean(parts.triplet.dist_pos),
                "triplet/dist_neg": gather.mean(parts.triplet.dist_neg),
                "triplet/anchor_tokens": gather.mean(parts.triplet.anchor_tokens),
            }
        )
        copies = {
            "triplet/anchor_equals_chosen": parts.triplet.anchor_equals_chosen,  # share of rows (SPEC §4)
            "triplet/anchor_equals_rejected": parts.triplet.anchor_equals_rejected,
            "triplet/skipped_rows": parts.triplet.skipped,
        }
        metrics.update({key: gather.mean(rows.float()) for key, rows in copies.items() if rows is not None})
    if parts.kl_chosen is not None:
        metrics["kl/chosen"] = gather.mean(parts.kl_chosen)
        metrics["kl/rejected"] = gather.mean(parts.kl_rejected)
    return metrics


class FallbackRowsWarning:
    """
    A warning at each batch with rows whose token weights fell back (`token_weights/fallback_rows`), naming what they
    fell back to and the count so far: `token_weighting="difference"` rows with only shared tokens (weighed 0 by
    `difference_shared_weight=0`) train with uniform weights, TI-DPO rows whose attribution sums to 0 or is not
    finite with the Gaussian prior alone.
    """

    def __init__(self, token_weighting: str):
        self.token_weighting = token_weighting
        self.rows_seen = 0

    def __call__(self, fallback_rows: int, mode: str) -> None:
        if not fallback_rows:
            return
        self.rows_seen += fallback_rows
        if self.token_weighting == "difference":
            what = (
                "had only tokens shared with the other completion, which `difference_shared_weight=0` weighs 0, and "
                "used uniform weights"
            )
        else:
            what = (
                "had a token attribution that sums to 0 or is not finite (e.g. an fp16 overflow) and used the "
                "Gaussian prior alone"
            )
        logger.warning(
            f"{fallback_rows} row(s) in this {mode} batch {what} ({self.rows_seen} so far); see the "
            "`token_weights/fallback_rows` metric."
        )
