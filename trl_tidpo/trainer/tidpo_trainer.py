import contextlib
import copy
import os
import shutil
import textwrap
import warnings
import weakref

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from trl import DPOTrainer
from trl.models import unwrap_model_for_generation
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from ..modeling.anchors import anchor_eos_token_ids, sample_policy_anchors, tokenize_anchor
from ..modeling.attribution import causal_lm_of, project_to_logits, uses_reentrant_checkpointing
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
from ..modeling.tis_dpo import check_tis_sources
from ..modeling.weight_cache import (
    ANCHOR_REF_LOGP_COLUMN,
    REF_LOGP_COLUMNS,
    TOKENIZED_COLUMNS,
)
from ..modeling.weight_columns import (
    PAIR_WEIGHT_COLUMN,
    WEIGHT_COLUMNS,
    validate_pair_weights,
    validate_token_weight_columns,
)
from ..modeling.weight_spans import (
    add_span_weight_columns,
    check_offsets_support,
    record_span_source,
    span_columns_of,
    validate_span_rows,
)
from ..ops.importance import HybridWeights, completion_token_weights
from ..ops.pair_alignment import align_pair_completions, difference_token_weights
from ..ops.sequential_kl import sequential_kl
from ..ops.triplet import triplet_distances, triplet_loss
from ..ops.weighted_losses import (
    length_desensitized_logps,
    pair_rewards,
    preference_losses,
    weight_sums,
    weighted_sequence_logps,
    wpo_pair_weights,
)
from .checkpoints import check_checkpoint, last_complete_checkpoint
from .dataset_checks import (
    check_dataset_columns,
    check_dataset_rows,
    check_positions,
    drop_overlong_prompt_rows,
    model_max_positions,
    named_datasets,
    overlong_prompt_filter,
    report_dropped_overlong_prompts,
)
from .loss_parts import LossParts, TripletTerms
from .metrics import Gather, dpo_metrics, token_weight_metrics, triplet_and_kl_metrics
from .precompute import PrecomputeMixin
from .tidpo_config import TIDPOConfig

logger = get_logger(__name__)

