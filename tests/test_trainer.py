"""
Integration tests of `TIDPOTrainer`: its loss, weights, KL and triplet terms against independent full-logits
computations (tests/helpers_trainer.py), parity with TRL's `DPOTrainer`, training, evaluation, errors, model card.
"""

import logging
import math
import os
import traceback
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import ANCHORS
from datasets import Dataset
from trainer_probes import batch_weights, tidpo_args
from helpers_trainer import (
    first_batch,
    load,
    text_rows,
    CPU_ARGS,
    clone_params,
    completion_logratios,
    expected_shifted_weights,
    gaussian_prior_loop,
    sequential_kl_loop,
    token_logps,
    tokenize_row,
)
from peft import LoraConfig
from trl import DPOConfig

import trl_tidpo
import trl_tidpo.modeling.attribution as attribution_module
import trl_tidpo.modeling.checkpointing as checkpointing_module
import trl_tidpo.trainer.tidpo_trainer as tidpo_trainer_module
from trl_tidpo import TIDPOConfig, TIDPOTrainer


B = 4  # pairs per batch in these tests







def assert_batch_matches_rows(batch: dict, rows: list[tuple[list[int], int]]) -> None:
    """The collated batch holds exactly the independently tokenised rows, right-padded, with their completion masks."""
    for r, (ids, start) in enumerate(rows):
        assert batch["input_ids"][r, : len(ids)].tolist() == ids
        assert batch["attention_mask"][r].sum().item() == len(ids)
        assert batch["completion_mask"][r].tolist() == [0] * start + [1] * (len(ids) - start) + [0] * (
            batch["input_ids"].size(1) - len(ids)
        )


def policy_step_loss(trainer, batch: dict) -> torch.Tensor:
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss


def assert_same_grads(model_a, model_b, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    grads_b = dict(model_b.named_parameters())
    checked = 0
    for name, param in model_a.named_parameters():
        other = grads_b[name].grad
        assert param.grad is not None and other is not None, name
        torch.testing.assert_close(param.grad, other, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked == len(grads_b)


# --------------------------------------------------------------------------------------------------------- DPO parity


# ------------------------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize(
    "weight_span, weight_normalization, importance_lambda",
    [
        ("completion", "mean", 0.7),
        ("completion", "sum", 0.7),
        ("sequence", "mean", 0.7),
        ("sequence", "sum", 1.0),
        ("completion", "mean", 0.0),
        ("completion", "mean", 1.0),
    ],
)
def test_token_weights_match_explicit_attribution(
    tmp_path, model_dir, tokenizer, standard_dataset, weight_span, weight_normalization, importance_lambda
):
    """The applied weights equal per-row `inputs_embeds` gradients of the last max logit, normalised by loops."""
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(
            tmp_path,
            triplet_gamma=0.0,
            weight_span=weight_span,
            weight_normalization=weight_normalization,
            importance_lambda=importance_lambda,
        ),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    rows = text_rows(tokenizer, standard_dataset)
    batch = first_batch(trainer)
    assert_batch_matches_rows(batch, rows)

    trainer.model.train()
    weights, fallback = batch_weights(trainer, batch)

    expected, expected_fallback = expected_shifted_weights(
        load(model_dir),
        rows,
        batch["input_ids"].size(1) - 1,
        importance_lambda,
        0.25,
        weight_span,
        weight_normalization,
    )
    assert not weights.requires_grad and weights.grad_fn is None
    assert fallback.tolist() == expected_fallback == [False] * 2 * B
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)
    if weight_span == "completion" and weight_normalization == "mean":
        # weights average 1 over each completion: β keeps its DPO meaning
        lengths = torch.tensor([len(ids) - start for ids, start in rows], dtype=torch.float32)
        torch.testing.assert_close(weights.sum(dim=-1), lengths)
    if importance_lambda < 1.0 or weight_span == "completion":
        assert weights.std() > 0.05  # not uniform: the test can tell weight schemes apart


