"""Per-token TI-DPO weights of any (model, tokenizer, prompt, completion), for inspection."""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attribution import attribution_target, capture_activations, causal_lm_of, embedding_attribution
from .importance import hybrid_token_weights, normalize_importance
from .prior import gaussian_prior
from .tokenization import tokenize_completion


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


def compute_raw_importance(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """
    Raw token importance `I` `[R, T]` (float32) of right-padded rows, from a forward of `model`'s backbone (no logits
    tensor) and one activation-only backward. Dropout should be off (`model.eval()`).
    """
    lm = causal_lm_of(model)
    with torch.enable_grad(), capture_activations(model) as captured:
        lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        target = attribution_target(captured.last_hidden, attention_mask, lm.get_output_embeddings(), lm.config)
        raw = embedding_attribution(target, captured.embeddings, retain_graph=False)
    return raw[:, -input_ids.size(1) :].detach()


def token_weights(
    model: nn.Module,
    tokenizer,
    prompt: Any,
    completion: Any,
    *,
    importance_lambda: float = 0.7,
    prior_sigma_ratio: float = 0.25,
    weight_span: str = "completion",
    weight_normalization: str = "mean",
) -> TokenWeights:
    """
    The per-token weights `TIDPOTrainer` would give `completion` after `prompt`, with the same tokenisation
    (chat template for conversational data, EOS appended to plain text) and the same weight code.

    Args:
        model: a causal LM (a `PeftModel` too).
        tokenizer: its tokenizer.
        prompt, completion: strings, or lists of chat messages.
        importance_lambda, prior_sigma_ratio, weight_span, weight_normalization: as in `TIDPOConfig`.

    Returns:
        `TokenWeights`.
    """
    prompt_ids, completion_ids = tokenize_completion(tokenizer, prompt, completion)
    if not completion_ids:
        raise ValueError("The completion is empty after tokenisation: there is no token to weigh.")
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids + completion_ids], device=device)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.tensor([[0] * len(prompt_ids) + [1] * len(completion_ids)], device=device)
    completion_mask[:, 0] = 0  # position 0 is never scored, as in training
    span = completion_mask if weight_span == "completion" else attention_mask

    was_training = model.training
    model.eval()
    try:
        raw = compute_raw_importance(model, input_ids, attention_mask)
    finally:
        model.train(was_training)
    weights, fallback = hybrid_token_weights(raw, span, importance_lambda, prior_sigma_ratio, weight_normalization)
    importance, _ = normalize_importance(raw, span)
    prior = gaussian_prior(span, prior_sigma_ratio)

    start = input_ids.size(1) - len(completion_ids)

    def completion_part(t: torch.Tensor) -> list[float]:
        return t[0, start:].tolist()

    return TokenWeights(
        tokens=tokenizer.convert_ids_to_tokens(completion_ids),
        token_ids=list(completion_ids),
        weights=completion_part(weights),
        importance=completion_part(importance),
        prior=completion_part(prior),
        fallback=bool(fallback[0]),
    )
