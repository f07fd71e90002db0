"""
Tests of the model-facing attribution (SPEC §2 steps 1-3, Eq. 5-6) against the model's own full logits and
row-by-row `torch.autograd.grad` w.r.t. `inputs_embeds`.
"""

from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from torch import nn
from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

from trl_tidpo.modeling.attribution import (
    attribution_target,
    capture_activations,
    embedding_attribution,
    last_attended_index,
    logit_transform,
    project_to_logits,
)
from trl_tidpo.tools.demo.tiny_models import build_tiny_llama

VOCAB = 40
LENGTHS = [7, 4, 9, 2]  # right-padded rows of different lengths


def _text_config(**kwargs):
    """A config-like object whose `get_text_config()` returns itself (as a text-only `PretrainedConfig` does)."""
    config = SimpleNamespace(model_type="test", **kwargs)
    config.get_text_config = lambda: config
    return config


def _batch(lengths=LENGTHS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)  # pad id 0
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        input_ids[r, :n] = torch.randint(4, VOCAB, (n,), generator=gen)
        attention_mask[r, :n] = 1
    return input_ids, attention_mask


def _tiny_gemma2():
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=0.5,  # small, so the soft-capping actually bends these logits
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config)


def _tiny_cohere():
    config = CohereConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        logit_scale=0.25,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    return CohereForCausalLM(config)


MODEL_BUILDERS = {
    "llama": lambda: build_tiny_llama(VOCAB, seed=0),
    "gemma2_softcap": _tiny_gemma2,
    "cohere_logit_scale": _tiny_cohere,
}


# --- logit_transform / project_to_logits -----------------------------------------------------------------------------


def test_logit_transform_defaults_to_identity():
    assert logit_transform(build_tiny_llama(VOCAB).config) == (1.0, None)


def test_logit_transform_reads_real_configs():
    assert logit_transform(Gemma2Config(final_logit_softcapping=30.0)) == (1.0, 30.0)
    assert logit_transform(CohereConfig(logit_scale=0.0625)) == (0.0625, None)


@pytest.mark.parametrize(
    ("fields", "expected_scale"),
    [
        ({"logit_scale": 0.5}, 0.5),
        ({"output_multiplier": 3.0}, 3.0),
        ({"lm_head_multiplier": 2.0}, 2.0),
        ({"logits_scaling": 4.0}, 0.25),  # Granite divides by logits_scaling
    ],
)
def test_logit_transform_scale_fields(fields, expected_scale):
    assert logit_transform(_text_config(final_logit_softcapping=None, **fields)) == (expected_scale, None)


def test_logit_transform_hyperclovax_multiplies():
    config = _text_config(logits_scaling=4.0)
    config.model_type = "hyperclovax"
    assert logit_transform(config) == (4.0, None)


def test_logit_transform_uses_text_config():
    """A multimodal config keeps its text settings in a sub-config: those are the ones that apply."""
    text = _text_config(final_logit_softcapping=7.0, logit_scale=0.3)
    outer = SimpleNamespace(final_logit_softcapping=None, logit_scale=None, get_text_config=lambda: text)
    assert logit_transform(outer) == (0.3, 7.0)


def test_project_to_logits_hand_formula():
    """z = c·tanh(s·(h Wᵀ + b) / c) with scale s = 0.5 and soft-cap c = 2, in float32."""
    torch.manual_seed(0)
    head = nn.Linear(6, 11, bias=True)
    hidden = torch.randn(5, 6) * 4  # large enough that the soft-cap is far from linear
    config = _text_config(final_logit_softcapping=2.0, logit_scale=0.5)
    expected = torch.zeros(5, 11)
    weight, bias = head.weight.detach(), head.bias.detach()
    for n in range(5):
        for v in range(11):
            raw = sum(float(hidden[n, k]) * float(weight[v, k]) for k in range(6)) + float(bias[v])
            expected[n, v] = 2.0 * torch.tanh(torch.tensor(0.5 * raw / 2.0))
    result = project_to_logits(hidden, head, config)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)
    assert result.abs().max() < 2.0


def test_project_to_logits_bf16_hidden_is_float32():
    head = nn.Linear(4, 3, bias=False)
    hidden = torch.randn(2, 4).to(torch.bfloat16)
    result = project_to_logits(hidden, head, _text_config())
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, hidden.float() @ head.weight.t(), atol=1e-6, rtol=1e-6)


class _DeviceMoves(torch.Tensor):
    """A tensor that records the device every `.to(...)` call on it asks for (None when the call names no device)."""

    moves: ClassVar[list] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            positional = [a for a in args[1:] if isinstance(a, (str, torch.device))]
            device = kwargs.get("device", positional[0] if positional else None)
            cls.moves.append(None if device is None else torch.device(device))
        return super().__torch_function__(func, types, args, kwargs)


