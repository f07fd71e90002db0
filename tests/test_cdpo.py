"""
cDPO's contrastive-estimation weights (SPEC §8): the formula by hand, the chunked probabilities and the weight columns
of tiny contrastive models against an explicit loop over positions with full logits, the options' validation, and the
trainer's `token_weighting="cdpo"` (weights as offline, cached apart from TIS-DPO's, a run that moves every parameter).
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CHAT_PAIRS, SYSTEM_PROMPTS, chat_dataset
from conftest import contrastive_model as conftest_contrastive_model
from helpers_trainer import assert_columns_close, clone_params, tokenize_row
from trainer_probes import tidpo_args

from trl_tidpo import TIDPOTrainer
from trl_tidpo.modeling.cdpo import (
    cdpo_weights,
    compute_cdpo_weight_columns,
    contrastive_estimation_logps,
    contrastive_estimation_probs,
)
from trl_tidpo.modeling.tis_dpo import compute_tis_dpo_weight_columns
from trl_tidpo.tools.demo.tiny_models import build_tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


# Tiny Llamas with a seeded, scaled-up output embedding (so that p_t spreads over (0, 1)); the conftest's
# `positive` / `negative` fixtures use this module's offset
HEAD_SEED_OFFSET = 200
contrastive_model = functools.partial(conftest_contrastive_model, head_offset=HEAD_SEED_OFFSET)


def cdpo_args(tmp_path, **overrides):
    return tidpo_args(tmp_path, **{"triplet_gamma": 0.0, "token_weighting": "cdpo", **overrides})


def cdpo_trainer(args, model_dir, tokenizer, dataset, positive, negative=None) -> TIDPOTrainer:
    """A `TIDPOTrainer` of `args` on `dataset` with the contrastive models passed as loaded models."""
    return TIDPOTrainer(
        model=model_dir,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        tis_positive_model=positive,
        tis_negative_model=negative,
    )


# ---------------------------------------------------------------------------------------------------------- loops


def probs_loop(positive, negative, ids: list[int], start: int, beta: float) -> list[float]:
    """p_t of tokens start..L-1 of one row: full [L, vocab] logits of each model, one position at a time."""
    with torch.no_grad():
        z_pos = positive(input_ids=torch.tensor([ids])).logits[0].float()
        z_neg = negative(input_ids=torch.tensor([ids])).logits[0].float()
    probs = []
    for j in range(start, len(ids)):
        combined = [(1 + beta) * float(z_pos[j - 1, v]) - beta * float(z_neg[j - 1, v]) for v in range(z_pos.size(1))]
        top = max(combined)
        total = sum(math.exp(c - top) for c in combined)
        probs.append(math.exp(combined[ids[j]] - top) / total)
    return probs


def expected_weights(positive, negative, tokenizer, dataset, beta=1.0, only_negative=True) -> dict:
    """The two weight columns by explicit loops: rejected 1 − p (its final EOS 1), chosen 1 or p."""
    columns = {"chosen_token_weights": [], "rejected_token_weights": []}
    for example in dataset:
        for side in ("chosen", "rejected"):
            ids, start = tokenize_row(tokenizer, example["prompt"], example[side])
            probs = probs_loop(positive, negative, ids, start, beta)
            if side == "rejected":
                weights = [1.0 - p for p in probs]
                assert ids[-1] == tokenizer.eos_token_id  # plain text: TRL appends the EOS
                weights[-1] = 1.0
            else:
                weights = [1.0] * len(probs) if only_negative else probs
            columns[f"{side}_token_weights"].append(weights)
    return columns


# ---------------------------------------------------------------------------------------------------------- maths


def test_contrastive_estimation_by_hand():
    """
    z⁺ = [1, 0, 0], z⁻ = [0, 0, 1], β = 1: (1+β)z⁺ − βz⁻ = [2, 0, −1]; p(y=0) = e²/(e² + 1 + e⁻¹) = 0.8438,
    p(y=2) = e⁻¹/(e² + 1 + e⁻¹) = 0.0420. β = 0 is π+'s own softmax: p(y=0) = e/(e + 2) = 0.5761.
    """
    z_pos = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    z_neg = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    probs = contrastive_estimation_logps(z_pos, z_neg, torch.tensor([0, 2]), beta=1.0).exp()
    torch.testing.assert_close(probs, torch.tensor([0.843795, 0.042010]), atol=1e-5, rtol=1e-5)
    plain = contrastive_estimation_logps(z_pos[:1], z_neg[:1], torch.tensor([0]), beta=0.0).exp()
    torch.testing.assert_close(plain, torch.tensor([0.576117]), atol=1e-5, rtol=1e-5)


def test_contrastive_estimation_ignores_a_shift_of_either_model():
    """A constant added to one model's logits at a position (e.g. log-probs for logits) leaves p_t unchanged."""
    gen = torch.Generator().manual_seed(0)
    z_pos, z_neg = torch.randn(5, 11, generator=gen), torch.randn(5, 11, generator=gen)
    targets = torch.randint(0, 11, (5,), generator=gen)
    shifted = contrastive_estimation_logps(
        F.log_softmax(z_pos, -1), z_neg + torch.randn(5, 1, generator=gen), targets, 0.7
    )
    torch.testing.assert_close(shifted, contrastive_estimation_logps(z_pos, z_neg, targets, 0.7))


