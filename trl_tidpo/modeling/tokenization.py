"""Tokenise one (prompt, completion) the way TRL's DPOTrainer tokenises `chosen`, for anchors and inspection."""

import json
from typing import Any

from trl.data_utils import _tokenize, common_prefix_length, is_conversational


def chat_template_kwargs_of(example: dict[str, Any]) -> dict[str, Any]:
    """
    The chat-template arguments TRL 1.16's `DPOTrainer._prepare_dataset` takes from an example: its `tools` column (a
    list, or a JSON string of one) and its `chat_template_kwargs` column (a dict).
    """
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **(example.get("chat_template_kwargs") or {})}


def tokenize_completion(
    processing_class,
    prompt: Any,
    completion: Any,
    tools: list | str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[int], list[int]]:
    """
    Token ids of `prompt` and of `completion` after it, as `DPOTrainer._prepare_dataset` produces them.

    Conversational data (lists of messages) goes through the chat template (the prompt with
    `add_generation_prompt=True`), with the example's `tools` and `chat_template_kwargs` as TRL passes them; plain
    text gets the tokenizer's EOS appended to the completion. The completion starts where the tokenised prompt and
    prompt+completion diverge.

    Args:
        tools (`list` or `str`, *optional*): the example's `tools` column (a JSON string is decoded, as TRL does).
        chat_template_kwargs (`dict`, *optional*): the example's `chat_template_kwargs` column.

    Returns:
        `tuple[list[int], list[int]]`: `(prompt_ids, completion_ids)`.
    """
    if is_conversational({"prompt": prompt}):
        template_kwargs = chat_template_kwargs_of({"tools": tools, "chat_template_kwargs": chat_template_kwargs})
        prompt_ids = _tokenize(processing_class, prompt, add_generation_prompt=True, **template_kwargs)["input_ids"]
        full_ids = _tokenize(processing_class, prompt + completion, **template_kwargs)["input_ids"]
    else:
        eos_token = processing_class.eos_token
        if eos_token is not None and not completion.endswith(eos_token):
            completion = completion + eos_token
        prompt_ids = _tokenize(processing_class, prompt)["input_ids"]
        full_ids = _tokenize(processing_class, prompt + completion)["input_ids"]
    start = common_prefix_length(prompt_ids, full_ids)
    return prompt_ids[:start], full_ids[start:]