def test_weighted_loss_matches_full_logits(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    """γ = 0, α = 0: loss and gradients of `mean -logσ(β (Σ w (lp - lr)_chosen - Σ w (lp - lr)_rejected))`."""
    beta = 0.5
    trainer = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),
        args=tidpo_args(tmp_path, triplet_gamma=0.0, beta=beta),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    loss = policy_step_loss(trainer, first_batch(trainer))

    policy, ref = load(model_dir), load(ref_model_dir)
    rows = text_rows(tokenizer, standard_dataset)
    width = max(len(ids) for ids, _ in rows) - 1
    weights, _ = expected_shifted_weights(policy, rows, width, 0.7, 0.25, "completion", "mean")
    weighted = []
    for r, (ids, start) in enumerate(rows):
        lp = token_logps(policy, ids)
        with torch.no_grad():
            lr = token_logps(ref, ids)
        weighted.append(sum(weights[r, j - 1] * (lp[j - 1] - lr[j - 1]) for j in range(start, len(ids))))
    margins = torch.stack(weighted[:B]) - torch.stack(weighted[B:])
    expected = -F.logsigmoid(beta * margins).mean()
    expected.backward()

    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert_same_grads(trainer.model, policy)
    metrics = trainer._metrics["train"]
    assert metrics["rewards/margins"][-1] == pytest.approx(beta * margins.mean().item(), abs=1e-5)


def test_sequential_kl_matches_full_logits(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    """α > 0: `kl/*` metrics, the loss and its gradients match TDPO's KL computed from full distributions."""
    beta, alpha = 0.5, 0.5
    trainer = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),
        # a chunk size that splits rows across chunks
        args=tidpo_args(tmp_path, triplet_gamma=0.0, beta=beta, tdpo_alpha=alpha, kl_chunk_size=3),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    loss = policy_step_loss(trainer, first_batch(trainer))

    policy, ref = load(model_dir), load(ref_model_dir)
    rows = text_rows(tokenizer, standard_dataset)
    width = max(len(ids) for ids, _ in rows) - 1
    weights, _ = expected_shifted_weights(policy, rows, width, 0.7, 0.25, "completion", "mean")
    weighted, kls = [], []
    for r, (ids, start) in enumerate(rows):
        lp = token_logps(policy, ids)
        with torch.no_grad():
            lr = token_logps(ref, ids)
        weighted.append(sum(weights[r, j - 1] * (lp[j - 1] - lr[j - 1]) for j in range(start, len(ids))))
        kls.append(sequential_kl_loop(policy, ref, ids, start))
    kl_chosen, kl_rejected = torch.stack(kls[:B]), torch.stack(kls[B:])
    margins = torch.stack(weighted[:B]) - torch.stack(weighted[B:]) - alpha * (kl_rejected - kl_chosen.detach())
    expected = -F.logsigmoid(beta * margins).mean()
    expected.backward()

    metrics = trainer._metrics["train"]
    assert kl_chosen.min() > 0.01  # policy and reference differ: the KL term is not trivially 0
    assert metrics["kl/chosen"][-1] == pytest.approx(kl_chosen.mean().item(), rel=1e-5, abs=1e-6)
    assert metrics["kl/rejected"][-1] == pytest.approx(kl_rejected.mean().item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert_same_grads(trainer.model, policy)


# ------------------------------------------------------------------------------------------------------------ triplet


def test_triplet_with_dataset_anchors_matches_explicit_loop(
    tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset
):
    """`triplet/dist_pos`, `triplet/dist_neg`, the loss and gradients match a loop over min(n_a, n_c) tokens."""
    beta, gamma, margin = 0.5, 0.3, 0.01
    dataset = standard_dataset.add_column("anchor", ANCHORS)
    trainer = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),
        args=tidpo_args(
            tmp_path,
            token_weighting="uniform",
            beta=beta,
            triplet_gamma=gamma,
            triplet_margin=margin,
            anchor_source="dataset",
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    anchors = [tokenize_row(tokenizer, ex["prompt"], ex["anchor"]) for ex in dataset.select(range(B))]
    for b, (ids, start) in enumerate(anchors):
        assert batch["anchor_input_ids"][b, : len(ids)].tolist() == ids
        assert batch["anchor_completion_mask"][b].sum().item() == len(ids) - start
    loss = policy_step_loss(trainer, batch)

    policy, ref = load(model_dir), load(ref_model_dir)
    rows = text_rows(tokenizer, dataset)
    chosen, rejected = rows[:B], rows[B:]
    dist_pos, dist_neg, dpo_losses = [], [], []
    for b in range(B):
        la = completion_logratios(policy, ref, *anchors[b])
        lc = completion_logratios(policy, ref, *chosen[b])
        lr = completion_logratios(policy, ref, *rejected[b])
        dist_pos.append(sum((la[t] - lc[t]) ** 2 for t in range(min(len(la), len(lc)))))
        dist_neg.append(sum((la[t] - lr[t]) ** 2 for t in range(min(len(la), len(lr)))))
        dpo_losses.append(-F.logsigmoid(beta * (lc.sum() - lr.sum())))
    dist_pos, dist_neg = torch.stack(dist_pos), torch.stack(dist_neg)
    expected = torch.stack(dpo_losses).mean() + gamma * torch.relu(dist_pos - dist_neg + margin).mean()
    expected.backward()

    metrics = trainer._metrics["train"]
    assert metrics["triplet/dist_pos"][-1] == pytest.approx(dist_pos.mean().item(), rel=1e-5, abs=1e-6)
    assert metrics["triplet/dist_neg"][-1] == pytest.approx(dist_neg.mean().item(), rel=1e-5, abs=1e-6)
    assert metrics["triplet/anchor_tokens"][-1] == pytest.approx(sum(len(ids) - start for ids, start in anchors) / B)
    assert (dist_pos - dist_neg).abs().max() > margin  # the hinge is active for some pairs, so the loss depends on it
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert_same_grads(trainer.model, policy)


def test_triplet_with_policy_anchors_trains(tmp_path, model_dir, tokenizer, standard_dataset):
    """Policy-sampled anchors: the step runs, triplet metrics are finite, anchors respect `anchor_max_new_tokens`."""
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, triplet_gamma=0.1, anchor_source="policy", anchor_max_new_tokens=3, max_steps=2),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "triplet/loss" in log]
    assert len(logs) == 2
    for log in logs:
        for key in ("triplet/loss", "triplet/dist_pos", "triplet/dist_neg", "loss"):
            assert math.isfinite(log[key]), key
        assert 1 <= log["triplet/anchor_tokens"] <= 3