def test_cdpo_weights_by_hand():
    """p = [0.1, 0.9, 0.5]: rejected 1 − p = [0.9, 0.1, 0.5]; chosen 1 (only_negative) or p."""
    probs = torch.tensor([0.1, 0.9, 0.5])
    torch.testing.assert_close(cdpo_weights(probs, chosen=False), torch.tensor([0.9, 0.1, 0.5]))
    torch.testing.assert_close(cdpo_weights(probs, chosen=True), torch.ones(3))
    torch.testing.assert_close(cdpo_weights(probs, chosen=True, only_negative=False), probs)


@pytest.mark.parametrize("chunk_size, batch_size, beta", [(1, 1, 1.0), (3, 3, 1.0), (1024, 8, 0.5)])
def test_chunked_probs_match_loop_over_positions(
    positive, negative, tokenizer, standard_dataset, chunk_size, batch_size, beta
):
    """The chunked contrastive estimation equals the explicit loop, whatever the chunk and batch sizes."""
    rows = [tokenize_row(tokenizer, ex["prompt"], ex["rejected"]) for ex in standard_dataset]
    contexts = [ids[:start] for ids, start in rows]
    completions = [ids[start:] for ids, start in rows]
    probs = contrastive_estimation_probs(
        positive, negative, contexts, contexts, completions, tokenizer.pad_token_id, beta, batch_size, chunk_size
    )
    for (ids, start), got in zip(rows, probs, strict=True):
        expected = torch.tensor(probs_loop(positive, negative, ids, start, beta))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    flat = torch.cat(probs)
    assert flat.min() < 0.01 and flat.max() > 0.1  # p is spread: the weights 1 − p are not all near 1


# ---------------------------------------------------------------------------------------------------- offline weights


@pytest.mark.parametrize("beta, only_negative", [(1.0, True), (0.5, False)])
def test_weight_columns_match_loop(positive, negative, tokenizer, standard_dataset, beta, only_negative):
    result = compute_cdpo_weight_columns(
        standard_dataset, positive, negative, tokenizer, beta=beta, only_negative=only_negative, batch_size=3
    )
    expected = expected_weights(positive, negative, tokenizer, standard_dataset, beta, only_negative)
    assert_columns_close(result, expected)
    assert all(row[-1] == 1.0 for row in result["rejected_token_weights"])  # the EOS


