"""Per-token TI-DPO weights of any (model, tokenizer, prompt, completion), and the weights the trainer will use for
one dataset row (span columns, weight columns or TI-DPO's), for inspection."""

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from trl import DPOTrainer

from ..modeling.attribution import attribute_in_own_forward
from ..modeling.collator import DataCollatorForTIDPO
from ..modeling.tokenization import tokenize_completion
from ..modeling.weight_columns import PAIR_WEIGHT_COLUMN, WEIGHT_COLUMNS, check_pair_weight
from ..modeling.weight_spans import SPAN_COLUMNS
from ..ops.importance import completion_token_weights
from ..ops.pair_alignment import pair_difference_weights
from ..trainer.dataset_checks import RowChecker, check_columns
from ..trainer.dataset_preparation import prepare_dataset
from ..trainer.tidpo_config import WEIGHT_OPTIONS, TIDPOConfig, weight_option_defaults


@dataclass
class TokenWeights:
    """
    TI-DPO's view of one completion. Every list has one entry per completion token (EOS included, as in training).

    Attributes:
        tokens: the completion tokens as strings.
        token_ids: their ids.
        weights: the weights the trainer would apply: TI-DPO's hybrid weights (Eq. 8, scaled per
            `weight_normalization`), or a dataset's (`dataset_row_weights`).
        importance: the normalised gradient attribution `Î` over the span (Eq. 7), restricted to the completion; None
            for weights that do not come from TI-DPO.
        prior: the normalised Gaussian prior `P̂` over the span, restricted to the completion; None likewise.
        fallback: True when the attribution could not be normalised and the weights are the prior alone.
    """

    tokens: list[str]
    token_ids: list[int]
    weights: list[float]
    importance: list[float] | None
    prior: list[float] | None
    fallback: bool


def token_weights(
    model: nn.Module,
    tokenizer,
    prompt: Any,
    completion: Any,
    **weight_options: Any,
) -> TokenWeights:
    """
    The per-token weights `TIDPOTrainer` would give `completion` after `prompt`, with the same tokenisation
    (chat template for conversational data, EOS appended to plain text) and the same attribution and weight code.

    Args:
        model: a causal LM (a `PeftModel` too).
        tokenizer: its tokenizer.
        prompt, completion: strings, or lists of chat messages.
        **weight_options: `importance_lambda`, `prior_sigma_ratio`, `weight_span`, `weight_normalization`, as in
            `TIDPOConfig` (its defaults where not given; `TIDPOConfig.weight_options()` gives a config's).

    Returns:
        `TokenWeights`.
    """
    unknown = set(weight_options) - set(WEIGHT_OPTIONS)
    if unknown:
        raise TypeError(f"token_weights() got unknown option(s) {sorted(unknown)}; the weight options are {WEIGHT_OPTIONS}.")
    options = {**weight_option_defaults(), **weight_options}
    prompt_ids, completion_ids = tokenize_completion(tokenizer, prompt, completion)
    if not completion_ids:
        raise ValueError("The completion is empty after tokenisation: there is no token to weigh.")
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids + completion_ids], device=device)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.tensor([[0] * len(prompt_ids) + [1] * len(completion_ids)], device=device)

    was_training = model.training
    model.eval()
    try:
        raw = attribute_in_own_forward(model, input_ids, attention_mask)
    finally:
        model.train(was_training)
    mixed = completion_token_weights(
        raw,
        completion_mask[:, 1:],  # shifted: position 0 is never scored, as in training
        attention_mask,
        **options,
    )
    start = input_ids.size(1) - len(completion_ids) - 1  # on the shifted axis

    def completion_part(t: torch.Tensor) -> list[float]:
        return t[0, start:].tolist()

    return TokenWeights(
        tokens=tokenizer.convert_ids_to_tokens(completion_ids),
        token_ids=list(completion_ids),
        weights=completion_part(mixed.weights),
        importance=completion_part(mixed.importance),
        prior=completion_part(mixed.prior),
        fallback=bool(mixed.fallback[0]),
    )


