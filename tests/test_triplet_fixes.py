"""
The triplet's behaviour on on-policy pairs (SPEC §4): which anchors copy a completion (`ops.triplet.completion_copies`,
`triplet/anchor_equals_*`), the opt-in fix `triplet_skip_copy_anchors`, and the anchor-only gradient the benchmarks
test (`triplet_terms(..., gradient="anchor")`).
"""

import pytest
import torch
from trainer_probes import tidpo_args
from helpers_trainer import first_batch, load

from trl_tidpo import TIDPOConfig, TIDPOTrainer
from trl_tidpo.modeling.forwards import AnchorForward, PairForward
from trl_tidpo.ops.triplet import completion_copies
from trl_tidpo.trainer.triplet_terms import triplet_terms

pytestmark = pytest.mark.usefixtures("one_thread")


def copies_loop(a_ids, a_mask, o_ids, o_mask) -> list[bool]:
    """The completion tokens of each row, read one by one, compared as lists."""
    out = []
    for b in range(a_ids.size(0)):
        a = [int(t) for t, m in zip(a_ids[b], a_mask[b]) if m]
        o = [int(t) for t, m in zip(o_ids[b], o_mask[b]) if m]
        out.append(a == o)
    return out


def test_completion_copies_matches_list_comparison():
    """Same tokens at other offsets and widths count as copies; a prefix, a longer row or one changed token does not."""
    a_ids = torch.tensor([[9, 5, 6, 7, 0], [9, 5, 6, 0, 0], [9, 5, 6, 7, 0], [9, 9, 0, 0, 0], [9, 0, 0, 0, 0]])
    a_mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    o_ids = torch.tensor([[8, 8, 5, 6, 7, 0], [8, 5, 6, 7, 0, 0], [8, 5, 6, 4, 0, 0], [8, 0, 0, 0, 0, 0], [8, 8, 9, 0, 0, 0]])
    o_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]])
    # row 4: the anchor's completion is token 0 ... compare against the other's token 9: differ
    expected = copies_loop(a_ids, a_mask, o_ids, o_mask)
    assert expected == [True, False, False, True, False]
    assert completion_copies(a_ids, a_mask, o_ids, o_mask).tolist() == expected


def toy_forwards(anchor_rows: torch.Tensor, seed: int = 0):
    """Pair and anchor forwards over B=2 pairs of 4 completion positions; `anchor_rows` `[2, 5]` are anchor token ids."""
    g = torch.Generator().manual_seed(seed)
    pair_ids = torch.tensor([[1, 2, 3, 4, 5], [1, 6, 7, 8, 9], [1, 2, 3, 4, 6], [1, 6, 7, 1, 1]])  # chosen x2, rejected x2
    mask = torch.tensor([[1, 1, 1, 1]] * 4)
    policy = PairForward(torch.randn(4, 4, generator=g).requires_grad_(), mask, torch.ones(4, 5))
    ref = PairForward(torch.randn(4, 4, generator=g), mask, torch.ones(4, 5))
    a_logps = torch.randn(2, 4, generator=g).requires_grad_()
    anchor = AnchorForward(a_logps, torch.ones(2, 4), anchor_rows[:, 1:])
    ref_anchor = AnchorForward(torch.randn(2, 4, generator=g), torch.ones(2, 4), anchor_rows[:, 1:])
    return policy, ref, anchor, ref_anchor, pair_ids


def test_copy_anchors_are_flagged_and_skipped():
    """Pair 0's anchor copies its rejected completion, pair 1's copies nothing: only pair 0 is skipped, with loss 0 and
    no gradient, and pair 1's loss is the paper's."""
    anchors = torch.tensor([[1, 2, 3, 4, 6], [1, 6, 7, 8, 2]])
    policy, ref, anchor, ref_anchor, ids = toy_forwards(anchors)
    paper = triplet_terms(policy, ref, anchor, ref_anchor, ids, margin=10.0)
    fixed = triplet_terms(policy, ref, anchor, ref_anchor, ids, margin=10.0, skip_copy_anchors=True)
    assert paper.anchor_equals_rejected.tolist() == [True, False]
    assert paper.anchor_equals_chosen.tolist() == [False, False]
    assert paper.skipped is None and fixed.skipped.tolist() == [True, False]
    assert paper.loss[0] > 0 and fixed.loss[0] == 0  # margin 10: the hinge is active, so skipping changes the loss
    assert fixed.loss[1] == paper.loss[1]
    fixed.loss.sum().backward()
    assert torch.all(anchor.per_token_logps.grad[0] == 0) and torch.any(anchor.per_token_logps.grad[1] != 0)


