"""
`token_weighting="uniform"` with `triplet_gamma=0` is TRL's `DPOTrainer`, option by option: the same loss, the same
gradient of every parameter, and the same logged metrics, for every loss type and DPO option of TRL 1.16.
"""

import logging
import math

import pytest
import torch
from datasets import Dataset
from helpers_trainer import CPU_ARGS, first_batch, load
from transformers import MixtralConfig, MixtralForCausalLM
from trl import DPOConfig, DPOTrainer
from trl.trainer import dpo_trainer as dpo_trainer_module

from trl_tidpo import TIDPOConfig, TIDPOTrainer
from trl_tidpo.ops.weighted_losses import LOSS_TYPES


pytestmark = pytest.mark.usefixtures("one_thread")


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


# -------------------------------------------------------------------------------------- remaining DPOConfig options

LABEL_SMOOTHING_CASES = [
    pytest.param({"loss_type": "sigmoid", "label_smoothing": 0.2}, id="sigmoid"),  # TRL 1.16's sigmoid ignores it
    pytest.param({"loss_type": "hinge", "label_smoothing": 0.2}, id="hinge"),  # and so does hinge
    pytest.param({"loss_type": "robust", "label_smoothing": 0.3}, id="robust"),
    pytest.param({"loss_type": "exo_pair", "label_smoothing": 1e-3}, id="exo_pair"),
    pytest.param({"loss_type": "aot", "label_smoothing": 0.25}, id="aot"),
    pytest.param({"loss_type": "aot_unpaired", "label_smoothing": 0.25}, id="aot_unpaired"),
]


@pytest.mark.parametrize("options", LABEL_SMOOTHING_CASES)
def test_label_smoothing(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, options):
    dpo, tidpo = build_pair(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, options)
    assert tidpo.label_smoothing == options["label_smoothing"]
    assert_same_step(dpo, tidpo)


