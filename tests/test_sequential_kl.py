"""Tests of the chunked sequential KL (SPEC §3, TDPO) against a full-logits computation with explicit loops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trl_tidpo.ops.sequential_kl import sequential_kl


ROWS, SEQ, HIDDEN, VOCAB = 4, 9, 8, 13


def _setup(seed=0):
    """Two tiny LM heads (policy, reference), hidden states and a shifted completion mask `[R, T-1]`."""
    torch.manual_seed(seed)
    policy_head = nn.Linear(HIDDEN, VOCAB, bias=True)
    ref_head = nn.Linear(HIDDEN, VOCAB, bias=True)
    policy_hidden = torch.randn(ROWS, SEQ, HIDDEN)
    ref_hidden = torch.randn(ROWS, SEQ, HIDDEN)
    mask = torch.zeros(ROWS, SEQ - 1, dtype=torch.long)
    for r, (start, end) in enumerate([(2, 8), (0, 3), (4, 5), (1, 7)]):  # different prompt offsets and lengths
        mask[r, start:end] = 1
    return policy_head, ref_head, policy_hidden, ref_hidden, mask


def _full_reference(policy_head, ref_head, policy_hidden, ref_hidden, mask):
    """
    K_r = Σ_{i: mask[r, i]} Σ_v πref(v|i)·(log πref(v|i) − log πθ(v|i)), with full `[R, T, vocab]` logits of both
    models and explicit loops over rows and positions. Position i's hidden state predicts token i + 1.
    """
    policy_logps = F.log_softmax(policy_head(policy_hidden).float(), dim=-1)  # [R, T, V]
    ref_logps = F.log_softmax(ref_head(ref_hidden).float(), dim=-1)
    kls = []
    for r in range(mask.size(0)):
        total = policy_hidden.new_zeros(())
        for i in range(mask.size(1)):
            if mask[r, i]:
                p_ref = ref_logps[r, i].exp()
                total = total + (p_ref * (ref_logps[r, i] - policy_logps[r, i])).sum()
        kls.append(total)
    return torch.stack(kls)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_values_match_full_logits(chunk_size):
    policy_head, ref_head, policy_hidden, ref_hidden, mask = _setup()
    with torch.no_grad():
        expected = _full_reference(policy_head, ref_head, policy_hidden, ref_hidden, mask)
    result = sequential_kl(
        policy_hidden.clone().requires_grad_(True), ref_hidden, mask, policy_head, ref_head, chunk_size=chunk_size
    )
    assert result.shape == (ROWS,) and result.dtype == torch.float32
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)
    assert (result > 0).all()  # KL between two different random heads is positive on every non-empty row


def test_no_grad_path_matches_full_logits():
    policy_head, ref_head, policy_hidden, ref_hidden, mask = _setup(seed=1)
    with torch.no_grad():
        expected = _full_reference(policy_head, ref_head, policy_hidden, ref_hidden, mask)
        result = sequential_kl(policy_hidden, ref_hidden, mask, policy_head, ref_head, chunk_size=3)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


def test_identical_models_give_zero():
    policy_head, _, policy_hidden, _, mask = _setup(seed=2)
    with torch.no_grad():
        result = sequential_kl(policy_hidden, policy_hidden, mask, policy_head, policy_head, chunk_size=2)
    torch.testing.assert_close(result, torch.zeros(ROWS), atol=1e-6, rtol=0)


def test_empty_mask_gives_zeros():
    policy_head, ref_head, policy_hidden, ref_hidden, _ = _setup()
    mask = torch.zeros(ROWS, SEQ - 1, dtype=torch.long)
    result = sequential_kl(policy_hidden.requires_grad_(True), ref_hidden, mask, policy_head, ref_head)
    torch.testing.assert_close(result, torch.zeros(ROWS))


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_gradients_match_full_computation(chunk_size):
    """Gradients w.r.t. the policy hidden states and the policy head's parameters equal the full-logits autograd."""
    policy_head, ref_head, policy_hidden, ref_hidden, mask = _setup(seed=3)
    row_weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # a non-trivial downstream use of the per-row K

    full_hidden = policy_hidden.clone().requires_grad_(True)
    loss_full = (_full_reference(policy_head, ref_head, full_hidden, ref_hidden, mask) * row_weights).sum()
    full_grads = torch.autograd.grad(loss_full, [full_hidden, policy_head.weight, policy_head.bias])

    chunk_hidden = policy_hidden.clone().requires_grad_(True)
    chunk_ref = ref_hidden.clone().requires_grad_(True)  # must receive no gradient
    loss_chunk = (
        sequential_kl(chunk_hidden, chunk_ref, mask, policy_head, ref_head, chunk_size=chunk_size) * row_weights
    ).sum()
    chunk_grads = torch.autograd.grad(
        loss_chunk, [chunk_hidden, policy_head.weight, policy_head.bias, chunk_ref, ref_head.weight], allow_unused=True
    )

    for got, want in zip(chunk_grads[:3], full_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert chunk_grads[3] is None, "the reference hidden states must get no gradient"
    assert chunk_grads[4] is None, "the reference head must get no gradient"
    # Positions outside the completion (and the last position, which predicts nothing) get no gradient.
    grad_hidden = chunk_grads[0]
    outside = torch.ones(ROWS, SEQ, dtype=torch.bool)
    outside[:, :-1] = ~mask.bool()
    assert (grad_hidden[outside] == 0).all()
    assert grad_hidden[~outside].abs().sum() > 0


def test_backward_leaves_ref_grad_empty():
    policy_head, ref_head, policy_hidden, ref_hidden, mask = _setup(seed=4)
    ref_hidden.requires_grad_(True)
    policy_hidden.requires_grad_(True)
    sequential_kl(policy_hidden, ref_hidden, mask, policy_head, ref_head, chunk_size=2).sum().backward()
    assert ref_hidden.grad is None
    assert ref_head.weight.grad is None
    assert policy_hidden.grad is not None and policy_head.weight.grad is not None
