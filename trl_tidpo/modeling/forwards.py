"""
The forwards of one TI-DPO step, and the typed results they hand to the loss.

- `PairBatch` / `AnchorBatch`: the rows a forward runs over (chosen then rejected rows; anchor rows), right-padded.
- `pair_forward`: one forward of the policy or the reference over the pair rows, with the policy's raw token
  importance taken from the same forward (or from a forward of its own where the graph cannot serve it).
- `anchor_forward`: the anchor rows, scored in a forward of their own (they need no attribution, and stacking them
  with the pairs would carry them through the attribution backward: docs/benchmarks.md, "Step cost").

Per-token tensors follow TRL 1.x: on the shifted axis, entry `i` scores token `i+1`.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from .attribution import attribute_captured, attribute_in_own_forward, capture_activations, causal_lm_of


@dataclass(frozen=True)
class PairBatch:
    """The chosen rows then the rejected rows of a collated batch: `input_ids`, `attention_mask`, `completion_mask`
    `[2B, T]` (unshifted)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    @classmethod
    def from_inputs(cls, inputs: dict[str, torch.Tensor]) -> "PairBatch":
        return cls(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])


@dataclass(frozen=True)
class AnchorBatch:
    """One anchor row per pair: `input_ids`, `attention_mask`, `completion_mask` `[B, T_a]` (unshifted)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    @classmethod
    def from_inputs(cls, inputs: dict[str, torch.Tensor]) -> "AnchorBatch":
        return cls(inputs["anchor_input_ids"], inputs["anchor_attention_mask"], inputs["anchor_completion_mask"])


@dataclass
class PairForward:
    """
    One forward over the pair rows of a `PairBatch`.

    Attributes:
        per_token_logps: `[2B, T-1]` log-probs of tokens 1..T-1.
        completion_mask: `[2B, T-1]` (shifted): 1 where `per_token_logps` scores a completion token.
        attention_mask: `[2B, T]` (unshifted).
        raw_importance: `[2B, T]` float32 raw attribution (unshifted), or None when this forward computed none.
        last_hidden: `[2B, T, H]` final hidden states, kept only for the sequential KL.
        entropy, mean_logits, is_top1: `[2B, T-1]` per-token statistics for TRL's metrics (policy only).
        aux_loss: the router's auxiliary loss (MoE), or None.
        log_sum_sq_probs: `[2B, T-1]` `log Σ_v p_v²` per position, for WPO's weights (`use_weighting=True`), or None.
    """

    per_token_logps: torch.Tensor
    completion_mask: torch.Tensor
    attention_mask: torch.Tensor
    raw_importance: torch.Tensor | None = None
    last_hidden: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None

    @property
    def sequence_logps(self) -> torch.Tensor:
        """`[2B]` unweighted sums of the completion tokens' log-probs (TRL's `chosen_logps`, `rejected_logps`)."""
        return (self.per_token_logps * self.completion_mask).sum(dim=-1)

    def detached(self) -> "PairForward":
        return PairForward(**{k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})


@dataclass
class AnchorForward:
    """The anchor rows: `per_token_logps` and `completion_mask` `[B, T_a-1]` (shifted), and the `token_ids` they score
    `[B, T_a-1]` (None where only the log-probs are known, e.g. precomputed reference log-probs)."""

    per_token_logps: torch.Tensor
    completion_mask: torch.Tensor
    token_ids: torch.Tensor | None = None


def scoring_kwargs(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> dict[str, Any]:
    """Model kwargs that score the completion tokens of right-padded rows with TRL's fused LM head."""
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(completion_mask == 0, -100),
        "fused_lm_head": True,
        "use_cache": False,
    }


def attribute_rows(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, context: Callable[[], ContextManager]
) -> torch.Tensor:
    """
    Raw importance `[R, T]` of rows in a forward of their own, through the model's full (PEFT-wrapped) forward, inside
    `context()` (e.g. without gradient checkpointing; the reference adapter state). No token is scored.
    """
    labels = torch.full_like(input_ids, -100)

    def forward():
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, use_cache=False)

    with context():
        return attribute_in_own_forward(model, input_ids, attention_mask, forward=forward)