# ------------------------------------------------------------------------------------------------------- data formats


def _train_and_check(trainer) -> None:
    before = clone_params(trainer.model)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(math.isfinite(x) for x in losses)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_length_one_completions(tmp_path, model_dir, tokenizer):
    """
    Completions of one token: weights are exactly 1 (n = 1), the loss is finite, training runs. An already tokenised
    dataset (`prompt_ids`/`chosen_ids`/`rejected_ids`) gives one word; as text the shortest completion is a word and
    its EOS, since an empty text completion (the EOS alone) is refused (`tests/test_dataset_checks.py`).
    """
    prompts = ["hello", "the sky is", "what", "how"]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    dataset = Dataset.from_dict({"prompt_ids": ids, "chosen_ids": [[yes]] * 4, "rejected_ids": [[no]] * 4})
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, triplet_gamma=0.1, anchor_max_new_tokens=2, max_steps=2),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    assert batch["completion_mask"].sum(dim=-1).tolist() == [1] * 2 * B
    trainer.model.train()
    weights, fallback = batch_weights(trainer, batch)
    assert not fallback.any()
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2 * B))
    assert weights.max().item() == pytest.approx(1.0)
    _train_and_check(trainer)


def test_chosen_and_rejected_of_different_lengths(tmp_path, model_dir, tokenizer):
    """Very unequal chosen/rejected lengths in one batch: weights stay on each row's own completion."""
    dataset = Dataset.from_dict(
        {
            "prompt": ["hello", "why", "what", "tell me"],
            "chosen": [" yes", " the sky is blue and green and red .", " no", " a story about a cat and a dog ."],
            "rejected": [" the cat ran fast and the dog ran slow .", " no", " maybe maybe maybe maybe", " bad"],
        }
    )
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, triplet_gamma=0.1, anchor_max_new_tokens=3, max_steps=2),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    rows = text_rows(tokenizer, dataset)
    assert_batch_matches_rows(batch, rows)
    trainer.model.train()
    weights, _ = batch_weights(trainer, batch)
    shifted_mask = batch["completion_mask"][:, 1:].bool()
    assert (weights[~shifted_mask] == 0).all()
    assert (weights[shifted_mask] > 0).all()
    lengths = torch.tensor([len(ids) - start for ids, start in rows], dtype=torch.float32)
    torch.testing.assert_close(weights.sum(dim=-1), lengths)
    _train_and_check(trainer)


