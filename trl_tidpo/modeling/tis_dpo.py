"""
TIS-DPO token weights (Liu et al., "TIS-DPO: Token-level Importance Sampling for Direct Preference Optimization",
ICLR 2025; SPEC §7), estimated once, before training, from two contrastive models π+ and π−:

    r̂_t = log π+(y_t | x, y_<t) − log π−(y_t | x, y_<t)                 # per completion token
    exp_clamp (paper Eq. 19):  w_t = k · exp(μ · clamp(r̂_t, L, U))       # μ = +1 chosen, −1 rejected
    rank (official code):      ranks of μ · r̂_t within the response, mapped linearly onto [0.7, 1.3]; the last
                               kept (scored) token of the response weighs 0

π+ and π− are two models (the paper found DPO and reverse DPO from the same start best) or one model under two
system prompts (the prompt-based variant, conversational data only). The weights become the
`chosen_token_weights` / `rejected_token_weights` columns (layout in `weight_columns.py`), on which
`token_weighting="dataset"` trains; `token_weighting="tis_dpo"` computes and caches them inside the trainer.
"""

import math
from collections.abc import Sequence

import torch
from datasets import Dataset
from torch import nn
from trl.trainer.utils import create_model_from_path

# `columns_fingerprint` and `tokenize_preference_dataset` stay importable from here
from .contrastive_scoring import (  # noqa: F401
    ContrastiveScoring,
    add_weight_columns,
    columns_fingerprint,
    contrastive_negative,
    eval_mode,
    per_token_completion_logps,
    tokenize_preference_dataset,
)


TIS_TRANSFORMS = ("exp_clamp", "rank")
DEFAULT_CLAMP = (-0.5, 1.5)  # (L, U) of TIS-DPO Eq. 19
RANK_RANGE = (0.7, 1.3)  # the official code's rank-based range
# The `token_weighting` values whose weights come from π+ and π− (the `tis_*_model` / `tis_system_prompts` options)
CONTRASTIVE_WEIGHTINGS = ("tis_dpo", "cdpo")


# ---------------------------------------------------------------------------------------------------- transforms


def exp_clamp(
    log_ratios: torch.Tensor,
    sign: float | torch.Tensor,
    clamp: Sequence[float] = DEFAULT_CLAMP,
    scale: float = 1.0,
) -> torch.Tensor:
    """
    TIS-DPO's weights (paper Eq. 19): `w = k · exp(μ · clamp(r̂, L, U))`.

    Args:
        log_ratios (`torch.Tensor`): `[..., T]` contrastive log-ratios `r̂ = log π+ − log π−`.
        sign (`float` or `torch.Tensor`): μ, `+1` for chosen and `−1` for rejected tokens; a float, or a tensor that
            broadcasts against `log_ratios` (e.g. `[R, 1]`).
        clamp (`Sequence[float]`): `(L, U)`, default `(-0.5, 1.5)`.
        scale (`float`): `k`, default 1.

    Returns:
        `torch.Tensor`: float32 weights, the shape of `log_ratios`.
    """
    low, high = clamp
    return scale * torch.exp(sign * log_ratios.float().clamp(low, high))


def rank_weights(
    log_ratios: torch.Tensor,
    mask: torch.Tensor,
    sign: float | torch.Tensor,
    weight_range: Sequence[float] = RANK_RANGE,
) -> torch.Tensor:
    """
    The official TIS-DPO code's rank-based weights: within each row, the `n` masked tokens sorted by `μ · r̂`
    (ascending; ties keep their order) get `low + (high − low) · i / (n − 1)` for the `i`-th of them (1.0 when
    `n = 1`); every other position (the response's last kept token, padding, tokens never scored) gets 0.

    Example: `r̂ = [0.3, −1.0, 2.0]`, `μ = +1`, all masked → ranks `[1, 0, 2]` → weights `[1.0, 0.7, 1.3]`.

    Args:
        log_ratios (`torch.Tensor`): `[R, T]` contrastive log-ratios.
        mask (`torch.Tensor`): `[R, T]`, True on the tokens to rank.
        sign (`float` or `torch.Tensor`): μ, a float or `[R, 1]`.
        weight_range (`Sequence[float]`): `(low, high)`, default `(0.7, 1.3)`.

    Returns:
        `torch.Tensor`: `[R, T]` float32 weights.
    """
    low, high = weight_range
    mask = mask.bool()
    keys = (sign * log_ratios.float()).masked_fill(~mask, math.inf)  # unranked positions sort last
    order = keys.argsort(dim=-1, stable=True)
    positions = torch.arange(keys.size(-1), device=keys.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions).float()  # rank of each position in its row
    n = mask.sum(dim=-1, keepdim=True).float()
    weights = low + (high - low) * ranks / (n - 1).clamp(min=1)
    weights = torch.where(n == 1, torch.ones_like(weights), weights)
    return weights * mask


