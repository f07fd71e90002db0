"""
The checks `TIDPOConfig.__post_init__` runs: TI-DPO's own fields, TIS-DPO's and cDPO's, the DPOConfig numbers TI-DPO's
maths reads, and the DPO options that have no meaning with token weights. Each error names the option and the fix.
"""

import math

from trl import DPOConfig

from ..modeling.tis_dpo import CONTRASTIVE_WEIGHTINGS, check_tis_sources
from ..modeling.weight_columns import is_weight
from ..ops.weighted_losses import F_DIVERGENCE_TYPES, KL_LOSS_TYPES, LOSS_TYPES

# Fields whose `choices` metadata `__post_init__` enforces (DPOConfig's own are TRL's to check).
TIDPO_CHOICE_FIELDS = (
    "token_weighting", "importance_model", "weight_span", "weight_normalization", "tis_transform", "anchor_source",
)  # fmt: skip


def validate_dpo_numbers(config: DPOConfig) -> None:
    """
    The DPOConfig numbers TI-DPO's maths reads, in range. TRL 1.16 checks none of these at construction (it only
    warns on `label_smoothing` for `robust`, and checks `loss_weights`' length, which it is left to do); out of range
    they train on a wrong objective (`beta < 0` optimises the reversed preference) or fail mid-step.
    """

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    def positive_int_or_none(value) -> bool:
        return value is None or positive_int(value)

    checks = [
        ("beta", number(config.beta) and config.beta > 0, "a finite number > 0 (β < 0 optimises the reversed "
         "preference, β = 0 gives no gradient)"),
        ("label_smoothing", number(config.label_smoothing) and 0.0 <= config.label_smoothing < 0.5,
         "in [0, 0.5) (ε ≥ 0.5 trusts the flipped labels at least as much as the given ones)"),
        ("discopop_tau", number(config.discopop_tau) and config.discopop_tau > 0, "a finite number > 0"),
        ("f_alpha_divergence_coef", number(config.f_alpha_divergence_coef), "a finite number"),
        ("ld_alpha", config.ld_alpha is None or (number(config.ld_alpha) and 0.0 <= config.ld_alpha <= 1.0),
         "in [0, 1] or None"),
        ("max_length", positive_int_or_none(config.max_length), "an integer >= 1 or None"),
        ("precompute_ref_batch_size", positive_int_or_none(config.precompute_ref_batch_size),
         "an integer >= 1 or None"),
        ("ref_model_mixup_alpha", number(config.ref_model_mixup_alpha) and 0.0 <= config.ref_model_mixup_alpha <= 1.0,
         "in [0, 1]"),
        ("ref_model_sync_steps", positive_int(config.ref_model_sync_steps), "an integer >= 1"),
    ]  # fmt: skip
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"`{name}` must be {allowed}, got {getattr(config, name)!r}.")
    if not (isinstance(config.max_steps, int) and not isinstance(config.max_steps, bool)) or not (
        config.max_steps == -1 or config.max_steps >= 1
    ):  # transformers trains `num_train_epochs` for any `max_steps <= 0` without a word
        raise ValueError(
            f"`max_steps` must be -1 (train for `num_train_epochs`) or an integer >= 1 (that many optimizer "
            f"steps), got {config.max_steps!r}. Set `max_steps` to a positive number of steps, or leave it at -1."
        )
    if config.f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"`f_divergence_type` must be one of {F_DIVERGENCE_TYPES}, got {config.f_divergence_type!r}.")
    if config.truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(
            f"`truncation_mode` must be 'keep_start' or 'keep_end' (deprecated), got {config.truncation_mode!r}."
        )
    if config.loss_weights is not None:
        weights = list(config.loss_weights)
        bad = [w for w in weights if not (number(w) and w >= 0)]
        if bad:
            raise ValueError(f"`loss_weights` must be finite numbers >= 0, got {config.loss_weights!r}.")
        if weights and sum(weights) == 0:
            raise ValueError(
                f"`loss_weights` are all 0 ({config.loss_weights!r}): the loss would be 0 with no gradient. Give at "
                "least one loss type a positive weight."
            )