def test_conversational_dataset_trains(tmp_path, model_dir, tokenizer):
    """prompt/chosen/rejected as message lists (chat template), with policy anchors sampled from the chat prompt."""
    pairs = [
        ("hello", "hello world", "bad"),
        ("what", "yes", "no maybe"),
        ("how", "slow", "fast"),
        ("why", "good", "no"),
    ]
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p, _, _ in pairs],
            "chosen": [[{"role": "assistant", "content": c}] for _, c, _ in pairs],
            "rejected": [[{"role": "assistant", "content": r}] for _, _, r in pairs],
        }
    )
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, triplet_gamma=0.1, anchor_max_new_tokens=3, max_steps=2),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert (batch["prompt_input_ids"][:, -1] == assistant).all()  # anchors are sampled after the generation prompt
    _train_and_check(trainer)


@pytest.mark.parametrize("anchor_source", ["policy", "dataset"])
def test_implicit_prompt_dataset_trains(tmp_path, model_dir, tokenizer, anchor_source):
    """Only chosen/rejected (the shared prefix is the prompt); a dataset anchor repeats the prompt too."""
    pairs = [
        ("tell me a story", " the cat ran .", " no ."),
        ("the sky is", " blue .", " red ."),
        ("hello", " hello world !", " bad"),
        ("what", " yes", " no maybe"),
    ]
    columns = {"chosen": [p + c for p, c, _ in pairs], "rejected": [p + r for p, _, r in pairs]}
    if anchor_source == "dataset":
        columns["anchor"] = [p + " good ." for p, _, _ in pairs]
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(
            tmp_path, triplet_gamma=0.1, anchor_source=anchor_source, anchor_max_new_tokens=3, max_steps=2
        ),
        train_dataset=Dataset.from_dict(columns),
        processing_class=tokenizer,
    )
    if anchor_source == "dataset":
        good, dot, eos = tokenizer.convert_tokens_to_ids(["good", ".", "<eos>"])
        assert [trainer.train_dataset[i]["anchor_ids"] for i in range(4)] == [[good, dot, eos]] * 4
    _train_and_check(trainer)
    assert any("triplet/loss" in log for log in trainer.state.log_history)


# ----------------------------------------------------------------------------------------------------------- fallback


def test_zero_attribution_falls_back_to_prior(tmp_path, model_dir, tokenizer, standard_dataset, monkeypatch, caplog):
    """All-zero attribution: every row uses the Gaussian prior alone, a metric counts them, a warning is logged."""

    def zero_attribution(target, embeddings, retain_graph):
        return torch.zeros(embeddings.shape[:2])

    monkeypatch.setattr(attribution_module, "embedding_attribution", zero_attribution)
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, triplet_gamma=0.0),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    trainer.model.train()
    weights, fallback = batch_weights(trainer, batch)
    rows = text_rows(tokenizer, standard_dataset)
    expected, expected_fallback = expected_shifted_weights(
        None, rows, weights.size(1), 0.7, 0.25, "completion", "mean", importance_fn=lambda model, ids: [0.0] * len(ids)
    )
    assert fallback.all() and all(expected_fallback)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-5)
    # the prior over a 5-token completion, scaled by n: an explicit spot check of the loop above
    ids, start = rows[0]
    n = len(ids) - start
    assert weights[0, start - 1 : start - 1 + n].tolist() == pytest.approx(
        [n * p for p in gaussian_prior_loop(n, 0.25)]
    )

    with caplog.at_level(logging.WARNING, logger="trl_tidpo.trainer.tidpo_trainer"):
        loss = policy_step_loss(trainer, batch)
    assert torch.isfinite(loss)
    assert trainer._metrics["train"]["token_weights/fallback_rows"][-1] == 2 * B
    assert any("fallback_rows" in record.getMessage() and "prior" in record.getMessage() for record in caplog.records)