def reference_needed_at_each_step(args: TIDPOConfig) -> list[str]:
    """
    What runs the reference model at every step even with `precompute_ref_log_probs=True` (which then keeps it in
    memory): policy anchors (the reference scores each sampled anchor) and `importance_model="reference"` without
    `precompute_token_weights` (its attribution). Dataset anchors are precomputed with the pairs; `tdpo_alpha > 0`
    is refused by the config.
    """
    needs = []
    if args.triplet_gamma > 0 and args.anchor_source == "policy":
        needs.append("policy anchors (`anchor_source='policy'`)")
    if args.token_weighting == "ti_dpo" and args.importance_model == "reference" and not args.precompute_token_weights:
        needs.append("`importance_model='reference'` with `precompute_token_weights=False`")
    return needs


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
    - `compute_token_weights(raw_importance, completion_mask, attention_mask, batch_weights=None) -> HybridWeights`:
      the token weights of the pair rows, detached.
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
        if args.token_weighting in ("tis_dpo", "cdpo") and tis_positive is None and args.sync_ref_model:
            # Checked here, not in the config: only now is it known that no π+ model stands in for the reference
            raise ValueError(
                "The prompt-based TIS-DPO variant (`tis_system_prompts` without `tis_positive_model`) computes the "
                "weights once, before training, from the reference under the two system prompts, but "
                "`sync_ref_model=True` updates the reference during training, so the weights would go stale. Give two "
                "fixed TIS models (`tis_positive_model` and `tis_negative_model`) or set `sync_ref_model=False`."
            )

        # `precompute_ref_log_probs`: TRL drops the reference of a full fine-tuning, but these parts still run it at
        # every step, so TRL is asked to build it as without precomputation, and the precompute runs after, on it
        kept_for = reference_needed_at_each_step(args) if args.precompute_ref_log_probs else []
        if kept_for:
            if args.sync_ref_model:  # TRL's own check, which the switch below would skip
                raise ValueError(
                    "You cannot use `sync_ref_model=True` together with `precompute_ref_log_probs=True`: the "
                    "precomputed reference log-probs would go stale as the reference is updated. Set "
                    "`precompute_ref_log_probs=False` or disable `sync_ref_model`."
                )
            args.precompute_ref_log_probs = False
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
        max_positions = model_max_positions(causal_lm_of(self.model).config)
        for name, dataset in named_datasets(self.train_dataset, self.eval_dataset).items():
            check_positions(dataset, name, max_positions, args.max_length)
        if kept_for:
            args.precompute_ref_log_probs = True
            self._precompute_with_kept_reference(kept_for)
        if self._is_vision_dataset:
            raise ValueError("TIDPOTrainer supports text-only preference data; this dataset has images.")
        # TRL 1.16 settles the checkpointing kwargs (`use_reentrant=True` for PEFT + ZeRO-3, else False) on a new
        # `gradient_checkpointing_kwargs` dict when none was given, but transformers 5 enables checkpointing from
        # `activation_checkpointing_kwargs` (its new name, still None): the first step would run with transformers'
        # default and every step after a `disable_gradient_checkpointing` block with TRL's. Under PEFT + ZeRO-3 that
        # first non-reentrant step fails in ZeRO-3's gradient reduction. Both names point at TRL's settings here.
        args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs
        if data_collator is None:
            self.data_collator = self._collator(return_prompts=self._uses_policy_anchors)
        self._gather = Gather(self.accelerator)
        self._fallback_rows_seen = 0
        self._warned_separate_attribution_pass = False
        self._precompute_engines = []  # DeepSpeed inference engines built for the passes below
        if self._precomputes_reference_weights:
            self._add_reference_weight_columns()
        if args.token_weighting in ("tis_dpo", "cdpo"):
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
        implicit_prompt = "prompt" not in next(iter(dataset))
        if isinstance(dataset, Dataset):  # row checks before TRL drops rows, so that errors number them as given
            validate_pair_weights(dataset, dataset_name)
        has_spans = bool(span_columns_of(next(iter(dataset))))
        if has_spans:
            dataset = self._record_span_sources(dataset, processing_class, args, implicit_prompt, dataset_name)
        num_rows = len(dataset) if isinstance(dataset, Dataset) else None
        drops_overlong = args.max_length is not None and args.truncation_mode == "keep_start"
        # TRL 1.16 always re-tokenises from the text columns, which an already tokenised dataset may not have
        if set(TOKENIZED_COLUMNS) <= set(next(iter(dataset))):
            dataset = drop_overlong_prompt_rows(dataset, args.max_length, args.truncation_mode, dataset_name)
        elif isinstance(dataset, IterableDataset) and drops_overlong:
            # TRL filters a stream's over-long prompts without a word: tokenise without its filter, filter here
            unfiltered = copy.copy(args)
            unfiltered.max_length = None  # TRL's preparation reads `max_length` only for that filter
            dataset = super()._prepare_dataset(dataset, processing_class, unfiltered, dataset_name)
        else:
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            dropped = num_rows - len(dataset) if num_rows is not None else 0  # the pairs TRL dropped
            report_dropped_overlong_prompts(dropped, num_rows, dataset_name, args.max_length)
        if isinstance(dataset, IterableDataset) and drops_overlong:
            dataset = dataset.filter(overlong_prompt_filter(args.max_length, dataset_name))
        needs_anchor_ids = args.triplet_gamma > 0 and args.anchor_source == "dataset"
        if needs_anchor_ids and "anchor_ids" not in next(iter(dataset)):
            map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
            dataset = dataset.map(
                tokenize_anchor,
                with_indices=True,
                fn_kwargs={"processing_class": processing_class, "implicit_prompt": implicit_prompt},
                **map_kwargs,
            )
        if has_spans:
            dataset = add_span_weight_columns(
                dataset, processing_class, args.span_default_weight, dataset_name, args.dataset_num_proc
            )
        if args.token_weighting == "dataset" and isinstance(dataset, Dataset):
            validate_token_weight_columns(dataset, dataset_name)
        return dataset

    def _record_span_sources(self, dataset, processing_class, args, implicit_prompt: bool, dataset_name: str):
        """Check the span columns (map-style: every row now) and keep what mapping them needs after TRL's
        preparation (`record_span_source`)."""
        check_offsets_support(processing_class)
        validate_span_rows(dataset, dataset_name)
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
        return dataset.map(
            record_span_source,
            with_indices=True,
            fn_kwargs={"dataset_name": dataset_name, "implicit_prompt": implicit_prompt},
            **map_kwargs,
        )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in ("anchor_ids", *WEIGHT_COLUMNS, PAIR_WEIGHT_COLUMN, *REF_LOGP_COLUMNS, ANCHOR_REF_LOGP_COLUMN):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    # ------------------------------------------------------------------ forwards

    def _reference_model(self):
        return self.ref_model if self.ref_model is not None else self.model

    def _peft_policy(self):
        """
        The PEFT model under the policy's wrapping (`accelerator.unwrap_model(self.model)`), or None without PEFT.
        Resolved once per `self.model` object, not at each reference forward: accelerate's unwrapping re-reads
        installed packages' metadata on every call.
        """
        cached = getattr(self, "_peft_policy_cache", None)
        if cached is None or cached[0]() is not self.model:
            unwrapped = self.accelerator.unwrap_model(self.model)
            self._peft_policy_cache = (weakref.ref(self.model), unwrapped if is_peft_model(unwrapped) else None)
        return self._peft_policy_cache[1]

    def _reference_context(self):
        """Under PEFT without a `ref_model`: disabled adapters (new adapter) or the frozen "ref" copy (re-trained)."""
        unwrapped = self._peft_policy() if self.ref_model is None else None
        if unwrapped is not None:
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _reference_mode(self):
        """How every reference forward runs: no grad, no checkpointing, and the reference adapter state under PEFT."""
        with torch.no_grad(), self._without_checkpointing(), self._reference_context():
            yield

    def _without_checkpointing(self):
        return disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)

    @contextlib.contextmanager
    def _reference_attribution_context(self):
        """The reference's own attribution forward: the reference adapter state, no checkpointing."""
        with self._reference_context(), self._without_checkpointing():
            yield

    def _policy_attribution_mode(self, model) -> str | None:
        """Where the policy's attribution runs: "fused" into the loss's forward, in its "own_forward" (see
        `_separate_attribution_reason`), or nowhere (None)."""
        if self._attribution_source() != "policy":
            return None
        reason = self._separate_attribution_reason(model)
        if reason is None:
            return "fused"
        if not self._warned_separate_attribution_pass:
            logger.warning(reason)
            self._warned_separate_attribution_pass = True
        return "own_forward"

    def _separate_attribution_reason(self, model) -> str | None:
        """
        Why the policy's attribution cannot share the loss's forward, or None when it can:

        - under DeepSpeed ZeRO-3, the attribution's backward runs ZeRO-3's backward hooks, which re-partition the
          parameters that the loss's own backward (on the same retained graph) then needs;
        - reentrant checkpointing cannot serve `autograd.grad` w.r.t. activations.
        """
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            return (
                "DeepSpeed ZeRO-3 re-partitions the parameters after any backward through the model, so the "
                "attribution backward cannot share the loss's graph; token importance is computed in a separate "
                "forward without checkpointing (exact, but one extra forward per step, with its parameter gathers)."
            )
        if uses_reentrant_checkpointing(model):
            return (
                "Reentrant gradient checkpointing is on (`use_reentrant=True`), which cannot give gradients w.r.t. "
                "activations; token importance is computed in a separate forward without checkpointing (exact, but "
                "one extra forward per step). Use `gradient_checkpointing_kwargs={'use_reentrant': False}` to avoid it."
            )
        return None

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
                reference_mode=self._reference_mode,
                attribution_context=self._reference_attribution_context,
            )
        return policy_pair_forward(
            model,
            batch,
            attribution=self._policy_attribution_mode(model),
            keep_hidden=keep_hidden,
            router_logits=self.aux_loss_enabled,
            own_forward_context=self._without_checkpointing,
        )

    def _anchor_batch(self, model, inputs: dict[str, torch.Tensor]) -> AnchorBatch:
        """The batch's anchor rows: sampled from the current policy, or the dataset's (tokenised by the collator)."""
        if self._uses_policy_anchors:
            return self._sample_policy_anchors(model, inputs)
        if "anchor_input_ids" not in inputs:
            raise ValueError(
                "`anchor_source='dataset'` needs `anchor_input_ids`, `anchor_attention_mask` and "
                "`anchor_completion_mask` in each batch; the default collator builds them from the 'anchor' column."
            )
        return AnchorBatch.from_inputs(inputs)

    def _anchor_generation_kwargs(self) -> dict:
        return {
            "do_sample": True,
            "max_new_tokens": self.args.anchor_max_new_tokens,
            "temperature": self.args.anchor_temperature,
            "top_k": self.args.anchor_top_k,  # 0 disables top-k
            "top_p": self.args.anchor_top_p,
        }

    def _sample_policy_anchors(self, model, inputs: dict) -> AnchorBatch:
        """Sample an anchor per prompt from the current policy (no grad, KV cache)."""
        if "prompt_input_ids" not in inputs:
            raise ValueError(
                "`anchor_source='policy'` needs `prompt_input_ids` and `prompt_attention_mask` in each batch. The "
                "default collator provides them; a custom `data_collator` must too (see `DataCollatorForTIDPO`)."
            )
        with self._unwrapped_for_generation(model) as unwrapped:
            anchors = sample_policy_anchors(
                unwrapped,
                inputs["prompt_input_ids"],
                inputs["prompt_attention_mask"],
                self._anchor_generation_kwargs(),
                eos_token_id=anchor_eos_token_ids(
                    causal_lm_of(unwrapped).generation_config, self._tokenizer.eos_token_id
                ),
                pad_token_id=self._tokenizer.pad_token_id,
                max_length=self.args.max_length,
                truncation_mode=self.args.truncation_mode,
                max_completion_tokens=self._longest_completion(inputs),
            )
        return AnchorBatch.from_inputs(anchors)

    @contextlib.contextmanager
    def _unwrapped_for_generation(self, model):
        """
        TRL's `unwrap_model_for_generation` (the unwrapped model, gradient checkpointing off for the block), with the
        unwrapped model resolved once per wrapper object instead of twice per step (accelerate's unwrapping re-reads
        package metadata on every call). Under DeepSpeed, TRL's own, which gathers ZeRO-3's parameters.
        """
        kwargs = self.args.gradient_checkpointing_kwargs
        if self.is_deepspeed_enabled:
            with unwrap_model_for_generation(model, self.accelerator, gradient_checkpointing_kwargs=kwargs) as unwrapped:
                yield unwrapped
            return
        cache = self.__dict__.setdefault("_unwrapped_cache", weakref.WeakKeyDictionary())
        cached = cache.get(model)
        unwrapped = cached() if cached is not None else None
        if unwrapped is None:
            unwrapped = self.accelerator.unwrap_model(model)
            cache[model] = weakref.ref(unwrapped)
        checkpointing = unwrapped.is_gradient_checkpointing
        if checkpointing:
            unwrapped.gradient_checkpointing_disable()
        try:
            yield unwrapped
        finally:
            if checkpointing:
                unwrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def _longest_completion(self, inputs: dict) -> int:
        """
        The batch's longest chosen/rejected completion, in tokens (the most the triplet distances read of an anchor),
        over all processes, so that every process generates the same number of steps, as it did uncapped.
        """
        longest = inputs["completion_mask"].sum(dim=-1).max()
        if self.accelerator.num_processes > 1:
            longest = self.accelerator.gather(longest.reshape(1)).max()
        return int(longest)

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
                ref_anchor = anchor_forward(self._reference_model(), anchors, self._reference_mode)
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
            own_forward_context=self._without_checkpointing,
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
            forward.raw_importance = attribute_rows(
                self._reference_model(), batch["input_ids"], batch["attention_mask"], self._reference_attribution_context
            )
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
        unshifted = torch.nn.functional.pad(completion_mask, (1, 0), value=0)
        alignment = align_pair_completions(input_ids, unshifted)
        return difference_token_weights(
            alignment.shared,
            completion_mask,
            self.args.difference_shared_weight,
            self.args.difference_differing_weight,
            self.args.weight_normalization,
        )

    def _triplet_terms(
        self, policy: PairForward, ref: PairForward, anchor: AnchorForward, ref_anchor: AnchorForward
    ) -> TripletTerms:
        """Distances between the anchor's per-token log-ratios and the chosen/rejected ones, and the triplet loss."""
        logratios = policy.per_token_logps - ref.per_token_logps.detach()
        chosen, rejected = logratios.chunk(2)
        chosen_mask, rejected_mask = policy.completion_mask.chunk(2)
        anchor_logratios = anchor.per_token_logps - ref_anchor.per_token_logps.detach()
        dist_pos, dist_neg = triplet_distances(
            anchor_logratios, anchor.completion_mask, chosen, chosen_mask, rejected, rejected_mask
        )
        return TripletTerms(
            dist_pos=dist_pos,
            dist_neg=dist_neg,
            loss=triplet_loss(dist_pos, dist_neg, self.args.triplet_margin),
            anchor_tokens=anchor.completion_mask.sum(dim=-1).float(),
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
            pair_weights (`torch.Tensor`, *optional*): `[B]` per-pair factors of the loss: WPO's weights
                (`use_weighting=True`), the dataset's `pair_weight` column, or their product when both are given.
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
        pair_weights = None
        if self.use_weighting:  # WPO: from the policy's own unweighted token probabilities, as TRL
            pair_weights = wpo_pair_weights(policy.per_token_logps, policy.log_sum_sq_probs, mask)
        dataset_pair_weights = batch.get(PAIR_WEIGHT_COLUMN)  # `[B]`, the dataset's `pair_weight` column
        if dataset_pair_weights is not None:
            pair_weights = dataset_pair_weights if pair_weights is None else pair_weights * dataset_pair_weights
        kl_chosen = kl_rejected = None
        if self.args.tdpo_alpha > 0:
            kl_chosen, kl_rejected = self._sequential_kl(model, policy, ref).chunk(2)
        triplet = None
        if anchor is not None:
            triplet = self._triplet_terms(policy, ref, anchor, ref_anchor)
        dpo_losses, chosen_rewards, rejected_rewards = self.dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen,
            ref_rejected,
            chosen_weight_sum=chosen_weight_sum,
            rejected_weight_sum=rejected_weight_sum,
            sft_logps=sft_logps,
            sft_weight_sum=sft_weight_sum,
            pair_weights=pair_weights,
            kl_chosen=kl_chosen,
            kl_rejected=kl_rejected,
        )
        policy_logps = policy.sequence_logps.detach()  # unweighted, TRL's logps/*
        if self.ld_alpha is not None:
            policy_logps = length_desensitized_logps(policy.per_token_logps, mask, mask, self.ld_alpha).detach()
        parts = LossParts(
            dpo_losses,
            policy_logps,
            chosen_rewards,
            rejected_rewards,
            weights,
            mask,
            triplet,
            kl_chosen,
            kl_rejected,
            dataset_pair_weights,
        )
        return policy, parts

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
            if parts.pair_weights is not None:  # `pair_weight` scales the pair's whole loss; WPO's only the DPO term
                triplet = triplet * parts.pair_weights
            losses = losses + self.args.triplet_gamma * triplet
        loss = losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * policy.aux_loss

        metrics = dpo_metrics(self._gather, policy, parts)
        metrics.update(token_weight_metrics(self._gather, parts))
        metrics.update(triplet_and_kl_metrics(self._gather, parts))
        if self.aux_loss_enabled:
            metrics["aux_loss"] = self._gather.mean(policy.aux_loss)
        self._warn_about_fallback_rows(int(metrics["token_weights/fallback_rows"]), train_eval)
        return loss, metrics

    def _warn_about_fallback_rows(self, fallback_rows: int, mode: str) -> None:
        if not fallback_rows:
            return
        self._fallback_rows_seen += fallback_rows
        if self.args.token_weighting == "difference":
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
            f"{fallback_rows} row(s) in this {mode} batch {what} ({self._fallback_rows_seen} so far); see the "
            "`token_weights/fallback_rows` metric."
        )

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
        [`~transformers.Trainer.train`], resuming only from a complete checkpoint: `resume_from_checkpoint=True` takes
        the newest *complete* one in `output_dir` (transformers takes the newest folder, even one a kill or a full
        disk cut short), and a damaged checkpoint folder is refused, naming the file and the complete one before it
        (`trl_tidpo.trainer.checkpoints`).
        """
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            require_optimizer = not self.args.save_only_model
            if resume_from_checkpoint is True:
                resume_from_checkpoint = str(last_complete_checkpoint(self.args.output_dir, require_optimizer))
            elif os.path.isdir(resume_from_checkpoint):
                check_checkpoint(resume_from_checkpoint, require_optimizer)
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
