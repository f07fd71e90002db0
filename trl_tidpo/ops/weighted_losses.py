"""
The token-weighted DPO term of TI-DPO (paper Eq. 9-12, Algorithm 1 line 10; SPEC §3).

    W   = sum_j w_j * (log πθ(y_j) - log πref(y_j))           # per response, completion tokens only
    z   = (W_c - W_r) - α * (K_r - sg(K_c))                    # α = 0: no sequential KL
    L   = -log σ(β z)                                          # "sigmoid"; hinge, ipo and robust as in TRL

With `w ≡ 1` and `α = 0` every loss below is exactly TRL's `DPOTrainer` loss of the same name.
"""

import torch
import torch.nn.functional as F


SUPPORTED_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
# Loss types whose per-pair loss depends on the margin z alone, so the sequential-KL term has a meaning there.
KL_LOSS_TYPES = ("sigmoid", "hinge", "robust")


def weighted_sequence_logps(
    per_token_logps: torch.Tensor, token_weights: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """
    Token-weighted sequence log-probability `sum_j w_j * log p(y_j)` over completion tokens.

    Args:
        per_token_logps (`torch.Tensor`): `[R, L]` per-token log-probabilities.
        token_weights (`torch.Tensor`): `[R, L]` weights (constants of the loss).
        completion_mask (`torch.Tensor`): `[R, L]`, 1 on completion tokens.

    Returns:
        `torch.Tensor`: `[R]` weighted sums, in the dtype of `per_token_logps`.
    """
    mask = completion_mask.to(per_token_logps.dtype)
    return (per_token_logps * token_weights.to(per_token_logps.dtype) * mask).sum(dim=-1)


def token_weighted_dpo_losses(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    *,
    chosen_weight_sum: torch.Tensor | None = None,
    rejected_weight_sum: torch.Tensor | None = None,
    kl_chosen: torch.Tensor | None = None,
    kl_rejected: torch.Tensor | None = None,
    alpha: float = 0.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """
    Per-pair DPO losses on the token-weighted margin.

    Args:
        chosen_logratios (`torch.Tensor`): `[B]` weighted log-ratio `W_c` of the chosen responses.
        rejected_logratios (`torch.Tensor`): `[B]` weighted log-ratio `W_r` of the rejected responses.
        beta (`float`): β.
        loss_type (`str`): one of `SUPPORTED_LOSS_TYPES`.
        chosen_weight_sum, rejected_weight_sum (`torch.Tensor`, *optional*): `[B]` sums of the token weights, used
            by `"ipo"` in place of TRL's token counts (with uniform weights they are the counts).
        kl_chosen, kl_rejected (`torch.Tensor`, *optional*): `[B]` sequential KL `K_c`, `K_r` (TDPO); needed when
            `alpha > 0`. `K_c` is detached here, as in TDPO2.
        alpha (`float`): α, weight of the sequential-KL term.
        label_smoothing (`float`): ε of the `"robust"` loss.

    Returns:
        `torch.Tensor`: `[B]` per-pair losses.
    """
    margin = chosen_logratios - rejected_logratios
    if alpha > 0:
        if loss_type not in KL_LOSS_TYPES:
            raise ValueError(f"The sequential-KL term (alpha > 0) is defined for {KL_LOSS_TYPES}, not {loss_type!r}.")
        if kl_chosen is None or kl_rejected is None:
            raise ValueError("`kl_chosen` and `kl_rejected` are required when `alpha > 0`.")
        margin = margin - alpha * (kl_rejected - kl_chosen.detach())

    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * margin)
    if loss_type == "hinge":
        return torch.relu(1 - beta * margin)
    if loss_type == "ipo":
        # TRL divides each log-ratio by its token count; the token-weighted analogue divides by the weight sum.
        if chosen_weight_sum is None or rejected_weight_sum is None:
            raise ValueError("The 'ipo' loss needs `chosen_weight_sum` and `rejected_weight_sum`.")
        chosen_mean = chosen_logratios / chosen_weight_sum.clamp(min=1.0)
        rejected_mean = rejected_logratios / rejected_weight_sum.clamp(min=1.0)
        ipo_margin = chosen_mean - rejected_mean
        return (ipo_margin - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * margin)
        flipped = -label_smoothing * F.logsigmoid(-beta * margin)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    raise ValueError(f"Unsupported loss_type {loss_type!r}; TIDPOTrainer supports {SUPPORTED_LOSS_TYPES}.")
