"""
Where a benchmark's pairs first differ, and what weight TI-DPO's Gaussian prior gives that token: for each pair, the
completion position of the first token where chosen and rejected differ (0 = the first completion token), and the
prior's mean-1 weight there (`trl_tidpo.ops.prior.gaussian_prior` over the completion, `ρ` = 0.25, scaled by the
completion length as `weight_scale="mean"` does; DPO's weight is 1 everywhere). A reading aid for the text benchmark,
where most pairs differ at their first token: no training, only the tokenizer.

    python benchmarks/decisive_position.py docs/text_benchmark.json        # a text benchmark JSON: its pair pool
    python benchmarks/decisive_position.py docs/real_model.json            # a SmolLM2 JSON: every seed's pairs
"""

import argparse
import json
import os
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


def measure(tokenizer, pairs: list[dict]) -> dict:
    positions, weights, lengths = [], [], []
    for pair in pairs:
        _, chosen = completion_ids(tokenizer, pair["prompt"], pair["chosen"])
        _, rejected = completion_ids(tokenizer, pair["prompt"], pair["rejected"])
        k = first_difference(chosen, rejected)
        positions.append(k)
        for completion in (chosen, rejected):
            lengths.append(len(completion))
            weights.append(prior_weight_at(len(completion), k))
    return {
        "pairs": len(pairs),
        "first_difference_median": statistics.median(positions),
        "first_difference_at_0": sum(k == 0 for k in positions) / len(positions),
        "completion_tokens_median": statistics.median(lengths),
        "prior_weight_there_median": statistics.median(weights),
        "prior_weight_there_mean": statistics.fmean(weights),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark_json", help="a text benchmark or SmolLM2 benchmark JSON")
    parser.add_argument("--output", default=None, help="also write the result here (JSON, with the input's path)")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.benchmark_json).read_text())["data"]
    if "pool" in data:  # the text benchmark
        pairs = data["pool"]
    elif "pairs_by_seed" in data:  # the SmolLM2 benchmark, one pair sample per seed
        pairs = [p for seeded in data["pairs_by_seed"].values() for p in seeded["pairs"]]
    else:  # the SmolLM2 benchmark's JSONs before it (one shared sample)
        pairs = data["train_pairs"]
    from trl_tidpo.tools.demo.smollm2 import load_smollm2

    result = measure(load_smollm2()[1], pairs)
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps({"input": args.benchmark_json, **result}, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