def validate_tidpo_fields(config: DPOConfig) -> None:
    for name, spec in config.__dataclass_fields__.items():
        allowed = spec.metadata.get("choices")
        if allowed is not None and name in TIDPO_CHOICE_FIELDS and getattr(config, name) not in allowed:
            raise ValueError(f"`{name}` must be one of {tuple(allowed)}, got {getattr(config, name)!r}.")
    checks = [
        ("importance_lambda", 0.0 <= config.importance_lambda <= 1.0, "in [0, 1]"),
        ("prior_sigma_ratio", config.prior_sigma_ratio > 0, "> 0"),
        ("triplet_gamma", config.triplet_gamma >= 0, ">= 0"),
        ("triplet_margin", config.triplet_margin >= 0, ">= 0"),
        ("anchor_max_new_tokens", config.anchor_max_new_tokens >= 1, ">= 1"),
        ("anchor_temperature", config.anchor_temperature > 0, "> 0"),
        ("anchor_top_k", config.anchor_top_k >= 0, ">= 0"),
        ("anchor_top_p", 0.0 < config.anchor_top_p <= 1.0, "in (0, 1]"),
        ("tdpo_alpha", config.tdpo_alpha >= 0, ">= 0"),
        ("kl_chunk_size", config.kl_chunk_size >= 1, ">= 1"),
        ("span_default_weight", is_weight(config.span_default_weight), "finite and >= 0"),
        ("difference_shared_weight", is_weight(config.difference_shared_weight), "finite and >= 0"),
        ("difference_differing_weight", is_weight(config.difference_differing_weight), "finite and >= 0"),
    ]
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"`{name}` must be {allowed}, got {getattr(config, name)!r}.")
    if config.triplet_gamma == 0 and config.triplet_skip_copy_anchors:
        raise ValueError(
            "`triplet_skip_copy_anchors` changes the triplet loss, which `triplet_gamma=0` turns off. Set "
            "`triplet_gamma > 0` (the paper's 0.1) or leave `triplet_skip_copy_anchors=False`."
        )
    no_weight = config.difference_shared_weight == config.difference_differing_weight == 0
    if config.token_weighting == "difference" and no_weight:
        raise ValueError(
            "`difference_shared_weight` and `difference_differing_weight` are both 0, so every token would weigh 0. "
            "Give the differing tokens a positive weight (e.g. `difference_differing_weight=1`)."
        )
    if config.token_weighting == "ti_dpo" and not config.disable_dropout:
        raise ValueError(
            "`disable_dropout=False` with `token_weighting='ti_dpo'`: TI-DPO's weights are read from the model with "
            "dropout off, and the attribution shares the training forward. Set `disable_dropout=True` (the default)."
        )
    if config.importance_model == "reference" and config.token_weighting != "ti_dpo":
        raise ValueError(
            f"`importance_model='reference'` selects the model of the 'ti_dpo' attribution, but `token_weighting` is "
            f"{config.token_weighting!r}. Set `token_weighting='ti_dpo'` or leave `importance_model='policy'`."
        )
    if config.importance_model == "reference" and config.precompute_token_weights and config.sync_ref_model:
        # Refused rather than warned: the cached weights would silently stop being the reference's
        raise ValueError(
            "`importance_model='reference'` with `precompute_token_weights=True` caches the reference's weights "
            "once before training, but `sync_ref_model=True` updates the reference during training, so the cached "
            "weights would go stale. Set `precompute_token_weights=False` (recompute them from the synced reference "
            "each step) or `sync_ref_model=False`."
        )
    validate_tis_fields(config)


