"""
Anchors for the triplet loss (SPEC §4): tokenisation of a dataset `anchor` column, sampling from the current policy,
and a batch's anchor rows from either (`dataset_anchor_batch`, `policy_anchor_batch`). The collator that carries
dataset anchors is `collator.DataCollatorForTIDPO`.
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationConfig
from trl.data_utils import common_prefix_length
from trl.trainer.utils import flush_left

from .attribution import causal_lm_of
from .forwards import AnchorBatch
from .tokenization import tokenize_completion


def tokenize_anchor(
    example: dict[str, Any], index: int, processing_class, implicit_prompt: bool
) -> dict[str, list[int]]:
    """
    Tokenise a dataset `anchor` like TRL tokenises `chosen` (see `tokenize_completion`, with the example's `tools` and
    `chat_template_kwargs`), aligned on the example's already tokenised `prompt_ids`.

    In the implicit-prompt format (no `prompt` column; `chosen` repeats the prompt) the anchor repeats it too, and it
    is removed first; an anchor that does not start with the prompt raises. So does an anchor whose tokenised row does
    not start with the example's `prompt_ids` (the anchor would be scored after another context than the pair).

    Args:
        example (`dict`): a row with `prompt`, `anchor` and `prompt_ids`.
        index (`int`): the row's index, for the error messages.

    Returns:
        `dict`: `{"anchor_ids": list[int]}`.
    """
    prompt, anchor = example["prompt"], example["anchor"]
    if implicit_prompt:
        if anchor[: len(prompt)] != prompt:
            raise ValueError(
                f"Row {index}: in a dataset without a 'prompt' column, the 'anchor' column must start with the same "
                f"prompt as 'chosen' and 'rejected'. This anchor does not: {str(anchor)[:80]!r}. Add an explicit "
                "'prompt' column."
            )
        anchor = anchor[len(prompt) :]
    prompt_ids, anchor_ids = tokenize_completion(
        processing_class, prompt, anchor, example.get("tools"), example.get("chat_template_kwargs")
    )
    # Align on the prompt TRL kept for this example (it may end earlier, see `common_prefix_length`)
    kept = example["prompt_ids"]
    full = prompt_ids + anchor_ids
    if full[: len(kept)] != kept:
        raise ValueError(
            f"Row {index}: the anchor's tokenised row does not start with the example's prompt tokens "
            f"(`prompt_ids`, {len(kept)} tokens): they differ from token {common_prefix_length(full, kept)} on, so "
            "the anchor would be scored after another context than the chosen and rejected responses. The prompt and "
            "anchor likely merge into other tokens at their boundary; end the prompt on a token boundary (e.g. start "
            "the anchor with a space) or make the anchor render like the responses."
        )
    return {"anchor_ids": full[len(kept) :]}


def completion_mask_after_generation(generated: torch.Tensor, eos_token_id: int | list[int]) -> torch.Tensor:
    """
    Mask of the generated tokens up to and including the first EOS of each row; `[B, N]` -> `[B, N]` long.

    Built from positions, so a pad token that equals EOS is still told apart by coming after the first EOS.
    """
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    is_eos = torch.isin(generated, eos_ids.to(generated.device))
    eos_before = (is_eos.long().cumsum(dim=-1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    return (~eos_before).long()


def anchor_eos_token_ids(model_generation_config: GenerationConfig | None, tokenizer_eos_token_id: int | None) -> list[int]:
    """
    The EOS ids anchor sampling stops at: the model's generation config's (a list kept whole: chat models often end a
    turn on one of several ids), plus the tokenizer's EOS if it is not among them.
    """
    eos = getattr(model_generation_config, "eos_token_id", None)
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer_eos_token_id is not None and tokenizer_eos_token_id not in eos_ids:
        eos_ids.append(tokenizer_eos_token_id)
    return eos_ids


@contextlib.contextmanager
def _only_generation_config(model, generation_config: GenerationConfig) -> Iterator[None]:
    """
    Make `generation_config` the model's own for the block. `generate` fills every setting a passed config leaves unset
    from `model.generation_config` (a checkpoint's `repetition_penalty`, `no_repeat_ngram_size`, `min_new_tokens`, …);
    swapping it (on the PEFT wrapper too, which copies its own onto the base model) leaves only the global defaults.
    """
    holders = list(dict.fromkeys([model, causal_lm_of(model)]))
    saved = [holder.generation_config for holder in holders]
    try:
        for holder in holders:
            holder.generation_config = generation_config
        yield
    finally:
        for holder, config in zip(holders, saved, strict=True):
            holder.generation_config = config


@torch.no_grad()
def sample_policy_anchors(
    model,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    generation_kwargs: dict[str, Any],
    eos_token_id: int | list[int],
    pad_token_id: int,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    max_completion_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """
    Sample one anchor per prompt from `model` (KV cache on, no grad) and lay the rows out like the collator's:
    prompt then completion, right-padded.

    Args:
        model: an unwrapped causal LM ready for `generate`.
        prompt_input_ids, prompt_attention_mask (`torch.Tensor`): `[B, P]`, left-padded.
        generation_kwargs (`dict`): the sampling settings (`do_sample`, `temperature`, `top_k`, `top_p`,
            `max_new_tokens`). They make a fresh `GenerationConfig` with the EOS and pad ids: none of the model's other
            generation settings apply.
        eos_token_id (`int` or `list[int]`): the EOS id(s); generation and each anchor's completion stop at the first
            of any of them (see `anchor_eos_token_ids`).
        pad_token_id (`int`): the pad id.
        max_length (`int`, *optional*): the rows' maximum length. With `truncation_mode="keep_start"` a row is cut
            to its first `max_length` tokens after generation (prompts are shorter than `max_length`: the trainer
            refuses longer ones); with `"keep_end"` the prompt keeps its last `max_length - max_new_tokens` tokens
            before generation, like the collator keeps the end of chosen/rejected rows, so every anchor keeps its
            completion.
        truncation_mode (`str`): the collator's truncation mode.
        max_completion_tokens (`int`, *optional*): generation stops after `min(max_new_tokens, max_completion_tokens)`
            tokens: the triplet distances read an anchor only where it overlaps the chosen/rejected completions, so
            tokens past the batch's longest completion would be generated for nothing. The first tokens of each
            anchor (same seed) are those of an uncapped sampling; the `keep_end` prompt budget still reserves
            `max_new_tokens`, so the prompts, and with them the losses, are unchanged.

    Returns:
        `dict`: `anchor_input_ids`, `anchor_attention_mask`, `anchor_completion_mask`, each `[B, T_a]`.
    """
    if max_length is not None and truncation_mode == "keep_end":
        budget = max(1, max_length - generation_kwargs["max_new_tokens"])
        # Left-padded: the last columns hold each prompt's end
        prompt_input_ids, prompt_attention_mask = prompt_input_ids[:, -budget:], prompt_attention_mask[:, -budget:]
    if max_completion_tokens is not None:
        new_tokens = max(1, min(generation_kwargs["max_new_tokens"], max_completion_tokens))
        generation_kwargs = {**generation_kwargs, "max_new_tokens": new_tokens}
    generation_config = GenerationConfig(
        **generation_kwargs, eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True
    )
    with _only_generation_config(model, generation_config):
        sequences = model.generate(
            input_ids=prompt_input_ids, attention_mask=prompt_attention_mask, generation_config=generation_config
        )
    prompt_len = prompt_input_ids.size(1)
    generated = sequences[:, prompt_len:]
    generated_mask = completion_mask_after_generation(generated, eos_token_id)
    attention_mask = torch.cat([prompt_attention_mask.long(), generated_mask], dim=1)
    completion_mask = torch.cat([torch.zeros_like(prompt_attention_mask, dtype=torch.long), generated_mask], dim=1)
    # Left-padded prompts -> right-padded rows, as the policy forward expects (positions start at 0).
    attention_mask, input_ids, completion_mask = flush_left(attention_mask, sequences, completion_mask)
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_token_id)
    if max_length is not None:
        input_ids, attention_mask, completion_mask = (
            t[:, :max_length] for t in (input_ids, attention_mask, completion_mask)
        )
    return {
        "anchor_input_ids": input_ids,
        "anchor_attention_mask": attention_mask,
        "anchor_completion_mask": completion_mask,
    }


def dataset_anchor_batch(inputs: dict[str, torch.Tensor]) -> AnchorBatch:
    """The batch's dataset anchors (`anchor_source="dataset"`), as the collator tokenised the `anchor` column."""
    if "anchor_input_ids" not in inputs:
        raise ValueError(
            "`anchor_source='dataset'` needs `anchor_input_ids`, `anchor_attention_mask` and "
            "`anchor_completion_mask` in each batch; the default collator builds them from the 'anchor' column."
        )
    return AnchorBatch.from_inputs(inputs)


def policy_anchor_batch(
    model,
    inputs: dict[str, torch.Tensor],
    generation_kwargs: dict[str, Any],
    tokenizer,
    max_length: int | None,
    truncation_mode: str,
    max_completion_tokens: int,
) -> AnchorBatch:
    """
    One anchor per prompt of the batch, sampled from `model` (unwrapped, ready for `generate`; no grad, KV cache):
    `sample_policy_anchors` on the batch's `prompt_input_ids`, stopping at the model's and the tokenizer's EOS ids.

    Args:
        inputs (`dict`): a collated batch with `prompt_input_ids` and `prompt_attention_mask` `[B, P]`.
        generation_kwargs (`dict`): `TIDPOConfig.anchor_generation_kwargs()`.
        tokenizer: gives the EOS and pad ids.
        max_length, truncation_mode, max_completion_tokens: see `sample_policy_anchors`.
    """
    if "prompt_input_ids" not in inputs:
        raise ValueError(
            "`anchor_source='policy'` needs `prompt_input_ids` and `prompt_attention_mask` in each batch. The "
            "default collator provides them; a custom `data_collator` must too (see `DataCollatorForTIDPO`)."
        )
    anchors = sample_policy_anchors(
        model,
        inputs["prompt_input_ids"],
        inputs["prompt_attention_mask"],
        generation_kwargs,
        eos_token_id=anchor_eos_token_ids(causal_lm_of(model).generation_config, tokenizer.eos_token_id),
        pad_token_id=tokenizer.pad_token_id,
        max_length=max_length,
        truncation_mode=truncation_mode,
        max_completion_tokens=max_completion_tokens,
    )
    return AnchorBatch.from_inputs(anchors)


def longest_completion(completion_mask: torch.Tensor, accelerator) -> int:
    """
    The batch's longest chosen/rejected completion, in tokens (the most the triplet distances read of an anchor), over
    all processes, so that every process generates the same number of steps, as it did uncapped.

    Args:
        completion_mask (`torch.Tensor`): the pair rows' `[2B, T]` completion mask.
        accelerator (`accelerate.Accelerator`): gathers the maximum across processes.
    """
    longest = completion_mask.sum(dim=-1).max()
    if accelerator.num_processes > 1:
        longest = accelerator.gather(longest.reshape(1)).max()
    return int(longest)
