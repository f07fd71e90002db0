"""
Statistics of the tiny arithmetic benchmark (`benchmarks/tiny_arithmetic.py`): paired differences per held-out prompt
and seed with a two-way bootstrap (seeds and prompts resampled independently), and prompts gained/lost against the
start model.
"""

import numpy as np


def paired_difference(variant: np.ndarray, baseline: np.ndarray, *, reps: int, seed: int) -> dict[str, float]:
    """
    Paired difference `variant − baseline` of per-(seed, prompt) values, both `[S, P]` (the same seeds and prompts).

    Returns:
        `{"mean", "ci_low", "ci_high", "se"}`: the mean difference over all seeds and prompts (equal to the difference
        of the two means), and the 2.5 / 97.5 percentiles and standard deviation of the mean over `reps` bootstrap
        resamples that draw `S` seeds and `P` prompts with replacement, independently.
    """
    if variant.shape != baseline.shape or variant.ndim != 2:
        raise ValueError(
            f"Paired values need the same [seeds, prompts] shape, got {variant.shape} and {baseline.shape}."
        )
    diff = variant.astype(float) - baseline.astype(float)
    rng = np.random.default_rng(seed)
    num_seeds, num_prompts = diff.shape
    # mean over a resample of seeds × prompts = mean over the chosen seeds of that seed's mean over the chosen prompts
    means = np.empty(reps)
    for r in range(reps):
        rows = rng.integers(num_seeds, size=num_seeds)
        cols = rng.integers(num_prompts, size=num_prompts)
        means[r] = diff[np.ix_(rows, cols)].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diff.mean()), "ci_low": float(low), "ci_high": float(high), "se": float(means.std(ddof=1))}


def gained_lost(correct: np.ndarray, start: np.ndarray) -> tuple[list[int], list[int]]:
    """Per seed, the held-out prompts right now but wrong at the start (gained) and the reverse (lost): `[S, P]`, `[P]`."""
    correct, start = correct.astype(bool), start.astype(bool)
    return (correct & ~start).sum(1).tolist(), (~correct & start).sum(1).tolist()