def _real_positions(forward: PairForward, batch: PairBatch) -> PairForward:
    """Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens."""
    seq_len = batch.input_ids.size(1) - 1
    for name in ("per_token_logps", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"):
        value = getattr(forward, name)
        if value is not None:
            setattr(forward, name, value[:, -seq_len:])
    if forward.last_hidden is not None:
        forward.last_hidden = forward.last_hidden[:, -batch.input_ids.size(1) :]
    return forward


def policy_pair_forward(
    model: nn.Module,
    batch: PairBatch,
    *,
    attribution: str | None,
    keep_hidden: bool,
    router_logits: bool,
    own_forward_context: Callable[[], ContextManager],
    attributed_rows: int | None = None,
) -> PairForward:
    """
    The policy's forward over the pair rows, with its raw token importance.

    Args:
        attribution (`str` or None): `"fused"`: attribute inside this forward (the embedding gradient of the target
            through the same graph, retained for the loss's backward); `"own_forward"`: in a forward of its own,
            inside `own_forward_context()` (reentrant checkpointing cannot serve `autograd.grad`); None: no importance.
        keep_hidden (`bool`): keep the last hidden state (sequential KL).
        router_logits (`bool`): ask an MoE model for its auxiliary loss.
        attributed_rows (`int`, *optional*): attribute only the first rows (the pairs of a batch stacked with its
            anchors, see `stack_anchor_rows`); all rows by default.

    Under `no_grad` (evaluation), grad is enabled for the attribution only and every output is detached.
    """
    grad_was_enabled = torch.is_grad_enabled()
    fused = attribution == "fused"
    rows = batch.input_ids.size(0) if attributed_rows is None else attributed_rows
    model_kwargs = scoring_kwargs(batch.input_ids, batch.attention_mask, batch.completion_mask)
    if router_logits:
        model_kwargs["output_router_logits"] = True
    raw_importance = None
    with (
        torch.enable_grad() if fused else contextlib.nullcontext(),
        capture_activations(model, embeddings=fused, last_hidden=fused or keep_hidden) as captured,
    ):
        outputs = model(**model_kwargs)
        if fused:
            raw_importance = attribute_captured(
                captured, batch.attention_mask[:rows], causal_lm_of(model), retain_graph=grad_was_enabled
            )
    if attribution == "own_forward":
        raw_importance = attribute_rows(model, batch.input_ids[:rows], batch.attention_mask[:rows], own_forward_context)
    forward = PairForward(
        per_token_logps=outputs.log_probs,
        completion_mask=batch.completion_mask[:, 1:],
        attention_mask=batch.attention_mask,
        raw_importance=raw_importance,
        last_hidden=captured.last_hidden if keep_hidden else None,
        entropy=outputs.entropy,
        mean_logits=outputs.mean_logits,
        is_top1=outputs.is_top1,
        aux_loss=outputs.aux_loss,
        log_sum_sq_probs=getattr(outputs, "log_sum_sq_probs", None),
    )
    if not grad_was_enabled:  # evaluation: grad was on for the attribution only
        forward = forward.detached()
    return _real_positions(forward, batch)


def reference_pair_forward(
    model: nn.Module,
    batch: PairBatch,
    *,
    attribute: bool,
    keep_hidden: bool,
    reference_mode: Callable[[], ContextManager],
    attribution_context: Callable[[], ContextManager],
) -> PairForward:
    """
    The frozen reference's forward over the pair rows, inside `reference_mode()` (no grad, no checkpointing, the
    reference adapter state); with `attribute=True` also its raw importance, in a forward of its own inside
    `attribution_context()` (`importance_model="reference"` without precomputation).
    """
    with reference_mode(), capture_activations(model, embeddings=False, last_hidden=keep_hidden) as captured:
        outputs = model(**scoring_kwargs(batch.input_ids, batch.attention_mask, batch.completion_mask))
    raw_importance = None
    if attribute:
        raw_importance = attribute_rows(model, batch.input_ids, batch.attention_mask, attribution_context)
    forward = PairForward(
        per_token_logps=outputs.log_probs,
        completion_mask=batch.completion_mask[:, 1:],
        attention_mask=batch.attention_mask,
        raw_importance=raw_importance,
        last_hidden=captured.last_hidden if keep_hidden else None,
    )
    return _real_positions(forward, batch)


def anchor_forward(
    model: nn.Module, anchors: AnchorBatch, context: Callable[[], ContextManager] = contextlib.nullcontext
) -> AnchorForward:
    """The anchor rows' per-token log-probs, in a forward of their own inside `context()` (the reference mode for the
    reference)."""
    with context():
        outputs = model(**scoring_kwargs(anchors.input_ids, anchors.attention_mask, anchors.completion_mask))
    seq_len = anchors.input_ids.size(1) - 1
    return AnchorForward(
        per_token_logps=outputs.log_probs[:, -seq_len:],  # real tokens only (prompt-learning PEFT)
        completion_mask=anchors.completion_mask[:, 1:],
        token_ids=anchors.input_ids[:, 1:],
    )


def stack_anchor_rows(batch: PairBatch, anchors: AnchorBatch, pad_token_id: int) -> PairBatch:
    """
    The pair rows then the anchor rows as one `[3B, T']` batch, right-padded to the wider of the two widths, for one
    forward. Needed under reentrant checkpointing, where each checkpointed forward accumulates its parameter gradients
    in a backward of its own: a second policy forward (the anchors') would make DDP and ZeRO-3 reduce the same
    parameters twice in one step (ZeRO-3 asserts). Split the result with `split_anchor_rows`.
    """
    width = max(batch.input_ids.size(1), anchors.input_ids.size(1))

    def stacked(pair_rows: torch.Tensor, anchor_rows: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([F.pad(t, (0, width - t.size(1)), value=value) for t in (pair_rows, anchor_rows)])

    return PairBatch(
        input_ids=stacked(batch.input_ids, anchors.input_ids, pad_token_id),
        attention_mask=stacked(batch.attention_mask, anchors.attention_mask, 0),
        completion_mask=stacked(batch.completion_mask, anchors.completion_mask, 0),
    )


def split_anchor_rows(
    stacked: PairForward, batch: PairBatch, anchors: AnchorBatch
) -> tuple[PairForward, AnchorForward]:
    """The `PairForward` of `batch` and the `AnchorForward` of `anchors` from a forward over `stack_anchor_rows`."""
    rows, width = batch.input_ids.shape
    anchor_width = anchors.input_ids.size(1)

    def pair_part(value, unshifted: bool = False):
        if value is None or value.dim() == 0:
            return value
        return value[:rows, : width if unshifted else width - 1]

    pair = PairForward(
        per_token_logps=pair_part(stacked.per_token_logps),
        completion_mask=batch.completion_mask[:, 1:],
        attention_mask=batch.attention_mask,
        raw_importance=pair_part(stacked.raw_importance, unshifted=True),
        last_hidden=pair_part(stacked.last_hidden, unshifted=True),
        entropy=pair_part(stacked.entropy),
        mean_logits=pair_part(stacked.mean_logits),
        is_top1=pair_part(stacked.is_top1),
        aux_loss=stacked.aux_loss,
        log_sum_sq_probs=pair_part(stacked.log_sum_sq_probs),
    )
    anchor = AnchorForward(
        per_token_logps=stacked.per_token_logps[rows:, : anchor_width - 1],
        completion_mask=anchors.completion_mask[:, 1:],
        token_ids=anchors.input_ids[:, 1:],
    )
    return pair, anchor


def precomputed_reference_forward(batch: PairBatch, ref_token_logps: torch.Tensor) -> PairForward:
    """
    The reference's pair forward read from the batch (`precompute_ref_log_probs=True`): `ref_token_logps` `[2B, T]`
    are the precomputed per-token log-probs aligned with `input_ids` (0 off the completion), moved to TRL's shifted
    axis (entry `i` scores token `i+1`). No model runs.
    """
    return PairForward(
        per_token_logps=ref_token_logps[:, 1:],
        completion_mask=batch.completion_mask[:, 1:],
        attention_mask=batch.attention_mask,
    )


def precomputed_anchor_forward(anchors: AnchorBatch, anchor_ref_token_logps: torch.Tensor) -> AnchorForward:
    """The reference's anchor forward read from the batch: `anchor_ref_token_logps` `[B, T_a]`, aligned with the anchor
    rows, moved to the shifted axis."""
    return AnchorForward(
        per_token_logps=anchor_ref_token_logps[:, 1:],
        completion_mask=anchors.completion_mask[:, 1:],
        token_ids=anchors.input_ids[:, 1:],
    )
