import functools
import os
import shutil
import textwrap
import warnings
import weakref

import torch
from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from trl import DPOTrainer

from ..modeling.anchors import dataset_anchor_batch, longest_completion, policy_anchor_batch
from ..modeling.attribution import (
    causal_lm_of,
    project_to_logits,
    separate_attribution_reason,
    uses_reentrant_checkpointing,
)
from ..modeling.collator import DataCollatorForTIDPO
from ..modeling.forwards import (
    AnchorBatch,
    AnchorForward,
    PairBatch,
    PairForward,
    anchor_forward,
    attribute_rows,
    policy_pair_forward,
    precomputed_anchor_forward,
    precomputed_reference_forward,
    reference_pair_forward,
    split_anchor_rows,
    stack_anchor_rows,
)
from ..modeling.tis_dpo import CONTRASTIVE_WEIGHTINGS, check_tis_sources
from ..modeling.weight_cache import REF_LOGP_COLUMNS
from ..modeling.weight_columns import PAIR_WEIGHT_COLUMN
from ..ops.importance import HybridWeights, completion_token_weights
from ..ops.pair_alignment import pair_difference_weights
from ..ops.sequential_kl import sequential_kl
from ..ops.weighted_losses import (
    length_desensitized_logps,
    pair_rewards,
    preference_losses,
    weight_sums,
    weighted_sequence_logps,
    wpo_pair_weights,
)
from .checkpoints import checkpoint_step, resolve_resume
from .dataset_checks import check_dataset_columns, check_dataset_rows
from .dataset_preparation import TIDPO_BATCH_COLUMNS, check_model_positions, prepare_dataset
from .loss_parts import LossParts, TripletTerms
from .metrics import FallbackRowsWarning, Gather, dpo_metrics, token_weight_metrics, triplet_and_kl_metrics
from .model_contexts import ModelContexts
from .precompute import PrecomputeMixin, defer_reference_precompute
from .tidpo_config import TIDPOConfig
from .triplet_terms import triplet_terms

logger = get_logger(__name__)


