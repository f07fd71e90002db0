"""
Training for the SmolLM2 benchmark (`benchmarks/real_model.py`): each variant's trainer on a fresh, seeded LoRA adapter
over the shared base model, one (variant, learning rate, seed) run with its held-out (and dev) evaluation, and the
decisive token's share of the gradient at the start model.
"""

import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from variants import VARIANTS, Variant, decisive_gradient_share

from bench_runner import logged_means, print_run
from contrastive_runs import WEIGHT_COLUMNS, weighted_pairs
from smollm2_task import evaluate, summarize_evaluation
from trl_tidpo import TIDPOTrainer



def training_config(variant: Variant, run_dir: Path, learning_rate: float, seed: int, args):
    common = {
        "output_dir": str(run_dir),
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": learning_rate,
        "beta": args.beta,
        "max_length": 128,
        "seed": seed,
        "data_seed": seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "bf16": False,
        "use_cpu": args.device == "cpu",
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
    }
    if variant.config_overrides is not None:
        common["anchor_max_new_tokens"] = args.anchor_max_new_tokens
    return variant.config(**common)


def build_trainer(variant: Variant, base_model, tokenizer, pairs, run_dir, learning_rate, seed, args):
    """The variant's trainer on a fresh LoRA adapter (seeded: every variant of a seed starts from the same one)."""
    from peft import LoraConfig

    columns = [key for key in ("prompt", "chosen", "rejected", *WEIGHT_COLUMNS) if key in pairs[0]]
    dataset = Dataset.from_dict({key: [pair[key] for pair in pairs] for key in columns})
    torch.manual_seed(seed)
    return variant.trainer_cls(
        model=base_model,
        args=training_config(variant, run_dir, learning_rate, seed, args),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear"),
    )


GRADIENT_SHARE_AS = {"DPO": Variant(TIDPOTrainer, {"token_weighting": "uniform", "triplet_gamma": 0.0})}


def gradient_shares(
    name: str, base_model, tokenizer, pairs, args, work: Path, num_pairs: int | None = None
) -> tuple[list[float], Any]:
    """`decisive_gradient_share` of the variant at the start model (a fresh LoRA adapter is the start) on the first
    `num_pairs` train pairs (default `2 × batch_size`), in batches of `2 × batch_size`. DPO is measured as its
    uniform-weight `TIDPOTrainer` twin (same loss and gradient). Returns the shares and the base model (the adapter
    removed)."""
    variant = GRADIENT_SHARE_AS.get(name, VARIANTS[name])
    pairs = pairs[: num_pairs or 2 * args.batch_size]
    trainer = build_trainer(variant, base_model, tokenizer, pairs, work / "grad-share", 1e-4, 0, args)
    shares = []
    for start in range(0, len(trainer.train_dataset), 2 * args.batch_size):
        rows = [trainer.train_dataset[i] for i in range(start, min(start + 2 * args.batch_size, len(pairs)))]
        torch.manual_seed(start)
        shares += decisive_gradient_share(trainer, trainer._prepare_inputs(trainer.data_collator(rows)))
    return shares, trainer.model.unload()


def train_and_evaluate(name, base_model, tokenizer, data, learning_rate, seed, args, work: Path, with_dev: bool):
    """Train one (variant, learning rate, seed), evaluate it on the held-out (and dev) prompts; returns the record
    and the base model with the adapter removed."""
    run_dir = work / "runs" / f"{slug(name)}-lr{learning_rate:g}-seed{seed}"
    variant = VARIANTS[name]
    pairs, contrastive_cpu = weighted_pairs(variant, base_model, tokenizer, data["train_pairs"], seed, args, work)
    trainer = build_trainer(variant, base_model, tokenizer, pairs, run_dir, learning_rate, seed, args)
    print(f"\n== {name}, learning rate {learning_rate:g}, seed {seed}: {args.steps} steps ==", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    model = trainer.model.eval()
    record = {
        "variant": name,
        "train_pairs": len(data["train_pairs"]),
        "learning_rate": learning_rate,
        "seed": seed,
        "seconds_per_step": seconds / args.steps,
        "cpu_seconds_per_step": cpu_seconds / args.steps,
        "loss_curve": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "rejected_logps_change": _logps_change(trainer.state.log_history, "logps/rejected"),
        "contrastive_cpu_seconds": contrastive_cpu,
        "metrics_mean": logged_means(trainer.state.log_history),
        "chosen_logps_change": _logps_change(trainer.state.log_history, "logps/chosen"),
    }
    record["eval"] = evaluate(model, tokenizer, data["eval_problems"], args, f"held-out, {name}")
    if with_dev:
        dev = evaluate(model, tokenizer, data["dev_problems"], args, f"dev, {name}")
        record["dev"] = {"accuracy": statistics.mean(dev["correct"]), "gold_logp": statistics.mean(dev["gold_logp"])}
    if args.save_adapter and name == "TI-DPO" and seed == args.seeds[0]:
        model.save_pretrained(Path(args.save_adapter) / f"lr{learning_rate:g}")
    summary = summarize_evaluation(record["eval"], data["eval_problems"])
    print_run(
        name, learning_rate, seed,
        f"held-out accuracy {summary['accuracy']:.3f} (malformed {summary['malformed']:.3f}), gold log-prob "
        f"{summary['gold_logp']:.3f}",
        f"dev accuracy {record['dev']['accuracy']:.3f}" if with_dev else None,
        f"{record['cpu_seconds_per_step']:.2f} CPU-s/step",
    )  # fmt: skip
    return record, trainer.model.unload()


def _logps_change(history: list[dict], key: str) -> float | None:
    values = [entry[key] for entry in history if key in entry]
    return values[-1] - values[0] if len(values) > 1 else None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
