"""
TIS-DPO weights (SPEC §7) and user-supplied token weights: the two transforms by hand, the weights of tiny
contrastive models against explicit full-logits loops, the trainer's one-time pass and its cache, parity of all-ones
dataset weights with TRL's DPO, the errors of bad weight columns and bad options, and an end-to-end run (π+ and π− by
DPO and reverse DPO, weights, TIS-DPO training).
"""

import functools
import gc
import html
import importlib.util
import math
import os
import weakref
from pathlib import Path

import pytest
import torch
from conftest import SYSTEM_PROMPTS, chat_dataset
from conftest import contrastive_model as conftest_contrastive_model
from datasets import Dataset
from trainer_probes import tidpo_args
from helpers_trainer import CPU_ARGS, assert_columns_close, clone_params, token_logps, tokenize_row
from trl import DPOConfig, DPOTrainer

import trl_tidpo.modeling.tis_dpo as tis_dpo_module
from trl_tidpo import TIDPOConfig, TIDPOTrainer
from trl_tidpo.modeling.tis_dpo import compute_tis_dpo_weight_columns, exp_clamp, rank_weights
from trl_tidpo.tools.visualize import weight_columns_page
from trl_tidpo.modeling.weight_columns import WEIGHT_COLUMNS


# Tiny Llamas with a seeded, scaled-up output embedding (so log-ratios reach well past the clamp bounds); the
# conftest's `positive` / `negative` fixtures use this module's offset
HEAD_SEED_OFFSET = 100
contrastive_model = functools.partial(conftest_contrastive_model, head_offset=HEAD_SEED_OFFSET)


def tis_args(tmp_path, **overrides) -> TIDPOConfig:
    """The tests' CPU config without the triplet loss (these tests are about the weights)."""
    return tidpo_args(tmp_path, **{"triplet_gamma": 0.0, **overrides})


# ---------------------------------------------------------------------------------------------------------- loops


def exp_clamp_loop(ratios: list[float], mu: float, low: float, high: float) -> list[float]:
    return [math.exp(mu * min(max(r, low), high)) for r in ratios]


def rank_loop(ratios: list[float], mu: float, ranked: list[bool]) -> list[float]:
    """The official code's rank transform: sort μ·r̂ ascending (stable), i-th of n → 0.7 + 0.6 i/(n-1); others 0."""
    values = [mu * r for r, keep in zip(ratios, ranked) if keep]
    order = sorted(range(len(values)), key=lambda k: values[k])
    scaled = [0.0] * len(values)
    for i, k in enumerate(order):
        scaled[k] = 1.0 if len(values) == 1 else 0.7 + (i / (len(values) - 1)) * 0.6
    it = iter(scaled)
    return [next(it) if keep else 0.0 for keep in ranked]


def text_log_ratios(positive, negative, tokenizer, prompt: str, completion: str) -> tuple[list[float], list[int]]:
    """r̂ of each completion token of one plain-text row from both models' full logits, and the completion ids."""
    ids, start = tokenize_row(tokenizer, prompt, completion)
    with torch.no_grad():
        lp, ln = token_logps(positive, ids), token_logps(negative, ids)
    return [float(lp[j - 1] - ln[j - 1]) for j in range(start, len(ids))], ids[start:]


