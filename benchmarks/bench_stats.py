"""
Statistics shared by every behavioural benchmark (`tiny_arithmetic.py`, `real_model.py`, the text benchmark).

Each benchmark has, per variant, a `[S, P]` table of per-(seed, held-out prompt) values (0/1 correctness, a gold
log-prob) and pairs it with DPO's table of the same seeds and prompts. The difference is summarised three ways:

- **seed level** (the headline): a Student t-interval over the `S` per-seed mean differences, `df = S − 1`. With few
  seeds this is the honest interval: a bootstrap that resamples 3 seeds gives roughly their [min, max].
- **hierarchical bootstrap**: resample the seeds, then the prompts within each resampled seed.
- **prompt level**: a paired bootstrap over prompts (seeds kept), or over prompts × seeds drawn independently.

Also: prompts gained / lost against the start, the learning-rate choice on dev (with a flag when the chosen rate is at
an edge of the grid, and the next rate beyond it), and the sanity gate (DPO must beat the start by more than 2
standard errors, on the seed-level interval when there are at least 2 seeds).
"""

import math
import statistics
from collections.abc import Sequence

import numpy as np

# Two-sided 95 % Student t quantiles t_{0.975, df} for df = 1..30 (the standard table)
T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
Z_975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """
    `t_{0.975, df}`: scipy's when installed; else the table for df ≤ 30 and, above, the Cornish-Fisher expansion
    `z + (z³ + z)/(4 df) + (5z⁵ + 16z³ + 3z)/(96 df²)` (error < 1e-4 for df > 30).
    """
    if df < 1:
        raise ValueError(f"A t-interval needs at least 2 seeds (df ≥ 1), got df={df}.")
    try:
        from scipy.stats import t
    except ImportError:
        if df <= len(T_975):
            return T_975[df - 1]
        z = Z_975
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    return float(t.ppf(0.975, df))


def _percentile_ci(means: np.ndarray, mean: float, kind: str) -> dict:
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": mean, "ci_low": float(low), "ci_high": float(high), "se": float(means.std(ddof=1)), "kind": kind}


