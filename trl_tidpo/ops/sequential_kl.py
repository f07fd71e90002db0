"""
The sequential KL term of TDPO, optional in TI-DPO (`tdpo_alpha > 0`; SPEC §3):

    K = sum_{j in completion} sum_v πref(v | prefix_j) * (log πref(v | prefix_j) - log πθ(v | prefix_j))

computed in chunks of positions: both models' logits exist for one chunk at a time, and the chunk is recomputed in
backward (activation checkpointing) instead of being stored, so no `[rows, T, vocab]` tensor is ever built.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_kl(
    policy_hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    policy_logits_fn: Callable[[torch.Tensor], torch.Tensor],
    ref_logits_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """KL(πref || πθ) at each of `N` positions from hidden states `[N, H]`; returns `[N]` float32."""
    policy_logps = F.log_softmax(policy_logits_fn(policy_hidden), dim=-1)
    with torch.no_grad():
        ref_logps = F.log_softmax(ref_logits_fn(ref_hidden), dim=-1)
    return (ref_logps.exp() * (ref_logps - policy_logps)).sum(dim=-1)


def sequential_kl(
    policy_hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    completion_mask: torch.Tensor,
    policy_logits_fn: Callable[[torch.Tensor], torch.Tensor],
    ref_logits_fn: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 64,
) -> torch.Tensor:
    """
    Per-row sequential KL over completion tokens.

    Args:
        policy_hidden (`torch.Tensor`): `[R, T, H]` policy final hidden states (with grad).
        ref_hidden (`torch.Tensor`): `[R, T, H]` reference final hidden states (no grad).
        completion_mask (`torch.Tensor`): `[R, T - 1]` shifted completion mask: entry `i` marks token `i + 1`, whose
            distribution comes from the hidden state at position `i`.
        policy_logits_fn, ref_logits_fn: map hidden states `[N, H]` to float32 logits `[N, vocab]`.
        chunk_size (`int`): positions per chunk; memory grows as `2 * chunk_size * vocab` floats.

    Returns:
        `torch.Tensor`: `[R]` float32 `K` per row.
    """
    mask = completion_mask.bool()
    rows = mask.nonzero(as_tuple=True)[0]  # [N] row of each completion position
    policy_sel = policy_hidden[:, :-1][mask]  # [N, H]
    ref_sel = ref_hidden[:, :-1][mask].detach()
    per_position = []
    for start in range(0, policy_sel.size(0), chunk_size):
        end = start + chunk_size
        args = (policy_sel[start:end], ref_sel[start:end], policy_logits_fn, ref_logits_fn)
        if policy_sel.requires_grad:
            per_position.append(checkpoint(_chunk_kl, *args, use_reentrant=False))
        else:
            per_position.append(_chunk_kl(*args))
    kl = torch.zeros(completion_mask.size(0), dtype=torch.float32, device=completion_mask.device)
    if per_position:
        kl = kl.index_add(0, rows, torch.cat(per_position))
    return kl
