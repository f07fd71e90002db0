"""`benchmarks/tiny_arithmetic.py`: the task and statistics (fast), and the smallest configuration end to end (slow)."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
spec = importlib.util.spec_from_file_location("tiny_arithmetic_benchmark", BENCHMARKS / "tiny_arithmetic.py")
tiny_arithmetic = importlib.util.module_from_spec(spec)
sys.modules["tiny_arithmetic_benchmark"] = tiny_arithmetic
spec.loader.exec_module(tiny_arithmetic)
import tiny_stats  # noqa: E402
import tiny_task  # noqa: E402


def test_problems_splits_and_carry_dropped_answers():
    splits = tiny_task.make_splits({"heldout": 100, "dev": 50, "sft": -1}, seed=3)
    assert [len(s) for s in splits.values()] == [100, 50, 8100 - 150]
    assert len({(p.a, p.b) for s in splits.values() for p in s}) == 8100  # disjoint, complete
    p = tiny_task.Problem(29, 53)
    assert (p.prompt, p.answer, p.carries, p.carry_dropped) == ("2 9 + 5 3 =", " 8 2", True, " 7 2")
    assert tiny_task.Problem(74, 51).carry_dropped == " 2 5" and tiny_task.Problem(74, 51).carries  # tens carry
    assert not tiny_task.Problem(21, 53).carries and tiny_task.Problem(21, 53).carry_dropped == " 7 4"
    targets = tiny_task.sft_completions(splits["sft"], 0.7, seed=0)
    dropped = [t != p.answer for p, t in zip(splits["sft"], targets)]
    assert all(p.carries and t == p.carry_dropped for p, t, d in zip(splits["sft"], targets, dropped) if d)
    share = sum(dropped) / sum(p.carries for p in splits["sft"])
    assert 0.65 < share < 0.75
    tokenizer = tiny_task.build_tokenizer()
    ids = tokenizer(p.prompt + p.answer, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["2", "9", "+", "5", "3", "=", "8", "2"]  # one token per digit


def test_paired_difference_against_explicit_loops():
    rng = np.random.default_rng(0)
    variant, baseline = rng.random((4, 30)) < 0.5, rng.random((4, 30)) < 0.4
    out = tiny_stats.paired_difference(variant, baseline, reps=300, seed=5)
    assert out["mean"] == pytest.approx(variant.mean() - baseline.mean())
    # the same resamples drawn by hand: seeds then prompts, with replacement
    draw = np.random.default_rng(5)
    means = []
    for _ in range(300):
        rows, cols = draw.integers(4, size=4), draw.integers(30, size=30)
        total = sum(float(variant[r, c]) - float(baseline[r, c]) for r in rows for c in cols)
        means.append(total / (4 * 30))
    assert out["ci_low"] == pytest.approx(np.percentile(means, 2.5))
    assert out["ci_high"] == pytest.approx(np.percentile(means, 97.5))
    assert out["se"] == pytest.approx(statistics.stdev(means))
    gained, lost = tiny_stats.gained_lost(np.array([[1, 0, 1], [0, 0, 1]]), np.array([0, 1, 1]))
    assert (gained, lost) == ([1, 0], [1, 1])


@pytest.mark.slow
def test_smallest_configuration_end_to_end(tmp_path, one_thread):
    output = tmp_path / "tiny.json"
    argv = ["--variants", "DPO", "difference", "--seeds", "0", "1", "--grid-seeds", "1", "--learning-rates", "1e-5",
            "3e-5", "--steps", "3", "--batch-size", "8", "--heldout", "60", "--dev", "40", "--pair-prompts", "600",
            "--sft-steps", "400", "--share-pairs", "8", "--bootstrap", "200", "--processes", "1", "--no-gate",
            "--output", str(output)]  # fmt: skip
    summary = tiny_arithmetic.main(argv)
    assert json.loads(output.read_text()) == json.loads(json.dumps(summary))
    assert set(summary["variants"]) == {"DPO", "difference"}
    assert 0.0 <= summary["start"]["heldout_accuracy"] <= 1.0
    for name, v in summary["variants"].items():
        assert v["seeds"] == [0, 1] and len(v["accuracy"]) == len(v["gold_logp"]) == 2
        assert v["learning_rate"] in (1e-5, 3e-5)
        # the paired mean difference is the difference of the means, and its CI contains it
        dpo = summary["variants"]["DPO"]
        for metric in ("accuracy", "gold_logp"):
            paired = v["vs_dpo"][metric]
            assert paired["mean"] == pytest.approx(statistics.mean(v[metric]) - statistics.mean(dpo[metric]))
            assert paired["ci_low"] <= paired["mean"] <= paired["ci_high"]
        gain = v["vs_start_accuracy"]["mean"]
        assert gain == pytest.approx(statistics.mean(v["accuracy"]) - summary["start"]["heldout_accuracy"])
        # gained − lost prompts per seed = the accuracy change times the number of held-out prompts
        for acc, g, lost in zip(v["accuracy"], v["gained"], v["lost"]):
            assert g - lost == round((acc - summary["start"]["heldout_accuracy"]) * 60)
        assert 0.0 < v["decisive_gradient_share"] <= 1.0
        # the chosen learning rate's grid point holds seed 0's run, on dev and held-out
        point = summary["grid"][name][str(v["learning_rate"])]
        assert point["seeds"] == [0] and point["heldout_accuracy"][0] == pytest.approx(v["accuracy"][0])
    assert summary["cpu_seconds"]["total"] > 0 and isinstance(summary["gate"]["passed"], bool)
