"""`token_weighting="difference"` through the trainer, against explicit per-pair loops over the tokenised texts."""

import math

import pytest
import torch
from helpers_trainer import completion_logratios, first_batch, load, tokenize_row
from trainer_probes import tidpo_args

from trl_tidpo import TIDPOConfig, TIDPOTrainer


pytestmark = pytest.mark.usefixtures("one_thread")


def expected_difference_weights(chosen: list[int], rejected: list[int], shared_w: float, differing_w: float):
    """Explicit loop: common prefix, then common suffix in what the prefix leaves; mean-1 over each completion."""
    p = 0
    while p < min(len(chosen), len(rejected)) and chosen[p] == rejected[p]:
        p += 1
    s = 0
    while s < min(len(chosen), len(rejected)) - p and chosen[-1 - s] == rejected[-1 - s]:
        s += 1
    rows = []
    for completion in (chosen, rejected):
        n = len(completion)
        raw = [shared_w if (j < p or j >= n - s) else differing_w for j in range(n)]
        rows.append([w * n / sum(raw) for w in raw])
    return rows


def test_difference_weights_and_loss_match_explicit_loops(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    args = tidpo_args(
        tmp_path, token_weighting="difference", triplet_gamma=0.0, difference_shared_weight=0.2,
        difference_differing_weight=1.5,
    )  # fmt: skip
    trainer = TIDPOTrainer(
        model=load(model_dir), ref_model=load(ref_model_dir), args=args, train_dataset=standard_dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    batch = first_batch(trainer)
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)

    policy, ref = load(model_dir), load(ref_model_dir)
    losses = []
    for b in range(4):
        prompt, chosen, rejected = (standard_dataset[b][k] for k in ("prompt", "chosen", "rejected"))
        (c_ids, c_start), (r_ids, r_start) = tokenize_row(tokenizer, prompt, chosen), tokenize_row(tokenizer, prompt, rejected)
        w_c, w_r = expected_difference_weights(c_ids[c_start:], r_ids[r_start:], 0.2, 1.5)
        with torch.no_grad():
            l_c = completion_logratios(policy, ref, c_ids, c_start)
            l_r = completion_logratios(policy, ref, r_ids, r_start)
        margin = sum(w * x for w, x in zip(w_c, l_c.tolist())) - sum(w * x for w, x in zip(w_r, l_r.tolist()))
        losses.append(-math.log(1 / (1 + math.exp(-args.beta * margin))))
    assert loss.item() == pytest.approx(sum(losses) / 4, abs=1e-5)
    assert metrics["token_weights/mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["token_weights/fallback_rows"] == 0


def test_difference_weights_need_the_pair_token_ids(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    trainer = TIDPOTrainer(
        model=load(model_dir), ref_model=load(ref_model_dir), args=tidpo_args(tmp_path, token_weighting="difference"),
        train_dataset=standard_dataset, processing_class=tokenizer,
    )  # fmt: skip
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="pass `input_ids`"):
        trainer.compute_token_weights(None, mask, torch.ones(2, 4))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"difference_shared_weight": -1.0}, "`difference_shared_weight` must be finite and >= 0"),
        ({"difference_differing_weight": float("nan")}, "`difference_differing_weight` must be finite and >= 0"),
        ({"difference_shared_weight": 0.0, "difference_differing_weight": 0.0}, "both 0"),
    ],
)
def test_bad_difference_weights_are_refused_at_config_time(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        TIDPOConfig(output_dir=str(tmp_path), token_weighting="difference", use_cpu=True, bf16=False, **overrides)


def test_difference_training_step_runs_and_logs(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    trainer = TIDPOTrainer(
        model=load(model_dir), ref_model=load(ref_model_dir),
        args=tidpo_args(tmp_path, token_weighting="difference", max_steps=2, learning_rate=1e-3),
        train_dataset=standard_dataset, processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(math.isfinite(entry["loss"]) for entry in logged)
    assert logged[-1]["token_weights/std"] > 0  # shared and differing tokens weigh differently
