"""How well per-token weights find the critical tokens, and held-out preference accuracy."""

from collections.abc import Sequence
from typing import Any


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of `values`, ties sharing the mean rank of their group (as ROC-AUC and Spearman's rho need)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """
    Area under the ROC curve of `scores` for the binary `labels`: the probability that a random positive scores
    higher than a random negative, ties counting one half (the Mann-Whitney U statistic over `n_pos * n_neg`).

    Raises:
        ValueError: if the lengths differ or one class is empty (the AUC is undefined).

    Returns:
        `float` in [0, 1]; 0.5 for uninformative scores.
    """
    if len(scores) != len(labels):
        raise ValueError(f"`scores` and `labels` differ in length: {len(scores)} vs {len(labels)}.")
    n_pos = sum(1 for label in labels if label)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs at least one positive and one negative label.")
    ranks = average_ranks(scores)
    rank_sum = sum(rank for rank, label in zip(ranks, labels) if label)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def top_k_share(weights: Sequence[float], labels: Sequence[bool], k: int | None = None) -> float:
    """
    Share of critical tokens among the `k` highest-weighted tokens of one row; `k` defaults to the number of critical
    tokens (then a perfect ranking gives 1 and random weights give the row's critical fraction). Ties at the cut are
    broken toward the earlier token.

    Returns:
        `float` in [0, 1].
    """
    if len(weights) != len(labels):
        raise ValueError(f"`weights` and `labels` differ in length: {len(weights)} vs {len(labels)}.")
    k = sum(1 for label in labels if label) if k is None else k
    if k <= 0:
        raise ValueError("`k` must be >= 1 (the row needs at least one critical token).")
    top = sorted(range(len(weights)), key=lambda i: (-weights[i], i))[:k]
    return sum(1 for i in top if labels[i]) / len(top)


def preference_accuracy(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float]) -> float:
    """Share of pairs whose chosen reward is strictly above the rejected one (ties count as wrong, as in TRL)."""
    if len(chosen_rewards) != len(rejected_rewards) or not chosen_rewards:
        raise ValueError("Need the same, non-zero number of chosen and rejected rewards.")
    return sum(c > r for c, r in zip(chosen_rewards, rejected_rewards)) / len(chosen_rewards)


def weight_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """
    `roc_auc` of the weights against the critical labels, pooled over every completion token, and the mean
    `top_k_share` (k = the row's number of critical tokens); the same two with special tokens (EOS, chat-template
    markers) left out as `roc_auc_content` and `top_k_share_content`, since they are never critical and the
    attribution often puts most weight on them.
    """
    metrics = {}
    for suffix, keep_special in (("", True), ("_content", False)):
        kept = [_without_special(row) if not keep_special else row for row in rows]
        scores = [w for row in kept for w in row["weights"]]
        labels = [c for row in kept for c in row["critical"]]
        shares = [top_k_share(row["weights"], row["critical"]) for row in kept if any(row["critical"])]
        metrics[f"roc_auc{suffix}"] = roc_auc(scores, labels)
        metrics[f"top_k_share{suffix}"] = sum(shares) / len(shares)
    return metrics


def _without_special(row: dict[str, Any]) -> dict[str, Any]:
    keep = [not special for special in row["special"]]
    return {
        "weights": [w for w, k in zip(row["weights"], keep) if k],
        "critical": [c for c, k in zip(row["critical"], keep) if k],
    }


def critical_base_rate(rows: list[dict[str, Any]], content_only: bool = False) -> float:
    """Mean share of critical tokens per completion (special tokens left out with `content_only`): the `top_k_share`
    of random weights."""
    rows = [_without_special(row) for row in rows] if content_only else rows
    return sum(sum(row["critical"]) / len(row["critical"]) for row in rows) / len(rows)


# ---------------------------------------------------------------------------------------------------- the comparison
