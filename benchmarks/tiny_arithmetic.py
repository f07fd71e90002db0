"""
Tiny arithmetic benchmark: a cheap, high-power behavioural screen of the training variants (`benchmarks/variants.py`).

A tiny Llama (hidden 64, 2 layers, a word tokenizer of digits and symbols) is trained from scratch (plain PyTorch SFT)
on two-digit addition, one token per digit ("2 9 + 5 3 =" → " 8 2"), with a *systematic* mistake in its SFT data: a
problem that carries is answered with every carry dropped (" 7 2") with probability 0.7 (`benchmarks/tiny_task.py`).
The SFT model answers greedily the problems without a carry right and the others wrong (held-out accuracy ~0.28).
On-policy pairs are sampled from it (temperature 1): chosen = the gold answer, rejected = the most frequent wrong one.

Each seed gets its own SFT start and pair sample (SFT initialisation, targets, order and pair sampling seeded by the
seed; `--shared-start`: one start, from `--data-seed`, for all seeds); the held-out and dev prompts are fixed by
`--data-seed`. Every variant of a seed trains from that seed's start with the same data order (full fine-tuning, an
explicit frozen reference copy), at the rate of a shared grid with the best dev accuracy over the grid seeds (a rate at
the grid's edge is flagged; `--extend-grid` extends the grid past it). Headline: held-out greedy exact-match accuracy
against DPO with a seed-level 95 % CI (t over the per-seed differences) and the prompt-level bootstrap CI beside it
(`bench_stats.py`, `bench_report.py`), the gold answer's log-prob, and the decisive token's share of the gradient.

    python benchmarks/tiny_arithmetic.py                 # the default screen (docs/tiny_benchmark.md: CPU and wall)
    python benchmarks/tiny_arithmetic.py --quick         # a smoke run: DPO and TI-DPO, 2 seeds
    python benchmarks/tiny_arithmetic.py --variants DPO TI-DPO difference --seeds 0 1 2 3 4

Results: markdown tables on stdout and every number in `--output` (JSON). The run fails (exit 1) when DPO does not
beat the start model by more than 2 standard errors (`--no-gate` only warns).
"""

import argparse
import copy
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import torch
import transformers
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report
import bench_stats
import tiny_task
from variants import VARIANTS, Variant, decisive_gradient_share

from trl_tidpo import TIDPOTrainer

# The SFT start, calibrated once (converged: held-out accuracy ~0.28) and fixed, never tuned on the variants' results
SFT = {"hidden_size": 64, "num_layers": 2, "steps": 3000, "batch_size": 64, "lr": 3e-3, "carry_drop_rate": 0.7}
# Fixed split sizes, so the SFT data (everything else) does not depend on the evaluation options
HELDOUT, DEV = 1000, 500
DEFAULT_VARIANTS = list(VARIANTS)
TITLE = "Tiny arithmetic (tiny Llama from scratch)"
_STATE: dict = {}  # set before the worker processes fork: tokenizer, splits, and each start's model and pairs


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (`resource.getrusage`)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ---------------------------------------------------------------------------------------------------- setup


def splits_of(args) -> dict:
    splits = tiny_task.make_splits({"heldout": HELDOUT, "dev": DEV, "sft": -1}, seed=args.data_seed)
    splits["heldout"], splits["dev"] = splits["heldout"][: args.heldout], splits["dev"][: args.dev]
    return splits


def prepare_start(job: tuple[int, argparse.Namespace]) -> dict:
    """One SFT start (initialisation, targets, order and pair sample seeded by `start_seed`) and its evaluations."""
    start_seed, args = job
    torch.set_num_threads(1)
    tokenizer, splits = tiny_task.build_tokenizer(), splits_of(args)
    model = tiny_task.build_model(tokenizer, SFT["hidden_size"], SFT["num_layers"], seed=start_seed)
    targets = tiny_task.sft_completions(splits["sft"], SFT["carry_drop_rate"], seed=start_seed)
    c0 = time.process_time()
    losses = tiny_task.sft(model, tokenizer, splits["sft"], targets, steps=args.sft_steps,
                           batch_size=SFT["batch_size"], lr=SFT["lr"], seed=start_seed)  # fmt: skip
    sft_cpu = time.process_time() - c0
    pairs = tiny_task.sample_pairs(model, tokenizer, splits["sft"][: args.pair_prompts], samples=args.samples,
                                   temperature=args.temperature, seed=start_seed)  # fmt: skip
    if len(pairs) < args.batch_size:
        raise SystemExit(f"Only {len(pairs)} preference pairs from {args.pair_prompts} prompts (start {start_seed}; "
                         f"fewer than --batch-size {args.batch_size}): raise --pair-prompts or --samples.")  # fmt: skip
    return {
        "state_dict": model.state_dict(),
        "pairs": pairs,
        "eval": {split: tiny_task.evaluate(model, tokenizer, splits[split]) for split in ("dev", "heldout")},
        "sft_final_loss": statistics.mean(losses[-20:]),
        "sft_cpu_seconds": sft_cpu,
    }


