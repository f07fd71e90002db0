import random

import pytest

from trl_tidpo.tools.demo.metrics import preference_accuracy, roc_auc, top_k_share


def test_roc_auc_hand_computed():
    """
    Positives score 0.35 and 0.8, negatives 0.1 and 0.4. Of the 4 (positive, negative) pairs, 0.35 > 0.1, 0.35 < 0.4,
    0.8 > 0.1, 0.8 > 0.4: 3 of 4 ordered correctly, AUC = 0.75.
    """
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)


def test_roc_auc_ties_count_half():
    """Positives 0.5 and 0.9, negatives 0.5 and 0.2: pairs give 0.5 (tie) + 1 + 1 + 1 = 3.5 of 4, AUC = 0.875."""
    assert roc_auc([0.5, 0.5, 0.2, 0.9], [True, False, False, True]) == pytest.approx(0.875)


def test_roc_auc_matches_pair_count_on_random_data():
    rng = random.Random(0)
    scores = [round(rng.random(), 1) for _ in range(60)]  # rounding makes many ties
    labels = [rng.random() < 0.3 for _ in range(60)]
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    expected = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert roc_auc(scores, labels) == pytest.approx(expected)


def test_roc_auc_extremes():
    assert roc_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert roc_auc([4, 3, 2, 1], [False, False, True, True]) == 0.0
    assert roc_auc([1, 1, 1, 1], [False, True, False, True]) == 0.5


def test_roc_auc_needs_both_classes():
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        roc_auc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="differ in length"):
        roc_auc([0.1, 0.2], [True])


def test_top_k_share_hand_computed():
    # 2 critical tokens (indices 1 and 3); the top 2 weights are indices 1 (0.9) and 2 (0.8): one of two is critical
    assert top_k_share([0.1, 0.9, 0.8, 0.3], [False, True, False, True]) == 0.5
    assert top_k_share([0.1, 0.9, 0.8, 0.3], [False, True, False, True], k=3) == pytest.approx(2 / 3)
    assert top_k_share([0.1, 0.9, 0.2, 0.8], [False, True, False, True]) == 1.0


def test_top_k_share_breaks_ties_toward_earlier_token():
    assert top_k_share([1.0, 1.0, 1.0], [False, True, False]) == 0.0
    assert top_k_share([1.0, 1.0, 1.0], [True, False, False]) == 1.0


def test_top_k_share_rejects_rows_without_critical_tokens():
    with pytest.raises(ValueError, match="`k` must be >= 1"):
        top_k_share([0.1, 0.2], [False, False])


def test_preference_accuracy_counts_ties_as_wrong():
    assert preference_accuracy([1.0, 0.5, 2.0, 0.0], [0.0, 0.5, 3.0, -1.0]) == 0.5
