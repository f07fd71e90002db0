"""
What `TIDPOTrainer` computes over whole datasets before training, kept out of the step's code: the reference's TI-DPO
weights (`importance_model="reference"`), TIS-DPO's and cDPO's weights, and the reference's per-token log-probs
(`precompute_ref_log_probs=True`). Each is computed once, split across processes, and cached as dataset columns
(`modeling/weight_cache.py`). Under DeepSpeed the models run inside inference engines released before training.
"""

import contextlib
import gc

import torch
from accelerate.logging import get_logger
from accelerate.utils.memory import clear_device_cache
from datasets import Dataset, IterableDataset
from trl.models import prepare_deepspeed

from ..modeling.forwards import (
    AnchorBatch,
    PairBatch,
    anchor_forward,
    attribute_rows,
    reference_pair_forward,
)
from ..modeling.cdpo import cdpo_weight_lists
from ..modeling.contrastive_scoring import ContrastiveScoring, columns_fingerprint
from ..modeling.tis_dpo import load_contrastive_model, tis_dpo_weight_lists
from ..modeling.weight_cache import (
    TOKENIZED_COLUMNS,
    cached_columns,
    hash_model,
    map_train_and_eval,
    precompute_in_shards,
    reference_logp_lists,
    reference_weight_lists,
    require_map_style,
)
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


def defer_reference_precompute(args: TIDPOConfig) -> list[str]:
    """
    `precompute_ref_log_probs=True` where some part of the step still runs the reference
    (`reference_needed_at_each_step`): TRL drops the reference of a full fine-tuning, so it is asked to build it as
    without precomputation (the flag is off until `_precompute_with_kept_reference` turns it back on and precomputes
    with the kept reference).

    Returns:
        `list[str]`: what keeps the reference; empty when nothing is deferred.
    """
    kept_for = reference_needed_at_each_step(args) if args.precompute_ref_log_probs else []
    if kept_for:
        if args.sync_ref_model:  # TRL's own check, which the switch below would skip
            raise ValueError(
                "You cannot use `sync_ref_model=True` together with `precompute_ref_log_probs=True`: the "
                "precomputed reference log-probs would go stale as the reference is updated. Set "
                "`precompute_ref_log_probs=False` or disable `sync_ref_model`."
            )
        args.precompute_ref_log_probs = False
    return kept_for