def validate_tis_fields(config: DPOConfig) -> None:
    clamp = list(config.tis_clamp) if isinstance(config.tis_clamp, (list, tuple)) else None
    finite = clamp is not None and all(isinstance(v, (int, float)) and math.isfinite(v) for v in clamp)
    if not finite or len(clamp) != 2:
        raise ValueError(f"`tis_clamp` must be two finite numbers [L, U], got {config.tis_clamp!r}.")
    if not clamp[0] < clamp[1]:
        raise ValueError(f"`tis_clamp` [L, U] needs L < U, got {config.tis_clamp!r}.")
    prompts = config.tis_system_prompts
    if prompts is not None:
        if (
            not isinstance(prompts, (list, tuple))
            or len(prompts) != 2
            or not all(isinstance(p, str) and p.strip() for p in prompts)
        ):
            raise ValueError(
                f"`tis_system_prompts` must be two non-empty strings [positive, negative], got {prompts!r}."
            )
        if prompts[0] == prompts[1]:
            raise ValueError("`tis_system_prompts` are identical, so π+ and π− would agree and every weight be 1.")
    validate_cdpo_fields(config)
    both_paths = config.tis_positive_model is not None and config.tis_negative_model is not None
    if config.token_weighting not in CONTRASTIVE_WEIGHTINGS or both_paths:
        # the trainer checks again, once loaded models may stand in for the paths
        check_tis_sources(config.token_weighting, config.tis_positive_model, config.tis_negative_model, prompts)


def validate_cdpo_fields(config: DPOConfig) -> None:
    """cDPO's options in range, and no option of one contrastive weighting set under another (it would be
    ignored)."""
    if not is_weight(config.cdpo_beta):
        raise ValueError(f"`cdpo_beta` must be a finite number >= 0, got {config.cdpo_beta!r}.")
    fields = config.__dataclass_fields__
    cdpo_set = [name for name in ("cdpo_beta", "cdpo_only_negative") if getattr(config, name) != fields[name].default]
    if cdpo_set and config.token_weighting != "cdpo":
        raise ValueError(
            f"{cdpo_set} only apply to `token_weighting='cdpo'`, but `token_weighting` is "
            f"{config.token_weighting!r}. Set `token_weighting='cdpo'` or leave them at their defaults."
        )
    tis_set = ["tis_transform"] if config.tis_transform != fields["tis_transform"].default else []
    if list(config.tis_clamp) != list(fields["tis_clamp"].default_factory()):
        tis_set.append("tis_clamp")
    if tis_set and config.token_weighting == "cdpo":
        raise ValueError(
            f"{tis_set} shape TIS-DPO's weights, which `token_weighting='cdpo'` does not compute. Leave them at "
            "their defaults, or set `token_weighting='tis_dpo'`."
        )


def refuse_unsupported_dpo_options(config: DPOConfig) -> None:
    """Refuse what has no meaning with token weights, before TRL checks the DPO options themselves."""
    loss_types = [config.loss_type] if isinstance(config.loss_type, str) else list(config.loss_type)
    unknown = [t for t in loss_types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"`loss_type` {unknown} is not a TRL 1.16 loss type; the loss types are {list(LOSS_TYPES)}.")
    if config.tdpo_alpha > 0 and any(t not in KL_LOSS_TYPES for t in loss_types):
        raise ValueError(
            f"`tdpo_alpha > 0` adds TDPO's sequential KL to the margin Δ, which only {list(KL_LOSS_TYPES)} see the "
            f"pair through; got `loss_type={loss_types}`. Set `tdpo_alpha=0` or change `loss_type`."
        )
    if config.tdpo_alpha > 0 and config.f_divergence_type != "reverse_kl":
        raise ValueError(
            f"`tdpo_alpha > 0` (TDPO's sequential KL) is derived for the reverse-KL margin, not "
            f"`f_divergence_type={config.f_divergence_type!r}`. Set `tdpo_alpha=0` or `f_divergence_type='reverse_kl'`."
        )
    if config.precompute_ref_log_probs and config.tdpo_alpha > 0:
        raise ValueError(
            "`precompute_ref_log_probs=True` with `tdpo_alpha > 0`: TDPO's sequential KL needs the reference's full "
            "next-token distributions at every step, so the reference forward would run anyway and nothing would "
            "be saved. Set `precompute_ref_log_probs=False` or `tdpo_alpha=0`."
        )
