"""
Per-token columns computed once before training and cached with the dataset: the content-keyed Arrow cache shared by
every precompute, the loop that shards a precompute across ranks as TRL's `precompute_ref_log_probs` does, the helper
that applies a precompute to the train set and each eval set, the reference model's TI-DPO weights
(`importance_model="reference"`) and the reference's per-token log-probs (`precompute_ref_log_probs=True`).
"""

import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, tqdm
from datasets import Dataset, IterableDataset, concatenate_datasets
from datasets.fingerprint import Hasher, get_temporary_cache_files_directory, is_caching_enabled
from torch import nn
from torch.utils.data import DataLoader
from trl.trainer.utils import hash_module

from ..ops.importance import HybridWeights
from .collator import DataCollatorForTIDPO
from .contrastive_scoring import columns_fingerprint
from .forwards import AnchorBatch, PairBatch
from .weight_columns import weights_to_lists


TOKENIZED_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]


def map_train_and_eval(
    function: Callable[[Dataset, str], Dataset], train_dataset: Dataset | None, eval_dataset
) -> tuple[Any, Any]:
    """
    `function(dataset, name)` applied to the train dataset (named "train") and to each eval dataset (named "eval" or
    by its key in an eval dict). Returns the new `(train_dataset, eval_dataset)`, in the shapes given.
    """
    if train_dataset is not None:
        train_dataset = function(train_dataset, "train")
    if isinstance(eval_dataset, dict):
        eval_dataset = {name: function(dataset, name) for name, dataset in eval_dataset.items()}
    elif eval_dataset is not None:
        eval_dataset = function(eval_dataset, "eval")
    return train_dataset, eval_dataset


def cached_columns(
    accelerator: Accelerator,
    dataset: Dataset,
    name: str,
    key: Any,
    compute: Callable[[], dict[str, list]],
    *,
    what: str = "token weights",
    columns: Sequence[str] = TOKENIZED_COLUMNS,
) -> Dataset:
    """
    `dataset` plus the columns `compute()` returns (a dict of lists, one entry per row), read from an Arrow cache file
    or computed and written there by the main process. `compute()` runs on every rank (the precomputes shard their
    work across ranks and gather it, so it is a collective call).

    The file is keyed by the contents of `columns` (the tokenised columns) and `key` (models, settings), not by
    `dataset._fingerprint`, which after TRL's preparation hashes the whole training config. Its path is deterministic
    (TRL's `_get_cache_file_path` draws a random one for in-memory datasets) and every rank takes the same branch, so
    later runs and other processes reuse it. `what` names the columns in the caching progress bar.
    """
    fingerprint = [Hasher.hash((columns_fingerprint(dataset, list(columns)), key))]
    broadcast_object_list(fingerprint, from_process=0)  # one cache file for all ranks
    directory = (
        os.path.dirname(dataset.cache_files[0]["filename"])
        if is_caching_enabled() and dataset.cache_files
        else get_temporary_cache_files_directory()
    )
    cache_file = os.path.join(directory, f"cache-{fingerprint[0]}.arrow")
    accelerator.wait_for_everyone()
    # Every rank must take the same branch (the compute is collective), but an in-memory dataset's cache sits in a
    # per-process temporary folder where only the main process wrote it: read it only where every rank has it
    if all(gather_object([os.path.exists(cache_file)])):
        computed = Dataset.from_file(cache_file)
    else:
        computed = Dataset.from_dict(compute())
        if accelerator.is_main_process:
            computed = computed.map(
                new_fingerprint=fingerprint[0], cache_file_name=cache_file, desc=f"Caching {what} of {name}"
            )
    return concatenate_datasets([dataset, computed], axis=1)


