"""Tests of the triplet loss (SPEC §4, Eq. 13-14) against explicit loops."""

import pytest
import torch

from trl_tidpo.ops.triplet import left_align, triplet_distances, triplet_loss


def _completion_values(values: torch.Tensor, mask: torch.Tensor, row: int) -> list[float]:
    """The row's masked-in values in order: ℓ_0, ℓ_1, … from the first completion token."""
    return [float(values[row, j]) for j in range(values.size(1)) if bool(mask[row, j])]


def _reference_distances(a, a_mask, c, c_mask, r, r_mask):
    """d_pos = Σ_{t < min(n_a, n_c)} (ℓ^a_t − ℓ^c_t)², d_neg likewise, by explicit loops."""
    d_pos, d_neg = [], []
    for b in range(a.size(0)):
        la = _completion_values(a, a_mask, b)
        lc = _completion_values(c, c_mask, b)
        lr = _completion_values(r, r_mask, b)
        d_pos.append(sum((la[t] - lc[t]) ** 2 for t in range(min(len(la), len(lc)))))
        d_neg.append(sum((la[t] - lr[t]) ** 2 for t in range(min(len(la), len(lr)))))
    return torch.tensor(d_pos), torch.tensor(d_neg)


def _offset_mask(lengths_and_offsets, width):
    """Completion masks with a prompt offset: row b has ones on [offset, offset + length)."""
    mask = torch.zeros(len(lengths_and_offsets), width, dtype=torch.long)
    for b, (length, offset) in enumerate(lengths_and_offsets):
        mask[b, offset : offset + length] = 1
    return mask


def test_left_align_moves_kept_entries_to_front_in_order():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[0, 1, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    aligned, aligned_mask = left_align(values, mask)
    torch.testing.assert_close(
        aligned, torch.tensor([[2.0, 4.0, 5.0, 0.0, 0.0], [6.0, 7.0, 8.0, 9.0, 10.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    )
    assert aligned_mask.dtype == torch.bool
    assert aligned_mask.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, True],
        [False, False, False, False, False],
    ]


def test_left_align_keeps_gradient_on_kept_entries():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 0]])
    aligned, _ = left_align(values, mask)
    (aligned * torch.tensor([[10.0, 20.0, 30.0, 40.0]])).sum().backward()
    # kept entries 1 and 2 moved to slots 0 and 1; dropped entries get no gradient
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 10.0, 20.0, 0.0]]))


def test_distances_hand_computed():
    """
    Anchor ℓ^a = [1, 2, 3] (after a 1-token prompt), chosen ℓ^c = [1, 0] (after 2), rejected ℓ^r = [0, 2, 3, 9].
    d_pos over t < min(3, 2) = 2: (1−1)² + (2−0)² = 4.
    d_neg over t < min(3, 4) = 3: (1−0)² + (2−2)² + (3−3)² = 1 (the rejected's 4th token is ignored).
    """
    a = torch.tensor([[7.0, 1.0, 2.0, 3.0, 0.0]])
    a_mask = torch.tensor([[0, 1, 1, 1, 0]])
    c = torch.tensor([[5.0, 5.0, 1.0, 0.0]])
    c_mask = torch.tensor([[0, 0, 1, 1]])
    r = torch.tensor([[0.0, 2.0, 3.0, 9.0]])
    r_mask = torch.tensor([[1, 1, 1, 1]])
    d_pos, d_neg = triplet_distances(a, a_mask, c, c_mask, r, r_mask)
    torch.testing.assert_close(d_pos, torch.tensor([4.0]))
    torch.testing.assert_close(d_neg, torch.tensor([1.0]))


