"""
Running TIS-DPO's and cDPO's two contrastive models π+ and π− over the completions of a tokenised preference dataset,
once, before training: which tokens are scored (the ones training keeps), in which contexts (the prompt, or the prompt
under a positive and a negative system prompt), and the final hidden states that predict them, batch by batch, so
that each weighting (`tis_dpo.py`: per-token log-ratios; `cdpo.py`: contrastive-estimation probabilities) projects them
through the output embeddings in chunks of positions and never builds a `[rows, T, vocab]` tensor. Also what both
weightings share around that: the trainer's tokenisation of a raw dataset, the content hash that keys cached weights,
the scoring options (`ContrastiveScoring`) and the addition of the two weight columns (`add_weight_columns`).
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import pyarrow as pa
import torch
import torch.nn.functional as F
import xxhash
from datasets import Dataset, concatenate_datasets
from torch import nn
from trl import DPOTrainer
from trl.data_utils import is_conversational

from .attribution import causal_lm_of, project_to_logits
from .tokenization import tokenize_completion
from .weight_columns import WEIGHT_COLUMNS


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Dropout off for the duration; each model's training flag is restored after."""
    flags = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, flag in zip(models, flags, strict=True):
            model.train(flag)


@torch.no_grad()
def scored_completion_states(
    model: nn.Module,
    contexts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    batch_size: int = 8,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """
    The final hidden states that predict completion tokens, a batch of rows at a time (rows right-padded in batches of
    `batch_size`; no logits are built here). The first token of a completion with an empty context cannot be scored
    (the trainer never scores it either) and is left out, as are rows with an empty completion.

    Args:
        model: a causal LM (plain, PEFT or wrapped), used on its own device.
        contexts (`list[list[int]]`): token ids before each completion.
        completions (`list[list[int]]`): completion token ids.
        pad_token_id (`int`): id used for padding.

    Yields:
        `tuple[list[int], torch.Tensor, torch.Tensor]`: the batch's row indices, the hidden states `[n, H]` of its
        scored tokens (row by row, in completion order; each row's scored tokens are its last ones) and their target
        ids `[n]`.
    """
    lm = causal_lm_of(model)
    device = lm.get_input_embeddings().weight.device
    todo = [i for i, (c, y) in enumerate(zip(contexts, completions, strict=True)) if len(c) + len(y) > 1 and y]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        rows = [contexts[i] + completions[i] for i in batch]
        input_ids = torch.full((len(rows), max(map(len, rows))), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        row_index, position, target = [], [], []
        for r, (i, row) in enumerate(zip(batch, rows)):
            input_ids[r, : len(row)] = torch.tensor(row)
            attention_mask[r, : len(row)] = 1
            for j in range(max(len(contexts[i]), 1), len(row)):  # hidden state j-1 predicts token j
                row_index.append(r)
                position.append(j - 1)
                target.append(row[j])
        hidden = lm.base_model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        ).last_hidden_state  # [b, T, H]
        scored = hidden[torch.tensor(row_index, device=hidden.device), torch.tensor(position, device=hidden.device)]
        yield batch, scored, torch.tensor(target, device=hidden.device)


def scored_token_count(context_length: int, completion_length: int) -> int:
    """How many tokens of a completion `scored_completion_states` scores: all, but the first one when the context is
    empty."""
    return context_length + completion_length - max(context_length, 1) if completion_length else 0


@torch.no_grad()
def per_token_completion_logps(
    model: nn.Module,
    contexts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    batch_size: int = 8,
    chunk_size: int = 1024,
) -> list[torch.Tensor]:
    """
    `log π(y_t | context, y_<t)` of every completion token, row by row (`scored_completion_states`); the hidden states
    go through the output embedding `chunk_size` positions at a time, so no `[rows, T, vocab]` tensor is built. A
    token that cannot be scored (the first of a completion with an empty context) gets 0.

    Returns:
        `list[torch.Tensor]`: one float32 CPU tensor `[len(completion)]` per row.
    """
    lm = causal_lm_of(model)
    results = [torch.zeros(len(completion)) for completion in completions]
    for batch, scored, targets in scored_completion_states(model, contexts, completions, pad_token_id, batch_size):
        logps = []
        for k in range(0, len(targets), chunk_size):  # [chunk, vocab] logits at a time
            logits = project_to_logits(scored[k : k + chunk_size], lm.get_output_embeddings(), lm.config)
            logps.append(F.log_softmax(logits, dim=-1).gather(-1, targets[k : k + chunk_size, None]).squeeze(-1))
        scatter_scored(results, batch, contexts, torch.cat(logps).cpu())
    return results


def scatter_scored(results: list[torch.Tensor], batch: list[int], contexts: list[list[int]], flat: torch.Tensor):
    """Write one batch's flat per-token values `[n]` (from `scored_completion_states`) onto the last scored
    positions of each of its rows in `results`."""
    offset = 0
    for i in batch:
        n = scored_token_count(len(contexts[i]), len(results[i]))
        results[i][len(results[i]) - n :] = flat[offset : offset + n]
        offset += n


def kept_completion_length(
    prompt_length: int, completion_length: int, max_length: int | None, truncation_mode: str
) -> int:
    """
    How many completion tokens to score so that every token the collator keeps is covered: with `keep_start` the row
    `prompt + completion` is cut to its first `max_length` tokens; with `keep_end` the kept tail needs the whole
    completion as context, so all of it is scored.
    """
    if max_length is None or truncation_mode == "keep_end":
        return completion_length
    return max(0, min(completion_length, max_length - prompt_length))


def _system_contexts(
    dataset: Dataset, system_prompt: str, tokenizer, side: str, completion_ids: list[list[int]]
) -> list[list[int]]:
    """Token ids before each `side` completion once `system_prompt` leads the conversation (prompt-based variant)."""
    contexts = []
    tools = dataset["tools"] if "tools" in dataset.column_names else [None] * len(dataset)
    template_kwargs = (
        dataset["chat_template_kwargs"] if "chat_template_kwargs" in dataset.column_names else [None] * len(dataset)
    )
    for index, (prompt, completion, expected, row_tools, row_kwargs) in enumerate(
        zip(dataset["prompt"], dataset[side], completion_ids, tools, template_kwargs, strict=True)
    ):
        if prompt and prompt[0]["role"] == "system":  # merge with the data's own system message
            messages = [{"role": "system", "content": f"{system_prompt}\n\n{prompt[0]['content']}"}] + prompt[1:]
        else:
            messages = [{"role": "system", "content": system_prompt}] + prompt
        context, ids = tokenize_completion(tokenizer, messages, completion, row_tools, row_kwargs)
        if ids != expected:
            raise ValueError(
                f"Row {index}: with the system prompt {system_prompt!r}, the {side} completion tokenises to "
                f"{len(ids)} tokens {ids[:8]}… instead of the trainer's {len(expected)} tokens {expected[:8]}…; the "
                "chat template renders the completion differently after a system message, so the weights could not "
                "be aligned."
            )
        contexts.append(context)
    return contexts


def contrastive_negative(
    dataset: Dataset, positive_model: nn.Module, negative_model: nn.Module | None, system_prompts, method: str
) -> nn.Module:
    """π−: `negative_model`, or π+'s model under the negative system prompt (prompt-based variant, conversational data
    only); `method` names the weighting in the errors."""
    if negative_model is None:
        if system_prompts is None:
            raise ValueError(
                f"{method} needs two contrastive distributions: a `negative_model`, or `system_prompts` (one model "
                "under a positive and a negative system prompt)."
            )
        negative_model = positive_model
    conversational = "prompt" in dataset.column_names and is_conversational({"prompt": dataset[0]["prompt"]})
    if system_prompts is not None and not conversational:
        raise ValueError(
            f"`system_prompts` (the prompt-based {method} variant) need conversational data: a 'prompt' column of "
            "messages. This dataset's prompts are plain text (or absent); give two models instead."
        )
    return negative_model


@dataclass
class ContrastiveRows:
    """One side's completions as the contrastive models score them: `ids` the trainer's whole tokenised completions,
    `completions` their kept (scored) prefixes, `contexts` `(π+'s, π−'s)` token ids before each completion."""

    ids: list[list[int]]
    completions: list[list[int]]
    contexts: tuple[list[list[int]], list[list[int]]]


def contrastive_rows(
    dataset: Dataset, tokenizer, side: str, system_prompts, max_length: int | None, truncation_mode: str
) -> ContrastiveRows:
    """The `side` ("chosen" or "rejected") completions of a tokenised preference dataset and the contexts each model
    scores them in: the prompt ids, or the prompt under each system prompt. With `keep_start` truncation only the
    tokens training keeps are scored."""
    prompt_ids = dataset["prompt_ids"]
    ids = dataset[f"{side}_ids"]
    kept = [kept_completion_length(len(p), len(c), max_length, truncation_mode) for p, c in zip(prompt_ids, ids)]
    completions = [c[:n] for c, n in zip(ids, kept)]
    if system_prompts is None:
        contexts = (prompt_ids, prompt_ids)
    else:
        contexts = tuple(_system_contexts(dataset, text, tokenizer, side, ids) for text in system_prompts)
    return ContrastiveRows(ids, completions, contexts)


@dataclass(frozen=True)
class ContrastiveScoring:
    """
    How π+ and π− score a dataset's completions, the same for TIS-DPO and cDPO.

    Attributes:
        system_prompts (`Sequence[str]` or `None`): `(positive, negative)` system prompts of the prompt-based variant.
        max_length (`int` or `None`), truncation_mode (`str`): the trainer's; with `keep_start` only the tokens
            training keeps are scored.
        batch_size (`int`): rows per forward.
    """

    system_prompts: Sequence[str] | None = None
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    batch_size: int = 8

    def rows(self, dataset: Dataset, tokenizer, side: str) -> ContrastiveRows:
        """`contrastive_rows` of one side under these options."""
        return contrastive_rows(dataset, tokenizer, side, self.system_prompts, self.max_length, self.truncation_mode)


def tokenize_preference_dataset(dataset: Dataset, tokenizer, name: str = "TIS-DPO") -> Dataset:
    """
    `prompt_ids`, `chosen_ids` and `rejected_ids` exactly as `TIDPOTrainer` (TRL's `DPOTrainer._prepare_dataset`)
    tokenises them: implicit prompts extracted, EOS appended to plain-text completions, chat templates applied. Rows
    are never dropped (no `max_length` here).

    Returns:
        `Dataset`: `dataset` with `prompt`, `chosen`, `rejected` as TRL rewrites them and the three id columns.
    """
    # TRL's own method, not a copy, so the ids cannot drift from the trainer's; it reads only `_tokenizer` from self
    trainer_view = SimpleNamespace(_tokenizer=tokenizer)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    return DPOTrainer._prepare_dataset(trainer_view, dataset, tokenizer, args, name)  # `name` labels TRL's progress


def columns_fingerprint(dataset: Dataset, columns: Sequence[str]) -> str:
    """
    A hash of the contents of `columns`, to key cached weights. Not `dataset._fingerprint`: after TRL's preparation
    that hashes the dataset's history, which includes the whole training config (TRL's `max_length` filter closes over
    it), so a new `output_dir` or learning rate would miss the cache.

    Returns:
        `str`: a hex digest.
    """
    hasher = xxhash.xxh64()
    for table in dataset.select_columns(list(columns)).with_format("arrow").iter(batch_size=10_000):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:  # IPC writes only the rows of a sliced table
            writer.write_table(table)
        hasher.update(sink.getvalue().to_pybytes())
    return hasher.hexdigest()


def add_weight_columns(
    dataset: Dataset, tokenizer, method: str, weight_lists: Callable[[Dataset], dict[str, list[list[float]]]]
) -> Dataset:
    """
    `dataset` with the two weight columns that `weight_lists` computes from its tokenised rows (`prompt_ids`,
    `chosen_ids`, `rejected_ids`: the dataset's own, or TRL's tokenisation of it, labelled `method`).

    Raises:
        ValueError: when the dataset already has a weight column.
    """
    present = [column for column in WEIGHT_COLUMNS if column in dataset.column_names]
    if present:
        raise ValueError(f"The dataset already has {present}; remove them (`dataset.remove_columns`) to recompute.")
    tokenised = {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names)
    prepared = dataset if tokenised else tokenize_preference_dataset(dataset, tokenizer, method)
    return concatenate_datasets([dataset, Dataset.from_dict(weight_lists(prepared))], axis=1)
