"""
Per-token weight columns computed once before training and cached with the dataset: the content-keyed Arrow cache
shared by every precompute, the helper that applies a precompute to the train set and each eval set, and the
reference model's TI-DPO weights (`importance_model="reference"`).
"""

import hashlib
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets import Dataset, IterableDataset, concatenate_datasets
from datasets.fingerprint import Hasher, get_temporary_cache_files_directory, is_caching_enabled
from torch import nn
from torch.utils.data import DataLoader
from trl.trainer.utils import hash_module

from ..ops.importance import HybridWeights
from .collator import DataCollatorForTIDPO
from .tis_dpo import columns_fingerprint
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


def cached_weight_columns(
    accelerator: Accelerator, dataset: Dataset, name: str, key: Any, compute: Callable[[], dict[str, list]]
) -> Dataset:
    """
    `dataset` plus its `chosen_token_weights`/`rejected_token_weights` columns, read from an Arrow cache file or
    computed by `compute()` (a dict of the two lists) and written there by the main process.

    The file is keyed by the contents of the tokenised columns and `key` (models, settings), not by
    `dataset._fingerprint`, which after TRL's preparation hashes the whole training config. Its path is deterministic
    (TRL's `_get_cache_file_path` draws a random one for in-memory datasets) and every rank takes the same branch, so
    later runs and other processes reuse it.
    """
    fingerprint = [Hasher.hash((columns_fingerprint(dataset, TOKENIZED_COLUMNS), key))]
    broadcast_object_list(fingerprint, from_process=0)  # one cache file for all ranks
    directory = (
        os.path.dirname(dataset.cache_files[0]["filename"])
        if is_caching_enabled() and dataset.cache_files
        else get_temporary_cache_files_directory()
    )
    cache_file = os.path.join(directory, f"cache-{fingerprint[0]}.arrow")
    accelerator.wait_for_everyone()  # every rank takes the same branch below
    if os.path.exists(cache_file):
        weights = Dataset.from_file(cache_file)
    else:
        weights = Dataset.from_dict(compute())
        if accelerator.is_main_process:
            weights = weights.map(
                new_fingerprint=fingerprint[0], cache_file_name=cache_file, desc=f"Caching token weights of {name}"
            )
    return concatenate_datasets([dataset, weights], axis=1)


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
    collator: DataCollatorForTIDPO,
    batch_size: int,
    device: torch.device,
    attribute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weigh: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], HybridWeights],
    truncation_mode: str,
) -> tuple[dict[str, list[list[float]]], int]:
    """
    The reference's TI-DPO weights of every pair of `dataset`, as the two weight columns (one list per row).

    Args:
        attribute: `(input_ids, attention_mask) -> raw importance [2b, T]` of a collated batch's rows.
        weigh: `(raw_importance, completion_mask [2b, T-1], attention_mask [2b, T]) -> HybridWeights`.

    Returns:
        `tuple`: the columns, and the number of rows that fell back to the prior.
    """
    loader = DataLoader(
        dataset.select_columns(TOKENIZED_COLUMNS), batch_size=batch_size, collate_fn=collator, shuffle=False
    )
    chosen, rejected, fallback_rows = [], [], 0
    for start, batch in zip(range(0, len(dataset), batch_size), loader, strict=True):
        batch = {k: v.to(device) for k, v in batch.items()}
        raw = attribute(batch["input_ids"], batch["attention_mask"])
        mixed = weigh(raw, batch["completion_mask"][:, 1:], batch["attention_mask"])
        fallback_rows += int(mixed.fallback.sum())
        full = F.pad(mixed.weights, (1, 0), value=0.0)  # back to the unshifted axis of `input_ids`
        rows = dataset[start : start + batch_size]
        lengths = [len(ids) for ids in rows["chosen_ids"]] + [len(ids) for ids in rows["rejected_ids"]]
        lists = weights_to_lists(full, batch["completion_mask"], lengths, truncation_mode)
        b = len(rows["chosen_ids"])
        chosen.extend(lists[:b])
        rejected.extend(lists[b:])
    return {"chosen_token_weights": chosen, "rejected_token_weights": rejected}, fallback_rows