class TIDPOTrainer(PrecomputeMixin, DPOTrainer):
    """
    Trainer for TI-DPO, Token-Importance Guided Direct Preference Optimization (Yang et al., ICLR 2026), a drop-in
    replacement for [`~trl.DPOTrainer`]: same constructor, same datasets, same metrics, plus token weights and a
    triplet loss.

    Each step, per-token weights are computed from the current policy (gradient attribution of the final-position
    logit w.r.t. the input-embedding activations, mixed with a Gaussian positional prior), the DPO margin becomes the
    token-weighted sum of per-token log-ratios, and a triplet loss pulls a policy-sampled anchor's per-token
    log-ratios toward the chosen response and away from the rejected one. `rewards/*` metrics are β times the
    *weighted* log-ratios.

    Extension points (the legacy `DPOTrainer` methods that TRL 0.29 removed, restored with typed results):

    - `concatenated_forward(model, inputs, is_ref_model=False) -> PairForward`: one forward over the chosen and
      rejected rows; per-token log-probs, masks and, for the policy, the raw token importance from the same forward.
    - `compute_token_weights(raw_importance, completion_mask, attention_mask, batch_weights=None, *, input_ids=None)
      -> HybridWeights`: the token weights of the pair rows, detached (`input_ids`: `token_weighting="difference"`).
    - `dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type=None, ...)
      -> (losses, chosen_rewards, rejected_rewards)`: the token-weighted DPO loss of each pair.
    - `get_batch_loss_metrics(model, batch, train_eval="train") -> (loss, metrics)`: runs one step's parts in order.

    The parts live below the trainer: the mathematics in `trl_tidpo.ops`, the forwards, attribution, anchors and
    weight caches in `trl_tidpo.modeling`.

    Datasets: TRL's preference formats, plus optional columns: `anchor` (`anchor_source="dataset"`), per-token
    weights as `chosen_token_weights`/`rejected_token_weights` or as character spans
    `chosen_weight_spans`/`rejected_weight_spans` (`token_weighting="dataset"`), and `pair_weight`, a float ≥ 0 per
    pair that multiplies the pair's loss (DPO and triplet terms; with WPO the DPO term gets the product of both).

    Args: exactly those of [`~trl.DPOTrainer`]; `args` must be a [`TIDPOConfig`]. With `token_weighting="tis_dpo"`,
    also `tis_positive_model` and `tis_negative_model`: TIS-DPO's π+ and π− as loaded models (or paths), in place of
    the config fields of the same names. They are run once over each dataset at construction (the weights are cached
    with the dataset) and the trainer keeps no reference to them; models it loads from a path are freed.
    """

    _tag_names = ["trl", "dpo", "ti-dpo"]
    _name = "TI-DPO"
    _paper = {
        "title": "Token-Importance Guided Direct Preference Optimization",
        "id": "2505.19653",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{yang2026tidpo,
                title        = {{Token-Importance Guided Direct Preference Optimization}},
                author       = {Ning Yang and Hai Lin and Yibo Liu and Baoliang Tian and Guoqing Liu and Haijun Zhang},
                year         = 2026,
                booktitle    = {The Fourteenth International Conference on Learning Representations, {ICLR} 2026},
                eprint       = {arXiv:2505.19653},
            }"""),
    }

    def __init__(
        self,
        model,
        ref_model=None,
        args: TIDPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tis_positive_model=None,
        tis_negative_model=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = TIDPOConfig(f"{str(model_name).split('/')[-1]}-TI-DPO")
        elif not isinstance(args, TIDPOConfig):
            raise TypeError(
                f"`args` must be a `TIDPOConfig`, got `{type(args).__name__}`. Replace `DPOConfig(...)` with "
                "`TIDPOConfig(...)`: it takes every DPOConfig argument."
            )
        if isinstance(train_dataset, (Dataset, IterableDataset)):  # None or another type: TRL's own error below
            check_dataset_columns(args, train_dataset, eval_dataset)
            train_dataset, eval_dataset = check_dataset_rows(args, train_dataset, eval_dataset)
        tis_positive = tis_positive_model if tis_positive_model is not None else args.tis_positive_model
        tis_negative = tis_negative_model if tis_negative_model is not None else args.tis_negative_model
        check_tis_sources(args.token_weighting, tis_positive, tis_negative, args.tis_system_prompts)
        if args.token_weighting in CONTRASTIVE_WEIGHTINGS and tis_positive is None and args.sync_ref_model:
            # Checked here, not in the config: only now is it known that no π+ model stands in for the reference
            raise ValueError(
                "The prompt-based TIS-DPO variant (`tis_system_prompts` without `tis_positive_model`) computes the "
                "weights once, before training, from the reference under the two system prompts, but "
                "`sync_ref_model=True` updates the reference during training, so the weights would go stale. Give two "
                "fixed TIS models (`tis_positive_model` and `tis_negative_model`) or set `sync_ref_model=False`."
            )

        kept_for = defer_reference_precompute(args)  # what runs the reference at every step despite precomputation
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        check_model_positions(self.model, self.train_dataset, self.eval_dataset, args.max_length)
        if kept_for:
            self._precompute_with_kept_reference(kept_for)
        if self._is_vision_dataset:
            raise ValueError("TIDPOTrainer supports text-only preference data; this dataset has images.")
        # TRL 1.16 settles the checkpointing kwargs (`use_reentrant=True` for PEFT + ZeRO-3, else False) on a new
        # `gradient_checkpointing_kwargs` dict when none was given, but transformers 5 enables checkpointing from
        # `activation_checkpointing_kwargs` (its new name, still None): the first step would run with transformers'
        # default and every step after a `checkpointing_off` block with TRL's. Under PEFT + ZeRO-3 that first
        # non-reentrant step fails in ZeRO-3's gradient reduction. Both names point at TRL's settings here.
        args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs
        if data_collator is None:
            self.data_collator = self._collator(return_prompts=self._uses_policy_anchors)
        self._gather = Gather(self.accelerator)
        self._fallback_warning = FallbackRowsWarning(args.token_weighting)
        self._warned_separate_attribution_pass = False
        self._precompute_engines = []  # DeepSpeed inference engines built for the passes below
        if self._precomputes_reference_weights:
            self._add_reference_weight_columns()
        if args.token_weighting in CONTRASTIVE_WEIGHTINGS:
            self._add_tis_dpo_weight_columns(tis_positive, tis_negative)
        self._release_precompute_engines()

    # ------------------------------------------------------------------ what this configuration runs

    @property
    def _uses_anchors(self) -> bool:
        return self.args.triplet_gamma > 0

    @property
    def _uses_policy_anchors(self) -> bool:
        return self._uses_anchors and self.args.anchor_source == "policy"

    @property
    def _precomputes_reference_weights(self) -> bool:
        args = self.args
        return args.token_weighting == "ti_dpo" and args.importance_model == "reference" and args.precompute_token_weights

    def _attribution_source(self) -> str | None:
        """Which forward computes raw importance each step: "policy", "reference", or None (weights from the batch, or
        the prior alone with `importance_lambda=0`, where the attribution would be multiplied by 0)."""
        if self.args.token_weighting != "ti_dpo" or self._precomputes_reference_weights or self._prior_only:
            return None
        return self.args.importance_model

    @property
    def _prior_only(self) -> bool:
        """TI-DPO weights with `importance_lambda=0`: the Gaussian prior alone, no attribution pass."""
        return self.args.token_weighting == "ti_dpo" and self.args.weight_options()["importance_lambda"] == 0

    def _collator(self, return_prompts: bool = False) -> DataCollatorForTIDPO:
        return DataCollatorForTIDPO(
            pad_token_id=self._tokenizer.pad_token_id,
            max_length=self.args.max_length,
            truncation_mode=self.args.truncation_mode,
            pad_to_multiple_of=self.args.pad_to_multiple_of,
            return_prompts=return_prompts,
        )

    # ------------------------------------------------------------------ dataset preparation (TRL hooks)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's hook: `prepare_dataset` (spans, anchors, over-long prompts) around TRL's own tokenisation."""
        return prepare_dataset(dataset, processing_class, args, dataset_name, tokenize=super()._prepare_dataset)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in TIDPO_BATCH_COLUMNS:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    # ------------------------------------------------------------------ forwards

    def _reference_model(self):
        return self.ref_model if self.ref_model is not None else self.model

    @functools.cached_property
    def _contexts(self) -> ModelContexts:
        """The states the forwards run the models in (built at first use: TRL's init already runs the reference)."""
        trainer = weakref.proxy(self)  # the models are read at each use: Trainer may replace them
        policy, ref_model = (lambda: trainer.model), (lambda: trainer.ref_model)
        return ModelContexts(self.accelerator, self.args, policy, ref_model, deepspeed=self.is_deepspeed_enabled)

    def _policy_attribution_mode(self, model) -> str | None:
        """Where the policy's attribution runs: "fused" into the loss's forward, in its "own_forward" (see
        `separate_attribution_reason`), or nowhere (None)."""
        if self._attribution_source() != "policy":
            return None
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        reason = separate_attribution_reason(model, zero3)
        if reason is None:
            return "fused"
        if not self._warned_separate_attribution_pass:
            logger.warning(reason)
            self._warned_separate_attribution_pass = True
        return "own_forward"

    def concatenated_forward(self, model, inputs: dict[str, torch.Tensor], is_ref_model: bool = False) -> PairForward:
        """
        One forward of `model` over the chosen and rejected rows of `inputs`.

        For the policy with `token_weighting="ti_dpo"`, the same forward also yields the raw token importance: the
        embedding activations are captured by a hook, the attribution target is projected from the last hidden state
        of each row, and one activation-only `autograd.grad` (graph retained for the loss) gives `I[r, j]`. During
        evaluation (under `no_grad`) grad is re-enabled for this and everything is detached after.

        Args:
            model: the policy, or the reference when `is_ref_model=True`. With `is_ref_model=True`, pass
                `self.ref_model`, or the policy itself under PEFT (the adapter is disabled here).
            inputs (`dict`): a collated batch (`input_ids`, `attention_mask`, `completion_mask` `[2B, T]`).
            is_ref_model (`bool`): run as the frozen reference (no grad, adapter disabled; importance only with
                `importance_model="reference"` and no precomputation).

        Returns:
            `PairForward`: per-token log-probs and masks of the `2B` rows, the raw importance where computed, the last
            hidden state when `tdpo_alpha > 0`, and (policy) TRL's per-token statistics.
        """
        batch = PairBatch.from_inputs(inputs)
        keep_hidden = self.args.tdpo_alpha > 0
        if is_ref_model:
            return reference_pair_forward(
                model,
                batch,
                attribute=self._attribution_source() == "reference",
                keep_hidden=keep_hidden,
                reference_mode=self._contexts.reference_scoring,
                attribution_context=self._contexts.reference_attribution,
            )
        return policy_pair_forward(
            model,
            batch,
            attribution=self._policy_attribution_mode(model),
            keep_hidden=keep_hidden,
            router_logits=self.aux_loss_enabled,
            own_forward_context=self._contexts.policy_without_checkpointing,
        )

    def _anchor_batch(self, model, inputs: dict[str, torch.Tensor]) -> AnchorBatch:
        """The batch's anchor rows: sampled from the current policy, or the dataset's (tokenised by the collator)."""
        if self._uses_policy_anchors:
            return self._sample_policy_anchors(model, inputs)
        return dataset_anchor_batch(inputs)

    def _sample_policy_anchors(self, model, inputs: dict) -> AnchorBatch:
        """Sample an anchor per prompt from the current policy (no grad, KV cache; see `policy_anchor_batch`)."""
        with self._contexts.unwrapped_for_generation(model) as unwrapped:
            return policy_anchor_batch(
                unwrapped,
                inputs,
                self.args.anchor_generation_kwargs(),
                self._tokenizer,
                self.args.max_length,
                self.args.truncation_mode,
                max_completion_tokens=self._longest_completion(inputs),
            )

    def _longest_completion(self, inputs: dict) -> int:
        return longest_completion(inputs["completion_mask"], self.accelerator)

    def _forwards(self, model, batch: dict) -> tuple[PairForward, PairForward, AnchorForward | None, AnchorForward | None]:
        """The policy's and the reference's forwards of the pair rows, and of the anchor rows when the triplet loss is
        on (a forward of their own: they need no attribution; stacked with the pairs under reentrant checkpointing)."""
        anchors = self._anchor_batch(model, batch) if self._uses_anchors else None
        if anchors is not None and uses_reentrant_checkpointing(model):
            policy, anchor = self._stacked_policy_forward(model, batch, anchors)
        else:
            policy = self.concatenated_forward(model, batch)
            anchor = anchor_forward(model, anchors) if anchors is not None else None
        ref = self._reference_forward(batch)
        ref_anchor = None
        if anchors is not None:
            precomputed = batch.get("anchor_ref_token_logps")  # dataset anchors with `precompute_ref_log_probs=True`
            if precomputed is not None:
                ref_anchor = precomputed_anchor_forward(anchors, precomputed)
            else:
                ref_anchor = anchor_forward(self._reference_model(), anchors, self._contexts.reference_scoring)
        return policy, ref, anchor, ref_anchor

    def _stacked_policy_forward(self, model, batch: dict, anchors: AnchorBatch) -> tuple[PairForward, AnchorForward]:
        """One policy forward over the pair and anchor rows (see `stack_anchor_rows`), attributing the pairs only."""
        pairs = PairBatch.from_inputs(batch)
        stacked = policy_pair_forward(
            model,
            stack_anchor_rows(pairs, anchors, self._tokenizer.pad_token_id),
            attribution=self._policy_attribution_mode(model),
            keep_hidden=self.args.tdpo_alpha > 0,
            router_logits=self.aux_loss_enabled,
            own_forward_context=self._contexts.policy_without_checkpointing,
            attributed_rows=pairs.input_ids.size(0),
        )
        return split_anchor_rows(stacked, pairs, anchors)

    def _reference_forward(self, batch: dict) -> PairForward:
        """
        The reference's pair forward: run, or with `precompute_ref_log_probs=True` read from the batch's
        `ref_token_logps` (plus the reference's attribution when `importance_model="reference"` is not precomputed).
        """
        if not self.precompute_ref_logps:
            return self.concatenated_forward(self._reference_model(), batch, is_ref_model=True)
        if "ref_token_logps" not in batch:
            raise ValueError(
                "`precompute_ref_log_probs=True` reads the reference's per-token log-probs from the batch "
                "(`ref_token_logps`), which is missing: the default collator builds it from the "
                f"{list(REF_LOGP_COLUMNS)} columns the trainer adds; a custom `data_collator` must too."
            )
        forward = precomputed_reference_forward(PairBatch.from_inputs(batch), batch["ref_token_logps"])
        if self._attribution_source() == "reference":
            reference, context = self._reference_model(), self._contexts.reference_attribution
            forward.raw_importance = attribute_rows(reference, batch["input_ids"], batch["attention_mask"], context)
        return forward

    # ------------------------------------------------------------------ weights, triplet, KL

    def compute_token_weights(
        self,
        raw_importance: torch.Tensor | None,
        completion_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        batch_weights: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
    ) -> HybridWeights:
        """
        Token weights of the pair rows on the shifted axis (entry `i` weighs token `i+1`).

        Args:
            raw_importance (`torch.Tensor` or None): `[2B, T]` raw attribution (the policy's, or the reference's with
                `importance_model="reference"` and no precomputation); None where the weights come from the batch, and
                with `importance_lambda=0` (the prior alone; no attribution is computed).
            completion_mask (`torch.Tensor`): `[2B, T-1]` shifted completion mask.
            attention_mask (`torch.Tensor`): `[2B, T]`.
            batch_weights (`torch.Tensor`, *optional*): the batch's `token_weights` `[2B, T]` (unshifted), used with
                `token_weighting="dataset"`/`"tis_dpo"` and with precomputed reference weights.
            input_ids (`torch.Tensor`, *optional*): the pair rows' `[2B, T]` token ids, needed by
                `token_weighting="difference"` (which compares chosen and rejected token by token).

        Returns:
            `HybridWeights`: detached float32 `weights` `[2B, T-1]` (0 off the completion), the rows that fell back to
            the prior and those with no token to weigh; `importance` and `prior` for TI-DPO weights only.
        """
        rows = completion_mask.size(0)
        none = torch.zeros(rows, dtype=torch.bool, device=completion_mask.device)
        if self.args.token_weighting == "uniform":
            return HybridWeights(completion_mask.float(), None, None, none, none)
        if self.args.token_weighting == "difference":
            return self._difference_weights(input_ids, completion_mask)
        if raw_importance is None and self._prior_only and not self._precomputes_reference_weights:
            return completion_token_weights(None, completion_mask, attention_mask, **self.args.weight_options())
        if raw_importance is None:  # dataset weights, or cached reference weights
            if batch_weights is None:
                raise ValueError(
                    "This configuration reads token weights from the batch (`token_weights`), which is missing: the "
                    "default collator builds it from the 'chosen_token_weights'/'rejected_token_weights' columns."
                )
            return HybridWeights(batch_weights[:, 1:].float() * completion_mask, None, None, none, none)
        return completion_token_weights(raw_importance, completion_mask, attention_mask, **self.args.weight_options())

    def _difference_weights(self, input_ids: torch.Tensor | None, completion_mask: torch.Tensor) -> HybridWeights:
        """`token_weighting="difference"`: the pair's shared tokens and differing tokens, weighted and normalised."""
        if input_ids is None:
            raise ValueError("`token_weighting='difference'` compares the pair's tokens: pass `input_ids`.")
        args = self.args
        return pair_difference_weights(
            input_ids, completion_mask, args.difference_shared_weight, args.difference_differing_weight,
            args.weight_normalization,
        )  # fmt: skip

    def _triplet_terms(
        self,
        policy: PairForward,
        ref: PairForward,
        anchor: AnchorForward,
        ref_anchor: AnchorForward,
        pair_token_ids: torch.Tensor,
    ) -> TripletTerms:
        """The triplet terms of each pair (`trl_tidpo.trainer.triplet_terms`)."""
        return triplet_terms(
            policy,
            ref,
            anchor,
            ref_anchor,
            pair_token_ids,
            margin=self.args.triplet_margin,
            skip_copy_anchors=self.args.triplet_skip_copy_anchors,
        )

    def _sequential_kl(self, model, policy: PairForward, ref: PairForward) -> torch.Tensor:
        """TDPO's sequential KL `[2B]` of the chosen and rejected rows, in chunks of positions."""
        policy_lm = causal_lm_of(model)
        ref_lm = causal_lm_of(self._reference_model())
        return sequential_kl(
            policy.last_hidden,
            ref.last_hidden,
            policy.completion_mask,
            lambda h: project_to_logits(h, policy_lm.get_output_embeddings(), policy_lm.config),
            lambda h: project_to_logits(h, ref_lm.get_output_embeddings(), ref_lm.config),
            chunk_size=self.args.kl_chunk_size,
        )

    # ------------------------------------------------------------------ loss

    def dpo_loss(
        self,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
        loss_type: str | None = None,
        *,
        chosen_weight_sum: torch.Tensor | None = None,
        rejected_weight_sum: torch.Tensor | None = None,
        sft_logps: torch.Tensor | None = None,
        sft_weight_sum: torch.Tensor | None = None,
        pair_weights: torch.Tensor | None = None,
        kl_chosen: torch.Tensor | None = None,
        kl_rejected: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        TI-DPO's token-weighted DPO loss of each pair (Eq. 12), for every TRL loss type (`trl_tidpo.ops.weighted_losses`).
        The triplet loss is added by `get_batch_loss_metrics`.

        The log-prob arguments are the *token-weighted* sequence sums `Σ_j w_j log π(y_j)` (`[B]` each; LD-DPO's split
        sums with `ld_alpha`), so their differences are the weighted log-ratios `W_c` and `W_r`; with uniform weights
        they are TRL's sums and every loss is TRL's.

        Args:
            chosen_logps, rejected_logps (`torch.Tensor`): `[B]` weighted policy log-probs.
            ref_chosen_logps, ref_rejected_logps (`torch.Tensor`): `[B]` weighted reference log-probs.
            loss_type (`str`, *optional*): one loss type; by default the configured `loss_type` list combined with
                `loss_weights`.
            chosen_weight_sum, rejected_weight_sum (`torch.Tensor`, *optional*): `[B]` weight sums, the lengths of
                `"ipo"` and `"sigmoid_norm"` (`weight_sums`; TRL's token counts with uniform weights).
            sft_logps, sft_weight_sum (`torch.Tensor`, *optional*): `[B]` the chosen rows' weighted sums (without
                LD-DPO) and scored weight sums, for `"sft"`.
            pair_weights (`torch.Tensor`, *optional*): `[B]` per-pair factors of the DPO loss: WPO's weights
                (`use_weighting=True`) times the dataset's `pair_weight` column (`dataset_pair_weights`), or whichever
                of the two is given.
            kl_chosen, kl_rejected (`torch.Tensor`, *optional*): `[B]` sequential KL (when `tdpo_alpha > 0`).

        Returns:
            `tuple`: per-pair `losses` `[B]` (`Σ_k λ_k ω L_k`, whose mean is TRL's loss), `chosen_rewards` and
            `rejected_rewards` `[B]` (β times the weighted log-ratios, detached).
        """
        loss_terms = [(loss_type, 1.0)] if loss_type is not None else zip(self.loss_types, self.loss_weights)
        losses = 0.0
        for name, weight in loss_terms:
            per_pair = preference_losses(
                name,
                chosen_logps,
                rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                beta=self.beta,
                chosen_weight_sum=chosen_weight_sum,
                rejected_weight_sum=rejected_weight_sum,
                sft_logps=sft_logps,
                sft_weight_sum=sft_weight_sum,
                label_smoothing=self.label_smoothing,
                f_divergence_type=self.f_divergence_type,
                f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                discopop_tau=self.args.discopop_tau,
                kl_chosen=kl_chosen,
                kl_rejected=kl_rejected,
                alpha=self.args.tdpo_alpha,
            )
            if pair_weights is not None:
                per_pair = per_pair * pair_weights
            losses = losses + weight * per_pair
        chosen_rewards, rejected_rewards = pair_rewards(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, self.beta
        )
        return losses, chosen_rewards, rejected_rewards

    def _sequence_logps(self, per_token_logps: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`[2B]` token-weighted sums of the pair rows; LD-DPO's shared-plus-`ld_alpha`-tail sums when `ld_alpha` is set."""
        if self.ld_alpha is None:
            return weighted_sequence_logps(per_token_logps, weights, mask)
        return length_desensitized_logps(per_token_logps, weights, mask, self.ld_alpha)

    def _loss_parts(self, model, batch: dict) -> tuple[PairForward, LossParts]:
        """Run one step's forwards, weights, KL and triplet terms, and the weighted DPO loss."""
        policy, ref, anchor, ref_anchor = self._forwards(model, batch)
        importance = ref.raw_importance if self._attribution_source() == "reference" else policy.raw_importance
        weights = self.compute_token_weights(
            importance,
            policy.completion_mask,
            policy.attention_mask,
            batch.get("token_weights"),
            input_ids=batch["input_ids"],
        )
        mask, w = policy.completion_mask, weights.weights
        chosen_logps, rejected_logps = self._sequence_logps(policy.per_token_logps, w, mask).chunk(2)
        ref_chosen, ref_rejected = self._sequence_logps(ref.per_token_logps, w, mask).chunk(2)
        unshifted_mask = batch["completion_mask"]
        chosen_weight_sum, rejected_weight_sum = weight_sums(w, unshifted_mask).chunk(2)
        sft_logps = sft_weight_sum = None
        if "sft" in self.loss_types:
            sft_logps = weighted_sequence_logps(policy.per_token_logps, w, mask).chunk(2)[0]
            sft_weight_sum = weight_sums(w, unshifted_mask, scored_only=True).chunk(2)[0]
        dataset_pair_weights = batch.get(PAIR_WEIGHT_COLUMN)  # `[B]`, the dataset's `pair_weight` column
        kl_chosen = kl_rejected = None
        if self.args.tdpo_alpha > 0:
            kl_chosen, kl_rejected = self._sequential_kl(model, policy, ref).chunk(2)
        triplet = None
        if anchor is not None:
            triplet = self._triplet_terms(policy, ref, anchor, ref_anchor, batch["input_ids"])
        dpo_losses, chosen_rewards, rejected_rewards = self.dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen,
            ref_rejected,
            chosen_weight_sum=chosen_weight_sum,
            rejected_weight_sum=rejected_weight_sum,
            sft_logps=sft_logps,
            sft_weight_sum=sft_weight_sum,
            pair_weights=self._dpo_pair_weights(policy, dataset_pair_weights),
            kl_chosen=kl_chosen,
            kl_rejected=kl_rejected,
        )
        policy_logps = policy.sequence_logps.detach()  # unweighted, TRL's logps/*
        if self.ld_alpha is not None:
            policy_logps = length_desensitized_logps(policy.per_token_logps, mask, mask, self.ld_alpha).detach()
        parts = LossParts(
            dpo_losses=dpo_losses,
            policy_logps=policy_logps,
            chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards,
            weights=weights,
            completion_mask=mask,
            triplet=triplet,
            kl_chosen=kl_chosen,
            kl_rejected=kl_rejected,
            dataset_pair_weights=dataset_pair_weights,
        )
        return policy, parts

    def _dpo_pair_weights(self, policy: PairForward, dataset_pair_weights: torch.Tensor | None) -> torch.Tensor | None:
        """`[B]` factors of each pair's DPO loss (`dpo_loss`'s `pair_weights`): WPO's weights (`use_weighting=True`,
        from the policy's own unweighted token probabilities, as TRL) times the dataset's `pair_weight` column."""
        wpo = None
        if self.use_weighting:
            wpo = wpo_pair_weights(policy.per_token_logps, policy.log_sum_sq_probs, policy.completion_mask)
        if dataset_pair_weights is None:
            return wpo
        return dataset_pair_weights if wpo is None else wpo * dataset_pair_weights

    def get_batch_loss_metrics(self, model, batch: dict, train_eval: str = "train") -> tuple[torch.Tensor, dict]:
        """
        The TI-DPO loss of one batch (`mean_b [L_DPO + γ L_trip]`, plus the router's auxiliary loss) and its metrics
        (floats, already gathered across processes).

        Returns:
            `tuple[torch.Tensor, dict[str, float]]`: the scalar loss and the metrics, without the `eval_` prefix.
        """
        policy, parts = self._loss_parts(model, batch)
        losses = parts.dpo_losses  # already scaled by the pair weights (`dpo_loss`)
        if parts.triplet is not None:
            triplet = parts.triplet.loss
            if parts.dataset_pair_weights is not None:  # it scales the pair's whole loss; WPO's only the DPO term
                triplet = triplet * parts.dataset_pair_weights
            losses = losses + self.args.triplet_gamma * triplet
        loss = losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * policy.aux_loss

        metrics = dpo_metrics(self._gather, policy, parts)
        metrics.update(token_weight_metrics(self._gather, parts))
        metrics.update(triplet_and_kl_metrics(self._gather, parts))
        if self.aux_loss_enabled:
            metrics["aux_loss"] = self._gather.mean(policy.aux_loss)
        self._fallback_warning(int(metrics["token_weights/fallback_rows"]), train_eval)
        return loss, metrics

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        loss, metrics = self.get_batch_loss_metrics(model, inputs, train_eval=mode)
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if mode == "train":
            num_tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if not return_outputs:
            return loss
        warnings.warn(
            "`return_outputs=True` (logits for `compute_metrics`) recomputes the logits with an extra forward pass, "
            "as in TRL's DPOTrainer, where it is deprecated.",
            FutureWarning,
            stacklevel=2,
        )
        with torch.no_grad():
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        return loss, outputs

    # ------------------------------------------------------------------ resuming

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """
        [`~transformers.Trainer.train`], resuming only from a complete checkpoint (`resolve_resume`: `True` or `"last"`
        takes the newest *complete* one in `output_dir`; a damaged folder is refused, naming the file and the complete
        one before it), and saying which checkpoint and step it resumes from.
        """
        resume_from_checkpoint = resolve_resume(
            resume_from_checkpoint, self.args.output_dir, require_optimizer=not self.args.save_only_model
        )
        if resume_from_checkpoint is not None:
            logger.warning(f"Resuming from {resume_from_checkpoint} (step {checkpoint_step(resume_from_checkpoint)}).")
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # ------------------------------------------------------------------ saving

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """
        [`~transformers.Trainer.save_model`], plus the model card (`README.md`, naming TI-DPO and citing its paper) in
        `output_dir`. Checkpoints get theirs from `DPOTrainer._save_checkpoint`, `push_to_hub` from `Trainer`.
        """
        super().save_model(output_dir, _internal_call)
        if _internal_call:
            return
        if self.args.hub_model_id is None:
            model_name = os.path.basename(os.path.abspath(self.args.output_dir))
        else:
            model_name = self.args.hub_model_id.split("/")[-1]
        self.create_model_card(model_name=model_name)  # writes `args.output_dir/README.md` on the main process
        elsewhere = output_dir is not None and os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir)
        if elsewhere and self.is_world_process_zero():
            shutil.copy(os.path.join(self.args.output_dir, "README.md"), os.path.join(output_dir, "README.md"))
