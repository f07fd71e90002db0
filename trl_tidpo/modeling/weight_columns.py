"""
Per-token weights stored as dataset columns: `chosen_token_weights` and `rejected_token_weights`, one float per
tokenised completion token (`chosen_ids` / `rejected_ids`). Used by `token_weighting="dataset"`, by the cached
reference weights (`importance_model="reference"`) and by TIS-DPO. Also the per-pair `pair_weight` column.
"""

import math

import torch
from datasets import Dataset


WEIGHT_COLUMNS = ("chosen_token_weights", "rejected_token_weights")
# One non-negative float per pair that scales the pair's loss (DPO and triplet terms), with every token weighting
PAIR_WEIGHT_COLUMN = "pair_weight"


def check_pair_weight(value, where: str) -> float:
    """
    One row's `pair_weight`, checked: a finite number >= 0.

    Raises:
        ValueError: naming `where` (the dataset and row) and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{where}: `{PAIR_WEIGHT_COLUMN}` is {value!r}; a pair weight must be a finite number >= 0 (0 removes the "
            "pair from the loss, 1 leaves it as it is)."
        )
    return float(value)


def validate_pair_weights(dataset: Dataset, dataset_name: str) -> None:
    """Check every row's `pair_weight` of a map-style dataset (streams are checked as the collator reads them)."""
    if PAIR_WEIGHT_COLUMN not in dataset.column_names:
        return
    for index, value in enumerate(dataset[PAIR_WEIGHT_COLUMN]):
        check_pair_weight(value, f"`{dataset_name}` row {index}")


def validate_token_weight_columns(dataset: Dataset, dataset_name: str) -> None:
    """
    Check that each weight list matches its tokenised completion and holds finite, non-negative floats.

    Raises:
        ValueError: naming the dataset, column, row index and lengths of the first bad row.
    """
    missing = [column for column in WEIGHT_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"`token_weighting='dataset'` needs the columns {list(WEIGHT_COLUMNS)}; `{dataset_name}` lacks {missing}."
        )
    for side in ("chosen", "rejected"):
        column = f"{side}_token_weights"
        for index, (weights, ids) in enumerate(zip(dataset[column], dataset[f"{side}_ids"], strict=True)):
            if weights is None or len(weights) != len(ids):
                length = None if weights is None else len(weights)
                raise ValueError(
                    f"`{dataset_name}` row {index}: `{column}` has {length} weights but the tokenised {side} completion "
                    f"has {len(ids)} tokens. Give one weight per completion token as the trainer tokenises it (EOS "
                    f"included for plain-text data); `trl_tidpo.modeling.weight_columns` documents the layout."
                )
            bad = [w for w in weights if not math.isfinite(w) or w < 0]
            if bad:
                raise ValueError(
                    f"`{dataset_name}` row {index}: `{column}` holds {bad[0]!r}; token weights must be finite and >= 0."
                )


def weights_to_lists(
    token_weights: torch.Tensor,
    completion_mask: torch.Tensor,
    completion_lengths: list[int],
    truncation_mode: str = "keep_start",
) -> list[list[float]]:
    """
    One weight list per row, over the row's completion tokens, padded with 0.0 to `completion_lengths[row]` (the
    untruncated tokenised length, so the column matches `*_ids` even where the collator truncated the row): at the end
    for `"keep_start"` (truncation cut the completion's tail), at the front for `"keep_end"` (it cut the head).

    Args:
        token_weights (`torch.Tensor`): `[R, T]` weights aligned with the collated `input_ids`.
        completion_mask (`torch.Tensor`): `[R, T]` collated completion mask.
        completion_lengths (`list[int]`): `R` untruncated completion lengths.
        truncation_mode (`str`): the collator's truncation mode.

    Returns:
        `list[list[float]]`.
    """
    rows = []
    masks = completion_mask.cpu().bool()
    for weights, mask, length in zip(token_weights.cpu(), masks, completion_lengths, strict=True):
        values = weights[mask].tolist()
        padding = [0.0] * (length - len(values))
        rows.append(padding + values if truncation_mode == "keep_end" else values + padding)
    return rows
