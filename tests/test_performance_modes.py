"""
The cheaper ways of computing TI-DPO (docs/benchmarks.md, "Step cost") compute the same thing as the plain ones. No timing is asserted here
(benchmarks/step_cost.py measures cost):

- reference weights precomputed once and cached as dataset columns equal the reference weights computed at every
  step (`precompute_token_weights=False`), and both equal an independent `inputs_embeds` computation on the reference;
  the cache is reused for the same dataset, reference and settings, and rebuilt when one of them changes;
- the policy attribution fused into the loss forward (one forward, `autograd.grad` w.r.t. the embeddings, graph
  retained) equals the attribution of a separate forward (`_attribution_pass`) and the independent computation, with
  and without LoRA + non-reentrant gradient checkpointing, with and without anchor rows in the same forward;
- the sequential KL gives the same loss and gradients for any `kl_chunk_size`, and only ever projects one chunk of
  positions to the vocabulary.
"""

import math

import pytest
import torch
from datasets import Dataset
from helpers_trainer import expected_shifted_weights, first_batch, load, raw_importance, text_rows
from peft import LoraConfig

import trl_tidpo.trainer.precompute as precompute_module
import trl_tidpo.trainer.tidpo_trainer as tidpo_trainer_module
from conftest import ANCHORS
from trainer_probes import batch_weights, tidpo_args
from trl_tidpo.modeling.forwards import attribute_rows
from trl_tidpo import TIDPOTrainer
from trl_tidpo.modeling.attribution import causal_lm_of

B = 4






def record_applied_weights(monkeypatch) -> list[torch.Tensor]:
    """Record the weights the loss actually applies (every call of `weighted_sequence_logps` in the trainer)."""
    applied = []
    original = tidpo_trainer_module.weighted_sequence_logps

    def recording(per_token_logps, weights, mask):
        applied.append(weights.detach().clone())
        return original(per_token_logps, weights, mask)

    monkeypatch.setattr(tidpo_trainer_module, "weighted_sequence_logps", recording)
    return applied


# ---------------------------------------------------------------------------------------------------------- reference


