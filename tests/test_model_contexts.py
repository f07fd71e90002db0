"""
The states `trl_tidpo/trainer/model_contexts.py` runs the models in do what their names say: the reference scores
without grad and without checkpointing, attributes with grad and without checkpointing, and under PEFT without a
`ref_model` runs with the adapters off; the policy's checkpointing comes back with its own settings after each block.
"""

import pytest
import torch
from accelerate import Accelerator
from helpers_trainer import load
from peft import LoraConfig, get_peft_model
from trainer_probes import tidpo_args

from trl_tidpo.modeling.checkpointing import checkpointing_off, enable_checkpointing, is_checkpointing
from trl_tidpo.trainer.model_contexts import ModelContexts


def _checkpoint_kwargs(model) -> dict:
    """The `use_reentrant` (etc.) the model's checkpointed layers run with."""
    funcs = [m._gradient_checkpointing_func for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    return dict(funcs[0].keywords)


@pytest.fixture
def checkpointed(model_dir):
    model = load(model_dir)
    model.train()
    enable_checkpointing(model, {"use_reentrant": True})
    return model


def _contexts(tmp_path, policy, ref_model=None) -> ModelContexts:
    args = tidpo_args(tmp_path, gradient_checkpointing_kwargs={"use_reentrant": True})
    return ModelContexts(Accelerator(cpu=True), args, lambda: policy, lambda: ref_model, deepspeed=False)


def test_checkpointing_off_restores_the_settings_it_found(checkpointed):
    with checkpointing_off(checkpointed, {"use_reentrant": True}):
        assert not is_checkpointing(checkpointed)
    assert is_checkpointing(checkpointed) and _checkpoint_kwargs(checkpointed) == {"use_reentrant": True}


def test_checkpointing_off_leaves_an_unchecked_model_unchecked(model_dir):
    model = load(model_dir)
    with checkpointing_off(model, {"use_reentrant": True}):
        assert not is_checkpointing(model)
    assert not is_checkpointing(model)


def test_reference_scoring_has_no_grad_and_no_checkpointing(tmp_path, checkpointed):
    contexts = _contexts(tmp_path, checkpointed)
    with contexts.reference_scoring():
        assert not torch.is_grad_enabled() and not is_checkpointing(checkpointed)
    assert torch.is_grad_enabled() and is_checkpointing(checkpointed)


def test_reference_attribution_keeps_grad_without_checkpointing(tmp_path, checkpointed):
    contexts = _contexts(tmp_path, checkpointed)
    with contexts.reference_attribution():
        assert torch.is_grad_enabled() and not is_checkpointing(checkpointed)
    assert is_checkpointing(checkpointed) and _checkpoint_kwargs(checkpointed) == {"use_reentrant": True}


def test_reference_adapters_switch_a_peft_policy_off_only_without_a_ref_model(tmp_path, model_dir):
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(load(model_dir), config)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        adapted = policy(input_ids=ids).logits
        with policy.disable_adapter():
            base = policy(input_ids=ids).logits
    assert not torch.equal(adapted, base)
    with torch.no_grad(), _contexts(tmp_path, policy).reference_adapters():
        torch.testing.assert_close(policy(input_ids=ids).logits, base, rtol=0, atol=0)
    with torch.no_grad(), _contexts(tmp_path, policy, ref_model=load(model_dir)).reference_adapters():
        torch.testing.assert_close(policy(input_ids=ids).logits, adapted, rtol=0, atol=0)
