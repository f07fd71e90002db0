from dataclasses import dataclass, field

from trl import DPOConfig

from ..modeling.cdpo import DEFAULT_CDPO_BETA
from .config_checks import refuse_unsupported_dpo_options, validate_dpo_numbers, validate_tidpo_fields
from .tidpo_defaults import CHOICES, DEFAULTS, WEIGHT_OPTIONS

# The defaults the CLI offers too live in `tidpo_defaults.py` (read there without TRL or torch), the others below; read
# the hybrid weights' option defaults with `weight_option_defaults()`, never repeat them.


def weight_option_defaults() -> dict:
    """The defaults of `WEIGHT_OPTIONS`, read from `TIDPOConfig`'s fields."""
    fields = TIDPOConfig.__dataclass_fields__
    return {name: fields[name].default for name in WEIGHT_OPTIONS}


@dataclass
class TIDPOConfig(DPOConfig):
    r"""
    Configuration class for the [`TIDPOTrainer`]: everything [`~trl.DPOConfig`] has, plus the parameters of TI-DPO
    ("Token-Importance Guided Direct Preference Optimization", Yang et al., ICLR 2026). Defaults follow the paper's
    Table B13; see `SPEC.md` for every choice the paper leaves open.

    Parameters:
        > Parameters that control the token weights

        token_weighting (`str`, *optional*, defaults to `"ti_dpo"`):
            `"ti_dpo"`: hybrid weights from gradient attribution and a Gaussian prior (Eq. 8). `"uniform"`: every
            completion token weighs 1, which is TRL's DPO. `"dataset"`: weights read from the `chosen_token_weights`
            and `rejected_token_weights` columns (one non-negative float per tokenised completion token). `"tis_dpo"`:
            TIS-DPO's weights from two contrastive models (see the `tis_*` parameters), computed once before training,
            cached as those columns, then used like `"dataset"`. `"cdpo"`: cDPO's contrastive-estimation weights from the
            same two models (see `cdpo_beta`), computed and cached the same way. `"difference"`: weights from the pair itself, tokens
            of the aligned common prefix and suffix of chosen and rejected weigh `difference_shared_weight`, the
            differing middle `difference_differing_weight` (then normalised per `weight_normalization`); no extra
            forward, no attribution: the baseline that TI-DPO's attribution has to beat. Cost of `"ti_dpo"` with
            `importance_model="policy"`: one activation-only backward per step (about one extra forward of compute).
            `"dataset"` also accepts character spans instead of token lists: `chosen_weight_spans` /
            `rejected_weight_spans`, lists of `[start_char, end_char, weight]` over the completion text (the assistant
            message's content for conversational data), mapped onto the trainer's tokens with the fast tokenizer's
            offsets.
        span_default_weight (`float`, *optional*, defaults to `1.0`):
            Weight (finite, ≥ 0) of the tokens outside every span of `chosen_weight_spans` / `rejected_weight_spans`,
            and of every token of a side without spans. Unused without span columns.
        importance_model (`str`, *optional*, defaults to `"policy"`):
            Model whose gradient attribution gives the `"ti_dpo"` weights: the current `"policy"` at every step
            (paper), or the frozen `"reference"` (a deviation from the paper that costs nothing per step when the
            weights are precomputed).
        precompute_token_weights (`bool`, *optional*, defaults to `True`):
            With `importance_model="reference"`: compute the weights once over each dataset before training and cache
            them as dataset columns (Arrow files keyed by the dataset and reference model, like TRL's reference
            log-prob cache); `False` recomputes them from the reference at every step.
        importance_lambda (`float`, *optional*, defaults to `0.7`):
            λ in [0, 1], the share of normalised gradient attribution in the weights; `1 - λ` goes to the prior.
        prior_sigma_ratio (`float`, *optional*, defaults to `0.25`):
            ρ > 0; the Gaussian prior's σ is `max(1, ρ·n)` for a span of `n` tokens (paper: n/4).
        weight_span (`str`, *optional*, defaults to `"completion"`):
            Tokens the weights are normalised over: `"completion"` tokens, or every attended token of the
            `"sequence"` (prompt and completion, as the official code does).
        weight_normalization (`str`, *optional*, defaults to `"mean"`):
            `"mean"`: weights average 1 over the span, so β keeps its DPO meaning (official code). `"sum"`: weights
            sum to 1 (paper text), which shrinks the margin about n-fold. Also applies to `"difference"` weights.
        difference_shared_weight (`float`, *optional*, defaults to `0.5`):
            With `token_weighting="difference"`: raw weight (≥ 0) of the completion tokens that chosen and rejected
            share (aligned common prefix and suffix). Only its ratio to `difference_differing_weight` matters after
            normalisation.
        difference_differing_weight (`float`, *optional*, defaults to `1.0`):
            With `token_weighting="difference"`: raw weight (≥ 0) of the tokens where the two completions differ.

        > Parameters that control the contrastive-model weights (`token_weighting="tis_dpo"` or `"cdpo"`)

        tis_positive_model (`str`, *optional*):
            Path or hub id of π+ (e.g. a DPO model). A loaded model can be passed instead as the trainer's
            `tis_positive_model=` argument. With `tis_system_prompts` and no model, the frozen reference is used.
        tis_negative_model (`str`, *optional*):
            Path or hub id of π− (e.g. a reverse-DPO model: chosen and rejected swapped). With `tis_system_prompts`,
            defaults to π+'s model. Also accepted loaded, as the trainer's `tis_negative_model=` argument.
        tis_system_prompts (`list[str]`, *optional*):
            `[positive, negative]` system prompts of the prompt-based variant (conversational data only): π+ sees the
            first before each prompt, π− the second.
        tis_clamp (`list[float]`, *optional*, defaults to `[-0.5, 1.5]`):
            `[L, U]` of `w = exp(μ·clamp(r̂, L, U))` (TIS-DPO Eq. 19; μ = +1 chosen, −1 rejected).
        tis_transform (`str`, *optional*, defaults to `"exp_clamp"`):
            `"exp_clamp"` (paper Eq. 19) or `"rank"` (official code: each response's ranks of μ·r̂ mapped linearly onto
            [0.7, 1.3], last token weight 0: each response's last kept token, the EOS of plain text). Cost: one
            forward of π+ and one of π− over each dataset, once (cached).
        cdpo_beta (`float`, *optional*, defaults to `1.0`):
            With `token_weighting="cdpo"`: β_ce ≥ 0 of cDPO's contrastive estimation `p_t = softmax((1+β_ce)·z⁺_t −
            β_ce·z⁻_t)[y_t]` (`z^±` π±'s logits); a rejected token weighs `1 − p_t` (its response's last EOS 1). `0`
            uses π+ alone. Cost: one forward of π+ and one of π− over the rejected completions of each dataset, once
            (cached); their logits are built in chunks of positions.
        cdpo_only_negative (`bool`, *optional*, defaults to `True`):
            With `token_weighting="cdpo"`: chosen tokens weigh 1 (the cDPO authors' `only_neg`). `False`: they weigh
            `p_t`, which costs the same two forwards over the chosen completions.

        > Parameters that control the triplet loss

        triplet_gamma (`float`, *optional*, defaults to `0.1`):
            γ ≥ 0, the weight of the triplet loss. `0` disables it and all anchor work.
        triplet_margin (`float`, *optional*, defaults to `0.01`):
            Margin ≥ 0 of the triplet loss (the paper gives none).
        triplet_skip_copy_anchors (`bool`, *optional*, defaults to `False`):
            Opt-in fix for on-policy pairs (not in the paper): rows whose anchor completion is token-identical to the
            chosen or the rejected completion get no triplet loss (counted in `triplet/skipped_rows`). An anchor that
            copies the rejected completion makes the triplet minimise `Σ (ℓ^r − ℓ^c)²`, pulling the pair's log-ratios
            together against the DPO margin (SPEC §4); `triplet/anchor_equals_chosen` and
            `triplet/anchor_equals_rejected` show how often that happens, with or without this option.
        anchor_source (`str`, *optional*, defaults to `"policy"`):
            `"policy"`: an anchor is sampled from the current policy for each prompt at every step (costs one
            generation of up to `anchor_max_new_tokens` tokens per step). `"dataset"`: read from an `anchor` column in
            the same format as `chosen`.
        anchor_max_new_tokens (`int`, *optional*, defaults to `64`):
            Maximum number of tokens of a policy-sampled anchor. Generation also stops at the batch's longest
            chosen/rejected completion: the triplet distances read no anchor token past it (the losses are the same).
        anchor_temperature (`float`, *optional*, defaults to `0.8`):
            Sampling temperature of policy anchors (> 0).
        anchor_top_k (`int`, *optional*, defaults to `50`):
            Top-k of policy anchor sampling (≥ 0; 0 disables it).
        anchor_top_p (`float`, *optional*, defaults to `0.95`):
            Top-p of policy anchor sampling, in (0, 1].

        > Parameters that control the sequential KL term

        tdpo_alpha (`float`, *optional*, defaults to `0.0`):
            α ≥ 0 of TDPO's sequential-KL term; `0.5` reproduces the official code's TDPO2 objective. Costs both
            models' full distributions at completion positions, computed in chunks.
        kl_chunk_size (`int`, *optional*, defaults to `64`):
            Completion positions per chunk of the sequential KL; memory grows as `2 × kl_chunk_size × vocab` floats.

        > Parameters that control the reference model (DPOConfig's, with TI-DPO's meaning)

        precompute_ref_log_probs (`bool`, *optional*, defaults to `False`):
            As in TRL: run the reference once over the train and eval datasets before training (and over a dataset
            given to `evaluate`, when it is called), sharded across processes, and read its log-probs from the batch
            instead of a reference forward per step. They are stored per completion token (the columns
            `chosen_ref_token_logps`/`rejected_ref_token_logps`, cached like the reference weights), not as TRL's
            sums, since the token weights are known only at the step; dataset anchors get `anchor_ref_token_logps`.
            For full fine-tuning without a `ref_model`, the reference is not kept in memory during training, as in
            TRL, unless something still runs it at every step: policy anchors (`triplet_gamma > 0`,
            `anchor_source="policy"`) and `importance_model="reference"` with `precompute_token_weights=False` keep
            it (a warning says so). Refused with `tdpo_alpha > 0`: the sequential KL needs the reference's full
            distributions at every step. Map-style datasets only (TRL's error for an `IterableDataset`).

    Validation: besides the fields above, the DPOConfig numbers the loss reads are checked at construction (TRL 1.16
    does not): `beta > 0`, `label_smoothing` in [0, 0.5), `discopop_tau > 0`, `ld_alpha` in [0, 1], `max_length` and
    `precompute_ref_batch_size` >= 1 (or None), `ref_model_mixup_alpha` in [0, 1], `ref_model_sync_steps >= 1`,
    `loss_weights` finite, >= 0 and not all 0, and `f_divergence_type` / `truncation_mode` among their values.
    """

    token_weighting: str = field(
        default=DEFAULTS["token_weighting"],
        metadata={
            "help": "'ti_dpo': hybrid weights from gradient attribution and a Gaussian prior. 'uniform': every "
            "completion token weighs 1 (TRL's DPO). 'dataset': read the 'chosen_token_weights' and "
            "'rejected_token_weights' columns (or character spans: 'chosen_weight_spans' / 'rejected_weight_spans'). "
            "'tis_dpo': TIS-DPO weights from two contrastive models (tis_* options), computed once before training. "
            "'cdpo': cDPO's contrastive-estimation weights from the same two models (cdpo_* options), likewise. "
            "'difference': the pair's common prefix/suffix tokens weigh difference_shared_weight, the differing "
            "middle difference_differing_weight (no attribution).",
            "choices": list(CHOICES["token_weighting"]),
        },
    )
    span_default_weight: float = field(
        default=DEFAULTS["span_default_weight"],
        metadata={
            "help": "Weight (finite, >= 0) of the tokens outside every span of the 'chosen_weight_spans' / "
            "'rejected_weight_spans' columns (token_weighting='dataset')."
        },
    )
    importance_model: str = field(
        default="policy",
        metadata={
            "help": "Model whose gradient attribution gives the 'ti_dpo' weights: the current 'policy' (paper) or the "
            "frozen 'reference' (cheaper; precomputed once when `precompute_token_weights`).",
            "choices": ["policy", "reference"],
        },
    )
    precompute_token_weights: bool = field(
        default=True,
        metadata={
            "help": "With importance_model='reference': compute the weights once per dataset before training and cache "
            "them as dataset columns (False: recompute from the reference every step)."
        },
    )
    importance_lambda: float = field(
        default=DEFAULTS["importance_lambda"],
        metadata={"help": "λ in [0, 1]: share of normalised gradient attribution in the weights (1 - λ: prior)."},
    )
    prior_sigma_ratio: float = field(
        default=DEFAULTS["prior_sigma_ratio"],
        metadata={"help": "ρ > 0: the Gaussian prior's sigma is max(1, ρ·n) for a span of n tokens."},
    )
    weight_span: str = field(
        default=DEFAULTS["weight_span"],
        metadata={
            "help": "Tokens the weights are normalised over: 'completion', or 'sequence' (prompt + completion).",
            "choices": list(CHOICES["weight_span"]),
        },
    )
    weight_normalization: str = field(
        default=DEFAULTS["weight_normalization"],
        metadata={
            "help": "'mean': weights average 1 over the span (official code). 'sum': weights sum to 1 (paper text).",
            "choices": list(CHOICES["weight_normalization"]),
        },
    )
    difference_shared_weight: float = field(
        default=DEFAULTS["difference_shared_weight"],
        metadata={
            "help": "token_weighting='difference': raw weight (>= 0) of the tokens chosen and rejected share (aligned "
            "common prefix and suffix)."
        },
    )
    difference_differing_weight: float = field(
        default=DEFAULTS["difference_differing_weight"],
        metadata={"help": "token_weighting='difference': raw weight (>= 0) of the tokens where the two differ."},
    )
    tis_positive_model: str | None = field(
        default=None,
        metadata={
            "help": "Path or hub id of TIS-DPO's π+ (e.g. a DPO model). With tis_system_prompts and no model, the "
            "frozen reference is used."
        },
    )
    tis_negative_model: str | None = field(
        default=None,
        metadata={
            "help": "Path or hub id of TIS-DPO's π- (e.g. a reverse-DPO model). With tis_system_prompts, defaults to "
            "π+'s model."
        },
    )
    tis_system_prompts: list[str] | None = field(
        default=None,
        metadata={
            "help": "Positive and negative system prompts of the prompt-based TIS-DPO variant (conversational data)."
        },
    )
    tis_clamp: list[float] = field(
        default_factory=lambda: [-0.5, 1.5],
        metadata={"help": "[L, U] of TIS-DPO's w = exp(μ·clamp(r̂, L, U)), L < U."},
    )
    tis_transform: str = field(
        default="exp_clamp",
        metadata={
            "help": "'exp_clamp' (TIS-DPO paper, Eq. 19) or 'rank' (official code: ranks mapped onto [0.7, 1.3], "
            "last token weight 0).",
            "choices": ["exp_clamp", "rank"],
        },
    )
    cdpo_beta: float = field(
        default=DEFAULT_CDPO_BETA,
        metadata={
            "help": "token_weighting='cdpo': β_ce >= 0 of cDPO's p = softmax((1+β_ce)·z+ − β_ce·z-)[y]; a rejected "
            "token weighs 1 − p (its last EOS 1). 0 uses π+ alone."
        },
    )
    cdpo_only_negative: bool = field(
        default=True,
        metadata={
            "help": "token_weighting='cdpo': chosen tokens weigh 1 (the cDPO authors' only_neg); False: they weigh p."
        },
    )
    triplet_gamma: float = field(
        default=0.1,
        metadata={"help": "γ ≥ 0, weight of the triplet loss; 0 disables it and all anchor work."},
    )
    triplet_margin: float = field(default=0.01, metadata={"help": "Margin ≥ 0 of the triplet loss."})
    triplet_skip_copy_anchors: bool = field(
        default=False,
        metadata={
            "help": "Opt-in (not in the paper): no triplet loss for rows whose anchor completion is token-identical to "
            "the chosen or rejected one (counted in `triplet/skipped_rows`)."
        },
    )
    anchor_source: str = field(
        default="policy",
        metadata={
            "help": "'policy': sample an anchor from the current policy at every step. 'dataset': read the "
            "'anchor' column (same format as 'chosen').",
            "choices": ["policy", "dataset"],
        },
    )
    anchor_max_new_tokens: int = field(
        default=64, metadata={"help": "Maximum number of new tokens of a policy-sampled anchor (≥ 1)."}
    )
    anchor_temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of policy anchors (> 0)."})
    anchor_top_k: int = field(default=50, metadata={"help": "Top-k of policy anchor sampling (≥ 0; 0 disables it)."})
    anchor_top_p: float = field(default=0.95, metadata={"help": "Top-p of policy anchor sampling, in (0, 1]."})
    tdpo_alpha: float = field(
        default=0.0,
        metadata={"help": "α ≥ 0 of TDPO's sequential-KL term; 0.5 reproduces the official code's TDPO2 objective."},
    )
    kl_chunk_size: int = field(
        default=64, metadata={"help": "Completion positions per chunk of the sequential KL (≥ 1)."}
    )

    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference's log-probs once before training (train and eval datasets; a dataset given "
            "to `evaluate` when it is called) and read them from the batch instead of running the reference at each "
            "step. Unlike TRL, which stores sequence sums, they are stored per token (cached dataset columns), since "
            "the token weights are known only at the step. For full fine-tuning without a `ref_model` the reference "
            "is then not kept in memory, unless policy anchors or `importance_model='reference'` with "
            "`precompute_token_weights=False` still run it at every step (a warning says so). Dataset anchors are "
            "precomputed too. Not with `tdpo_alpha > 0`, whose KL needs the reference's full distributions."
        },
    )

    # TRL's field re-declared (last, so that TI-DPO's own options open `train --help`): see `_default_checkpointing`
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of `activation_checkpointing` in transformers ≥ 5.23. Checkpointing is on by "
            "default, as in TRL's DPOConfig: trades compute for memory, about 20%% slower training.",
            "nargs": "?",  # a bare `--gradient_checkpointing` means True, as TRL's bool field did
            "const": True,
        },
    )

    def _default_checkpointing(self) -> None:
        """
        TRL's default (checkpointing on) under the name the installed transformers reads. TRL's `DPOConfig` gives
        `gradient_checkpointing=True`, which transformers ≥ 5.23 warns about at every construction (a deprecated alias
        of `activation_checkpointing`); here the alias defaults to None, so only a value the user passes is translated
        (and warned about) by transformers.
        """
        if self.gradient_checkpointing is not None:
            return
        if "activation_checkpointing" not in self.__dataclass_fields__:  # transformers < 5.23: the old name is the field
            self.gradient_checkpointing = True
        elif self.activation_checkpointing is None:
            self.activation_checkpointing = True

    def weight_options(self) -> dict:
        """The four options of TI-DPO's hybrid weights, by name, as `token_weights` and `completion_token_weights`
        take them."""
        return {name: getattr(self, name) for name in WEIGHT_OPTIONS}

    def anchor_generation_kwargs(self) -> dict:
        """The sampling settings of policy anchors (`anchor_source="policy"`), as `GenerationConfig` takes them."""
        return {
            "do_sample": True,
            "max_new_tokens": self.anchor_max_new_tokens,
            "temperature": self.anchor_temperature,
            "top_k": self.anchor_top_k,  # 0 disables top-k
            "top_p": self.anchor_top_p,
        }

    def __post_init__(self):
        self._default_checkpointing()
        validate_tidpo_fields(self)
        validate_dpo_numbers(self)
        refuse_unsupported_dpo_options(self)
        super().__post_init__()
