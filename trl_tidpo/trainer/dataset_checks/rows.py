"""
Checks of every row of a preference dataset, in one pass in Python over the columns (no tokenisation), before
`TIDPOTrainer` prepares it: text fields in one format, non-empty completions, token weight lists
(`check_token_weights`), pairs that differ.
"""

from typing import Any

from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from trl.data_utils import extract_prompt

from ...modeling.weight_cache import TOKENIZED_COLUMNS
from ...modeling.weight_columns import check_token_weights
from ..tidpo_config import TIDPOConfig
from .columns import named_datasets, reads_dataset_anchors, token_weight_columns_read


logger = get_logger(__name__)

TEXT_FORMAT_HINT = (
    "Each of 'prompt', 'chosen' and 'rejected' is a string (plain text) or a list of {'role': ..., 'content': ...} "
    "messages (conversational), the same format in every row."
)


# TRL 1.16's DPOTrainer checks no row: it decides plain vs conversational from the first row alone (`add_eos` then
# crashes on a `None` or an int, and skips the EOS of plain rows in a conversational dataset), and it trains without
# a word on empty completions and messages without 'content'. Each is refused here, at construction, in one pass over
# the columns in Python (no tokenisation), naming the dataset, the row and the column (weight columns it does not
# read are refused by `columns`). TRL's own clear messages (a missing 'chosen'/'rejected' column, `loss_weights`'
# length) are left to it.


class DatasetRowError(ValueError):
    """A row of a preference dataset that cannot train; the message names the dataset, the row, the column and the
    fix."""


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
        if not self.tokenized and reads_dataset_anchors(args) and "anchor" in columns:
            text.append("anchor")
        self.text_columns = text
        self.weight_columns = token_weight_columns_read(args.token_weighting, columns)
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
        """The one check of a token-weight list (`check_token_weights`), raised as a `DatasetRowError`."""
        try:
            check_token_weights(weights, column, f"`{self.name}` row {index}")
        except ValueError as error:
            raise DatasetRowError(str(error)) from None

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
    Check every row of the train and eval datasets (map-style: now, in one pass; streamed: as each row is read).

    Returns:
        `tuple`: the train and eval datasets, streamed ones wrapped in their row check (map-style ones unchanged).
    """
    checked = {}
    for name, dataset in named_datasets(train_dataset, eval_dataset).items():
        columns = dataset.column_names or list(next(iter(dataset)).keys())
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