class PrecomputeMixin:
    """The dataset-wide passes of `TIDPOTrainer` (mixed into it; reads the trainer's `args`, models and accelerator)."""

    # ------------------------------------------------------------------ weight columns computed before training

    def _add_reference_weight_columns(self) -> None:
        """The reference's TI-DPO weights of every pair, computed once and cached as the two weight columns (keyed
        by the data, the reference model's hash and the weight settings)."""
        reference = self._reference_model()
        settings = (*self.args.weight_options().values(), self.args.max_length, self.args.truncation_mode)
        key = (hash_model(reference), settings, "tidpo-reference-weights")

        def attribute(input_ids, attention_mask):
            model = self._precompute_model(reference)
            return attribute_rows(model, input_ids, attention_mask, self._contexts.reference_attribution)

        def add_columns(dataset: Dataset, name: str) -> Dataset:
            require_map_style(
                dataset,
                name,
                "`importance_model='reference'` with `precompute_token_weights=True`",
                "set `precompute_token_weights=False`.",
            )

            def compute() -> dict:
                columns, fallback_rows = reference_weight_lists(
                    dataset,
                    accelerator=self.accelerator,
                    collator=self._collator(),
                    batch_size=self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size,
                    attribute=attribute,
                    weigh=self.compute_token_weights,
                    truncation_mode=self.args.truncation_mode,
                    name=name,
                )
                if fallback_rows:
                    logger.warning(
                        f"{fallback_rows} row(s) of the {name} dataset had a reference attribution that sums to 0 or "
                        "is not finite and use the Gaussian prior alone."
                    )
                return columns

            return cached_columns(self.accelerator, dataset, name, key, compute)

        self.train_dataset, self.eval_dataset = map_train_and_eval(add_columns, self.train_dataset, self.eval_dataset)

    def _add_tis_dpo_weight_columns(self, positive, negative) -> None:
        """
        TIS-DPO (SPEC §7) or cDPO (SPEC §8), per `token_weighting`: add the weight columns to the train and eval
        datasets (one pass of π+ and π− over each, cached), then drop the contrastive models so that training runs
        exactly like `token_weighting="dataset"`.
        """
        args = self.args
        uses_reference = positive is None  # prompt-based variant on the frozen reference
        init_kwargs = {"trust_remote_code": args.trust_remote_code, **(args.model_init_kwargs or {})}
        positive = (
            self._reference_model()
            if uses_reference
            else load_contrastive_model(positive, init_kwargs, self.model.dtype, self.accelerator.device)
        )
        negative = (
            positive
            if negative is None
            else load_contrastive_model(negative, init_kwargs, self.model.dtype, self.accelerator.device)
        )
        context = self._contexts.reference_adapters if uses_reference else contextlib.nullcontext
        model_hash = (hash_model(positive), hash_model(negative) if negative is not positive else None)
        same_model = negative is positive
        positive = self._precompute_model(positive)
        negative = positive if same_model else self._precompute_model(negative)
        models = {"positive": positive, "negative": negative}  # emptied below, which frees the models
        del positive, negative
        columns = list(TOKENIZED_COLUMNS)
        if args.tis_system_prompts is not None:  # the contexts are re-rendered from the messages
            columns += ["prompt", "chosen", "rejected"]
        cdpo = args.token_weighting == "cdpo"
        method = "cDPO" if cdpo else "TIS-DPO"
        options = (args.cdpo_beta, args.cdpo_only_negative) if cdpo else (list(args.tis_clamp), args.tis_transform)
        weight_lists = cdpo_weight_lists if cdpo else tis_dpo_weight_lists
        settings = (
            args.tis_system_prompts, *options, args.max_length, args.truncation_mode, self._tokenizer.eos_token_id,
            self._tokenizer.chat_template,
        )  # fmt: skip

        def add_columns(dataset: Dataset, name: str) -> Dataset:
            require_map_style(
                dataset,
                name,
                f"`token_weighting={args.token_weighting!r}` computes the weights over the whole dataset before "
                "training and",
                f"compute the columns with `trl_tidpo.compute_{args.token_weighting}_weight_columns` and train with "
                "`token_weighting='dataset'`.",
            )
            tag = "cdpo-weights" if cdpo else "tis-dpo-weights"
            key = (columns_fingerprint(dataset, columns), model_hash, settings, tag)

            def weigh(rows: Dataset) -> dict:
                scoring = ContrastiveScoring(args.tis_system_prompts, args.max_length, args.truncation_mode, len(rows))
                return weight_lists(rows, models["positive"], models["negative"], self._tokenizer, scoring, *options)

            def compute() -> dict:
                with context():
                    return precompute_in_shards(
                        self.accelerator,
                        dataset,
                        batch_size=args.precompute_ref_batch_size or args.per_device_train_batch_size,
                        compute=weigh,
                        desc=f"Computing {method} token weights for {name} dataset",
                    )

            return cached_columns(self.accelerator, dataset, name, key, compute)

        self.train_dataset, self.eval_dataset = map_train_and_eval(add_columns, self.train_dataset, self.eval_dataset)
        models.clear()
        gc.collect()
        clear_device_cache()

    # ------------------------------------------------------------------ DeepSpeed before training

    def _precompute_model(self, model):
        """
        `model` ready for a pass before training (cached reference weights, TIS-DPO weights). Under DeepSpeed the
        policy is neither on its device (ZeRO-1/2) nor gathered (ZeRO-3) until `train` wraps it, and so is a TIS-DPO
        model loaded here: they run inside an inference engine, the policy inside the one TRL builds for its own
        precomputation (`DPOTrainer._precompute_engine`). TRL already wrapped `ref_model`.
        """
        if not self.is_deepspeed_enabled or model is self.ref_model:
            return model
        if model is self.model:
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
                self._precompute_engines.append(self._precompute_engine)
            return self._precompute_engine
        engine = prepare_deepspeed(model, self.accelerator)
        self._precompute_engines.append(engine)
        return engine

    def _release_precompute_engines(self) -> None:
        """
        Remove the module hooks of the engines `_precompute_model` built. Under ZeRO-3 the policy's engine would
        otherwise keep gathering and tracing the policy's modules beside the training engine, which breaks ZeRO-3's
        parameter trace at the second step ("pop from an empty deque").
        """
        for engine in self._precompute_engines:
            engine.destroy()
        self._precompute_engines = []
        self._precompute_engine = None

    # ------------------------------------------------------------------ reference log-probs computed before training

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """
        TRL's hook for `precompute_ref_log_probs=True`, called as TRL calls it (at construction for the train and eval
        datasets, and by `evaluate` for a dataset passed to it): the reference's *per-token* log-probs of each
        completion (and of each dataset anchor) as dataset columns, where TRL stores their sums. Cached like the
        reference weights, keyed by the tokenised columns, the reference's hash and the settings that change them.
        """
        if isinstance(dataset, IterableDataset):  # TRL's error
            raise ValueError(
                "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
                "Dataset or set `precompute_ref_log_probs=False`."
            )
        args = self.args
        reference = self._reference_model()
        if self.ref_model is None and self.is_deepspeed_enabled:
            # as TRL: before `train` the parameters are still on CPU (ZeRO-1/2) or sharded (ZeRO-3); one inference
            # engine places and gathers them, reused by every precompute pass
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            reference = self._precompute_engine
        with_anchors = self._uses_anchors and args.anchor_source == "dataset"
        columns = [*TOKENIZED_COLUMNS, "anchor_ids"] if with_anchors else TOKENIZED_COLUMNS
        settings = (args.max_length, args.truncation_mode, self.accelerator.mixed_precision, with_anchors)
        key = (self._precompute_model_hash, settings, "tidpo-reference-token-logps")

        def score_pairs(batch: PairBatch) -> torch.Tensor:
            with self.accelerator.autocast():  # as TRL's `compute_ref_log_probs`
                return reference_pair_forward(
                    reference,
                    batch,
                    attribute=False,
                    keep_hidden=False,
                    reference_mode=self._contexts.reference_scoring,
                    attribution_context=self._contexts.reference_attribution,
                ).per_token_logps

        def score_anchors(anchors: AnchorBatch) -> torch.Tensor:
            with self.accelerator.autocast():
                return anchor_forward(reference, anchors, self._contexts.reference_scoring).per_token_logps

        def compute() -> dict:
            return reference_logp_lists(
                dataset,
                accelerator=self.accelerator,
                collator=self._collator(),
                batch_size=batch_size,
                score_pairs=score_pairs,
                score_anchors=score_anchors if with_anchors else None,
                truncation_mode=args.truncation_mode,
                name=name,
            )

        return cached_columns(
            self.accelerator, dataset, name, key, compute, what="reference log probs", columns=columns
        )

    def _precompute_with_kept_reference(self, kept_for: list[str]) -> None:
        """`precompute_ref_log_probs=True` where some part of the step still runs the reference (kept in memory; see
        `defer_reference_precompute`)."""
        self.args.precompute_ref_log_probs = True
        logger.warning(
            f"`precompute_ref_log_probs=True`: the reference's per-token log-probs of the completions are precomputed, "
            f"but {' and '.join(kept_for)} run the reference at every step, so it stays in memory during training."
        )
        self.precompute_ref_logps = True
        self._precompute_model_hash = hash_model(self._reference_model())
        train_batch = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        eval_batch = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size

        def add_columns(dataset: Dataset, name: str) -> Dataset:
            return self._precompute_ref_logps(dataset, name, train_batch if name == "train" else eval_batch)

        self.train_dataset, self.eval_dataset = map_train_and_eval(add_columns, self.train_dataset, self.eval_dataset)