def test_truncated_tokens_weigh_zero(positive, negative, tokenizer, standard_dataset):
    """With max_length=9 (keep_start) the tokens past position 9 weigh 0; the kept ones are unchanged."""
    full = compute_cdpo_weight_columns(standard_dataset, positive, negative, tokenizer)
    cut = compute_cdpo_weight_columns(standard_dataset, positive, negative, tokenizer, max_length=9)
    truncated = 0
    rows = zip(standard_dataset, full["rejected_token_weights"], cut["rejected_token_weights"], strict=True)
    for example, full_row, cut_row in rows:
        ids, start = tokenize_row(tokenizer, example["prompt"], example["rejected"])
        kept = max(0, min(len(ids), 9) - start)
        truncated += kept < len(full_row)
        assert cut_row[kept:] == [0.0] * (len(full_row) - kept)
        torch.testing.assert_close(torch.tensor(cut_row[:kept]), torch.tensor(full_row[:kept]), atol=1e-6, rtol=1e-6)
    assert truncated > 0


def test_prompt_based_variant_matches_loop(positive, chat_tokenizer):
    """
    One model under two system prompts: z⁺ from π(· | sys+, x, y_<t), z⁻ from π(· | sys−, x, y_<t), each model's
    contexts rendered by the chat template; p_t by the explicit loop over the two full-logit rows.
    """
    tokenizer = chat_tokenizer
    dataset = chat_dataset(CHAT_PAIRS[:2])
    result = compute_cdpo_weight_columns(dataset, positive, None, tokenizer, system_prompts=SYSTEM_PROMPTS)
    for example, got in zip(dataset, result["rejected_token_weights"], strict=True):
        logits = []
        for system in SYSTEM_PROMPTS:
            messages = [{"role": "system", "content": system}] + example["prompt"]
            context = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages + example["rejected"], tokenize=False)
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                row = positive(input_ids=torch.tensor([ids])).logits[0].float()
            logits.append(row[len(context_ids) - 1 : len(ids) - 1])  # the positions predicting the completion
            completion = ids[len(context_ids) :]
        expected = []
        for t, token in enumerate(completion):
            combined = 2.0 * logits[0][t] - logits[1][t]
            expected.append(1.0 - float(torch.softmax(combined, -1)[token]))
        eos = max(i for i, token in enumerate(completion) if token == tokenizer.eos_token_id)
        expected[eos] = 1.0
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert any(w < 0.99 for row in result["rejected_token_weights"] for w in row)  # the prompts matter


def test_prompt_based_variant_refuses_plain_text(positive, tokenizer, standard_dataset):
    with pytest.raises(ValueError, match="prompt-based cDPO variant"):
        compute_cdpo_weight_columns(standard_dataset, positive, None, tokenizer, system_prompts=SYSTEM_PROMPTS)


def test_existing_weight_columns_are_refused(positive, negative, tokenizer, standard_dataset):
    weighted = compute_cdpo_weight_columns(standard_dataset, positive, negative, tokenizer)
    with pytest.raises(ValueError, match="already has"):
        compute_cdpo_weight_columns(weighted, positive, negative, tokenizer)


# ---------------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"cdpo_beta": -0.5}, "`cdpo_beta` must be a finite number >= 0"),
        ({"cdpo_beta": float("nan")}, "`cdpo_beta` must be a finite number >= 0"),
        ({"cdpo_beta": float("inf")}, "`cdpo_beta` must be a finite number >= 0"),
        ({"tis_transform": "rank"}, r"\['tis_transform'\] shape TIS-DPO's weights"),
        ({"tis_clamp": [-0.2, 0.4]}, r"\['tis_clamp'\] shape TIS-DPO's weights"),
        ({"tis_positive_model": "a", "tis_negative_model": "a"}, "are the same model"),
    ],
)
def test_bad_cdpo_options_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        cdpo_args(tmp_path, **overrides)


@pytest.mark.parametrize("overrides", [{"cdpo_beta": 2.0}, {"cdpo_only_negative": False}])
def test_cdpo_options_without_cdpo_are_refused(tmp_path, overrides):
    with pytest.raises(ValueError, match="only apply to `token_weighting='cdpo'`"):
        tidpo_args(tmp_path, token_weighting="tis_dpo", tis_positive_model="a", tis_negative_model="b", **overrides)