@dataclass
class RowWeights:
    """
    The weights the trainer will use for one preference pair of a dataset.

    Attributes:
        source: `"spans"` (the span columns), `"columns"` (`chosen_token_weights`/`rejected_token_weights`),
            `"ti_dpo"` (computed from a model) or `"difference"` (from the pair's own shared and differing tokens).
        prompt_ids: the prompt's token ids as the trainer tokenises it.
        chosen, rejected: each completion's tokens and weights.
        pair_weight: the row's `pair_weight` (None without the column).
    """

    source: str
    prompt_ids: list[int]
    chosen: TokenWeights
    rejected: TokenWeights
    pair_weight: float | None


def dataset_row_weights(
    tokenizer,
    example: dict[str, Any],
    row: int,
    dataset_name: str = "dataset",
    model: nn.Module | None = None,
    token_weighting: str = "auto",
    span_default_weight: float = 1.0,
    difference_weights: tuple[float, float] | None = None,
    **weight_options: Any,
) -> RowWeights:
    """
    The per-token weights `TIDPOTrainer` will use for one dataset row, by the trainer's own functions: its column rule
    and row checks (`check_columns`, `RowChecker`: a row the trainer refuses is refused here, with the same message),
    its preparation (`prepare_dataset`: TRL's tokenisation, implicit prompt, EOS, chat template, span columns mapped
    onto tokens, weight lists checked against the tokens), its collator and its `"difference"` weights. The row is
    shown untruncated (no `max_length`).

    Args:
        tokenizer: the model's tokenizer (a fast one for span columns).
        example (`dict`): the row as the dataset holds it (`prompt`, `chosen`, `rejected`, weight or span columns).
        row (`int`): its index, for messages.
        dataset_name (`str`): the dataset's name, for messages.
        model: a causal LM; needed only for TI-DPO weights.
        token_weighting (`str`): `"dataset"` (span or weight columns), `"ti_dpo"`, `"difference"`, or `"auto"`:
            `"dataset"` when the row has span or weight columns, else `"ti_dpo"`. With `"ti_dpo"` or `"difference"`
            the row's span and weight columns are left out (the trainer refuses them there: they are shown as if
            removed, for comparison).
        span_default_weight (`float`): weight of tokens outside every span (`TIDPOConfig.span_default_weight`).
        difference_weights (`tuple[float, float]`, *optional*): `(difference_shared_weight,
            difference_differing_weight)` of `"difference"`, `TIDPOConfig`'s by default (the row is shown untruncated;
            the trainer compares the pair after `max_length` truncation).
        **weight_options: TI-DPO's weight options (`TIDPOConfig.weight_options()`); `"difference"` reads
            `weight_normalization`.

    Returns:
        `RowWeights`.

    Raises:
        ValueError: naming the row and column of a bad span, weight list, text field or `pair_weight`, or a missing
            source.
    """
    where = f"`{dataset_name}` row {row}"
    given = [column for column in (*SPAN_COLUMNS, *WEIGHT_COLUMNS) if column in example]
    if token_weighting == "auto":
        token_weighting = "dataset" if given else "ti_dpo"
    if token_weighting not in ("dataset", "ti_dpo", "difference"):
        raise ValueError(
            f"`token_weighting` must be 'auto', 'dataset', 'ti_dpo' or 'difference' here, got {token_weighting!r}."
        )
    if token_weighting != "dataset":
        example = {key: value for key, value in example.items() if key not in given}
    args = _row_args(token_weighting, span_default_weight)
    check_columns(args, example, where)
    RowChecker(args, dataset_name, list(example)).check(row, example)
    pair_weight = check_pair_weight(example[PAIR_WEIGHT_COLUMN], where) if PAIR_WEIGHT_COLUMN in example else None
    prepared = _prepare_row(tokenizer, example, row, dataset_name, args)
    prompt_ids = list(prepared["prompt_ids"])
    if token_weighting == "difference":
        if difference_weights is None:
            fields = TIDPOConfig.__dataclass_fields__
            difference_weights = (fields["difference_shared_weight"].default, fields["difference_differing_weight"].default)
        normalization = {**weight_option_defaults(), **weight_options}["weight_normalization"]
        sides = _difference_sides(tokenizer, prepared, *difference_weights, normalization)
        return RowWeights("difference", prompt_ids, *sides, pair_weight)
    if token_weighting == "ti_dpo":
        if model is None:
            raise ValueError(f"{where}: TI-DPO weights need a model (the row has no span or weight columns).")
        sides = [token_weights(model, tokenizer, prepared["prompt"], prepared[side], **weight_options)
                 for side in ("chosen", "rejected")]  # fmt: skip
        return RowWeights("ti_dpo", prompt_ids, *sides, pair_weight)
    sides = []
    for side, column in zip(("chosen", "rejected"), WEIGHT_COLUMNS, strict=True):
        ids, weights = list(prepared[f"{side}_ids"]), [float(w) for w in prepared[column]]  # checked by the preparation
        sides.append(TokenWeights(tokenizer.convert_ids_to_tokens(ids), ids, weights, None, None, False))
    source = "spans" if any(column in given for column in SPAN_COLUMNS) else "columns"
    return RowWeights(source, prompt_ids, *sides, pair_weight)