def precompute_in_shards(
    accelerator: Accelerator,
    dataset: Dataset,
    *,
    batch_size: int,
    compute: Callable[[Dataset], dict[str, list]],
    desc: str,
) -> dict[str, list]:
    """
    `compute(rows)` over all of `dataset`, sharded across ranks as TRL's `precompute_ref_log_probs` is: batches of
    `batch_size` rows are dealt to the ranks by an `accelerator.prepare`d data loader (the last ones padded with repeated
    rows so that every rank runs as many batches), and each step's results are gathered with `gather_for_metrics`, which
    drops the repeats, so every rank ends with every row's result in dataset order. A progress bar with TRL's look
    (`desc`, main process only, off with `TQDM_DISABLE`) counts this rank's batches.

    Args:
        compute: `rows -> {column: one entry per row of rows}` for a `Dataset` of at most `batch_size` rows.

    Returns:
        `dict[str, list]`: each column over every row of `dataset`, in order.
    """
    loader = DataLoader(range(len(dataset)), batch_size=batch_size, collate_fn=list, shuffle=False)
    loader = accelerator.prepare(loader)
    columns: dict[str, list] = {}
    for indices in tqdm(loader, desc=desc, disable=bool(os.environ.get("TQDM_DISABLE", ""))):
        computed = compute(dataset.select(indices))
        rows = accelerator.gather_for_metrics(list(zip(*computed.values(), strict=True)), use_gather_object=True)
        for column, values in zip(computed, zip(*rows, strict=True), strict=True):
            columns.setdefault(column, []).extend(values)
    return columns


def hash_model(module: nn.Module) -> str:
    """
    TRL's `hash_module` of the full parameters, a cache key of the model. Under ZeRO-3 a rank holds a partition of each
    parameter (an empty tensor in `state_dict`), which would give every model of one architecture the same hash and so
    reuse another model's cached weights: each parameter is gathered in turn (collective, same order on every rank).
    """
    if not any(hasattr(param, "ds_id") for param in module.parameters()):
        return hash_module(module)
    import deepspeed

    digest = hashlib.sha256()
    tensors = sorted([*module.named_parameters(), *module.named_buffers()], key=lambda item: item[0])
    for _, tensor in tensors:
        with deepspeed.zero.GatheredParameters([tensor] if hasattr(tensor, "ds_id") else []):
            value = tensor.detach().cpu()
            digest.update(str(value.dtype).encode())
            digest.update(value.float().numpy().tobytes())
    return digest.hexdigest()


def require_map_style(dataset, name: str, what: str, instead: str) -> None:
    """Precomputes read the whole dataset before training: refuse an `IterableDataset`, naming the option to change."""
    if isinstance(dataset, IterableDataset):
        raise ValueError(f"{what} needs a map-style `Dataset`, but the {name} dataset is an `IterableDataset`; {instead}")


def reference_weight_lists(
    dataset: Dataset,
    *,
    accelerator: Accelerator,
    collator: DataCollatorForTIDPO,
    batch_size: int,
    attribute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weigh: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], HybridWeights],
    truncation_mode: str,
    name: str = "train",
) -> tuple[dict[str, list[list[float]]], int]:
    """
    The reference's TI-DPO weights of every pair of `dataset`, as the two weight columns (one list per row), sharded
    across ranks (`precompute_in_shards`).

    Args:
        attribute: `(input_ids, attention_mask) -> raw importance [2b, T]` of a collated batch's rows.
        weigh: `(raw_importance, completion_mask [2b, T-1], attention_mask [2b, T]) -> HybridWeights`.

    Returns:
        `tuple`: the columns, and the number of rows that fell back to the prior.
    """

    def compute(rows: Dataset) -> dict[str, list]:
        batch = {k: v.to(accelerator.device) for k, v in collator(list(rows)).items()}
        raw = attribute(batch["input_ids"], batch["attention_mask"])
        mixed = weigh(raw, batch["completion_mask"][:, 1:], batch["attention_mask"])
        full = F.pad(mixed.weights, (1, 0), value=0.0)  # back to the unshifted axis of `input_ids`
        lengths = [len(ids) for ids in rows["chosen_ids"]] + [len(ids) for ids in rows["rejected_ids"]]
        lists = weights_to_lists(full, batch["completion_mask"], lengths, truncation_mode)
        b = len(rows)
        fallback = mixed.fallback.view(2, b).sum(dim=0).tolist()  # per pair: its chosen and rejected rows
        return {"chosen_token_weights": lists[:b], "rejected_token_weights": lists[b:], "fallback": fallback}

    columns = precompute_in_shards(
        accelerator,
        dataset.select_columns(TOKENIZED_COLUMNS),
        batch_size=batch_size,
        compute=compute,
        desc=f"Computing reference token weights for {name} dataset",
    )
    fallback_rows = sum(columns.pop("fallback"))
    return columns, fallback_rows


