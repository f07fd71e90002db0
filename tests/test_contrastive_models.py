"""
π+ and π− built from the training pairs (`trl_tidpo.modeling.contrastive_models`): each recipe (SFT full and LoRA,
DPO and reverse DPO) gives a π+ that prefers the chosen completions more than π− does after a few steps, and
`add_contrastive_weight_columns` returns the TIS-DPO and cDPO columns of the models it trained.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers_trainer import CPU_ARGS, load, token_logps, tokenize_row
from peft import LoraConfig

from trl_tidpo import add_contrastive_weight_columns, train_contrastive_models
from trl_tidpo.modeling.cdpo import compute_cdpo_weight_columns
from trl_tidpo.modeling.tis_dpo import compute_tis_dpo_weight_columns


pytestmark = pytest.mark.usefixtures("one_thread")

TRAINING = {**CPU_ARGS, "per_device_train_batch_size": 8}


def completion_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """log π(completion + EOS | prompt), summed over the completion's tokens, from full logits."""
    ids, start = tokenize_row(tokenizer, prompt, completion)
    with torch.no_grad():
        return float(token_logps(model, ids)[start - 1 :].sum())


def preference_gaps(positive, negative, tokenizer, dataset) -> tuple[float, float]:
    """Mean over pairs of `log π+(chosen) − log π−(chosen)` and of `log π−(rejected) − log π+(rejected)`."""
    chosen, rejected = [], []
    for example in dataset:
        chosen.append(
            completion_logp(positive, tokenizer, example["prompt"], example["chosen"])
            - completion_logp(negative, tokenizer, example["prompt"], example["chosen"])
        )
        rejected.append(
            completion_logp(negative, tokenizer, example["prompt"], example["rejected"])
            - completion_logp(positive, tokenizer, example["prompt"], example["rejected"])
        )
    return sum(chosen) / len(chosen), sum(rejected) / len(rejected)


@pytest.mark.parametrize(
    "recipe, lora, extra",
    [("sft", False, {}), ("sft", True, {}), ("dpo", False, {"beta": 0.5})],
    ids=["sft-full", "sft-lora", "dpo-full"],
)
def test_positive_model_prefers_chosen_over_negative(tmp_path, model_dir, tokenizer, standard_dataset, recipe, lora, extra):
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) if lora else None
    paths = train_contrastive_models(
        model_dir,
        tokenizer,
        standard_dataset,
        recipe,
        str(tmp_path),
        max_steps=6,
        learning_rate=5e-2,
        peft_config=peft_config,
        training_args={**TRAINING, **extra},
    )
    positive, negative, start = load(paths.positive).eval(), load(paths.negative).eval(), load(model_dir).eval()
    chosen_gap, rejected_gap = preference_gaps(positive, negative, tokenizer, standard_dataset)
    assert chosen_gap > 0.5 and rejected_gap > 0.5
    assert not torch.equal(positive.lm_head.weight, negative.lm_head.weight) or lora
    if lora:  # the adapters are merged into the saved weights: the attention projections moved, the head did not
        torch.testing.assert_close(positive.lm_head.weight, start.lm_head.weight)
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(positive.state_dict()[q], start.state_dict()[q])


def test_unknown_recipe_and_missing_prompt_are_refused(tmp_path, model_dir, tokenizer, standard_dataset):
    with pytest.raises(ValueError, match="`recipe` must be one of"):
        train_contrastive_models(model_dir, tokenizer, standard_dataset, "kto", str(tmp_path), max_steps=1,
                                 learning_rate=1e-3)  # fmt: skip
    with pytest.raises(ValueError, match=r"lack the column\(s\) \['prompt'\]"):
        train_contrastive_models(model_dir, tokenizer, standard_dataset.remove_columns("prompt"), "sft", str(tmp_path),
                                 max_steps=1, learning_rate=1e-3)  # fmt: skip


def test_add_contrastive_weight_columns_gives_both_weightings(tmp_path, model_dir, tokenizer, standard_dataset):
    """The returned columns are those of the saved π+ and π−; with DPO/reverse DPO they favour the chosen tokens
    (TIS-DPO's mean chosen weight above 1); cDPO's rejected weights lie in [0, 1] (below 1 somewhere: the tiny models
    give every token a small p_t, so 1 − p_t stays near 1), its chosen weights are 1."""
    weighted = add_contrastive_weight_columns(
        model_dir,
        tokenizer,
        standard_dataset,
        "dpo",
        6,
        5e-2,
        output_dir=str(tmp_path),
        training_args={**TRAINING, "beta": 0.5},
    )
    assert set(weighted) == {"tis_dpo", "cdpo"}
    positive, negative = load(str(tmp_path / "positive" / "final")), load(str(tmp_path / "negative" / "final"))
    expected = {
        "tis_dpo": compute_tis_dpo_weight_columns(standard_dataset, positive, negative, tokenizer),
        "cdpo": compute_cdpo_weight_columns(standard_dataset, positive, negative, tokenizer),
    }
    for name, dataset in weighted.items():
        assert dataset.column_names == standard_dataset.column_names + ["chosen_token_weights", "rejected_token_weights"]
        for column in ("chosen_token_weights", "rejected_token_weights"):
            assert dataset[column] == expected[name][column], (name, column)
    tis_chosen = [w for row in weighted["tis_dpo"]["chosen_token_weights"] for w in row]
    assert sum(tis_chosen) / len(tis_chosen) > 1.0
    cdpo_rejected = [w for row in weighted["cdpo"]["rejected_token_weights"] for w in row]
    assert all(0.0 <= w <= 1.0 for w in cdpo_rejected) and min(cdpo_rejected) < 1.0
    assert all(w == 1.0 for row in weighted["cdpo"]["chosen_token_weights"] for w in row)


def test_example_script_saves_both_weighted_datasets(tmp_path, model_dir, standard_dataset):
    """examples/contrastive_models.py (TrlParser flags), SFT recipe with LoRA, two steps: both datasets saved."""
    path = Path(__file__).resolve().parents[1] / "examples" / "contrastive_models.py"
    spec = importlib.util.spec_from_file_location("contrastive_models_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    standard_dataset.save_to_disk(str(tmp_path / "pairs"))
    paths = example.main(
        ["--model_name_or_path", model_dir, "--dataset_name", str(tmp_path / "pairs"), "--recipe", "sft",
         "--max_steps", "2", "--learning_rate", "1e-2", "--use_cpu", "--use_peft", "--lora_r", "4",
         "--lora_target_modules", "q_proj", "v_proj", "--output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    assert sorted(paths) == ["cdpo", "tis_dpo"]
    for saved in paths.values():
        dataset = Dataset.load_from_disk(saved)
        assert dataset.column_names[-2:] == ["chosen_token_weights", "rejected_token_weights"]
        assert len(dataset) == len(standard_dataset)
    assert (tmp_path / "out" / "positive" / "final" / "model.safetensors").exists()
