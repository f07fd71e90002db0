"""Checks of the datasets handed to `TIDPOTrainer`, run at construction before anything loads or tokenises."""

import math
from typing import Any

from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from trl.data_utils import extract_prompt

from ..modeling.weight_cache import TOKENIZED_COLUMNS
from ..modeling.weight_columns import WEIGHT_COLUMNS
from ..modeling.weight_spans import SPAN_COLUMNS, span_columns_of
from .tidpo_config import TIDPOConfig


logger = get_logger(__name__)

TEXT_FORMAT_HINT = (
    "Each of 'prompt', 'chosen' and 'rejected' is a string (plain text) or a list of {'role': ..., 'content': ...} "
    "messages (conversational), the same format in every row."
)


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
        spans = span_columns_of(columns)
        _check_span_columns(args, name, columns, spans)
        if args.token_weighting == "dataset" and not spans:
            required.extend(WEIGHT_COLUMNS)
        if args.token_weighting in ("tis_dpo", "cdpo") and set(WEIGHT_COLUMNS) & set(columns):
            raise ValueError(
                f"`{name}` already has token weight columns, which `token_weighting={args.token_weighting!r}` computes "
                "itself. "
                "Use `token_weighting='dataset'` to train on them, or remove them to recompute."
            )
        missing = [column for column in required if column not in columns]
        if missing:
            raise ValueError(f"`{name}` is missing column(s) {missing}; it has {columns}.{_missing_column_hint(missing)}")


def _check_span_columns(args: TIDPOConfig, name: str, columns: list[str], spans: list[str]) -> None:
    """Span columns are `token_weighting="dataset"`'s other input: refused with another mode, or with token lists."""
    if not spans:
        return
    if args.token_weighting != "dataset":
        raise ValueError(
            f"`{name}` has the span column(s) {spans}, which only `token_weighting='dataset'` reads, but "
            f"`token_weighting` is {args.token_weighting!r}. Set `token_weighting='dataset'` or remove the columns."
        )
    given = [column for column in WEIGHT_COLUMNS if column in columns]
    if given:
        raise ValueError(
            f"`{name}` has both span columns {spans} and token weight columns {given}: give the weights one way, "
            f"either as character spans ({list(SPAN_COLUMNS)}) or as one weight per token ({list(WEIGHT_COLUMNS)})."
        )
    if set(TOKENIZED_COLUMNS) <= set(columns):
        raise ValueError(
            f"`{name}` is already tokenised ({list(TOKENIZED_COLUMNS)}), so the trainer cannot place the character "
            f"spans {spans} on its tokens. Pass the text columns ('prompt', 'chosen', 'rejected') untokenised, or give "
            f"{list(WEIGHT_COLUMNS)} instead."
        )


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


# ---------------------------------------------------------------------------------------------------- row checks
#
# TRL 1.16's DPOTrainer checks no row: it decides plain vs conversational from the first row alone (`add_eos` then
# crashes on a `None` or an int, and skips the EOS of plain rows in a conversational dataset), and it trains without
# a word on empty completions, messages without 'content', and weight columns it does not read. Each is refused here,
# at construction, in one pass over the columns in Python (no tokenisation), naming the dataset, the row and the
# column. TRL's own clear messages (a missing 'chosen'/'rejected' column, `loss_weights`' length) are left to it.


class DatasetRowError(ValueError):
    """A row of a preference dataset that cannot train; the message names the dataset, the row, the column and the
    fix."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _messages_text(messages: list) -> str:
    """The text of a message list's contents (a content may be a list of typed parts)."""
    parts = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:  # [{"type": "text", "text": ...}, ...]
            parts.extend(str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content)
    return "".join(parts)


def _is_empty_completion(value: str | list) -> bool:
    return (value if isinstance(value, str) else _messages_text(value)).strip() == ""


