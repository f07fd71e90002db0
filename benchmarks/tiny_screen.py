"""
The tiny arithmetic screen with the start varied per seed, one process per seed (issue 21 §1 and §4).

Each seed gets its own SFT start and pair sample (`data_seed = seed`, `tiny_arithmetic.prepare`), so the table is a
distribution over starts rather than one start. A process trains the variants of `benchmarks/variants.py` from its
seed's start at each learning rate it is given, evaluates on dev and held-out, and writes one JSON of per-prompt
records. Triplet variants are trained under `triplet_probe.probed`, which records the norm ratio and cosine between the
DPO term's and the γ-scaled triplet term's gradients, and every run keeps the logged `triplet/anchor_equals_*` shares.

    # grid seeds: every rate; then the other seeds at each variant's dev-chosen rate (`--chosen`)
    python benchmarks/tiny_screen.py --seed 0 --learning-rates 1e-5 3e-5 1e-4 3e-4 1e-3 --out-dir runs/
    python benchmarks/tiny_screen.py --seed 5 --chosen runs/chosen.json --out-dir runs/

`benchmarks/screen_report.py` selects the rates on dev and reports seed-level intervals against DPO.
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_arithmetic
import tiny_task
from triplet_probe import probed

from trl_tidpo import add_contrastive_weight_columns
from variants import VARIANTS, Variant

TRIPLET_METRICS = ("triplet/anchor_equals_chosen", "triplet/anchor_equals_rejected", "triplet/skipped_rows")


# π+/π− of the contrastive variants, trained from the seed's start on its training pairs (fixed, never tuned on results)
CONTRASTIVE_TRAINING = {"sft": {"max_steps": 60, "learning_rate": 1e-3}, "dpo": {"max_steps": 30, "learning_rate": 1e-4}}


def contrastive_datasets(args) -> dict[tuple[str, str], datasets.Dataset]:
    """The training pairs with TIS-DPO's and cDPO's weight columns, per π± recipe the chosen variants need."""
    state = {**tiny_arithmetic._STATE["starts"][args.seed], "tokenizer": tiny_arithmetic._STATE["tokenizer"]}
    recipes = sorted({VARIANTS[n].contrastive[0] for n in args.variants if VARIANTS[n].contrastive})
    out = {}
    for recipe in recipes:
        c0 = time.process_time()
        training_args = {"per_device_train_batch_size": args.batch_size, "bf16": False, "use_cpu": True,
                         "seed": args.seed, "report_to": [], "disable_tqdm": True, "save_strategy": "no"}  # fmt: skip
        if recipe == "dpo":
            training_args["beta"] = args.beta
        with tempfile.TemporaryDirectory() as output_dir:
            weighted = add_contrastive_weight_columns(
                state["model"], state["tokenizer"], state["dataset"], recipe, output_dir=output_dir,
                training_args=training_args, max_length=16, **CONTRASTIVE_TRAINING[recipe],
            )  # fmt: skip
        for weighting, dataset in weighted.items():
            out[(recipe, weighting)] = dataset
        print(f"seed {args.seed}: π± by '{recipe}' and their weights in {time.process_time() - c0:.0f} CPU s", flush=True)
        args.contrastive_cpu_seconds[recipe] = time.process_time() - c0
    return out


def run_one(name: str, learning_rate: float, seed: int, args, weighted: dict | None = None) -> dict:
    """Train one variant from the seed's start at one rate; per-prompt dev and held-out results and the probes."""
    variant = VARIANTS[name]
    has_triplet = variant.config_overrides is not None and variant.config_overrides.get("triplet_gamma", 0.1) > 0
    if has_triplet:
        variant = Variant(probed(variant.trainer_cls, every=args.probe_every), variant.config_overrides, variant.note)
    c0 = time.process_time()
    with tempfile.TemporaryDirectory() as output_dir:
        config = tiny_arithmetic.training_config(variant, args, learning_rate=learning_rate, seed=seed, output_dir=output_dir)
        config.logging_steps = args.probe_every  # the anchor shares over training, not only their mean
        start = tiny_arithmetic._STATE["starts"][seed]
        if variant.contrastive:
            start = {**start, "dataset": weighted[variant.contrastive]}
        trainer = tiny_arithmetic.build_trainer(variant, config, start)
        trainer.train()
        train_cpu = time.process_time() - c0
        state = tiny_arithmetic._STATE
        evals = {s: tiny_task.evaluate(trainer.model, state["tokenizer"], state["splits"][s]) for s in ("dev", "heldout")}
    logs = [log for log in trainer.state.log_history if any(key in log for key in TRIPLET_METRICS)]
    return {
        "variant": name,
        "learning_rate": learning_rate,
        "seed": seed,
        "steps": args.steps,
        "train_cpu_seconds": train_cpu,
        "dev": {key: evals["dev"][key] for key in ("correct", "gold_logp")},
        "heldout": {key: evals["heldout"][key] for key in ("correct", "gold_logp", "malformed")},
        "triplet_metrics": [{k: log[k] for k in (*TRIPLET_METRICS, "step") if k in log} for log in logs],
        "gradient_conflict": getattr(trainer, "conflicts", []),
    }


