"""
TIS-DPO end to end, offline, on a tiny model (about a minute on 2 CPU cores):

1. π+ and π− the way the TIS-DPO paper found best: DPO and reverse DPO (chosen and rejected swapped) from the same
   start, with this package's trainer and uniform weights (`token_weighting="uniform"` is TRL's DPO);
2. the TIS-DPO weight columns computed offline (`compute_tis_dpo_weight_columns`), printed, drawn as HTML
   (`tis_dpo_weights.html`) and saved, so they can be inspected and reused with `token_weighting="dataset"`;
3. TIS-DPO training: `token_weighting="tis_dpo"` with the two models' paths; the trainer computes the same weights once
   (cached with the dataset), frees π+ and π−, and trains on the token-weighted DPO margin.

```bash
python examples/tis_dpo.py --output-dir tis_dpo_run --steps 20 --transform exp_clamp
```
"""

import argparse
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from trl_tidpo import TIDPOConfig, TIDPOTrainer  # noqa: E402
from trl_tidpo import compute_tis_dpo_weight_columns  # noqa: E402
from trl_tidpo.tools.visualize import weight_columns_page  # noqa: E402
from trl_tidpo.tools.demo.tiny_models import build_tiny_llama, build_word_tokenizer  # noqa: E402
from trl_tidpo.modeling.tokenization import tokenize_completion  # noqa: E402


PROMPTS = ["i have a headache , what should i do ?", "my head hurts , any advice ?", "what helps a headache ?"]
# (chosen, rejected) phrases; the rest of each response is shared filler, so the phrases carry the preference
PHRASES = [
    ("rest in a dark room", "ignore the pain"),
    ("drink some water", "drink more coffee"),
    ("see a doctor soon", "take many pills now"),
    ("sleep early tonight", "stay up all night"),
]
FILLERS = ["i think you should", "maybe you could", "my advice is to"]


def build_pairs(seed: int) -> Dataset:
    """Every prompt × phrase × filler combination, shuffled: 36 pairs whose chosen and rejected differ in a phrase."""
    rows = [
        {"prompt": prompt, "chosen": f" {filler} {good} .", "rejected": f" {filler} {bad} ."}
        for prompt in PROMPTS
        for good, bad in PHRASES
        for filler in FILLERS
    ]
    random.Random(seed).shuffle(rows)
    return Dataset.from_list(rows)


