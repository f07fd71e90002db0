"""
Critical-token benchmark: the `trl-tidpo demo` comparison over several seeds, for DPO, TI-DPO (defaults), TI-DPO with
λ=1 (gradient only), λ=0 (prior only) and without the triplet loss. Prints a markdown table of mean ± std (sample
standard deviation over seeds) and writes every per-seed number to a JSON file.

    python benchmarks/critical_tokens.py --seeds 0 1 2 3 4 --steps 300 --output critical_tokens.json

Each seed builds its own tiny model and SFT warm-up; within a seed every variant starts from that same model and sees
the same data order.
"""

import argparse
import json
import os
import statistics
import sys
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from trl_tidpo.tools.demo.report import TABLE_ROWS  # noqa: E402
from trl_tidpo.tools.demo.runner import VARIANTS, DemoConfig, run_comparison  # noqa: E402


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def markdown(per_seed: list[dict], variants: list[str]) -> str:
    """Mean ± std over seeds of each metric (rows) for each variant (columns), then the baselines."""
    lines = ["| metric | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for key, label, _ in TABLE_ROWS:
        cells = [mean_std([run["results"][name][key] for run in per_seed]) for name in variants]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if key == "margin":  # learning speed: held-out accuracy and margin early in training
            for step in sorted(per_seed[0]["results"][variants[0]]["held_out_curve"]):
                for point_key in ("accuracy", "margin"):
                    values = [[run["results"][name]["held_out_curve"][step][point_key] for run in per_seed] for name in variants]
                    name_ = "held-out accuracy" if point_key == "accuracy" else "held-out margin"
                    lines.append(f"| {name_} at step {step} | " + " | ".join(mean_std(v) for v in values) + " |")
    keys = ("roc_auc", "top_k_share", "roc_auc_content", "top_k_share_content")
    lines += [
        "",
        "| baseline weights (no training) | ROC-AUC | top-k share | ROC-AUC, special tokens left out | top-k share, "
        "special tokens left out |",
        "|---|---|---|---|---|",
        "| TI-DPO weights (λ=0.7) of the starting SFT model | "
        + " | ".join(mean_std([run["start"][k] for run in per_seed]) for k in keys)
        + " |",
        "| Gaussian prior alone (λ=0) | " + " | ".join(mean_std([run["prior_only"][k] for run in per_seed]) for k in keys) + " |",
        f"| uniform or random weights | 0.500 | {mean_std([run['base_rate'] for run in per_seed])} | 0.500 | "
        f"{mean_std([run['base_rate_content'] for run in per_seed])} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=300, help="training steps of every variant (default 300)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--eval-at-steps", type=int, nargs="*", default=[10, 25, 50], help="also score held-out pairs here")
    parser.add_argument("--output", default="critical_tokens.json", help="per-seed numbers (JSON)")
    parser.add_argument("--work-dir", default="benchmark-runs", help="where each seed's models are written")
    args = parser.parse_args(argv)

    per_seed = []
    start = time.perf_counter()
    for seed in args.seeds:
        config = DemoConfig(
            output_dir=os.path.join(args.work_dir, f"seed-{seed}"),
            steps=args.steps,
            seed=seed,
            variants=args.variants,
            progress_bars=False,
            eval_at_steps=args.eval_at_steps,
        )
        summary = run_comparison(config)
        for result in summary["results"].values():
            result.pop("weight_rows")
            result["loss_curve"] = [entry["loss"] for entry in result.pop("log_history")]
        per_seed.append(summary)
        print(
            f"seed {seed} done ({time.perf_counter() - start:.0f} s): "
            + ", ".join(f"{n}: acc {r['accuracy']:.3f} auc {r['roc_auc']:.3f}" for n, r in summary["results"].items()),
            file=sys.stderr,
            flush=True,
        )
    total = time.perf_counter() - start
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "total_seconds": total, "per_seed": per_seed}, f, indent=2)
    print(markdown(per_seed, args.variants))
    print(f"\n{len(args.seeds)} seeds × {args.steps} steps, {total:.0f} s in total.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
