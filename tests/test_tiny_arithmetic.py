"""`benchmarks/tiny_arithmetic.py`: the task (fast), and the smallest configuration end to end (slow). The statistics are
tested in `test_bench_stats.py`."""

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


@pytest.mark.slow
def test_smallest_configuration_end_to_end(tmp_path, one_thread):
    output = tmp_path / "tiny.json"
    argv = ["--variants", "DPO", "difference", "--seeds", "0", "1", "--grid-seeds", "1", "--learning-rates", "1e-5",
            "3e-5", "--steps", "3", "--batch-size", "8", "--heldout", "60", "--dev", "40", "--pair-prompts", "600",
            "--sft-steps", "400", "--share-pairs", "8", "--bootstrap", "200", "--processes", "1", "--no-gate",
            "--output", str(output)]  # fmt: skip
    summary = tiny_arithmetic.main(argv)
    assert json.loads(output.read_text()) == json.loads(json.dumps(summary))
    report = summary["report"]
    assert set(report["variants"]) == {"DPO", "difference"}
    assert set(summary["starts"]) == {"0", "1"}  # each seed its own SFT start and pairs
    start_acc = {s: summary["starts"][str(s)]["heldout_accuracy"] for s in (0, 1)}
    assert all(0.0 <= a <= 1.0 for a in start_acc.values())
    dpo = report["variants"]["DPO"]
    for name, v in report["variants"].items():
        assert v["seeds"] == [0, 1] and len(v["accuracy_per_seed"]) == len(v["gold_logp_per_seed"]) == 2
        assert v["learning_rate"] in (1e-5, 3e-5) and v["edge"] in ("low", "high")  # a 2-point grid: always an edge
        if name != "DPO":  # the paired mean difference is the difference of the means, and its CIs contain it
            for metric, key in (("accuracy_per_seed", "vs_dpo_correct"), ("gold_logp_per_seed", "vs_dpo_gold_logp")):
                paired = v[key]
                assert paired["mean"] == pytest.approx(statistics.mean(v[metric]) - statistics.mean(dpo[metric]))
                for interval in (paired["seed_level"], paired["prompt_level"]):
                    assert interval["ci_low"] <= paired["mean"] <= interval["ci_high"]
        gain = v["vs_start"]["per_seed"]
        assert gain == pytest.approx([a - start_acc[s] for a, s in zip(v["accuracy_per_seed"], (0, 1))])
        # gained − lost prompts per seed = the accuracy change times the number of held-out prompts
        for acc, s, g, lost in zip(v["accuracy_per_seed"], (0, 1), v["gained_per_seed"], v["lost_per_seed"]):
            assert g - lost == round((acc - start_acc[s]) * 60)
        assert 0.0 < v["decisive_gradient_share"] <= 1.0
        # the chosen learning rate's grid point holds seed 0's run
        point = report["grid"][name][str(v["learning_rate"])]
        assert point["seeds"] == [0] and point["accuracy"][0] == pytest.approx(v["accuracy_per_seed"][0])
    assert summary["cpu_seconds"]["total"] > 0 and isinstance(summary["gate"]["passed"], bool)
    assert summary["headline"]["variants"]["difference"]["per_seed"] == report["variants"]["difference"]["accuracy_per_seed"]
