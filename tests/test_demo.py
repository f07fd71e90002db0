import html
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trl_tidpo.tools.demo.data import (
    DISTRACTORS,
    TOPICS,
    critical_token_labels,
    generate_pairs,
    load_pairs,
    vocabulary,
)
from trl_tidpo.tools.demo.runner import DemoConfig, sequence_logps, run_demo
from trl_tidpo.tools.demo.tiny_models import build_tiny_llama, build_word_tokenizer
from trl_tidpo.tools.results import load_summary, verdict
from trl_tidpo.modeling.tokenization import tokenize_completion


@pytest.fixture(scope="module")
def rows():
    return load_pairs()


@pytest.fixture(scope="module")
def demo_tokenizer(rows):
    return build_word_tokenizer(vocabulary(rows))


def test_bundled_dataset_is_the_generator_output(rows):
    assert rows == generate_pairs()
    assert sum(r["split"] == "train" for r in rows) == 320 and sum(r["split"] == "test" for r in rows) == 80


def test_critical_spans_cover_exactly_the_critical_phrases(rows):
    for row in rows:
        for side in ("chosen", "rejected"):
            words = [row[side][start:end] for start, end in row[f"{side}_critical"]]
            assert words == row[f"{side}_phrase"].split(), row
        good_bad = [tuple(pair) for pair in TOPICS[row["topic"]]["phrases"]]
        assert (row["chosen_phrase"], row["rejected_phrase"]) in good_bad


def test_responses_differ_only_in_critical_words_and_one_distractor(rows):
    for row in rows:
        kept = {}
        for side in ("chosen", "rejected"):
            spans = row[f"{side}_critical"]
            kept[side] = []
            position = 0
            for word in row[side].split():
                start = row[side].index(word, position)
                position = start + len(word)
                if not any(s <= start < e for s, e in spans):
                    kept[side].append(word)
        assert len(kept["chosen"]) == len(kept["rejected"])
        diffs = [(c, r) for c, r in zip(kept["chosen"], kept["rejected"]) if c != r]
        assert len(diffs) == 1 and all(word in DISTRACTORS for word in diffs[0]), row


def test_critical_phrases_sit_at_the_start_middle_and_end(rows):
    """The prior favours the middle; the phrases must not all sit there, or the benchmark would reward position."""
    places = {"start": 0, "middle": 0, "end": 0}
    for row in rows:
        words = row["chosen"].split()
        first = row["chosen"][: row["chosen_critical"][0][0]].split()
        last = len(first) + len(row["chosen_phrase"].split())
        places["start" if not first else "end" if last == len(words) - 1 else "middle"] += 1
    assert all(count > len(rows) * 0.1 for count in places.values()), places


def test_critical_token_labels_mark_the_phrase_tokens(rows, demo_tokenizer):
    for row in rows[:50]:
        for side in ("chosen", "rejected"):
            labels = critical_token_labels(demo_tokenizer, row["prompt"], row[side], row[f"{side}_critical"])
            _, completion_ids = tokenize_completion(demo_tokenizer, row["prompt"], row[side])
            tokens = demo_tokenizer.convert_ids_to_tokens(completion_ids)
            assert len(labels) == len(tokens) and tokens[-1] == "<eos>" and not labels[-1]
            assert [t for t, c in zip(tokens, labels) if c] == row[f"{side}_phrase"].split()
            # The critical tokens are contiguous, at the word index the spans say
            index = len(row[side][: row[f"{side}_critical"][0][0]].split())
            assert labels.index(True) == index and sum(labels) == len(row[f"{side}_phrase"].split())


def test_sequence_logps_matches_a_per_token_loop(rows, demo_tokenizer):
    model = build_tiny_llama(len(demo_tokenizer), seed=1).eval()
    batch = rows[:5]  # different lengths: exercises the padding
    got = sequence_logps(model, demo_tokenizer, [r["prompt"] for r in batch], [r["chosen"] for r in batch], batch_size=5)
    for row, value in zip(batch, got):
        prompt_ids, completion_ids = tokenize_completion(demo_tokenizer, row["prompt"], row["chosen"])
        ids = prompt_ids + completion_ids
        expected = 0.0
        with torch.no_grad():
            for t in range(len(prompt_ids), len(ids)):
                logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1]
                expected += F.log_softmax(logits.double(), dim=-1)[ids[t]].item()
        assert value == pytest.approx(expected, abs=1e-4)


def _short_config(tmp_path):
    return DemoConfig(
        output_dir=str(tmp_path / "demo"),
        steps=3,
        sft_steps=3,
        max_eval_pairs=4,
        num_html_pairs=2,
        anchor_max_new_tokens=8,
        progress_bars=False,
    )