def reference_trainer(tmp_path, model_dir, ref_model_dir, tokenizer, dataset, ref=None, **overrides) -> TIDPOTrainer:
    return TIDPOTrainer(
        model=model_dir,
        ref_model=ref if ref is not None else load(ref_model_dir),
        args=tidpo_args(tmp_path, importance_model="reference", triplet_gamma=0.0, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def test_cached_reference_weights_equal_on_the_fly_reference_weights(
    tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, monkeypatch
):
    """
    The weights applied in the loss are the same whether the reference attribution was precomputed once and cached
    (`precompute_token_weights=True`) or recomputed this step (`False`), and both equal the independent per-row
    `inputs_embeds` computation on the reference model (not on the policy).
    """
    applied = record_applied_weights(monkeypatch)
    cached = reference_trainer(tmp_path / "cached", model_dir, ref_model_dir, tokenizer, standard_dataset)
    on_the_fly = reference_trainer(
        tmp_path / "fly", model_dir, ref_model_dir, tokenizer, standard_dataset, precompute_token_weights=False
    )
    assert {"chosen_token_weights", "rejected_token_weights"} <= set(cached.train_dataset.column_names)
    assert "chosen_token_weights" not in on_the_fly.train_dataset.column_names

    cached_batch, fly_batch = first_batch(cached), first_batch(on_the_fly)
    assert "token_weights" in cached_batch and "token_weights" not in fly_batch
    for trainer, batch in ((cached, cached_batch), (on_the_fly, fly_batch)):
        trainer.model.train()
        trainer.compute_loss(trainer.model, batch)
    assert len(applied) == 4  # policy and reference sums, per trainer
    cached_weights, fly_weights = applied[0], applied[2]

    rows = text_rows(tokenizer, standard_dataset)
    width = cached_batch["input_ids"].size(1) - 1
    expected, _ = expected_shifted_weights(load(ref_model_dir), rows, width, 0.7, 0.25, "completion", "mean")
    policy_weights, _ = expected_shifted_weights(load(model_dir), rows, width, 0.7, 0.25, "completion", "mean")
    torch.testing.assert_close(cached_weights, fly_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cached_weights, expected, atol=1e-5, rtol=1e-4)
    assert (expected - policy_weights).abs().max() > 1e-2  # the policy's weights differ: the test can tell them apart


def test_reference_weight_cache_is_reused_and_keyed(
    tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, monkeypatch
):
    """
    The cache is reused by a second trainer on the same data, reference and weight settings (even with another
    `output_dir`), and rebuilt when the reference or a weight setting changes.
    """
    standard_dataset.save_to_disk(str(tmp_path / "data"))
    dataset = Dataset.load_from_disk(str(tmp_path / "data"))
    computed = []
    original = precompute_module.reference_weight_lists

    def counting(dataset, **kwargs):
        computed.append(kwargs["weigh"].__self__.args.importance_lambda)  # the trainer whose weights are computed
        return original(dataset, **kwargs)

    monkeypatch.setattr(precompute_module, "reference_weight_lists", counting)

    def build(name: str, **overrides) -> TIDPOTrainer:
        return reference_trainer(tmp_path / name, model_dir, ref_model_dir, tokenizer, dataset, **overrides)

    first, again = build("a"), build("b")
    assert computed == [0.7]
    assert first.train_dataset["chosen_token_weights"] == again.train_dataset["chosen_token_weights"]
    build("c", importance_lambda=0.3)
    assert computed == [0.7, 0.3]
    other_ref = build("d", ref=load(model_dir))  # another reference model
    assert computed == [0.7, 0.3, 0.7]
    assert other_ref.train_dataset["chosen_token_weights"] != first.train_dataset["chosen_token_weights"]


# ---------------------------------------------------------------------------------------------------------- policy


@pytest.mark.parametrize("setting", ["full", "lora_checkpointing"])
def test_fused_policy_attribution_equals_separate_pass(tmp_path, model_dir, tokenizer, standard_dataset, setting):
    """
    One policy forward gives the loss inputs and the raw importance; it equals a separate attribution forward
    (`_attribution_pass`, no checkpointing) and the independent per-row `inputs_embeds` gradient, leaves parameter
    gradients untouched, and keeps the graph for the loss's backward.
    """
    overrides, peft_config = {}, None
    if setting == "lora_checkpointing":
        overrides = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
        # random A and B: the adapter changes the model, so attributing the base model would be caught
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, triplet_gamma=0.0, **overrides),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    lm = causal_lm_of(trainer.model)
    if setting == "lora_checkpointing":  # as `Trainer.train()` does before the first step
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert lm.is_activation_checkpointing == (setting == "lora_checkpointing")
    batch = first_batch(trainer)
    forwards = []
    handle = lm.register_forward_pre_hook(lambda module, args: forwards.append(1))
    trainer.model.train()
    output = trainer.concatenated_forward(trainer.model, batch)
    handle.remove()
    fused = output.raw_importance

    assert len(forwards) == 1  # attribution and loss inputs from the same forward
    assert all(p.grad is None for p in trainer.model.parameters())  # activation-only backward
    without_checkpointing = trainer._contexts.policy_without_checkpointing
    separate = attribute_rows(trainer.model, batch["input_ids"], batch["attention_mask"], without_checkpointing)
    torch.testing.assert_close(fused, separate, atol=1e-6, rtol=1e-5)
    for r, (ids, _) in enumerate(text_rows(tokenizer, standard_dataset)):
        expected = torch.tensor(raw_importance(trainer.model, ids))
        torch.testing.assert_close(fused[r, : len(ids)], expected, atol=1e-6, rtol=1e-4)
        assert (fused[r, len(ids) :] == 0).all()  # padding after the row cannot influence its last position
    output.per_token_logps.sum().backward()  # the retained graph serves the loss's backward
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters() if p.requires_grad)


