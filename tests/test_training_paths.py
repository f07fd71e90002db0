"""
Training paths a real run takes, on CPU: LoRA with frozen embeddings, QLoRA (bitsandbytes 4-bit NF4), gradient
checkpointing (reentrant and not) under PEFT, gradient accumulation, checkpoint/resume, bf16 autocast, an attribution
overflow, and the model card `save_model` writes. Numbers are checked against independent computations
(tests/helpers_trainer.py: full logits, `inputs_embeds` gradients, explicit loops) or against a second run that takes
another path to the same mathematics.
"""

import logging

import pytest
import torch
from conftest import ANCHORS
from trainer_probes import batch_weights, tidpo_args
from helpers_trainer import clone_params, expected_shifted_weights, first_batch, text_rows, token_logps
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import ModelConfig, get_peft_config

import trl_tidpo.modeling.attribution as attribution_module
from trl_tidpo import TIDPOTrainer
from trl_tidpo.tools.train_script import load_quantized_model


B = 4




def lora_config(**overrides) -> LoraConfig:
    # `init_lora_weights=False`: random A and B, so the adapter changes the model from step 0 and a reference that
    # wrongly kept it enabled would be caught
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    return LoraConfig(**{**kwargs, "init_lora_weights": False, **overrides})


def step_logs(trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "loss" in log and "train_loss" not in log]


# ---------------------------------------------------------------------------------------------------------- LoRA


def test_lora_reference_is_the_base_model_with_adapter_disabled(tmp_path, model_dir, tokenizer, standard_dataset):
    """Without `ref_model`, the reference log-probs are the base model's (full logits of a fresh load)."""
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, triplet_gamma=0.0),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    assert trainer.ref_model is None
    batch = first_batch(trainer)
    trainer.model.train()
    ref = trainer.concatenated_forward(trainer.model, batch, is_ref_model=True)
    policy = trainer.concatenated_forward(trainer.model, batch)

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for r, (ids, start) in enumerate(text_rows(tokenizer, standard_dataset)):
            completion = slice(start - 1, len(ids) - 1)  # entry i scores token i + 1; prompt tokens are not scored
            expected = token_logps(base, ids)[completion]
            torch.testing.assert_close(ref.per_token_logps[r, completion], expected, atol=1e-5, rtol=1e-5)
            # the adapter is active for the policy: the test can tell the two apart
            assert (policy.per_token_logps[r, completion] - expected).abs().max() > 1e-3


def test_lora_attribution_reaches_frozen_embeddings(tmp_path, model_dir, tokenizer, standard_dataset):
    """Embeddings are frozen under LoRA, yet the weights equal `inputs_embeds` gradients of the adapted model."""
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, triplet_gamma=0.0),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    assert not trainer.model.get_input_embeddings().weight.requires_grad
    batch = first_batch(trainer)
    trainer.model.train()
    weights, fallback = batch_weights(trainer, batch)

    rows = text_rows(tokenizer, standard_dataset)
    width = weights.size(1)
    expected, _ = expected_shifted_weights(trainer.model, rows, width, 0.7, 0.25, "completion", "mean")
    without_adapter, _ = expected_shifted_weights(
        AutoModelForCausalLM.from_pretrained(model_dir), rows, width, 0.7, 0.25, "completion", "mean"
    )
    assert not fallback.any()
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-4)
    assert (expected - without_adapter).abs().max() > 1e-3  # the adapter matters: attribution went through it


def test_lora_training_changes_only_adapter_weights(tmp_path, model_dir, tokenizer, standard_dataset):
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, learning_rate=1e-2, max_steps=2, triplet_gamma=0.0),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    before = clone_params(trainer.model)
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    lora = {name for name in before if "lora_" in name}
    assert len(lora) == 8  # 2 layers x (q, v) x (A, B)
    assert changed == lora
    assert any("embed_tokens" in name for name in before)


# ---------------------------------------------------------------------------------------------------------- QLoRA