class RowChecker:
    """
    Checks the rows of one dataset, one at a time, in the order they are read; `finish` reports what is counted over
    the whole dataset. A plain-text field must be a string; a conversational one a non-empty list of dicts, each with
    a string 'role' and a 'content' (a string, or a list of content parts); every text field of every row in the
    dataset's format (its first row's, as TRL decides it).

    Args:
        args (`TIDPOConfig`): the trainer's config (which columns it reads).
        dataset_name (`str`): how messages name the dataset (`"train_dataset"`, `"eval_dataset['x']"`).
        columns (`list[str]`): the dataset's columns.
    """

    def __init__(self, args: TIDPOConfig, dataset_name: str, columns: list[str]):
        self.name = dataset_name
        self.tokenized = set(TOKENIZED_COLUMNS) <= set(columns)
        self.implicit_prompt = "prompt" not in columns
        text = [] if self.tokenized else [c for c in ("prompt", "chosen", "rejected") if c in columns]
        if not self.tokenized and args.triplet_gamma > 0 and args.anchor_source == "dataset" and "anchor" in columns:
            text.append("anchor")
        self.text_columns = text
        self.weight_columns = [c for c in WEIGHT_COLUMNS if c in columns] if args.token_weighting == "dataset" else []
        self.id_columns = [c for c in ("chosen_ids", "rejected_ids") if self.tokenized]
        self.columns = [*self.text_columns, *self.weight_columns, *self.id_columns]
        self.dataset_format: tuple[str, int] | None = None  # (format, first row), from the first row read
        self.rows = 0
        self.identical_rows: list[int] = []

    def _error(self, index: int, message: str) -> DatasetRowError:
        return DatasetRowError(f"`{self.name}` row {index}: {message}")

    def check(self, index: int, row: dict) -> None:
        """Raise `DatasetRowError` for the first problem of `row` (the dataset's row `index`)."""
        self.rows += 1
        if self.text_columns:
            self._check_text(index, row)
        for column in self.weight_columns:
            self._check_weights(index, column, row[column])
        for column in self.id_columns:
            if len(row[column]) == 0:
                raise self._error(index, f"`{column}` is empty: the completion has no token to train on. Drop the row.")
        if self.tokenized and row["chosen_ids"] == row["rejected_ids"]:
            self.identical_rows.append(index)

    def _field_format(self, index: int, column: str, value: Any) -> str:
        if isinstance(value, str):
            return "plain"
        if not isinstance(value, list):
            shown = "None (null)" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
            raise self._error(index, f"`{column}` is {shown}. {TEXT_FORMAT_HINT} Fix or drop this row.")
        if not value:
            what = "the completion is empty" if column != "prompt" else "the prompt has no message"
            raise self._error(index, f"`{column}` is an empty message list: {what}. Fix or drop this row.")
        for position, message in enumerate(value):
            if not isinstance(message, dict):
                raise self._error(
                    index,
                    f"`{column}` message {position} is {type(message).__name__} {str(message)[:40]!r}, not a "
                    f"{{'role': ..., 'content': ...}} dict. {TEXT_FORMAT_HINT}",
                )
            for key in ("role", "content"):
                if message.get(key) is None:
                    raise self._error(
                        index,
                        f"`{column}` message {position} has no {key!r} ({message!r}); every message needs a 'role' "
                        "and a 'content'. Fix or drop this row.",
                    )
            if not isinstance(message["role"], str) or not isinstance(message["content"], (str, list)):
                raise self._error(
                    index,
                    f"`{column}` message {position} has a {type(message['role']).__name__} 'role' and a "
                    f"{type(message['content']).__name__} 'content'; 'role' must be a string and 'content' a string "
                    "(or a list of content parts).",
                )
        return "conversational"

    def _check_text(self, index: int, row: dict) -> None:
        formats = {column: self._field_format(index, column, row[column]) for column in self.text_columns}
        row_format = next(iter(formats.values()))
        if len(set(formats.values())) > 1:
            plain = [c for c, f in formats.items() if f == "plain"]
            listed = [c for c, f in formats.items() if f != "plain"]
            raise self._error(
                index,
                f"mixes plain text ({plain}) and conversational messages ({listed}). {TEXT_FORMAT_HINT}",
            )
        if self.dataset_format is None:
            self.dataset_format = (row_format, index)
        elif row_format != self.dataset_format[0]:
            first_format, first_row = self.dataset_format
            raise self._error(
                index,
                f"is {row_format} but row {first_row} is {first_format}: TRL takes the format of a whole dataset from "
                f"its first row, so this row would be tokenised wrongly (plain rows would get no EOS). Convert every "
                f"row to one format.",
            )
        chosen, rejected = row["chosen"], row["rejected"]
        if self.implicit_prompt:
            for column, value in (("chosen", chosen), ("rejected", rejected)):
                if _is_empty_completion(value):
                    raise self._error(index, f"`{column}` is empty. Give a non-empty response, or drop the row.")
            if chosen == rejected:
                self.identical_rows.append(index)
                return
            self._check_implicit_prompt(index, chosen, rejected)
            extracted = extract_prompt({"chosen": chosen, "rejected": rejected})  # what TRL trains on
            chosen, rejected = extracted["chosen"], extracted["rejected"]
        for column, value in (("chosen", chosen), ("rejected", rejected)):
            if _is_empty_completion(value):
                where = " (after the prompt they share, without a 'prompt' column)" if self.implicit_prompt else ""
                raise self._error(
                    index,
                    f"the `{column}` completion is empty{where}: it would train on its EOS token alone. Give a "
                    "non-empty response, or drop the row.",
                )
        if chosen == rejected:
            self.identical_rows.append(index)

    def _check_implicit_prompt(self, index: int, chosen: str | list, rejected: str | list) -> None:
        """Without a 'prompt' column the prompt is what `chosen` and `rejected` share: each needs more than that, and
        a conversation needs a shared first message (TRL's chat template refuses an empty prompt, naming no row)."""
        shared = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
        for column, value in (("chosen", chosen), ("rejected", rejected)):
            if shared == len(value):
                raise self._error(
                    index,
                    f"the `{column}` completion is empty (after the prompt they share, without a 'prompt' column): "
                    f"all of `{column}` starts the other response, so it has no response of its own. Add a 'prompt' "
                    "column, or fix or drop the row.",
                )
        if shared == 0 and isinstance(chosen, list):
            raise self._error(
                index,
                "`chosen` and `rejected` share no first message, so without a 'prompt' column the prompt is empty. "
                "Add a 'prompt' column, or start both with the same prompt messages.",
            )

    def _check_weights(self, index: int, column: str, weights: Any) -> None:
        if not isinstance(weights, list):
            raise self._error(
                index,
                f"`{column}` is {'None (null)' if weights is None else type(weights).__name__}, not a list. Give one "
                "finite weight >= 0 per completion token (`token_weighting='dataset'`).",
            )
        if not weights:
            raise self._error(index, f"`{column}` is an empty list; give one weight per completion token.")
        for position, weight in enumerate(weights):
            if not _is_number(weight) or not math.isfinite(weight) or weight < 0:
                shown = "None (null)" if weight is None else f"{type(weight).__name__} {weight!r}"
                raise self._error(
                    index,
                    f"`{column}` position {position} holds {shown}; token weights must be finite numbers >= 0.",
                )
        if not any(weights):
            raise self._error(
                index,
                f"every weight of `{column}` is 0, so this completion adds nothing to the margin and the pair trains "
                "on one side only (or not at all). Give some token a positive weight, or drop the row.",
            )

    def finish(self) -> None:
        """After every row: refuse a dataset whose pairs are all identical (nothing to learn), warn once with the
        count of the identical ones otherwise."""
        count = len(self.identical_rows)
        if not count:
            return
        if count == self.rows:
            raise DatasetRowError(
                f"`{self.name}`: in every pair ({count}) `chosen` is identical to `rejected`, so every DPO loss is the "
                "constant log 2 with no gradient. Check that the columns hold the preferred and the dispreferred "
                "responses."
            )
        logger.warning(
            f"{count} of the {self.rows} pairs of `{self.name}` have `chosen` identical to `rejected` (rows "
            f"{self.identical_rows[:5]}{' ...' if count > 5 else ''}): each adds a constant loss (log 2 for "
            "'sigmoid') and no gradient, and dilutes its batch. Consider removing them.",
            main_process_only=True,
        )


