"""
Anchors for the triplet loss (SPEC §4): tokenisation of a dataset `anchor` column, and sampling from the current
policy. The collator that carries them is `collator.DataCollatorForTIDPO`.
"""

from typing import Any

import torch
from trl.trainer.utils import flush_left

from .tokenization import tokenize_completion


def tokenize_anchor(example: dict[str, Any], processing_class, implicit_prompt: bool) -> dict[str, list[int]]:
    """
    Tokenise a dataset `anchor` like TRL tokenises `chosen` (see `tokenize_completion`), aligned on the example's
    already tokenised `prompt_ids`.

    In the implicit-prompt format (no `prompt` column; `chosen` repeats the prompt) the anchor repeats it too, and it
    is removed first; an anchor that does not start with the prompt raises.

    Returns:
        `dict`: `{"anchor_ids": list[int]}`.
    """
    prompt, anchor = example["prompt"], example["anchor"]
    if implicit_prompt:
        if anchor[: len(prompt)] != prompt:
            raise ValueError(
                "In a dataset without a 'prompt' column, the 'anchor' column must start with the same prompt as "
                f"'chosen' and 'rejected'. This anchor does not: {str(anchor)[:80]!r}. Add an explicit 'prompt' column."
            )
        anchor = anchor[len(prompt) :]
    prompt_ids, anchor_ids = tokenize_completion(processing_class, prompt, anchor)
    # Align on the prompt TRL kept for this example (it may end earlier, see `common_prefix_length`)
    kept = len(example["prompt_ids"])
    full = prompt_ids + anchor_ids
    return {"anchor_ids": full[kept:]}


def completion_mask_after_generation(generated: torch.Tensor, eos_token_id: int | list[int]) -> torch.Tensor:
    """
    Mask of the generated tokens up to and including the first EOS of each row; `[B, N]` -> `[B, N]` long.

    Built from positions, so a pad token that equals EOS is still told apart by coming after the first EOS.
    """
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    is_eos = torch.isin(generated, eos_ids.to(generated.device))
    eos_before = (is_eos.long().cumsum(dim=-1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    return (~eos_before).long()


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
) -> dict[str, torch.Tensor]:
    """
    Sample one anchor per prompt from `model` (KV cache on, no grad) and lay the rows out like the collator's:
    prompt then completion, right-padded.

    Args:
        model: an unwrapped causal LM ready for `generate`.
        prompt_input_ids, prompt_attention_mask (`torch.Tensor`): `[B, P]`, left-padded.
        generation_kwargs (`dict`): sampling settings passed to `generate`.
        eos_token_id, pad_token_id: token ids.
        max_length (`int`, *optional*): the rows' maximum length. With `truncation_mode="keep_start"` a row is cut
            to its first `max_length` tokens after generation (prompts are shorter than `max_length`: the trainer
            refuses longer ones); with `"keep_end"` the prompt keeps its last `max_length - max_new_tokens` tokens
            before generation, like the collator keeps the end of chosen/rejected rows, so every anchor keeps its
            completion.
        truncation_mode (`str`): the collator's truncation mode.

    Returns:
        `dict`: `anchor_input_ids`, `anchor_attention_mask`, `anchor_completion_mask`, each `[B, T_a]`.
    """
    if max_length is not None and truncation_mode == "keep_end":
        budget = max(1, max_length - generation_kwargs["max_new_tokens"])
        # Left-padded: the last columns hold each prompt's end
        prompt_input_ids, prompt_attention_mask = prompt_input_ids[:, -budget:], prompt_attention_mask[:, -budget:]
    sequences = model.generate(
        input_ids=prompt_input_ids,
        attention_mask=prompt_attention_mask,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
        **generation_kwargs,
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
