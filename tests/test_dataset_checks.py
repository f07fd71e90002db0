"""Tests of `trl_tidpo.trainer.dataset_checks`: what `TIDPOTrainer` refuses in a dataset before it trains."""

import json
import logging
import time

import pytest
from datasets import Dataset, load_dataset
from helpers_trainer import CPU_ARGS, load

from trl_tidpo import TIDPOConfig, TIDPOTrainer
from trl_tidpo.trainer.dataset_checks import check_dataset_rows, overlong_prompt_rows, rows_past_positions


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


# ---------------------------------------------------------------------------------------------------- row checks


GOOD_ROWS = [
    {"prompt": "the sky is", "chosen": " blue .", "rejected": " green ."},
    {"prompt": "hello", "chosen": " hello world", "rejected": " bad"},
    {"prompt": "how", "chosen": " slow", "rejected": " fast dog ran ."},
]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def refused(tmp_path, model_dir, tokenizer, train, message, eval_dataset=None, **config) -> str:
    """Build a trainer on `train` and expect a ValueError matching `message`; nothing may be written (no run)."""
    out = tmp_path / "run"
    args = TIDPOConfig(output_dir=str(out), **CPU_ARGS, triplet_gamma=0.0, **config)
    with pytest.raises(ValueError, match=message) as excinfo:
        TIDPOTrainer(model=model_dir, args=args, train_dataset=train, eval_dataset=eval_dataset, processing_class=tokenizer)
    assert not out.exists() or not any(out.iterdir())  # nothing trained, nothing saved
    return str(excinfo.value)


def rows_with(row: dict, at: int = 1) -> list[dict]:
    rows = [dict(r) for r in GOOD_ROWS]
    rows[at] = {**rows[at], **row}
    return rows


def as_dataset(rows: list[dict]) -> Dataset:
    return Dataset.from_list(rows)


def from_jsonl(tmp_path, rows: list[dict]) -> Dataset:
    """The rows through a JSONL file, as a user gives them: datasets 5 keeps mixed types in `Json` columns."""
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return load_dataset("json", data_files=str(path), split="train")


@pytest.mark.parametrize(
    ("column", "value", "shown"),
    [
        ("chosen", None, "None (null)"),
        ("rejected", 3, "int '3'"),
        ("prompt", 1.5, "float '1.5'"),
    ],
)
def test_non_string_field_names_row_and_column(tmp_path, model_dir, tokenizer, column, value, shown):
    """TRL's `add_eos` would fail with "'NoneType' object has no attribute 'endswith'" and no row named."""
    rows = rows_with({column: value}, at=2)
    message = refused(tmp_path, model_dir, tokenizer, from_jsonl(tmp_path, rows), r"`train_dataset` row 2: ")
    assert f"`{column}` is {shown}" in message
    assert "Fix or drop this row" in message


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_plain_completion_is_refused(tmp_path, model_dir, tokenizer, value):
    message = refused(
        tmp_path, model_dir, tokenizer, as_dataset(rows_with({"rejected": value})), r"`train_dataset` row 1: "
    )
    assert "the `rejected` completion is empty: it would train on its EOS token alone" in message


def test_every_completion_empty_is_refused_at_row_0(tmp_path, model_dir, tokenizer):
    """The issue's case: every completion "" trained at a constant loss 0.6941 with no word."""
    rows = [{**r, "chosen": "", "rejected": ""} for r in GOOD_ROWS]
    refused(tmp_path, model_dir, tokenizer, as_dataset(rows), r"`train_dataset` row 0: the `chosen` completion is empty")


def test_empty_assistant_content_is_refused(tmp_path, model_dir, tokenizer):
    rows = [{"prompt": user("the sky is"), "chosen": assistant("blue ."), "rejected": assistant("green .")}] * 2
    rows = rows + [{"prompt": user("hello"), "chosen": assistant(""), "rejected": assistant("bad")}]
    refused(tmp_path, model_dir, tokenizer, as_dataset(rows), r"`train_dataset` row 2: the `chosen` completion is empty")


def test_implicit_prompt_row_without_its_own_completion_is_refused(tmp_path, model_dir, tokenizer):
    """No 'prompt' column: the completions are what follows the shared prefix (TRL's `extract_prompt`); an empty one
    (here `chosen` is all prompt) is refused, naming the implicit format."""
    rows = [
        {"chosen": [*user("the sky is"), *assistant("blue .")], "rejected": [*user("the sky is"), *assistant("red")]},
        {"chosen": user("hello"), "rejected": [*user("hello"), *assistant("bad")]},
    ]
    message = refused(tmp_path, model_dir, tokenizer, as_dataset(rows), r"`train_dataset` row 1: the `chosen` completion")
    assert "(after the prompt they share, without a 'prompt' column)" in message


