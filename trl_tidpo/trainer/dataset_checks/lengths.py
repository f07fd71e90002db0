"""
Checks of a tokenised dataset's lengths: the rows whose prompt alone fills `max_length` (dropped with a warning, as
TRL drops them) and the rows that would train past the model's `max_position_embeddings` (refused).
"""

from accelerate.logging import get_logger
from datasets import Dataset


logger = get_logger(__name__)


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


def report_dropped_overlong_prompts(count: int, num_rows: int | None, dataset_name: str, max_length: int | None) -> None:
    """
    Say that `count` pairs whose prompt fills `max_length` were dropped (TRL's `DPOTrainer` drops them without a
    word): a warning, or an error when no pair is left to train on.
    """
    if not count:
        return
    if count == num_rows:
        raise ValueError(
            f"Every pair of the {dataset_name} dataset ({num_rows}) has a prompt of `max_length={max_length}` tokens "
            "or more, so `truncation_mode='keep_start'` leaves their completions empty and TRL drops them all. Raise "
            "`max_length`, shorten those prompts, or set `truncation_mode='keep_end'` (deprecated)."
        )
    logger.warning(
        f"Dropped {count} of the {num_rows} pairs of the {dataset_name} dataset: their prompt has "
        f"`max_length={max_length}` tokens or more, so `truncation_mode='keep_start'` would leave their completions "
        "empty (TRL's DPOTrainer drops them too). To keep them, raise `max_length` or shorten those prompts.",
        main_process_only=True,
    )


def drop_overlong_prompt_rows(dataset, max_length: int | None, truncation_mode: str, dataset_name: str):
    """A pre-tokenised map-style `dataset` without its over-long-prompt rows (as TRL drops them when it tokenises),
    reported by `report_dropped_overlong_prompts`."""
    overlong = overlong_prompt_rows(dataset, max_length, truncation_mode)
    num_rows = len(dataset) if isinstance(dataset, Dataset) else None
    report_dropped_overlong_prompts(len(overlong), num_rows, dataset_name, max_length)
    if not overlong:
        return dataset
    dropped = set(overlong)
    return dataset.select([index for index in range(len(dataset)) if index not in dropped])


def overlong_prompt_filter(max_length: int, dataset_name: str):
    """TRL's filter of a streamed dataset's pairs whose prompt fills `max_length`, warning at the first one dropped
    (a stream cannot be counted ahead)."""
    warned = False

    def keep(example: dict) -> bool:
        nonlocal warned
        if len(example["prompt_ids"]) < max_length:
            return True
        if not warned:
            logger.warning(
                f"Dropping the pairs of the streamed {dataset_name} dataset whose prompt has `max_length={max_length}` "
                "tokens or more (a stream cannot be counted ahead; this is the first): `truncation_mode='keep_start'` "
                "would leave their completions empty (TRL's DPOTrainer drops them too). To keep them, raise "
                "`max_length` or shorten those prompts.",
                main_process_only=True,
            )
            warned = True
        return False

    return keep


def rows_past_positions(dataset: Dataset, max_positions: int, max_length: int | None) -> list[tuple[int, int]]:
    """
    The rows of a tokenised map-style `dataset` whose collated length (prompt plus its longer completion, cut to
    `max_length` when set) is more than `max_positions`, as `(row index, length)`.
    """
    columns = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    past = []
    index = 0
    for batch in columns.iter(batch_size=4096):
        for prompt, chosen, rejected in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], strict=True):
            length = len(prompt) + max(len(chosen), len(rejected))
            if max_length is not None:
                length = min(length, max_length)
            if length > max_positions:
                past.append((index, length))
            index += 1
    return past


def check_positions(dataset, dataset_name: str, max_positions: int | None, max_length: int | None) -> None:
    """
    Refuse the rows of a tokenised map-style `dataset` that would train at positions past the model's
    `max_position_embeddings` (`max_positions`; None: no limit known, nothing checked): with `max_length=None` nothing
    truncates them, and a rotary model then trains on positions it never saw (a learned position table fails). They
    are refused rather than dropped: the fix, `max_length`, is the user's choice of how to cut them. Streamed datasets
    are not read ahead: not checked.

    Raises:
        ValueError: naming the first such row, the count and the fix.
    """
    if max_positions is None or not isinstance(dataset, Dataset):
        return
    if max_length is not None and max_length <= max_positions:
        return
    past = rows_past_positions(dataset, max_positions, max_length)
    if not past:
        return
    index, length = past[0]
    more = f" (and {len(past) - 1} more)" if len(past) > 1 else ""
    if max_length is None:
        cause, fix = "`max_length=None` does not truncate it", f"Set `max_length` (at most {max_positions})"
    else:
        cause = f"`max_length={max_length}` is more than that"
        fix = f"Lower `max_length` to at most {max_positions}"
    raise ValueError(
        f"`{dataset_name}` row {index}{more}: its prompt and longer completion take {length} tokens, more than the "
        f"model's `max_position_embeddings={max_positions}`, and {cause}, so it would train at positions the model has "
        f"no position for. {fix} to truncate such rows (with `truncation_mode='keep_start'`, rows whose prompt alone "
        "fills it are then dropped with a warning, as TRL drops them), or shorten them."
    )


def model_max_positions(config) -> int | None:
    """The model config's `max_position_embeddings` (of its text model for a multimodal config), or None."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None