# ---------------------------------------------------------------------------------------------------- log-ratios


def contrastive_log_ratios(
    positive_model: nn.Module,
    negative_model: nn.Module,
    positive_contexts: list[list[int]],
    negative_contexts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """
    `r̂_t = log π+(y_t | ·) − log π−(y_t | ·)` of every completion token (dropout off in both models).

    Returns:
        `list[torch.Tensor]`: one float32 tensor `[len(completion)]` per row.

    Raises:
        ValueError: when a log-ratio is not finite (a model gave a token zero probability, or overflowed).
    """
    with eval_mode(positive_model, negative_model):
        positive = per_token_completion_logps(positive_model, positive_contexts, completions, pad_token_id, batch_size)
        negative = per_token_completion_logps(negative_model, negative_contexts, completions, pad_token_id, batch_size)
    ratios = [p - n for p, n in zip(positive, negative, strict=True)]
    for index, ratio in enumerate(ratios):
        if not torch.isfinite(ratio).all():
            raise ValueError(
                f"Row {index}: the TIS-DPO log-ratio log π+ − log π− is not finite ({ratio.tolist()}); one of the "
                "contrastive models gives a completion token zero probability or overflows (try float32)."
            )
    return ratios


# ---------------------------------------------------------------------------------------------------- datasets


def tis_dpo_weight_lists(
    dataset: Dataset,
    positive_model: nn.Module,
    negative_model: nn.Module | None,
    tokenizer,
    scoring: ContrastiveScoring,
    clamp: Sequence[float] = DEFAULT_CLAMP,
    transform: str = "exp_clamp",
) -> dict[str, list[list[float]]]:
    """
    TIS-DPO weights of a tokenised preference dataset (`prompt_ids`, `chosen_ids`, `rejected_ids`), one list per row
    and side, as long as the row's `chosen_ids` / `rejected_ids`. Tokens beyond `scoring.max_length` (never trained
    on) weigh 0.

    Args: see [`compute_tis_dpo_weight_columns`]; `scoring` holds its system prompts, truncation and batch size.

    Returns:
        `dict[str, list[list[float]]]`: `{"chosen_token_weights": ..., "rejected_token_weights": ...}`.
    """
    if transform not in TIS_TRANSFORMS:
        raise ValueError(f"`transform` must be one of {TIS_TRANSFORMS}, got {transform!r}.")
    negative_model = contrastive_negative(dataset, positive_model, negative_model, scoring.system_prompts, "TIS-DPO")
    columns = {}
    for side, sign in (("chosen", 1.0), ("rejected", -1.0)):  # μ of Eq. 19
        rows = scoring.rows(dataset, tokenizer, side)
        ratios = contrastive_log_ratios(
            positive_model, negative_model, *rows.contexts, rows.completions, tokenizer.pad_token_id,
            scoring.batch_size,
        )  # fmt: skip
        columns[f"{side}_token_weights"] = [
            _transform_row(ratio, sign, clamp, transform) + [0.0] * (len(c) - len(kept))
            for ratio, c, kept in zip(ratios, rows.ids, rows.completions)
        ]
    return columns


def _transform_row(ratio: torch.Tensor, sign: float, clamp: Sequence[float], transform: str) -> list[float]:
    """Weights of one response's scored tokens `ratio` `[n]`. `"rank"` zeroes the last of them, as the official code
    does (the position of the EOS that TRL appends to plain text, whatever the token: an EOS inside the response is
    ranked, and a chat template's trailing tokens after its end-of-turn are the ones zeroed)."""
    if transform == "exp_clamp":
        return exp_clamp(ratio, sign, clamp).tolist()
    ranked = torch.ones(ratio.size(0), dtype=torch.bool)
    ranked[-1:] = False  # the last kept token
    return rank_weights(ratio[None], ranked[None], sign)[0].tolist()


def compute_tis_dpo_weight_columns(
    dataset: Dataset,
    positive_model: nn.Module,
    negative_model: nn.Module | None,
    tokenizer,
    *,
    system_prompts: Sequence[str] | None = None,
    clamp: Sequence[float] = DEFAULT_CLAMP,
    transform: str = "exp_clamp",
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    batch_size: int = 8,
) -> Dataset:
    """
    Compute TIS-DPO token weights offline and add them to `dataset` as the `chosen_token_weights` and
    `rejected_token_weights` columns, to inspect, save, and train on with `token_weighting="dataset"`.

    Completions are tokenised exactly as `TIDPOTrainer` tokenises them (one weight per token of `chosen_ids` /
    `rejected_ids`, EOS included for plain text), so the columns pass the trainer's length check.

    Args:
        dataset (`Dataset`): a preference dataset (`prompt`/`chosen`/`rejected`, plain text or conversational, or the
            implicit-prompt format), or one already tokenised by the trainer (`prompt_ids`, `chosen_ids`,
            `rejected_ids`).
        positive_model (`nn.Module`): π+, a loaded causal LM (used on its own device, dropout off).
        negative_model (`nn.Module` or `None`): π−; `None` with `system_prompts` uses `positive_model` for both.
        tokenizer: the tokenizer the trainer will use (its pad, EOS and chat template).
        system_prompts (`Sequence[str]`, *optional*): `(positive, negative)` system prompts of the prompt-based
            variant: π+ sees the first before each prompt, π− the second. Conversational data only.
        clamp (`Sequence[float]`): `(L, U)` of `"exp_clamp"`.
        transform (`str`): `"exp_clamp"` (paper Eq. 19) or `"rank"` (official code: ranks onto [0.7, 1.3], the last
            kept token 0).
        max_length (`int`, *optional*), truncation_mode (`str`): the trainer's; with `keep_start` only the tokens
            training keeps are scored (the others weigh 0). `None` scores every token.
        batch_size (`int`): rows per forward.

    Returns:
        `Dataset`: `dataset` with the two weight columns added.
    """
    scoring = ContrastiveScoring(system_prompts, max_length, truncation_mode, batch_size)

    def weight_lists(rows: Dataset) -> dict[str, list[list[float]]]:
        return tis_dpo_weight_lists(rows, positive_model, negative_model, tokenizer, scoring, clamp, transform)

    return add_weight_columns(dataset, tokenizer, "TIS-DPO", weight_lists)


# ---------------------------------------------------------------------------------------------------- trainer set-up


def check_tis_sources(token_weighting: str, positive, negative, system_prompts) -> None:
    """
    Fail before any model loads when the sources of π+ and π− (TIS-DPO's, or cDPO's: `CONTRASTIVE_WEIGHTINGS`) cannot
    give two different distributions. `positive` and `negative` are paths or loaded models (None when unset); the
    config checks its paths, the trainer the resolved sources.
    """
    if token_weighting not in CONTRASTIVE_WEIGHTINGS:
        given = [name for name, value in (("tis_positive_model", positive), ("tis_negative_model", negative)) if value is not None]
        if system_prompts is not None:
            given.append("tis_system_prompts")
        if given:
            raise ValueError(
                f"{given} only apply to `token_weighting='tis_dpo'` or `'cdpo'`, but `token_weighting` is "
                f"{token_weighting!r}. Set `token_weighting='tis_dpo'` or `'cdpo'`, or leave them unset."
            )
        return
    if system_prompts is None and (positive is None or negative is None):
        raise ValueError(
            f"`token_weighting={token_weighting!r}` needs two contrastive models: set `tis_positive_model` and "
            "`tis_negative_model` (paths in TIDPOConfig, or loaded models as TIDPOTrainer arguments), or "
            "`tis_system_prompts` for the prompt-based variant (one model under two system prompts)."
        )
    if system_prompts is None and (positive is negative or (isinstance(positive, str) and positive == negative)):
        raise ValueError(
            "`tis_positive_model` and `tis_negative_model` are the same model and no `tis_system_prompts` tell them "
            "apart, so every TIS-DPO log-ratio would be 0."
        )


def load_contrastive_model(model, init_kwargs: dict | None, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """π+ or π−: a path or hub id is loaded like TRL loads the reference (the policy's dtype); a loaded model is used
    as is."""
    if not isinstance(model, str):
        return model
    kwargs = dict(init_kwargs or {})
    kwargs["device_map"] = None
    kwargs.setdefault("dtype", dtype)
    return create_model_from_path(model, **kwargs).to(device)
