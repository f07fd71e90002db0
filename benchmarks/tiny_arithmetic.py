"""
Tiny arithmetic benchmark: a cheap, high-power behavioural screen of the training variants (`benchmarks/variants.py`).

A tiny Llama (hidden 64, 2 layers, a word tokenizer of digits and symbols) is trained from scratch (plain PyTorch SFT)
on two-digit addition, one token per digit ("2 9 + 5 3 =" → " 8 2"), with a *systematic* mistake in its SFT data: a
problem that carries is answered with every carry dropped (" 7 2") with probability 0.7. The SFT model learns that
mixture, so greedily it answers the problems without a carry right and the others wrong (held-out accuracy ~0.28;
calibrated once, then fixed). On-policy pairs are sampled from it (temperature 1): chosen = the gold answer, rejected =
the most frequent wrong one; they differ first at the first digit, the decisive token. Every variant is trained from
the same start with the same data order per seed (full fine-tuning, an explicit frozen reference copy), each at the
learning rate of a shared grid that maximises its accuracy on a dev split; the headline is held-out greedy exact-match
accuracy over 1,000 prompts and 10 seeds, with the held-out log-prob of the gold answer beside it, a paired bootstrap
CI against DPO (prompts and seeds resampled) and the decisive token's share of the gradient at the start.

    python benchmarks/tiny_arithmetic.py                 # the default screen (docs/tiny_benchmark.md: CPU and wall)
    python benchmarks/tiny_arithmetic.py --quick         # a smoke run: DPO and TI-DPO, 2 seeds
    python benchmarks/tiny_arithmetic.py --variants DPO TI-DPO difference --seeds 0 1 2 3 4

Results: a markdown table on stdout and every number in `--output` (JSON). The run fails (exit 1) when DPO does not
beat the start model by more than 2 standard errors (`--no-gate` only warns): a benchmark where DPO does not work
cannot rank variants against it.
"""

import argparse
import copy
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import numpy as np
import torch
import transformers
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_task
from tiny_stats import gained_lost, paired_difference
from variants import VARIANTS, Variant, decisive_gradient_share

from trl_tidpo import TIDPOTrainer

# The SFT start, calibrated once (converged: held-out accuracy ~0.28) and fixed, never tuned on the variants' results
SFT = {"hidden_size": 64, "num_layers": 2, "steps": 3000, "batch_size": 64, "lr": 3e-3, "carry_drop_rate": 0.7}
# Fixed split sizes, so the SFT data (everything else) does not depend on the evaluation options
HELDOUT, DEV = 1000, 500
DEFAULT_VARIANTS = list(VARIANTS)
_STATE: dict = {}  # set before the worker processes fork: tokenizer, start model, pairs dataset, splits


# ---------------------------------------------------------------------------------------------------- setup


def prepare(args) -> dict:
    """Splits, the SFT start model, its evaluations and the on-policy pairs (all seeded by `args.data_seed`)."""
    tokenizer = tiny_task.build_tokenizer()
    splits = tiny_task.make_splits({"heldout": HELDOUT, "dev": DEV, "sft": -1}, seed=args.data_seed)
    splits["heldout"], splits["dev"] = splits["heldout"][: args.heldout], splits["dev"][: args.dev]
    model = tiny_task.build_model(tokenizer, SFT["hidden_size"], SFT["num_layers"], seed=args.data_seed)
    targets = tiny_task.sft_completions(splits["sft"], SFT["carry_drop_rate"], seed=args.data_seed)
    t0 = time.process_time()
    losses = tiny_task.sft(
        model,
        tokenizer,
        splits["sft"],
        targets,
        steps=args.sft_steps,
        batch_size=SFT["batch_size"],
        lr=SFT["lr"],
        seed=args.data_seed,
    )
    sft_cpu = time.process_time() - t0
    pair_prompts = splits["sft"][: args.pair_prompts]
    pairs = tiny_task.sample_pairs(
        model, tokenizer, pair_prompts, samples=args.samples, temperature=args.temperature, seed=args.data_seed
    )
    if len(pairs) < args.batch_size:
        raise SystemExit(
            f"Only {len(pairs)} preference pairs from {len(pair_prompts)} prompts (fewer than --batch-size "
            f"{args.batch_size}): raise --pair-prompts or --samples."
        )
    dataset = Dataset.from_dict({key: [p[key] for p in pairs] for key in ("prompt", "chosen", "rejected")})
    return {
        "tokenizer": tokenizer,
        "splits": splits,
        "model": model,
        "pairs": pairs,
        "dataset": dataset,
        "start": {split: tiny_task.evaluate(model, tokenizer, splits[split]) for split in ("dev", "heldout")},
        "sft_final_loss": statistics.mean(losses[-20:]),
        "sft_cpu_seconds": sft_cpu,
    }


