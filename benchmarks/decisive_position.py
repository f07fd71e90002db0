"""
Where a benchmark's pairs first differ, and what weight TI-DPO's Gaussian prior gives that token: for each pair, the
completion position of the first token where chosen and rejected differ (0 = the first completion token), and the
prior's mean-1 weight there (`trl_tidpo.ops.prior.gaussian_prior` over the completion, `ρ` = 0.25, scaled by the
completion length as `weight_scale="mean"` does; DPO's weight is 1 everywhere). A reading aid for the text benchmark,
where most pairs differ at their first token: no training, only the tokenizer.

With `--weights-cache`, also the weight a contrastive weighting (TIS-DPO, cDPO) gave that token, read from the text
benchmark's cached weight columns (`work/contrastive/<recipe>-<weighting>-seed<S>-<key>.json`, one per seed, the
columns of the seed's own pairs in `text_train.seed_pairs` order), relative to its row's mean weight so that it
compares with the prior's mean-1 weight and DPO's 1.

    python benchmarks/decisive_position.py docs/text_benchmark.json        # a text benchmark JSON: its pair pool
    python benchmarks/decisive_position.py docs/real_model.json            # a SmolLM2 JSON: every seed's pairs
    python benchmarks/decisive_position.py docs/text_benchmark.json --weights-cache W/contrastive/sft-tis_dpo-seed*
"""

import argparse
import json
import os
import re
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from smollm2_task import completion_ids

from trl_tidpo.ops.prior import gaussian_prior


def first_difference(chosen: list[int], rejected: list[int]) -> int:
    """The first position where the two completions differ (the shorter's length if one is a prefix of the other)."""
    return next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))


def prior_weight_at(length: int, position: int, sigma_ratio: float = 0.25) -> float:
    """The mean-1 Gaussian prior weight of `position` in a completion of `length` tokens."""
    prior = gaussian_prior(torch.ones(1, length), sigma_ratio)[0]
    return float(length * prior[min(position, length - 1)])


def tokenized(tokenizer, pairs: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Each pair's (chosen, rejected) completion ids, tokenised as TRL does (`smollm2_task.completion_ids`)."""
    sides = ("chosen", "rejected")
    return [tuple(completion_ids(tokenizer, pair["prompt"], pair[side])[1] for side in sides) for pair in pairs]


def measure(completions: list[tuple[list[int], list[int]]]) -> dict:
    """Where each pair's completions (`tokenized`) first differ, and the prior's weight there."""
    positions, weights, lengths = [], [], []
    for chosen, rejected in completions:
        k = first_difference(chosen, rejected)
        positions.append(k)
        for completion in (chosen, rejected):
            lengths.append(len(completion))
            weights.append(prior_weight_at(len(completion), k))
    return {
        "pairs": len(completions),
        "first_difference_median": statistics.median(positions),
        "first_difference_at_0": sum(k == 0 for k in positions) / len(positions),
        "completion_tokens_median": statistics.median(lengths),
        "prior_weight_there_median": statistics.median(weights),
        "prior_weight_there_mean": statistics.fmean(weights),
    }


def relative_weight_at(weights: list[float], position: int) -> float | None:
    """`weights[position]` over the mean of `weights` (a row's weights of the kept tokens); None past its end."""
    if position >= len(weights) or not weights:
        return None
    return weights[position] / statistics.fmean(weights)


def measure_weights(completions: list[tuple[list[int], list[int]]], columns: dict[str, list[list[float]]]) -> dict:
    """
    Per side, the median over pairs of `relative_weight_at` the pair's first differing token, from the pairs'
    completions (`tokenized`) and `columns` (`chosen_token_weights` / `rejected_token_weights`, one row per pair, one
    weight per completion token kept).
    """
    result = {}
    for index, side in enumerate(("chosen", "rejected")):
        values, misaligned = [], 0
        for pair, weights in zip(completions, columns[f"{side}_token_weights"], strict=True):
            misaligned += len(weights) != len(pair[index])
            value = relative_weight_at(weights, first_difference(*pair))
            if value is not None:
                values.append(value)
        result[f"{side}_relative_weight_there_median"] = statistics.median(values)
        result[f"{side}_relative_weight_there_mean"] = statistics.fmean(values)
        result[f"{side}_rows"] = len(values)
        result[f"{side}_rows_misaligned"] = misaligned  # weight rows not one per completion token: should be 0
    return result


def cached_seed_weights(path: str, pool: list[dict]) -> tuple[int, list[dict], dict]:
    """A text benchmark contrastive cache file: its seed (from the name), the seed's pairs, and the weight columns."""
    from text_train import seed_pairs  # here, not at the top: it imports the training stack

    match = re.search(r"-seed(\d+)-", Path(path).name)
    if not match:
        raise SystemExit(f"{path}: not a contrastive weight cache (its name has no '-seed<N>-').")
    columns = json.loads(Path(path).read_text())
    seed = int(match.group(1))
    return seed, seed_pairs(pool, seed, len(columns["chosen_token_weights"])), columns


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark_json", help="a text benchmark or SmolLM2 benchmark JSON")
    parser.add_argument("--output", default=None, help="also write the result here (JSON, with the input's path)")
    parser.add_argument(
        "--weights-cache", nargs="+", default=None, metavar="JSON",
        help="text benchmark only: cached contrastive weight columns (one file per seed) to read there",
    )  # fmt: skip
    args = parser.parse_args(argv)
    data = json.loads(Path(args.benchmark_json).read_text())["data"]
    if "pool" in data:  # the text benchmark
        pairs = data["pool"]
    elif "pairs_by_seed" in data:  # the SmolLM2 benchmark, one pair sample per seed
        pairs = [p for seeded in data["pairs_by_seed"].values() for p in seeded["pairs"]]
    else:  # the SmolLM2 benchmark's JSONs before it (one shared sample)
        pairs = data["train_pairs"]
    from trl_tidpo.tools.demo.smollm2 import load_smollm2

    tokenizer = load_smollm2()[1]
    result = measure(tokenized(tokenizer, pairs))
    if args.weights_cache:
        if "pool" not in data:
            raise SystemExit("--weights-cache reads the text benchmark's caches: give a text benchmark JSON.")
        result["contrastive_weights"] = {}
        for path in args.weights_cache:
            seed, seed_pairs_, columns = cached_seed_weights(path, data["pool"])
            completions = tokenized(tokenizer, seed_pairs_)
            result["contrastive_weights"][f"seed {seed}"] = {
                "cache": Path(path).name, "prior": measure(completions), **measure_weights(completions, columns),
            }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps({"input": args.benchmark_json, **result}, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