# ----------------------------------------------------------------------------------------------------------- training


def test_full_fine_tuning_changes_every_parameter(tmp_path, model_dir, tokenizer, standard_dataset):
    """Three steps at lr 1e-2 (weights, triplet with policy anchors): every trainable parameter moves."""
    trainer = TIDPOTrainer(
        model=model_dir,  # the reference is re-loaded from this path
        args=tidpo_args(tmp_path, learning_rate=1e-2, max_steps=3, anchor_max_new_tokens=3),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    assert trainer.ref_model is not None
    before = clone_params(trainer.model)
    ref_before = clone_params(trainer.ref_model)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for name, param in trainer.model.named_parameters():
        assert param.requires_grad
        assert not torch.equal(param, before[name]), f"{name} did not change"
    for name, param in trainer.ref_model.named_parameters():
        assert torch.equal(param, ref_before[name]), f"reference {name} changed"


def test_lora_changes_only_adapter(tmp_path, model_dir, tokenizer, standard_dataset):
    """PEFT LoRA: every LoRA weight changes, every base weight stays (the reference is the adapter-free model)."""
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, learning_rate=1e-2, max_steps=3, anchor_max_new_tokens=3),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None
    before = clone_params(trainer.model)
    trainer.train()
    lora = [name for name, _ in trainer.model.named_parameters() if "lora_" in name]
    assert len(lora) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for name, param in trainer.model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
            assert not torch.equal(param, before[name]), f"{name} did not change"
        else:
            assert not param.requires_grad
            assert torch.equal(param, before[name]), f"base {name} changed"


# --------------------------------------------------------------------------------------------------------- evaluation


def test_evaluate_logs_tidpo_metrics_without_graph(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    """`evaluate()` logs eval_ token-weight, triplet and KL metrics; no graph and no parameter gradient is left."""
    dataset = standard_dataset.add_column("anchor", ANCHORS)
    trainer = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),
        args=tidpo_args(tmp_path, triplet_gamma=0.1, anchor_source="dataset", tdpo_alpha=0.5),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    logged = trainer.state.log_history[-1]
    for key in (
        "eval_loss",
        "eval_token_weights/mean",
        "eval_token_weights/fallback_rows",
        "eval_triplet/loss",
        "eval_kl/chosen",
        "eval_kl/rejected",
        "eval_rewards/accuracies",
    ):
        assert key in logged, key
        assert math.isfinite(logged[key]), key
    assert metrics["eval_loss"] == pytest.approx(logged["eval_loss"])
    assert logged["eval_token_weights/mean"] == pytest.approx(1.0, abs=1e-5)  # "mean" normalisation
    assert logged["eval_token_weights/fallback_rows"] == 0
    assert logged["eval_kl/chosen"] > 0
    assert all(p.grad is None for p in trainer.model.parameters())  # attribution took no parameter gradients

    batch = first_batch(trainer)
    loss, _, _ = trainer.prediction_step(trainer.model, batch, prediction_loss_only=True)
    assert loss.grad_fn is None and not loss.requires_grad
    # the attribution re-enables grad inside `no_grad`: nothing the policy pass returns may keep that graph alive
    trainer.model.eval()
    with torch.no_grad():
        output = trainer.concatenated_forward(trainer.model, batch)
    assert output.raw_importance is not None
    leaked = [key for key, value in vars(output).items() if isinstance(value, torch.Tensor) and value.grad_fn is not None]
    assert leaked == []
    assert all(p.grad is None for p in trainer.model.parameters())


# ------------------------------------------------------------------------------------------------------------- errors


