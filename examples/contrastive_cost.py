"""
What π+ and π− cost, measured in CPU seconds on a tiny model (`docs/contrastive_weights.md` quotes its JSON): one DPO
training of the preference run's length as the unit, each recipe's two trainings, and each weighting's scoring pass.

```bash
OMP_NUM_THREADS=1 python examples/contrastive_cost.py --steps 20 --output-dir contrastive_cost
```
"""

import argparse
import importlib.util
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from trl_tidpo import TIDPOConfig, TIDPOTrainer, compute_cdpo_weight_columns  # noqa: E402
from trl_tidpo import compute_tis_dpo_weight_columns, train_contrastive_models  # noqa: E402
from trl_tidpo.tools.demo.tiny_models import build_tiny_llama, build_word_tokenizer  # noqa: E402


CPU = {"bf16": False, "use_cpu": True, "report_to": [], "save_strategy": "no", "gradient_checkpointing": False,
       "disable_tqdm": True, "per_device_train_batch_size": 8, "seed": 0}  # fmt: skip


def timed(function):
    start = time.process_time()
    result = function()
    return result, time.process_time() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="contrastive_cost")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    spec = importlib.util.spec_from_file_location(
        "tis_dpo_example", os.path.join(os.path.dirname(os.path.abspath(__file__)), "tis_dpo.py")
    )
    tis_example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tis_example)
    dataset = tis_example.build_pairs(0)  # 36 pairs that differ in a phrase
    words = {w for row in dataset for text in row.values() for w in text.split()}
    tokenizer = build_word_tokenizer(sorted(words))
    start = os.path.join(args.output_dir, "start")
    build_tiny_llama(len(tokenizer), hidden_size=64, seed=0).save_pretrained(start)
    tokenizer.save_pretrained(start)
    lr = {"learning_rate": 5e-3}

    def preference_run():
        config = TIDPOConfig(output_dir=os.path.join(args.output_dir, "dpo"), max_steps=args.steps, beta=0.5,
                             token_weighting="uniform", triplet_gamma=0.0, **lr, **CPU)  # fmt: skip
        TIDPOTrainer(model=start, args=config, train_dataset=dataset, processing_class=tokenizer).train()

    result = {"steps": args.steps, "pairs": len(dataset), "threads": torch.get_num_threads()}
    _, result["dpo_run_cpu_s"] = timed(preference_run)
    for recipe, extra in (("sft", {}), ("dpo", {"beta": 0.5})):
        paths, result[f"{recipe}_recipe_cpu_s"] = timed(
            lambda: train_contrastive_models(
                start, tokenizer, dataset, recipe, os.path.join(args.output_dir, recipe), max_steps=args.steps,
                training_args={**CPU, **extra}, **lr,
            )  # fmt: skip
        )
    positive = AutoModelForCausalLM.from_pretrained(paths.positive)
    negative = AutoModelForCausalLM.from_pretrained(paths.negative)
    _, result["tis_dpo_scoring_cpu_s"] = timed(
        lambda: compute_tis_dpo_weight_columns(dataset, positive, negative, tokenizer)
    )
    for only_negative in (True, False):
        _, result[f"cdpo_scoring_only_negative_{only_negative}_cpu_s"] = timed(
            lambda: compute_cdpo_weight_columns(dataset, positive, negative, tokenizer, only_negative=only_negative)
        )
    result = {key: round(value, 2) if isinstance(value, float) else value for key, value in result.items()}
    with open(os.path.join(args.output_dir, "contrastive_cost.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
