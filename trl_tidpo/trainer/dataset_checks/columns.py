"""
Checks of a preference dataset's columns, at construction, before anything loads or tokenises: the columns each
configuration needs, and the column rule of the token weights (which `token_weighting` reads, refuses or needs them).
"""

from datasets import Dataset

from ...modeling.tis_dpo import CONTRASTIVE_WEIGHTINGS
from ...modeling.weight_cache import TOKENIZED_COLUMNS
from ...modeling.weight_columns import WEIGHT_COLUMNS
from ...modeling.weight_spans import SPAN_COLUMNS, check_one_weight_source, span_columns_of
from ..tidpo_config import TIDPOConfig


def named_datasets(train_dataset, eval_dataset) -> dict:
    """The train dataset and each eval dataset, by the name an error message gives them."""
    datasets = {"train_dataset": train_dataset}
    if isinstance(eval_dataset, dict):
        datasets.update({f"eval_dataset[{key!r}]": ds for key, ds in eval_dataset.items()})
    elif eval_dataset is not None:
        datasets["eval_dataset"] = eval_dataset
    return {name: dataset for name, dataset in datasets.items() if dataset is not None}


def reads_dataset_anchors(args: TIDPOConfig) -> bool:
    """Whether the triplet loss reads the dataset's 'anchor' column (`anchor_source="dataset"`, `triplet_gamma > 0`)."""
    return args.triplet_gamma > 0 and args.anchor_source == "dataset"


def token_weight_columns_read(token_weighting: str, columns) -> list[str]:
    """The `*_token_weights` columns among `columns` that `token_weighting` reads: those present under `"dataset"`,
    none otherwise (`check_token_weight_columns` refuses them there)."""
    return [column for column in WEIGHT_COLUMNS if column in columns] if token_weighting == "dataset" else []


def check_token_weight_columns(token_weighting: str, columns, where: str) -> list[str]:
    """
    The column rule of the token weights. `token_weighting="dataset"` reads them one way: the span columns
    (`*_weight_spans`, on an untokenised dataset) or both `*_token_weights` columns. Every other `token_weighting`
    refuses both kinds (`"tis_dpo"` and `"cdpo"` compute the weight columns themselves; the others would ignore them).

    Args:
        token_weighting (`str`): `TIDPOConfig.token_weighting`.
        columns: the dataset's columns (or one row's keys).
        where (`str`): the dataset (and row), for messages (`"`train_dataset`"`).

    Returns:
        `list[str]`: the weight columns that must be there (to be reported missing with the other needed columns).

    Raises:
        ValueError: naming the columns, `token_weighting` and the fix.
    """
    spans = span_columns_of(columns)
    lists = [column for column in WEIGHT_COLUMNS if column in columns]
    if token_weighting != "dataset":
        if spans:
            raise ValueError(
                f"{where} has the span column(s) {spans}, which only `token_weighting='dataset'` reads, but "
                f"`token_weighting` is {token_weighting!r}. Set `token_weighting='dataset'` or remove the columns."
            )
        if lists and token_weighting in CONTRASTIVE_WEIGHTINGS:
            raise ValueError(
                f"{where} already has token weight columns, which `token_weighting={token_weighting!r}` computes "
                "itself. "
                "Use `token_weighting='dataset'` to train on them, or remove them to recompute."
            )
        if lists:
            raise ValueError(
                f"{where} has the token weight column(s) {lists}, which `token_weighting={token_weighting!r}` does "
                f"not read: they would be ignored. Set `token_weighting='dataset'` to train on them, or remove them "
                f"(`dataset.remove_columns({lists})`)."
            )
        return []
    check_one_weight_source(columns, where)
    if spans and set(TOKENIZED_COLUMNS) <= set(columns):
        raise ValueError(
            f"{where} is already tokenised ({list(TOKENIZED_COLUMNS)}), so the trainer cannot place the character "
            f"spans {spans} on its tokens. Pass the text columns ('prompt', 'chosen', 'rejected') untokenised, or give "
            f"{list(WEIGHT_COLUMNS)} instead."
        )
    return [] if spans else list(WEIGHT_COLUMNS)


def _missing_column_hint(missing: list[str]) -> str:
    if "anchor" in missing:
        return (
            " The 'anchor' column is required by `anchor_source='dataset'` (with `triplet_gamma > 0`); use "
            "`anchor_source='policy'` to sample anchors instead, or `triplet_gamma=0` to disable the triplet loss."
        )
    if set(WEIGHT_COLUMNS) & set(missing):
        return (
            f" `token_weighting='dataset'` reads one weight per completion token from these columns (or character "
            f"spans from {list(SPAN_COLUMNS)})."
        )
    return " A preference dataset needs 'chosen' and 'rejected' (and optionally 'prompt')."


def check_columns(args: TIDPOConfig, columns, where: str) -> None:
    """
    Refuse the columns of one dataset (or row) that `args` cannot train on: 'chosen'/'rejected' (unless tokenised),
    a dataset 'anchor' when the triplet loss reads it, and the token weights' column rule
    (`check_token_weight_columns`).

    Raises:
        ValueError: naming `where`, the missing or refused columns and the fix.
    """
    columns = list(columns)
    required = [] if set(TOKENIZED_COLUMNS) <= set(columns) else ["chosen", "rejected"]
    if reads_dataset_anchors(args) and "anchor_ids" not in columns:
        required.append("anchor")
    required.extend(check_token_weight_columns(args.token_weighting, columns, where))
    missing = [column for column in required if column not in columns]
    if missing:
        raise ValueError(f"{where} is missing column(s) {missing}; it has {columns}.{_missing_column_hint(missing)}")


def check_dataset_columns(args: TIDPOConfig, train_dataset, eval_dataset) -> None:
    """Fail at construction on a dataset that cannot train: no rows, or columns `check_columns` refuses."""
    for name, dataset in named_datasets(train_dataset, eval_dataset).items():
        if isinstance(dataset, Dataset) and len(dataset) == 0:
            raise ValueError(f"`{name}` is empty: TIDPOTrainer needs at least one preference pair.")
        check_columns(args, dataset.column_names or list(next(iter(dataset)).keys()), f"`{name}`")
