"""The pair's common prefix/suffix, difference weights and prefix tying, against explicit per-pair loops."""

import pytest
import torch

from trl_tidpo.ops.pair_alignment import (
    align_pair_completions,
    difference_token_weights,
    pair_difference_weights,
    tie_shared_prefix,
)


def _rows(pairs, length=12, pad=0):
    """`pairs`: (prompt_c, completion_c, prompt_r, completion_r) token lists → input_ids, completion_mask [2B, T]."""
    ids, masks = [], []
    for side in (0, 1):
        for pair in pairs:
            prompt, completion = pair[2 * side], pair[2 * side + 1]
            row = prompt + completion
            ids.append(row + [pad] * (length - len(row)))
            masks.append([0] * len(prompt) + [1] * len(completion) + [0] * (length - len(row)))
    return torch.tensor(ids), torch.tensor(masks)


def _expected(c, r):
    """Explicit loop: common prefix length, then common suffix length within what the prefix leaves."""
    p = 0
    while p < min(len(c), len(r)) and c[p] == r[p]:
        p += 1
    s = 0
    while s < min(len(c), len(r)) - p and c[len(c) - 1 - s] == r[len(r) - 1 - s]:
        s += 1
    return p, s


PAIRS = [
    ([5, 6], [1, 2, 3, 9, 8], [5, 6], [1, 2, 4, 9, 8]),  # one differing token in the middle
    ([5], [1, 2], [5], [1, 2, 3]),  # chosen is a prefix of rejected
    ([7, 7], [4, 4, 4], [7, 7], [4, 4]),  # repeated tokens: the suffix must not overlap the prefix
    ([3], [1, 2, 3], [3], [7, 8, 9]),  # nothing shared
    ([9, 9, 9], [2, 2], [9], [2, 2]),  # prompts truncated differently: completions still compared left-aligned
]


def test_prefix_and_suffix_match_an_explicit_loop():
    ids, mask = _rows(PAIRS)
    alignment = align_pair_completions(ids, mask)
    batch = len(PAIRS)
    for b, (pc, c, pr, r) in enumerate(PAIRS):
        p, s = _expected(c, r)
        for row, prompt, completion in ((b, pc, c), (batch + b, pr, r)):
            start, n = len(prompt), len(completion)
            expected_prefix = [start <= j < start + p for j in range(ids.size(1))]
            expected_suffix = [start + n - s <= j < start + n for j in range(ids.size(1))]
            assert alignment.shared_prefix[row].tolist() == expected_prefix
            assert alignment.shared_suffix[row].tolist() == expected_suffix
            expected_first = start + p if p < n else -1
            assert alignment.first_divergent[row].item() == expected_first


def test_odd_row_count_is_refused():
    with pytest.raises(ValueError, match="even count"):
        align_pair_completions(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))


@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_difference_weights_match_an_explicit_loop(normalization):
    ids, mask = _rows(PAIRS)
    shifted = mask[:, 1:]
    alignment = align_pair_completions(ids, mask)
    got = difference_token_weights(alignment.shared, shifted, 0.25, 2.0, normalization)
    for row in range(ids.size(0)):
        raw = [
            (0.25 if alignment.shared[row, i + 1] else 2.0) if shifted[row, i] else 0.0 for i in range(shifted.size(1))
        ]
        total, count = sum(raw), sum(shifted[row].tolist())
        scale = count / total if normalization == "mean" else 1 / total
        assert got.weights[row].tolist() == pytest.approx([w * scale for w in raw], abs=1e-6)
    assert not got.fallback.any() and not got.empty.any()


@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_pair_difference_weights_of_a_batch_match_an_explicit_loop(normalization):
    """The batch function the trainer and `explain` call, from the shifted mask: each completion token weighs 0.25
    inside the explicit loop's common prefix or suffix, 2.0 elsewhere, scaled to mean 1 (or sum 1); 0 off it."""
    ids, mask = _rows(PAIRS)
    got = pair_difference_weights(ids, mask[:, 1:], 0.25, 2.0, normalization)
    for b, (pc, c, pr, r) in enumerate(PAIRS):
        p, s = _expected(c, r)
        for row, prompt, completion in ((b, pc, c), (len(PAIRS) + b, pr, r)):
            n = len(completion)
            raw = [0.25 if j < p or j >= n - s else 2.0 for j in range(n)]
            scale = (n if normalization == "mean" else 1) / sum(raw)
            start = len(prompt) - 1  # shifted axis: entry i weighs token i + 1
            expected = [0.0] * start + [w * scale for w in raw] + [0.0] * (ids.size(1) - 1 - start - n)
            assert got.weights[row].tolist() == pytest.approx(expected, abs=1e-6)
    assert not got.fallback.any()


def test_all_shared_row_with_zero_shared_weight_falls_back_to_uniform():
    ids, mask = _rows([PAIRS[1]])  # chosen [1, 2] is all prefix
    shifted = mask[:, 1:]
    got = difference_token_weights(align_pair_completions(ids, mask).shared, shifted, 0.0, 1.0)
    assert got.fallback.tolist() == [True, False]
    assert got.weights[0].tolist() == shifted[0].float().tolist()  # uniform, mean 1
    assert got.weights[1].tolist() == pytest.approx([0, 0, 3.0] + [0] * 8)  # the differing token (position 3)


def test_tie_shared_prefix_averages_the_two_rows_on_the_prefix_only():
    ids, mask = _rows(PAIRS[:3])
    alignment = align_pair_completions(ids, mask)
    weights = torch.rand(6, ids.size(1) - 1) * mask[:, 1:]
    tied = tie_shared_prefix(weights, alignment.shared_prefix)
    for b in range(3):
        for i in range(weights.size(1)):
            c, r = b, 3 + b
            if alignment.shared_prefix[c, i + 1]:
                assert tied[c, i] == tied[r, i] == pytest.approx((weights[c, i] + weights[r, i]).item() / 2)
            else:
                assert tied[c, i] == weights[c, i] and tied[r, i] == weights[r, i]