def test_missing_anchor_column_is_named(tmp_path, model_dir, tokenizer, standard_dataset):
    with pytest.raises(ValueError, match=r"'anchor'.*anchor_source"):
        TIDPOTrainer(
            model=model_dir,
            args=tidpo_args(tmp_path, triplet_gamma=0.1, anchor_source="dataset"),
            train_dataset=standard_dataset,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("column", ["chosen", "rejected"])
def test_missing_preference_column_is_named(tmp_path, model_dir, tokenizer, standard_dataset, column):
    with pytest.raises(ValueError, match=rf"train_dataset.*'{column}'"):
        TIDPOTrainer(
            model=model_dir,
            args=tidpo_args(tmp_path, triplet_gamma=0.0),
            train_dataset=standard_dataset.remove_columns(column),
            processing_class=tokenizer,
        )


def test_missing_column_in_eval_dataset_is_named(tmp_path, model_dir, tokenizer, standard_dataset):
    with pytest.raises(ValueError, match=r"eval_dataset.*'rejected'"):
        TIDPOTrainer(
            model=model_dir,
            args=tidpo_args(tmp_path, triplet_gamma=0.0),
            train_dataset=standard_dataset,
            eval_dataset=standard_dataset.remove_columns("rejected"),
            processing_class=tokenizer,
        )


def test_empty_dataset_raises(tmp_path, model_dir, tokenizer):
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match=r"train_dataset.*empty"):
        TIDPOTrainer(model=model_dir, args=tidpo_args(tmp_path), train_dataset=empty, processing_class=tokenizer)


def test_dpo_config_is_refused(tmp_path, model_dir, tokenizer, standard_dataset):
    with pytest.raises(TypeError, match="TIDPOConfig"):
        TIDPOTrainer(
            model=model_dir,
            args=DPOConfig(output_dir=str(tmp_path), **CPU_ARGS),
            train_dataset=standard_dataset,
            processing_class=tokenizer,
        )


# --------------------------------------------------------------------------------------------------------- model card


def test_model_card_names_ti_dpo(tmp_path, model_dir, tokenizer, standard_dataset):
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, triplet_gamma=0.0),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    trainer.create_model_card(model_name="tiny-tidpo")
    card = (tmp_path / "README.md").read_text()
    assert "TI-DPO" in card
    assert "2505.19653" in card
    assert "Token-Importance Guided Direct Preference Optimization" in card
    assert "ti-dpo" in card  # the tag


def test_save_model_writes_model_card(tmp_path, model_dir, tokenizer, standard_dataset):
    """`save_model(folder)` puts the TI-DPO card beside the weights, so the saved folder documents its method."""
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path / "run", triplet_gamma=0.0),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").is_file()
    card = (tmp_path / "final" / "README.md").read_text()
    assert "TI-DPO" in card and "2505.19653" in card


def test_checkpoint_writes_model_card(tmp_path, model_dir, tokenizer, standard_dataset):
    """Saving a checkpoint during training writes the TI-DPO model card next to it."""
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, triplet_gamma=0.0, max_steps=1, save_strategy="steps", save_steps=1),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert (tmp_path / "checkpoint-1").is_dir()
    card = (tmp_path / "README.md").read_text()
    assert "TI-DPO" in card and "2505.19653" in card


# ------------------------------------------------------------------------------------------------------ checkpointing


def _train_weights(tmp_path, model_dir, tokenizer, dataset, **overrides) -> tuple[dict[str, torch.Tensor], bool]:
    """Weights after two steps at lr 1e-2, and whether gradient checkpointing was on in the trained model."""
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, **{"triplet_gamma": 0.0, "learning_rate": 1e-2, "max_steps": 2, **overrides}),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    return clone_params(trainer.model), trainer.model.is_gradient_checkpointing


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_same_weights(
    tmp_path, model_dir, tokenizer, standard_dataset, caplog, use_reentrant
):
    """Reentrant and non-reentrant checkpointing train to the same weights as no checkpointing."""
    plain, plain_checkpointing = _train_weights(tmp_path / "plain", model_dir, tokenizer, standard_dataset)
    with caplog.at_level(logging.WARNING, logger="trl_tidpo.trainer.tidpo_trainer"):
        checkpointed, checkpointing = _train_weights(
            tmp_path / "gc",
            model_dir,
            tokenizer,
            standard_dataset,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
        )
    assert checkpointing and not plain_checkpointing
    initial = clone_params(load(model_dir))
    for name in plain:
        assert not torch.equal(plain[name], initial[name]), f"{name} did not train"
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    warnings = [r for r in caplog.records if "use_reentrant" in r.getMessage()]
    assert len(warnings) == (1 if use_reentrant else 0)  # two steps, one warning