def test_pad_to_multiple_of(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    dpo, tidpo = build_pair(
        tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, {"pad_to_multiple_of": 16}
    )
    width = first_batch(tidpo)["input_ids"].size(1)
    assert width % 16 == 0 and width > first_batch(dpo)["attention_mask"].sum(dim=1).max()  # padding really added
    assert_same_step(dpo, tidpo)


def test_padding_free_falls_back_with_trl_warning(
    tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, caplog
):
    """TRL 1.16 disables `padding_free` with a warning and pads; TI-DPO does the same, and then trains like it."""
    with caplog.at_level(logging.WARNING):
        dpo, tidpo = build_pair(
            tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, {"padding_free": True}
        )
    warnings = [
        r.getMessage() for r in caplog.records if "`padding_free=True` is temporarily unavailable" in r.getMessage()
    ]
    assert len(warnings) == 2  # one per trainer
    assert dpo.padding_free is False and tidpo.padding_free is False
    assert_same_step(dpo, tidpo)


def test_empty_prompts_with_sigmoid(tmp_path, model_dir, ref_model_dir, tokenizer):
    """Every prompt empty (no BOS): the default loss agrees too, the first completion token unscored in both."""
    dataset = Dataset.from_dict(
        {"prompt": [""] * 4, "chosen": ["blue .", "yes", "the cat ran .", "hello world"],
         "rejected": ["red", "no maybe", "green .", "bad ."]}
    )  # fmt: skip
    dpo, tidpo = build_pair(tmp_path, model_dir, ref_model_dir, tokenizer, dataset, {"loss_type": "sigmoid"})
    assert first_batch(dpo)["completion_mask"][:, 0].all()
    assert_same_step(dpo, tidpo)


def offloading_stand_in(model):
    """What activation offloading installs, without an accelerator (TRL's needs one: on CPU both trainers fail at
    construction the same way): saved-tensor hooks that move every saved activation out and back."""

    def pack(tensor):
        SAVED_BY_HOOKS[0] += 1
        return tensor.detach().clone()

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


SAVED_BY_HOOKS = [0]


def training_step_grads(trainer, batch: dict) -> tuple[torch.Tensor, dict]:
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    loss = trainer.training_step(trainer.model, batch)  # the step that enters the offloading context
    return loss, {name: p.grad.clone() for name, p in trainer.model.named_parameters()}


def test_activation_offloading(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, monkeypatch):
    monkeypatch.setattr(dpo_trainer_module, "get_act_offloading_ctx_manager", offloading_stand_in)
    dpo, tidpo = build_pair(
        tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, {"activation_offloading": True}
    )
    assert isinstance(tidpo.maybe_activation_offload_context, torch.autograd.graph.saved_tensors_hooks)
    dpo_loss, dpo_grads = training_step_grads(dpo, first_batch(dpo))
    SAVED_BY_HOOKS[0] = 0
    tidpo_loss, tidpo_grads = training_step_grads(tidpo, first_batch(tidpo))
    assert SAVED_BY_HOOKS[0] > 0  # the hooks really saw the activations
    torch.testing.assert_close(tidpo_loss, dpo_loss, atol=1e-6, rtol=1e-5)
    for name, grad in dpo_grads.items():
        torch.testing.assert_close(
            tidpo_grads[name], grad, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert sum(int(g.abs().sum() > 0) for g in dpo_grads.values()) > 0


def test_sync_ref_model(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    """`sync_ref_model`: from the same start, 4 steps with a mix every 2 give the same losses, metrics, reference."""
    options = {
        "sync_ref_model": True, "ref_model_mixup_alpha": 0.4, "ref_model_sync_steps": 2, "max_steps": 4,
        "learning_rate": 0.05,
    }  # fmt: skip
    dpo, tidpo = build_pair(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, options)
    ref_before = {name: p.detach().clone() for name, p in dpo.ref_model.named_parameters()}
    dpo.train()
    tidpo.train()
    dpo_logs = [entry for entry in dpo.state.log_history if "loss" in entry]
    tidpo_logs = [entry for entry in tidpo.state.log_history if "loss" in entry]
    assert len(dpo_logs) == len(tidpo_logs) == 4
    for dpo_log, tidpo_log in zip(dpo_logs, tidpo_logs):
        for key, value in dpo_log.items():
            assert tidpo_log[key] == pytest.approx(value, abs=1e-6, rel=1e-5), (dpo_log["step"], key)
    assert dpo_logs[-1]["rewards/margins"] != dpo_logs[0]["rewards/margins"]
    tidpo_ref = dict(tidpo.ref_model.named_parameters())
    moved = 0
    for name, param in dpo.ref_model.named_parameters():
        torch.testing.assert_close(
            tidpo_ref[name], param, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
        moved += int(not torch.equal(param, ref_before[name]))
    assert moved == len(ref_before)  # the reference was really mixed


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory, tokenizer):
    """A tiny Mixtral (4 experts, top-2) returning its router logits, saved with the test tokenizer."""
    path = tmp_path_factory.mktemp("tiny-mixtral")
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
        output_router_logits=True, router_aux_loss_coef=0.02, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("coef", [None, 0.5], ids=["architecture-coef", "coef-0.5"])
def test_router_aux_loss_coef_on_moe(tmp_path, moe_model_dir, tokenizer, standard_dataset, coef):
    """An MoE policy: the load-balancing loss (`router_aux_loss_coef`, by default the config's own) is added to the
    loss and logged as `aux_loss`, exactly as TRL does."""
    dpo, tidpo = build_pair(
        tmp_path, moe_model_dir, moe_model_dir, tokenizer, standard_dataset, {"router_aux_loss_coef": coef}
    )
    assert tidpo.aux_loss_enabled and tidpo.router_aux_loss_coef == (0.02 if coef is None else coef)
    assert_same_step(dpo, tidpo)
    assert tidpo._metrics["train"]["aux_loss"][-1] > 0


def test_activation_offloading_keeps_ti_dpo_weights(
    tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, monkeypatch
):
    """TI-DPO's attribution (`autograd.grad` on a retained graph) under offloading hooks: the same step as without."""
    steps = {}
    SAVED_BY_HOOKS[0] = 0
    for offload in (False, True):
        if offload:
            monkeypatch.setattr(dpo_trainer_module, "get_act_offloading_ctx_manager", offloading_stand_in)
        trainer = TIDPOTrainer(
            model=model_dir,
            ref_model=load(ref_model_dir),
            args=TIDPOConfig(
                output_dir=str(tmp_path / str(offload)), triplet_gamma=0.0, activation_offloading=offload, **CPU_ARGS
            ),
            train_dataset=standard_dataset,
            processing_class=tokenizer,
        )
        steps[offload] = training_step_grads(trainer, first_batch(trainer))
        assert trainer._metrics["train"]["token_weights/std"][-1] > 0  # TI-DPO weights, not uniform
    torch.testing.assert_close(steps[True][0], steps[False][0], atol=1e-6, rtol=1e-5)
    for name, grad in steps[False][1].items():
        torch.testing.assert_close(
            steps[True][1][name], grad, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert SAVED_BY_HOOKS[0] > 0  # the hooks really saw the activations


def test_overlong_prompts_dropped_then_same_step(tmp_path, model_dir, ref_model_dir, tokenizer, caplog):
    """Pairs whose prompt fills `max_length` (keep_start): TI-DPO drops the same pairs as TRL, warns once with the
    count, and the surviving pairs (some completions truncated) give the same step."""
    dataset = Dataset.from_dict(
        {"prompt": ["hello", "what should i do about a headache the sky is blue", "why", "tell me a story", "the sky"],
         "chosen": [" good", " yes", " blue and green .", " the cat ran fast .", " blue ."],
         "rejected": [" bad", " no", " red", " no .", " green and red ."]}
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="trl_tidpo.trainer.tidpo_trainer"):
        dpo, tidpo = build_pair(tmp_path, model_dir, ref_model_dir, tokenizer, dataset, {"max_length": 6})
    dropped = [r.getMessage() for r in caplog.records if "Dropped" in r.getMessage()]
    assert len(dropped) == 1 and "Dropped 1 of the 5 pairs of the train dataset" in dropped[0]
    assert len(tidpo.train_dataset) == len(dpo.train_dataset) == 4
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert tidpo.train_dataset[column] == dpo.train_dataset[column]
    assert first_batch(dpo)["input_ids"].size(1) == 6  # completions are truncated too
    assert_same_step(dpo, tidpo)
