"""
Training for the text benchmark (`benchmarks/text_benchmark.py`): each seed's own draw of pairs from the on-policy
pool, and one (variant, learning rate, seed) run on a fresh seeded LoRA adapter (`smollm2_train.build_trainer`, the
SmolLM2 benchmark's settings) with its held-out (and dev) evaluation and its CPU cost.
"""

import random
import statistics
import time
from pathlib import Path

from bench_runner import cpu_seconds, logged_means, print_run
from contrastive_runs import weighted_pairs
from smollm2_train import build_trainer, slug
from text_task import evaluate
from variants import VARIANTS


def seed_pairs(pool: list[dict], seed: int, count: int) -> list[dict]:
    """The seed's own draw from the pool: `count` pairs (without replacement while the pool lasts), shuffled."""
    rng = random.Random(f"pairs-{seed}")
    order = list(range(len(pool)))
    rng.shuffle(order)
    picked = [order[i % len(order)] for i in range(count)]
    return [pool[i] for i in picked]


def train_and_evaluate(
    name: str, model, tokenizer, data: dict, lr: float, seed: int, args, work: Path, with_dev: bool
):
    """Train one (variant, rate, seed) on the seed's pairs, evaluate it; returns the record and the bare base model."""
    pairs = seed_pairs(data["pool"], seed, args.steps * args.batch_size)
    run_dir = work / "runs" / f"{slug(name)}-lr{lr:g}-seed{seed}"
    pairs, contrastive_cpu = weighted_pairs(VARIANTS[name], model, tokenizer, pairs, seed, args, work)
    trainer = build_trainer(VARIANTS[name], model, tokenizer, pairs, run_dir, lr, seed, args)
    print(f"\n== {name}, learning rate {lr:g}, seed {seed}: {args.steps} steps ==", flush=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    trainer.train()
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    history = trainer.state.log_history
    record = {
        "variant": name,
        "learning_rate": lr,
        "seed": seed,
        "train_pairs": len(pairs),
        "train_cpu_seconds": cpu,
        "contrastive_cpu_seconds": contrastive_cpu,
        "cpu_seconds_per_step": cpu / args.steps,
        "seconds_per_step": seconds / args.steps,
        "loss_curve": [e["loss"] for e in history if "loss" in e],
        "metrics_mean": logged_means(history),
    }
    c1 = cpu_seconds()
    trained = trainer.model.eval()
    record["eval"] = evaluate(trained, tokenizer, data["held_out"], data["likelihood_pairs"], args)
    if with_dev:
        dev = evaluate(trained, tokenizer, data["dev"], [], args)
        record["dev"] = {"accuracy": statistics.fmean(dev["correct"]), "gold_logp": 0.0}  # ties: the first best rate
    record["eval_cpu_seconds"] = cpu_seconds() - c1
    margin = statistics.fmean(record["eval"]["gold_logp"]) if record["eval"]["gold_logp"] else float("nan")
    print_run(
        name, lr, seed,
        f"held-out pass rate {statistics.fmean(record['eval']['correct']):.3f}, log-prob margin {margin:.2f}",
        f"dev {record['dev']['accuracy']:.3f}" if with_dev else None,
        f"{record['cpu_seconds_per_step']:.2f} CPU-s/step, eval {record['eval_cpu_seconds']:.0f} CPU-s",
    )  # fmt: skip
    return record, trainer.model.unload()
