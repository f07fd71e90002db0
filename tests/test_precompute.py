"""
`precompute_ref_log_probs=True`: the reference's per-token log-probs computed once, cached as dataset columns and read
from the batch in place of the reference forward.

- the columns equal an independent per-row computation on the reference (full logits, one row at a time), truncation
  included, for the pairs and for dataset anchors;
- with `token_weighting="uniform"`, `triplet_gamma=0` a step and an evaluation equal TRL's `DPOTrainer` with
  `precompute_ref_log_probs=True` (loss, gradients, metrics), with a `ref_model` and for full fine-tuning without one;
- as in TRL, full fine-tuning keeps no reference in memory, except where policy anchors or the per-step reference
  attribution still run it (kept, with a warning); `tdpo_alpha > 0` and an `IterableDataset` are refused, and so is a
  dataset given to `evaluate` after training when no reference is kept (TRL's errors);
- the cache is reused by a second trainer.
"""

import logging

import pytest
import torch
from datasets import Dataset, IterableDataset
from helpers_trainer import CPU_ARGS, first_batch, load, token_logps, tokenize_row
from test_dpo_parity import assert_same_step
from trl import DPOConfig, DPOTrainer

import trl_tidpo.trainer.precompute as precompute_module
from conftest import ANCHORS, PAIRS
from trl_tidpo import TIDPOConfig, TIDPOTrainer


def precompute_args(tmp_path, **overrides) -> dict:
    return {"output_dir": str(tmp_path), **CPU_ARGS, "beta": 0.5, "precompute_ref_log_probs": True, **overrides}


def dpo_and_tidpo(tmp_path, model_dir, tokenizer, dataset, ref_dir=None, eval_dataset=None, **options):
    """TRL's DPOTrainer and uniform TI-DPO, both precomputing the reference (a fresh `ref_dir` model, or none)."""
    dpo = DPOTrainer(
        model=model_dir,
        ref_model=load(ref_dir) if ref_dir else None,
        args=DPOConfig(**precompute_args(tmp_path / "dpo", **options)),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    tidpo = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_dir) if ref_dir else None,
        args=TIDPOConfig(**precompute_args(tmp_path / "tidpo", token_weighting="uniform", triplet_gamma=0.0, **options)),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    return dpo, tidpo


def expected_completion_logps(reference, tokenizer, prompt: str, completion: str, max_length=None) -> list[float]:
    """The reference's log-prob of each completion token of one row (keep_start truncation: tokens past `max_length`
    get 0.0), from its full logits."""
    ids, start = tokenize_row(tokenizer, prompt, completion)
    kept = ids[:max_length] if max_length else ids
    with torch.no_grad():
        logps = token_logps(reference, kept)
    values = [float(logps[j - 1]) if j > 0 else 0.0 for j in range(start, len(kept))]
    return values + [0.0] * (len(ids) - len(kept))


# ---------------------------------------------------------------------------------------------------------- columns


@pytest.mark.parametrize("max_length", [None, 9])
def test_columns_are_the_reference_per_token_logps(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, max_length):
    trainer = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),
        args=TIDPOConfig(**precompute_args(tmp_path, triplet_gamma=0.0, max_length=max_length)),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    reference = load(ref_model_dir)
    truncated = 0
    for index, (prompt, chosen, rejected) in enumerate(PAIRS):
        for side, completion in (("chosen", " " + chosen), ("rejected", " " + rejected)):
            expected = expected_completion_logps(reference, tokenizer, prompt, completion, max_length)
            got = trainer.train_dataset[index][f"{side}_ref_token_logps"]
            assert len(got) == len(trainer.train_dataset[index][f"{side}_ids"])
            assert got == pytest.approx(expected, abs=1e-5), (index, side)
            truncated += expected[-1] == 0.0
    assert (truncated > 0) == (max_length is not None)  # the truncated case really occurs


