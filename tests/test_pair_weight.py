"""The `pair_weight` column: it scales each pair's whole loss (DPO and triplet terms) in the batch mean. Checked against
batches whose rows are dropped or repeated instead (an independent way to weigh a pair 0 or 2)."""

import math

import pytest
import torch
from conftest import ANCHORS
from helpers_trainer import load
from trainer_probes import tidpo_args

from trl_tidpo import TIDPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

# TI-DPO weights with the triplet term (dataset anchors: deterministic); WPO with IPO and LD-DPO; uniform weights with
# two loss types; the pair's difference
CONFIGS = {
    "ti_dpo+triplet": {"triplet_gamma": 0.1, "anchor_source": "dataset", "triplet_margin": 1.0},  # hinge active
    "wpo+ipo+ld": {"triplet_gamma": 0.0, "use_weighting": True, "loss_type": "ipo", "ld_alpha": 0.5},
    "uniform+sft": {"triplet_gamma": 0.0, "token_weighting": "uniform", "loss_type": ["sigmoid", "sft"],
                    "loss_weights": [1.0, 0.5]},
    "difference+hinge": {"triplet_gamma": 0.0, "token_weighting": "difference", "loss_type": "hinge"},
}  # fmt: skip


def make_trainer(tmp_path, model_dir, ref_model_dir, tokenizer, dataset, config: str, pair_weights=None):
    dataset = dataset.add_column("anchor", ANCHORS)
    if pair_weights is not None:
        dataset = dataset.add_column("pair_weight", pair_weights)
    return TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),
        args=tidpo_args(tmp_path, beta=0.5, **CONFIGS[config]),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def loss_grads_metrics(trainer, rows: list[int]):
    """The loss of the batch of `rows` (collated by the trainer's collator), its gradients and its metrics."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    trainer.model.zero_grad()
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("config", list(CONFIGS))
def test_all_ones_reproduce_todays_numbers_bitwise(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, config):
    plain = make_trainer(tmp_path / "a", model_dir, ref_model_dir, tokenizer, standard_dataset, config)
    ones = make_trainer(tmp_path / "b", model_dir, ref_model_dir, tokenizer, standard_dataset, config, [1.0] * 8)
    loss_a, grads_a, metrics_a = loss_grads_metrics(plain, [0, 1, 2, 3])
    loss_b, grads_b, metrics_b = loss_grads_metrics(ones, [0, 1, 2, 3])
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    assert all(torch.equal(grads_a[name], grads_b[name]) for name in grads_a)
    assert metrics_a == metrics_b


@pytest.mark.parametrize("config", ["ti_dpo+triplet", "wpo+ipo+ld"])
def test_zero_removes_a_pair_and_two_counts_it_twice(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, config):
    weights = [2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    weighted = make_trainer(tmp_path / "w", model_dir, ref_model_dir, tokenizer, standard_dataset, config, weights)
    plain = make_trainer(tmp_path / "p", model_dir, ref_model_dir, tokenizer, standard_dataset, config)
    loss_w, grads_w, _ = loss_grads_metrics(weighted, [0, 1, 2, 3])
    # Independently: row 0 twice, row 1 left out; the mean over those 4 rows is the weighted sum over the 4 of the batch
    loss_p, grads_p, _ = loss_grads_metrics(plain, [0, 0, 2, 3])
    torch.testing.assert_close(loss_w, loss_p, rtol=1e-5, atol=1e-7)
    for name in grads_p:
        torch.testing.assert_close(grads_w[name], grads_p[name], rtol=1e-4, atol=1e-7)
    # ... and row 1 did have a gradient of its own, so leaving it out is not vacuous
    _, grads_1, _ = loss_grads_metrics(plain, [1])
    assert any(g.abs().sum() > 0 for g in grads_1.values())


def test_wpo_weight_and_pair_weight_multiply(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    weights = [2.0, 0.5, 0.0, 3.0, 1.0, 1.0, 1.0, 1.0]
    weighted = make_trainer(tmp_path / "w", model_dir, ref_model_dir, tokenizer, standard_dataset, "wpo+ipo+ld", weights)
    plain = make_trainer(tmp_path / "p", model_dir, ref_model_dir, tokenizer, standard_dataset, "wpo+ipo+ld")
    rows = [0, 1, 2, 3]
    with torch.no_grad():
        _, parts_w = weighted._loss_parts(weighted.model, weighted.data_collator([weighted.train_dataset[i] for i in rows]))
        _, parts_p = plain._loss_parts(plain.model, plain.data_collator([plain.train_dataset[i] for i in rows]))
    assert (parts_p.dpo_losses != 0).all()
    expected = torch.tensor([parts_p.dpo_losses[i].item() * weights[i] for i in range(4)])
    torch.testing.assert_close(parts_w.dpo_losses, expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize(
    "row, value, shown",
    [(3, float("nan"), "nan"), (5, -1.0, "-1.0"), (2, float("inf"), "inf"), (6, None, "None")],
    ids=["nan", "negative", "inf", "missing"],
)
def test_bad_pair_weight_fails_at_construction_with_the_row(
    tmp_path, model_dir, tokenizer, standard_dataset, row, value, shown
):
    weights = [1.0] * 8
    weights[row] = value
    with pytest.raises(ValueError, match=rf"`train` row {row}: `pair_weight` is {shown}; a pair weight must be a finite number >= 0"):
        TIDPOTrainer(
            model=model_dir,
            args=tidpo_args(tmp_path, triplet_gamma=0.0),
            train_dataset=standard_dataset.add_column("pair_weight", weights),
            processing_class=tokenizer,
        )


def test_pair_weight_reaches_the_batch(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    weights = [0.5 * i for i in range(8)]
    trainer = make_trainer(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, "uniform+sft", weights)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["pair_weight"].dtype == torch.float32
    assert batch["pair_weight"].tolist() == weights[:4]
    assert not math.isnan(trainer.get_batch_loss_metrics(trainer.model, batch)[0].item())


def test_streamed_bad_pair_weight_fails_in_the_collator(tmp_path, model_dir, tokenizer, standard_dataset):
    weights = [1.0] * 8
    weights[1] = -0.5
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, triplet_gamma=0.0, max_steps=1),
        train_dataset=standard_dataset.add_column("pair_weight", weights).to_iterable_dataset(),
        processing_class=tokenizer,
    )
    rows = list(trainer.train_dataset)[:4]
    with pytest.raises(ValueError, match=r"a row of this batch: `pair_weight` is -0.5"):
        trainer.data_collator(rows)