def prepared_start(args) -> dict:
    """
    The seed's start (`tiny_arithmetic.prepare_start` with `data_seed = seed`: its own SFT start, pairs and splits),
    cached in `--out-dir` (the SFT costs most of a process's CPU), and registered in `tiny_arithmetic._STATE`.
    """
    name = f"start2-seed{args.seed}-sft{args.sft_steps}-pairs{args.pair_prompts}-heldout{args.heldout}-dev{args.dev}.pt"
    path = Path(args.out_dir) / name
    if path.exists():
        start = torch.load(path, weights_only=False)
    else:
        start = tiny_arithmetic.prepare_start((args.seed, args))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(start, path)
    tokenizer = tiny_task.build_tokenizer()
    sft = tiny_arithmetic.SFT
    model = tiny_task.build_model(tokenizer, sft["hidden_size"], sft["num_layers"], seed=args.seed)
    model.load_state_dict(start["state_dict"])
    rows = {key: [p[key] for p in start["pairs"]] for key in ("prompt", "chosen", "rejected")}
    start = {**start, "model": model.eval(), "dataset": datasets.Dataset.from_dict(rows)}
    tiny_arithmetic._STATE.update(tokenizer=tokenizer, splits=tiny_arithmetic.splits_of(args), starts={args.seed: start})
    return start


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="the run's seed, also its start's data seed")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3])
    parser.add_argument("--chosen", default=None, help="JSON {variant: rate}: run each variant at that rate only")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--heldout", type=int, default=tiny_arithmetic.HELDOUT)
    parser.add_argument("--dev", type=int, default=tiny_arithmetic.DEV)
    parser.add_argument("--pair-prompts", type=int, default=4000)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--sft-steps", type=int, default=tiny_arithmetic.SFT["steps"])
    parser.add_argument("--probe-every", type=int, default=10, help="gradient-conflict probe and log interval (steps)")
    parser.add_argument("--out-dir", default="tiny-screen-runs")
    parser.add_argument("--tag", default="", help="added to the output file's name (e.g. 'ext' for a grid extension)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    args.data_seed = args.seed
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    cpu0 = time.process_time()
    start = prepared_start(args)
    chosen = json.loads(Path(args.chosen).read_text()) if args.chosen else None
    jobs = [(n, chosen[n]) for n in args.variants] if chosen else [(n, lr) for n in args.variants for lr in args.learning_rates]
    args.contrastive_cpu_seconds = {}
    weighted = contrastive_datasets(args)
    runs = []
    for name, learning_rate in jobs:
        runs.append(run_one(name, learning_rate, args.seed, args, weighted))
        print(f"seed {args.seed} {name} lr {learning_rate:g}: held-out {statistics.mean(runs[-1]['heldout']['correct']):.3f}", flush=True)
    tag = f"-{args.tag}" if args.tag else ""
    out = Path(args.out_dir) / f"seed{args.seed}{'-final' if chosen else '-grid'}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "seed": args.seed,
        "args": vars(args),
        "start": {s: {k: start["eval"][s][k] for k in ("correct", "gold_logp")} for s in ("dev", "heldout")},
        "pairs": len(start["pairs"]),
        "sft_cpu_seconds": start["sft_cpu_seconds"],
        "cpu_seconds": time.process_time() - cpu0,
        "runs": runs,
    }))  # fmt: skip
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
