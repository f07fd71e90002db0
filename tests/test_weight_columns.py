"""Tests of `trl_tidpo.modeling.weight_columns`: the layout check of `*_token_weights` columns and the conversion of
collated weights back to per-row lists."""

import math

import pytest
import torch
from datasets import Dataset

from trl_tidpo.modeling.weight_columns import validate_token_weight_columns, weights_to_lists


def weighted_dataset(chosen_weights, rejected_weights) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt_ids": [[5], [5, 6]],
            "chosen_ids": [[7, 3], [8, 9, 3]],
            "rejected_ids": [[3], [9, 3]],
            "chosen_token_weights": chosen_weights,
            "rejected_token_weights": rejected_weights,
        }
    )


def test_matching_weights_pass():
    validate_token_weight_columns(weighted_dataset([[1.0, 0.0], [0.5, 1.0, 2.0]], [[1.0], [0.0, 3.0]]), "train")


def test_a_weight_list_of_the_wrong_length_raises_naming_the_row():
    dataset = weighted_dataset([[1.0, 0.0], [0.5, 1.0]], [[1.0], [0.0, 3.0]])
    with pytest.raises(ValueError, match=r"`train` row 1: `chosen_token_weights` has 2 weights .* has 3 tokens"):
        validate_token_weight_columns(dataset, "train")


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf])
def test_negative_or_non_finite_weights_raise(bad):
    dataset = weighted_dataset([[1.0, 0.0], [0.5, 1.0, 2.0]], [[1.0], [0.0, bad]])
    with pytest.raises(ValueError, match="row 1: `rejected_token_weights` position 1 holds"):
        validate_token_weight_columns(dataset, "eval")


def test_missing_column_raises():
    dataset = weighted_dataset([[1.0, 0.0], [0.5, 1.0, 2.0]], [[1.0], [0.0, 3.0]])
    dataset = dataset.remove_columns("rejected_token_weights")
    with pytest.raises(ValueError, match="lacks \\['rejected_token_weights'\\]"):
        validate_token_weight_columns(dataset, "train")


def test_weights_to_lists_pads_the_truncated_side():
    """
    Row 0 kept 2 of its 3 completion tokens, row 1 all 2. keep_start cut the tail: [0.5, 1.5] + [0.0];
    keep_end cut the head: [0.0] + [0.5, 1.5]. Only completion positions are read.
    """
    weights = torch.tensor([[9.0, 0.5, 1.5], [9.0, 2.0, 3.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    assert weights_to_lists(weights, mask, [3, 2], "keep_start") == [[0.5, 1.5, 0.0], [2.0, 3.0]]
    assert weights_to_lists(weights, mask, [3, 2], "keep_end") == [[0.0, 0.5, 1.5], [2.0, 3.0]]