def config(output_dir: str, steps: int, seed: int, **overrides) -> TIDPOConfig:
    return TIDPOConfig(
        output_dir=output_dir,
        max_steps=steps,
        learning_rate=overrides.pop("learning_rate", 1e-3),
        per_device_train_batch_size=8,
        beta=0.5,
        triplet_gamma=0.0,  # TIS-DPO has no triplet term; keep the comparison clean
        logging_steps=max(1, steps // 4),
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=seed,
        **overrides,
    )


def train_contrastive_models(start: str, tokenizer, dataset: Dataset, output_dir: str, steps: int, seed: int):
    """π+ by DPO and π− by reverse DPO (chosen and rejected swapped), both from `start`; returns their paths."""
    swapped = dataset.rename_columns({"chosen": "rejected", "rejected": "chosen"})
    paths = {}
    for name, data in (("positive", dataset), ("negative", swapped)):
        trainer = TIDPOTrainer(
            model=start,
            args=config(os.path.join(output_dir, name), steps, seed, token_weighting="uniform", learning_rate=5e-3),
            train_dataset=data,
            processing_class=tokenizer,
        )
        trainer.train()
        paths[name] = os.path.join(output_dir, name, "final")
        trainer.save_model(paths[name])
    return paths["positive"], paths["negative"]


def show_weights(weighted: Dataset, tokenizer, index: int = 0) -> None:
    """Print one pair's completion tokens with their TIS-DPO weights."""
    row = weighted[index]
    print(f"\nprompt: {row['prompt']!r}")
    for side in ("chosen", "rejected"):
        _, ids = tokenize_completion(tokenizer, row["prompt"], row[side])
        cells = [f"{tokenizer.decode([t])}:{w:.2f}" for t, w in zip(ids, row[f"{side}_token_weights"], strict=True)]
        print(f"  {side:8s} " + "  ".join(cells))


def phrase_weight_ratio(weighted: Dataset, tokenizer) -> float:
    """Mean weight of the tokens that differ between chosen and rejected over that of the shared tokens."""
    differing, shared = [], []
    for row in weighted:
        chosen = tokenize_completion(tokenizer, row["prompt"], row["chosen"])[1]
        rejected = tokenize_completion(tokenizer, row["prompt"], row["rejected"])[1]
        for ids, other, weights in (
            (chosen, rejected, row["chosen_token_weights"]),
            (rejected, chosen, row["rejected_token_weights"]),
        ):
            for token, weight in zip(ids, weights, strict=True):
                (shared if token in other else differing).append(weight)
    return (sum(differing) / len(differing)) / (sum(shared) / len(shared))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="tis_dpo_run")
    parser.add_argument("--steps", type=int, default=20, help="training steps of each of the three runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transform", choices=["exp_clamp", "rank"], default="exp_clamp")
    args = parser.parse_args(argv)

    dataset = build_pairs(args.seed)
    words = {w for row in dataset for text in row.values() for w in text.split()}
    tokenizer = build_word_tokenizer(sorted(words))
    start = os.path.join(args.output_dir, "start")
    build_tiny_llama(len(tokenizer), hidden_size=64, seed=args.seed).save_pretrained(start)
    tokenizer.save_pretrained(start)

    # 1. π+ and π−
    positive_path, negative_path = train_contrastive_models(
        start, tokenizer, dataset, args.output_dir, args.steps, args.seed
    )

    # 2. The weight columns, offline: inspect them, save them, reuse them with token_weighting="dataset"
    positive = AutoModelForCausalLM.from_pretrained(positive_path)
    negative = AutoModelForCausalLM.from_pretrained(negative_path)
    weighted = compute_tis_dpo_weight_columns(dataset, positive, negative, tokenizer, transform=args.transform)
    del positive, negative
    weighted.save_to_disk(os.path.join(args.output_dir, "tis_dpo_weights"))
    show_weights(weighted, tokenizer)
    page = os.path.join(args.output_dir, "tis_dpo_weights.html")
    with open(page, "w", encoding="utf-8") as f:
        f.write(weight_columns_page(weighted, tokenizer, indices=range(6)))
    print(f"token weights of six pairs, shaded: {page}")
    ratio = phrase_weight_ratio(weighted, tokenizer)
    print(f"\nmean weight of the differing tokens / mean weight of the shared tokens: {ratio:.2f}")

    # 3. TIS-DPO training: the trainer computes (and caches) the same weights itself, then frees π+ and π−
    trainer = TIDPOTrainer(
        model=start,
        args=config(
            os.path.join(args.output_dir, "tis_dpo"),
            args.steps,
            args.seed,
            token_weighting="tis_dpo",
            tis_positive_model=positive_path,
            tis_negative_model=negative_path,
            tis_transform=args.transform,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    result = trainer.train()
    trainer.save_model(os.path.join(args.output_dir, "tis_dpo", "final"))
    print(f"TIS-DPO training loss: {result.training_loss:.4f}; model in {args.output_dir}/tis_dpo/final")
    gap = max(
        abs(a - b)
        for side in ("chosen_token_weights", "rejected_token_weights")
        for row_a, row_b in zip(trainer.train_dataset[side], weighted[side], strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    )
    print(f"largest difference between the trainer's weights and the offline columns: {gap:.2e}")
    return {"phrase_weight_ratio": ratio, "training_loss": result.training_loss, "offline_weight_gap": gap}


if __name__ == "__main__":
    main()
