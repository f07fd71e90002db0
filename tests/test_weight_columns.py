"""Tests of `trl_tidpo.modeling.weight_columns`: the layout check of `*_token_weights` columns and the conversion of
collated weights back to per-row lists."""

import math

import pytest
import torch
from datasets import Dataset

from trl_tidpo.modeling.weight_columns import (
    check_token_weights,
    is_weight,
    validate_token_weight_columns,
    weights_to_lists,
)


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


# ------------------------------------------------------------------ the one check of a token-weight list, rule by rule

WHERE = "`train_dataset` row 4"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, True), (2.5, True), (0.0, True), (-0.1, False), (math.nan, False), (math.inf, False), (True, False),
     (False, False), ("1", False), (None, False)],
)  # fmt: skip
def test_is_weight_is_a_finite_number_at_least_0_and_not_a_bool(value, expected):
    assert is_weight(value) is expected


def test_a_valid_list_comes_back_as_floats():
    assert check_token_weights([1, 0.5, 0], "chosen_token_weights", WHERE, num_tokens=3) == [1.0, 0.5, 0.0]


def refusal(weights, num_tokens=None) -> str:
    with pytest.raises(ValueError) as error:
        check_token_weights(weights, "rejected_token_weights", WHERE, num_tokens)
    message = str(error.value)
    assert message.startswith(f"{WHERE}: ")  # every message names the row
    return message


@pytest.mark.parametrize(("value", "shown"), [(None, "None (null)"), ("1.0 2.0", "str"), (3.0, "float")])
def test_rule_a_list(value, shown):
    assert f"`rejected_token_weights` is {shown}, not a list. Give one finite weight >= 0" in refusal(value)


def test_rule_not_empty():
    assert "`rejected_token_weights` is an empty list; give one weight per completion token" in refusal([])


def test_rule_one_weight_per_token_when_the_length_is_known():
    message = refusal([1.0, 1.0], num_tokens=3)
    assert "`rejected_token_weights` has 2 weights but the tokenised rejected completion has 3 tokens" in message
    assert "EOS included" in message  # the fix


@pytest.mark.parametrize(("bad", "shown"), [(math.nan, "float nan"), (math.inf, "float inf"), (-math.inf, "float -inf")])
def test_rule_finite(bad, shown):
    assert f"`rejected_token_weights` position 1 holds {shown}; token weights must be finite" in refusal([1.0, bad])


def test_rule_at_least_0():
    assert "position 2 holds float -0.5; token weights must be finite numbers >= 0" in refusal([1.0, 0.0, -0.5])


def test_rule_not_a_bool():
    """`True` would otherwise be read as the weight 1."""
    assert "position 0 holds bool True; token weights must be finite numbers >= 0 (not booleans)" in refusal([True])


@pytest.mark.parametrize(("bad", "shown"), [("x", "str 'x'"), (None, "None (null)"), ([1.0], "list [1.0]")])
def test_rule_a_number(bad, shown):
    assert f"position 1 holds {shown}" in refusal([1.0, bad])


def test_rule_not_all_0():
    message = refusal([0.0, 0, 0.0], num_tokens=3)
    assert "every weight of `rejected_token_weights` is 0, so this completion adds nothing to the margin" in message
    assert "Give some token a positive weight, or drop the row" in message


def test_weights_to_lists_pads_the_truncated_side():
    """
    Row 0 kept 2 of its 3 completion tokens, row 1 all 2. keep_start cut the tail: [0.5, 1.5] + [0.0];
    keep_end cut the head: [0.0] + [0.5, 1.5]. Only completion positions are read.
    """
    weights = torch.tensor([[9.0, 0.5, 1.5], [9.0, 2.0, 3.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    assert weights_to_lists(weights, mask, [3, 2], "keep_start") == [[0.5, 1.5, 0.0], [2.0, 3.0]]
    assert weights_to_lists(weights, mask, [3, 2], "keep_end") == [[0.0, 0.5, 1.5], [2.0, 3.0]]
