"""Shared test helpers that use the package: a CPU config, and the token weights of a batch through the trainer's own
extension points (`concatenated_forward`, `compute_token_weights`)."""

import torch
from helpers_trainer import CPU_ARGS

from trl_tidpo import TIDPOConfig


def tidpo_args(tmp_path, **overrides) -> TIDPOConfig:
    """A CPU `TIDPOConfig` for the tests (`helpers_trainer.CPU_ARGS`), writing to `tmp_path`."""
    return TIDPOConfig(output_dir=str(tmp_path), **{**CPU_ARGS, **overrides})


def batch_weights(trainer, batch: dict, forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The weights `[2B, T-1]` and fallback rows `[2B]` the trainer gives `batch`: from `forward` (a `PairForward` that
    carries raw importance) or, by default, from a fresh policy forward.
    """
    if forward is None:
        forward = trainer.concatenated_forward(trainer.model, batch)
    mixed = trainer.compute_token_weights(
        forward.raw_importance, forward.completion_mask, forward.attention_mask, batch.get("token_weights")
    )
    return mixed.weights, mixed.fallback
