import contextlib
import gc
import os
import shutil
import textwrap
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, is_peft_model
from accelerate.utils.memory import clear_device_cache
from datasets import Dataset, IterableDataset, concatenate_datasets
from datasets.fingerprint import Hasher, get_temporary_cache_files_directory, is_caching_enabled
from trl import DPOTrainer
from trl.models import unwrap_model_for_generation
from trl.models.utils import disable_gradient_checkpointing
from torch.utils.data import DataLoader
from trl.trainer.utils import create_model_from_path, hash_module, use_adapter

from .anchors import DataCollatorForTIDPO, sample_policy_anchors, tokenize_anchor
from .attribution import (
    attribution_target,
    capture_activations,
    causal_lm_of,
    embedding_attribution,
    project_to_logits,
    uses_reentrant_checkpointing,
)
from .importance import hybrid_token_weights
from .sequential_kl import sequential_kl
from .tidpo_config import TIDPOConfig
from .tis_dpo import columns_fingerprint, tis_dpo_weight_lists
from .triplet import triplet_distances, triplet_loss
from .weight_columns import WEIGHT_COLUMNS, validate_token_weight_columns, weights_to_lists
from .weighted_dpo import token_weighted_dpo_losses, weighted_sequence_logps


logger = get_logger(__name__)

_ANCHOR_KEYS = ("anchor_input_ids", "anchor_attention_mask", "anchor_completion_mask")