def test_anchor_gradient_leaves_the_pair_alone():
    """`gradient="anchor"`: the same loss value, no gradient on the chosen/rejected log-probs, the anchor's gradient
    unchanged (d/dℓ^a of Σ(ℓ^a−ℓ^c)² − Σ(ℓ^a−ℓ^r)² does not depend on the detach)."""
    anchors = torch.tensor([[1, 5, 5, 5, 5], [1, 6, 6, 6, 6]])
    full_inputs = toy_forwards(anchors)
    anchor_inputs = toy_forwards(anchors)
    full = triplet_terms(*full_inputs, margin=10.0)
    only_anchor = triplet_terms(*anchor_inputs, margin=10.0, gradient="anchor")
    torch.testing.assert_close(full.loss, only_anchor.loss)
    full.loss.sum().backward()
    only_anchor.loss.sum().backward()
    assert full_inputs[0].per_token_logps.grad.abs().sum() > 0
    assert anchor_inputs[0].per_token_logps.grad is None
    torch.testing.assert_close(anchor_inputs[2].per_token_logps.grad, full_inputs[2].per_token_logps.grad)


def test_unknown_triplet_gradient_is_refused():
    policy, ref, anchor, ref_anchor, ids = toy_forwards(torch.tensor([[1, 5, 5, 5, 5], [1, 6, 6, 6, 6]]))
    with pytest.raises(ValueError, match="`gradient` must be one of"):
        triplet_terms(policy, ref, anchor, ref_anchor, ids, margin=0.01, gradient="pair")


def test_skip_copy_anchors_without_triplet_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`triplet_skip_copy_anchors` changes the triplet loss.*`triplet_gamma > 0`"):
        TIDPOConfig(output_dir=str(tmp_path), triplet_gamma=0.0, use_cpu=True, triplet_skip_copy_anchors=True)


def test_trainer_logs_copy_shares_and_skips_copies(tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset):
    """Dataset anchors: the first two copy the rejected completion, the third the chosen one, the fourth neither. The
    logged shares say so, and with the fix the step's loss equals the DPO loss plus γ times the fourth pair's triplet."""
    rows = standard_dataset.select(range(4))
    anchors = [rows[0]["rejected"], rows[1]["rejected"], rows[2]["chosen"], " yes"]
    dataset = rows.add_column("anchor", anchors)

    def trainer(**overrides):
        args = tidpo_args(
            tmp_path, token_weighting="uniform", triplet_gamma=0.5, triplet_margin=5.0, anchor_source="dataset",
            per_device_train_batch_size=4, **overrides,
        )  # fmt: skip
        return TIDPOTrainer(
            model=model_dir, ref_model=load(ref_model_dir), args=args, train_dataset=dataset, processing_class=tokenizer
        )

    paper, fixed = trainer(), trainer(triplet_skip_copy_anchors=True)
    batch = first_batch(paper)
    loss_paper, metrics = paper.get_batch_loss_metrics(paper.model, batch)
    loss_fixed, fixed_metrics = fixed.get_batch_loss_metrics(fixed.model, first_batch(fixed))
    assert metrics["triplet/anchor_equals_rejected"] == pytest.approx(0.5)
    assert metrics["triplet/anchor_equals_chosen"] == pytest.approx(0.25)
    assert "triplet/skipped_rows" not in metrics
    assert fixed_metrics["triplet/skipped_rows"] == pytest.approx(0.75)
    _, parts = paper._loss_parts(paper.model, batch)
    expected = (parts.dpo_losses + 0.5 * parts.triplet.loss * torch.tensor([0.0, 0.0, 0.0, 1.0])).mean()
    torch.testing.assert_close(loss_fixed, expected)
    assert not torch.allclose(loss_paper, loss_fixed)
