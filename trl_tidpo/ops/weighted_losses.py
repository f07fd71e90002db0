"""
Every TRL 1.16 DPO loss type with token weights (TI-DPO paper Eq. 9-12; SPEC §3).

TRL's `DPOTrainer._compute_loss` is a function of sequence sums of per-token log-probabilities. TI-DPO replaces each
sum by its token-weighted form, with the weights `w` constants of the loss:

    logps^W     = Σ_j w_j log πθ(y_j)          ref_logps^W = Σ_j w_j log πref(y_j)        # completion tokens only
    W_c = logps^W_c - ref_logps^W_c,   W_r = logps^W_r - ref_logps^W_r                     # weighted log-ratios
    s   = f'(exp W)  (f-divergence score; reverse KL: s = W)
    Δ   = s_c - s_r - α (K_r - sg(K_c))                                                      # α = 0: no TDPO term
    L   = ℓ_type(Δ, W_c, W_r, ...)                                                          # TRL's formula per type

and every token count by the weight sum `S = Σ_j w_j` (`ipo`, `sigmoid_norm`, `sft`). With `w ≡ 1` (and α = 0) each
function below gives exactly TRL 1.16's numbers.

Layout (TRL 1.x): rows are `[chosen_0..chosen_{B-1}; rejected_0..rejected_{B-1}]`; per-token tensors are on the
*shifted* axis, `[2B, T-1]`, where entry `i` scores token `i+1` (`shift_completion_mask = completion_mask[:, 1:]`);
token weights are given on that same shifted axis.
"""

import math

import torch
import torch.nn.functional as F


LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL: the f-DPO reparameterisation leaves a β·log Z(x) term that cancels only in the chosen - rejected difference.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# Loss types that see the pair only through the (unnormalised) margin Δ, so TDPO's sequential-KL correction of the
# margin has a meaning there.
KL_LOSS_TYPES = ("sigmoid", "hinge", "robust", "exo_pair", "discopop")
# Loss types that sort the batch: a per-pair weight (WPO) would be applied to the wrong pair.
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")
# TRL clamps (α-1)·logratio at this value before exp, so the score survives the cast back to the input dtype.
_ALPHA_DIVERGENCE_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 80.0}