def _future_warnings_of_our_calls(run) -> list[str]:
    """
    The `FutureWarning`s raised while `run()` runs whose warning site, or the frame that called it, is in `trl_tidpo`
    (a deprecated transformers API warns from its own frame, so its caller is ours when we called it). pyproject's
    `filterwarnings` ignores FutureWarnings globally: here every one is shown, and its stack read.
    """
    package = os.path.dirname(os.path.abspath(trl_tidpo.__file__))
    ours = []

    def record(message, category, filename, lineno, file=None, line=None):
        stack = traceback.extract_stack()
        sites = [i for i, frame in enumerate(stack) if (frame.filename, frame.lineno) == (filename, lineno)]
        site = max(sites, default=0)
        frames = [os.path.abspath(frame.filename) for frame in stack[max(site - 1, 0) : site + 1]]
        if issubclass(category, FutureWarning) and any(path.startswith(package) for path in frames):
            ours.append(f"{message} ({stack[max(site - 1, 0)].filename}:{stack[max(site - 1, 0)].lineno})")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        run()
    return ours


def test_training_with_checkpointing_and_policy_anchors_raises_no_future_warning_of_ours(
    tmp_path, model_dir, tokenizer, standard_dataset
):
    """
    Gradient checkpointing toggled around the reference, the attribution and anchor sampling, and a checkpoint save:
    no deprecated transformers API called from our code (transformers 5.23 renamed `gradient_checkpointing_*` and
    `is_gradient_checkpointing` to `activation_checkpointing_*`; the old names warn at every call).
    """
    args = tidpo_args(
        tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, max_steps=2,
        triplet_gamma=0.1, anchor_source="policy", anchor_max_new_tokens=3, save_strategy="steps", save_steps=1,
    )  # fmt: skip

    def run():
        TIDPOTrainer(model=model_dir, args=args, train_dataset=standard_dataset, processing_class=tokenizer).train()

    assert _future_warnings_of_our_calls(run) == []
    assert (tmp_path / "checkpoint-2").is_dir()


def test_the_future_warning_probe_sees_a_deprecated_call_of_ours(model_dir, monkeypatch):
    """The probe above is not blind: our calls through the names transformers < 5.23 uses warn, and are reported."""
    model = load(model_dir)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    probe = lambda: attribution_module.uses_reentrant_checkpointing(model)  # noqa: E731
    assert _future_warnings_of_our_calls(probe) == []
    monkeypatch.setattr(checkpointing_module, "RENAMED_IN_5_23", False)
    found = _future_warnings_of_our_calls(probe)
    assert len(found) == 1 and "`is_gradient_checkpointing` is deprecated" in found[0]
    assert "trl_tidpo/modeling/checkpointing.py" in found[0]


def test_policy_anchors_keep_their_completion_under_keep_end(model_dir, tokenizer):
    """
    With `truncation_mode="keep_end"` a prompt may be as long as `max_length`: the anchor's prompt keeps its end before
    sampling, so every anchor row fits `max_length` and still has completion tokens (else the triplet distances would
    silently be 0).
    """
    from trl_tidpo.modeling.anchors import sample_policy_anchors

    torch.manual_seed(0)
    model = load(model_dir)
    prompts = [tokenizer("what should i do about a headache ?")["input_ids"], tokenizer("hello")["input_ids"]]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    max_length, new_tokens = 6, 3
    assert width > max_length  # the first prompt alone is longer than a row may be
    anchors = sample_policy_anchors(
        model,
        ids,
        mask,
        {"do_sample": True, "max_new_tokens": new_tokens},
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_length=max_length,
        truncation_mode="keep_end",
    )
    assert anchors["anchor_input_ids"].size(1) <= max_length
    assert (anchors["anchor_completion_mask"].sum(dim=-1) >= 1).all()
    # the first row's context is the prompt's end, as the collator keeps the end of chosen/rejected rows
    first = anchors["anchor_input_ids"][0][anchors["anchor_attention_mask"][0].bool()].tolist()
    kept_prompt = first[: len(first) - int(anchors["anchor_completion_mask"][0].sum())]
    assert kept_prompt == prompts[0][-(max_length - new_tokens) :]


