"""
The contrastive variants (`TIS-DPO (SFT π±)`, `cDPO (DPO π±)`, ... in `benchmarks/variants.py`) on the SmolLM2
benchmarks (`real_model.py`, `text_benchmark.py`): π+ and π− are LoRA fine-tunings of the start on the very pairs
the seed trains on (`trl_tidpo.add_contrastive_weight_columns`), and each pair gets the weight columns they give. The
columns are cached per (pairs, recipe, settings), so every grid point of a seed reuses one π± training; the record
carries its CPU seconds once, under `contrastive_cpu_seconds`.

The π± training settings are fixed here, before any result (never tuned on the benchmarks): the policy's LoRA (r, α
= 2r, all linear layers), its batch size and `max_length` 128, and the recipe's steps and rate below.
"""

import hashlib
import json
import tempfile
import time
from pathlib import Path

from peft import LoraConfig

from trl_tidpo import add_contrastive_weight_columns
from variants import Variant

# Per recipe: the steps and learning rate of each of the two trainings (π+ and π−), LoRA on the start
TRAINING = {"sft": {"max_steps": 32, "learning_rate": 2e-4}, "dpo": {"max_steps": 16, "learning_rate": 2e-4}}
MAX_LENGTH = 128
WEIGHT_COLUMNS = ("chosen_token_weights", "rejected_token_weights")


def _cache_key(pairs: list[dict], recipe: str, weighting: str, seed: int, args) -> str:
    rows = [[p["prompt"], p["chosen"], p["rejected"]] for p in pairs]
    values = [rows, recipe, weighting, TRAINING[recipe], MAX_LENGTH, seed, args.lora_r, args.batch_size, args.beta, 1]
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def weighted_pairs(
    variant: Variant, model, tokenizer, pairs: list[dict], seed: int, args, work: Path
) -> tuple[list[dict], float]:
    """
    The pairs `variant` trains on: `pairs` themselves (and 0.0 CPU seconds) unless it is a contrastive variant, else
    `pairs` with the variant's two weight columns (one float per completion token kept by `max_length`), from π+/π−
    trained by `variant.contrastive`'s recipe from `model` (the bare start, left untouched) on `pairs`, cached under
    `work/contrastive/`; and the CPU seconds of that training and scoring when this call computed them (0.0 when it
    read the cache).
    """
    if not variant.contrastive:
        return pairs, 0.0
    recipe, weighting = variant.contrastive
    key = _cache_key(pairs, recipe, weighting, seed, args)
    path = Path(work) / "contrastive" / f"{recipe}-{weighting}-seed{seed}-{key}.json"
    cost = 0.0
    if path.is_file():
        columns = json.loads(path.read_text())
    else:
        c0 = time.process_time()
        columns = _compute_columns(model, tokenizer, pairs, recipe, weighting, seed, args)
        cost = time.process_time() - c0
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**columns, "cpu_seconds": cost}))
        print(f"seed {seed}: π± by '{recipe}' and the {weighting} weights of {len(pairs)} pairs in {cost:.0f} CPU-s")
    return [{**pair, **{name: columns[name][i] for name in WEIGHT_COLUMNS}} for i, pair in enumerate(pairs)], cost


def _compute_columns(model, tokenizer, pairs, recipe: str, weighting: str, seed: int, args) -> dict[str, list]:
    from datasets import Dataset

    dataset = Dataset.from_dict({key: [p[key] for p in pairs] for key in ("prompt", "chosen", "rejected")})
    training_args = {
        "per_device_train_batch_size": args.batch_size,
        "seed": seed,
        "bf16": False,
        "use_cpu": args.device == "cpu",
        "gradient_checkpointing": False,
        "disable_tqdm": True,
        "max_length": MAX_LENGTH,
    }
    if recipe == "dpo":
        training_args["beta"] = args.beta
    with tempfile.TemporaryDirectory() as output_dir:
        weighted = add_contrastive_weight_columns(
            model, tokenizer, dataset, recipe, output_dir=output_dir, weightings=[weighting],
            peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear"),
            training_args=training_args, max_length=MAX_LENGTH, device=args.device, **TRAINING[recipe],
        )[weighting]  # fmt: skip
    return {name: weighted.to_dict()[name] for name in WEIGHT_COLUMNS}