def test_distances_match_loops_with_offsets_and_widths():
    """Different widths per tensor, different lengths per row and prompt offsets (masks not left-aligned)."""
    torch.manual_seed(0)
    a_mask = _offset_mask([(5, 2), (3, 0), (7, 1), (1, 6), (0, 0)], 9)
    c_mask = _offset_mask([(3, 4), (6, 1), (7, 3), (4, 2), (3, 1)], 11)
    r_mask = _offset_mask([(8, 0), (2, 5), (2, 2), (5, 1), (2, 4)], 8)
    a = torch.randn(5, 9)
    c = torch.randn(5, 11)
    r = torch.randn(5, 8)
    d_pos, d_neg = triplet_distances(a, a_mask, c, c_mask, r, r_mask)
    expected_pos, expected_neg = _reference_distances(a, a_mask, c, c_mask, r, r_mask)
    torch.testing.assert_close(d_pos, expected_pos, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(d_neg, expected_neg, atol=1e-5, rtol=1e-6)
    assert d_pos[4] == 0 and d_neg[4] == 0  # empty anchor: nothing overlaps


def test_distances_match_loops_with_gapped_masks():
    """Masks with holes (positions counted over the masked-in entries only)."""
    torch.manual_seed(1)
    a_mask = torch.rand(4, 12) > 0.5
    c_mask = torch.rand(4, 10) > 0.5
    r_mask = torch.rand(4, 14) > 0.5
    a, c, r = torch.randn(4, 12), torch.randn(4, 10), torch.randn(4, 14)
    d_pos, d_neg = triplet_distances(a, a_mask, c, c_mask, r, r_mask)
    expected_pos, expected_neg = _reference_distances(a, a_mask, c, c_mask, r, r_mask)
    torch.testing.assert_close(d_pos, expected_pos, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(d_neg, expected_neg, atol=1e-5, rtol=1e-6)


def test_values_outside_masks_do_not_matter():
    torch.manual_seed(2)
    a_mask = _offset_mask([(4, 2), (2, 3)], 7)
    c_mask = _offset_mask([(3, 1), (5, 2)], 7)
    r_mask = _offset_mask([(6, 0), (1, 5)], 7)
    a, c, r = torch.randn(2, 7), torch.randn(2, 7), torch.randn(2, 7)
    base = triplet_distances(a, a_mask, c, c_mask, r, r_mask)

    def noise(x, m):
        return torch.where(m.bool(), x, torch.full_like(x, 1e6))

    perturbed = triplet_distances(noise(a, a_mask), a_mask, noise(c, c_mask), c_mask, noise(r, r_mask), r_mask)
    torch.testing.assert_close(perturbed[0], base[0])
    torch.testing.assert_close(perturbed[1], base[1])


@pytest.mark.parametrize(
    ("d_pos", "d_neg", "margin", "expected"),
    [
        (1.0, 3.0, 0.01, 0.0),  # 1 − 3 + 0.01 < 0
        (3.0, 1.0, 0.01, 2.01),
        (2.0, 2.0, 0.01, 0.01),  # equal distances: the margin
        (2.0, 2.0, 0.0, 0.0),
        (1.0, 1.5, 1.0, 0.5),
    ],
)
def test_triplet_loss_is_hinge(d_pos, d_neg, margin, expected):
    loss = triplet_loss(torch.tensor([d_pos]), torch.tensor([d_neg]), margin)
    torch.testing.assert_close(loss, torch.tensor([expected]))


def test_gradient_flows_to_all_three_and_matches_loop_reference():
    """Autograd of the vectorised loss equals autograd of the loop reference w.r.t. anchor, chosen and rejected."""
    torch.manual_seed(3)
    a_mask = _offset_mask([(5, 2), (4, 1), (6, 0)], 8)
    c_mask = _offset_mask([(3, 3), (6, 2), (4, 1)], 9)
    r_mask = _offset_mask([(6, 1), (2, 4), (5, 2)], 8)
    # Rejected is pulled towards the anchor, chosen pushed away: every pair has d_pos > d_neg, so the hinge is active.
    a = torch.randn(3, 8)
    c = a.new_zeros(3, 9) + 3.0
    r = torch.randn(3, 8) * 0.01
    inputs = [t.clone().requires_grad_(True) for t in (a, c, r)]
    ref_inputs = [t.clone().requires_grad_(True) for t in (a, c, r)]

    d_pos, d_neg = triplet_distances(inputs[0], a_mask, inputs[1], c_mask, inputs[2], r_mask)
    triplet_loss(d_pos, d_neg, 0.01).mean().backward()

    ref_losses = []
    for b in range(3):
        ia = [j for j in range(8) if a_mask[b, j]]
        ic = [j for j in range(9) if c_mask[b, j]]
        ir = [j for j in range(8) if r_mask[b, j]]
        pos = sum((ref_inputs[0][b, ia[t]] - ref_inputs[1][b, ic[t]]) ** 2 for t in range(min(len(ia), len(ic))))
        neg = sum((ref_inputs[0][b, ia[t]] - ref_inputs[2][b, ir[t]]) ** 2 for t in range(min(len(ia), len(ir))))
        ref_losses.append(torch.relu(pos - neg + 0.01))
    torch.stack(ref_losses).mean().backward()

    assert (d_pos > d_neg).all()
    for got, want in zip(inputs, ref_inputs, strict=True):
        assert got.grad is not None and got.grad.abs().sum() > 0
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)