def weighted_sequence_logps(
    per_token_logps: torch.Tensor, token_weights: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """
    Token-weighted sequence log-probability `Σ_j w_j log p(y_j)` over the scored completion tokens.

    Args:
        per_token_logps (`torch.Tensor`): `[R, T-1]` per-token log-probabilities (shifted axis).
        token_weights (`torch.Tensor`): `[R, T-1]` weights (constants of the loss), same axis.
        completion_mask (`torch.Tensor`): `[R, T-1]` shifted completion mask, `completion_mask[:, 1:]`.

    Returns:
        `torch.Tensor`: `[R]` weighted sums, in the dtype of `per_token_logps`. With `w ≡ 1` this is TRL's `logps`.
    """
    mask = completion_mask.to(per_token_logps.dtype)
    return (per_token_logps * token_weights.to(per_token_logps.dtype) * mask).sum(dim=-1)


def weight_sums(
    token_weights: torch.Tensor, completion_mask: torch.Tensor, *, scored_only: bool = False
) -> torch.Tensor:
    """
    Weight sums `S = Σ_j w_j` of each row's completion: the token-weighted stand-in for TRL's token counts.

    TRL counts two different things:
      - `ipo` and `sigmoid_norm` divide by the *unshifted* completion-mask sum `n` (all completion tokens);
      - `sft` (and LD-DPO, WPO) use the *shifted* mask, the `n'` completion tokens that have a log-probability.
    They differ by `completion_mask[:, 0]`: a completion token at position 0 (empty prompt, tokenizer without BOS) is
    counted by TRL's length but never scored, so it has no weight on the shifted axis. Here it counts with the row's
    mean scored weight (1 if the row has no scored token):

        S_scored = Σ_i w[r,i] · m[r,i+1]                 (scored_only=True: the sft denominator, TRL's n' when w ≡ 1)
        S_length = S_scored + (n - n') · S_scored / n'    (default: ipo/sigmoid_norm length, TRL's n when w ≡ 1)

    so uniform weights give TRL's counts exactly (integers in float), and the fill does not depend on whether the
    weights are mean- or sum-normalised.

    Args:
        token_weights (`torch.Tensor`): `[R, T-1]` weights on the shifted axis (entry `i` weights token `i+1`).
        completion_mask (`torch.Tensor`): `[R, T]` TRL's *unshifted* `completion_mask`.
        scored_only (`bool`): return `S_scored` instead of `S_length`.

    Returns:
        `torch.Tensor`: `[R]` weight sums, float (the dtype of `token_weights`).
    """
    if completion_mask.size(-1) != token_weights.size(-1) + 1:
        raise ValueError(
            f"`weight_sums` takes the unshifted completion mask ([R, T]) and weights on the shifted axis ([R, T-1]); "
            f"got a mask of width {completion_mask.size(-1)} and weights of width {token_weights.size(-1)}."
        )
    weights = token_weights if token_weights.is_floating_point() else token_weights.float()
    shift_mask = completion_mask[:, 1:].to(weights.dtype)
    scored = (weights * shift_mask).sum(dim=-1)
    if scored_only:
        return scored
    n = completion_mask.sum(dim=-1).to(weights.dtype)
    n_scored = shift_mask.sum(dim=-1)
    mean_weight = torch.where(n_scored > 0, scored / n_scored.clamp(min=1.0), torch.ones_like(scored))
    return scored + (n - n_scored) * mean_weight


def length_desensitized_logps(
    per_token_logps: torch.Tensor, token_weights: torch.Tensor, completion_mask: torch.Tensor, ld_alpha: float
) -> torch.Tensor:
    """
    LD-DPO (TRL's `ld_alpha`) on the token-weighted sums: each pair's completions are split at the shorter one's
    length `ℓ = min(n'_c, n'_r)` (scored tokens, TRL's shifted mask); the first `ℓ` completion tokens are "shared", the
    rest the verbose "tail":

        logps^{W,LD}[r] = Σ_{j ∈ shared(r)} w_j log p(y_j) + ld_alpha · Σ_{j ∈ tail(r)} w_j log p(y_j)

    Call it once for the policy and once for the reference, with the same weights. With `w ≡ 1` it is TRL's `logps`
    (and `ref_logps`) under `ld_alpha`.

    TRL builds the masks from `cumsum(shift_completion_mask)` alone, so padding after a completion falls in the shared
    (shorter row) or tail (longer row) mask; that is harmless there because the fused LM head returns 0 log-probs
    outside the completion. Here both masks are also restricted to the completion, so weights and log-probs outside it
    may hold anything.

    Args:
        per_token_logps (`torch.Tensor`): `[2B, T-1]` per-token log-probabilities, rows chosen then rejected.
        token_weights (`torch.Tensor`): `[2B, T-1]` weights on the same axis.
        completion_mask (`torch.Tensor`): `[2B, T-1]` shifted completion mask.
        ld_alpha (`float`): weight of the tail, in [0, 1]; 1 is plain (weighted) DPO, 0 drops the tail.

    Returns:
        `torch.Tensor`: `[2B]` length-desensitised weighted sums.
    """
    mask = completion_mask.bool()
    position = mask.long().cumsum(dim=1)  # 1-based index among the row's completion tokens
    chosen_lens, rejected_lens = mask.sum(dim=1).chunk(2, dim=0)
    shared_lens = torch.minimum(chosen_lens, rejected_lens).repeat(2).unsqueeze(1)  # [2B, 1]
    shared_mask = mask & (position <= shared_lens)
    tail_mask = mask & (position > shared_lens)
    weighted = per_token_logps * token_weights.to(per_token_logps.dtype)
    shared = (weighted * shared_mask).sum(dim=1)
    tail = (weighted * tail_mask).sum(dim=1)
    return shared + ld_alpha * tail


def wpo_pair_weights(
    per_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """
    WPO pair weights (TRL's `use_weighting=True`; WPO paper Eq. 2), exactly as TRL computes them: from the policy's own
    per-token log-probabilities, *not* token-weighted, without gradient.

        ω_r = exp( Σ_j m_j (log πθ(y_j) - log Σ_v πθ(v)^2) / max(n'_r, 1) )        # per row, shifted mask
        ω_b = ω_{chosen b} · ω_{rejected b}

    Args:
        per_token_logps (`torch.Tensor`): `[2B, T-1]` policy per-token log-probabilities (TRL's raw `per_token_logps`,
            not length-desensitised), rows chosen then rejected.
        log_sum_sq_probs (`torch.Tensor`): `[2B, T-1]` `log Σ_v p_v²` of each next-token distribution (TRL's fused
            head `log_sum_sq_probs` output).
        completion_mask (`torch.Tensor`): `[2B, T-1]` shifted completion mask.

    Returns:
        `torch.Tensor`: `[B]` pair weights, detached; multiply them into each loss type's per-pair loss.
    """
    mask = completion_mask.to(per_token_logps.dtype)
    lengths = mask.sum(dim=1).clamp_min(1)
    with torch.no_grad():
        aligned = (per_token_logps - log_sum_sq_probs) * mask
        weights = torch.exp(aligned.sum(dim=1) / lengths)
    chosen_weights, rejected_weights = weights.chunk(2, dim=0)
    return chosen_weights * rejected_weights


def f_divergence_scores(
    logratios: torch.Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> torch.Tensor:
    """
    f-DPO scores `f'(t)` at `t = exp(W)`, from (weighted) log-ratios `W`, as TRL computes them:

        reverse_kl:        W
        forward_kl:        1 - exp(-W)
        js_divergence:     log 2 + log σ(W)
        alpha_divergence:  (exp(min((a-1) W, c)) - 1) / (a - 1),   c = 11 (fp16) or 80; a = 1 falls back to W

    Args:
        logratios (`torch.Tensor`): `[B]` log-ratios.
        f_divergence_type (`str`): one of `F_DIVERGENCE_TYPES`.
        f_alpha_divergence_coef (`float`): `a` of the α-divergence (TRL's default 0.5).

    Returns:
        `torch.Tensor`: `[B]` scores, in the dtype of `logratios`.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:  # limit f'(t) -> log t: reverse KL, as TRL
            return logratios
        coef = 1.0 / (f_alpha_divergence_coef - 1.0)
        t = (f_alpha_divergence_coef - 1.0) * logratios
        # TRL computes in float32 (float64 stays float64 here; TRL has no float64 clamp entry) and casts back before
        # multiplying by 1/(a-1), so in float16 a coefficient |1/(a-1)| > 1 can still overflow to ±inf, as in TRL.
        t_float = torch.clamp(t.to(torch.promote_types(t.dtype, torch.float32)), max=_ALPHA_DIVERGENCE_CLAMP[t.dtype])
        return (torch.exp(t_float) - 1.0).to(t.dtype) * coef
    raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}.")


def pair_rewards(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The implicit rewards TRL logs, for every loss type and f-divergence alike: `β · W_c` and `β · W_r`, detached (no
    f-divergence score, no length normalisation, no TDPO term; LD-DPO sums when `ld_alpha` is set). TRL's
    `rewards/margins` is their difference and `rewards/accuracies` the fraction with `β W_c > β W_r`.

    Args:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps (`torch.Tensor`): `[B]` weighted sums.
        beta (`float`): β.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `[B]` chosen and rejected rewards.
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return chosen_rewards, rejected_rewards


def nonzero_lengths(weight_sum: torch.Tensor) -> torch.Tensor:
    """The weight sums `S` `[B]` as the lengths of `ipo`/`sigmoid_norm`: unchanged, except 1 where `S = 0` (an empty
    row, whose score is then 0). Returns `[B]`."""
    return torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))


def preference_losses(
    loss_type: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_weight_sum: torch.Tensor | None = None,
    rejected_weight_sum: torch.Tensor | None = None,
    sft_logps: torch.Tensor | None = None,
    sft_weight_sum: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    kl_chosen: torch.Tensor | None = None,
    kl_rejected: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """
    Per-pair losses of one TRL loss type on token-weighted sums. With `W = logps^W - ref_logps^W`, `s = f'(e^W)`,
    `Δ = s_c - s_r - α(K_r - sg(K_c))`, `ε = label_smoothing`, `σ` the logistic function:

        sigmoid       -log σ(βΔ)
        hinge         relu(1 - βΔ)
        ipo           (s_c/S_c - s_r/S_r - 1/(2β))²                   S = weight sum, 1 where it is 0
        sigmoid_norm  -log σ(β (s_c/S_c - s_r/S_r))
        exo_pair      σ(βΔ)(log σ(βΔ) - log(1-ε)) + σ(-βΔ)(log σ(-βΔ) - log ε)               (ε > 0)
        robust        [-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1 - 2ε)
        discopop      (1 - m)(-log σ(βΔ)) + m·exp(-βΔ),  m = σ(βΔ/τ)
        nca_pair      -log σ(βW_c) - ½ log σ(-βW_c) - ½ log σ(-βW_r)
        bco_pair      -log σ(βW_c) - log σ(-βW_r)          (TRL 1.16 keeps no running reward mean: no state)
        sppo_hard     (W_c - 1/(2β))² + (W_r + 1/(2β))²
        apo_zero      1 - σ(βW_c) + σ(βW_r)
        apo_down      σ(βW_c) + 1 - σ(β(W_c - W_r))
        aot           d = sort_b(logps^W_c - logps^W_r) - sort_b(ref_logps^W_c - ref_logps^W_r);
                      -(1-ε) log σ(βd) - ε log σ(-βd)      (sorted over the batch: loss b is not pair b's)
        aot_unpaired  same with d = sort_b(W_c) - sort_b(W_r)
        sft           -Σ_b sft_logps_b / Σ_b sft_weight_sum_b, repeated B times

    `sft` is TRL's token-level mean over the whole batch (`-chosen_per_token_logps[chosen_mask].mean()`), not a
    per-row mean: pass `sft_logps = Σ_j w_j log πθ(y_j)` of each *chosen* row without LD-DPO (TRL's sft ignores
    `ld_alpha`) and `sft_weight_sum = weight_sums(w, completion_mask, scored_only=True)` of the chosen rows; the result
    is then `-Σ_{b,j} w log πθ / Σ_{b,j} w`, exactly TRL's mean when `w ≡ 1`. A batch without any scored chosen token
    gives 0/0 = NaN, as TRL's mean of an empty selection.

    Args:
        loss_type (`str`): one of `LOSS_TYPES`.
        chosen_logps, rejected_logps (`torch.Tensor`): `[B]` policy weighted sums `logps^W` (LD-DPO applied if used).
        ref_chosen_logps, ref_rejected_logps (`torch.Tensor`): `[B]` reference weighted sums, same weights.
        beta (`float`): β (τ of IPO).
        chosen_weight_sum, rejected_weight_sum (`torch.Tensor`, *optional*): `[B]` lengths `S` for `ipo` and
            `sigmoid_norm`, from `weight_sums(...)` (TRL's unshifted token counts when `w ≡ 1`).
        sft_logps, sft_weight_sum (`torch.Tensor`, *optional*): `[B]` chosen rows' weighted policy sums and scored
            weight sums, for `sft`.
        label_smoothing (`float`): ε of `robust`, `exo_pair`, `aot`, `aot_unpaired`.
        f_divergence_type (`str`): one of `F_DIVERGENCE_TYPES`; non-default only with `F_DIVERGENCE_LOSS_TYPES`.
        f_alpha_divergence_coef (`float`): `a` of the α-divergence.
        discopop_tau (`float`): τ of `discopop`.
        kl_chosen, kl_rejected (`torch.Tensor`, *optional*): `[B]` sequential KL `K_c`, `K_r` (TDPO), required when
            `alpha != 0`; `K_c` is detached here (TDPO2).
        alpha (`float`): α of the TDPO term; non-zero only with `KL_LOSS_TYPES` and reverse KL.

    Returns:
        `torch.Tensor`: `[B]` per-pair losses; their mean is TRL's loss for this type (before `loss_weights`).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; TRL 1.16's loss types are {LOSS_TYPES}.")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}.")
    if f_divergence_type != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is defined only for {F_DIVERGENCE_LOSS_TYPES}, not "
            f"{loss_type!r}: the f-DPO normaliser log Z(x) cancels only in the chosen - rejected score difference (as "
            "TRL). Use f_divergence_type='reverse_kl'."
        )
    if alpha != 0.0:
        if loss_type not in KL_LOSS_TYPES:
            raise ValueError(
                f"The TDPO sequential-KL term (alpha != 0) corrects the margin Δ and is defined for {KL_LOSS_TYPES}, "
                f"not {loss_type!r}: that loss sees the pair through length-normalised scores, separate "
                "chosen/rejected terms, a batch sort or no margin at all. Set alpha=0."
            )
        if f_divergence_type != "reverse_kl":
            raise ValueError(
                f"The TDPO sequential-KL term (alpha != 0) is derived for the reverse-KL margin, not "
                f"f_divergence_type={f_divergence_type!r}. Set alpha=0 or f_divergence_type='reverse_kl'."
            )
        if kl_chosen is None or kl_rejected is None:
            raise ValueError("`kl_chosen` and `kl_rejected` are required when `alpha != 0`.")
    if loss_type == "exo_pair" and label_smoothing == 0.0:
        raise ValueError("The 'exo_pair' loss needs label_smoothing > 0 (log ε); the EXO paper recommends 1e-3.")

    chosen_logratios = chosen_logps - ref_chosen_logps  # W_c
    rejected_logratios = rejected_logps - ref_rejected_logps  # W_r
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    delta = chosen_scores - rejected_scores
    if alpha != 0.0:
        delta = delta - alpha * (kl_rejected - kl_chosen.detach())  # Eq. 12 of TI-DPO / TDPO2

    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type in ("ipo", "sigmoid_norm"):
        # TRL divides each score by its completion length; the weighted analogue divides by the weight sum.
        if chosen_weight_sum is None or rejected_weight_sum is None:
            raise ValueError(
                f"The {loss_type!r} loss needs `chosen_weight_sum` and `rejected_weight_sum` (from `weight_sums`)."
            )
        # Only empty rows (S = 0) are guarded, not TRL's `clamp(min=1)`: weights summing below 1 (`"sum"`
        # normalisation, small dataset or TIS weights) would otherwise make the loss depend on their scale. With
        # w ≡ 1, S is a token count, so both guards agree and TRL's numbers are kept.
        chosen_normalised = chosen_scores / nonzero_lengths(chosen_weight_sum)
        rejected_normalised = rejected_scores / nonzero_lengths(rejected_weight_sum)
        normalised_delta = chosen_normalised - rejected_normalised
        if loss_type == "ipo":
            return (normalised_delta - 1 / (2 * beta)) ** 2  # Eq. 17 of IPO
        return -F.logsigmoid(beta * normalised_delta)
    if loss_type == "exo_pair":
        # EXO-pref, Eq. 16 of the EXO paper; ε as a float32 tensor, as TRL, so log(1 - ε) and log ε round alike
        epsilon_dtype = torch.promote_types(delta.dtype, torch.float32)
        epsilon = torch.tensor(label_smoothing, device=delta.device, dtype=epsilon_dtype)
        logits = beta * delta
        return torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-epsilon)) + torch.sigmoid(-logits) * (
            F.logsigmoid(-logits) - torch.log(epsilon)
        )
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "discopop":
        # Eq. 5 of DiscoPOP
        logits = beta * delta
        modulation = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    if loss_type == "nca_pair":
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
        return (
            -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
        )
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)  # APO Eq. 7
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + (
            1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
        )  # APO Eq. 8
    if loss_type in SORTING_LOSS_TYPES:
        if loss_type == "aot":
            policy_sorted, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
            ref_sorted, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
            sorted_delta = policy_sorted - ref_sorted
        else:
            chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
            rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
            sorted_delta = chosen_sorted - rejected_sorted
        return (
            -F.logsigmoid(beta * sorted_delta) * (1 - label_smoothing)
            - F.logsigmoid(-beta * sorted_delta) * label_smoothing
        )
    # loss_type == "sft"
    if sft_logps is None or sft_weight_sum is None:
        raise ValueError(
            "The 'sft' loss needs `sft_logps` (chosen rows' weighted policy sums, without LD-DPO) and "
            "`sft_weight_sum` (`weight_sums(..., scored_only=True)` of the chosen rows)."
        )
    batch_loss = -sft_logps.sum() / sft_weight_sum.sum()
    return batch_loss.repeat(chosen_logps.size(0))