def test_mixed_plain_and_conversational_rows_from_jsonl_are_refused(tmp_path, model_dir, tokenizer):
    """datasets 5 loads such a file into `Json` columns; TRL would take the format from row 0 and give the plain
    rows no EOS."""
    lines = [
        {"prompt": user("the sky is"), "chosen": assistant("blue ."), "rejected": assistant("green .")},
        {"prompt": "hello", "chosen": " hello world", "rejected": " bad"},
    ]
    dataset = from_jsonl(tmp_path, lines)
    message = refused(tmp_path, model_dir, tokenizer, dataset, r"`train_dataset` row 1: is plain but row 0 is conversational")
    assert "plain rows would get no EOS" in message


def test_row_mixing_formats_is_refused(tmp_path, model_dir, tokenizer):
    rows = [{"prompt": "the sky is", "chosen": assistant("blue ."), "rejected": assistant("green .")}]
    message = refused(tmp_path, model_dir, tokenizer, Dataset.from_list(rows * 2), r"`train_dataset` row 0: mixes")
    assert "plain text (['prompt']) and conversational messages (['chosen', 'rejected'])" in message


@pytest.mark.parametrize(
    ("message_dict", "expected"),
    [
        ({"role": "assistant"}, "`chosen` message 0 has no 'content'"),
        ({"content": "blue"}, "`chosen` message 0 has no 'role'"),
        ({"role": "assistant", "content": None}, "`chosen` message 0 has no 'content'"),
    ],
)
def test_message_without_content_or_role_is_refused(tmp_path, model_dir, tokenizer, message_dict, expected):
    """Without 'content' the completion became `<eos>` alone."""
    rows = [
        {"prompt": user("the sky is"), "chosen": assistant("blue ."), "rejected": assistant("green .")},
        {"prompt": user("hello"), "chosen": [message_dict], "rejected": assistant("bad")},
    ]
    message = refused(tmp_path, model_dir, tokenizer, from_jsonl(tmp_path, rows), r"`train_dataset` row 1: ")
    assert expected in message


def test_non_dict_message_is_refused(tmp_path, model_dir, tokenizer):
    rows = [{"prompt": user("hi"), "chosen": ["blue"], "rejected": assistant("bad")}] * 2
    refused(tmp_path, model_dir, tokenizer, from_jsonl(tmp_path, rows), r"`train_dataset` row 0: `chosen` message 0 is str 'blue', not a")


def test_eval_dataset_rows_are_checked_and_named(tmp_path, model_dir, tokenizer):
    bad = as_dataset(rows_with({"chosen": ""}, at=0))
    refused(
        tmp_path, model_dir, tokenizer, as_dataset(GOOD_ROWS), r"`eval_dataset\['held_out'\]` row 0: the `chosen`",
        eval_dataset={"held_out": bad}, eval_strategy="no",
    )  # fmt: skip


def test_every_pair_identical_is_refused(tmp_path, model_dir, tokenizer):
    rows = [{**r, "rejected": r["chosen"]} for r in GOOD_ROWS]
    refused(tmp_path, model_dir, tokenizer, as_dataset(rows), r"`train_dataset`: in every pair \(3\) `chosen` is identical")


def test_some_identical_pairs_are_counted_in_one_warning(tmp_path, model_dir, tokenizer, caplog):
    """Some identical pairs (ties in a real dataset) train, with a warning: they add a constant and no gradient."""
    rows = rows_with({"rejected": GOOD_ROWS[1]["chosen"]})
    with caplog.at_level(logging.WARNING):
        TIDPOTrainer(
            model=model_dir,
            args=TIDPOConfig(output_dir=str(tmp_path), **CPU_ARGS, triplet_gamma=0.0),
            train_dataset=as_dataset(rows),
            processing_class=tokenizer,
        )
    warnings = [r.getMessage() for r in caplog.records if "identical to `rejected`" in r.getMessage()]
    assert len(warnings) == 1
    assert "1 of the 3 pairs of `train_dataset` have `chosen` identical to `rejected` (rows [1])" in warnings[0]


# ---------------------------------------------------------------------------------------------------- weight columns


