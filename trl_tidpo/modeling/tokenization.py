"""Tokenise one (prompt, completion) the way TRL's DPOTrainer tokenises `chosen`, for anchors and inspection."""

from typing import Any

from trl.data_utils import _tokenize, common_prefix_length, is_conversational


def tokenize_completion(processing_class, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
    """
    Token ids of `prompt` and of `completion` after it, as `DPOTrainer._prepare_dataset` produces them.

    Conversational data (lists of messages) goes through the chat template (the prompt with
    `add_generation_prompt=True`); plain text gets the tokenizer's EOS appended to the completion. The completion
    starts where the tokenised prompt and prompt+completion diverge.

    Returns:
        `tuple[list[int], list[int]]`: `(prompt_ids, completion_ids)`.
    """
    if is_conversational({"prompt": prompt}):
        prompt_ids = _tokenize(processing_class, prompt, add_generation_prompt=True)["input_ids"]
        full_ids = _tokenize(processing_class, prompt + completion)["input_ids"]
    else:
        eos_token = processing_class.eos_token
        if eos_token is not None and not completion.endswith(eos_token):
            completion = completion + eos_token
        prompt_ids = _tokenize(processing_class, prompt)["input_ids"]
        full_ids = _tokenize(processing_class, prompt + completion)["input_ids"]
    start = common_prefix_length(prompt_ids, full_ids)
    return prompt_ids[:start], full_ids[start:]