def test_short_demo_writes_every_output(tmp_path, capsys):
    summary = run_demo(_short_config(tmp_path))
    out = tmp_path / "demo"
    printed = capsys.readouterr().out
    assert "held-out preference accuracy" in printed and "critical-token ROC-AUC of weights" in printed
    saved = json.loads((out / "summary.json").read_text())
    assert list(saved["results"]) == ["DPO", "TI-DPO"]
    for result in saved["results"].values():
        for key in ("accuracy", "margin", "roc_auc", "top_k_share", "seconds_per_step"):
            assert isinstance(result[key], float)
        assert len(result["curves"]["loss"]) == 3
    assert saved["num_test_pairs"] == 4 and saved["results"]["DPO"]["accuracy"] == summary["results"]["DPO"]["accuracy"]
    page = (out / "token_importance.html").read_text()
    assert page.count('class="pair"') == 2 and 'class="tok critical"' in page
    # The closing line and the page's second verdict are the benchmarks' verdict, read from the summary JSON
    benchmarks = verdict(load_summary(Path(__file__).resolve().parents[1] / "docs" / "benchmarks_summary.json"))
    assert printed.rstrip().splitlines()[-1].endswith(benchmarks)
    assert html.escape(benchmarks) in page and "where 0.5 is chance" in page
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "tidpo-model" / "config.json").is_file()


def test_short_demo_without_matplotlib_writes_the_rest(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    run_demo(_short_config(tmp_path))
    out = tmp_path / "demo"
    assert (out / "summary.json").is_file() and (out / "token_importance.html").is_file()
    assert not (out / "training_curves.png").exists()
    assert 'pip install "trl-tidpo[plot]"' in capsys.readouterr().out


def test_critical_token_labels_through_a_chat_template(rows, demo_tokenizer):
    from trl_tidpo.tools.demo.data import to_conversational

    row = to_conversational(rows[0])
    assert row["chosen"][0]["content"] == rows[0]["chosen"].strip()
    labels = critical_token_labels(demo_tokenizer, row["prompt"], row["chosen"], row["chosen_critical"])
    _, completion_ids = tokenize_completion(demo_tokenizer, row["prompt"], row["chosen"])
    tokens = demo_tokenizer.convert_ids_to_tokens(completion_ids)
    assert [t for t, c in zip(tokens, labels) if c] == rows[0]["chosen_phrase"].split()


def test_weight_metrics_with_and_without_special_tokens():
    from trl_tidpo.tools.demo.runner import weight_metrics

    # Row tokens: a, CRIT, b, EOS. Weights put EOS first, the critical token second.
    rows = [{"weights": [0.5, 2.0, 1.0, 4.0], "critical": [False, True, False, False], "special": [False, False, False, True]}]
    metrics = weight_metrics(rows)
    # All tokens: the critical token (2.0) beats 0.5 and 1.0 but not 4.0: AUC 2/3; its rank is 2nd, so top-1 misses it
    assert metrics["roc_auc"] == pytest.approx(2 / 3) and metrics["top_k_share"] == 0.0
    # EOS left out: 2.0 beats both others, AUC 1, and is the top-1
    assert metrics["roc_auc_content"] == 1.0 and metrics["top_k_share_content"] == 1.0


def test_html_table_shows_the_baselines_next_to_the_weight_metrics():
    from trl_tidpo.tools.demo.report import table_rows

    weights = {"roc_auc": 0.61, "top_k_share": 0.31, "roc_auc_content": 0.66, "top_k_share_content": 0.41}
    result = {"accuracy": 0.75, "margin": 0.2, "seconds_per_step": 0.1, **weights}
    summary = {
        "results": {"TI-DPO": result},
        "start": {key: 0.55 for key in weights},
        "prior_only": {key: 0.52 for key in weights},
        "uniform": {"roc_auc": 0.5, "top_k_share": 0.2, "roc_auc_content": 0.5, "top_k_share_content": 0.25},
        "base_rate": 0.125,
        "base_rate_content": 0.15,
    }
    rows = {row[0]: row[1:] for row in table_rows(summary, with_baselines=True)}
    assert rows["metric"] == ["TI-DPO", "starting model", "Gaussian prior alone", "uniform weights",
                              "random weights (expected)"]  # fmt: skip
    assert rows["critical-token ROC-AUC of weights"] == ["0.610", "0.550", "0.520", "0.500", "0.500"]
    top_k = "critical share of top-k weights (k = the response's critical tokens)"
    assert rows[top_k] == ["0.310", "0.550", "0.520", "0.200", "0.125"]
    assert rows["  same top-k share, special tokens left out"] == ["0.410", "0.550", "0.520", "0.250", "0.150"]
    assert rows["held-out preference accuracy"] == ["0.750", "–", "–", "–", "–"]
    assert len(table_rows(summary)[0]) == 2  # the terminal table keeps its baselines below it


def test_html_note_on_heavy_special_tokens():
    from trl_tidpo.tools.demo.report import special_share_note

    rows = [
        {"weights": [0.5, 4.0], "special": [False, True]},
        {"weights": [0.9, 0.1, 3.0], "special": [False, False, True]},
    ]
    assert "special tokens average 3.5 here" in special_share_note(rows)  # (4.0 + 3.0) / 2
    assert special_share_note([{"weights": [0.9, 1.1], "special": [False, True]}]) == ""  # 1.1: not heavy
    assert special_share_note([{"weights": [1.0], "special": [False]}]) == ""