def test_anchor_rows_are_scored_apart_from_the_attributed_pairs(tmp_path, model_dir, tokenizer, standard_dataset):
    """
    The pair forward attributes only the 2B chosen/rejected rows and ignores the batch's anchor rows; the anchors are
    scored in a forward of their own (one policy and one reference forward of B rows), without attribution.
    """
    dataset = standard_dataset.add_column("anchor", ANCHORS)
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, triplet_gamma=0.1, anchor_source="dataset"),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    assert "anchor_input_ids" in batch
    pairs_only = {k: v for k, v in batch.items() if not k.startswith("anchor_")}
    trainer.model.train()
    with_anchors = trainer.concatenated_forward(trainer.model, batch)
    without = trainer.concatenated_forward(trainer.model, pairs_only)
    assert with_anchors.per_token_logps.size(0) == 2 * B
    torch.testing.assert_close(with_anchors.raw_importance, without.raw_importance, atol=0, rtol=0)

    rows_per_forward = {"policy": [], "reference": []}
    handles = [
        causal_lm_of(model).register_forward_pre_hook(
            lambda module, args, kwargs, name=name: rows_per_forward[name].append(kwargs["input_ids"].size(0)),
            with_kwargs=True,
        )
        for name, model in (("policy", trainer.model), ("reference", trainer.ref_model))
    ]
    trainer.compute_loss(trainer.model, batch)
    for handle in handles:
        handle.remove()
    assert rows_per_forward == {"policy": [2 * B, B], "reference": [2 * B, B]}  # pairs, then anchors


# ---------------------------------------------------------------------------------------------------------- KL


def kl_loss_and_grads(tmp_path, model_dir, ref_model_dir, tokenizer, dataset, chunk: int, alpha: float = 0.5):
    trainer = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),
        args=tidpo_args(tmp_path, triplet_gamma=0.0, tdpo_alpha=alpha, kl_chunk_size=chunk),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, first_batch(trainer))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    return loss.detach(), grads, trainer._metrics["train"]


def test_kl_chunk_size_does_not_change_loss_or_gradients(
    tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset
):
    """Chunks of 1, 5 and all completion positions give the same TDPO loss and the same gradient of every parameter."""
    results = {
        chunk: kl_loss_and_grads(tmp_path / str(chunk), model_dir, ref_model_dir, tokenizer, standard_dataset, chunk)
        for chunk in (1, 5, 4096)
    }
    no_kl_loss, _, _ = kl_loss_and_grads(
        tmp_path / "nokl", model_dir, ref_model_dir, tokenizer, standard_dataset, 64, 0.0
    )
    loss, grads, metrics = results[4096]
    assert metrics["kl/chosen"][-1] > 0 and metrics["kl/rejected"][-1] > 0
    assert not math.isclose(loss.item(), no_kl_loss.item(), abs_tol=1e-5)  # the KL term is in the loss
    for chunk in (1, 5):
        other_loss, other_grads, other_metrics = results[chunk]
        torch.testing.assert_close(other_loss, loss, atol=1e-6, rtol=1e-5)
        assert other_metrics["kl/chosen"][-1] == pytest.approx(metrics["kl/chosen"][-1], rel=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(
                other_grads[name], grad, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
            )


def test_sequential_kl_projects_one_chunk_at_a_time(
    tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, monkeypatch
):
    """
    Every projection to the vocabulary the sequential KL makes, in forward and in the backward's recomputation, is at
    most `kl_chunk_size` positions: neither model's `[rows, T, vocab]` logits are ever built, let alone both at once.
    """
    chunk = 4
    seen = []
    original = tidpo_trainer_module.project_to_logits

    def recording(hidden, lm_head, config):
        logits = original(hidden, lm_head, config)
        seen.append((tuple(logits.shape), lm_head))
        return logits

    monkeypatch.setattr(tidpo_trainer_module, "project_to_logits", recording)
    trainer = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),
        args=tidpo_args(tmp_path, triplet_gamma=0.0, tdpo_alpha=0.5, kl_chunk_size=chunk),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    positions = int(batch["completion_mask"][:, 1:].sum())
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    in_forward = len(seen)
    loss.backward()

    vocab = len(tokenizer)
    assert positions > 2 * chunk  # several chunks
    assert all(shape[0] <= chunk and shape[1] == vocab for shape, _ in seen)
    policy_head = causal_lm_of(trainer.model).get_output_embeddings()
    ref_head = causal_lm_of(trainer.ref_model).get_output_embeddings()
    for head in (policy_head, ref_head):  # forward: each model scores every completion position exactly once
        assert sum(shape[0] for shape, h in seen[:in_forward] if h is head) == positions
    assert len(seen) > in_forward  # backward recomputed the chunks (activation checkpointing) instead of storing them
    assert all(shape[0] <= chunk for shape, _ in seen[in_forward:])