def weighted_rows(chosen_weights, rejected_weights=None) -> list[dict]:
    rows = [dict(r) for r in GOOD_ROWS]
    for row in rows:
        row["chosen_token_weights"] = [1.0, 1.0, 1.0]
        row["rejected_token_weights"] = [1.0, 1.0, 1.0]
    rows[1]["chosen_token_weights"] = chosen_weights
    if rejected_weights is not None:
        rows[1]["rejected_token_weights"] = rejected_weights
    return rows


@pytest.mark.parametrize("token_weighting", ["ti_dpo", "uniform", "difference"])
def test_weight_columns_that_would_be_ignored_are_refused(tmp_path, model_dir, tokenizer, token_weighting):
    message = refused(
        tmp_path, model_dir, tokenizer, as_dataset(weighted_rows([1.0, 2.0, 3.0])),
        r"`train_dataset` has the token weight column\(s\) \['chosen_token_weights', 'rejected_token_weights'\]",
        token_weighting=token_weighting,
    )  # fmt: skip
    assert f"`token_weighting='{token_weighting}'` does not read" in message
    assert "Set `token_weighting='dataset'`" in message


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ([1.0, "x", 1.0], "`chosen_token_weights` position 1 holds str 'x'"),
        ([1.0, 1.0, None], "`chosen_token_weights` position 2 holds None (null)"),
        ([1.0, float("nan"), 1.0], "`chosen_token_weights` position 1 holds float nan"),
        ([1.0, -1.0, 1.0], "`chosen_token_weights` position 1 holds float -1.0"),
        ([1.0, True, 1.0], "`chosen_token_weights` position 1 holds bool True"),
        (None, "`chosen_token_weights` is None (null), not a list"),
        ([], "`chosen_token_weights` is an empty list"),
    ],
)
def test_bad_weight_values_are_named_by_row_column_and_position(tmp_path, model_dir, tokenizer, weights, expected):
    """Through a JSONL file, as a user gives them (a string or null inside a list failed with `TypeError: must be
    real number, not str`)."""
    dataset = from_jsonl(tmp_path, weighted_rows(weights))
    message = refused(tmp_path, model_dir, tokenizer, dataset, r"`train_dataset` row 1: ", token_weighting="dataset")
    assert expected in message


def test_all_zero_weight_row_is_refused(tmp_path, model_dir, tokenizer):
    message = refused(
        tmp_path, model_dir, tokenizer, as_dataset(weighted_rows([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])),
        r"`train_dataset` row 1: every weight of `rejected_token_weights` is 0", token_weighting="dataset",
    )  # fmt: skip
    assert "Give some token a positive weight, or drop the row" in message


# ---------------------------------------------------------------------------------------------------- streamed data


def test_streamed_dataset_is_checked_as_rows_are_read(tmp_path, model_dir, tokenizer):
    """A stream cannot be read ahead: its first row is checked at construction (where TRL reads it), a later bad row
    when it is reached."""
    rows = rows_with({"chosen": None}, at=0)
    with pytest.raises(ValueError, match=r"`train_dataset` row 0: `chosen` is None \(null\)"):
        TIDPOTrainer(
            model=model_dir,
            args=TIDPOConfig(output_dir=str(tmp_path), **CPU_ARGS, triplet_gamma=0.0, max_steps=1),
            train_dataset=as_dataset(rows).to_iterable_dataset(),
            processing_class=tokenizer,
        )
    stream = Dataset.from_list(rows_with({"rejected": ""}, at=2)).to_iterable_dataset()
    checked, _ = check_dataset_rows(TIDPOConfig(output_dir=str(tmp_path), **CPU_ARGS), stream, None)
    with pytest.raises(ValueError, match=r"`train_dataset` row 2: the `rejected` completion is empty"):
        list(checked)