class TIDPOTrainer(DPOTrainer):
    """
    Trainer for TI-DPO, Token-Importance Guided Direct Preference Optimization (Yang et al., ICLR 2026), a drop-in
    replacement for [`~trl.DPOTrainer`]: same constructor, same datasets, same metrics, plus token weights and a
    triplet loss.

    Each step, per-token weights are computed from the current policy (gradient attribution of the final-position
    logit w.r.t. the input-embedding activations, mixed with a Gaussian positional prior), the DPO margin becomes the
    token-weighted sum of per-token log-ratios, and a triplet loss pulls a policy-sampled anchor's per-token
    log-ratios toward the chosen response and away from the rejected one. `rewards/*` metrics are β times the
    *weighted* log-ratios.

    Extension points (the legacy `DPOTrainer` methods that TRL 0.29 removed, restored here):

    - `concatenated_forward(model, inputs, is_ref_model=False) -> dict`: one forward over chosen, rejected (and anchor)
      rows; per-token log-probs, masks and, for the policy, the raw token importance from the embedding gradients.
    - `compute_token_weights(policy_output) -> (weights, fallback_rows)`: the hybrid weights, detached.
    - `dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type=None,
      model_output=None) -> (losses, chosen_rewards, rejected_rewards)`: the token-weighted DPO loss, with the
      sequential KL and the triplet loss injected from `model_output`.
    - `get_batch_loss_metrics(model, batch, train_eval="train") -> (loss, metrics)`: orchestrates the above.

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
        self._check_dataset_columns(args, train_dataset, eval_dataset)
        self._check_tis_models(args, tis_positive_model, tis_negative_model)

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
        if self._is_vision_dataset:
            raise ValueError("TIDPOTrainer supports text-only preference data; this dataset has images.")
        if data_collator is None:
            self.data_collator = DataCollatorForTIDPO(
                pad_token_id=self._tokenizer.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
                return_prompts=self._uses_policy_anchors,
            )
        self._fallback_rows_seen = 0
        self._warned_separate_attribution_pass = False
        if self._precomputes_reference_weights:
            self.train_dataset = self._precompute_token_weights(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._precompute_token_weights(v, k) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._precompute_token_weights(self.eval_dataset, "eval")
        if args.token_weighting == "tis_dpo":
            self._add_tis_dpo_weights(tis_positive_model, tis_negative_model)

    # ------------------------------------------------------------------ configuration and data

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
        """Which forward computes raw importance each step: "policy", "reference", or None (weights from the batch)."""
        if self.args.token_weighting != "ti_dpo" or self._precomputes_reference_weights:
            return None
        return self.args.importance_model

    @staticmethod
    def _check_dataset_columns(args: TIDPOConfig, train_dataset, eval_dataset) -> None:
        """Fail at construction on a dataset that cannot train: missing columns, or no rows."""
        datasets = {"train_dataset": train_dataset}
        if isinstance(eval_dataset, dict):
            datasets.update({f"eval_dataset[{key!r}]": ds for key, ds in eval_dataset.items()})
        elif eval_dataset is not None:
            datasets["eval_dataset"] = eval_dataset
        for name, dataset in datasets.items():
            if dataset is None:
                continue
            if isinstance(dataset, Dataset) and len(dataset) == 0:
                raise ValueError(f"`{name}` is empty: TIDPOTrainer needs at least one preference pair.")
            columns = dataset.column_names or list(next(iter(dataset)).keys())
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
                required = []  # already tokenised
            else:
                required = ["chosen", "rejected"]
            if args.triplet_gamma > 0 and args.anchor_source == "dataset" and "anchor_ids" not in columns:
                required.append("anchor")
            if args.token_weighting == "dataset":
                required.extend(WEIGHT_COLUMNS)
            if args.token_weighting == "tis_dpo" and set(WEIGHT_COLUMNS) & set(columns):
                raise ValueError(
                    f"`{name}` already has token weight columns, which `token_weighting='tis_dpo'` computes itself. "
                    "Use `token_weighting='dataset'` to train on them, or remove them to recompute."
                )
            missing = [column for column in required if column not in columns]
            if missing:
                hint = (
                    " The 'anchor' column is required by `anchor_source='dataset'` (with `triplet_gamma > 0`); use "
                    "`anchor_source='policy'` to sample anchors instead, or `triplet_gamma=0` to disable the triplet loss."
                    if "anchor" in missing
                    else " `token_weighting='dataset'` reads one weight per completion token from these columns."
                    if set(WEIGHT_COLUMNS) & set(missing)
                    else " A preference dataset needs 'chosen' and 'rejected' (and optionally 'prompt')."
                )
                raise ValueError(f"`{name}` is missing column(s) {missing}; it has {columns}.{hint}")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        implicit_prompt = "prompt" not in next(iter(dataset))
        num_rows = len(dataset) if isinstance(dataset, Dataset) else None
        # TRL 1.16 always re-tokenises from the text columns, which an already tokenised dataset may not have
        if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(next(iter(dataset))):
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if num_rows is not None and len(dataset) < num_rows:
            # TRL drops them silently; they would train on nothing, so say it before anything is written
            raise ValueError(
                f"{num_rows - len(dataset)} of the {num_rows} pairs of the {dataset_name} dataset have a prompt of "
                f"`max_length={args.max_length}` tokens or more, so `truncation_mode='keep_start'` leaves their "
                "completions empty. Raise `max_length`, shorten or filter those prompts, or set "
                "`truncation_mode='keep_end'`."
            )
        needs_anchor_ids = args.triplet_gamma > 0 and args.anchor_source == "dataset"
        if needs_anchor_ids and "anchor_ids" not in next(iter(dataset)):
            map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
            dataset = dataset.map(
                tokenize_anchor,
                fn_kwargs={"processing_class": processing_class, "implicit_prompt": implicit_prompt},
                **map_kwargs,
            )
        if args.token_weighting == "dataset" and isinstance(dataset, Dataset):
            validate_token_weight_columns(dataset, dataset_name)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in ("anchor_ids", *WEIGHT_COLUMNS):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _cached_weight_columns(self, dataset: Dataset, name: str, key, compute) -> Dataset:
        """
        `dataset` plus its `chosen_token_weights`/`rejected_token_weights` columns, read from an Arrow cache file or
        computed by `compute()` (a dict of the two lists) and written there by the main process.

        The file is keyed by the contents of the tokenised columns and `key` (models, settings), not by
        `dataset._fingerprint`, which after TRL's preparation hashes the whole training config. Its path is
        deterministic (TRL's `_get_cache_file_path` draws a random one for in-memory datasets) and every rank takes the
        same branch, so later runs and other processes reuse it.
        """
        fingerprint = [Hasher.hash((columns_fingerprint(dataset, ["prompt_ids", "chosen_ids", "rejected_ids"]), key))]
        broadcast_object_list(fingerprint, from_process=0)  # one cache file for all ranks
        directory = (
            os.path.dirname(dataset.cache_files[0]["filename"])
            if is_caching_enabled() and dataset.cache_files
            else get_temporary_cache_files_directory()
        )
        cache_file = os.path.join(directory, f"cache-{fingerprint[0]}.arrow")
        self.accelerator.wait_for_everyone()  # every rank takes the same branch below
        if os.path.exists(cache_file):
            weights = Dataset.from_file(cache_file)
        else:
            weights = Dataset.from_dict(compute())
            if self.accelerator.is_main_process:
                weights = weights.map(
                    new_fingerprint=fingerprint[0], cache_file_name=cache_file, desc=f"Caching token weights of {name}"
                )
        return concatenate_datasets([dataset, weights], axis=1)

    def _precompute_token_weights(self, dataset: Dataset, name: str) -> Dataset:
        """
        Reference-side TI-DPO weights for every pair of `dataset`, computed once before training and cached as the
        `chosen_token_weights`/`rejected_token_weights` columns (keyed by the data, the reference model's hash and
        the weight settings).
        """
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`importance_model='reference'` with `precompute_token_weights=True` needs a map-style `Dataset`; "
                "set `precompute_token_weights=False` for an `IterableDataset`."
            )
        reference = self._reference_model()
        settings = tuple(
            getattr(self.args, k)
            for k in (
                "importance_lambda", "prior_sigma_ratio", "weight_span", "weight_normalization", "max_length",
                "truncation_mode",
            )
        )  # fmt: skip
        key = (hash_module(reference), settings, "tidpo-reference-weights")
        return self._cached_weight_columns(
            dataset, name, key, lambda: self._reference_weight_lists(dataset, name, reference)
        )

    def _reference_weight_lists(self, dataset: Dataset, name: str, reference) -> dict[str, list[list[float]]]:
        """The reference's hybrid weights of every pair, as the two weight columns (one list per row)."""
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        collator = DataCollatorForTIDPO(
            pad_token_id=self._tokenizer.pad_token_id,
            max_length=self.args.max_length,
            truncation_mode=self.args.truncation_mode,
        )
        columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
        loader = DataLoader(dataset.select_columns(columns), batch_size=batch_size, collate_fn=collator, shuffle=False)
        chosen, rejected, fallback_rows = [], [], 0
        device = self.accelerator.device
        for start, batch in zip(range(0, len(dataset), batch_size), loader, strict=True):
            batch = {k: v.to(device) for k, v in batch.items()}
            forward_output = {
                "num_pair_rows": batch["input_ids"].size(0),
                "completion_mask": batch["completion_mask"][:, 1:],
                "attention_mask": batch["attention_mask"],
            }
            with self._reference_context():
                forward_output["raw_importance"] = self._attribution_pass(
                    reference, batch["input_ids"], batch["attention_mask"]
                )
            weights, fallback = self._hybrid_weights(forward_output)
            fallback_rows += int(fallback.sum())
            full = F.pad(weights, (1, 0), value=0.0)  # back to the unshifted axis of `input_ids`
            rows = dataset[start : start + batch_size]
            lengths = [len(ids) for ids in rows["chosen_ids"]] + [len(ids) for ids in rows["rejected_ids"]]
            lists = weights_to_lists(full, batch["completion_mask"], lengths, self.args.truncation_mode)
            b = len(rows["chosen_ids"])
            chosen.extend(lists[:b])
            rejected.extend(lists[b:])
        if fallback_rows:
            logger.warning(
                f"{fallback_rows} row(s) of the {name} dataset had a reference attribution that sums to 0 or is not "
                "finite and use the Gaussian prior alone."
            )
        return {"chosen_token_weights": chosen, "rejected_token_weights": rejected}

    # ------------------------------------------------------------------ TIS-DPO weights

    @staticmethod
    def _check_tis_models(args: TIDPOConfig, positive, negative) -> None:
        """Fail before any model loads when `token_weighting="tis_dpo"` lacks π+ or π−."""
        if args.token_weighting != "tis_dpo":
            if positive is not None or negative is not None:
                raise ValueError(
                    "`tis_positive_model`/`tis_negative_model` only apply to `token_weighting='tis_dpo'`, but "
                    f"`token_weighting` is {args.token_weighting!r}."
                )
            return
        positive = positive if positive is not None else args.tis_positive_model
        negative = negative if negative is not None else args.tis_negative_model
        if args.tis_system_prompts is None and (positive is None or negative is None):
            raise ValueError(
                "`token_weighting='tis_dpo'` needs two contrastive models: set `tis_positive_model` and "
                "`tis_negative_model` (paths in TIDPOConfig, or loaded models as TIDPOTrainer arguments), or "
                "`tis_system_prompts` for the prompt-based variant (one model under two system prompts)."
            )
        if args.tis_system_prompts is None and positive is negative:
            raise ValueError(
                "`tis_positive_model` and `tis_negative_model` are the same model and no `tis_system_prompts` tell "
                "them apart, so every TIS-DPO log-ratio would be 0."
            )

    def _load_tis_model(self, model):
        """A path/hub id is loaded like TRL loads the reference (the policy's dtype); a loaded model is used as is."""
        if not isinstance(model, str):
            return model
        init_kwargs = dict(self.args.model_init_kwargs or {})
        init_kwargs["device_map"] = None
        init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
        init_kwargs.setdefault("dtype", self.model.dtype)
        return create_model_from_path(model, **init_kwargs).to(self.accelerator.device)

    def _add_tis_dpo_weights(self, positive, negative) -> None:
        """
        TIS-DPO (SPEC §7): add the weight columns to the train and eval datasets (one pass of π+ and π− over each,
        cached), then drop the contrastive models so that training runs exactly like `token_weighting="dataset"`.
        """
        args = self.args
        positive = positive if positive is not None else args.tis_positive_model
        negative = negative if negative is not None else args.tis_negative_model
        uses_reference = positive is None  # prompt-based variant on the frozen reference
        positive = self._reference_model() if uses_reference else self._load_tis_model(positive)
        negative = positive if negative is None else self._load_tis_model(negative)
        context = self._reference_context if uses_reference else contextlib.nullcontext
        model_hash = (hash_module(positive), hash_module(negative) if negative is not positive else None)

        # A plain loop, no closure over the models, so that deleting them below frees them
        self.train_dataset = self._tis_dpo_weights(
            self.train_dataset, "train", positive, negative, context, model_hash
        )
        if isinstance(self.eval_dataset, dict):
            weighed = {}
            for name, dataset in self.eval_dataset.items():
                weighed[name] = self._tis_dpo_weights(dataset, name, positive, negative, context, model_hash)
            self.eval_dataset = weighed
        elif self.eval_dataset is not None:
            self.eval_dataset = self._tis_dpo_weights(
                self.eval_dataset, "eval", positive, negative, context, model_hash
            )
        del positive, negative
        gc.collect()
        clear_device_cache()

    def _tis_dpo_weights(self, dataset, name: str, positive, negative, context, model_hash) -> Dataset:
        """`dataset` plus its TIS-DPO weight columns, from the cache (keyed by data, models, settings) or computed."""
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`token_weighting='tis_dpo'` computes the weights over the whole dataset before training and needs a "
                "map-style `Dataset`. For an `IterableDataset`, compute the columns with "
                "`trl_tidpo.tis_dpo.compute_tis_dpo_weight_columns` and train with `token_weighting='dataset'`."
            )
        args = self.args
        columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
        if args.tis_system_prompts is not None:  # the contexts are re-rendered from the messages
            columns += ["prompt", "chosen", "rejected"]
        settings = (
            args.tis_system_prompts, list(args.tis_clamp), args.tis_transform, args.max_length, args.truncation_mode,
            self._tokenizer.eos_token_id, self._tokenizer.chat_template,
        )  # fmt: skip
        key = (columns_fingerprint(dataset, columns), model_hash, settings, "tis-dpo-weights")

        def compute() -> dict:
            logger.info(f"Computing TIS-DPO token weights of the {name} dataset ({len(dataset)} pairs).")
            with context():
                return tis_dpo_weight_lists(
                    dataset,
                    positive,
                    negative,
                    self._tokenizer,
                    system_prompts=args.tis_system_prompts,
                    clamp=args.tis_clamp,
                    transform=args.tis_transform,
                    max_length=args.max_length,
                    truncation_mode=args.truncation_mode,
                    batch_size=args.precompute_ref_batch_size or args.per_device_train_batch_size,
                )

        return self._cached_weight_columns(dataset, name, key, compute)

    # ------------------------------------------------------------------ forward passes

    def _forward_with_anchors(self, model, inputs: dict[str, torch.Tensor], is_ref_model: bool) -> dict:
        """
        `concatenated_forward` of the chosen/rejected rows, then the anchor rows scored in a forward of their own and
        appended, every per-row tensor right-padded to the wider of the two.

        Not one stacked forward: there the anchors would be padded to the pairs' width and carried through the
        attribution backward, which only the chosen/rejected rows need (full TI-DPO with dataset anchors: 1.83x DPO's
        FLOPs stacked, 1.5x apart; docs/benchmarks.md, "Step cost").
        """
        pairs = {k: v for k, v in inputs.items() if k not in _ANCHOR_KEYS}
        output = self.concatenated_forward(model, pairs, is_ref_model=is_ref_model)
        input_ids, attention_mask, completion_mask = (inputs[key] for key in _ANCHOR_KEYS)
        model_kwargs = self._scoring_kwargs(input_ids, attention_mask, completion_mask)
        with self._reference_mode() if is_ref_model else contextlib.nullcontext():
            outputs = model(**model_kwargs)
        seq_len = input_ids.size(1) - 1
        anchor = {"completion_mask": completion_mask[:, 1:], "attention_mask": attention_mask}
        for key, name in (("per_token_logps", "log_probs"), ("entropy", "entropy"), ("mean_logits", "mean_logits")):
            if output.get(key) is not None:
                anchor[key] = getattr(outputs, name)[:, -seq_len:]  # real tokens only (prompt-learning PEFT)
        if output.get("is_top1") is not None:
            anchor["is_top1"] = outputs.is_top1[:, -seq_len:]
        width = max(output["attention_mask"].size(1), attention_mask.size(1))
        for key, value in anchor.items():
            axis_width = width if key == "attention_mask" else width - 1
            output[key] = torch.cat([F.pad(t, (0, axis_width - t.size(1))) for t in (output[key], value)])
        for key in ("raw_importance", "last_hidden"):  # chosen/rejected rows only, widened to the common axis
            value = output.get(key)
            if value is not None and value.size(1) < width:
                padding = (0, 0, 0, width - value.size(1)) if value.dim() == 3 else (0, width - value.size(1))
                output[key] = F.pad(value, padding)
        return output

    @staticmethod
    def _scoring_kwargs(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
    ) -> dict[str, Any]:
        """Model kwargs that score the completion tokens of right-padded rows with TRL's fused LM head."""
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(completion_mask == 0, -100),
            "fused_lm_head": True,
            "use_cache": False,
        }

    def _needs_separate_attribution_pass(self, model) -> bool:
        """Reentrant checkpointing cannot serve `autograd.grad` w.r.t. activations: attribute in a pass of its own."""
        return uses_reentrant_checkpointing(model)

    def _attribution_pass(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw importance `[R, T]` from a forward of its own, without gradient checkpointing."""
        if self._needs_separate_attribution_pass(self.model) and not self._warned_separate_attribution_pass:
            logger.warning(
                "Reentrant gradient checkpointing is on (`use_reentrant=True`), which cannot give gradients w.r.t. "
                "activations; token importance is computed in a separate forward without checkpointing (exact, but "
                "one extra forward per step). Use `gradient_checkpointing_kwargs={'use_reentrant': False}` to avoid it."
            )
            self._warned_separate_attribution_pass = True
        lm = causal_lm_of(model)
        labels = torch.full_like(input_ids, -100)  # no token is scored: only the backbone's activations are needed
        with (
            torch.enable_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            capture_activations(model) as captured,
        ):
            model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, use_cache=False)
            target = attribution_target(captured.last_hidden, attention_mask, lm.get_output_embeddings(), lm.config)
            raw = embedding_attribution(target, captured.embeddings, retain_graph=False)
        return raw[:, -input_ids.size(1) :].detach()

    def concatenated_forward(self, model, inputs: dict[str, torch.Tensor], is_ref_model: bool = False) -> dict:
        """
        One forward of `model` over the chosen and rejected rows of `inputs`, and one over the anchor rows if present
        (see `_forward_with_anchors`; the anchors' rows follow the pairs' in every per-row output).

        For the policy with `token_weighting="ti_dpo"`, the same forward also yields the raw token importance: the
        embedding activations are captured by a hook, the attribution target is projected from the last hidden state
        of each chosen/rejected row, and one activation-only `autograd.grad` (graph retained for the loss) gives
        `I[r, j]`. During evaluation (under `no_grad`) grad is re-enabled for this and everything is detached after.

        Args:
            model: the policy, or the reference when `is_ref_model=True`. With `is_ref_model=True`, pass
                `self.ref_model`, or the policy itself under PEFT (the adapter is disabled here).
            inputs (`dict`): a collated batch (`input_ids`, `attention_mask`, `completion_mask` `[2B, T]`, optional
                `anchor_*` `[B, T_a]`).
            is_ref_model (`bool`): run as the frozen reference (no grad, adapter disabled, no importance).

        Returns:
            `dict` with `per_token_logps` `[R, T-1]` (entry `i` scores token `i+1`), `completion_mask` `[R, T-1]`
            (shifted), `attention_mask` `[R, T]`, `num_pair_rows` (`2B`), `chosen_logps`/`rejected_logps` `[B]`
            (unweighted sums), `last_hidden` `[2B, T, H]` when `tdpo_alpha > 0`, and for the policy `raw_importance`
            `[2B, T]` float32 (or None), `entropy`, `mean_logits`, `is_top1` `[R, T-1]` and `aux_loss` (of the
            chosen/rejected rows). With anchors, `T` is the wider of the pairs' and the anchors' widths.
        """
        if "anchor_input_ids" in inputs:
            return self._forward_with_anchors(model, inputs, is_ref_model)
        input_ids, attention_mask, completion_mask = (
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["completion_mask"],
        )
        num_pair_rows = input_ids.size(0)
        model_kwargs = self._scoring_kwargs(input_ids, attention_mask, completion_mask)
        keep_hidden = self.args.tdpo_alpha > 0
        if is_ref_model:
            output = self._reference_forward(model, model_kwargs, keep_hidden, num_pair_rows)
        else:
            output = self._policy_forward(model, model_kwargs, num_pair_rows, keep_hidden)
        seq_len = completion_mask.size(1) - 1
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
        for key in ("per_token_logps", "entropy", "mean_logits", "is_top1"):
            if output.get(key) is not None:
                output[key] = output[key][:, -seq_len:]
        if output.get("last_hidden") is not None:
            output["last_hidden"] = output["last_hidden"][:, -input_ids.size(1) :]
        shift_mask = completion_mask[:, 1:]
        sums = (output["per_token_logps"][:num_pair_rows] * shift_mask[:num_pair_rows]).sum(dim=-1)
        output["chosen_logps"], output["rejected_logps"] = sums.chunk(2)
        output.update(completion_mask=shift_mask, attention_mask=attention_mask, num_pair_rows=num_pair_rows)
        return output

    def _policy_forward(self, model, model_kwargs: dict, num_pair_rows: int, keep_hidden: bool) -> dict:
        grad_was_enabled = torch.is_grad_enabled()
        needs_importance = self._attribution_source() == "policy"
        fused_attribution = needs_importance and not self._needs_separate_attribution_pass(model)
        if self.aux_loss_enabled:
            model_kwargs = {**model_kwargs, "output_router_logits": True}
        lm = causal_lm_of(model)
        raw_importance = None
        with (
            torch.enable_grad() if fused_attribution else contextlib.nullcontext(),
            capture_activations(model, embeddings=fused_attribution, last_hidden=fused_attribution or keep_hidden)
            as captured,
        ):
            outputs = model(**model_kwargs)
            if fused_attribution:
                pair_mask = model_kwargs["attention_mask"][:num_pair_rows]
                target = attribution_target(
                    captured.last_hidden[:num_pair_rows, -pair_mask.size(1) :],
                    pair_mask,
                    lm.get_output_embeddings(),
                    lm.config,
                )
                raw = embedding_attribution(target, captured.embeddings, retain_graph=grad_was_enabled)
                raw_importance = raw[:num_pair_rows, -pair_mask.size(1) :]
        if needs_importance and not fused_attribution:
            raw_importance = self._attribution_pass(
                model, model_kwargs["input_ids"][:num_pair_rows], model_kwargs["attention_mask"][:num_pair_rows]
            )
        output = {
            "per_token_logps": outputs.log_probs,
            "entropy": outputs.entropy,
            "mean_logits": outputs.mean_logits,
            "is_top1": outputs.is_top1,
            "aux_loss": outputs.aux_loss,
            "raw_importance": raw_importance,
            "last_hidden": captured.last_hidden if keep_hidden else None,
        }
        if not grad_was_enabled:  # evaluation: grad was on for attribution only
            output = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in output.items()}
        return output

    def _reference_context(self):
        """Under PEFT without a `ref_model`: disabled adapters (new adapter) or the frozen "ref" copy (re-trained)."""
        if self.ref_model is None and is_peft_model(self.accelerator.unwrap_model(self.model)):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _reference_mode(self):
        """How every reference forward runs: no grad, no checkpointing, and the reference adapter state under PEFT."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_context(),
        ):
            yield

    def _reference_forward(self, model, model_kwargs: dict, keep_hidden: bool, num_pair_rows: int) -> dict:
        with (
            self._reference_mode(),
            capture_activations(model, embeddings=False, last_hidden=keep_hidden) as captured,
        ):
            outputs = model(**model_kwargs)
        output = {"per_token_logps": outputs.log_probs, "last_hidden": captured.last_hidden if keep_hidden else None}
        if self._attribution_source() == "reference":
            with self._reference_context():
                output["raw_importance"] = self._attribution_pass(
                    model, model_kwargs["input_ids"][:num_pair_rows], model_kwargs["attention_mask"][:num_pair_rows]
                )
        return output

    def _reference_model(self):
        return self.ref_model if self.ref_model is not None else self.model

    # ------------------------------------------------------------------ weights, anchors, KL

    def compute_token_weights(
        self, forward_output: dict, inputs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Token weights of the chosen and rejected rows on the shifted token axis (entry `i` weighs token `i+1`).

        Args:
            forward_output (`dict`): the `concatenated_forward` output that carries `raw_importance` (the policy's,
                or the reference's with `importance_model="reference"` and no precomputation).
            inputs (`dict`, *optional*): the batch; its `token_weights` `[2B, T]` are used with
                `token_weighting="dataset"` and with precomputed reference weights.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: detached float32 weights `[2B, T-1]` (0 off the completion), and a
            `[2B]` bool tensor of rows whose attribution could not be normalised and fell back to the prior alone.
        """
        n = forward_output["num_pair_rows"]
        completion = forward_output["completion_mask"][:n]
        no_fallback = torch.zeros(n, dtype=torch.bool, device=completion.device)
        if self.args.token_weighting == "uniform":
            return completion.float(), no_fallback
        if self._attribution_source() is None:  # dataset weights, or cached reference weights
            if inputs is None or "token_weights" not in inputs:
                raise ValueError(
                    "This configuration reads token weights from the batch (`token_weights`), which is missing: the "
                    "default collator builds it from the 'chosen_token_weights'/'rejected_token_weights' columns."
                )
            weights = inputs["token_weights"][:n, 1:].float()
            weights = F.pad(weights, (0, completion.size(1) - weights.size(1)))  # anchor rows may widen the batch
            return weights * completion, no_fallback
        return self._hybrid_weights(forward_output)

    def _hybrid_weights(self, forward_output: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Hybrid weights `[2B, T-1]` (shifted axis) and fallback rows `[2B]` from `forward_output["raw_importance"]`."""
        n = forward_output["num_pair_rows"]
        completion = forward_output["completion_mask"][:n]
        if self.args.weight_span == "completion":
            # Completion tokens that are scored (position 0 never is), on the unshifted axis of the importance
            span = F.pad(completion, (1, 0), value=0)
        else:
            span = forward_output["attention_mask"][:n]
        weights, fallback = hybrid_token_weights(
            forward_output["raw_importance"],
            span,
            self.args.importance_lambda,
            self.args.prior_sigma_ratio,
            self.args.weight_normalization,
        )
        return weights[:, 1:] * completion, fallback

    def _anchor_generation_kwargs(self) -> dict:
        return {
            "do_sample": True,
            "max_new_tokens": self.args.anchor_max_new_tokens,
            "temperature": self.args.anchor_temperature,
            "top_k": self.args.anchor_top_k or None,
            "top_p": self.args.anchor_top_p,
        }

    def _add_policy_anchors(self, model, inputs: dict) -> dict:
        """Sample an anchor per prompt from the current policy (no grad, KV cache) and add its rows to `inputs`."""
        if "prompt_input_ids" not in inputs:
            raise ValueError(
                "`anchor_source='policy'` needs `prompt_input_ids` and `prompt_attention_mask` in each batch. The "
                "default collator provides them; a custom `data_collator` must too (see `DataCollatorForTIDPO`)."
            )
        with unwrap_model_for_generation(
            model, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
        ) as unwrapped:
            anchors = sample_policy_anchors(
                unwrapped,
                inputs["prompt_input_ids"],
                inputs["prompt_attention_mask"],
                self._anchor_generation_kwargs(),
                eos_token_id=self._tokenizer.eos_token_id,
                pad_token_id=self._tokenizer.pad_token_id,
                max_length=self.args.max_length,
                truncation_mode=self.args.truncation_mode,
            )
        return {**inputs, **anchors}

    def _sequential_kl(self, model, policy_output: dict, ref_output: dict) -> torch.Tensor:
        """TDPO's sequential KL `[2B]` of the chosen and rejected rows, in chunks of positions."""
        n = policy_output["num_pair_rows"]
        policy_lm = causal_lm_of(model)
        ref_lm = causal_lm_of(self._reference_model())
        return sequential_kl(
            policy_output["last_hidden"][:n],
            ref_output["last_hidden"][:n],
            policy_output["completion_mask"][:n],
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
        model_output: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        TI-DPO's per-pair loss: the token-weighted DPO loss (Eq. 12) plus `γ` times the triplet loss (Eq. 14).

        The log-prob arguments are the *token-weighted* sequence sums `Σ_j w_j log π(y_j)` (`[B]` each), so their
        differences are the weighted log-ratios `W_c` and `W_r`; with uniform weights they are TRL's plain sums.

        Args:
            chosen_logps, rejected_logps (`torch.Tensor`): `[B]` weighted policy log-probs.
            ref_chosen_logps, ref_rejected_logps (`torch.Tensor`): `[B]` weighted reference log-probs.
            loss_type (`str`, *optional*): one loss type; by default the configured `loss_type` list combined with
                `loss_weights`.
            model_output (`dict`, *optional*): extra terms, each `[B]`: `chosen_weight_sum`/`rejected_weight_sum`
                (for `"ipo"`), `kl_chosen`/`kl_rejected` (when `tdpo_alpha > 0`), `triplet_dist_pos`/`triplet_dist_neg`
                (when `triplet_gamma > 0`).

        Returns:
            `tuple`: per-pair `losses` `[B]`, `chosen_rewards` and `rejected_rewards` `[B]` (β times the weighted
            log-ratios, detached).
        """
        model_output = model_output or {}
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        loss_terms = [(loss_type, 1.0)] if loss_type is not None else zip(self.loss_types, self.loss_weights)
        losses = 0.0
        for name, weight in loss_terms:
            losses = losses + weight * token_weighted_dpo_losses(
                chosen_logratios,
                rejected_logratios,
                self.beta,
                name,
                chosen_weight_sum=model_output.get("chosen_weight_sum"),
                rejected_weight_sum=model_output.get("rejected_weight_sum"),
                kl_chosen=model_output.get("kl_chosen"),
                kl_rejected=model_output.get("kl_rejected"),
                alpha=self.args.tdpo_alpha,
                label_smoothing=self.label_smoothing,
            )
        if "triplet_dist_pos" in model_output:
            triplet = triplet_loss(
                model_output["triplet_dist_pos"], model_output["triplet_dist_neg"], self.args.triplet_margin
            )
            losses = losses + self.args.triplet_gamma * triplet
        return losses, self.beta * chosen_logratios.detach(), self.beta * rejected_logratios.detach()

    def get_batch_loss_metrics(self, model, batch: dict, train_eval: str = "train") -> tuple[torch.Tensor, dict]:
        """
        The TI-DPO loss of one batch and its metrics (floats, already gathered across processes).

        Returns:
            `tuple[torch.Tensor, dict[str, float]]`: the scalar loss and the metrics, without the `eval_` prefix.
        """
        if self._uses_policy_anchors:
            batch = self._add_policy_anchors(model, batch)
        elif not self._uses_anchors:
            batch = {k: v for k, v in batch.items() if k not in _ANCHOR_KEYS}
        elif "anchor_input_ids" not in batch:
            raise ValueError(
                "`anchor_source='dataset'` needs `anchor_input_ids`, `anchor_attention_mask` and "
                "`anchor_completion_mask` in each batch; the default collator builds them from the 'anchor' column."
            )

        policy = self.concatenated_forward(model, batch)
        ref = self.concatenated_forward(self._reference_model(), batch, is_ref_model=True)
        n = policy["num_pair_rows"]
        mask = policy["completion_mask"]
        weight_source = ref if self._attribution_source() == "reference" else policy
        weights, fallback = self.compute_token_weights(weight_source, batch)

        weighted = weighted_sequence_logps(policy["per_token_logps"][:n], weights, mask[:n])
        ref_weighted = weighted_sequence_logps(ref["per_token_logps"][:n], weights, mask[:n])
        weight_sums = (weights * mask[:n]).sum(dim=-1)
        model_output = dict(zip(("chosen_weight_sum", "rejected_weight_sum"), weight_sums.chunk(2)))
        if self.args.tdpo_alpha > 0:
            model_output["kl_chosen"], model_output["kl_rejected"] = self._sequential_kl(model, policy, ref).chunk(2)
        if self._uses_anchors:
            logratios = policy["per_token_logps"] - ref["per_token_logps"].detach()
            b = n // 2
            dist_pos, dist_neg = triplet_distances(
                logratios[n:], mask[n:], logratios[:b], mask[:b], logratios[b:n], mask[b:n]
            )
            model_output.update(triplet_dist_pos=dist_pos, triplet_dist_neg=dist_neg)

        losses, chosen_rewards, rejected_rewards = self.dpo_loss(
            *weighted.chunk(2), *ref_weighted.chunk(2), model_output=model_output
        )
        loss = losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * policy["aux_loss"]

        metrics = self._dpo_metrics(policy, chosen_rewards, rejected_rewards)
        metrics.update(self._tidpo_metrics(weights, mask[:n], fallback, model_output, mask[n:], train_eval))
        if self.aux_loss_enabled:
            metrics["aux_loss"] = self._gather_mean(policy["aux_loss"])
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

    # ------------------------------------------------------------------ metrics

    def _gather_mean(self, tensor: torch.Tensor) -> float:
        return self.accelerator.gather(tensor.detach().float().reshape(-1)).mean().item()

    def _gather_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather_for_metrics(tensor.detach().float().reshape(1)).sum()

    def _dpo_metrics(self, policy: dict, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
        """TRL's DPO metrics, computed as `DPOTrainer` does, on the chosen and rejected rows."""
        n = policy["num_pair_rows"]
        chosen_mask, rejected_mask = policy["completion_mask"][:n].bool().chunk(2)
        pair_mask = policy["completion_mask"][:n].bool()

        def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
            num, den = self._gather_sum(numerator), self._gather_sum(denominator)
            return (num / den).item() if den > 0 else 0.0

        chosen_logits, rejected_logits = policy["mean_logits"][:n].chunk(2)
        chosen_top1, _ = policy["is_top1"][:n].chunk(2)
        return {
            "entropy": ratio(policy["entropy"][:n][pair_mask].sum(), pair_mask.sum()),
            "logits/chosen": ratio(chosen_logits[chosen_mask].sum(), chosen_mask.sum()),
            "logits/rejected": ratio(rejected_logits[rejected_mask].sum(), rejected_mask.sum()),
            "mean_token_accuracy": ratio((chosen_top1 & chosen_mask).sum(), chosen_mask.sum()),
            "rewards/chosen": self._gather_mean(chosen_rewards),
            "rewards/rejected": self._gather_mean(rejected_rewards),
            "rewards/accuracies": self._gather_mean((chosen_rewards > rejected_rewards).float()),
            "rewards/margins": self._gather_mean(chosen_rewards - rejected_rewards),
            "logps/chosen": self._gather_mean(policy["chosen_logps"]),
            "logps/rejected": self._gather_mean(policy["rejected_logps"]),
        }

    def _tidpo_metrics(
        self,
        weights: torch.Tensor,
        mask: torch.Tensor,
        fallback: torch.Tensor,
        model_output: dict,
        anchor_mask: torch.Tensor,
        mode: str,
    ) -> dict:
        """`token_weights/*`, `triplet/*` and `kl/*` metrics; warns when rows fell back to the prior."""
        on = mask.bool()
        w = weights[on]
        count = self._gather_sum(on.sum())
        total = self._gather_sum(w.sum())
        mean = total / count.clamp(min=1)
        var = self._gather_sum(((w - mean) ** 2).sum()) / (count - 1).clamp(min=1)
        share = weights * mask / (weights * mask).sum(dim=-1, keepdim=True).clamp(min=1e-12)
        row_entropy = -(share * share.clamp(min=1e-12).log()).sum(dim=-1)
        fallback_rows = int(self._gather_sum(fallback.sum()).item())
        metrics = {
            "token_weights/mean": mean.item(),
            "token_weights/std": var.sqrt().item(),
            "token_weights/max": self.accelerator.gather(w.max().reshape(1) if w.numel() else mask.new_zeros(1).float())
            .max()
            .item(),
            "token_weights/entropy": self._gather_mean(row_entropy),
            "token_weights/fallback_rows": float(fallback_rows),
        }
        if fallback_rows:
            self._fallback_rows_seen += fallback_rows
            logger.warning(
                f"{fallback_rows} row(s) in this {mode} batch had a token attribution that sums to 0 or is not finite "
                f"(e.g. an fp16 overflow) and used the Gaussian prior alone ({self._fallback_rows_seen} so far); "
                "see the `token_weights/fallback_rows` metric."
            )
        if "triplet_dist_pos" in model_output:
            dist_pos, dist_neg = model_output["triplet_dist_pos"], model_output["triplet_dist_neg"]
            metrics.update(
                {
                    "triplet/loss": self._gather_mean(triplet_loss(dist_pos, dist_neg, self.args.triplet_margin)),
                    "triplet/dist_pos": self._gather_mean(dist_pos),
                    "triplet/dist_neg": self._gather_mean(dist_neg),
                    "triplet/anchor_tokens": self._gather_mean(anchor_mask.sum(dim=-1).float()),
                }
            )
        if "kl_chosen" in model_output:
            metrics["kl/chosen"] = self._gather_mean(model_output["kl_chosen"])
            metrics["kl/rejected"] = self._gather_mean(model_output["kl_rejected"])
        return metrics
