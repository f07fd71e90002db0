"""`trl-tidpo explain --dataset FILE --row N`: the weights the trainer will use for one row, from span columns, weight
columns or TI-DPO, as JSON, in the terminal and as HTML; bad rows are one-line errors that name the row."""

import json

import pytest
from datasets import Dataset
from test_weight_spans import PROMPT, WORD_CONTENT, WORD_EXPECTED, hand_written, span_dataset

from trl_tidpo import token_weights
from trl_tidpo.tools.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def explain_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["explain", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "conversational"])
def test_span_row_shows_the_hand_written_weights(tmp_path, model_dir, capsys, conversational):
    rows = [dict(row, pair_weight=2.0) for row in span_dataset(WORD_CONTENT, conversational).to_list()]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    tokens, weights = hand_written(WORD_EXPECTED, 0.5)
    shown = explain_json(capsys, "--model", model_dir, "--dataset", path, "--row", "1", "--span-default-weight", "0.5")
    assert shown["source"] == "spans" and shown["pair_weight"] == 2.0
    assert shown["rejected"]["tokens"] == tokens and shown["rejected"]["weights"] == weights
    assert shown["chosen"]["weights"] == [0.5] * len(shown["chosen"]["tokens"])  # no chosen spans in row 1


def test_weight_column_row_from_a_save_to_disk_folder(tmp_path, model_dir, tokenizer, capsys):
    tokens, weights = hand_written(WORD_EXPECTED, 1.0)
    weights[0] = 0.25
    dataset = span_dataset(WORD_CONTENT, conversational=False).remove_columns(
        ["chosen_weight_spans", "rejected_weight_spans"]
    )
    dataset = dataset.add_column("chosen_token_weights", [weights, [1.0] * 3])
    dataset = dataset.add_column("rejected_token_weights", [[1.0] * 3, weights])
    dataset.save_to_disk(tmp_path / "saved")
    shown = explain_json(capsys, "--model", model_dir, "--dataset", str(tmp_path / "saved"), "--row", "0")
    assert shown["source"] == "columns" and shown["pair_weight"] is None
    assert shown["chosen"]["tokens"] == tokens and shown["chosen"]["weights"] == weights


def test_row_without_weight_columns_shows_ti_dpo_weights(tmp_path, model_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "pairs.parquet"
    Dataset.from_dict({"prompt": [PROMPT], "chosen": [" see doctor ."], "rejected": [" no ."]}).to_parquet(path)
    shown = explain_json(capsys, "--model", model_dir, "--dataset", str(path), "--importance-lambda", "0.5")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    expected = token_weights(model, tokenizer, PROMPT, " see doctor .", importance_lambda=0.5)
    assert shown["source"] == "ti_dpo"
    assert shown["chosen"]["token_ids"] == expected.token_ids
    assert shown["chosen"]["weights"] == pytest.approx(expected.weights, abs=1e-6)
    assert shown["chosen"]["importance"] == pytest.approx(expected.importance, abs=1e-6)


def test_terminal_and_html_views(tmp_path, model_dir, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", span_dataset(WORD_CONTENT, conversational=False).to_list())
    page = tmp_path / "row.html"
    assert main(["explain", "--model", model_dir, "--dataset", path, "--html", str(page), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "weights from the span columns (tokens outside every span: 1.0)" in out
    assert "   6  see       3.0000" in out and "rejected:" in out
    html = page.read_text()
    assert "weight 3.000" in html and "weight 0.000" in html and "<h3 class=\"rejected\">" in html


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(fragment in err[0] for fragment in fragments), err


def test_bad_span_is_a_one_line_error_naming_the_row(tmp_path, model_dir, capsys):
    rows = span_dataset(WORD_CONTENT, conversational=False).to_list()
    rows[1]["rejected_weight_spans"] = [[0, 10, 1.0], [5, 12, 1.0]]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert main(["explain", "--model", model_dir, "--dataset", path, "--row", "1"]) == 2
    _one_line_error(capsys, "row 1, `rejected_weight_spans`", "overlap")


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--row", "7"], ["--row 7: the 'train' split has 2 rows"]),
        (["--prompt", "hi"], ["either --dataset", "not both"]),
        (["--split", "test"], ["--split: the dataset has no split 'test'"]),
        (["--span-default-weight", "nan"], ["--span-default-weight must be finite and >= 0"]),
    ],
    ids=["row", "both", "split", "default"],
)
def test_argument_errors(tmp_path, model_dir, capsys, argv, fragments):
    path = write_jsonl(tmp_path / "pairs.jsonl", span_dataset(WORD_CONTENT, conversational=False).to_list())
    assert main(["explain", "--model", model_dir, "--dataset", path, *argv]) == 2
    _one_line_error(capsys, *fragments)


def test_prompt_and_completion_still_required_without_a_dataset(model_dir, capsys):
    assert main(["explain", "--model", model_dir, "--prompt", "hi"]) == 2
    _one_line_error(capsys, "--prompt and --completion are required (or --dataset FILE --row N)")


@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_difference_row_shows_the_trainers_weights(tmp_path, model_dir, tokenizer, capsys, normalization):
    from trainer_probes import tidpo_args

    from trl_tidpo import TIDPOTrainer

    rows = [{"prompt": PROMPT, "chosen": " rest and see doctor now .", "rejected": " rest and take pills now ."}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    shown = explain_json(
        capsys, "--model", model_dir, "--dataset", path, "--token-weighting", "difference",
        "--difference-shared-weight", "0.25", "--weight-normalization", normalization,
    )  # fmt: skip
    trainer = TIDPOTrainer(
        model=model_dir,
        args=tidpo_args(tmp_path, token_weighting="difference", triplet_gamma=0.0, difference_shared_weight=0.25,
                        weight_normalization=normalization),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[0]])
    mask = batch["completion_mask"][:, 1:]
    expected = trainer.compute_token_weights(None, mask, batch["attention_mask"], None, input_ids=batch["input_ids"])
    assert shown["source"] == "difference"
    for row, side in enumerate(("chosen", "rejected")):
        assert shown[side]["weights"] == expected.weights[row][mask[row].bool()].tolist()
    # the differing middle ("see doctor" / "take pills") weighs more than the shared "rest and ... now . <eos>"
    assert shown["chosen"]["weights"][2] > shown["chosen"]["weights"][0]


def test_all_zero_weight_row_is_refused_with_the_trainers_message(tmp_path, model_dir, tokenizer, capsys):
    """`explain` runs the trainer's row checks: the row training refuses is refused, with the same message."""
    from trainer_probes import tidpo_args

    from trl_tidpo import TIDPOTrainer

    rows = [
        {"prompt": PROMPT, "chosen": " see doctor .", "rejected": " no .", "chosen_token_weights": [1.0] * 4,
         "rejected_token_weights": [1.0] * 3},
        {"prompt": PROMPT, "chosen": " see doctor .", "rejected": " no .", "chosen_token_weights": [1.0] * 4,
         "rejected_token_weights": [0.0] * 3},
    ]  # fmt: skip
    with pytest.raises(ValueError) as refused:
        TIDPOTrainer(
            model=model_dir,
            args=tidpo_args(tmp_path, token_weighting="dataset", triplet_gamma=0.0),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    message = str(refused.value)
    assert message.startswith("`train_dataset` row 1: every weight of `rejected_token_weights` is 0")
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    capsys.readouterr()
    assert main(["explain", "--model", model_dir, "--dataset", path, "--row", "1"]) == 2
    _one_line_error(capsys, message.replace("`train_dataset`", "`pairs.jsonl`"))