def test_reference_importance_under_reentrant_checkpointing_does_not_warn(
    tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, caplog
):
    """With `importance_model="reference"` the attribution pass is the reference's own by design: reentrant
    checkpointing of the policy changes nothing there, so the "separate forward" warning must not fire."""
    trainer = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),
        args=TIDPOConfig(
            output_dir=str(tmp_path),
            **{**CPU_ARGS, "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
            triplet_gamma=0.0,
            importance_model="reference",
            precompute_token_weights=False,
            max_steps=1,
        ),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    with caplog.at_level(logging.WARNING, logger="trl_tidpo.trainer.tidpo_trainer"):
        trainer.train()
    assert trainer.model.is_gradient_checkpointing
    assert not [r for r in caplog.records if "use_reentrant" in r.getMessage()]


def test_prior_only_weights_skip_the_attribution(tmp_path, model_dir, tokenizer, standard_dataset, monkeypatch):
    """
    `importance_lambda=0`: the weights are the Gaussian prior alone (Eq. 8 with λ = 0), so no attribution runs: no
    `torch.autograd.grad`, no hook on the input embeddings. The weights equal the prior of each completion, by loops.
    """
    trainer = TIDPOTrainer(
        model=model_dir,
        args=TIDPOConfig(output_dir=str(tmp_path), **CPU_ARGS, triplet_gamma=0.0, importance_lambda=0.0),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    trainer.model.train()

    def no_grad_call(*args, **kwargs):
        raise AssertionError("torch.autograd.grad was called with importance_lambda=0")

    monkeypatch.setattr(torch.autograd, "grad", no_grad_call)
    embedding_hooks = []
    probe = trainer.model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: embedding_hooks.append(len(module._forward_hooks))
    )
    weights, fallback = batch_weights(trainer, batch)
    probe.remove()

    assert embedding_hooks == [1]  # one forward, and the probe was the only hook on the embeddings
    expected, _ = expected_shifted_weights(
        None, text_rows(tokenizer, standard_dataset), weights.size(1), 0.0, 0.25, "completion", "mean",
        importance_fn=lambda model, ids: [1.0] * len(ids),  # λ = 0: whatever the attribution, it weighs nothing
    )  # fmt: skip
    assert not fallback.any()
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-6)


def test_reentrant_checkpointing_scores_anchors_in_the_pairs_forward(
    tmp_path, model_dir, tokenizer, standard_dataset, monkeypatch
):
    """
    Under reentrant checkpointing the anchor rows join the chosen/rejected rows in one policy forward (a second
    checkpointed forward would reduce each parameter twice under DDP/ZeRO-3): same weights as separate forwards without
    checkpointing.
    """
    dataset = standard_dataset.add_column("anchor", ANCHORS)
    stacked = []
    original = tidpo_trainer_module.stack_anchor_rows

    def spy(*args, **kwargs):
        stacked.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tidpo_trainer_module, "stack_anchor_rows", spy)
    # plain SGD: the update is linear in the gradient (Adam's first steps are sign-like and amplify float noise)
    anchors = {"triplet_gamma": 0.1, "anchor_source": "dataset", "optim": "sgd", "learning_rate": 0.5}
    plain, _ = _train_weights(tmp_path / "plain", model_dir, tokenizer, dataset, **anchors)
    assert not stacked
    checkpointed, checkpointing = _train_weights(
        tmp_path / "gc", model_dir, tokenizer, dataset, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True}, **anchors,
    )  # fmt: skip
    assert checkpointing and len(stacked) == 2  # the policy's forward, two steps
    initial = clone_params(load(model_dir))
    for name in plain:
        assert not torch.equal(plain[name], initial[name]), f"{name} did not train"
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
