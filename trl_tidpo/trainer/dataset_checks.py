"""Checks of the datasets handed to `TIDPOTrainer`, run at construction before anything loads or tokenises."""

from datasets import Dataset

from ..modeling.weight_columns import WEIGHT_COLUMNS
from .tidpo_config import TIDPOConfig


TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def named_datasets(train_dataset, eval_dataset) -> dict:
    """The train dataset and each eval dataset, by the name an error message gives them."""
    datasets = {"train_dataset": train_dataset}
    if isinstance(eval_dataset, dict):
        datasets.update({f"eval_dataset[{key!r}]": ds for key, ds in eval_dataset.items()})
    elif eval_dataset is not None:
        datasets["eval_dataset"] = eval_dataset
    return {name: dataset for name, dataset in datasets.items() if dataset is not None}


def _missing_column_hint(missing: list[str]) -> str:
    if "anchor" in missing:
        return (
            " The 'anchor' column is required by `anchor_source='dataset'` (with `triplet_gamma > 0`); use "
            "`anchor_source='policy'` to sample anchors instead, or `triplet_gamma=0` to disable the triplet loss."
        )
    if set(WEIGHT_COLUMNS) & set(missing):
        return " `token_weighting='dataset'` reads one weight per completion token from these columns."
    return " A preference dataset needs 'chosen' and 'rejected' (and optionally 'prompt')."


def check_dataset_columns(args: TIDPOConfig, train_dataset, eval_dataset) -> None:
    """Fail at construction on a dataset that cannot train: missing columns, or no rows."""
    for name, dataset in named_datasets(train_dataset, eval_dataset).items():
        if isinstance(dataset, Dataset) and len(dataset) == 0:
            raise ValueError(f"`{name}` is empty: TIDPOTrainer needs at least one preference pair.")
        columns = dataset.column_names or list(next(iter(dataset)).keys())
        required = [] if set(TOKENIZED_COLUMNS) <= set(columns) else ["chosen", "rejected"]
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
            raise ValueError(f"`{name}` is missing column(s) {missing}; it has {columns}.{_missing_column_hint(missing)}")


def overlong_prompt_rows(dataset, max_length: int | None, truncation_mode: str) -> list[int]:
    """
    Indices of the rows of a tokenised map-style `dataset` whose prompt alone fills `max_length`: with
    `truncation_mode="keep_start"` the collator would cut away their whole completion, so they train on nothing (TRL
    drops them when it tokenises; a pre-tokenised dataset skips that step). `keep_end` keeps every completion's end.
    An `IterableDataset` is not read ahead: no rows.
    """
    if max_length is None or truncation_mode != "keep_start" or not isinstance(dataset, Dataset):
        return []
    return [index for index, ids in enumerate(dataset["prompt_ids"]) if len(ids) >= max_length]


def raise_for_overlong_prompts(count: int, num_rows: int, dataset_name: str, max_length: int | None) -> None:
    """Refuse a dataset with `count` pairs whose prompt fills `max_length` (see `overlong_prompt_rows`)."""
    if count:
        raise ValueError(
            f"{count} of the {num_rows} pairs of the {dataset_name} dataset have a prompt of `max_length={max_length}` "
            "tokens or more, so `truncation_mode='keep_start'` leaves their completions empty. Raise `max_length`, "
            "shorten or filter those prompts, or set `truncation_mode='keep_end'`."
        )