def chat_log_ratios(positive, negative, tokenizer, prompt, completion) -> list[float]:
    """r̂ of one conversational row, π+ under SYSTEM_PROMPTS[0] and π− under SYSTEM_PROMPTS[1], from full logits."""
    per_model = []
    for model, system in ((positive, SYSTEM_PROMPTS[0]), (negative, SYSTEM_PROMPTS[1])):
        messages = [{"role": "system", "content": system}] + prompt
        context_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages + completion, tokenize=False)
        context = tokenizer(context_text, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        assert ids[: len(context)] == context
        with torch.no_grad():
            logps = token_logps(model, ids)
        per_model.append([float(logps[j - 1]) for j in range(len(context), len(ids))])
    return [p - n for p, n in zip(*per_model, strict=True)]


def last_token_unranked(n: int) -> list[bool]:
    """The official code's rank transform ranks every scored token of a response but its last, which weighs 0."""
    return [True] * (n - 1) + [False]


def expected_text_weights(positive, negative, tokenizer, dataset, transform="exp_clamp", clamp=(-0.5, 1.5)):
    """`{side}_token_weights` of every row of a plain-text dataset, by explicit loops."""
    columns = {"chosen_token_weights": [], "rejected_token_weights": []}
    for example in dataset:
        for side, mu in (("chosen", 1.0), ("rejected", -1.0)):
            ratios, ids = text_log_ratios(positive, negative, tokenizer, example["prompt"], example[side])
            if transform == "exp_clamp":
                weights = exp_clamp_loop(ratios, mu, *clamp)
            else:
                weights = rank_loop(ratios, mu, last_token_unranked(len(ids)))
            columns[f"{side}_token_weights"].append(weights)
    return columns


# ---------------------------------------------------------------------------------------------------------- transforms


def test_exp_clamp_by_hand():
    """
    r̂ = [-1, -0.2, 0.7, 3], (L, U) = (-0.5, 1.5): clamp → [-0.5, -0.2, 0.7, 1.5].
    Chosen (μ = +1): exp of that = [0.6065, 0.8187, 2.0138, 4.4817];
    rejected (μ = -1): exp of minus that = [1.6487, 1.2214, 0.4966, 0.2231].
    """
    ratios = torch.tensor([[-1.0, -0.2, 0.7, 3.0], [-1.0, -0.2, 0.7, 3.0]])
    weights = exp_clamp(ratios, torch.tensor([[1.0], [-1.0]]), (-0.5, 1.5))
    expected = torch.tensor(
        [[0.606531, 0.818731, 2.013753, 4.481689], [1.648721, 1.221403, 0.496585, 0.223130]]
    )
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)


def test_exp_clamp_scale_and_bounds():
    """k scales every weight; with (L, U) = (0, 0) every weight is exactly k."""
    ratios = torch.tensor([-3.0, 0.1, 5.0])
    torch.testing.assert_close(exp_clamp(ratios, 1.0, (0.0, 0.0), scale=2.5), torch.full((3,), 2.5))


