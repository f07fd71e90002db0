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


def is_weight(value) -> bool:
    """
    The rule every weight obeys (a token weight, a span's weight, a `pair_weight`, a config's default weight): a
    finite number >= 0. Booleans are refused: `True` would be read as the weight 1 without a word.
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _shown(value) -> str:
    return "None (null)" if value is None else f"{type(value).__name__} {value!r}"


def check_token_weights(weights, column: str, where: str, num_tokens: int | None = None) -> list[float]:
    """
    One completion's token-weight list, checked: a non-empty list, one entry per completion token when that count is
    known (`num_tokens`), each entry `is_weight`, not every entry 0 (the completion would add nothing to the margin).
    The one check of a token-weight list: the trainer's row checks, its check after tokenisation, span weights and
    `explain` call it.

    Args:
        weights: the row's value of `column`.
        column (`str`): the column (`chosen_token_weights` / `rejected_token_weights`, or a span column), for messages.
        where (`str`): the dataset and row, for messages (`"`train_dataset` row 3"`).
        num_tokens (`int`, *optional*): the tokenised completion's length (`len(chosen_ids)`), once it is known.

    Returns:
        `list[float]`: the weights.

    Raises:
        ValueError: `"{where}: ..."`, naming the column, the position or the lengths, and the fix.
    """
    if not isinstance(weights, (list, tuple)):
        raise ValueError(
            f"{where}: `{column}` is {'None (null)' if weights is None else type(weights).__name__}, not a list. Give "
            "one finite weight >= 0 per completion token (`token_weighting='dataset'`)."
        )
    if num_tokens is not None and len(weights) != num_tokens:
        side = column.split("_")[0]
        raise ValueError(
            f"{where}: `{column}` has {len(weights)} weights but the tokenised {side} completion has {num_tokens} "
            "tokens. Give one weight per completion token as the trainer tokenises it (EOS included for plain-text "
            "data); `trl_tidpo.modeling.weight_columns` documents the layout."
        )
    if not weights:
        raise ValueError(f"{where}: `{column}` is an empty list; give one weight per completion token.")
    for position, weight in enumerate(weights):
        if not is_weight(weight):
            raise ValueError(
                f"{where}: `{column}` position {position} holds {_shown(weight)}; token weights must be finite "
                "numbers >= 0 (not booleans). Fix or drop the row."
            )
    if not any(weights):
        raise ValueError(
            f"{where}: every weight of `{column}` is 0, so this completion adds nothing to the margin and the pair "
            "trains on one side only (or not at all). Give some token a positive weight, or drop the row."
        )
    return [float(weight) for weight in weights]


def check_pair_weight(value, where: str) -> float:
    """
    One row's `pair_weight`, checked: `is_weight`.

    Raises:
        ValueError: naming `where` (the dataset and row) and the value.
    """
    if not is_weight(value):
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
    Check every row's weight lists of a tokenised map-style dataset against its completions (`check_token_weights`
    with the length of `chosen_ids` / `rejected_ids`).

    Raises:
        ValueError: naming the dataset, column, row index and lengths of the first bad row.
    """
    missing = [column for column in WEIGHT_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"`token_weighting='dataset'` needs the columns {list(WEIGHT_COLUMNS)}; `{dataset_name}` lacks {missing}."
        )
    for side, column in zip(("chosen", "rejected"), WEIGHT_COLUMNS, strict=True):
        for index, (weights, ids) in enumerate(zip(dataset[column], dataset[f"{side}_ids"], strict=True)):
            check_token_weights(weights, column, f"`{dataset_name}` row {index}", num_tokens=len(ids))


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
