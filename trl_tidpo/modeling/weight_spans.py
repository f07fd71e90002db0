"""
Token weights written as character spans: `chosen_weight_spans` / `rejected_weight_spans`, each a list of
`[start_char, end_char, weight]` over the completion's text (for conversational data, over the assistant message's
`content`). They are mapped onto the trainer's own tokenisation (chat template, EOS) with the fast tokenizer's
`offset_mapping` and become the `chosen_token_weights` / `rejected_token_weights` columns that
`token_weighting="dataset"` reads; the collator then truncates them with the rows.

Character positions are Python string indices (code points), `end_char` exclusive. For a dataset without a `prompt`
column (implicit prompt), plain-text spans index the `chosen`/`rejected` text as given (prompt included).
"""

from itertools import pairwise
from typing import Any

from datasets import Dataset
from trl.data_utils import is_conversational

from .weight_columns import WEIGHT_COLUMNS, check_token_weights, is_weight

SPAN_COLUMNS = ("chosen_weight_spans", "rejected_weight_spans")
# A helper column carried through TRL's preparation (see `record_span_source`), removed once the spans are mapped
SPAN_SOURCE_COLUMN = "_span_source"


def span_columns_of(columns) -> list[str]:
    """The span columns among `columns`, in `SPAN_COLUMNS` order."""
    return [column for column in SPAN_COLUMNS if column in columns]


def check_one_weight_source(columns, where: str) -> None:
    """
    Refuse span columns beside token weight columns: `token_weighting="dataset"` reads the weights one way or the
    other, never both.

    Args:
        columns: the dataset's columns (or one row's keys).
        where (`str`): the dataset (and row), for the message.

    Raises:
        ValueError: naming both sets of columns.
    """
    spans = span_columns_of(columns)
    given = [column for column in WEIGHT_COLUMNS if column in columns]
    if spans and given:
        raise ValueError(
            f"{where} has both span columns {spans} and token weight columns {given}: give the weights one way, "
            f"either as character spans ({list(SPAN_COLUMNS)}) or as one weight per token ({list(WEIGHT_COLUMNS)})."
        )