def combined_preference_loss(
    loss_types: list[str] | tuple[str, ...],
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_weights: list[float] | tuple[float, ...] | None = None,
    pair_weights: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """
    TRL's loss for several loss types (MPO-style `loss_weights`), with optional WPO pair weights:

        L = Σ_k λ_k · mean_b(ω_b · L_k[b])          λ = loss_weights (default all 1), ω = pair_weights (default 1)

    in TRL's order of operations (each type's mean, then the weighted sum). The WPO product is out of place, so it
    also works for `hinge` and `sft`, where TRL 1.16's in-place `per_sequence_loss *= ...` fails (hinge: autograd
    error on relu's saved output at backward; sft: in-place write to an expanded tensor).

    Args:
        loss_types (`list[str]`): loss types, each in `LOSS_TYPES`.
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps (`torch.Tensor`): `[B]` weighted sums.
        loss_weights (`list[float]`, *optional*): λ, one per loss type.
        pair_weights (`torch.Tensor`, *optional*): `[B]` WPO weights from `wpo_pair_weights`.
        **options: keyword arguments of `preference_losses` (`beta`, weight sums, `label_smoothing`, ...).

    Returns:
        `torch.Tensor`: scalar loss.
    """
    if loss_weights is None:
        loss_weights = [1.0] * len(loss_types)
    if len(loss_weights) != len(loss_types):
        raise ValueError(
            f"`loss_weights` must have one weight per loss type: got {len(loss_weights)} for {list(loss_types)}."
        )
    if pair_weights is not None and any(loss_type in SORTING_LOSS_TYPES for loss_type in loss_types):
        raise ValueError(
            f"WPO pair weights (use_weighting=True) cannot be used with {SORTING_LOSS_TYPES}: those losses sort the "
            "batch, so per-pair weights would land on other pairs (TRL refuses this too)."
        )
    loss = 0.0
    for loss_type, loss_weight in zip(loss_types, loss_weights, strict=True):
        losses = preference_losses(
            loss_type, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, **options
        )
        if pair_weights is not None:
            losses = losses * pair_weights
        loss = loss + losses.mean() * loss_weight
    return loss