def _check_unused_weight_columns(args: TIDPOConfig, dataset_name: str, columns: list[str]) -> None:
    present = [column for column in WEIGHT_COLUMNS if column in columns]
    if present and args.token_weighting in ("ti_dpo", "uniform", "difference"):
        raise ValueError(
            f"`{dataset_name}` has the token weight column(s) {present}, which `token_weighting="
            f"{args.token_weighting!r}` does not read: they would be ignored. Set `token_weighting='dataset'` to train "
            f"on them, or remove them (`dataset.remove_columns({present})`)."
        )


def check_rows(args: TIDPOConfig, dataset: Dataset, dataset_name: str, batch_size: int = 1024) -> None:
    """
    Check every row of a map-style `dataset` (see `RowChecker`), reading only the columns checked, in batches.

    Raises:
        DatasetRowError: naming the dataset, the first bad row, its column and the fix.
    """
    checker = RowChecker(args, dataset_name, dataset.column_names)
    if not checker.columns:
        return
    index = 0
    for batch in dataset.select_columns(checker.columns).iter(batch_size=batch_size):
        for values in zip(*(batch[column] for column in checker.columns), strict=True):
            checker.check(index, dict(zip(checker.columns, values, strict=True)))
            index += 1
    checker.finish()


def streamed_row_check(args: TIDPOConfig, dataset_name: str, columns: list[str]):
    """
    The `RowChecker` of a streamed dataset, as a function for `IterableDataset.map(..., with_indices=True)`: each row
    is checked as it is read (a stream cannot be read ahead), so a bad row raises when training reaches it (the first
    row at construction, where TRL reads it). Identical pairs are warned about at the first one.
    """
    checker = RowChecker(args, dataset_name, columns)
    warned = False

    def check(example: dict, index: int) -> dict:
        nonlocal warned
        identical = len(checker.identical_rows)
        checker.check(index, example)
        if len(checker.identical_rows) > identical and not warned:
            logger.warning(
                f"`{dataset_name}` row {index}: `chosen` is identical to `rejected`, so the pair adds a constant loss "
                "and no gradient (a stream cannot be counted ahead; this is the first such row).",
                main_process_only=True,
            )
            warned = True
        return example

    return check