def start_seed_of(args, seed: int) -> int:
    return args.data_seed if args.shared_start else seed


def prepare(args) -> dict[int, dict]:
    """Every start the seeds need (one per seed, or one shared), prepared in the worker processes."""
    start_seeds = sorted({start_seed_of(args, s) for s in args.seeds})
    prepared = dict(zip(start_seeds, run_pool(prepare_start, [(s, args) for s in start_seeds], args.processes)))
    tokenizer = tiny_task.build_tokenizer()
    for start in prepared.values():
        model = tiny_task.build_model(tokenizer, SFT["hidden_size"], SFT["num_layers"], seed=0)
        model.load_state_dict(start.pop("state_dict"))
        start["model"] = model.eval()
        start["dataset"] = Dataset.from_dict({k: [p[k] for p in start["pairs"]] for k in ("prompt", "chosen", "rejected")})
    _STATE.update(tokenizer=tokenizer, splits=splits_of(args), starts=prepared)
    return prepared


def training_config(variant: Variant, args, *, learning_rate: float, seed: int, output_dir: str):
    common = {
        "output_dir": output_dir, "max_steps": args.steps, "per_device_train_batch_size": args.batch_size,
        "learning_rate": learning_rate, "lr_scheduler_type": "constant", "beta": args.beta, "max_length": 16,
        "seed": seed, "data_seed": seed, "logging_steps": args.steps, "save_strategy": "no", "report_to": [],
        "bf16": False, "use_cpu": True, "gradient_checkpointing": False, "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }  # fmt: skip
    if variant.config_overrides is not None:
        common["anchor_max_new_tokens"] = tiny_task.MAX_ANSWER_DIGITS + 1  # a policy anchor is an answer + EOS
    return variant.config(**common)


def build_trainer(variant: Variant, config, start: dict):
    """Full fine-tuning of a copy of the start model, with an explicit frozen copy as the reference."""
    return variant.trainer_cls(
        model=copy.deepcopy(start["model"]), ref_model=copy.deepcopy(start["model"]), args=config,
        train_dataset=start["dataset"], processing_class=_STATE["tokenizer"],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- runs


def run_job(job: tuple[str, float, int, argparse.Namespace]) -> dict:
    """Train one (variant, learning rate, seed) from the seed's start; evaluate on the dev and held-out splits."""
    name, learning_rate, seed, args = job
    torch.set_num_threads(1)
    start = _STATE["starts"][start_seed_of(args, seed)]
    c0 = time.process_time()
    with tempfile.TemporaryDirectory() as output_dir:
        config = training_config(VARIANTS[name], args, learning_rate=learning_rate, seed=seed, output_dir=output_dir)
        trainer = build_trainer(VARIANTS[name], config, start)
        trainer.train()
        train_cpu = time.process_time() - c0
        tokenizer, splits = _STATE["tokenizer"], _STATE["splits"]
        evals = {split: tiny_task.evaluate(trainer.model, tokenizer, splits[split]) for split in ("dev", "heldout")}
    heldout = evals["heldout"]
    return {
        "variant": name, "learning_rate": learning_rate, "seed": seed,
        "eval": {"correct": [int(c) for c in heldout["correct"]], "malformed": [int(m) for m in heldout["malformed"]],
                 "gold_logp": [round(v, 5) for v in heldout["gold_logp"]], "outputs": heldout["outputs"][:6]},
        "dev": {"accuracy": statistics.mean(evals["dev"]["correct"]), "gold_logp": statistics.mean(evals["dev"]["gold_logp"])},
        "train_loss": trainer.state.log_history[-1].get("train_loss"),
        "cpu_seconds_per_step": train_cpu / args.steps, "cpu_seconds": time.process_time() - c0,
    }  # fmt: skip


def run_pool(function, jobs: list, processes: int) -> list:
    if processes <= 1:
        return [function(job) for job in jobs]
    # fork: the workers share the start models and datasets already in memory (no re-import, no pickling)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return list(pool.imap(function, jobs, chunksize=1))


def cost_order(name: str) -> int:
    """Most expensive first, so the two processes finish together: policy anchors, then attribution, then neither."""
    overrides = VARIANTS[name].config_overrides
    if overrides is None or overrides.get("token_weighting") == "difference":
        return 2
    return 0 if overrides.get("triplet_gamma", 0.1) > 0 else 1


def gradient_shares(args, names: list[str]) -> dict[str, float]:
    """
    Mean `decisive_gradient_share` per variant on a fixed batch (the first `--share-pairs` pairs of the first seed's
    start) at that start. DPO is measured as a `TIDPOTrainer` with uniform weights and no triplet (the same gradients).
    """
    shares, start = {}, _STATE["starts"][start_seed_of(args, args.seeds[0])]
    with tempfile.TemporaryDirectory() as output_dir:
        for name in names:
            variant = VARIANTS[name]
            if variant.config_overrides is None:
                variant = Variant(TIDPOTrainer, {"token_weighting": "uniform", "triplet_gamma": 0.0})
            config = training_config(variant, args, learning_rate=args.learning_rates[0], seed=0, output_dir=output_dir)
            trainer = build_trainer(variant, config, start)
            rows = [trainer.train_dataset[i] for i in range(min(args.share_pairs, len(trainer.train_dataset)))]
            torch.manual_seed(0)  # policy anchors are sampled
            shares[name] = statistics.mean(decisive_gradient_share(trainer, trainer.data_collator(rows)))
    return shares


def run_grid(args, names: list[str]) -> tuple[list[dict], dict[str, dict]]:
    """The grid seeds at every rate, extended past an edge up to `--extend-grid` times; each variant's selection."""
    grids = {n: list(args.learning_rates) for n in names}
    pending = {n: list(args.learning_rates) for n in names}
    records, extensions = [], 0
    while any(pending.values()):
        jobs = [(n, lr, s, args) for n in names for lr in pending[n] for s in args.grid_seeds]
        records += run_pool(run_job, jobs, args.processes)
        selection = {n: bench_stats.select_learning_rate(bench_report.dev_scores(records, n, args.grid_seeds), grids[n])
                     for n in names}  # fmt: skip
        pending = {n: [] for n in names}
        if extensions < args.extend_grid:
            extensions += 1
            for n, sel in selection.items():
                if sel["edge"]:
                    print(f"{n}: {sel['learning_rate']:g} is the grid's {sel['edge']} edge: adding {sel['beyond']:g}")
                    grids[n].append(sel["beyond"])
                    pending[n] = [sel["beyond"]]
    return records, selection


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="smoke run: 2 seeds (both on the grid), DPO and TI-DPO, smaller splits")
    add("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS), metavar="VARIANT")
    add("--seeds", type=int, nargs="+", default=list(range(10)))
    add("--grid-seeds", type=int, default=3, help="how many of --seeds train at every grid learning rate")
    add("--learning-rates", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4, 3e-4])
    add("--extend-grid", type=int, default=0, help="times to extend the grid past an edge a dev optimum sits on")
    add("--steps", type=int, default=30)
    add("--batch-size", type=int, default=64)
    add("--beta", type=float, default=0.1)
    add("--heldout", type=int, default=HELDOUT, help=f"held-out prompts (never trained on, never dev; ≤ {HELDOUT})")
    add("--dev", type=int, default=DEV, help=f"dev prompts: each variant's learning rate (≤ {DEV})")
    add("--pair-prompts", type=int, default=4000, help="training prompts sampled for pairs")
    add("--samples", type=int, default=8, help="sampled answers per prompt")
    add("--temperature", type=float, default=1.0)
    add("--sft-steps", type=int, default=SFT["steps"], help="calibrated; change only to smoke-test")
    add("--share-pairs", type=int, default=64, help="pairs of the fixed gradient-share batch")
    add("--bootstrap", type=int, default=2000, help="bootstrap resamples of the prompt-level CIs")
    add("--data-seed", type=int, default=0, help="the held-out and dev splits (and the start with --shared-start)")
    add("--shared-start", action="store_true", help="one SFT start and pair sample (--data-seed's) for all seeds")
    add("--processes", type=int, default=2, help="worker processes (one thread each)")
    add("--no-gate", dest="gate", action="store_false", help="warn instead of failing the DPO gate")
    add("--output", default="tiny_arithmetic.json")
    args = parser.parse_args(argv)
    if args.quick:
        # both seeds run the grid: with a start per seed, a rate chosen on one start's dev split can collapse on the other
        quick = {"variants": ["DPO", "TI-DPO"], "seeds": [0, 1], "grid_seeds": 2, "heldout": 500, "dev": 200,
                 "pair_prompts": 1500, "steps": 20}  # fmt: skip
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


def start_summary(start_seed: int, start: dict) -> dict:
    heldout, pairs = start["eval"]["heldout"], start["pairs"]
    return {
        "seed": start_seed, "heldout_accuracy": statistics.mean(heldout["correct"]),
        "heldout_gold_logp": statistics.mean(heldout["gold_logp"]), "heldout_malformed": statistics.mean(heldout["malformed"]),
        "dev_accuracy": statistics.mean(start["eval"]["dev"]["correct"]), "sft_final_loss": start["sft_final_loss"],
        "sft_cpu_seconds": start["sft_cpu_seconds"], "pairs": len(pairs), "samples": heldout["outputs"][:6],
        "first_divergent": {str(k): sum(p["first_divergent"] == k for p in pairs) for k in range(4)},
        "rejected_is_carry_dropped": sum(p["rejected_is_carry_dropped"] for p in pairs),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    starts = prepare(args)
    print("SFT starts: held-out accuracy " + ", ".join(
        f"{s} {statistics.mean(st['eval']['heldout']['correct']):.3f} ({len(st['pairs'])} pairs)" for s, st in starts.items()
    ) + f" ({time.perf_counter() - wall0:.0f} s)", flush=True)  # fmt: skip
    names = sorted(args.variants, key=cost_order)
    grid, selection = run_grid(args, names)
    chosen = {n: selection[n]["learning_rate"] for n in args.variants}
    print(f"grid done ({time.perf_counter() - wall0:.0f} s); chosen on dev: {chosen}", flush=True)
    rest = [s for s in args.seeds if s not in args.grid_seeds]
    records = grid + run_pool(run_job, [(n, chosen[n], s, args) for n in names for s in rest], args.processes)
    shares = gradient_shares(args, args.variants)
    start_evals = {s: starts[start_seed_of(args, s)]["eval"]["heldout"] for s in args.seeds}
    report = bench_report.build_report(records, start_evals, {n: selection[n] for n in args.variants},
                                       grid_seeds=args.grid_seeds, gradient_share=shares, reps=args.bootstrap)  # fmt: skip
    summary = {
        "args": vars(args),
        "sft": {**SFT, "steps": args.sft_steps},
        "starts": {str(s): start_summary(s, st) for s, st in starts.items()},
        "selection": selection,
        "records": records,
        "report": report,
        "headline": bench_report.headline(report, benchmark="tiny", title=TITLE, doc="docs/tiny_benchmark.md"),
        "cpu_seconds": {
            "total": cpu_seconds() - cpu0,
            "sft": sum(st["sft_cpu_seconds"] for st in starts.values()),
            "runs": sum(r["cpu_seconds"] for r in records),
        },
        "wall_seconds": time.perf_counter() - wall0,
        "machine": {"cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "processes": args.processes},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gate": report["gate"],
    }
    Path(args.output).write_text(json.dumps(summary, indent=1))
    print("\n" + bench_report.markdown(report))
    print("\nSample held-out answers (prompt → answer), first start:", next(iter(summary["starts"].values()))["samples"])
    print(f"\nCPU {summary['cpu_seconds']['total']:.0f} s (getrusage), wall {summary['wall_seconds']:.0f} s. "
          f"Wrote {args.output}")  # fmt: skip
    if not report["gate"]["passed"]:
        message = "Sanity gate: " + report["gate"]["message"]
        if args.gate:
            raise SystemExit(message)
        print("WARNING: " + message)
    return summary


if __name__ == "__main__":
    main()