def completion_text(completion: Any, where: str) -> str:
    """
    The text a span indexes: the completion string, or the content of a conversational completion's last message
    (the assistant's answer).

    Raises:
        ValueError: naming `where` (row and column) when the last message has no string content.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    raise ValueError(
        f"{where}: spans index the completion's text, but this completion is neither a string nor a list of messages "
        f"whose last message has a string 'content'."
    )


def check_spans(spans: Any, text_length: int, where: str) -> list[tuple[int, int, float]]:
    """
    Check one row's spans and return them sorted by start.

    A row's spans may be None or empty (every token takes the default weight). Each span is `[start, end, weight]`:
    integers `0 <= start < end <= text_length`, a finite weight `>= 0`; spans may touch but not overlap.

    Raises:
        ValueError: naming `where` (the dataset, row and column) and the bad span.
    """
    if spans is None:
        return []
    if not isinstance(spans, (list, tuple)):
        raise ValueError(f"{where}: expected a list of [start_char, end_char, weight] spans, got {spans!r}.")
    checked = []
    for span in spans:
        if not isinstance(span, (list, tuple)) or len(span) != 3:
            raise ValueError(f"{where}: each span is [start_char, end_char, weight], got {span!r}.")
        start, end, weight = span
        shown = _show(span)
        if not all(_is_integral(v) for v in (start, end)):
            raise ValueError(f"{where}: span {shown} needs integer character positions.")
        if not is_weight(weight):
            raise ValueError(f"{where}: span {shown} has weight {weight!r}; weights must be finite and >= 0.")
        start, end = int(start), int(end)
        if not 0 <= start < end <= text_length:
            raise ValueError(
                f"{where}: span {shown} is out of range or empty; it needs 0 <= start < end <= {text_length} "
                f"(the completion text's length; end is exclusive)."
            )
        checked.append((start, end, float(weight)))
    checked.sort()
    for (start, end, _), (next_start, next_end, _) in pairwise(checked):
        if next_start < end:
            raise ValueError(
                f"{where}: spans [{start}, {end}) and [{next_start}, {next_end}) overlap; give each character at most "
                f"one weight."
            )
    return checked


def _show(span) -> str:
    """A span as the user wrote it (Arrow stores `[0, 5, 2]` as floats): integral positions without `.0`."""
    start, end, weight = (int(v) if _is_integral(v) and i < 2 else v for i, v in enumerate(span))
    return f"[{start}, {end}, {weight}]"


def _is_integral(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def spans_to_token_weights(
    spans: list[tuple[int, int, float]],
    offsets: list[tuple[int, int]],
    text_start: int,
    default_weight: float,
    bounds: tuple[int, int] | None = None,
) -> list[float]:
    """
    One weight per token: the weight of the span a token's characters overlap (a token straddling a span's edge takes
    the span's weight), else `default_weight`. A token overlapping two spans takes the larger weight.

    Args:
        spans: checked `(start, end, weight)` over the completion text.
        offsets: `(start, end)` character offsets of the tokens in the tokenised string.
        text_start: where the completion text begins in that string (span `s` covers characters `text_start + s`...).
        default_weight: the weight of tokens outside every span.
        bounds: `(start, end)` in the tokenised string that the spans are clipped to (the text that is actually
            there, when a chat template trimmed the content's whitespace); by default the spans are not clipped.

    Returns:
        `list[float]`, `len(offsets)` weights.
    """
    placed = [(text_start + s, text_start + e, w) for s, e, w in spans]
    if bounds is not None:
        placed = [(max(s, bounds[0]), min(e, bounds[1]), w) for s, e, w in placed]
        placed = [(s, e, w) for s, e, w in placed if s < e]
    weights = []
    for token_start, token_end in offsets:
        covering = [w for s, e, w in placed if token_start < e and s < token_end]
        weights.append(max(covering) if covering else default_weight)
    return weights


def _rendered_completion(
    processing_class, example: dict, side: str, source: dict, where: str
) -> tuple[str, int, bool, tuple[int, int] | None]:
    """
    The string TRL tokenises for `prompt + side` of one prepared example, where the span text starts in it, whether
    special tokens are added (plain text: as the tokenizer's `__call__`; chat template: no, the template writes them),
    and, when the template trimmed the content, the bounds of the content that is there (else None).
    """
    from .tokenization import chat_template_kwargs_of

    prompt, completion = example["prompt"], example[side]
    if not is_conversational({"prompt": prompt}):
        # TRL tokenises `prompt + completion`; an implicit prompt was cut from the text the spans index
        return prompt + completion, 0 if source["implicit_prompt"] else len(prompt), True, None
    if len(completion) != 1:
        raise ValueError(
            f"{where}: spans need a completion of exactly one (assistant) message, got {len(completion)} messages."
        )
    kwargs = chat_template_kwargs_of(example)
    full = processing_class.apply_chat_template(prompt + completion, tokenize=False, **kwargs)
    prompt_only = processing_class.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
    lower = next((i for i, (a, b) in enumerate(zip(prompt_only, full)) if a != b), min(len(prompt_only), len(full)))
    content = completion[0]["content"]
    position = full.find(content, lower)
    if position >= 0:
        return full, position, False, None
    # A template that trims the content: spans keep indexing the untrimmed text, clipped to what is rendered
    stripped = content.strip()
    found = full.find(stripped, lower) if stripped else -1
    if found < 0:
        raise ValueError(
            f"{where}: the assistant content was not found in the chat template's rendering, so its spans cannot be "
            f"placed on tokens (the template rewrites the content). Give `chosen_token_weights`/"
            f"`rejected_token_weights` instead."
        )
    return full, found - (len(content) - len(content.lstrip())), False, (found, found + len(stripped))


def example_span_weights(
    example: dict, processing_class, default_weight: float, dataset_name: str
) -> dict[str, list[float]]:
    """
    The token weight columns of one example prepared by TRL (with `prompt_ids`, `chosen_ids`, `rejected_ids`, the
    text columns as TRL rewrote them, and the `_span_source` that `record_span_source` wrote before), from its span
    columns; a side without spans gets `default_weight` everywhere.

    Returns:
        `dict`: `chosen_token_weights` and `rejected_token_weights`, one float per `chosen_ids` / `rejected_ids` token.
    """
    source = example[SPAN_SOURCE_COLUMN]
    row = f"`{dataset_name}` row {source['row']}"
    output = {}
    for side, column in zip(("chosen", "rejected"), WEIGHT_COLUMNS, strict=True):
        span_column = f"{side}_weight_spans"
        weights = _side_span_weights(example, processing_class, side, source, default_weight, f"{row}, `{span_column}`")
        # all 0 (spans of weight 0 and `default_weight=0`) trains the pair on one side only: refused as a list is
        output[column] = check_token_weights(weights, span_column, f"{row} (`span_default_weight={default_weight}`)")
    return output


def _side_span_weights(
    example: dict, processing_class, side: str, source: dict, default_weight: float, where: str
) -> list[float]:
    """One side's token weights from its spans (`default_weight` everywhere when it has none)."""
    span_column = f"{side}_weight_spans"
    completion_ids = list(example[f"{side}_ids"])
    if example.get(span_column) is None:
        return [float(default_weight)] * len(completion_ids)
    spans = check_spans(example[span_column], source[f"{side}_length"], where)
    text, text_start, add_special, bounds = _rendered_completion(processing_class, example, side, source, where)
    encoding = processing_class(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    if len(completion_ids) > len(ids) or ids[len(ids) - len(completion_ids) :] != completion_ids:
        raise ValueError(
            f"{where}: tokenising the rendered text with offsets does not reproduce the trainer's `{side}_ids`, so the "
            f"spans cannot be placed on tokens. Give `{side}_token_weights` instead."
        )
    completion_offsets = offsets[len(ids) - len(completion_ids) :]
    return spans_to_token_weights(spans, completion_offsets, text_start, default_weight, bounds)


def check_offsets_support(processing_class) -> None:
    """Refuse a tokenizer without character offsets (a slow, Python tokenizer)."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"The span columns {list(SPAN_COLUMNS)} are mapped onto tokens with the tokenizer's character offsets, "
            f"which only fast tokenizers give; `{type(tokenizer).__name__}` is a slow one. Load the fast tokenizer "
            "(`AutoTokenizer.from_pretrained(..., use_fast=True)`) or give `chosen_token_weights`/"
            "`rejected_token_weights` instead."
        )


def validate_span_rows(dataset, dataset_name: str) -> None:
    """
    Check every row's span columns against the raw (untokenised) dataset, so that each error names the row as the
    user numbers it: in range of the completion text, start < end, finite non-negative weights, no overlap. A
    streamed dataset is checked row by row as it is read (`add_span_weight_columns`).

    Raises:
        ValueError: naming the dataset, row, column and span.
    """
    if not isinstance(dataset, Dataset):
        return
    for column in span_columns_of(dataset.column_names):
        side = column.split("_")[0]
        for index, (spans, completion) in enumerate(zip(dataset[column], dataset[side], strict=True)):
            where = f"`{dataset_name}` row {index}, `{column}`"
            if spans is not None:
                check_spans(spans, len(completion_text(completion, where)), where)


def record_span_source(example: dict, index: int, dataset_name: str, implicit_prompt: bool) -> dict:
    """
    Before TRL's preparation (which extracts implicit prompts, appends EOS and may drop rows): the row's number, the
    length of the text each side's spans index, and whether the prompt is implicit, in one `_span_source` column.
    """
    source = {"row": index, "implicit_prompt": implicit_prompt}
    for side in ("chosen", "rejected"):
        where = f"`{dataset_name}` row {index}, `{side}_weight_spans`"
        has_spans = example.get(f"{side}_weight_spans") is not None
        source[f"{side}_length"] = len(completion_text(example[side], where)) if has_spans else 0
    return {SPAN_SOURCE_COLUMN: source}


def add_span_weight_columns(
    dataset, processing_class, default_weight: float, dataset_name: str, num_proc: int | None = None
):
    """
    `dataset` (prepared by TRL, still carrying the span columns and `_span_source`) with `chosen_token_weights` and
    `rejected_token_weights` computed from the spans; the span helper columns are removed.

    Raises:
        ValueError: for a slow tokenizer, or a row whose spans cannot be placed (naming the row and column).
    """
    check_offsets_support(processing_class)
    helper_columns = [c for c in (*SPAN_COLUMNS, SPAN_SOURCE_COLUMN) if c in next(iter(dataset))]
    map_kwargs = {}
    if isinstance(dataset, Dataset):  # `IterableDataset.map` takes neither
        map_kwargs = {"desc": f"Mapping weight spans of {dataset_name} dataset", "num_proc": num_proc}
    return dataset.map(
        example_span_weights,
        fn_kwargs={"processing_class": processing_class, "default_weight": default_weight, "dataset_name": dataset_name},
        remove_columns=helper_columns,
        **map_kwargs,
    )