def training_config(variant: Variant, args, *, learning_rate: float, seed: int, output_dir: str):
    common = {
        "output_dir": output_dir,
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "constant",
        "beta": args.beta,
        "max_length": 16,
        "seed": seed,
        "data_seed": seed,
        "logging_steps": args.steps,
        "save_strategy": "no",
        "report_to": [],
        "bf16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    if variant.config_overrides is not None:
        common["anchor_max_new_tokens"] = tiny_task.MAX_ANSWER_DIGITS + 1  # a policy anchor is an answer + EOS
    return variant.config(**common)


def build_trainer(variant: Variant, config):
    """Full fine-tuning of a copy of the start model, with an explicit frozen copy as the reference."""
    start = _STATE["model"]
    return variant.trainer_cls(
        model=copy.deepcopy(start),
        ref_model=copy.deepcopy(start),
        args=config,
        train_dataset=_STATE["dataset"],
        processing_class=_STATE["tokenizer"],
    )


# ---------------------------------------------------------------------------------------------------- one run


def run_job(job: tuple[str, float, int, argparse.Namespace]) -> dict:
    """Train one (variant, learning rate, seed) from the start model; evaluate on the dev and held-out splits."""
    name, learning_rate, seed, args = job
    torch.set_num_threads(1)
    c0 = time.process_time()
    with tempfile.TemporaryDirectory() as output_dir:
        config = training_config(VARIANTS[name], args, learning_rate=learning_rate, seed=seed, output_dir=output_dir)
        trainer = build_trainer(VARIANTS[name], config)
        trainer.train()
        c1 = time.process_time()
        tokenizer, splits = _STATE["tokenizer"], _STATE["splits"]
        evals = {split: tiny_task.evaluate(trainer.model, tokenizer, splits[split]) for split in ("dev", "heldout")}
    return {
        "variant": name,
        "learning_rate": learning_rate,
        "seed": seed,
        "dev": evals["dev"],
        "heldout": evals["heldout"],
        "train_loss": trainer.state.log_history[-1].get("train_loss"),
        "train_cpu_seconds": c1 - c0,
        "cpu_seconds": time.process_time() - c0,
    }


def run_jobs(jobs: list[tuple], processes: int) -> list[dict]:
    if processes <= 1:
        return [run_job(job) for job in jobs]
    # fork: the workers share the start model and dataset already in memory (no re-import, no pickling)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return list(pool.imap_unordered(run_job, jobs, chunksize=1))


def cost_order(name: str) -> int:
    """Most expensive first, so the two processes finish together: policy anchors, then attribution, then neither."""
    overrides = VARIANTS[name].config_overrides
    if overrides is None or overrides.get("token_weighting") == "difference":
        return 2
    return 0 if overrides.get("triplet_gamma", 0.1) > 0 else 1


def gradient_shares(args, names: list[str]) -> dict[str, float]:
    """
    Mean `decisive_gradient_share` per variant on a fixed batch (the first `--share-pairs` pairs) at the start model.
    DPO is measured as a `TIDPOTrainer` with uniform weights and no triplet (the same loss and gradients).
    """
    shares = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for name in names:
            variant = VARIANTS[name]
            if variant.config_overrides is None:
                variant = Variant(TIDPOTrainer, {"token_weighting": "uniform", "triplet_gamma": 0.0})
            config = training_config(
                variant, args, learning_rate=args.learning_rates[0], seed=0, output_dir=output_dir
            )
            trainer = build_trainer(variant, config)
            rows = [trainer.train_dataset[i] for i in range(min(args.share_pairs, len(trainer.train_dataset)))]
            torch.manual_seed(0)  # policy anchors are sampled
            shares[name] = statistics.mean(decisive_gradient_share(trainer, trainer.data_collator(rows)))
    return shares


# ---------------------------------------------------------------------------------------------------- summary


def pick_learning_rates(grid: list[dict], names: list[str]) -> dict[str, float]:
    """Per variant, the grid learning rate with the best mean dev accuracy (ties: the best dev gold log-prob)."""
    chosen = {}
    for name in names:
        scores = {}
        for run in (r for r in grid if r["variant"] == name):
            scores.setdefault(run["learning_rate"], []).append(
                (statistics.mean(run["dev"]["correct"]), statistics.mean(run["dev"]["gold_logp"]))
            )
        chosen[name] = max(scores, key=lambda lr: tuple(statistics.mean(s[i] for s in scores[lr]) for i in (0, 1)))
    return chosen


def per_seed_matrix(runs: list[dict], key: str) -> np.ndarray:
    """`[S, P]` held-out values (`correct` or `gold_logp`) of runs sorted by seed."""
    return np.array([r["heldout"][key] for r in sorted(runs, key=lambda r: r["seed"])], dtype=float)


def summarize(args, state: dict, grid: list[dict], final: list[dict], chosen: dict, shares: dict) -> dict:
    start = state["start"]["heldout"]
    start_correct = np.array(start["correct"], dtype=float)
    runs_of = {name: [r for r in final if r["variant"] == name] for name in args.variants}
    dpo = {key: per_seed_matrix(runs_of["DPO"], key) for key in ("correct", "gold_logp")}
    variants = {}
    for name in args.variants:
        runs = sorted(runs_of[name], key=lambda r: r["seed"])
        correct, logp = per_seed_matrix(runs, "correct"), per_seed_matrix(runs, "gold_logp")
        gained, lost = gained_lost(correct, start_correct)
        variants[name] = {
            "learning_rate": chosen[name],
            "seeds": [r["seed"] for r in runs],
            "accuracy": correct.mean(1).tolist(),
            "gold_logp": logp.mean(1).tolist(),
            "malformed": [statistics.mean(r["heldout"]["malformed"]) for r in runs],
            "gained": gained,
            "lost": lost,
            "cpu_seconds": [r["cpu_seconds"] for r in runs],
            "vs_start_accuracy": paired_difference(
                correct, np.broadcast_to(start_correct, correct.shape), reps=args.bootstrap, seed=1
            ),
            "vs_dpo": {
                "accuracy": paired_difference(correct, dpo["correct"], reps=args.bootstrap, seed=2),
                "gold_logp": paired_difference(logp, dpo["gold_logp"], reps=args.bootstrap, seed=3),
            },
            "decisive_gradient_share": shares.get(name),
            "samples": runs[0]["heldout"]["outputs"][:6],
        }
    grid_table = {}
    for run in grid:
        point = grid_table.setdefault(run["variant"], {}).setdefault(str(run["learning_rate"]), {"seeds": []})
        point["seeds"].append(run["seed"])
        for split in ("dev", "heldout"):
            for key, label in (("correct", "accuracy"), ("gold_logp", "gold_logp")):
                point.setdefault(f"{split}_{label}", []).append(statistics.mean(run[split][key]))
    pairs = state["pairs"]
    return {
        "args": {k: v for k, v in vars(args).items()},
        "sft": {**SFT, "steps": args.sft_steps, "final_loss": state["sft_final_loss"]},
        "start": {
            "heldout_accuracy": statistics.mean(start["correct"]),
            "heldout_gold_logp": statistics.mean(start["gold_logp"]),
            "heldout_malformed": statistics.mean(start["malformed"]),
            "dev_accuracy": statistics.mean(state["start"]["dev"]["correct"]),
            "samples": start["outputs"][:6],
        },
        "pairs": {
            "count": len(pairs),
            "prompts": args.pair_prompts,
            "first_divergent": {str(k): sum(p["first_divergent"] == k for p in pairs) for k in range(4)},
            "rejected_is_carry_dropped": sum(p["rejected_is_carry_dropped"] for p in pairs),
        },
        "grid": grid_table,
        "variants": variants,
    }


def mean_std(values: list[float], digits: int = 3) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def ci(entry: dict, digits: int = 3) -> str:
    return f"{entry['mean']:+.{digits}f} [{entry['ci_low']:+.{digits}f}, {entry['ci_high']:+.{digits}f}]"


def markdown(summary: dict) -> str:
    start = summary["start"]
    lines = [
        (
            f"Start (SFT) model: held-out accuracy {start['heldout_accuracy']:.3f}, gold log-prob "
            f"{start['heldout_gold_logp']:.3f}, malformed {start['heldout_malformed']:.3f}; {summary['pairs']['count']} "
            f"pairs from {summary['pairs']['prompts']} prompts."
        ),
        "",
        (
            "| variant | lr (dev) | held-out accuracy | Δ accuracy vs DPO [95% CI] | gold log-prob | Δ gold log-prob vs "
            "DPO [95% CI] | gained / lost vs start | malformed | decisive-token gradient share | CPU s / run |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in summary["variants"].items():
        share = v["decisive_gradient_share"]
        lines.append(
            f"| {name} | {v['learning_rate']:g} | {mean_std(v['accuracy'])} | {ci(v['vs_dpo']['accuracy'])} | "
            f"{mean_std(v['gold_logp'])} | {ci(v['vs_dpo']['gold_logp'])} | "
            f"{statistics.mean(v['gained']):.1f} / {statistics.mean(v['lost']):.1f} | "
            f"{statistics.mean(v['malformed']):.3f} | {'n/a' if share is None else f'{share:.3f}'} | "
            f"{statistics.mean(v['cpu_seconds']):.1f} |"
        )
    lines += [
        "",
        (
            f"Learning-rate grid ({len(summary['args']['grid_seeds'])} seed(s) per point: {summary['args']['grid_seeds']}):"
            " dev accuracy / held-out accuracy / held-out gold log-prob"
        ),
        "",
        "| variant | " + " | ".join(f"lr {lr:g}" for lr in summary["args"]["learning_rates"]) + " |",
        "|---" * (len(summary["args"]["learning_rates"]) + 1) + "|",
    ]
    for name, points in summary["grid"].items():
        cells = []
        for lr in summary["args"]["learning_rates"]:
            p = points[str(lr)]
            cells.append(
                f"{statistics.mean(p['dev_accuracy']):.3f} / {statistics.mean(p['heldout_accuracy']):.3f} / "
                f"{statistics.mean(p['heldout_gold_logp']):.3f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, DPO and TI-DPO, smaller splits")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument(
        "--grid-seeds", type=int, default=3, help="how many of --seeds train at every grid learning rate"
    )
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument(
        "--heldout", type=int, default=HELDOUT, help=f"held-out prompts (never trained on, never dev; ≤ {HELDOUT})"
    )
    parser.add_argument("--dev", type=int, default=DEV, help=f"dev prompts: each variant's learning rate (≤ {DEV})")
    parser.add_argument("--pair-prompts", type=int, default=4000, help="training prompts sampled for pairs")
    parser.add_argument("--samples", type=int, default=8, help="sampled answers per prompt")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--sft-steps", type=int, default=SFT["steps"], help="calibrated; change only to smoke-test")
    parser.add_argument("--share-pairs", type=int, default=64, help="pairs of the fixed gradient-share batch")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the paired CIs")
    parser.add_argument("--data-seed", type=int, default=0, help="splits, SFT and pair sampling")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--no-gate", dest="gate", action="store_false", help="warn instead of failing the DPO gate")
    parser.add_argument("--output", default="tiny_arithmetic.json")
    args = parser.parse_args(argv)
    if args.quick:
        quick = {
            "variants": ["DPO", "TI-DPO"],
            "seeds": [0, 1],
            "grid_seeds": 1,
            "heldout": 500,
            "dev": 200,
            "pair_prompts": 1500,
            "steps": 20,
        }
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if "DPO" not in args.variants:
        args.variants = ["DPO"] + args.variants  # the baseline of every paired comparison
    if not (1 <= args.heldout <= HELDOUT and 1 <= args.dev <= DEV):
        parser.error(f"--heldout must be in [1, {HELDOUT}] and --dev in [1, {DEV}] (the splits are fixed).")
    if not 1 <= args.grid_seeds <= len(args.seeds):
        parser.error(f"--grid-seeds must be between 1 and the number of --seeds ({len(args.seeds)}).")
    args.grid_seeds = args.seeds[: args.grid_seeds]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    state = prepare(args)
    _STATE.update(state)
    print(
        f"SFT start: held-out accuracy {statistics.mean(state['start']['heldout']['correct']):.3f}; "
        f"{len(state['pairs'])} pairs ({time.perf_counter() - wall0:.0f} s)",
        flush=True,
    )
    names = sorted(args.variants, key=cost_order)
    grid_jobs = [(n, lr, s, args) for n in names for lr in args.learning_rates for s in args.grid_seeds]
    grid = run_jobs(grid_jobs, args.processes)
    chosen = pick_learning_rates(grid, args.variants)
    print(f"grid done ({time.perf_counter() - wall0:.0f} s); chosen on dev: {chosen}", flush=True)
    rest = [s for s in args.seeds if s not in args.grid_seeds]
    final = [r for r in grid if r["learning_rate"] == chosen[r["variant"]]]
    final += run_jobs([(n, chosen[n], s, args) for n in names for s in rest], args.processes)
    shares = gradient_shares(args, args.variants)
    summary = summarize(args, state, grid, final, chosen, shares)
    children = os.times()
    summary["cpu_seconds"] = {
        "total": time.process_time() - cpu0 + children.children_user + children.children_system,
        "sft": state["sft_cpu_seconds"],
        "runs": sum(r["cpu_seconds"] for r in grid) + sum(r["cpu_seconds"] for r in final if r["seed"] in rest),
    }
    summary["wall_seconds"] = time.perf_counter() - wall0
    summary["machine"] = {"cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "processes": args.processes}
    summary["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    summary["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    dpo_vs_start = summary["variants"]["DPO"]["vs_start_accuracy"]
    summary["gate"] = {
        "dpo_minus_start": dpo_vs_start["mean"],
        "se": dpo_vs_start["se"],
        "passed": dpo_vs_start["mean"] > 2 * dpo_vs_start["se"],
    }
    Path(args.output).write_text(json.dumps(summary, indent=2))
    print("\n" + markdown(summary))
    print(
        "\nSample held-out answers (prompt → answer), start vs DPO seed 0:",
        summary["start"]["samples"],
        summary["variants"]["DPO"]["samples"],
    )
    print(f"\nCPU {summary['cpu_seconds']['total']:.0f} s, wall {summary['wall_seconds']:.0f} s. Wrote {args.output}")
    if not summary["gate"]["passed"]:
        message = (
            f"Sanity gate failed: DPO's held-out accuracy gain over the start model is {dpo_vs_start['mean']:+.4f}, "
            f"not more than 2 standard errors ({2 * dpo_vs_start['se']:.4f}); this benchmark cannot rank variants "
            "against DPO with these settings."
        )
        if args.gate:
            raise SystemExit(message)
        print("WARNING: " + message)
    return summary


if __name__ == "__main__":
    main()
