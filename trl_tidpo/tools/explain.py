"""Per-token TI-DPO weights of any (model, tokenizer, prompt, completion), and the weights the trainer will use for
one dataset row (span columns, weight columns or TI-DPO's), for inspection."""

import math
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from torch import nn

from ..modeling.attribution import attribute_in_own_forward
from ..modeling.tis_dpo import tokenize_preference_dataset
from ..modeling.tokenization import tokenize_completion
from ..modeling.weight_columns import PAIR_WEIGHT_COLUMN, WEIGHT_COLUMNS, check_pair_weight
from ..modeling.weight_spans import (
    SPAN_COLUMNS,
    add_span_weight_columns,
    check_offsets_support,
    record_span_source,
    span_columns_of,
)
from ..ops.importance import completion_token_weights
from ..ops.pair_alignment import align_pair_completions, difference_token_weights
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
    The per-token weights `TIDPOTrainer` will use for one dataset row, tokenised as the trainer tokenises it (TRL's
    preparation: implicit prompt, EOS, chat template).

    Args:
        tokenizer: the model's tokenizer (a fast one for span columns).
        example (`dict`): the row as the dataset holds it (`prompt`, `chosen`, `rejected`, weight or span columns).
        row (`int`): its index, for messages.
        dataset_name (`str`): the dataset's name, for messages.
        model: a causal LM; needed only for TI-DPO weights.
        token_weighting (`str`): `"dataset"` (span or weight columns), `"ti_dpo"`, `"difference"`, or `"auto"`:
            `"dataset"` when the row has span or weight columns, else `"ti_dpo"`.
        span_default_weight (`float`): weight of tokens outside every span (`TIDPOConfig.span_default_weight`).
        difference_weights (`tuple[float, float]`, *optional*): `(difference_shared_weight,
            difference_differing_weight)` of `"difference"`, `TIDPOConfig`'s by default (the row is shown untruncated;
            the trainer compares the pair after `max_length` truncation).
        **weight_options: TI-DPO's weight options (`TIDPOConfig.weight_options()`); `"difference"` reads
            `weight_normalization`.

    Returns:
        `RowWeights`.

    Raises:
        ValueError: naming the row and column of a bad span, weight list or `pair_weight`, or a missing source.
    """
    where = f"`{dataset_name}` row {row}"
    spans = span_columns_of(example)
    lists = [column for column in WEIGHT_COLUMNS if column in example]
    if spans and lists:
        raise ValueError(f"{where}: has both span columns {spans} and token weight columns {lists}; give one of them.")
    if token_weighting == "auto":
        token_weighting = "dataset" if spans or lists else "ti_dpo"
    if token_weighting == "dataset" and not (spans or len(lists) == 2):
        raise ValueError(
            f"{where}: `token_weighting='dataset'` needs the span columns {list(SPAN_COLUMNS)} or both weight columns "
            f"{list(WEIGHT_COLUMNS)}; the row has {sorted(example)}."
        )
    if token_weighting not in ("dataset", "ti_dpo", "difference"):
        raise ValueError(
            f"`token_weighting` must be 'auto', 'dataset', 'ti_dpo' or 'difference' here, got {token_weighting!r}."
        )
    pair_weight = example.get(PAIR_WEIGHT_COLUMN)
    if PAIR_WEIGHT_COLUMN in example:
        pair_weight = check_pair_weight(pair_weight, where)
    example = dict(example)
    if token_weighting == "dataset" and spans:
        check_offsets_support(tokenizer)
        example.update(record_span_source(example, row, dataset_name, implicit_prompt="prompt" not in example))
    elif token_weighting in ("ti_dpo", "difference"):  # the trainer would not read them: left out of the preparation
        example = {key: value for key, value in example.items() if key not in (*SPAN_COLUMNS, *WEIGHT_COLUMNS)}
    prepared = tokenize_preference_dataset(Dataset.from_list([example]), tokenizer)
    if token_weighting == "dataset" and spans:
        prepared = add_span_weight_columns(prepared, tokenizer, span_default_weight, dataset_name)
    prepared = prepared[0]
    if token_weighting == "difference":
        if difference_weights is None:
            fields = TIDPOConfig.__dataclass_fields__
            difference_weights = (fields["difference_shared_weight"].default, fields["difference_differing_weight"].default)
        normalization = {**weight_option_defaults(), **weight_options}["weight_normalization"]
        sides = _difference_sides(tokenizer, prepared, *difference_weights, normalization)
        return RowWeights("difference", list(prepared["prompt_ids"]), *sides, pair_weight)
    if token_weighting == "ti_dpo":
        if model is None:
            raise ValueError(f"{where}: TI-DPO weights need a model (the row has no span or weight columns).")
        sides = [token_weights(model, tokenizer, prepared["prompt"], prepared[side], **weight_options)
                 for side in ("chosen", "rejected")]  # fmt: skip
        return RowWeights("ti_dpo", list(prepared["prompt_ids"]), *sides, pair_weight)
    sides = []
    for side, column in zip(("chosen", "rejected"), WEIGHT_COLUMNS, strict=True):
        ids, weights = list(prepared[f"{side}_ids"]), [float(w) for w in prepared[column]]
        if len(weights) != len(ids):
            raise ValueError(
                f"{where}: `{column}` has {len(weights)} weights but the tokenised {side} completion has {len(ids)} "
                "tokens (one weight per completion token as the trainer tokenises it, EOS included for plain text)."
            )
        bad = [w for w in weights if not math.isfinite(w) or w < 0]
        if bad:
            raise ValueError(f"{where}: `{column}` holds {bad[0]!r}; token weights must be finite and >= 0.")
        sides.append(TokenWeights(tokenizer.convert_ids_to_tokens(ids), ids, weights, None, None, False))
    return RowWeights("spans" if spans else "columns", list(prepared["prompt_ids"]), *sides, pair_weight)


def _difference_sides(
    tokenizer, prepared: dict, shared_weight: float, differing_weight: float, normalization: str
) -> list[TokenWeights]:
    """`token_weighting="difference"` weights of one prepared pair, by the trainer's functions on a 2-row batch."""
    prompt = list(prepared["prompt_ids"])
    completions = [list(prepared["chosen_ids"]), list(prepared["rejected_ids"])]
    width = len(prompt) + max(len(ids) for ids in completions)
    rows = [prompt + ids + [0] * (width - len(prompt) - len(ids)) for ids in completions]
    masks = [[0] * len(prompt) + [1] * len(ids) + [0] * (width - len(prompt) - len(ids)) for ids in completions]
    input_ids, completion_mask = torch.tensor(rows), torch.tensor(masks)
    alignment = align_pair_completions(input_ids, completion_mask)
    mixed = difference_token_weights(
        alignment.shared, completion_mask[:, 1:], shared_weight, differing_weight, normalization
    )
    sides = []
    for row, ids in enumerate(completions):
        start = len(prompt) - 1  # on the shifted axis
        weights = mixed.weights[row, start : start + len(ids)].tolist()
        sides.append(TokenWeights(tokenizer.convert_ids_to_tokens(ids), ids, weights, None, None, bool(mixed.fallback[row])))
    return sides