def test_qlora_4bit_nf4_trains_adapters_and_keeps_quantized_weights(tmp_path, model_dir, tokenizer, standard_dataset):
    """bitsandbytes 4-bit NF4 base + `prepare_model_for_kbit_training` + LoRA on CPU: exact weights, adapters move."""
    import bitsandbytes as bnb

    model_args = ModelConfig(
        model_name_or_path=model_dir,
        dtype="float32",
        load_in_4bit=True,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
    )
    args = tidpo_args(tmp_path, learning_rate=1e-2, max_steps=2, triplet_gamma=0.0)
    model = load_quantized_model(model_args, args)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_state.quant_type == "nf4"
    assert not any(p.requires_grad for p in model.parameters())  # prepare_model_for_kbit_training froze the base
    assert model.model.norm.weight.dtype == torch.float32

    trainer = TIDPOTrainer(
        model=model,
        args=args,
        train_dataset=standard_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    batch = first_batch(trainer)
    trainer.model.train()
    weights, fallback = batch_weights(trainer, batch)
    expected, _ = expected_shifted_weights(
        trainer.model, text_rows(tokenizer, standard_dataset), weights.size(1), 0.7, 0.25, "completion", "mean"
    )
    assert not fallback.any()
    torch.testing.assert_close(weights, expected, atol=1e-4, rtol=1e-3)

    packed = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.dtype == torch.uint8}
    lora = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" in name}
    assert len(packed) == 2 * 7 and len(lora) == 8  # every linear of 2 layers is 4-bit; LoRA on q and v
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in packed.items())
    assert all(not torch.equal(params[name], value) for name, value in lora.items())
    logs = step_logs(trainer)
    assert len(logs) == 2
    assert all(torch.isfinite(torch.tensor(log["loss"])) and log["token_weights/fallback_rows"] == 0 for log in logs)


# ------------------------------------------------------------------------------------------------------ checkpointing


