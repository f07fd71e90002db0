"""
cDPO's contrastive-estimation token weights (Lin et al., "Critical Tokens Matter: Token-Level Contrastive Estimation
Enhances LLM's Reasoning Capability", ICML 2025; SPEC §8), estimated once, before training, from two contrastive models
π+ and π− (SFT'd on correct and on incorrect responses in the paper):

    p_t = softmax((1 + β_ce) · z⁺_t − β_ce · z⁻_t)[y_t]          # z^±_t: the two models' logits at y_t's position
    rejected tokens:  w_t = 1 − p_t                              # the rejected response's last EOS token: w = 1
    chosen tokens:    w_t = 1                                    # `only_negative=False`: w_t = p_t

A rejected token the contrast finds unlikely (small p_t) is a critical error and keeps its weight; one it expects
weighs near 0. No renormalisation: the weights enter the token-weighted margin as they are, like TIS-DPO's. They
become the `chosen_token_weights` / `rejected_token_weights` columns (`weight_columns.py`), on which
`token_weighting="dataset"` trains; `token_weighting="cdpo"` computes and caches them inside the trainer.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from .attribution import causal_lm_of, project_to_logits
from .contrastive_scoring import (
    ContrastiveScoring,
    add_weight_columns,
    contrastive_negative,
    eval_mode,
    scatter_scored,
    scored_completion_states,
)


DEFAULT_CDPO_BETA = 1.0  # β_ce of the paper and the authors' code


# ---------------------------------------------------------------------------------------------------- the maths


def contrastive_estimation_logps(
    positive_logits: torch.Tensor, negative_logits: torch.Tensor, targets: torch.Tensor, beta: float
) -> torch.Tensor:
    """
    `log p_t = log softmax((1 + β) · z⁺_t − β · z⁻_t)[y_t]` (cDPO's contrastive estimation). A constant added to a
    model's logits at a position leaves it unchanged, so log-probabilities may stand in for logits.

    Args:
        positive_logits (`torch.Tensor`): `[N, vocab]` π+'s logits at the positions that predict the tokens.
        negative_logits (`torch.Tensor`): `[N, vocab]` π−'s logits there.
        targets (`torch.Tensor`): `[N]` the token ids `y_t`.
        beta (`float`): β_ce ≥ 0; 0 gives π+'s own log-probability.

    Returns:
        `torch.Tensor`: `[N]` float32 log-probabilities.
    """
    combined = (1.0 + beta) * positive_logits.float() - beta * negative_logits.float()  # [N, vocab]
    return F.log_softmax(combined, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def cdpo_weights(probs: torch.Tensor, chosen: bool, only_negative: bool = True) -> torch.Tensor:
    """
    cDPO's weights from the contrastive-estimation probabilities `p` of one side's tokens: rejected `1 − p`; chosen 1,
    or `p` with `only_negative=False`.

    Args:
        probs (`torch.Tensor`): `[..., T]` probabilities `p_t` in [0, 1].
        chosen (`bool`): whether the tokens are the chosen response's.
        only_negative (`bool`): the authors' `only_neg`: weigh only the rejected tokens.

    Returns:
        `torch.Tensor`: float32 weights, the shape of `probs`.
    """
    probs = probs.float()
    if not chosen:
        return 1.0 - probs
    return torch.ones_like(probs) if only_negative else probs


# ---------------------------------------------------------------------------------------------------- the models


@torch.no_grad()
def contrastive_estimation_probs(
    positive_model: nn.Module,
    negative_model: nn.Module,
    positive_contexts: list[list[int]],
    negative_contexts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    beta: float = DEFAULT_CDPO_BETA,
    batch_size: int = 8,
    chunk_size: int = 256,
) -> list[torch.Tensor]:
    """
    `p_t` of every completion token (dropout off in both models). Both models' final hidden states at the scored
    positions are kept (`[n, H]` each, per batch of rows); their logits are built `chunk_size` positions at a time, so
    memory peaks at about four `[chunk_size, vocab]` float32 tensors (two models' logits, their combination, its
    log-softmax), never `[rows, T, vocab]`.

    Returns:
        `list[torch.Tensor]`: one float32 CPU tensor `[len(completion)]` per row; NaN where a token cannot be scored
        (the first token of a completion with an empty context).

    Raises:
        ValueError: when the two models' vocabularies differ, when they score different tokens (one context empty), or
            when a probability is not finite (a model overflowed).
    """
    results = [torch.full((len(completion),), float("nan")) for completion in completions]
    with eval_mode(positive_model, negative_model):
        positive_lm, negative_lm = causal_lm_of(positive_model), causal_lm_of(negative_model)
        positive_head, negative_head = positive_lm.get_output_embeddings(), negative_lm.get_output_embeddings()
        batches = zip(
            scored_completion_states(positive_model, positive_contexts, completions, pad_token_id, batch_size),
            scored_completion_states(negative_model, negative_contexts, completions, pad_token_id, batch_size),
            strict=True,
        )
        for (batch, positive, targets), (negative_batch, negative, negative_targets) in batches:
            if negative_batch != batch or not torch.equal(targets.cpu(), negative_targets.cpu()):
                raise ValueError(
                    f"Rows {batch}: π+ and π− score different tokens (one context is empty and the other is not), so "
                    "their logits cannot be combined; give every row a non-empty prompt."
                )
            logps = []
            for k in range(0, len(targets), chunk_size):  # [chunk, vocab] logits of each model at a time
                chunk = slice(k, k + chunk_size)
                positive_logits = project_to_logits(positive[chunk], positive_head, positive_lm.config)
                negative_logits = project_to_logits(negative[chunk], negative_head, negative_lm.config)
                if positive_logits.size(-1) != negative_logits.size(-1):
                    raise ValueError(
                        f"π+ has {positive_logits.size(-1)} output logits and π− {negative_logits.size(-1)}: cDPO "
                        "combines them token by token, so both must share one vocabulary (the same tokenizer and "
                        "embedding size)."
                    )
                device = positive_logits.device
                logps.append(
                    contrastive_estimation_logps(
                        positive_logits, negative_logits.to(device), targets[chunk].to(device), beta
                    )
                )
            probs = torch.cat(logps).exp().cpu()
            if not torch.isfinite(probs).all():
                raise ValueError(
                    f"Rows {batch}: a cDPO probability is not finite; one of the contrastive models overflows (try "
                    "float32)."
                )
            scatter_scored(results, batch, positive_contexts, probs)
    return results


# ---------------------------------------------------------------------------------------------------- datasets


def last_eos_position(ids: Sequence[int], eos_token_id: int | None) -> int | None:
    """Index of the last `eos_token_id` in a completion's ids (the EOS TRL appends to plain text, or a chat template's
    end of turn when it is the tokenizer's EOS), or None."""
    positions = [i for i, token in enumerate(ids) if token == eos_token_id] if eos_token_id is not None else []
    return positions[-1] if positions else None


def cdpo_weight_lists(
    dataset: Dataset,
    positive_model: nn.Module,
    negative_model: nn.Module | None,
    tokenizer,
    scoring: ContrastiveScoring,
    beta: float = DEFAULT_CDPO_BETA,
    only_negative: bool = True,
) -> dict[str, list[list[float]]]:
    """
    cDPO weights of a tokenised preference dataset (`prompt_ids`, `chosen_ids`, `rejected_ids`), one list per row and
    side, as long as the row's `chosen_ids` / `rejected_ids`. Tokens beyond `scoring.max_length` (never trained on)
    weigh 0; a token that cannot be scored (the first of a completion with an empty prompt) weighs 1. With
    `only_negative` the chosen side needs no model pass.

    Args: see [`compute_cdpo_weight_columns`]; `scoring` holds its system prompts, truncation and batch size.

    Returns:
        `dict[str, list[list[float]]]`: `{"chosen_token_weights": ..., "rejected_token_weights": ...}`.
    """
    if not beta >= 0:
        raise ValueError(f"`beta` (cDPO's β_ce) must be >= 0, got {beta!r}.")
    negative_model = contrastive_negative(dataset, positive_model, negative_model, scoring.system_prompts, "cDPO")
    columns = {}
    for side in ("chosen", "rejected"):
        chosen = side == "chosen"
        rows = scoring.rows(dataset, tokenizer, side)
        if chosen and only_negative:
            probs = [torch.full((len(kept),), float("nan")) for kept in rows.completions]  # every weight 1
        else:
            probs = contrastive_estimation_probs(
                positive_model, negative_model, *rows.contexts, rows.completions, tokenizer.pad_token_id, beta,
                scoring.batch_size,
            )  # fmt: skip
        weights = []
        for p, ids, kept in zip(probs, rows.ids, rows.completions, strict=True):
            row = torch.where(torch.isnan(p), torch.ones_like(p), cdpo_weights(p, chosen, only_negative))
            eos = last_eos_position(ids, tokenizer.eos_token_id)
            if not chosen and eos is not None and eos < len(kept):
                row[eos] = 1.0  # the authors' code: the rejected EOS keeps weight 1
            weights.append(row.tolist() + [0.0] * (len(ids) - len(kept)))
        columns[f"{side}_token_weights"] = weights
    return columns


def compute_cdpo_weight_columns(
    dataset: Dataset,
    positive_model: nn.Module,
    negative_model: nn.Module | None,
    tokenizer,
    *,
    system_prompts: Sequence[str] | None = None,
    beta: float = DEFAULT_CDPO_BETA,
    only_negative: bool = True,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    batch_size: int = 8,
) -> Dataset:
    """
    Compute cDPO token weights offline and add them to `dataset` as the `chosen_token_weights` and
    `rejected_token_weights` columns, to inspect, save, and train on with `token_weighting="dataset"` (what
    `token_weighting="cdpo"` computes inside the trainer). Completions are tokenised exactly as `TIDPOTrainer`
    tokenises them (one weight per token of `chosen_ids` / `rejected_ids`, EOS included for plain text).

    Cost: one forward of π+ and one of π− over the rejected completions (and over the chosen ones with
    `only_negative=False`); the logits are built in chunks of positions, never as `[rows, T, vocab]`.

    Args:
        dataset, tokenizer, system_prompts, max_length, truncation_mode, batch_size: as in
            [`compute_tis_dpo_weight_columns`].
        positive_model (`nn.Module`): π+ (e.g. SFT on the chosen responses), a loaded causal LM.
        negative_model (`nn.Module` or `None`): π− (e.g. SFT on the rejected responses); `None` with `system_prompts`
            uses `positive_model` for both. It must share π+'s vocabulary.
        beta (`float`): β_ce ≥ 0 of `softmax((1 + β_ce)·z⁺ − β_ce·z⁻)`, default 1 (the paper's).
        only_negative (`bool`): chosen tokens weigh 1 (default, the authors' `only_neg=True`); `False`: they weigh
            `p_t`.

    Returns:
        `Dataset`: `dataset` with the two weight columns (cDPO's) added.
    """
    scoring = ContrastiveScoring(system_prompts, max_length, truncation_mode, batch_size)

    def weight_lists(rows: Dataset) -> dict[str, list[list[float]]]:
        return cdpo_weight_lists(rows, positive_model, negative_model, tokenizer, scoring, beta, only_negative)

    return add_weight_columns(dataset, tokenizer, "cDPO", weight_lists)
