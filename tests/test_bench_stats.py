"""`benchmarks/bench_stats.py`: the benchmarks' shared statistics, against hand-computed numbers and explicit loops."""

import math
import sys
from pathlib import Path

import mpmath
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_stats  # noqa: E402


def student_t_quantile_975(df: int) -> float:
    """Independent: solve `CDF_t(x; df) = 0.975` with mpmath, `CDF = 1 − I_{df/(df+x²)}(df/2, 1/2) / 2`."""
    cdf = lambda x: 1 - mpmath.betainc(df / 2, 0.5, 0, df / (df + x * x), regularized=True) / 2  # noqa: E731
    return float(mpmath.findroot(lambda x: cdf(x) - 0.975, 2.0 if df > 2 else 5.0))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 17, 30, 31, 45, 200])
def test_t_quantiles(df):
    assert bench_stats.t_quantile_975(df) == pytest.approx(student_t_quantile_975(df), abs=1.5e-4)


def test_t_quantile_known_values_and_no_interval_below_two_seeds():
    # the textbook table: t_{0.975} for df 1, 2, 9, 29
    assert [round(bench_stats.t_quantile_975(df), 3) for df in (1, 2, 9, 29)] == [12.706, 4.303, 2.262, 2.045]
    with pytest.raises(ValueError, match="at least 2 seeds"):
        bench_stats.t_quantile_975(0)


def test_seed_level_ci_by_hand():
    """d = (0.1, 0.3, 0.2): mean 0.2, sd 0.1, SE 0.1/√3 = 0.0577350, half-width 4.3027 × SE = 0.2484166."""
    out = bench_stats.seed_level_ci([0.1, 0.3, 0.2])
    assert out["mean"] == pytest.approx(0.2)
    assert out["se"] == pytest.approx(0.0577350, abs=1e-7)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((0.2 - 0.2484166, 0.2 + 0.2484166), abs=1e-6)
    assert (out["seeds"], out["df"]) == (3, 2)
    one = bench_stats.seed_level_ci([0.4])
    assert one["mean"] == 0.4 and one["ci_low"] is None and one["se"] is None


def test_paired_bootstrap_over_prompts_and_seeds_against_explicit_loops():
    rng = np.random.default_rng(0)
    variant, baseline = (rng.random((4, 30)) < 0.5).astype(float), (rng.random((4, 30)) < 0.4).astype(float)
    out = bench_stats.paired_bootstrap(variant, baseline, reps=300, seed=5)
    assert out["mean"] == pytest.approx(variant.mean() - baseline.mean())
    draw = np.random.default_rng(5)
    seed_draws, prompt_draws = draw.integers(4, size=(300, 4)), draw.integers(30, size=(300, 30))
    means = []
    for rows, cols in zip(seed_draws, prompt_draws):
        total = sum(variant[r, c] - baseline[r, c] for r in rows for c in cols)
        means.append(total / (4 * 30))
    assert out["ci_low"] == pytest.approx(np.percentile(means, 2.5))
    assert out["ci_high"] == pytest.approx(np.percentile(means, 97.5))
    assert out["se"] == pytest.approx(np.std(means, ddof=1))


def test_paired_bootstrap_over_prompts_only_keeps_every_seed():
    rng = np.random.default_rng(1)
    variant, baseline = rng.normal(size=(3, 20)), rng.normal(size=(3, 20))
    out = bench_stats.paired_bootstrap(variant, baseline, reps=200, seed=7, resample_seeds=False)
    draw = np.random.default_rng(7)
    means = []
    for cols in draw.integers(20, size=(200, 20)):
        means.append(sum(variant[s, c] - baseline[s, c] for s in range(3) for c in cols) / 60)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert out["kind"] == "bootstrap over prompts"


def test_a_start_baseline_is_shared_by_every_seed():
    variant = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    out = bench_stats.paired_bootstrap(variant, np.array([0.0, 0.0, 1.0]), reps=50)
    assert out["mean"] == pytest.approx((1 + 0 + 0 + 1 + 1 + 0) / 6)


def test_hierarchical_bootstrap_against_explicit_loops():
    rng = np.random.default_rng(2)
    variant, baseline = rng.normal(size=(3, 10)), rng.normal(size=(3, 10))
    out = bench_stats.hierarchical_bootstrap(variant, baseline, reps=100, seed=3)
    draw = np.random.default_rng(3)
    means = []
    for _ in range(100):
        seeds = draw.integers(3, size=3)
        prompts = draw.integers(10, size=(3, 10))
        total = 0.0
        for k in range(3):  # the k-th drawn seed gets its own prompts
            for j in range(10):
                total += variant[seeds[k], prompts[k, j]] - baseline[seeds[k], prompts[k, j]]
        means.append(total / 30)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert out["se"] == pytest.approx(np.std(means, ddof=1))


def test_constant_differences_give_a_point_interval():
    diff = np.full((3, 40), 0.25)
    for out in (
        bench_stats.paired_bootstrap(diff, np.zeros_like(diff), reps=100),
        bench_stats.hierarchical_bootstrap(diff, np.zeros_like(diff), reps=100),
        bench_stats.seed_level_ci(diff.mean(1)),
    ):
        assert out["ci_low"] == pytest.approx(0.25) and out["ci_high"] == pytest.approx(0.25)


