"""Tests of `trl_tidpo.trainer.dataset_checks`: what `TIDPOTrainer` refuses in a dataset before it trains."""

import logging
import pytest
from datasets import Dataset
from helpers_trainer import CPU_ARGS

from trl_tidpo import TIDPOConfig, TIDPOTrainer
from trl_tidpo.trainer.dataset_checks import overlong_prompt_rows


def tokenized_dataset(prompt_lengths: list[int]) -> Dataset:
    """Pre-tokenised pairs (ids of the test vocabulary) whose prompts have the given lengths."""
    return Dataset.from_dict(
        {
            "prompt_ids": [[7] * n for n in prompt_lengths],
            "chosen_ids": [[8, 3]] * len(prompt_lengths),
            "rejected_ids": [[9, 10, 3]] * len(prompt_lengths),
        }
    )


def test_overlong_prompt_rows_by_hand():
    """max_length 5, keep_start: prompts of 5 and 9 tokens fill it (rows 1 and 3); keep_end and no limit: none."""
    dataset = tokenized_dataset([4, 5, 1, 9])
    assert overlong_prompt_rows(dataset, 5, "keep_start") == [1, 3]
    assert overlong_prompt_rows(dataset, 5, "keep_end") == []
    assert overlong_prompt_rows(dataset, None, "keep_start") == []


def test_pretokenized_dataset_drops_overlong_prompts_with_a_warning(tmp_path, model_dir, tokenizer, caplog):
    """A pre-tokenised dataset skips TRL's tokenisation (and its drop of these rows): they are dropped here, as TRL
    drops them, and the count is warned about."""
    with caplog.at_level(logging.WARNING):
        trainer = TIDPOTrainer(
            model=model_dir,
            args=TIDPOConfig(output_dir=str(tmp_path), **CPU_ARGS, triplet_gamma=0.0, max_length=5),
            train_dataset=tokenized_dataset([4, 5, 1, 9]),
            processing_class=tokenizer,
        )
    assert [len(ids) for ids in trainer.train_dataset["prompt_ids"]] == [4, 1]
    assert any("Dropped 2 of the 4 pairs of the train dataset" in r.getMessage() for r in caplog.records)


def test_pretokenized_dataset_whose_every_prompt_is_overlong_raises(tmp_path, model_dir, tokenizer):
    with pytest.raises(ValueError, match=r"Every pair of the train dataset \(2\) has a prompt of `max_length=5`"):
        TIDPOTrainer(
            model=model_dir,
            args=TIDPOConfig(output_dir=str(tmp_path), **CPU_ARGS, triplet_gamma=0.0, max_length=5),
            train_dataset=tokenized_dataset([5, 9]),
            processing_class=tokenizer,
        )


def test_pretokenized_dataset_with_overlong_prompts_trains_under_keep_end(tmp_path, model_dir, tokenizer):
    trainer = TIDPOTrainer(
        model=model_dir,
        args=TIDPOConfig(
            output_dir=str(tmp_path), **CPU_ARGS, triplet_gamma=0.0, max_length=5, truncation_mode="keep_end"
        ),
        train_dataset=tokenized_dataset([4, 5, 1, 9]),
        processing_class=tokenizer,
    )
    assert len(trainer.train_dataset) == 4
