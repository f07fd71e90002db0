"""Per-token TI-DPO weights of any (model, tokenizer, prompt, completion), for inspection."""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modeling.attribution import attribute_in_own_forward
from ..modeling.tokenization import tokenize_completion
from ..ops.importance import completion_token_weights
from ..trainer.tidpo_config import WEIGHT_OPTIONS, weight_option_defaults


@dataclass
class TokenWeights:
    """
    TI-DPO's view of one completion. Every list has one entry per completion token (EOS included, as in training).

    Attributes:
        tokens: the completion tokens as strings.
        token_ids: their ids.
        weights: the hybrid weights the trainer would apply (Eq. 8, scaled per `weight_normalization`).
        importance: the normalised gradient attribution `Î` over the span (Eq. 7), restricted to the completion.
        prior: the normalised Gaussian prior `P̂` over the span, restricted to the completion.
        fallback: True when the attribution could not be normalised and the weights are the prior alone.
    """

    tokens: list[str]
    token_ids: list[int]
    weights: list[float]
    importance: list[float]
    prior: list[float]
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