def check_dataset_rows(args: TIDPOConfig, train_dataset, eval_dataset) -> tuple[Any, Any]:
    """
    Check every row of the train and eval datasets (map-style: now, in one pass; streamed: as each row is read),
    and refuse weight columns the configured `token_weighting` would ignore.

    Returns:
        `tuple`: the train and eval datasets, streamed ones wrapped in their row check (map-style ones unchanged).
    """
    checked = {}
    for name, dataset in named_datasets(train_dataset, eval_dataset).items():
        columns = dataset.column_names or list(next(iter(dataset)).keys())
        _check_unused_weight_columns(args, name, columns)
        if isinstance(dataset, Dataset):
            check_rows(args, dataset, name)
        elif isinstance(dataset, IterableDataset):
            checked[name] = dataset.map(
                streamed_row_check(args, name, columns), with_indices=True, features=dataset.features
            )
    train_dataset = checked.get("train_dataset", train_dataset)
    if isinstance(eval_dataset, dict):
        eval_dataset = {key: checked.get(f"eval_dataset[{key!r}]", ds) for key, ds in eval_dataset.items()}
    elif eval_dataset is not None:
        eval_dataset = checked.get("eval_dataset", eval_dataset)
    return train_dataset, eval_dataset


# ---------------------------------------------------------------------------------------------------- positions


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
