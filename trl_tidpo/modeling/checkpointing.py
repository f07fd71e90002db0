"""
Activation checkpointing switches through the installed transformers' current API: transformers 5.23 renamed
`is_gradient_checkpointing` and `gradient_checkpointing_enable`/`_disable` to `is_activation_checkpointing` and
`activation_checkpointing_enable`/`_disable`, and the old names warn (a `FutureWarning` at every call).
"""

import contextlib
from collections.abc import Iterator

import transformers
from packaging.version import Version
from torch import nn


RENAMED_IN_5_23 = Version(transformers.__version__) >= Version("5.23.0")


def is_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on in `model` (a `PreTrainedModel`, or a wrapper forwarding to one)."""
    return model.is_activation_checkpointing if RENAMED_IN_5_23 else model.is_gradient_checkpointing


def enable_checkpointing(model: nn.Module, checkpointing_kwargs: dict | None) -> None:
    """Turn activation checkpointing on; `checkpointing_kwargs` go to `torch.utils.checkpoint` (`use_reentrant`)."""
    if RENAMED_IN_5_23:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)


def disable_checkpointing(model: nn.Module) -> None:
    if RENAMED_IN_5_23:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


@contextlib.contextmanager
def checkpointing_off(model: nn.Module, checkpointing_kwargs: dict | None) -> Iterator[None]:
    """
    Activation checkpointing off for the block, back on after it (with `checkpointing_kwargs`) if it was on: TRL's
    `disable_gradient_checkpointing`, through the current API.
    """
    was_on = is_checkpointing(model)
    if was_on:
        disable_checkpointing(model)
    try:
        yield
    finally:
        if was_on:
            enable_checkpointing(model, checkpointing_kwargs)
