"""
π+ and π− built from the training pairs themselves, for TIS-DPO's and cDPO's token weights, and the weight columns
they give:

- `recipe="sft"` (cDPO's): π+ is SFT (full or LoRA) on the chosen completions, π− on the rejected ones, each from the
  same start, with TRL's `SFTTrainer` on a prompt-completion dataset (loss on the completion only).
- `recipe="dpo"` (TIS-DPO's best): π+ is DPO from the start, π− reverse DPO (chosen and rejected swapped), with TRL's
  `DPOTrainer` (uniform token weights).

Cost: two extra trainings of `max_steps` steps each (as many forward/backward passes as the same steps of SFT, or of
DPO with its reference forward), then one forward of π+ and one of π− over the dataset per weighting (cDPO's default
scores only the rejected completions). See `docs/contrastive_weights.md` for measured numbers.
"""

import copy
import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass

from accelerate.utils.memory import clear_device_cache
from datasets import Dataset
from torch import nn
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from .cdpo import DEFAULT_CDPO_BETA, compute_cdpo_weight_columns
from .tis_dpo import CONTRASTIVE_WEIGHTINGS, DEFAULT_CLAMP, compute_tis_dpo_weight_columns


RECIPES = ("sft", "dpo")
WEIGHTINGS = CONTRASTIVE_WEIGHTINGS


@dataclass
class ContrastiveModels:
    """Where `train_contrastive_models` saved π+ and π− (full models, LoRA merged, with the tokenizer)."""

    positive: str
    negative: str


def _fresh_copy(model: str | nn.Module) -> nn.Module:
    """A trainable copy of the start: loaded again from a path, or deep-copied from a loaded model."""
    return AutoModelForCausalLM.from_pretrained(model) if isinstance(model, str) else copy.deepcopy(model)


