"""Tests of `trl_tidpo.modeling.collator.DataCollatorForTIDPO`: hand-worked batches of prompts, anchors and token
weights."""

import torch

from trl_tidpo.modeling.collator import DataCollatorForTIDPO

PAD = 0
EXAMPLES = [
    {
        "prompt_ids": [5, 6],
        "chosen_ids": [7, 3],
        "rejected_ids": [8],
        "chosen_token_weights": [0.5, 1.5],
        "rejected_token_weights": [2.0],
        "anchor_ids": [9, 9, 3],
    },
    {
        "prompt_ids": [5],
        "chosen_ids": [9, 10, 3],
        "rejected_ids": [3],
        "chosen_token_weights": [1.0, 2.0, 3.0],
        "rejected_token_weights": [4.0],
        "anchor_ids": [3],
    },
]


def test_token_weights_align_with_the_rows():
    """Rows are chosen then rejected, right-padded to 4: each weight sits on its completion token, 0 elsewhere."""
    batch = DataCollatorForTIDPO(pad_token_id=PAD)(EXAMPLES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3], [5, 9, 10, 3], [5, 6, 8, 0], [5, 3, 0, 0]]
    expected = [[0, 0, 0.5, 1.5], [0, 1.0, 2.0, 3.0], [0, 0, 2.0, 0], [0, 4.0, 0, 0]]
    torch.testing.assert_close(batch["token_weights"], torch.tensor(expected))
    assert ((batch["token_weights"] > 0) == batch["completion_mask"].bool()).all()


def test_token_weights_are_truncated_like_the_rows():
    """max_length 3: keep_start keeps each row's first 3 tokens and weights, keep_end its last 3."""
    start = DataCollatorForTIDPO(pad_token_id=PAD, max_length=3, truncation_mode="keep_start")(EXAMPLES)
    assert start["input_ids"].tolist() == [[5, 6, 7], [5, 9, 10], [5, 6, 8], [5, 3, 0]]
    expected_start = [[0, 0, 0.5], [0, 1.0, 2.0], [0, 0, 2.0], [0, 4.0, 0]]
    torch.testing.assert_close(start["token_weights"], torch.tensor(expected_start))
    end = DataCollatorForTIDPO(pad_token_id=PAD, max_length=3, truncation_mode="keep_end")(EXAMPLES)
    assert end["input_ids"].tolist() == [[6, 7, 3], [9, 10, 3], [5, 6, 8], [5, 3, 0]]
    expected_end = [[0, 0.5, 1.5], [1.0, 2.0, 3.0], [0, 0, 2.0], [0, 4.0, 0]]
    torch.testing.assert_close(end["token_weights"], torch.tensor(expected_end))


def test_prompts_are_left_padded_for_generation():
    batch = DataCollatorForTIDPO(pad_token_id=PAD, return_prompts=True)(EXAMPLES)
    assert batch["prompt_input_ids"].tolist() == [[5, 6], [0, 5]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert "prompt_input_ids" not in DataCollatorForTIDPO(pad_token_id=PAD)(EXAMPLES)


def test_anchor_rows_are_prompt_then_anchor_right_padded():
    batch = DataCollatorForTIDPO(pad_token_id=PAD)(EXAMPLES)
    assert batch["anchor_input_ids"].tolist() == [[5, 6, 9, 9, 3], [5, 3, 0, 0, 0]]
    assert batch["anchor_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["anchor_completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