def test_project_to_logits_moves_hidden_to_the_head_device():
    """
    Under a multi-GPU `device_map` the backbone's last layer and the LM head may sit on different devices: the hidden
    state is moved to the head's device before the product. (One CPU here, so the test checks the move asked for.)
    """
    head = nn.Linear(4, 3, bias=False)
    _DeviceMoves.moves = []
    hidden = torch.randn(2, 4).as_subclass(_DeviceMoves)
    result = project_to_logits(hidden, head, _text_config())
    assert head.weight.device in _DeviceMoves.moves
    expected = hidden.as_subclass(torch.Tensor) @ head.weight.detach().t()
    torch.testing.assert_close(result.as_subclass(torch.Tensor), expected)


def test_last_attended_index():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 0, 0, 0, 0]])
    assert last_attended_index(mask).tolist() == [2, 4, 3, 0]


# --- attribution_target against the model's own logits ---------------------------------------------------------------


@pytest.mark.parametrize("arch", list(MODEL_BUILDERS))
def test_attribution_target_is_max_of_own_logits(arch):
    model = MODEL_BUILDERS[arch]().eval()
    input_ids, attention_mask = _batch()
    with capture_activations(model) as captured:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
    target = attribution_target(captured.last_hidden, attention_mask, model.get_output_embeddings(), model.config)
    expected = torch.stack([outputs.logits[r, n - 1].float().max() for r, n in enumerate(LENGTHS)])
    torch.testing.assert_close(target, expected, atol=1e-5, rtol=1e-5)
    assert target.requires_grad


# --- embedding_attribution against row-by-row autograd ---------------------------------------------------------------


def _row_by_row_importance(model, input_ids, lengths):
    """Per row, alone and unpadded: Σ_k |∂ max_v logits[L_r, v] / ∂ inputs_embeds[j, k]| with full logits."""
    rows = []
    for r, n in enumerate(lengths):
        embeds = model.get_input_embeddings()(input_ids[r : r + 1, :n]).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=torch.ones(1, n, dtype=torch.long)).logits
        (grad,) = torch.autograd.grad(logits[0, -1].max(), embeds)
        rows.append(grad[0].abs().sum(dim=-1))
    return rows


def _batched_importance(model, input_ids, attention_mask):
    with capture_activations(model) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask)
    target = attribution_target(captured.last_hidden, attention_mask, model.get_output_embeddings(), model.config)
    return embedding_attribution(target, captured.embeddings, retain_graph=False)


@pytest.mark.parametrize("arch", list(MODEL_BUILDERS))
def test_embedding_attribution_matches_row_by_row_autograd(arch):
    model = MODEL_BUILDERS[arch]().eval()
    input_ids, attention_mask = _batch(seed=1)
    raw = _batched_importance(model, input_ids, attention_mask)
    expected = _row_by_row_importance(model, input_ids, LENGTHS)
    assert raw.shape == input_ids.shape and raw.dtype == torch.float32
    for r, n in enumerate(LENGTHS):
        torch.testing.assert_close(raw[r, :n], expected[r], atol=1e-5, rtol=1e-4)
        assert (raw[r, n:] == 0).all(), "padding after the last attended token cannot influence the target"
        assert (raw[r, :n] > 0).all()


def test_embedding_attribution_leaves_parameter_grads_alone():
    model = build_tiny_llama(VOCAB, seed=0).eval()
    input_ids, attention_mask = _batch()
    _batched_importance(model, input_ids, attention_mask)
    assert all(p.grad is None for p in model.parameters())


def test_embedding_attribution_retain_graph_allows_a_second_backward():
    model = build_tiny_llama(VOCAB, seed=0).eval()
    input_ids, attention_mask = _batch()
    with capture_activations(model) as captured:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
    target = attribution_target(captured.last_hidden, attention_mask, model.lm_head, model.config)
    embedding_attribution(target, captured.embeddings, retain_graph=True)
    outputs.logits.sum().backward()  # the loss's backward on the same graph
    assert model.lm_head.weight.grad is not None


# --- capture_activations ---------------------------------------------------------------------------------------------