def rows_from_batch(inputs: dict) -> list[tuple[list[int], int]]:
    """`(ids, completion_start)` of each chosen/rejected row of a collated batch (right-padded)."""
    rows = []
    masks = zip(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"], strict=True)
    for ids, attention, completion in masks:
        rows.append((ids[attention.bool()].tolist(), int(completion.nonzero()[0])))
    return rows


def train_capturing_weights(trainer) -> list[tuple[torch.Tensor, dict]]:
    """Train, and return each step's token weights `[2B, T-1]` with the batch they were computed for."""
    captured = []
    loss_parts = trainer._loss_parts

    def spy(model, inputs):
        policy, parts = loss_parts(model, inputs)
        captured.append((parts.weights.weights, {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}))
        return policy, parts

    trainer._loss_parts = spy
    trainer.train()
    return captured


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_lora_keeps_exact_weights(
    tmp_path, model_dir, tokenizer, standard_dataset, caplog, use_reentrant
):
    """
    PEFT + checkpointing (the combination TRL makes reentrant under ZeRO-3): the token weights equal the independent
    `inputs_embeds` computation, and two steps reach the adapter weights of a run without checkpointing. Reentrant
    checkpointing attributes in a separate forward and says so once.
    """

    def build(subdir: str, **overrides) -> TIDPOTrainer:
        return TIDPOTrainer(
            model=model_dir,
            args=tidpo_args(tmp_path / subdir, triplet_gamma=0.0, learning_rate=1e-2, max_steps=2, **overrides),
            train_dataset=standard_dataset,
            processing_class=tokenizer,
            peft_config=lora_config(),
        )

    initial = build("initial")  # never trained: the model of the first step, for the independent computation
    plain = build("plain")
    checkpointed = build(
        "gc", gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
    )
    plain_steps = train_capturing_weights(plain)
    with caplog.at_level(logging.WARNING, logger="trl_tidpo.trainer.tidpo_trainer"):
        gc_steps = train_capturing_weights(checkpointed)
    assert checkpointed.model.base_model.model.is_gradient_checkpointing

    first_weights, first_batch_ = gc_steps[0]
    expected, _ = expected_shifted_weights(
        initial.model, rows_from_batch(first_batch_), first_weights.size(1), 0.7, 0.25, "completion", "mean"
    )
    torch.testing.assert_close(first_weights, expected, atol=1e-5, rtol=1e-4)
    assert len(gc_steps) == len(plain_steps) == 2
    for (gc_weights, gc_batch), (weights, batch) in zip(gc_steps, plain_steps, strict=True):
        assert torch.equal(gc_batch["input_ids"], batch["input_ids"])
        torch.testing.assert_close(gc_weights, weights, atol=1e-6, rtol=1e-5)
    plain_params = dict(plain.model.named_parameters())
    initial_params = dict(initial.model.named_parameters())
    for name, param in checkpointed.model.named_parameters():
        torch.testing.assert_close(
            param, plain_params[name], atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
        if "lora_" in name:
            assert not torch.equal(param, initial_params[name])  # trained: the comparison is not vacuous
    separate_pass_warnings = [r for r in caplog.records if "use_reentrant" in r.getMessage()]
    assert len(separate_pass_warnings) == (1 if use_reentrant else 0)


# ------------------------------------------------------------------------------------------------------- accumulation


def test_gradient_accumulation_equals_larger_batch(tmp_path, model_dir, tokenizer, standard_dataset):
    """One SGD step over 4 pairs equals 2 accumulated micro-batches of 2 (token weights and triplet loss on)."""
    dataset = standard_dataset.select(range(4)).add_column("anchor", ANCHORS[:4])

    def one_step(subdir: str, batch_size: int, accumulation: int) -> tuple[dict, dict]:
        trainer = TIDPOTrainer(
            model=model_dir,
            args=tidpo_args(
                tmp_path / subdir,
                optim="sgd",
                learning_rate=0.5,
                lr_scheduler_type="constant",
                max_grad_norm=0.0,  # no clipping: the update is exactly lr x gradient
                max_steps=1,
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
                anchor_source="dataset",
                triplet_gamma=0.5,
            ),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        before = clone_params(trainer.model)
        trainer.train()
        return before, clone_params(trainer.model)

    before, large = one_step("large", batch_size=4, accumulation=1)
    _, accumulated = one_step("accumulated", batch_size=2, accumulation=2)
    moved = 0
    for name in before:
        update, accumulated_update = large[name] - before[name], accumulated[name] - before[name]
        torch.testing.assert_close(
            accumulated_update, update, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
        moved += int(update.abs().max() > 1e-5)
    assert moved == len(before)  # every parameter moved, so the comparison is not vacuous


# ---------------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("anchor_source", ["dataset", "policy"])
def test_resume_from_checkpoint_reproduces_the_loss_trajectory(
    tmp_path, model_dir, tokenizer, standard_dataset, anchor_source
):
    """
    Four steps over 4 pairs (two epochs) with a checkpoint at step 2; resuming from it gives steps 3-4 of the full
    run. With policy anchors this holds because the checkpoint carries the RNG state the anchors are sampled with.
    """
    dataset = standard_dataset.select(range(4)).add_column("anchor", ANCHORS[:4])

    def trainer_in(subdir: str) -> TIDPOTrainer:
        return TIDPOTrainer(
            model=model_dir,
            args=tidpo_args(
                tmp_path / subdir,
                learning_rate=1e-2,
                max_steps=4,
                per_device_train_batch_size=2,
                save_strategy="steps",
                save_steps=2,
                anchor_source=anchor_source,
                anchor_max_new_tokens=4,
                triplet_gamma=0.5,
            ),
            train_dataset=dataset,
            processing_class=tokenizer,
        )

    full = trainer_in("full")
    full.train()
    resumed = trainer_in("resumed")
    # weights the checkpoint must replace: a resume that ignored it would drift from the full run
    with torch.no_grad():
        for param in resumed.model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    steps_run = []
    compute = resumed.compute_token_weights
    resumed.compute_token_weights = lambda *args, **kwargs: steps_run.append(1) or compute(*args, **kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert len(steps_run) == 2  # only steps 3-4 were computed

    full_logs, resumed_logs = step_logs(full), step_logs(resumed)
    assert [log["step"] for log in full_logs] == [1, 2, 3, 4]
    # steps 1-2 come from the checkpoint's trainer state; 3-4 were computed by the resumed run
    assert [log["step"] for log in resumed_logs] == [1, 2, 3, 4]
    assert resumed.state.global_step == 4
    for key in ("loss", "triplet/loss", "token_weights/std", "rewards/margins"):
        assert [log[key] for log in resumed_logs[2:]] == pytest.approx([log[key] for log in full_logs[2:]], rel=1e-5)
    assert len({log["loss"] for log in full_logs}) > 1  # the trajectory is not constant
    final = dict(resumed.model.named_parameters())
    for name, param in full.model.named_parameters():
        torch.testing.assert_close(final[name], param, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------- precision


def test_bf16_autocast_on_cpu_keeps_float32_attribution_and_finite_weights(
    tmp_path, model_dir, tokenizer, standard_dataset, monkeypatch
):
    """`bf16=True, use_cpu=True`: the model runs in bf16 autocast; attribution and weights stay float32 and finite."""
    raw_importance = []
    attribution = attribution_module.embedding_attribution

    def spy(target, embeddings, retain_graph):
        raw = attribution(target, embeddings, retain_graph)
        raw_importance.append(raw)
        return raw

    monkeypatch.setattr(attribution_module, "embedding_attribution", spy)
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, bf16=True, learning_rate=1e-2, max_steps=2, triplet_gamma=0.0),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    projection_dtypes = []
    trainer.model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, output: projection_dtypes.append(output.dtype)
    )
    trainer.train()
    assert projection_dtypes and set(projection_dtypes) == {torch.bfloat16}  # mixed precision really was on
    assert len(raw_importance) == 2
    for raw in raw_importance:
        assert raw.dtype == torch.float32 and torch.isfinite(raw).all() and raw.sum() > 0
    for log in step_logs(trainer):
        assert log["token_weights/fallback_rows"] == 0
        assert all(torch.isfinite(torch.tensor(log[k])) for k in ("loss", "token_weights/mean", "token_weights/max"))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_attribution_overflow_falls_back_to_prior_for_that_row(
    tmp_path, model_dir, tokenizer, standard_dataset, monkeypatch
):
    """An fp16-style overflow (inf) in one row's attribution: that row uses the prior alone and is counted; no NaN."""
    attribution = attribution_module.embedding_attribution

    def overflow_first_row(target, embeddings, retain_graph):
        raw = attribution(target, embeddings, retain_graph).clone()
        raw[0] = float("inf")  # every entry of row 0, as an fp16 overflow of its backward would give
        return raw

    monkeypatch.setattr(attribution_module, "embedding_attribution", overflow_first_row)
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, learning_rate=1e-2, max_steps=2, triplet_gamma=0.0),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    trainer.model.train()
    weights, fallback = batch_weights(trainer, batch)
    rows = text_rows(tokenizer, standard_dataset)
    prior_only, _ = expected_shifted_weights(
        None, rows, weights.size(1), 0.7, 0.25, "completion", "mean", importance_fn=lambda m, ids: [0.0] * len(ids)
    )
    assert fallback.tolist() == [True] + [False] * (2 * B - 1)
    torch.testing.assert_close(weights[0], prior_only[0], atol=1e-6, rtol=1e-5)
    assert torch.isfinite(weights).all()

    trainer.train()
    logs = step_logs(trainer)
    assert [log["token_weights/fallback_rows"] for log in logs] == [1.0, 1.0]  # one row per step
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ---------------------------------------------------------------------------------------------------------- saving


def test_save_model_writes_the_ti_dpo_model_card(tmp_path, model_dir, tokenizer, standard_dataset):
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path / "run", triplet_gamma=0.0),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    trainer.save_model(str(tmp_path / "final"))
    for folder in ("final", "run"):
        card = (tmp_path / folder / "README.md").read_text()
        assert "trained with TI-DPO" in card
        assert "https://huggingface.co/papers/2505.19653" in card
        assert "@inproceedings{yang2026tidpo" in card
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_prompt_tuning_under_reentrant_checkpointing_keeps_exact_weights(tmp_path, model_dir, tokenizer, standard_dataset):
    """
    Prompt tuning prepends virtual tokens to the hidden states. Under reentrant checkpointing the policy attributes in
    a forward of its own (`attribute_rows` -> `attribute_in_own_forward` -> `attribute_captured`), which must cut the
    virtual tokens off before picking each row's last attended position: the weights equal an independent
    `inputs_embeds` computation with the virtual tokens in front (target at position `V + L_r`).
    """
    from peft import PromptTuningConfig

    virtual = 3
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(
            tmp_path, triplet_gamma=0.0, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}
        ),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
        peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual),
    )
    # as `Trainer.train()` does before the first step
    trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    batch = first_batch(trainer)
    trainer.model.train()
    assert trainer._policy_attribution_mode(trainer.model) == "own_forward"
    weights, fallback = batch_weights(trainer, batch)

    peft_model = trainer.model
    base = peft_model.get_base_model()

    def importance_with_virtual_tokens(model, ids):
        embeds = base.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
        prompt = peft_model.get_prompt(batch_size=1).detach().to(embeds.dtype)  # [1, V, H]
        logits = base(inputs_embeds=torch.cat([prompt, embeds], dim=1), use_cache=False).logits[0]
        (grad,) = torch.autograd.grad(logits[virtual + len(ids) - 1].max(), embeds)
        return [float(grad[0, j].abs().sum()) for j in range(len(ids))]

    base.gradient_checkpointing_disable()  # the independent computation takes embedding gradients
    expected, _ = expected_shifted_weights(
        None, rows_from_batch(batch), weights.size(1), 0.7, 0.25, "completion", "mean",
        importance_fn=importance_with_virtual_tokens,
    )  # fmt: skip
    assert not fallback.any()
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-4)
