"""
The training variants the benchmarks compare, in one place (`benchmarks/real_model.py` and
`benchmarks/tiny_arithmetic.py` import them), and one measurement they share: the per-token gradient share of a pair's
first divergent token.

A variant is TRL's `DPOTrainer` (`config_overrides=None`) or a `TIDPOTrainer` (sub)class with `TIDPOConfig` overrides.
Variants that are not package options (the prefix-tied weights) are trainer subclasses here: they become options only
if the benchmarks argue for them.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

from trl_tidpo import TIDPOConfig, TIDPOTrainer
from trl_tidpo.ops.importance import HybridWeights
from trl_tidpo.ops.pair_alignment import align_pair_completions, tie_shared_prefix
from trl_tidpo.trainer.triplet_terms import triplet_terms


class PrefixTiedTIDPOTrainer(TIDPOTrainer):
    """
    TI-DPO whose chosen and rejected rows share one weight on each token of their common prefix (the mean of the two
    per-row weights), so that the prefix cancels in the margin as it does under DPO's uniform weights
    (`trl_tidpo.ops.pair_alignment.tie_shared_prefix`). The hypothesis under test: per-row weights on a shared prefix
    add a spurious `(w_c − w_r)·ℓ` term to the margin.
    """

    def compute_token_weights(
        self, raw_importance, completion_mask, attention_mask, batch_weights=None, *, input_ids=None
    ) -> HybridWeights:
        weights = super().compute_token_weights(
            raw_importance, completion_mask, attention_mask, batch_weights, input_ids=input_ids
        )
        unshifted = torch.nn.functional.pad(completion_mask, (1, 0), value=0)
        prefix = align_pair_completions(input_ids, unshifted).shared_prefix
        return HybridWeights(
            tie_shared_prefix(weights.weights, prefix), weights.importance, weights.prior, weights.fallback, weights.empty
        )


class AnchorGradientTIDPOTrainer(TIDPOTrainer):
    """
    TI-DPO whose triplet moves only the anchor: the chosen and rejected log-ratios are detached inside it
    (`triplet_terms(..., gradient="anchor")`), so the triplet never pulls the pair together directly. A copy anchor
    *is* the copied sequence, so it still moves the pair through it; combine with `triplet_skip_copy_anchors`.
    """

    def _triplet_terms(self, policy, ref, anchor, ref_anchor, pair_token_ids):
        return triplet_terms(
            policy, ref, anchor, ref_anchor, pair_token_ids, margin=self.args.triplet_margin,
            skip_copy_anchors=self.args.triplet_skip_copy_anchors, gradient="anchor",
        )  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """How to build one variant's trainer: the class and the `TIDPOConfig` overrides (None: TRL's `DPOConfig`)."""

    trainer_cls: type = TIDPOTrainer
    config_overrides: dict[str, Any] | None = field(default_factory=dict)
    note: str = ""
    # (recipe, weighting): train on the pairs with the weight columns `add_contrastive_weight_columns` computes from
    # π+/π− built by that recipe from the start and the training pairs (`token_weighting="dataset"`)
    contrastive: tuple[str, str] | None = None

    def config(self, **common) -> DPOConfig:
        if self.config_overrides is None:
            return DPOConfig(**common)
        return TIDPOConfig(**common, **self.config_overrides)


NO_TRIPLET = {"triplet_gamma": 0.0}
VARIANTS: dict[str, Variant] = {
    "DPO": Variant(DPOTrainer, None, "TRL's DPOTrainer"),
    "TI-DPO": Variant(note="the paper's defaults: λ=0.7, ρ=0.25, triplet γ=0.1 with policy anchors"),
    "TI-DPO no triplet": Variant(config_overrides=NO_TRIPLET, note="weights only"),
    "weights λ=0 (prior only)": Variant(config_overrides={**NO_TRIPLET, "importance_lambda": 0.0}),
    "weights λ=1 (attribution only)": Variant(config_overrides={**NO_TRIPLET, "importance_lambda": 1.0}),
    "TI-DPO prefix-tied": Variant(PrefixTiedTIDPOTrainer, {}, "paper defaults, common prefix weights tied"),
    "weights prefix-tied": Variant(PrefixTiedTIDPOTrainer, NO_TRIPLET, "weights only, common prefix weights tied"),
    "TI-DPO skip copies": Variant(
        config_overrides={"triplet_skip_copy_anchors": True},
        note="paper defaults; anchors token-identical to the chosen or rejected completion left out of the triplet",
    ),
    "TI-DPO anchor gradient": Variant(
        AnchorGradientTIDPOTrainer,
        config_overrides={},
        note="paper defaults; chosen/rejected log-ratios detached inside the triplet",
    ),
    "TI-DPO skip copies + anchor gradient": Variant(
        AnchorGradientTIDPOTrainer,
        config_overrides={"triplet_skip_copy_anchors": True},
        note="both triplet fixes",
    ),
    **{
        f"{label} ({recipe.upper()} π±)": Variant(
            config_overrides={**NO_TRIPLET, "token_weighting": "dataset"},
            note=f"{label}'s weights from π+/π− built by the '{recipe}' recipe (trl_tidpo.add_contrastive_weight_columns)",
            contrastive=(recipe, weighting),
        )
        for label, weighting in (("TIS-DPO", "tis_dpo"), ("cDPO", "cdpo"))
        for recipe in ("sft", "dpo")
    },
    "difference": Variant(
        config_overrides={**NO_TRIPLET, "token_weighting": "difference"},
        note="shared prefix/suffix 0.5, differing tokens 1, mean 1; no attribution, no triplet",
    ),
}


def decisive_gradient_share(trainer: TIDPOTrainer, batch: dict[str, torch.Tensor]) -> list[float]:
    """
    For each pair of `batch`, the share of the loss's gradient w.r.t. the policy's per-token log-probs that falls on the
    pair's first divergent token (chosen and rejected rows together), with the common prefix *netted*: a prefix token
    has the same log-prob in both rows (same context), so its two gradients act on one quantity and are summed before
    taking the absolute value. Under DPO's uniform weights the prefix nets to 0.

    `|g_c(t*)| + |g_r(t*)|  /  (Σ_prefix |g_c(j) + g_r(j)| + Σ_rest |g_c(j)| + Σ_rest |g_r(j)|)`

    DPO itself is measured as `TIDPOTrainer` with `token_weighting="uniform"` and `triplet_gamma=0` (the same loss,
    gradients and metrics as `DPOTrainer`, tests/test_dpo_parity.py).

    Args:
        trainer: a `TIDPOTrainer` (any variant); its model is left with no gradient.
        batch: a collated batch (the trainer's collator), on the model's device.

    Returns:
        `list[float]`: one share per pair whose completions diverge.
    """
    captured = {}
    forward = trainer.concatenated_forward

    def capture(model, inputs, is_ref_model=False):
        out = forward(model, inputs, is_ref_model)
        if not is_ref_model:
            out.per_token_logps.retain_grad()
            captured["policy"] = out
        return out

    trainer.concatenated_forward = capture
    try:
        trainer.model.zero_grad(set_to_none=True)
        loss, _ = trainer.get_batch_loss_metrics(trainer.model, batch)
        loss.backward()
    finally:
        del trainer.concatenated_forward
        trainer.model.zero_grad(set_to_none=True)
    grad = captured["policy"].per_token_logps.grad.detach()  # [2B, T-1], entry i scores token i+1
    alignment = align_pair_completions(batch["input_ids"], batch["completion_mask"])
    prefix = alignment.shared_prefix[:, 1:]
    chosen_g, rejected_g = grad.chunk(2)
    chosen_p, rejected_p = prefix.chunk(2)
    scored = batch["completion_mask"][:, 1:].bool()
    chosen_m, rejected_m = scored.chunk(2)
    first_c, first_r = alignment.first_divergent.chunk(2)
    shares = []
    for b in range(chosen_g.size(0)):
        tied = chosen_p[b] & rejected_p[b]
        total = (chosen_g[b] + rejected_g[b])[tied].abs().sum()
        total = total + chosen_g[b][chosen_m[b] & ~tied].abs().sum() + rejected_g[b][rejected_m[b] & ~tied].abs().sum()
        decisive = 0.0
        for g, first in ((chosen_g[b], first_c[b]), (rejected_g[b], first_r[b])):
            if first >= 1:
                decisive += g[first - 1].abs().item()
        if (first_c[b] >= 1 or first_r[b] >= 1) and total > 0:
            shares.append(decisive / total.item())
    return shares