def test_capture_works_with_frozen_model_and_matches_unfrozen():
    """With every parameter frozen (as the embedding is under LoRA) the hook still makes attribution possible."""
    input_ids, attention_mask = _batch(seed=2)
    model = build_tiny_llama(VOCAB, seed=0).eval()
    unfrozen = _batched_importance(model, input_ids, attention_mask)
    model.requires_grad_(False)
    assert not model.get_input_embeddings().weight.requires_grad
    with capture_activations(model) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask)
    assert captured.embeddings.requires_grad
    assert captured.embeddings.shape == (len(LENGTHS), max(LENGTHS), model.config.hidden_size)
    assert captured.last_hidden.shape == captured.embeddings.shape
    target = attribution_target(captured.last_hidden, attention_mask, model.lm_head, model.config)
    frozen = embedding_attribution(target, captured.embeddings, retain_graph=False)
    torch.testing.assert_close(frozen, unfrozen, atol=1e-6, rtol=1e-6)


def test_capture_frozen_embedding_only():
    """Only the embedding weight frozen (LoRA-like): embeddings still require grad and get attribution."""
    model = build_tiny_llama(VOCAB, seed=0).eval()
    model.get_input_embeddings().weight.requires_grad_(False)
    input_ids, attention_mask = _batch()
    raw = _batched_importance(model, input_ids, attention_mask)
    assert (raw[0, : LENGTHS[0]] > 0).all()


def _hook_counts(model):
    return len(model.get_input_embeddings()._forward_hooks), len(model.model._forward_hooks)


def test_capture_removes_hooks():
    model = build_tiny_llama(VOCAB, seed=0).eval()
    before = _hook_counts(model)
    input_ids, attention_mask = _batch()
    with capture_activations(model):
        assert _hook_counts(model) == (before[0] + 1, before[1] + 1)
        model(input_ids=input_ids, attention_mask=attention_mask)
    assert _hook_counts(model) == before
    # A later forward captures nothing into a fresh holder and leaves the output unchanged.
    model.requires_grad_(False)
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    assert not out.logits.requires_grad


def test_capture_removes_hooks_on_error():
    model = build_tiny_llama(VOCAB, seed=0).eval()
    before = _hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_activations(model):
            raise RuntimeError("boom")
    assert _hook_counts(model) == before


def test_capture_does_not_change_outputs():
    model = build_tiny_llama(VOCAB, seed=0).eval()
    input_ids, attention_mask = _batch()
    plain = model(input_ids=input_ids, attention_mask=attention_mask).logits
    with capture_activations(model) as captured:
        hooked = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(hooked, plain, atol=0, rtol=0)
    # The captured last hidden state is the one the head projects: lm_head(last_hidden) == logits.
    torch.testing.assert_close(model.lm_head(captured.last_hidden), plain, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- causal_lm_of: resolved once per wrapper


def test_causal_lm_of_resolves_each_wrapper_once_and_follows_a_new_wrapper(monkeypatch):
    """accelerate's unwrapping re-reads package metadata on each call: it runs once per wrapper object. A new PEFT
    wrapper around the same model is a new key (resolved to the base model)."""
    from peft import LoraConfig, get_peft_model

    import trl_tidpo.modeling.attribution as attribution

    calls = []
    unwrap = attribution._unwrap_causal_lm
    monkeypatch.setattr(attribution, "_unwrap_causal_lm", lambda model: calls.append(model) or unwrap(model))
    model = build_tiny_llama(VOCAB, seed=0)
    assert attribution.causal_lm_of(model) is model
    assert attribution.causal_lm_of(model) is model
    assert calls == [model]
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert attribution.causal_lm_of(peft) is model
    assert attribution.causal_lm_of(peft) is model
    assert calls == [model, peft]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_training_step_reads_no_package_metadata(tmp_path, model_dir, tokenizer, standard_dataset, monkeypatch, lora):
    """
    The per-step regression the step-cost benchmark's overhead column guards: no call into `importlib.metadata`
    (accelerate's `is_peft_model` / `unwrap_model` make ~3 each) in TI-DPO's part of a step, with attribution, policy
    anchors and, under LoRA, the reference's adapter switch. The first step may resolve; the second is counted.
    """
    import importlib.metadata

    from helpers_trainer import CPU_ARGS, first_batch
    from peft import LoraConfig

    from trl_tidpo import TIDPOConfig, TIDPOTrainer

    trainer = TIDPOTrainer(
        model=model_dir,
        args=TIDPOConfig(output_dir=str(tmp_path), **CPU_ARGS, anchor_max_new_tokens=4),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=2, target_modules=["q_proj"]) if lora else None,
    )
    batch = first_batch(trainer)
    trainer.model.train()
    trainer.get_batch_loss_metrics(trainer.model, batch)
    calls = []
    for name in ("metadata", "version", "distribution", "packages_distributions", "distributions"):
        original = getattr(importlib.metadata, name)
        monkeypatch.setattr(importlib.metadata, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    trainer.get_batch_loss_metrics(trainer.model, batch)
    assert calls == []