def _as_diff(variant: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    variant, baseline = np.asarray(variant, dtype=float), np.asarray(baseline, dtype=float)
    if baseline.ndim == 1:  # the start model: one value per prompt, the same for every seed
        baseline = np.broadcast_to(baseline, variant.shape)
    if variant.shape != baseline.shape or variant.ndim != 2:
        raise ValueError(
            f"Paired values need the same [seeds, prompts] shape, got {variant.shape} and {baseline.shape}."
        )
    return variant - baseline


def seed_level_ci(per_seed_differences: Sequence[float]) -> dict:
    """
    Student t-interval of the mean of `S` per-seed differences `d_s` (each a mean over prompts):
    `d̄ ± t_{0.975, S−1} · sd(d) / √S`. With one seed there is no interval: `ci_low`/`ci_high`/`se` are None.

    Returns:
        `{"mean", "ci_low", "ci_high", "se", "seeds", "df", "kind": "seed-level t"}`.
    """
    d = [float(x) for x in per_seed_differences]
    if not d:
        raise ValueError("seed_level_ci needs at least one per-seed difference.")
    mean = statistics.fmean(d)
    out = {"mean": mean, "ci_low": None, "ci_high": None, "se": None, "seeds": len(d), "df": len(d) - 1}
    out["kind"] = "seed-level t"
    if len(d) > 1:
        se = statistics.stdev(d) / math.sqrt(len(d))
        half = t_quantile_975(len(d) - 1) * se
        out.update(ci_low=mean - half, ci_high=mean + half, se=se)
    return out


def paired_bootstrap(
    variant: np.ndarray, baseline: np.ndarray, *, reps: int = 4000, seed: int = 0, resample_seeds: bool = True
) -> dict:
    """
    Percentile bootstrap of the paired mean difference `variant − baseline`, both `[S, P]` (the same seeds and prompts;
    a `[P]` baseline is the start model, shared by every seed).

    Each resample draws `P` prompts with replacement (the same prompts for every seed: the pairing over prompts is
    kept) and, with `resample_seeds`, `S` seeds with replacement, independently of the prompts. The draws of all
    resamples are made up front: `seeds = integers(S, size=(reps, S))` (only with `resample_seeds`), then
    `prompts = integers(P, size=(reps, P))`.

    Returns:
        `{"mean", "ci_low", "ci_high", "se", "kind"}`: the mean difference over all seeds and prompts, the 2.5 / 97.5
        percentiles and the standard deviation of the resampled means.
    """
    diff = _as_diff(variant, baseline)
    num_seeds, num_prompts = diff.shape
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(num_seeds, size=(reps, num_seeds)) if resample_seeds else None
    prompt_draws = rng.integers(num_prompts, size=(reps, num_prompts))
    # prompt counts per resample [reps, P] → per-seed resampled means [reps, S]
    counts = np.zeros((reps, num_prompts))
    np.add.at(counts, (np.arange(reps)[:, None], prompt_draws), 1.0)
    per_seed = counts @ diff.T / num_prompts
    if resample_seeds:
        means = np.take_along_axis(per_seed, seed_draws, axis=1).mean(1)
    else:
        means = per_seed.mean(1)
    kind = "bootstrap over prompts × seeds" if resample_seeds else "bootstrap over prompts"
    return _percentile_ci(means, float(diff.mean()), kind)


def hierarchical_bootstrap(variant: np.ndarray, baseline: np.ndarray, *, reps: int = 4000, seed: int = 0) -> dict:
    """
    Two-stage bootstrap of the paired mean difference: per resample, `S` seeds with replacement
    (`integers(S, size=S)`), then for each drawn seed its own `P` prompts with replacement (`integers(P, size=(S, P))`).

    Returns:
        `{"mean", "ci_low", "ci_high", "se", "kind": "hierarchical bootstrap"}`.
    """
    diff = _as_diff(variant, baseline)
    num_seeds, num_prompts = diff.shape
    rng = np.random.default_rng(seed)
    means = np.empty(reps)
    rows = np.arange(num_seeds)[:, None]
    for r in range(reps):
        seeds = rng.integers(num_seeds, size=num_seeds)
        prompts = rng.integers(num_prompts, size=(num_seeds, num_prompts))
        means[r] = diff[seeds[rows], prompts].mean()
    return _percentile_ci(means, float(diff.mean()), "hierarchical bootstrap")


def compare(variant: np.ndarray, baseline: np.ndarray, *, reps: int = 4000, seed: int = 0) -> dict:
    """
    Every summary of a paired difference `[S, P]` (or `[S, P]` minus a `[P]` start): the seed-level t-interval
    (headline; None bounds with one seed), the hierarchical bootstrap and the prompt-level bootstrap (prompts
    resampled, seeds kept).

    Returns:
        `{"mean", "seeds", "per_seed": [S], "seed_level": {...}, "hierarchical": {...}, "prompt_level": {...}}`.
    """
    diff = _as_diff(variant, baseline)
    per_seed = diff.mean(1).tolist()
    return {
        "mean": float(diff.mean()),
        "seeds": diff.shape[0],
        "per_seed": per_seed,
        "seed_level": seed_level_ci(per_seed),
        "hierarchical": hierarchical_bootstrap(diff, np.zeros_like(diff), reps=reps, seed=seed),
        "prompt_level": paired_bootstrap(diff, np.zeros_like(diff), reps=reps, seed=seed, resample_seeds=False),
    }


def headline_ci(comparison: dict) -> dict:
    """The interval to report first: seed-level when there are ≥ 2 seeds, else (one seed) the prompt-level one."""
    if comparison["seed_level"]["se"] is not None:
        return comparison["seed_level"]
    return comparison["prompt_level"]


def gained_lost(correct: np.ndarray, start: np.ndarray) -> tuple[list[int], list[int]]:
    """Per seed, the held-out prompts right now but wrong at the start (gained) and the reverse (lost): `[S, P]`, `[P]`."""
    correct, start = np.asarray(correct).astype(bool), np.asarray(start).astype(bool)
    return (correct & ~start).sum(1).tolist(), (~correct & start).sum(1).tolist()


# ---------------------------------------------------------------------------------------------------- learning rate


def select_learning_rate(dev_scores: dict[float, list[tuple[float, ...]]], grid: Sequence[float]) -> dict:
    """
    The grid rate with the best mean dev score: `dev_scores[lr]` holds one tuple per grid seed, compared
    lexicographically after averaging each component (e.g. `(accuracy, gold_logp)`: ties on accuracy go to the better
    log-prob). `grid` is the full grid (rates not yet run count for the edge test, not for the choice).

    Returns:
        `{"learning_rate", "edge": "low" | "high" | None, "beyond": float | None}`: `edge` says the chosen rate is the
        grid's lowest or highest, so the dev optimum may lie outside it; `beyond` is the next rate past that edge on
        the grid's geometric step (`extend_grid`).
    """
    if not dev_scores:
        raise ValueError("No dev results to select a learning rate from: run the grid with a dev split.")
    means = {lr: tuple(statistics.fmean(c) for c in zip(*rows)) for lr, rows in dev_scores.items() if rows}
    chosen = max(means, key=lambda lr: means[lr])
    rates = sorted(set(grid) | set(means))
    edge = None
    if len(rates) > 1 and chosen == rates[0]:
        edge = "low"
    elif len(rates) > 1 and chosen == rates[-1]:
        edge = "high"
    return {"learning_rate": chosen, "edge": edge, "beyond": extend_grid(rates, edge) if edge else None}


def canonical_rate(rate: float) -> float:
    """
    `rate` rounded to 6 significant digits: the one float a grid point is known by, so that a rate computed by
    `extend_grid` (2e-3² / 8e-4 = 0.004999999999999999) and the same rate typed on a command line (5e-3) are one grid
    point in a merge, a table column and the rate selection.
    """
    return float(f"{rate:.6g}")


def extend_grid(grid: Sequence[float], edge: str) -> float:
    """
    The rate one geometric step past the grid's `edge` ("low" or "high"), the step of its two outermost rates, as a
    `canonical_rate`.
    """
    rates = sorted(grid)
    if len(rates) < 2:
        raise ValueError("A grid needs two rates to be extended.")
    if edge == "low":
        return canonical_rate(rates[0] * rates[0] / rates[1])
    if edge == "high":
        return canonical_rate(rates[-1] * rates[-1] / rates[-2])
    raise ValueError(f"edge must be 'low' or 'high', got {edge!r}.")


# ---------------------------------------------------------------------------------------------------- gate


def gate(variants: Sequence[str], dpo_vs_start: dict | None) -> dict:
    """
    The sanity gate: a benchmark where DPO does not beat its start cannot rank variants against DPO. DPO must beat the
    start on the held-out metric by more than 2 standard errors of the seed-level interval (with one seed, of the
    prompt-level bootstrap, and `basis` says so).

    Args:
        variants: the variants of the run.
        dpo_vs_start: `compare(dpo, start)`, or None when DPO did not run.

    Returns:
        `{"passed": bool | None, "mean", "se", "basis", "message"}`; `passed` is None when DPO is not among the
        variants (nothing to gate on: the caller warns, or fails if it must).
    """
    if "DPO" not in variants or dpo_vs_start is None:
        return {
            "passed": None, "mean": None, "se": None, "basis": None,
            "message": "DPO is not among the variants: no sanity gate, and no comparison against DPO can be trusted "
            "(add DPO to --variants, or merge this run with one that has it).",
        }  # fmt: skip
    interval = headline_ci(dpo_vs_start)
    basis = "seed-level" if interval is dpo_vs_start["seed_level"] else "prompt-level (one seed)"
    passed = interval["mean"] > 2 * interval["se"]
    message = (
        f"DPO − start {interval['mean']:+.4f}, {basis} SE {interval['se']:.4f}: "
        + ("passed (> 2 SE)." if passed else "FAILED (not > 2 SE): this benchmark cannot rank variants against DPO.")
    )
    return {"passed": passed, "mean": interval["mean"], "se": interval["se"], "basis": basis, "message": message}
