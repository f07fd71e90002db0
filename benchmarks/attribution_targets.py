"""
Attribution targets beyond the paper's, on the demo's critical-token benchmark (`benchmarks/critical_tokens.py`'s data
and models): per seed, the demo's tiny Llama after its SFT warm-up, then trained with DPO and with TI-DPO (defaults);
on the held-out pairs, how well each target's normalised attribution (λ=1) ranks the known critical tokens (pooled
ROC-AUC and top-k share, with and without special tokens), beside the trainer's default weights (λ=0.7). The same
targets are measured on SmolLM2 by `benchmarks/real_model.py`; the target code is shared (`attributions_by_target`).

    python benchmarks/attribution_targets.py --seeds 0 1 2 --steps 300 --output attribution_targets.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from real_model import TARGETS, attributions_by_target, closing_token_count, mean_std
from transformers import AutoModelForCausalLM

from trl_tidpo import token_weights

# The demo's data, model builders and metrics (package internals, as `critical_tokens.py` uses them)
from trl_tidpo.tools.demo.data import critical_token_labels, load_pairs
from trl_tidpo.tools.demo.metrics import roc_auc, top_k_share
from trl_tidpo.tools.demo.runner import VARIANTS, DemoConfig, build_tokenizer, limit_cpu_threads, sft_warmup, train_variant
from trl_tidpo.modeling.tokenization import tokenize_completion


def measure(model, tokenizer, rows: list[dict], reference=None) -> dict[str, dict[str, float]]:
    """Critical-token ROC-AUC / top-k share of each target (and of the default TI-DPO weights) on `rows`."""
    scores: dict[str, list[list[float]]] = {}
    labels, special = [], []
    special_ids = set(tokenizer.all_special_ids)
    for row in rows:
        for side in ("chosen", "rejected"):
            prompt_ids, comp_ids = tokenize_completion(tokenizer, row["prompt"], row[side])
            closing = closing_token_count(tokenizer, comp_ids)
            for name, values in attributions_by_target(model, prompt_ids, comp_ids, closing, reference).items():
                scores.setdefault(name, []).append(values)
            default = token_weights(model, tokenizer, row["prompt"], row[side]).weights
            scores.setdefault("TI-DPO weights (λ=0.7, paper target)", []).append(default)
            labels.append(critical_token_labels(tokenizer, row["prompt"], row[side], row[f"{side}_critical"]))
            special.append([token_id in special_ids for token_id in comp_ids])
    out = {}
    for name, rows_scores in scores.items():
        metrics = {}
        for suffix, keep_special in (("", True), ("_content", False)):
            kept = [
                (
                    [s for s, sp in zip(ss, sps) if keep_special or not sp],
                    [c for c, sp in zip(cs, sps) if keep_special or not sp],
                )
                for ss, cs, sps in zip(rows_scores, labels, special)
            ]
            metrics[f"roc_auc{suffix}"] = roc_auc([s for ss, _ in kept for s in ss], [c for _, cs in kept for c in cs])
            metrics[f"top_k_share{suffix}"] = statistics.mean(top_k_share(ss, cs) for ss, cs in kept if any(cs))
        out[name] = metrics
    return out


def run_seed(seed: int, args, work: Path) -> dict:
    config = DemoConfig(output_dir=str(work / f"seed-{seed}"), steps=args.steps, seed=seed, progress_bars=False)
    rows = load_pairs()
    train_rows = [row for row in rows if row["split"] == "train"]
    test_rows = [row for row in rows if row["split"] == "test"][: args.max_eval_pairs]
    limit_cpu_threads(config)
    tokenizer = build_tokenizer(config, rows)
    start = sft_warmup(config, tokenizer, train_rows, work / f"seed-{seed}" / "start-model")
    reference = AutoModelForCausalLM.from_pretrained(start).eval()
    result = {"start": measure(reference, tokenizer, test_rows)}
    for name in ("DPO", "TI-DPO"):
        with tempfile.TemporaryDirectory() as run_dir:
            model, _ = train_variant(config, name, VARIANTS[name], start, tokenizer, train_rows, Path(run_dir))
        result[name] = measure(model, tokenizer, test_rows, reference=reference)
    return result


def markdown(per_seed: list[dict]) -> str:
    names = list(TARGETS) + ["TI-DPO weights (λ=0.7, paper target)"]
    lines = []
    for key, label in (
        ("roc_auc_content", "ROC-AUC, special tokens left out"),
        ("roc_auc", "ROC-AUC, all tokens"),
        ("top_k_share_content", "top-k share, special tokens left out"),
    ):
        lines += [f"\n{label}:\n", "| target | start (SFT) model | after DPO | after TI-DPO |", "|---|---|---|---|"]
        for name in names:
            cells = []
            for model in ("start", "DPO", "TI-DPO"):
                values = [run[model][name][key] for run in per_seed if name in run[model]]
                cells.append(mean_std(values) if values else "n/a")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-eval-pairs", type=int, default=None)
    parser.add_argument("--output", default="attribution_targets.json")
    parser.add_argument("--work-dir", default="attribution-target-runs")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    per_seed = []
    for seed in args.seeds:
        per_seed.append(run_seed(seed, args, Path(args.work_dir)))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "total_seconds": time.perf_counter() - t0, "per_seed": per_seed}, f, indent=2)
    print(markdown(per_seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