def _train_one(
    model: str | nn.Module, tokenizer, dataset: Dataset, recipe: str, output_dir: str, peft_config, settings: dict
) -> str:
    """One contrastive model: `recipe` on `dataset` from a fresh copy of `model`, with the `SFTConfig` / `DPOConfig`
    arguments `settings` (all but `output_dir`); saved (LoRA merged) and freed."""
    common = {"output_dir": output_dir, **settings}
    if recipe == "sft":
        trainer = SFTTrainer(
            model=_fresh_copy(model),
            args=SFTConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    else:  # a full fine-tuning gets its reference here: TRL would reload it from the config's path
        trainer = DPOTrainer(
            model=_fresh_copy(model),
            ref_model=None if peft_config is not None else _fresh_copy(model),
            args=DPOConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if peft_config is not None:
        trained = trained.merge_and_unload()
    path = os.path.join(output_dir, "final")
    trained.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del trainer, trained
    gc.collect()
    clear_device_cache()
    return path


def train_contrastive_models(
    model: str | nn.Module,
    tokenizer,
    dataset: Dataset,
    recipe: str,
    output_dir: str,
    *,
    max_steps: int,
    learning_rate: float,
    peft_config=None,
    training_args: dict | None = None,
) -> ContrastiveModels:
    """
    Train π+ and π− from the start `model` on the preference pairs `dataset` (`prompt`/`chosen`/`rejected`, plain text
    or conversational).

    Args:
        model (`str` or `nn.Module`): the start, a path (loaded afresh for each run) or a loaded causal LM (deep-copied
            for each run; left untouched).
        tokenizer: the tokenizer the preference training will use.
        dataset (`Dataset`): the training pairs; an explicit `prompt` column is required.
        recipe (`str`): `"sft"`: SFT on the chosen completions → π+, on the rejected → π− (cDPO's recipe). `"dpo"`: DPO
            → π+, reverse DPO (chosen and rejected swapped) → π− (TIS-DPO's best).
        output_dir (`str`): π+ is saved under `output_dir/positive/final`, π− under `output_dir/negative/final`.
        max_steps (`int`), learning_rate (`float`): of each of the two trainings.
        peft_config (`peft.PeftConfig`, *optional*): train LoRA adapters (merged before saving) instead of every
            weight.
        training_args (`dict`, *optional*): more `SFTConfig` (`"sft"`) or `DPOConfig` (`"dpo"`) arguments, e.g.
            `{"per_device_train_batch_size": 8, "beta": 0.1, "bf16": False, "use_cpu": True}` on a CPU.

    Returns:
        `ContrastiveModels`: the paths of π+ and π−.
    """
    if recipe not in RECIPES:
        raise ValueError(f"`recipe` must be one of {RECIPES}, got {recipe!r}.")
    missing = [column for column in ("prompt", "chosen", "rejected") if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The training pairs lack the column(s) {missing}; π+ and π− are built from `prompt`, `chosen` and "
            "`rejected` (extract an implicit prompt with `trl.extract_prompt` first)."
        )
    pairs = dataset.select_columns(["prompt", "chosen", "rejected"])
    if recipe == "sft":  # prompt-completion datasets: TRL's SFT computes the loss on the completion only
        data = {
            "positive": pairs.remove_columns("rejected").rename_column("chosen", "completion"),
            "negative": pairs.remove_columns("chosen").rename_column("rejected", "completion"),
        }
    else:
        data = {"positive": pairs, "negative": pairs.rename_columns({"chosen": "rejected", "rejected": "chosen"})}
    settings = {"max_steps": max_steps, "learning_rate": learning_rate, "report_to": [], "save_strategy": "no"}
    settings.update(training_args or {})
    paths = {
        name: _train_one(model, tokenizer, rows, recipe, os.path.join(output_dir, name), peft_config, settings)
        for name, rows in data.items()
    }
    return ContrastiveModels(paths["positive"], paths["negative"])


def add_contrastive_weight_columns(
    model: str | nn.Module,
    tokenizer,
    dataset: Dataset,
    recipe: str,
    max_steps: int,
    learning_rate: float,
    *,
    output_dir: str,
    weightings: Sequence[str] = WEIGHTINGS,
    peft_config=None,
    training_args: dict | None = None,
    tis_transform: str = "exp_clamp",
    tis_clamp: Sequence[float] = DEFAULT_CLAMP,
    cdpo_beta: float = DEFAULT_CDPO_BETA,
    cdpo_only_negative: bool = True,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    device: str = "cpu",
    batch_size: int = 8,
) -> dict[str, Dataset]:
    """
    Build π+ and π− from the training pairs (`train_contrastive_models`), then score the pairs once per weighting:
    `dataset` with the `chosen_token_weights` / `rejected_token_weights` columns of TIS-DPO (`"tis_dpo"`,
    `compute_tis_dpo_weight_columns`) and of cDPO (`"cdpo"`, `compute_cdpo_weight_columns`). Train on each with
    `token_weighting="dataset"`: the weights are those `token_weighting="tis_dpo"` / `"cdpo"` would compute with these
    two models and the same options.

    Args:
        model, tokenizer, dataset, recipe, max_steps, learning_rate, output_dir, peft_config, training_args: see
            [`train_contrastive_models`].
        weightings (`Sequence[str]`): which columns to compute, among `"tis_dpo"` and `"cdpo"`.
        tis_transform (`str`), tis_clamp (`Sequence[float]`): TIS-DPO's options (`TIDPOConfig`'s `tis_*`).
        cdpo_beta (`float`), cdpo_only_negative (`bool`): cDPO's options (`TIDPOConfig`'s `cdpo_*`).
        max_length (`int`, *optional*), truncation_mode (`str`): the preference training's; only the tokens it keeps
            are scored.
        device (`str`): where π+ and π− score the pairs.
        batch_size (`int`): rows per scoring forward.

    Returns:
        `dict[str, Dataset]`: one dataset per weighting, `dataset` plus its two weight columns.
    """
    unknown = [name for name in weightings if name not in WEIGHTINGS]
    if unknown or not weightings:
        raise ValueError(f"`weightings` must be a non-empty selection of {WEIGHTINGS}, got {list(weightings)!r}.")
    paths = train_contrastive_models(
        model,
        tokenizer,
        dataset,
        recipe,
        output_dir,
        max_steps=max_steps,
        learning_rate=learning_rate,
        peft_config=peft_config,
        training_args=training_args,
    )
    positive = AutoModelForCausalLM.from_pretrained(paths.positive).to(device)
    negative = AutoModelForCausalLM.from_pretrained(paths.negative).to(device)
    scoring = {"max_length": max_length, "truncation_mode": truncation_mode, "batch_size": batch_size}
    weighted = {}
    if "tis_dpo" in weightings:
        weighted["tis_dpo"] = compute_tis_dpo_weight_columns(
            dataset, positive, negative, tokenizer, clamp=tis_clamp, transform=tis_transform, **scoring
        )
    if "cdpo" in weightings:
        weighted["cdpo"] = compute_cdpo_weight_columns(
            dataset, positive, negative, tokenizer, beta=cdpo_beta, only_negative=cdpo_only_negative, **scoring
        )
    return weighted