def test_batch_carries_the_logps_aligned_like_token_weights(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    """`ref_token_logps` `[2B, T]`: on each completion token, the reference's log-prob of that token; 0 elsewhere."""
    trainer = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),
        args=TIDPOConfig(**precompute_args(tmp_path, triplet_gamma=0.0)),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    reference = load(ref_model_dir)
    assert batch["ref_token_logps"].shape == batch["input_ids"].shape
    for row in range(batch["input_ids"].size(0)):
        length = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row, :length].tolist()
        with torch.no_grad():
            logps = token_logps(reference, ids)
        for j in range(batch["input_ids"].size(1)):
            expected = float(logps[j - 1]) if batch["completion_mask"][row, j] and j > 0 else 0.0
            assert float(batch["ref_token_logps"][row, j]) == pytest.approx(expected, abs=1e-5), (row, j)


def test_cache_is_reused_by_a_second_trainer(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, monkeypatch):
    standard_dataset.save_to_disk(str(tmp_path / "data"))
    dataset = Dataset.load_from_disk(str(tmp_path / "data"))
    computed = []
    original = precompute_module.reference_logp_lists

    def counting(dataset, **kwargs):
        computed.append(kwargs["name"])
        return original(dataset, **kwargs)

    monkeypatch.setattr(precompute_module, "reference_logp_lists", counting)

    def build(name: str) -> TIDPOTrainer:
        return TIDPOTrainer(
            model=model_dir,
            ref_model=load(ref_model_dir),
            args=TIDPOConfig(**precompute_args(tmp_path / name, triplet_gamma=0.0)),
            train_dataset=dataset,
            processing_class=tokenizer,
        )

    first, again = build("a"), build("b")
    assert computed == ["train"]
    assert first.train_dataset["chosen_ref_token_logps"] == again.train_dataset["chosen_ref_token_logps"]


# ---------------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="sigmoid"),
        pytest.param({"loss_type": "ipo"}, id="ipo"),
        pytest.param({"ld_alpha": 0.5}, id="ld_alpha"),
        pytest.param({"max_length": 9}, id="truncated"),
    ],
)
def test_uniform_step_equals_dpo_trainer_with_precompute(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, options):
    dpo, tidpo = dpo_and_tidpo(tmp_path, model_dir, tokenizer, standard_dataset, ref_dir=ref_model_dir, **options)
    with torch.no_grad():  # a reference forward from now on would give other log-probs: the step must not run one
        for param in tidpo.ref_model.parameters():
            param.mul_(0.5)
    assert_same_step(dpo, tidpo)


def test_full_fine_tuning_drops_the_reference_as_trl(tmp_path, model_dir, tokenizer, standard_dataset):
    """No `ref_model`, no PEFT: the policy at construction is the reference, and neither trainer keeps one."""
    dpo, tidpo = dpo_and_tidpo(tmp_path, model_dir, tokenizer, standard_dataset)
    assert dpo.ref_model is None and tidpo.ref_model is None
    assert_same_step(dpo, tidpo)


