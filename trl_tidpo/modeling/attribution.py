"""
The model-facing half of token importance: capture activations during the model's own forward, build the
attribution target (Eq. 5) and take one activation-only backward (Eq. 6). SPEC §2 steps 1-3.
"""

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel, is_peft_model
from torch import nn

from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from ..ops.importance import importance_from_gradients
from .checkpointing import is_checkpointing


# wrapper -> weak reference to its causal LM. Keyed by the wrapper object itself (weakly: a wrapper that is dropped
# leaves the cache), so a new wrapping (DDP, DeepSpeed, PEFT, compile) is a new key and is resolved afresh.
_CAUSAL_LM_OF: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _unwrap_causal_lm(model: nn.Module) -> nn.Module:
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    if is_peft_model(model):
        model = model.get_base_model()
    return model


def causal_lm_of(model: nn.Module) -> nn.Module:
    """
    The `*ForCausalLM` module inside a DDP/DeepSpeed/FSDP/compile/PEFT wrapping (the module whose head and backbone we
    hook, and whose `.config` is the model config).

    A `DeepSpeedEngine` forwards unknown attributes to its module, so it *has* `get_input_embeddings`, but its own
    `.config` is the DeepSpeed config dict: unwrap by type (accelerate's list of containers), never by attribute.

    Resolved once per wrapper object and cached by identity: accelerate's `extract_model_from_parallel` and
    `is_peft_model` re-read installed packages' metadata on every call (about a fifth of a small model's TI-DPO step,
    at the 4 calls a step makes). A wrapper's inner model is fixed when it is built, so the cache stays right; a new
    wrapper is a new key.
    """
    cached = _CAUSAL_LM_OF.get(model)
    lm = cached() if cached is not None else None
    if lm is None:
        lm = _unwrap_causal_lm(model)
        _CAUSAL_LM_OF[model] = weakref.ref(lm)  # weak: the value may be the key itself
    return lm


@dataclass
class CapturedActivations:
    """What `capture_activations` collected in one forward: `embeddings` `[R, T, H]`, `last_hidden` `[R, T, H]`."""

    embeddings: torch.Tensor | None = None
    last_hidden: torch.Tensor | None = None
    _handles: list = field(default_factory=list)


@contextlib.contextmanager
def capture_activations(
    model: nn.Module, embeddings: bool = True, last_hidden: bool = True
) -> Iterator[CapturedActivations]:
    """
    Hook the input-embedding layer and the backbone of `model` for the duration of the block.

    The embedding hook marks the embedding output as requiring grad, so attribution works with frozen (LoRA)
    embeddings; the backbone hook keeps the last hidden state, from which the attribution target and the sequential
    KL are computed without a `[R, T, vocab]` logits tensor. Hooks live inside the model's own forward, so PEFT, DDP
    and FSDP wrappers behave.
    """
    lm = causal_lm_of(model)
    captured = CapturedActivations()

    def on_embeddings(module, args, output):
        if torch.is_grad_enabled() and not output.requires_grad:
            output = output.requires_grad_(True)  # a leaf when the embedding matrix is frozen
        captured.embeddings = output
        return output

    def on_backbone(module, args, output):
        captured.last_hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    try:
        if embeddings:
            captured._handles.append(lm.get_input_embeddings().register_forward_hook(on_embeddings))
        if last_hidden:
            captured._handles.append(lm.base_model.register_forward_hook(on_backbone))
        yield captured
    finally:
        for handle in captured._handles:
            handle.remove()


def uses_reentrant_checkpointing(model: nn.Module) -> bool:
    """
    Whether `model` is in training mode with *reentrant* activation checkpointing, which cannot give gradients w.r.t.
    activations (`torch.autograd.grad`). Read from the checkpoint function transformers installed on the model, so it
    holds whichever argument (`gradient_checkpointing_kwargs` or `activation_checkpointing_kwargs`) set it; torch's
    `checkpoint` is reentrant when `use_reentrant` is not given.
    """
    lm = causal_lm_of(model)
    if not (is_checkpointing(lm) and lm.training):
        return False
    for module in lm.modules():
        checkpoint_func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and checkpoint_func is not None:
            return bool(getattr(checkpoint_func, "keywords", {}).get("use_reentrant", True))
    return False


def separate_attribution_reason(model: nn.Module, zero3: bool) -> str | None:
    """
    Why the policy's attribution cannot share the loss's forward (and runs in a forward of its own, without
    checkpointing: exact, at one extra forward per step), or None when it can. The message is the trainer's one-time
    warning.

    - Under DeepSpeed ZeRO-3 (`zero3`), the attribution's backward runs ZeRO-3's backward hooks, which re-partition
      the parameters that the loss's own backward (on the same retained graph) then needs.
    - Reentrant checkpointing cannot serve `autograd.grad` w.r.t. activations (`uses_reentrant_checkpointing`).
    """
    if zero3:
        return (
            "DeepSpeed ZeRO-3 re-partitions the parameters after any backward through the model, so the "
            "attribution backward cannot share the loss's graph; token importance is computed in a separate "
            "forward without checkpointing (exact, but one extra forward per step, with its parameter gathers)."
        )
    if uses_reentrant_checkpointing(model):
        return (
            "Reentrant gradient checkpointing is on (`use_reentrant=True`), which cannot give gradients w.r.t. "
            "activations; token importance is computed in a separate forward without checkpointing (exact, but "
            "one extra forward per step). Use `gradient_checkpointing_kwargs={'use_reentrant': False}` to avoid it."
        )
    return None


def logit_transform(config) -> tuple[float, float | None]:
    """
    The model's own logit scaling and final soft-capping, read from its config exactly as TRL's fused LM head does
    (`trl.trainer.utils.add_fused_lm_head`), so projected hidden states give the model's logits.

    Returns:
        `tuple[float, float | None]`: `(logit_scale, final_logit_softcapping)`.
    """
    text_config = config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else scale), softcap