def test_dataset_weights_with_anchors_wider_than_the_pairs(
    tmp_path, model_dir, tokenizer, standard_dataset, monkeypatch
):
    """
    Anchor rows scored in their own forward may be wider than the chosen/rejected rows; the batch's `token_weights`
    still line up with the completion tokens they were given for (0 elsewhere).
    """
    rows = text_rows(tokenizer, standard_dataset)
    lengths = [len(ids) - start for ids, start in rows]
    weights = [[0.5 + 0.25 * j for j in range(n)] for n in lengths]
    long_anchor = " rest and drink water and see doctor and take pills now please ."
    dataset = standard_dataset.select(range(B)).add_column("anchor", [long_anchor] * B)
    dataset = dataset.add_column("chosen_token_weights", weights[:B]).add_column("rejected_token_weights", weights[B:])
    applied = record_applied_weights(monkeypatch)
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, token_weighting="dataset", triplet_gamma=0.1, anchor_source="dataset"),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    assert batch["anchor_input_ids"].size(1) > batch["input_ids"].size(1)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)

    expected = torch.zeros(2 * B, batch["input_ids"].size(1) - 1)  # the pair rows' own width
    for r, (ids, start) in enumerate(rows):
        for j in range(start, len(ids)):
            expected[r, j - 1] = weights[r][j - start]  # entry i weighs token i + 1
    torch.testing.assert_close(applied[0], expected)


def test_cached_reference_weights_follow_keep_end_truncation(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    """
    With `truncation_mode="keep_end"` and rows longer than `max_length`, truncation cuts the head of a completion: the
    cached weight lists must keep the surviving (last) tokens at the end, so that the collator, which keeps the end,
    applies the same weights as an on-the-fly reference attribution of the truncated rows.
    """
    trainers = {
        precompute: reference_trainer(
            tmp_path / str(precompute),
            model_dir,
            ref_model_dir,
            tokenizer,
            standard_dataset,
            max_length=4,
            truncation_mode="keep_end",
            precompute_token_weights=precompute,
        )
        for precompute in (True, False)
    }
    weights = {}
    for precompute, trainer in trainers.items():
        batch = first_batch(trainer)
        assert batch["input_ids"].size(1) == 4  # rows really were truncated
        with torch.no_grad():
            policy = trainer.concatenated_forward(trainer.model, batch)
            ref = trainer.concatenated_forward(trainer._reference_model(), batch, is_ref_model=True)
        source = policy if precompute else ref  # cached weights ride in the batch; on the fly they come from `ref`
        weights[precompute], _ = batch_weights(trainer, batch, source)
    assert (weights[True].sum(dim=-1) > 0).all()  # no row silently lost its weights
    torch.testing.assert_close(weights[True], weights[False], atol=1e-5, rtol=1e-4)
