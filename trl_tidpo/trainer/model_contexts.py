"""
The states `TIDPOTrainer`'s forwards run the models in.

The reference is `ref_model`, or under PEFT without one the policy itself with its adapters switched: disabled (a new
adapter) or set to the frozen "ref" copy (a re-trained adapter). It always runs without activation checkpointing, and
either without grad (scoring: `reference_scoring`) or with it (its attribution's backward: `reference_attribution`).
"""

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import is_peft_model
from torch import nn
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import use_adapter

from ..modeling.checkpointing import checkpointing_off
from .tidpo_config import TIDPOConfig


class ModelContexts:
    """
    Context managers for the policy and the reference, built once per trainer.

    Args:
        accelerator (`Accelerator`): the trainer's.
        args (`TIDPOConfig`): reads `gradient_checkpointing_kwargs` (read at each use: TRL settles it in its init).
        policy (`Callable[[], nn.Module]`): the trainer's current `model` (Trainer replaces it under DeepSpeed).
        ref_model (`Callable[[], nn.Module | None]`): the trainer's `ref_model`: the separate reference, or None (PEFT:
            the policy's adapters switched).
        deepspeed (`bool`): whether DeepSpeed runs the policy.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        args: TIDPOConfig,
        policy: Callable[[], nn.Module],
        ref_model: Callable[[], nn.Module | None],
        deepspeed: bool,
    ):
        self.accelerator = accelerator
        self.args = args
        self.policy = policy
        self.ref_model = ref_model
        self.deepspeed = deepspeed
        self._peft_cache: tuple[weakref.ref, nn.Module | None] | None = None
        self._unwrapped_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def peft_policy(self) -> nn.Module | None:
        """
        The PEFT model under the policy's wrapping (`accelerator.unwrap_model(policy)`), or None without PEFT. Resolved
        once per policy object, not at each reference forward: accelerate's unwrapping re-reads installed packages'
        metadata on every call.
        """
        policy = self.policy()
        if self._peft_cache is None or self._peft_cache[0]() is not policy:
            unwrapped = self.accelerator.unwrap_model(policy)
            self._peft_cache = (weakref.ref(policy), unwrapped if is_peft_model(unwrapped) else None)
        return self._peft_cache[1]

    def reference_adapters(self) -> contextlib.AbstractContextManager:
        """Under PEFT without a `ref_model`: the policy's adapters disabled (new adapter) or the frozen "ref" copy
        active (re-trained); nothing otherwise. Grad and checkpointing are left as they are."""
        peft_policy = self.peft_policy() if self.ref_model() is None else None
        if peft_policy is not None:
            return use_adapter(peft_policy, adapter_name="ref" if "ref" in peft_policy.peft_config else None)
        return contextlib.nullcontext()

    def policy_without_checkpointing(self) -> contextlib.AbstractContextManager:
        """Activation checkpointing off in the policy for the block (a forward whose activations get gradients)."""
        return checkpointing_off(self.policy(), self.args.gradient_checkpointing_kwargs)

    @contextlib.contextmanager
    def reference_scoring(self) -> Iterator[None]:
        """How every reference forward that only scores runs: no grad, no checkpointing, the reference adapters."""
        with torch.no_grad(), self.policy_without_checkpointing(), self.reference_adapters():
            yield

    @contextlib.contextmanager
    def reference_attribution(self) -> Iterator[None]:
        """The reference's attribution forward: grad kept (its backward), no checkpointing, the reference adapters."""
        with self.reference_adapters(), self.policy_without_checkpointing():
            yield

    @contextlib.contextmanager
    def unwrapped_for_generation(self, model: nn.Module) -> Iterator[nn.Module]:
        """
        TRL's `unwrap_model_for_generation` (the unwrapped model, activation checkpointing off for the block), with
        the unwrapped model resolved once per wrapper object instead of twice per step (accelerate's unwrapping
        re-reads package metadata on every call). Under DeepSpeed, TRL's own, which gathers ZeRO-3's parameters.
        """
        kwargs = self.args.gradient_checkpointing_kwargs
        if self.deepspeed:
            with unwrap_model_for_generation(model, self.accelerator, gradient_checkpointing_kwargs=kwargs) as inner:
                yield inner
            return
        cached = self._unwrapped_cache.get(model)
        unwrapped = cached() if cached is not None else None
        if unwrapped is None:
            unwrapped = self.accelerator.unwrap_model(model)
            self._unwrapped_cache[model] = weakref.ref(unwrapped)
        with checkpointing_off(unwrapped, kwargs):
            yield unwrapped