def project_to_logits(hidden: torch.Tensor, lm_head: nn.Module, config) -> torch.Tensor:
    """
    Logits of `hidden` `[N, H]` through the output embedding, in float32, with the model's scaling and soft-capping.

    Returns:
        `torch.Tensor`: `[N, vocab]` float32.
    """
    if is_deepspeed_zero3_enabled():
        # ZeRO-3 keeps the head partitioned outside its own forward: call the module, whose ZeRO-3 hooks gather the
        # weight for the product and again before its backward, so that gradients (the sequential KL's) reach it
        logits = lm_head(hidden.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)).float()
    else:
        weight, bias = lm_head.weight, lm_head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        # The product is taken in the head's dtype (as the model does) and upcast after, so a bf16 head is never
        # copied to float32 whole; on the head's device too: under a multi-GPU `device_map` the backbone's last layer
        # may sit elsewhere
        logits = (hidden.to(device=weight.device, dtype=weight.dtype) @ weight.t()).float()
        if bias is not None:
            logits = logits + bias.float()
    scale, softcap = logit_transform(config)
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def last_attended_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index `L_r` of each row's last attended position; `[R, T]` -> `[R]` long."""
    positions = torch.arange(attention_mask.size(-1), device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=-1)


def attribution_target(
    last_hidden: torch.Tensor, attention_mask: torch.Tensor, lm_head: nn.Module, config
) -> torch.Tensor:
    """
    The attribution target `s_r = max_v z[r, L_r, v]` at each row's last attended position (Eq. 5).

    Only one hidden state per row goes through the output embedding.

    Args:
        last_hidden (`torch.Tensor`): `[R, T, H]` final hidden states (after the final norm).
        attention_mask (`torch.Tensor`): `[R, T]`.
        lm_head (`nn.Module`): the output embedding.
        config: the model's config (for logit scaling / soft-capping).

    Returns:
        `torch.Tensor`: `[R]` float32 targets, differentiable w.r.t. `last_hidden`.
    """
    index = last_attended_index(attention_mask)
    rows = torch.arange(last_hidden.size(0), device=last_hidden.device)
    final_hidden = last_hidden[rows, index.to(last_hidden.device)]  # [R, H]
    return project_to_logits(final_hidden, lm_head, config).amax(dim=-1)


def embedding_attribution(target: torch.Tensor, embeddings: torch.Tensor, retain_graph: bool) -> torch.Tensor:
    """
    Raw importance from one activation-only backward of `sum_r s_r` w.r.t. the embedding activations (Eq. 6).

    No parameter receives a gradient (`torch.autograd.grad` with `inputs=embeddings` only), so it neither touches
    `.grad` nor interferes with gradient accumulation.

    Args:
        target (`torch.Tensor`): `[R']` attribution targets of the rows to attribute.
        embeddings (`torch.Tensor`): `[R, T, H]` embedding activations the targets were computed from.
        retain_graph (`bool`): keep the graph for the loss's backward (training) or free it (evaluation).

    Returns:
        `torch.Tensor`: `[R, T]` float32 raw importance (rows not in `target` get whatever gradient flows to them:
        zero for independent rows).
    """
    (grads,) = torch.autograd.grad(target.sum(), embeddings, retain_graph=retain_graph)
    return importance_from_gradients(grads)


def attribute_captured(
    captured: CapturedActivations, attention_mask: torch.Tensor, lm: nn.Module, retain_graph: bool
) -> torch.Tensor:
    """
    Raw token importance `I[r, j]` (Eq. 5-6) of the first `R` rows of a forward that `capture_activations` watched:
    the target of each row at its last attended position, then one activation-only backward.

    The single attribution path of the package: the trainer calls it inside the loss's own forward (`retain_graph=True`)
    and through `attribute_in_own_forward` everywhere else (reentrant checkpointing, the reference, `token_weights`).
    Prompt-learning PEFT prepends virtual tokens to the hidden states; they are cut off before the last attended
    position is picked, so `L_r` indexes the real tokens.

    Args:
        captured: the activations of a forward over at least `R` rows.
        attention_mask (`torch.Tensor`): `[R, T]` of the rows to attribute (the real tokens).
        lm: the causal LM (`causal_lm_of(model)`), for its output embedding and config.
        retain_graph (`bool`): keep the graph for a later backward (the loss's).

    Returns:
        `torch.Tensor`: `[R, T]` float32 raw importance, attached to nothing.
    """
    rows, width = attention_mask.shape
    last_hidden = captured.last_hidden[:rows, -width:]  # [R, T, H]
    target = attribution_target(last_hidden, attention_mask, lm.get_output_embeddings(), lm.config)
    raw = embedding_attribution(target, captured.embeddings, retain_graph=retain_graph)
    return raw[:rows, -width:]


def attribute_in_own_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, forward: Callable[[], Any] | None = None
) -> torch.Tensor:
    """
    Raw token importance `[R, T]` (float32, detached) of right-padded rows, from a forward of their own.

    Args:
        model: the causal LM (a PEFT or DDP wrapping too). Dropout should be off.
        input_ids, attention_mask (`torch.Tensor`): `[R, T]`.
        forward (`Callable`, *optional*): runs the model's forward over the rows; by default the backbone alone
            (no `[R, T, vocab]` logits). The trainer passes a call of the full (PEFT-wrapped) model.
    """
    lm = causal_lm_of(model)
    if forward is None:
        def forward():
            return lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    with torch.enable_grad(), capture_activations(model) as captured:
        forward()
        raw = attribute_captured(captured, attention_mask, lm, retain_graph=False)
    return raw.detach()