REF_LOGP_COLUMNS = ("chosen_ref_token_logps", "rejected_ref_token_logps")
ANCHOR_REF_LOGP_COLUMN = "anchor_ref_token_logps"


def reference_logp_lists(
    dataset: Dataset,
    *,
    accelerator: Accelerator,
    collator: DataCollatorForTIDPO,
    batch_size: int,
    score_pairs: Callable[[PairBatch], torch.Tensor],
    score_anchors: Callable[[AnchorBatch], torch.Tensor] | None,
    truncation_mode: str,
    name: str = "train",
) -> dict[str, list[list[float]]]:
    """
    The reference's log-prob of every completion token of `dataset` (`precompute_ref_log_probs=True`), per token
    rather than TRL's sums: the token-weighted margin needs `Σ_j w_j log πref(y_j)` with weights known only at the step,
    and the triplet distances the per-token log-ratios. Sharded across ranks (`precompute_in_shards`).

    Columns (the layout of the weight columns, `weight_columns.py`: one float per token of `chosen_ids` /
    `rejected_ids` / `anchor_ids`, 0.0 on tokens the collator truncates away and on a first token nothing scores):
    `chosen_ref_token_logps`, `rejected_ref_token_logps`, and with `score_anchors` `anchor_ref_token_logps`.

    Args:
        score_pairs: `PairBatch -> [2b, T-1]` the reference's per-token log-probs (TRL's shifted axis).
        score_anchors: `AnchorBatch -> [b, T_a-1]` the same for the dataset anchors' rows, or None (no anchors).

    Returns:
        `dict[str, list[list[float]]]`.
    """
    columns = [*TOKENIZED_COLUMNS, "anchor_ids"] if score_anchors is not None else TOKENIZED_COLUMNS

    def compute(rows: Dataset) -> dict[str, list]:
        batch = {k: v.to(accelerator.device) for k, v in collator(list(rows)).items()}
        pairs = PairBatch.from_inputs(batch)
        logps = F.pad(score_pairs(pairs).float(), (1, 0), value=0.0)  # back to the unshifted axis of `input_ids`
        lengths = [len(ids) for ids in rows["chosen_ids"]] + [len(ids) for ids in rows["rejected_ids"]]
        lists = weights_to_lists(logps, pairs.completion_mask, lengths, truncation_mode)
        b = len(rows)
        out = {REF_LOGP_COLUMNS[0]: lists[:b], REF_LOGP_COLUMNS[1]: lists[b:]}
        if score_anchors is not None:
            anchors = AnchorBatch.from_inputs(batch)
            anchor_logps = F.pad(score_anchors(anchors).float(), (1, 0), value=0.0)
            lengths = [len(ids) for ids in rows["anchor_ids"]]
            out[ANCHOR_REF_LOGP_COLUMN] = weights_to_lists(
                anchor_logps, anchors.completion_mask, lengths, truncation_mode
            )
        return out

    return precompute_in_shards(
        accelerator,
        dataset.select_columns(columns),
        batch_size=batch_size,
        compute=compute,
        desc=f"Computing reference log probs for {name} dataset",
    )