def test_rank_by_hand():
    """
    r̂ = [0.3, -1.0, 2.0, 0.9 (EOS, unranked), pad]: chosen ranks of r̂ → [1, 0, 2] → [1.0, 0.7, 1.3, 0, 0];
    rejected ranks of −r̂ → [1, 2, 0] → [1.0, 1.3, 0.7, 0, 0]; a single ranked token weighs 1.0.
    """
    ratios = torch.tensor([[0.3, -1.0, 2.0, 0.9, 0.0], [0.3, -1.0, 2.0, 0.9, 0.0], [4.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    weights = rank_weights(ratios, mask, torch.tensor([[1.0], [-1.0], [1.0]]))
    expected = torch.tensor([[1.0, 0.7, 1.3, 0.0, 0.0], [1.0, 1.3, 0.7, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(weights, expected)


def test_rank_against_loop_with_ties():
    gen = torch.Generator().manual_seed(0)
    ratios = torch.randint(-3, 4, (6, 11), generator=gen).float()  # many ties: they keep their order
    mask = torch.rand(6, 11, generator=gen) > 0.3
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    weights = rank_weights(ratios, mask, signs[:, None])
    for r in range(6):
        expected = rank_loop(ratios[r].tolist(), float(signs[r]), mask[r].tolist())
        torch.testing.assert_close(weights[r], torch.tensor(expected), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- offline weights


@pytest.mark.parametrize(
    "transform, clamp", [("exp_clamp", (-0.5, 1.5)), ("exp_clamp", (-0.05, 0.02)), ("rank", (-0.5, 1.5))]
)
def test_weight_columns_match_full_logits_loop(positive, negative, tokenizer, standard_dataset, transform, clamp):
    result = compute_tis_dpo_weight_columns(
        standard_dataset, positive, negative, tokenizer, clamp=clamp, transform=transform, batch_size=3
    )
    expected = expected_text_weights(positive, negative, tokenizer, standard_dataset, transform, clamp)
    assert_columns_close(result, expected)
    assert result.column_names == standard_dataset.column_names + ["chosen_token_weights", "rejected_token_weights"]
    if transform == "exp_clamp":  # both bounds are hit on both sides, so the clamp is exercised
        flat = [
            ratio
            for example in standard_dataset
            for ratio in text_log_ratios(positive, negative, tokenizer, example["prompt"], example["chosen"])[0]
        ]
        assert min(flat) < clamp[0] and max(flat) > clamp[1]
    else:  # the last token (the EOS) weighs 0, the other tokens span [0.7, 1.3]
        for row in result["chosen_token_weights"]:
            assert row[-1] == 0.0
            if len(row) > 2:
                assert min(row[:-1]) == pytest.approx(0.7) and max(row) == pytest.approx(1.3)


def test_prompt_based_variant_matches_loop(positive, chat_tokenizer):
    """One model, two system prompts: r̂ = log π(y | sys+, x) − log π(y | sys−, x), from full logits."""
    dataset = chat_dataset()
    result = compute_tis_dpo_weight_columns(dataset, positive, None, chat_tokenizer, system_prompts=SYSTEM_PROMPTS)
    expected = {"chosen_token_weights": [], "rejected_token_weights": []}
    for example in dataset:
        for side, mu in (("chosen", 1.0), ("rejected", -1.0)):
            ratios = chat_log_ratios(positive, positive, chat_tokenizer, example["prompt"], example[side])
            expected[f"{side}_token_weights"].append(exp_clamp_loop(ratios, mu, -0.5, 1.5))
    assert_columns_close(result, expected)
    assert any(abs(w - 1.0) > 1e-3 for row in result["chosen_token_weights"] for w in row)  # the prompts matter


def test_prompt_based_variant_refuses_plain_text(positive, tokenizer, standard_dataset):
    with pytest.raises(ValueError, match="conversational"):
        compute_tis_dpo_weight_columns(standard_dataset, positive, None, tokenizer, system_prompts=SYSTEM_PROMPTS)


def test_keep_start_truncation_scores_only_kept_tokens(positive, negative, tokenizer, standard_dataset):
    """With max_length=9 the tokens past position 9 are never trained on: weight 0; the kept ones are unchanged."""
    full = compute_tis_dpo_weight_columns(standard_dataset, positive, negative, tokenizer)
    cut = compute_tis_dpo_weight_columns(standard_dataset, positive, negative, tokenizer, max_length=9)
    truncated_rows = 0
    for example, full_row, cut_row in zip(standard_dataset, full["chosen_token_weights"], cut["chosen_token_weights"]):
        ids, start = tokenize_row(tokenizer, example["prompt"], example["chosen"])
        kept = max(0, min(len(ids), 9) - start)
        truncated_rows += kept < len(full_row)
        assert len(cut_row) == len(full_row)
        assert cut_row[kept:] == [0.0] * (len(full_row) - kept)
        torch.testing.assert_close(torch.tensor(cut_row[:kept]), torch.tensor(full_row[:kept]), atol=1e-5, rtol=1e-5)
    assert truncated_rows > 0


def test_rank_ranks_an_eos_inside_the_response(positive, negative, tokenizer):
    """
    The official rank transform zeroes the last token of each response, not every EOS: an `<eos>` written inside the
    completion (`yes <eos> no` + the appended `<eos>`) is ranked like any token; only the final one weighs 0.
    """
    dataset = Dataset.from_dict(
        {"prompt": ["hello", "what"], "chosen": [" yes <eos> no", " yes"], "rejected": [" no", " no <eos> maybe"]}
    )
    result = compute_tis_dpo_weight_columns(dataset, positive, negative, tokenizer, transform="rank")
    for example, chosen, rejected in zip(dataset, result["chosen_token_weights"], result["rejected_token_weights"]):
        for side, mu, got in (("chosen", 1.0, chosen), ("rejected", -1.0, rejected)):
            ratios, ids = text_log_ratios(positive, negative, tokenizer, example["prompt"], example[side])
            expected = rank_loop(ratios, mu, last_token_unranked(len(ids)))
            torch.testing.assert_close(torch.tensor(got), torch.tensor(expected))
    assert result["chosen_token_weights"][0][1] > 0  # the EOS inside `yes <eos> no`


def test_rank_zeroes_the_last_kept_token_under_truncation(positive, negative, tokenizer, standard_dataset):
    """With `keep_start` truncation the rank transform ranks the kept tokens and zeroes the last of them (the official
    code ranks the response it trains on), whatever that token is."""
    cut = compute_tis_dpo_weight_columns(standard_dataset, positive, negative, tokenizer, transform="rank", max_length=9)
    truncated_rows = 0
    for example, got in zip(standard_dataset, cut["chosen_token_weights"]):
        ratios, ids = text_log_ratios(positive, negative, tokenizer, example["prompt"], example["chosen"])
        row, start = tokenize_row(tokenizer, example["prompt"], example["chosen"])
        kept = max(0, min(len(row), 9) - start)
        truncated_rows += kept < len(ids)
        ranked = rank_loop(ratios[:kept], 1.0, last_token_unranked(kept)) if kept else []
        expected = ranked + [0.0] * (len(ids) - kept)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-6, rtol=1e-6)
    assert truncated_rows > 0


def test_existing_weight_columns_are_refused(positive, negative, tokenizer, standard_dataset):
    with_weights = compute_tis_dpo_weight_columns(standard_dataset, positive, negative, tokenizer)
    with pytest.raises(ValueError, match="already has"):
        compute_tis_dpo_weight_columns(with_weights, positive, negative, tokenizer)


def test_weight_columns_page_shows_each_token_weight(positive, negative, tokenizer, standard_dataset):
    weighted = compute_tis_dpo_weight_columns(standard_dataset, positive, negative, tokenizer)
    page = weight_columns_page(weighted, tokenizer, indices=[0, 3])
    assert "<h2>pair 0</h2>" in page and "<h2>pair 3</h2>" in page and "<h2>pair 1</h2>" not in page
    for index in (0, 3):
        for side in ("chosen", "rejected"):
            weights = weighted[index][f"{side}_token_weights"]
            ids, start = tokenize_row(tokenizer, weighted[index]["prompt"], weighted[index][side])
            for token, weight in zip(ids[start:], weights, strict=True):
                assert f'title="weight {weight:.3f}">{html.escape(tokenizer.decode([token]))}</span>' in page


# ---------------------------------------------------------------------------------------------------------- trainer


def count_forwards(model) -> list[int]:
    """A one-element counter of `model`'s backbone forwards (its input embedding runs once per forward)."""
    calls = [0]
    model.get_input_embeddings().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def tis_trainer(tmp_path, model_dir, tokenizer, dataset, positive, negative, **overrides) -> TIDPOTrainer:
    return TIDPOTrainer(
        model=model_dir,
        args=tis_args(tmp_path, token_weighting="tis_dpo", **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        tis_positive_model=positive,
        tis_negative_model=negative,
    )


# The weight cache lives as long as the process (in-memory datasets): each test below uses models of its own seeds,
# so that no test finds another's cache.


def test_trainer_weights_match_full_logits_loop(tmp_path, model_dir, tokenizer, standard_dataset):
    positive, negative = contrastive_model(tokenizer, 11), contrastive_model(tokenizer, 12)
    trainer = tis_trainer(tmp_path, model_dir, tokenizer, standard_dataset, positive, negative)
    assert_columns_close(trainer.train_dataset, expected_text_weights(positive, negative, tokenizer, standard_dataset))


@pytest.mark.parametrize("storage", ["in_memory", "on_disk"])
def test_weight_cache_is_reused(tmp_path, model_dir, tokenizer, standard_dataset, storage):
    """
    A second trainer on the same dataset and models reads the cached columns, even with another output directory and
    learning rate: neither model runs. A dataset stored on disk keeps the cache (an Arrow file) beside its own files,
    where a later process finds it.
    """
    if storage == "on_disk":
        standard_dataset.save_to_disk(str(tmp_path / "data"))
        standard_dataset = Dataset.load_from_disk(str(tmp_path / "data"))
    seed = 13 if storage == "in_memory" else 19
    positive, negative = contrastive_model(tokenizer, seed), contrastive_model(tokenizer, seed + 1)
    calls_pos, calls_neg = count_forwards(positive), count_forwards(negative)
    first = tis_trainer(tmp_path, model_dir, tokenizer, standard_dataset, positive, negative)
    assert calls_pos[0] > 0 and calls_neg[0] > 0
    if storage == "on_disk":
        files = [f["filename"] for f in first.train_dataset.cache_files]
        weight_files = [name for name in files if Dataset.from_file(name).column_names == list(WEIGHT_COLUMNS)]
        assert [os.path.dirname(name) for name in weight_files] == [str(tmp_path / "data")]
    calls_pos[0] = calls_neg[0] = 0
    second = tis_trainer(
        tmp_path / "other", model_dir, tokenizer, standard_dataset, positive, negative, learning_rate=0.1
    )
    assert calls_pos[0] == 0 and calls_neg[0] == 0
    assert second.train_dataset["chosen_token_weights"] == first.train_dataset["chosen_token_weights"]
    assert second.train_dataset["rejected_token_weights"] == first.train_dataset["rejected_token_weights"]


@pytest.mark.parametrize("change", ["negative_model", "tis_clamp"])
def test_weight_cache_is_invalidated(tmp_path, model_dir, tokenizer, standard_dataset, change):
    """A change to π− (its parameters) or to a weight setting recomputes the columns, which then differ."""
    seed = 15 if change == "negative_model" else 17
    positive, negative = contrastive_model(tokenizer, seed), contrastive_model(tokenizer, seed + 1)
    calls_pos, calls_neg = count_forwards(positive), count_forwards(negative)
    first = tis_trainer(tmp_path, model_dir, tokenizer, standard_dataset, positive, negative)
    calls_pos[0] = calls_neg[0] = 0
    clamp = (-0.5, 1.5)
    if change == "negative_model":
        with torch.no_grad():
            negative.lm_head.weight.mul_(0.5)
    else:
        clamp = (-0.2, 0.4)
    second = tis_trainer(tmp_path, model_dir, tokenizer, standard_dataset, positive, negative, tis_clamp=list(clamp))
    assert calls_pos[0] > 0 and calls_neg[0] > 0
    assert second.train_dataset["chosen_token_weights"] != first.train_dataset["chosen_token_weights"]
    expected = expected_text_weights(positive, negative, tokenizer, standard_dataset, clamp=clamp)
    assert_columns_close(second.train_dataset, expected)


def test_trainer_prompt_based_variant_uses_reference(tmp_path, model_dir, chat_tokenizer):
    """`tis_system_prompts` without models: the frozen reference under the two system prompts."""
    reference = contrastive_model(chat_tokenizer, 3)
    trainer = TIDPOTrainer(
        model=model_dir,
        ref_model=reference,
        args=tis_args(tmp_path, token_weighting="tis_dpo", tis_system_prompts=SYSTEM_PROMPTS, tis_transform="rank"),
        train_dataset=chat_dataset(),
        processing_class=chat_tokenizer,
    )
    for index, example in enumerate(chat_dataset()):
        for side, mu in (("chosen", 1.0), ("rejected", -1.0)):
            ratios = chat_log_ratios(reference, reference, chat_tokenizer, example["prompt"], example[side])
            ids = trainer.train_dataset[index][f"{side}_ids"]
            expected = rank_loop(ratios, mu, last_token_unranked(len(ids)))
            got = trainer.train_dataset[index][f"{side}_token_weights"]
            torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-6, rtol=1e-6)


def test_prompt_based_variant_with_sync_ref_model_raises(tmp_path, model_dir, chat_tokenizer):
    """The prompt-based variant reads the reference once, before training; `sync_ref_model=True` moves it after."""
    with pytest.raises(ValueError, match="fixed TIS models"):
        TIDPOTrainer(
            model=model_dir,
            args=tidpo_args(
                tmp_path, token_weighting="tis_dpo", tis_system_prompts=SYSTEM_PROMPTS, sync_ref_model=True
            ),
            train_dataset=chat_dataset(),
            processing_class=chat_tokenizer,
        )


def test_models_loaded_from_paths_are_freed(tmp_path, model_dir, tokenizer, standard_dataset, monkeypatch):
    paths = []
    for seed in (5, 6):
        path = tmp_path / f"pi{seed}"
        contrastive_model(tokenizer, seed).save_pretrained(path)
        paths.append(str(path))
    loaded = []
    original = tis_dpo_module.create_model_from_path

    def tracking(*args, **kwargs):
        model = original(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(tis_dpo_module, "create_model_from_path", tracking)
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tis_args(
            tmp_path, token_weighting="tis_dpo", tis_positive_model=paths[0], tis_negative_model=paths[1]
        ),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    gc.collect()
    assert len(loaded) == 2  # π+ and π− (TRL loads the reference through its own import)
    assert loaded[0]() is None and loaded[1]() is None
    weights = trainer.train_dataset["chosen_token_weights"]
    assert any(abs(w - 1.0) > 1e-3 for row in weights for w in row)


def test_tis_dpo_trains_like_dataset_weights(tmp_path, model_dir, tokenizer, standard_dataset, positive, negative):
    """Same weights, same batch: `"tis_dpo"` and `"dataset"` on the offline columns give the same loss."""
    common = {"beta": 0.5, "learning_rate": 1e-2, "max_steps": 2}
    tis = TIDPOTrainer(
        model=model_dir,
        args=tis_args(tmp_path / "tis", token_weighting="tis_dpo", **common),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
        tis_positive_model=positive,
        tis_negative_model=negative,
    )
    offline = compute_tis_dpo_weight_columns(standard_dataset, positive, negative, tokenizer)
    dataset = TIDPOTrainer(
        model=model_dir,
        args=tis_args(tmp_path / "dataset", token_weighting="dataset", **common),
        train_dataset=offline,
        processing_class=tokenizer,
    )
    batches = [t.data_collator([t.train_dataset[i] for i in range(4)]) for t in (tis, dataset)]
    torch.testing.assert_close(batches[0]["token_weights"], batches[1]["token_weights"])
    losses = [t.compute_loss(t.model, b) for t, b in zip((tis, dataset), batches)]
    torch.testing.assert_close(losses[0], losses[1])
    before = clone_params(tis.model)
    tis.train()
    assert all(not torch.equal(p, before[n]) for n, p in tis.model.named_parameters())


# ---------------------------------------------------------------------------------------------------- dataset weights


def with_weight_columns(dataset: Dataset, tokenizer, fill) -> Dataset:
    """`fill(row, side, n)` weights for each completion, sized by an independent tokenisation (EOS included)."""
    columns = {"chosen_token_weights": [], "rejected_token_weights": []}
    for index, example in enumerate(dataset):
        for side in ("chosen", "rejected"):
            ids, start = tokenize_row(tokenizer, example["prompt"], example[side])
            columns[f"{side}_token_weights"].append(fill(index, side, len(ids) - start))
    return dataset.add_column("chosen_token_weights", columns["chosen_token_weights"]).add_column(
        "rejected_token_weights", columns["rejected_token_weights"]
    )


def test_all_ones_dataset_weights_give_dpo_loss(tmp_path, model_dir, tokenizer, standard_dataset):
    """`token_weighting="dataset"` with every weight 1.0 is TRL's DPO on the same batch (loss within 1e-5)."""
    reference = contrastive_model(tokenizer, 4)
    dpo = DPOTrainer(
        model=model_dir,
        ref_model=reference,
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), **CPU_ARGS, beta=0.5),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    tidpo = TIDPOTrainer(
        model=model_dir,
        ref_model=contrastive_model(tokenizer, 4),
        args=tis_args(tmp_path / "tidpo", token_weighting="dataset", beta=0.5),
        train_dataset=with_weight_columns(standard_dataset, tokenizer, lambda i, side, n: [1.0] * n),
        processing_class=tokenizer,
    )
    batches = [t.data_collator([t.train_dataset[i] for i in range(4)]) for t in (dpo, tidpo)]
    assert torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    assert torch.equal(batches[1]["token_weights"] > 0, batches[1]["completion_mask"].bool())
    losses = []
    for trainer, batch in zip((dpo, tidpo), batches):
        trainer.model.eval()
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch))
    assert losses[0].item() != pytest.approx(math.log(2), abs=1e-3)  # a non-trivial loss: the reference differs
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "fill, match",
    [
        (lambda i, side, n: [1.0] * (n + 1) if (i, side) == (2, "rejected") else [1.0] * n,
         r"row 2: `rejected_token_weights` has 4 weights but the tokenised rejected completion has 3 tokens"),
        (lambda i, side, n: [1.0] * (n - 1) + [-0.5] if (i, side) == (5, "chosen") else [1.0] * n,
         r"row 5: `chosen_token_weights` position \d+ holds float -0.5; token weights must be finite numbers >= 0"),
        (lambda i, side, n: [float("nan")] * n if i == 1 else [1.0] * n,
         r"row 1: `chosen_token_weights` position 0 holds float nan"),
        (lambda i, side, n: [float("inf")] + [1.0] * (n - 1) if (i, side) == (0, "rejected") else [1.0] * n,
         r"row 0: `rejected_token_weights` position 0 holds float inf"),
    ],
    ids=["length", "negative", "nan", "inf"],
)
def test_bad_weight_columns_fail_at_construction(tmp_path, model_dir, tokenizer, standard_dataset, fill, match):
    with pytest.raises(ValueError, match=match):
        TIDPOTrainer(
            model=model_dir,
            args=tis_args(tmp_path, token_weighting="dataset"),
            train_dataset=with_weight_columns(standard_dataset, tokenizer, fill),
            processing_class=tokenizer,
        )


def test_missing_weight_column_is_named(tmp_path, model_dir, tokenizer, standard_dataset):
    dataset = with_weight_columns(standard_dataset, tokenizer, lambda i, side, n: [1.0] * n)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected_token_weights'\]"):
        TIDPOTrainer(
            model=model_dir,
            args=tis_args(tmp_path, token_weighting="dataset"),
            train_dataset=dataset.remove_columns("rejected_token_weights"),
            processing_class=tokenizer,
        )


# ---------------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"tis_transform": "softmax"}, "`tis_transform` must be one of"),
        ({"tis_clamp": [1.0]}, "`tis_clamp` must be two finite numbers"),
        ({"tis_clamp": [0.0, float("inf")]}, "`tis_clamp` must be two finite numbers"),
        ({"tis_clamp": [1.5, -0.5]}, "needs L < U"),
        ({"tis_system_prompts": ["helpful"]}, "`tis_system_prompts` must be two non-empty strings"),
        ({"tis_system_prompts": ["same", "same"]}, "are identical"),
        ({"tis_positive_model": "a", "tis_negative_model": "a"}, "are the same model"),
    ],
)
def test_bad_tis_options_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        tis_args(tmp_path, token_weighting="tis_dpo", **overrides)


def test_tis_options_without_tis_dpo_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\['tis_positive_model'\] only apply to `token_weighting='tis_dpo'`"):
        tis_args(tmp_path, token_weighting="uniform", tis_positive_model="some/model")


def test_tis_dpo_without_models_is_refused(tmp_path, model_dir, tokenizer, standard_dataset, positive):
    with pytest.raises(ValueError, match="needs two contrastive models"):
        TIDPOTrainer(
            model=model_dir,
            args=tis_args(tmp_path, token_weighting="tis_dpo"),
            train_dataset=standard_dataset,
            processing_class=tokenizer,
            tis_positive_model=positive,
        )


def test_tis_dpo_refuses_existing_weight_columns(tmp_path, model_dir, tokenizer, standard_dataset, positive, negative):
    dataset = with_weight_columns(standard_dataset, tokenizer, lambda i, side, n: [1.0] * n)
    with pytest.raises(ValueError, match="already has token weight columns"):
        TIDPOTrainer(
            model=model_dir,
            args=tis_args(tmp_path, token_weighting="tis_dpo"),
            train_dataset=dataset,
            processing_class=tokenizer,
            tis_positive_model=positive,
            tis_negative_model=negative,
        )


# ---------------------------------------------------------------------------------------------------------- end to end


def test_end_to_end_dpo_and_reverse_dpo_then_tis_dpo(tmp_path, model_dir, tokenizer, standard_dataset):
    """
    π+ = DPO and π− = reverse DPO (chosen and rejected swapped) from the same start, with uniform weights; then TIS-DPO
    from that start. After a few steps at a high learning rate π+ prefers the chosen tokens more than π− does, so the
    average chosen weight exp(clamp(r̂)) and the average rejected weight exp(−clamp(r̂)) both exceed 1.
    """
    swapped = standard_dataset.rename_columns({"chosen": "rejected", "rejected": "chosen"})
    paths = {}
    for name, data in (("positive", standard_dataset), ("negative", swapped)):
        trainer = TIDPOTrainer(
            model=model_dir,
            args=tis_args(tmp_path / name, token_weighting="uniform", learning_rate=5e-2, max_steps=6, beta=0.5),
            train_dataset=data,
            processing_class=tokenizer,
        )
        trainer.train()
        trainer.save_model(str(tmp_path / name / "final"))
        paths[name] = str(tmp_path / name / "final")

    trainer = TIDPOTrainer(
        model=model_dir,
        args=tis_args(
            tmp_path / "tis",
            token_weighting="tis_dpo",
            tis_positive_model=paths["positive"],
            tis_negative_model=paths["negative"],
            learning_rate=1e-2,
            max_steps=3,
        ),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    chosen = [w for row in trainer.train_dataset["chosen_token_weights"] for w in row]
    rejected = [w for row in trainer.train_dataset["rejected_token_weights"] for w in row]
    assert sum(chosen) / len(chosen) > 1.0 and sum(rejected) / len(rejected) > 1.0
    assert all(math.exp(-1.5) - 1e-6 <= w <= math.exp(1.5) + 1e-6 for w in chosen + rejected)
    before = clone_params(trainer.model)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert trainer.state.log_history[0]["token_weights/mean"] != pytest.approx(1.0, abs=1e-3)


def test_example_script_runs(tmp_path):
    """examples/tis_dpo.py, two steps per run: the trainer's weights equal the offline columns it printed."""
    path = Path(__file__).resolve().parents[1] / "examples" / "tis_dpo.py"
    spec = importlib.util.spec_from_file_location("tis_dpo_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(["--output-dir", str(tmp_path), "--steps", "2", "--transform", "rank"])
    assert summary["offline_weight_gap"] < 1e-5
    assert math.isfinite(summary["training_loss"])
    assert (tmp_path / "tis_dpo" / "final" / "model.safetensors").exists()
    assert "<h2>pair 5</h2>" in (tmp_path / "tis_dpo_weights.html").read_text(encoding="utf-8")
    assert Dataset.load_from_disk(str(tmp_path / "tis_dpo_weights")).column_names[-2:] == [
        "chosen_token_weights",
        "rejected_token_weights",
    ]