def test_evaluate_equals_dpo_trainer_at_init_and_when_called(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    """The eval dataset given at construction is precomputed then; one given to `evaluate` when it is called."""
    eval_dataset = standard_dataset.select(range(5))
    dpo, tidpo = dpo_and_tidpo(
        tmp_path, model_dir, tokenizer, standard_dataset, ref_dir=ref_model_dir, eval_dataset=eval_dataset
    )
    assert "chosen_ref_token_logps" in tidpo.eval_dataset.column_names
    later = Dataset.from_dict(standard_dataset[3:8])
    for kwargs in ({}, {"eval_dataset": later}):
        dpo_metrics, tidpo_metrics = dpo.evaluate(**kwargs), tidpo.evaluate(**kwargs)
        for key, value in dpo_metrics.items():
            if key.endswith(("_runtime", "_per_second")):
                continue
            assert tidpo_metrics[key] == pytest.approx(value, abs=1e-6, rel=1e-5), key


def test_evaluate_after_training_without_a_reference_is_trl_error(tmp_path, model_dir, tokenizer, standard_dataset):
    trainer = TIDPOTrainer(
        model=model_dir,
        args=TIDPOConfig(**precompute_args(tmp_path, triplet_gamma=0.0, max_steps=1)),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    with pytest.raises(ValueError, match=r"after training has started.*precompute_ref_log_probs=True"):
        trainer.evaluate(eval_dataset=standard_dataset.select(range(2)))


# ---------------------------------------------------------------------------------------------------------- anchors, reference


def test_dataset_anchors_are_precomputed_and_need_no_reference(tmp_path, model_dir, tokenizer, standard_dataset):
    dataset = standard_dataset.add_column("anchor", ANCHORS)
    trainer = TIDPOTrainer(
        model=model_dir,
        args=TIDPOConfig(
            **precompute_args(tmp_path, triplet_gamma=0.1, anchor_source="dataset", max_steps=1, learning_rate=1e-2)
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert trainer.ref_model is None
    reference = load(model_dir)  # full fine-tuning: the initial policy
    for index, (prompt, _, _) in enumerate(PAIRS):
        expected = expected_completion_logps(reference, tokenizer, prompt, ANCHORS[index])
        got = trainer.train_dataset[index]["anchor_ref_token_logps"]
        assert got == pytest.approx(expected, abs=1e-5), index
    assert first_batch(trainer)["anchor_ref_token_logps"].shape == first_batch(trainer)["anchor_input_ids"].shape
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert log["triplet/loss"] >= 0 and torch.isfinite(torch.tensor(log["loss"]))


@pytest.mark.parametrize(
    "options, reason",
    [
        ({"triplet_gamma": 0.1, "anchor_source": "policy", "anchor_max_new_tokens": 3}, "policy anchors"),
        ({"triplet_gamma": 0.0, "importance_model": "reference", "precompute_token_weights": False}, "importance_model"),
    ],
    ids=["policy-anchors", "reference-attribution"],
)
def test_parts_that_run_the_reference_each_step_keep_it(tmp_path, model_dir, tokenizer, standard_dataset, caplog, options, reason):
    with caplog.at_level(logging.WARNING, logger="trl_tidpo.trainer"):
        trainer = TIDPOTrainer(
            model=model_dir,
            args=TIDPOConfig(**precompute_args(tmp_path, max_steps=1, learning_rate=1e-2, **options)),
            train_dataset=standard_dataset,
            processing_class=tokenizer,
        )
    assert trainer.args.precompute_ref_log_probs and trainer.precompute_ref_logps
    assert any(reason in r.getMessage() and "stays in memory" in r.getMessage() for r in caplog.records)
    initial = load(model_dir)
    assert trainer.ref_model is not None
    for (name, param), (_, kept) in zip(initial.named_parameters(), trainer.ref_model.named_parameters(), strict=True):
        assert torch.equal(param, kept), name
    assert "chosen_ref_token_logps" in trainer.train_dataset.column_names
    trainer.train()
    assert all(torch.equal(p, k) for p, k in zip(initial.parameters(), trainer.ref_model.parameters()))  # frozen
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert torch.isfinite(torch.tensor(log["loss"]))


def test_sequential_kl_is_refused():
    with pytest.raises(ValueError, match=r"precompute_ref_log_probs=True` with `tdpo_alpha > 0`.*tdpo_alpha=0"):
        TIDPOConfig(output_dir="unused", **{**CPU_ARGS, "precompute_ref_log_probs": True, "tdpo_alpha": 0.5})


def test_iterable_dataset_is_trl_error(tmp_path, model_dir, tokenizer, standard_dataset):
    rows = standard_dataset.to_list()
    iterable = IterableDataset.from_generator(lambda: iter(rows))
    with pytest.raises(ValueError, match=r"not supported with IterableDataset.*precompute_ref_log_probs=False"):
        TIDPOTrainer(
            model=model_dir,
            args=TIDPOConfig(**precompute_args(tmp_path, triplet_gamma=0.0, max_steps=1)),
            train_dataset=iterable,
            processing_class=tokenizer,
        )
