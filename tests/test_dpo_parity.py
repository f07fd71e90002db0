"""
`token_weighting="uniform"` with `triplet_gamma=0` is TRL's `DPOTrainer`, option by option: the same loss, the same
gradient of every parameter, and the same logged metrics, for every loss type and DPO option of TRL 1.16.
"""

import math

import pytest
import torch
from datasets import Dataset
from helpers_trainer import CPU_ARGS, first_batch, load
from trl import DPOConfig, DPOTrainer

from trl_tidpo import TIDPOConfig, TIDPOTrainer
from trl_tidpo.ops.weighted_losses import LOSS_TYPES


def label_smoothing_for(loss_type: str) -> float:
    return 0.1 if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0


CASES = [pytest.param({"loss_type": t, "label_smoothing": label_smoothing_for(t)}, id=t) for t in LOSS_TYPES] + [
    pytest.param({"loss_type": "sigmoid", "f_divergence_type": f}, id=f"sigmoid-{f}")
    for f in ("forward_kl", "js_divergence", "alpha_divergence")
] + [
    pytest.param({"loss_type": "ipo", "f_divergence_type": "js_divergence"}, id="ipo-js_divergence"),
    pytest.param({"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 2.0}, id="alpha-2"),
    pytest.param({"loss_type": "discopop", "discopop_tau": 0.5}, id="discopop-tau"),
    pytest.param({"loss_type": "sigmoid", "ld_alpha": 0.3}, id="ld_alpha-sigmoid"),
    pytest.param({"loss_type": "ipo", "ld_alpha": 0.5}, id="ld_alpha-ipo"),
    pytest.param({"loss_type": "sigmoid", "use_weighting": True}, id="wpo-sigmoid"),
    pytest.param({"loss_type": "nca_pair", "use_weighting": True}, id="wpo-nca_pair"),
    pytest.param({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, id="mpo-loss_weights"),
    pytest.param({"loss_type": ["sigmoid", "ipo"], "ld_alpha": 0.5, "use_weighting": True}, id="multi-ld-wpo"),
]


def build_pair(tmp_path, model_dir, ref_model_dir, tokenizer, dataset, options: dict) -> tuple[DPOTrainer, TIDPOTrainer]:
    common = {**CPU_ARGS, "beta": 0.5, **options}
    dpo = DPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    tidpo = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),
        args=TIDPOConfig(output_dir=str(tmp_path / "tidpo"), token_weighting="uniform", triplet_gamma=0.0, **common),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    return dpo, tidpo


def step(trainer, batch: dict) -> torch.Tensor:
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss


def assert_same_step(dpo: DPOTrainer, tidpo: TIDPOTrainer) -> None:
    """One step of each on the same first batch: loss, every gradient and every metric DPOTrainer logs agree."""
    dpo_batch, tidpo_batch = first_batch(dpo), first_batch(tidpo)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(dpo_batch[key], tidpo_batch[key])
    dpo_loss, tidpo_loss = step(dpo, dpo_batch), step(tidpo, tidpo_batch)
    assert torch.isfinite(dpo_loss)
    torch.testing.assert_close(tidpo_loss, dpo_loss, atol=1e-6, rtol=1e-5)
    tidpo_params = dict(tidpo.model.named_parameters())
    nonzero = 0
    for name, param in dpo.model.named_parameters():
        other = tidpo_params[name].grad
        assert param.grad is not None and other is not None, name
        torch.testing.assert_close(other, param.grad, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        nonzero += int(param.grad.abs().sum() > 0)
    assert nonzero > 0  # the comparison is not vacuous
    for key, values in dpo._metrics["train"].items():
        assert tidpo._metrics["train"][key][-1] == pytest.approx(values[-1], abs=1e-6, rel=1e-5), key


@pytest.mark.parametrize("options", CASES)
def test_uniform_tidpo_is_dpo_trainer(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, options):
    dpo, tidpo = build_pair(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, options)
    assert_same_step(dpo, tidpo)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_empty_prompt_counts_the_unscored_first_token_as_trl(tmp_path, model_dir, ref_model_dir, tokenizer, loss_type):
    """
    An empty prompt with a tokenizer that adds no BOS: the completion starts at position 0, which TRL's length counts
    but no log-prob scores. `ipo` and `sigmoid_norm` divide by that count, so the uniform weight sums must too.
    """
    dataset = Dataset.from_dict(
        {"prompt": ["", "", "the sky is", ""], "chosen": ["blue .", "yes", " blue .", "hello world"],
         "rejected": ["red", "no maybe", " green .", "bad ."]}
    )
    dpo, tidpo = build_pair(tmp_path, model_dir, ref_model_dir, tokenizer, dataset, {"loss_type": loss_type})
    assert first_batch(dpo)["completion_mask"][:, 0].any()  # the case under test really occurs
    assert_same_step(dpo, tidpo)
    assert math.isfinite(tidpo._metrics["train"]["rewards/margins"][-1])


TOKEN_WEIGHT_MODES = {
    "ti_dpo": {},
    "dataset": {"token_weighting": "dataset"},
}


@pytest.mark.parametrize("weighting", list(TOKEN_WEIGHT_MODES))
@pytest.mark.parametrize("options", CASES)
def test_token_weights_train_with_every_option(
    tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, options, weighting
):
    """With TI-DPO's or the dataset's token weights, every option trains: finite loss and metrics, and every
    parameter moves (the weighted sums reach the gradient)."""
    dataset = standard_dataset
    if weighting == "dataset":
        lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in dataset["chosen"]]
        rejected = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in dataset["rejected"]]
        dataset = dataset.add_column("chosen_token_weights", [[1.5 - 0.2 * (j % 3) for j in range(n)] for n in lengths])
        dataset = dataset.add_column("rejected_token_weights", [[0.5 + 0.3 * (j % 2) for j in range(n)] for n in rejected])
    trainer = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),
        args=TIDPOConfig(
            output_dir=str(tmp_path), triplet_gamma=0.0, max_steps=1, learning_rate=1e-2,
            **{**CPU_ARGS, "beta": 0.5, **options, **TOKEN_WEIGHT_MODES[weighting]},
        ),  # fmt: skip
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert math.isfinite(log["loss"]) and math.isfinite(log["rewards/margins"])
    assert log["token_weights/fallback_rows"] == 0
    if weighting == "ti_dpo":
        assert log["token_weights/std"] > 0  # the weights are not uniform
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)
