"""Checks of the datasets handed to `TIDPOTrainer`, run at construction before anything loads or tokenises."""

from accelerate.logging import get_logger
from datasets import Dataset

from ..modeling.weight_cache import TOKENIZED_COLUMNS
from ..modeling.weight_columns import WEIGHT_COLUMNS
from ..modeling.weight_spans import SPAN_COLUMNS, span_columns_of
from .tidpo_config import TIDPOConfig



logger = get_logger(__name__)


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
        if args.token_weighting == "tis_dpo" and set(WEIGHT_COLUMNS) & set(columns):
            raise ValueError(
                f"`{name}` already has token weight columns, which `token_weighting='tis_dpo'` computes itself. "
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
