"""
Build TIS-DPO's and cDPO's contrastive models π+ and π− from the training pairs themselves, and save the pairs with each
weighting's token weight columns, ready for `token_weighting="dataset"`.

- `--recipe sft` (cDPO's): SFT on the chosen completions → π+, on the rejected ones → π−.
- `--recipe dpo` (TIS-DPO's best): DPO → π+, reverse DPO (chosen and rejected swapped) → π−.
Add `--use_peft` (and `--lora_r`, ...) for LoRA; the adapters are merged before π± are saved.

```bash
python examples/contrastive_models.py --model_name_or_path my-sft-model --dataset_name pairs_on_disk \
    --recipe dpo --max_steps 200 --learning_rate 5e-6 --output_dir contrastive
trl-tidpo train --model_name_or_path my-sft-model --dataset_name contrastive/cdpo_weights --token_weighting dataset ...
```

Also `--config recipe.yaml` (TrlParser). Writes `OUTPUT_DIR/{positive,negative}/final` (π+, π−) and
`OUTPUT_DIR/{tis_dpo,cdpo}_weights` (`Dataset.save_to_disk`).
"""

import os
from dataclasses import dataclass, field

import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from trl_tidpo import add_contrastive_weight_columns


@dataclass
class ContrastiveModelsArguments:
    dataset_name: str = field(
        metadata={"help": "The training pairs: a folder saved with `save_to_disk`, or a name `load_dataset` reads."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of the pairs to train and score."})
    recipe: str = field(
        default="dpo",
        metadata={"help": "'sft' (cDPO's; with TIS-DPO's weights, the one that beat DPO on our benchmarks) or 'dpo' "
                          "(TIS-DPO's best in its paper): how π+ and π− are trained.",
                  "choices": ["sft", "dpo"]},
    )
    max_steps: int = field(default=100, metadata={"help": "Training steps of each of π+ and π−."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate of each of π+ and π−."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size of each training."})
    beta: float = field(default=0.1, metadata={"help": "DPO's β of the 'dpo' recipe (unused by 'sft')."})
    output_dir: str = field(default="contrastive", metadata={"help": "Where π± and the weighted datasets go."})
    weightings: list[str] = field(
        default_factory=lambda: ["tis_dpo", "cdpo"], metadata={"help": "Which weight columns to compute."}
    )
    tis_transform: str = field(default="exp_clamp", metadata={"help": "TIS-DPO's transform: 'exp_clamp' or 'rank'."})
    cdpo_beta: float = field(default=1.0, metadata={"help": "cDPO's β_ce >= 0."})
    cdpo_only_negative: bool = field(default=True, metadata={"help": "cDPO: chosen tokens weigh 1 (else p)."})
    max_length: int | None = field(
        default=None, metadata={"help": "The preference training's max_length: only the kept tokens are scored."}
    )
    use_cpu: bool = field(default=False, metadata={"help": "Train and score on the CPU (float32)."})
    bf16: bool = field(default=False, metadata={"help": "Train π± in bfloat16 mixed precision."})
    seed: int = field(default=0, metadata={"help": "Seed of both trainings."})


def load_pairs(name: str, split: str) -> Dataset:
    """A `save_to_disk` folder (a `Dataset`, or a `DatasetDict` and its `split`), or `load_dataset(name)[split]`."""
    dataset = load_from_disk(name) if os.path.isdir(name) else load_dataset(name)
    return dataset[split] if isinstance(dataset, DatasetDict) else dataset


def main(argv: list[str] | None = None) -> dict:
    parser = TrlParser((ContrastiveModelsArguments, ModelConfig))
    args, model_args = parser.parse_args_and_config(argv)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    pairs = load_pairs(args.dataset_name, args.dataset_train_split)
    training_args = {
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "use_cpu": args.use_cpu,
        "bf16": args.bf16,
        "seed": args.seed,
    }
    if args.recipe == "dpo":
        training_args["beta"] = args.beta
    weighted = add_contrastive_weight_columns(
        model,
        tokenizer,
        pairs,
        args.recipe,
        args.max_steps,
        args.learning_rate,
        output_dir=args.output_dir,
        weightings=args.weightings,
        peft_config=get_peft_config(model_args),
        training_args=training_args,
        tis_transform=args.tis_transform,
        cdpo_beta=args.cdpo_beta,
        cdpo_only_negative=args.cdpo_only_negative,
        max_length=args.max_length,
        device="cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu",
    )
    paths = {}
    for name, dataset in weighted.items():
        paths[name] = os.path.join(args.output_dir, f"{name}_weights")
        dataset.save_to_disk(paths[name])
        print(f"{name}: {paths[name]} (train on it with --token_weighting dataset)")
    return paths


if __name__ == "__main__":
    main()
