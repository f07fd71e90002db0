"""`benchmarks/tiny_screen.py` and `benchmarks/screen_report.py`: one seed's process end to end at the smallest size,
and the report's rate choice and seed-level interval against independent computations."""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import screen_report  # noqa: E402

T_975_DF1 = 12.7062  # Student t, two-sided 95 %, 1 degree of freedom (the standard table)


def fake_file(seed: int, accuracy: dict[tuple[str, float], list[int]], start: list[int]) -> dict:
    """A per-seed screen file: each (variant, rate) run's dev and held-out answers are the same 0/1 list."""
    runs = [
        {"variant": name, "learning_rate": lr, "seed": seed, "steps": 10, "train_cpu_seconds": 1.0,
         "dev": {"correct": ok, "gold_logp": [-1.0] * len(ok)},
         "heldout": {"correct": ok, "gold_logp": [-1.0] * len(ok), "malformed": [False] * len(ok)},
         "triplet_metrics": [], "gradient_conflict": []}
        for (name, lr), ok in accuracy.items()
    ]  # fmt: skip
    start_evals = {"correct": start, "gold_logp": [-2.0] * len(start)}
    return {"seed": seed, "args": {"seed": seed}, "start": {"dev": start_evals, "heldout": start_evals}, "pairs": 5,
            "sft_cpu_seconds": 1.0, "cpu_seconds": 2.0, "runs": runs}  # fmt: skip


def test_report_chooses_on_dev_and_gives_a_seed_level_interval():
    """Two seeds; the variant's best dev rate is 1e-4 (not DPO's 3e-5). Its per-seed differences vs DPO are +0.25 and
    +0.5, so the seed-level CI is 0.375 ± t(0.975, 1) · sd / √2."""
    files = [
        fake_file(0, {("DPO", 3e-5): [1, 1, 0, 0], ("DPO", 1e-4): [1, 0, 0, 0],
                      ("V", 3e-5): [0, 0, 0, 0], ("V", 1e-4): [1, 1, 1, 0]}, start=[0, 0, 0, 0]),
        fake_file(1, {("DPO", 3e-5): [1, 0, 0, 0], ("DPO", 1e-4): [0, 0, 0, 0],
                      ("V", 3e-5): [1, 0, 0, 0], ("V", 1e-4): [1, 1, 1, 0]}, start=[0, 0, 0, 0]),
    ]  # fmt: skip
    summary = screen_report.report(files, grid_seeds=[0, 1])
    assert summary["variants"]["V"]["learning_rate"] == 1e-4
    assert summary["variants"]["DPO"]["learning_rate"] == 3e-5
    seed_level = summary["variants"]["V"]["vs_dpo_accuracy"]["seed_level"]
    diffs = [0.75 - 0.5, 0.75 - 0.25]
    half = T_975_DF1 * statistics.stdev(diffs) / math.sqrt(2)
    assert seed_level["mean"] == pytest.approx(0.375)
    assert (seed_level["ci_low"], seed_level["ci_high"]) == pytest.approx((0.375 - half, 0.375 + half), abs=1e-4)
    assert summary["variants"]["V"]["rate_selection"]["edge"] == "high"  # 1e-4 is the top of its grid
    assert summary["headline"]["variants"]["V"]["per_seed"] == [0.75, 0.75]


def test_report_refuses_a_variant_missing_a_seed():
    files = [
        fake_file(0, {("DPO", 3e-5): [1, 0], ("V", 3e-5): [1, 1]}, start=[0, 0]),
        fake_file(1, {("DPO", 3e-5): [1, 0]}, start=[0, 0]),
    ]
    with pytest.raises(SystemExit, match="V ran seeds \\[0\\], DPO \\[0, 1\\]"):
        screen_report.report(files, grid_seeds=[0, 1])


@pytest.mark.slow
def test_one_seed_process_end_to_end(tmp_path, monkeypatch):
    """The smallest run: a start, a contrastive π± recipe, and a triplet variant under the probe; the JSON holds the
    per-prompt records, the anchor-copy shares over training and the gradient-conflict probes."""
    import tiny_screen

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tiny_screen.main([
        "--seed", "98", "--variants", "DPO", "TI-DPO skip copies", "cDPO (SFT π±)", "--learning-rates", "1e-4",
        "--steps", "2", "--sft-steps", "30", "--pair-prompts", "200", "--batch-size", "4", "--heldout", "20",
        "--dev", "20", "--probe-every", "1", "--out-dir", str(tmp_path),
    ])  # fmt: skip
    data = json.loads(Path(out).read_text())
    runs = {r["variant"]: r for r in data["runs"]}
    assert set(runs) == {"DPO", "TI-DPO skip copies", "cDPO (SFT π±)"}
    assert all(len(r["heldout"]["correct"]) == 20 for r in runs.values())
    probed = runs["TI-DPO skip copies"]
    assert [c["step"] for c in probed["gradient_conflict"]] == [0, 1]
    assert {"triplet/anchor_equals_chosen", "triplet/anchor_equals_rejected", "triplet/skipped_rows"} <= set(
        probed["triplet_metrics"][0]
    )
    assert runs["DPO"]["gradient_conflict"] == [] and runs["DPO"]["triplet_metrics"] == []
    assert data["args"]["contrastive_cpu_seconds"]["sft"] > 0


def test_gradient_conflict_matches_separate_backward_passes():
    """`triplet_probe.gradient_conflict` against two ordinary backward passes, each into fresh `.grad`s: the norm ratio
    and the cosine of the flattened parameter gradients (a frozen parameter is left out)."""
    import torch
    from triplet_probe import gradient_conflict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    x = torch.randn(5, 3)

    def terms():
        out = model(x)
        return out[:, 0].pow(2).mean(), 0.3 * out[:, 1].sin().sum()

    expected = []
    for index in (0, 1):
        model.zero_grad(set_to_none=True)
        terms()[index].backward()
        expected.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))
    model.zero_grad(set_to_none=True)
    measured = gradient_conflict(model, *terms())
    assert measured["norm_ratio"] == pytest.approx((expected[1].norm() / expected[0].norm()).item(), rel=1e-5)
    cosine = torch.nn.functional.cosine_similarity(expected[0], expected[1], dim=0).item()
    assert measured["cosine"] == pytest.approx(cosine, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # the probe leaves the step's own gradients alone
