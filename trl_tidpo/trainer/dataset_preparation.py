"""
How `TIDPOTrainer` prepares a preference dataset around TRL's own tokenisation (`DPOTrainer._prepare_dataset`): the
row checks that must number rows as the user gave them, the over-long prompts TRL would drop without a word, the
dataset `anchor` column, the `*_weight_spans` columns mapped onto token weights, and, once the model is known, the
rows that would train past its positions.

`prepare_dataset` takes TRL's tokenisation as an argument, so that a tool can prepare a row exactly as the trainer
does without building one.
"""

import copy
from collections.abc import Callable

from datasets import Dataset, IterableDataset

from ..modeling.anchors import tokenize_anchor
from ..modeling.attribution import causal_lm_of
from ..modeling.weight_cache import ANCHOR_REF_LOGP_COLUMN, REF_LOGP_COLUMNS, TOKENIZED_COLUMNS
from ..modeling.weight_columns import (
    PAIR_WEIGHT_COLUMN,
    WEIGHT_COLUMNS,
    validate_pair_weights,
    validate_token_weight_columns,
)
from ..modeling.weight_spans import (
    add_span_weight_columns,
    check_offsets_support,
    record_span_source,
    span_columns_of,
    validate_span_rows,
)
from .dataset_checks import (
    check_positions,
    drop_overlong_prompt_rows,
    model_max_positions,
    named_datasets,
    overlong_prompt_filter,
    report_dropped_overlong_prompts,
)
from .tidpo_config import TIDPOConfig


# The columns the trainer reads beyond TRL's (`Trainer` removes the columns its model's forward does not take)
TIDPO_BATCH_COLUMNS = ("anchor_ids", *WEIGHT_COLUMNS, PAIR_WEIGHT_COLUMN, *REF_LOGP_COLUMNS, ANCHOR_REF_LOGP_COLUMN)

# TRL's preparation of a preference dataset: `(dataset, processing_class, args, dataset_name) -> dataset`, with
# `prompt_ids`, `chosen_ids` and `rejected_ids` added (`DPOTrainer._prepare_dataset`, bound to a trainer)
Tokenize = Callable[[Dataset | IterableDataset, object, TIDPOConfig, str], Dataset | IterableDataset]


def prepare_dataset(
    dataset: Dataset | IterableDataset, processing_class, args: TIDPOConfig, dataset_name: str, tokenize: Tokenize
) -> Dataset | IterableDataset:
    """
    `dataset` ready for the TI-DPO collator: tokenised by `tokenize` (TRL's preparation), plus `anchor_ids` (a dataset
    `anchor` column, when the triplet loss reads it) and `chosen_token_weights`/`rejected_token_weights` mapped from
    the `*_weight_spans` columns.

    Rows whose prompt alone fills `max_length` (with `truncation_mode="keep_start"`) are dropped with a warning, for
    map-style and streamed datasets alike and for already tokenised ones (TRL 1.16 drops a stream's without a word and
    re-tokenises a tokenised one from text columns it may not have).

    Args:
        dataset: the raw (or already tokenised) preference dataset.
        processing_class: the tokenizer.
        args (`TIDPOConfig`): reads `max_length`, `truncation_mode`, `dataset_num_proc`, `triplet_gamma`,
            `anchor_source`, `span_default_weight` and `token_weighting`.
        dataset_name (`str`): the name the error messages give it (`"train"`, `"eval"`).
        tokenize: TRL's preparation (see `Tokenize`).

    Raises:
        ValueError: naming the dataset, row and column of a bad `pair_weight`, span or token weight list.
    """
    implicit_prompt = "prompt" not in next(iter(dataset))
    if isinstance(dataset, Dataset):  # row checks before TRL drops rows, so that errors number them as given
        validate_pair_weights(dataset, dataset_name)
    has_spans = bool(span_columns_of(next(iter(dataset))))
    if has_spans:
        dataset = record_span_sources(dataset, processing_class, args, implicit_prompt, dataset_name)
    num_rows = len(dataset) if isinstance(dataset, Dataset) else None
    drops_overlong = args.max_length is not None and args.truncation_mode == "keep_start"
    # TRL 1.16 always re-tokenises from the text columns, which an already tokenised dataset may not have
    if set(TOKENIZED_COLUMNS) <= set(next(iter(dataset))):
        dataset = drop_overlong_prompt_rows(dataset, args.max_length, args.truncation_mode, dataset_name)
    elif isinstance(dataset, IterableDataset) and drops_overlong:
        # TRL filters a stream's over-long prompts without a word: tokenise without its filter, filter here
        unfiltered = copy.copy(args)
        unfiltered.max_length = None  # TRL's preparation reads `max_length` only for that filter
        dataset = tokenize(dataset, processing_class, unfiltered, dataset_name)
    else:
        dataset = tokenize(dataset, processing_class, args, dataset_name)
        dropped = num_rows - len(dataset) if num_rows is not None else 0  # the pairs TRL dropped
        report_dropped_overlong_prompts(dropped, num_rows, dataset_name, args.max_length)
    if isinstance(dataset, IterableDataset) and drops_overlong:
        dataset = dataset.filter(overlong_prompt_filter(args.max_length, dataset_name))
    needs_anchor_ids = args.triplet_gamma > 0 and args.anchor_source == "dataset"
    if needs_anchor_ids and "anchor_ids" not in next(iter(dataset)):
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
        dataset = dataset.map(
            tokenize_anchor,
            with_indices=True,
            fn_kwargs={"processing_class": processing_class, "implicit_prompt": implicit_prompt},
            **map_kwargs,
        )
    if has_spans:
        dataset = add_span_weight_columns(
            dataset, processing_class, args.span_default_weight, dataset_name, args.dataset_num_proc
        )
    if args.token_weighting == "dataset" and isinstance(dataset, Dataset):
        validate_token_weight_columns(dataset, dataset_name)
    return dataset


def record_span_sources(
    dataset: Dataset | IterableDataset, processing_class, args: TIDPOConfig, implicit_prompt: bool, dataset_name: str
) -> Dataset | IterableDataset:
    """
    Before TRL's preparation: check the `*_weight_spans` columns (map-style: every row now; streamed: as read) and
    keep, per row, what mapping them onto tokens needs afterwards (`record_span_source`).
    """
    check_offsets_support(processing_class)
    validate_span_rows(dataset, dataset_name)
    map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
    return dataset.map(
        record_span_source,
        with_indices=True,
        fn_kwargs={"dataset_name": dataset_name, "implicit_prompt": implicit_prompt},
        **map_kwargs,
    )


def check_model_positions(model, train_dataset, eval_dataset, max_length: int | None) -> None:
    """
    Refuse prepared rows that would train at positions past the model's `max_position_embeddings` (`check_positions`,
    for the train dataset and each eval dataset).
    """
    max_positions = model_max_positions(causal_lm_of(model).config)
    for name, dataset in named_datasets(train_dataset, eval_dataset).items():
        check_positions(dataset, name, max_positions, max_length)