def test_compare_reports_per_seed_differences_and_the_headline():
    variant = np.array([[1, 1, 0, 1], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=float)
    baseline = np.array([[0, 1, 0, 1], [0, 1, 0, 0], [1, 0, 1, 1]], dtype=float)
    out = bench_stats.compare(variant, baseline, reps=200)
    assert out["per_seed"] == pytest.approx([0.25, 0.25, 0.25])
    assert bench_stats.headline_ci(out) is out["seed_level"]
    one = bench_stats.compare(variant[:1], baseline[:1], reps=200)
    assert bench_stats.headline_ci(one) is one["prompt_level"]  # one seed: no seed-level interval


def test_gained_lost():
    gained, lost = bench_stats.gained_lost(np.array([[1, 0, 1], [0, 0, 1]]), np.array([0, 1, 1]))
    assert (gained, lost) == ([1, 0], [1, 1])


def test_learning_rate_selection_ties_and_edges():
    scores = {1e-4: [(0.5, -3.0)], 2e-4: [(0.6, -4.0)], 4e-4: [(0.6, -2.0)]}
    out = bench_stats.select_learning_rate(scores, [1e-4, 2e-4, 4e-4])
    assert out["learning_rate"] == 4e-4  # tie on accuracy: the better log-prob
    assert out["edge"] == "high" and out["beyond"] == pytest.approx(8e-4)
    # two seeds per point: the mean decides (0.55 at 3e-5 vs 0.5 at 1e-4)
    scores = {3e-5: [(0.6, -1.0), (0.5, -1.0)], 1e-4: [(0.5, -1.0), (0.5, -1.0)], 3e-4: [(0.1, -9.0), (0.2, -9.0)]}
    out = bench_stats.select_learning_rate(scores, [3e-5, 1e-4, 3e-4])
    assert out["learning_rate"] == 3e-5 and out["edge"] == "low" and out["beyond"] == pytest.approx(9e-6)
    inside = bench_stats.select_learning_rate({1e-5: [(0.1,)], 3e-5: [(0.9,)], 1e-4: [(0.2,)]}, [1e-5, 3e-5, 1e-4])
    assert inside["edge"] is None and inside["beyond"] is None


def test_extended_rate_is_the_one_float_a_typed_rate_gives():
    # 2e-3 * 2e-3 / 8e-4 is 0.004999999999999999 in binary floating point: a merge with a run typed as 5e-3 then shows
    # two grid columns "lr 0.005" (it did, on the text benchmark)
    assert 2e-3 * 2e-3 / 8e-4 != 5e-3
    assert bench_stats.extend_grid([4e-4, 8e-4, 2e-3], "high") == 5e-3
    assert bench_stats.extend_grid([2e-4, 6e-4], "low") == float("6.66667e-05")


def test_extend_grid_steps_geometrically():
    assert bench_stats.extend_grid([1e-4, 2e-4, 4e-4], "low") == pytest.approx(5e-5)
    assert bench_stats.extend_grid([1e-4, 2e-4, 4e-4], "high") == pytest.approx(8e-4)
    with pytest.raises(ValueError, match="two rates"):
        bench_stats.extend_grid([1e-4], "low")


def test_gate_uses_the_seed_level_interval_and_flags_a_missing_dpo():
    start = np.array([0.0, 1.0, 0.0, 0.0])
    strong = np.array([[1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1]], dtype=float)  # per seed +0.5, +0.5, +0.75
    out = bench_stats.gate(["DPO", "TI-DPO"], bench_stats.compare(strong, start, reps=100))
    # seed-level: mean 0.5833, sd 0.1443, SE 0.0833 → 0.5833 > 2 × 0.0833
    assert out["passed"] is True and out["basis"] == "seed-level"
    assert out["se"] == pytest.approx(math.sqrt(((0.5 - 7 / 12) ** 2 * 2 + (0.75 - 7 / 12) ** 2) / 2) / math.sqrt(3))
    noisy = np.array([[1, 1, 1, 1], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=float)  # per seed +0.75, 0, +0.25
    assert bench_stats.gate(["DPO"], bench_stats.compare(noisy, start, reps=100))["passed"] is False
    missing = bench_stats.gate(["TI-DPO"], None)
    assert missing["passed"] is None and "DPO is not among the variants" in missing["message"]
    one_seed = bench_stats.gate(["DPO"], bench_stats.compare(strong[:1], start, reps=100))
    assert one_seed["basis"] == "prompt-level (one seed)"


def test_summary_rows_pair_seeds_with_dpo():
    import summarize

    head = {
        "benchmark": "toy", "title": "Toy", "doc": "docs/toy.md", "metric": "held-out accuracy", "start": 0.2,
        "variants": {
            "X": {"seeds": [2, 0, 1], "per_seed": [0.7, 0.5, 0.6], "cpu_s_per_step": 3.0, "prompt_ci": [0.0, 0.3]},
            "DPO": {"seeds": [0, 1, 2], "per_seed": [0.4, 0.4, 0.5], "cpu_s_per_step": 1.5, "prompt_ci": None},
        },
    }  # fmt: skip
    entry, rows = summarize.summarize_benchmark(head)
    assert entry["seeds"] == 3 and entry["dpo"] == pytest.approx(13 / 30) and entry["start"] == 0.2
    assert [r["variant"] for r in rows] == ["DPO", "X"]
    x = rows[1]
    # per seed (by seed id): 0.5 − 0.4, 0.6 − 0.4, 0.7 − 0.5 = 0.1, 0.2, 0.2: mean 1/6, sd 0.057735, SE 0.033333
    assert x["delta"] == pytest.approx(1 / 6)
    half = 4.3027 * (0.0577350 / math.sqrt(3))
    assert x["ci"] == pytest.approx([1 / 6 - half, 1 / 6 + half], abs=1e-5)
    assert x["prompt_ci"] == [0.0, 0.3] and x["cpu_ratio_vs_dpo"] == pytest.approx(2.0) and x["seeds"] == 3
    assert entry["gate_passed"] is None  # a headline without a gate (written before it was kept)


def test_summary_carries_the_benchmarks_sanity_gate():
    import summarize

    head = {
        "benchmark": "toy", "title": "Toy", "doc": "docs/toy.md", "metric": "held-out accuracy", "start": 0.2,
        "variants": {"DPO": {"seeds": [0, 1], "per_seed": [0.3, 0.1], "cpu_s_per_step": 1.0, "prompt_ci": None}},
        "gate": {"passed": False, "message": "DPO − start +0.0000: FAILED"},
    }  # fmt: skip
    entry, _ = summarize.summarize_benchmark(head)
    assert entry["gate_passed"] is False and entry["gate"] == "DPO − start +0.0000: FAILED"
    beside = {"passed": True, "message": "passed"}  # the tiny screen keeps its gate beside the headline
    entry, _ = summarize.summarize_benchmark({**head, "gate": None}, beside)
    assert entry["gate_passed"] is True


def test_report_pairs_by_seed_and_its_tables_are_well_formed():
    import bench_report

    def record(variant, seed, correct, dev=None):
        r = {"variant": variant, "learning_rate": 1e-4, "seed": seed, "cpu_seconds_per_step": 2.0 if variant == "X" else 1.0,
             "eval": {"correct": correct, "gold_logp": [-1.0] * 4, "malformed": [0] * 4}}  # fmt: skip
        if dev is not None:
            r["dev"] = {"accuracy": dev, "gold_logp": -1.0}
        return r

    records = [record("DPO", 0, [1, 1, 0, 0], 0.5), record("DPO", 1, [1, 1, 1, 0]),
               record("X", 0, [1, 0, 0, 0], 0.4), record("X", 1, [1, 1, 0, 0])]  # fmt: skip
    start = {s: {"correct": [1, 0, 0, 0], "gold_logp": [-2.0] * 4, "malformed": [0] * 4} for s in (0, 1)}
    selection = {v: {"learning_rate": 1e-4, "edge": None, "beyond": None} for v in ("DPO", "X")}
    report = bench_report.build_report(records, start, selection, grid_seeds=[0], families=["a", "a", "b", "b"], reps=50)
    x = report["variants"]["X"]
    assert x["vs_dpo_correct"]["per_seed"] == pytest.approx([-0.25, -0.25])  # seed by seed: 0.25 − 0.5, 0.5 − 0.75
    assert x["vs_dpo_correct/b"]["mean"] == pytest.approx(-0.25)  # family b: (0 − 0, 0 − 0.5) / 2
    assert (x["gained_per_seed"], x["lost_per_seed"]) == ([0, 1], [0, 0])
    assert report["variants"]["DPO"]["vs_start"]["per_seed"] == pytest.approx([0.25, 0.5])
    lines = bench_report.markdown(report).splitlines()
    header, tables = 0, 0
    for previous, line in zip([""] + lines, lines):  # every row of a table has its header's column count
        if line.startswith("|") and not previous.startswith("|"):
            header, tables = line.count("|"), tables + 1
        if line.startswith("|"):
            assert line.count("|") == header, line
    assert tables == 3  # main, per family, grid
    assert bench_report.headline(report, benchmark="t", title="T", doc="d")["variants"]["X"]["cpu_s_per_step"] == 2.0


def test_logged_means_average_each_metric_over_the_entries_that_log_it():
    import bench_runner

    history = [
        {"loss": 0.7, "triplet/anchor_equals_rejected": 0.5, "rewards/margins": 0.1},
        {"loss": 0.6, "triplet/anchor_equals_rejected": 0.0},
        {"train_loss": 0.65},  # the closing entry logs none of them
    ]
    means = bench_runner.logged_means(history)
    assert means == {"rewards/margins": 0.1, "triplet/anchor_equals_rejected": 0.25}  # (0.5 + 0.0) / 2, loss left out