def test_row_check_is_fast(tmp_path):
    """One pass in Python over the columns: 5 000 conversational rows in well under a second of CPU time (about 0.06 s
    measured on an idle core; CPU time, so that other load on the machine does not count)."""
    n = 5_000
    dataset = Dataset.from_dict(
        {"prompt": [user("what is it")] * n, "chosen": [assistant("a b c")] * n, "rejected": [assistant("d")] * n}
    )
    args = TIDPOConfig(output_dir=str(tmp_path), **CPU_ARGS)
    start = time.process_time()
    check_dataset_rows(args, dataset, None)
    assert time.process_time() - start < 1.0


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"chosen": "the sky is", "rejected": "the sky is blue"}, "the `chosen` completion is empty (after the prompt"),
        (
            {"chosen": [*user("hi"), *assistant("a")], "rejected": [*user("hello"), *assistant("b")]},
            "`chosen` and `rejected` share no first message",
        ),
    ],
)
def test_implicit_prompt_needs_a_shared_prompt_and_own_completions(tmp_path, model_dir, tokenizer, row, expected):
    """TRL's `extract_prompt` would train `chosen` on the prompt's last character here, or fail in the chat template
    ("Cannot apply chat template to an empty conversation") without naming the row."""
    other = {"chosen": "the sky is blue", "rejected": "the sky is green"}
    if isinstance(row["chosen"], list):
        other = {"chosen": [*user("hi"), *assistant("a")], "rejected": [*user("hi"), *assistant("b")]}
    message = refused(tmp_path, model_dir, tokenizer, from_jsonl(tmp_path, [other, row]), r"`train_dataset` row 1: ")
    assert expected in message


# ---------------------------------------------------------------------------------------------------- positions


def short_context_model(model_dir, positions: int = 8):
    """The tiny Llama with a context of `positions` tokens (rotary: only the config's limit changes)."""
    model = load(model_dir)
    model.config.max_position_embeddings = positions
    return model


LONG_ROWS = [
    {"prompt": "the sky is", "chosen": " blue .", "rejected": " green ."},  # 3 + 3 tokens (EOS included)
    {"prompt": "what should i do about a headache ?", "chosen": " rest .", "rejected": " no"},  # 8 + 3
    {"prompt": "hello", "chosen": " hello world , how good !", "rejected": " bad"},  # 1 + 7: 8 fits
    {"prompt": "tell me a story", "chosen": " the cat ran fast .", "rejected": " no ."},  # 4 + 6
]


def test_rows_past_the_model_positions_are_refused_without_max_length(tmp_path, model_dir, tokenizer):
    """With `max_length=None` nothing truncates them: they would train at positions past the model's range."""
    out = tmp_path / "run"
    with pytest.raises(ValueError) as excinfo:
        TIDPOTrainer(
            model=short_context_model(model_dir),
            args=TIDPOConfig(output_dir=str(out), **CPU_ARGS, triplet_gamma=0.0, max_length=None),
            train_dataset=as_dataset(LONG_ROWS),
            processing_class=tokenizer,
        )
    message = str(excinfo.value)
    assert message.startswith(
        "`train_dataset` row 1 (and 1 more): its prompt and longer completion take 11 tokens, more than the model's "
        "`max_position_embeddings=8`, and `max_length=None` does not truncate it"
    )
    assert "Set `max_length` (at most 8) to truncate such rows" in message
    assert not out.exists() or not any(out.iterdir())


def test_max_length_above_the_model_positions_is_refused_when_a_row_needs_it(tmp_path, model_dir, tokenizer):
    with pytest.raises(ValueError, match=r"`max_length=10` is more than that.*Lower `max_length` to at most 8"):
        TIDPOTrainer(
            model=short_context_model(model_dir),
            args=TIDPOConfig(output_dir=str(tmp_path), **CPU_ARGS, triplet_gamma=0.0, max_length=10),
            train_dataset=as_dataset(LONG_ROWS),
            processing_class=tokenizer,
        )


def test_max_length_within_the_model_positions_trains(tmp_path, model_dir, tokenizer, caplog):
    """`max_length=8`: rows are cut to the model's range; the prompt that fills it (row 1) is dropped, as TRL does."""
    with caplog.at_level(logging.WARNING):
        trainer = TIDPOTrainer(
            model=short_context_model(model_dir),
            args=TIDPOConfig(output_dir=str(tmp_path), **CPU_ARGS, triplet_gamma=0.0, max_length=8),
            train_dataset=as_dataset(LONG_ROWS),
            processing_class=tokenizer,
        )
    assert len(trainer.train_dataset) == 3
    assert any("Dropped 1 of the 4 pairs of the train dataset" in r.getMessage() for r in caplog.records)


def test_rows_past_positions_by_hand():
    dataset = Dataset.from_dict(
        {"prompt_ids": [[1] * 3, [1] * 6, [1]], "chosen_ids": [[2] * 2, [2], [2] * 9], "rejected_ids": [[3], [3] * 4, [3]]}
    )
    assert rows_past_positions(dataset, 8, None) == [(1, 10), (2, 10)]
    assert rows_past_positions(dataset, 8, 9) == [(1, 9), (2, 9)]
    assert rows_past_positions(dataset, 10, None) == []