def test_cdpo_accepts_beta_zero_and_the_tis_model_paths(tmp_path):
    args = cdpo_args(tmp_path, cdpo_beta=0.0, tis_positive_model="a", tis_negative_model="b")
    assert (args.cdpo_beta, args.cdpo_only_negative) == (0.0, True)


def test_cdpo_without_two_models_is_refused(tmp_path, model_dir, tokenizer, standard_dataset, positive):
    with pytest.raises(ValueError, match="`token_weighting='cdpo'` needs two contrastive models"):
        cdpo_trainer(cdpo_args(tmp_path), model_dir, tokenizer, standard_dataset, positive)


# ---------------------------------------------------------------------------------------------------------- trainer


def count_forwards(model) -> list[int]:
    calls = [0]
    model.get_input_embeddings().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_trainer_weights_match_offline_columns_and_are_cached_apart_from_tis(
    tmp_path, model_dir, tokenizer, standard_dataset
):
    """
    `token_weighting="cdpo"` adds the offline columns; a second trainer with the same models reads them from the cache
    (no forward); TIS-DPO on the same models and data is cached under its own key (its weights differ); a new
    `cdpo_beta` recomputes.
    """
    positive, negative = contrastive_model(tokenizer, 21), contrastive_model(tokenizer, 22)
    offline = compute_cdpo_weight_columns(standard_dataset, positive, negative, tokenizer)
    calls = count_forwards(negative)

    def trainer(path, **overrides):
        args = cdpo_args(tmp_path / path, **overrides)
        return cdpo_trainer(args, model_dir, tokenizer, standard_dataset, positive, negative)

    first = trainer("first")
    assert calls[0] > 0
    for column in ("chosen_token_weights", "rejected_token_weights"):
        assert_columns_close(first.train_dataset, {column: offline[column]})
    calls[0] = 0
    trainer("second")
    assert calls[0] == 0
    tis = trainer("tis", token_weighting="tis_dpo")
    assert calls[0] > 0
    assert tis.train_dataset["rejected_token_weights"] != first.train_dataset["rejected_token_weights"]
    calls[0] = 0
    other_beta = trainer("beta", cdpo_beta=0.5)
    assert calls[0] > 0
    expected = compute_cdpo_weight_columns(standard_dataset, positive, negative, tokenizer, beta=0.5)
    assert_columns_close(other_beta.train_dataset, {"rejected_token_weights": expected["rejected_token_weights"]})


def test_cdpo_training_moves_every_parameter(tmp_path, model_dir, tokenizer, standard_dataset, positive, negative):
    args = cdpo_args(tmp_path, learning_rate=1e-2, max_steps=3, beta=0.5)
    trainer = cdpo_trainer(args, model_dir, tokenizer, standard_dataset, positive, negative)
    rejected = [w for row in trainer.train_dataset["rejected_token_weights"] for w in row]
    assert all(0.0 <= w <= 1.0 for w in rejected) and min(rejected) < 0.9
    chosen_ids = trainer.train_dataset["chosen_ids"]
    assert trainer.train_dataset["chosen_token_weights"] == [[1.0] * len(ids) for ids in chosen_ids]
    before = clone_params(trainer.model)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_cdpo_refuses_existing_weight_columns(tmp_path, model_dir, tokenizer, standard_dataset, positive, negative):
    weighted = compute_tis_dpo_weight_columns(standard_dataset, positive, negative, tokenizer)
    with pytest.raises(ValueError, match="already has token weight columns, which `token_weighting='cdpo'`"):
        cdpo_trainer(cdpo_args(tmp_path), model_dir, tokenizer, weighted, positive, negative)


def test_models_with_different_vocabularies_are_refused(positive, tokenizer, standard_dataset):
    wider = build_tiny_llama(len(tokenizer) + 8, seed=3).eval()
    with pytest.raises(ValueError, match="must share one vocabulary"):
        compute_cdpo_weight_columns(standard_dataset, positive, wider, tokenizer)