def _row_args(token_weighting: str, span_default_weight: float) -> SimpleNamespace:
    """What the trainer's checks and preparation read of a `TIDPOConfig`, for one row shown untruncated and without
    the triplet loss (a `TIDPOConfig` is not built: it is a `TrainingArguments`, with its warnings and state)."""
    return SimpleNamespace(
        token_weighting=token_weighting, span_default_weight=span_default_weight, max_length=None,
        truncation_mode="keep_start", dataset_num_proc=None, triplet_gamma=0.0, anchor_source="policy",
    )  # fmt: skip


def _trl_tokenize(dataset: Dataset, processing_class, args, dataset_name: str) -> Dataset:
    """TRL's preparation (`DPOTrainer._prepare_dataset`), which reads only `_tokenizer` of its trainer."""
    return DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=processing_class), dataset, processing_class, args,
                                       dataset_name)  # fmt: skip


def _prepare_row(tokenizer, example: dict, row: int, dataset_name: str, args: SimpleNamespace) -> dict:
    """The row prepared by the trainer's `prepare_dataset`, as a one-row dataset (whose row 0 messages call `row`)."""
    try:
        return prepare_dataset(Dataset.from_list([example]), tokenizer, args, dataset_name, tokenize=_trl_tokenize)[0]
    except ValueError as error:
        raise ValueError(str(error).replace(f"`{dataset_name}` row 0", f"`{dataset_name}` row {row}")) from None


def _difference_sides(
    tokenizer, prepared: dict, shared_weight: float, differing_weight: float, normalization: str
) -> list[TokenWeights]:
    """`token_weighting="difference"` weights of one prepared pair: the trainer's collator, then its batch function."""
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = DataCollatorForTIDPO(pad_token_id=pad_token_id)([prepared])
    mask = batch["completion_mask"][:, 1:]  # [2, T-1] shifted
    mixed = pair_difference_weights(batch["input_ids"], mask, shared_weight, differing_weight, normalization)
    sides = []
    for row, side in enumerate(("chosen", "rejected")):
        ids, fallback = list(prepared[f"{side}_ids"]), bool(mixed.fallback[row])
        weights = mixed.weights[row][mask[row].bool()].tolist()
        sides.append(TokenWeights(tokenizer.convert_ids_to_tokens(ids), ids, weights, None, None, fallback))
    return sides
