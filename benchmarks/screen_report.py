"""
Rate selection and the report of a per-seed screen (`benchmarks/tiny_screen.py`'s JSON files).

    python benchmarks/screen_report.py choose runs/seed*-grid.json --output runs/chosen.json
    python benchmarks/screen_report.py report runs/*.json --output docs/tiny_screen.json
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import compare, gate, headline_ci, select_learning_rate

from variants import VARIANTS

ORDER = list(VARIANTS)  # the report lists the variants in `benchmarks/variants.py`'s order


def load_runs(paths: list[str]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths]


def dev_scores_of(grid_files: list[dict]) -> dict[str, dict[float, list[tuple[float, float]]]]:
    """Per variant and rate, one `(dev accuracy, dev gold log-prob)` per grid seed."""
    scores: dict[str, dict[float, list]] = {}
    for f in grid_files:
        for run in f["runs"]:
            scores.setdefault(run["variant"], {}).setdefault(run["learning_rate"], []).append(
                (statistics.mean(run["dev"]["correct"]), statistics.mean(run["dev"]["gold_logp"]))
            )
    return scores


def choose_rates(dev_scores: dict[str, dict[float, list[tuple[float, float]]]]) -> dict[str, dict]:
    """Per variant, `bench_stats.select_learning_rate` over the rates its grid seeds ran (best mean dev accuracy;
    ties: the best dev gold log-prob), with the grid-edge flag."""
    return {name: select_learning_rate(by_rate, sorted(by_rate)) for name, by_rate in dev_scores.items()}


def final_runs(files: list[dict], chosen: dict[str, float]) -> dict[str, list[dict]]:
    """Per variant, its run at the chosen rate for every seed (grid seeds' runs are reused), sorted by seed."""
    runs: dict[str, dict[int, dict]] = {}
    for f in files:
        for run in f["runs"]:
            if run["learning_rate"] == chosen.get(run["variant"]):
                runs.setdefault(run["variant"], {})[run["seed"]] = run
    return {name: [by_seed[s] for s in sorted(by_seed)] for name, by_seed in runs.items()}


def triplet_diagnostics(runs: list[dict]) -> dict | None:
    """Mean anchor-copy shares over training, and the gradient-conflict probes after step 0 (at step 0 the policy is
    the reference: every log-ratio is 0 and so is the triplet's gradient)."""
    shares = [m for r in runs for m in r["triplet_metrics"]]
    probes = [c for r in runs for c in r["gradient_conflict"] if c["step"] > 0]
    if not shares:
        return None
    out = {key: statistics.fmean(m[key] for m in shares if key in m) for key in shares[0] if key != "step"}
    if probes:
        out["gradient_norm_ratio"] = statistics.fmean(c["norm_ratio"] for c in probes)
        out["gradient_cosine"] = statistics.fmean(c["cosine"] for c in probes)
        last = max(c["step"] for c in probes)
        out["gradient_cosine_last_probe"] = statistics.fmean(c["cosine"] for c in probes if c["step"] == last)
        out["gradient_norm_ratio_last_probe"] = statistics.fmean(c["norm_ratio"] for c in probes if c["step"] == last)
    return out


def report(files: list[dict], grid_seeds: list[int]) -> dict:
    """Every variant at its dev-chosen rate against DPO, seed-level first; the start per seed; the triplet probes."""
    grid_files = [f for f in files if f["seed"] in grid_seeds and "-grid" in f.get("kind", "-grid")]
    dev_scores = dev_scores_of(grid_files)
    rates = sorted({r["learning_rate"] for f in grid_files for r in f["runs"]})
    selection = choose_rates(dev_scores)
    chosen = {name: sel["learning_rate"] for name, sel in selection.items()}
    runs = final_runs(files, chosen)
    runs = dict(sorted(runs.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER)))
    starts = {f["seed"]: f["start"]["heldout"] for f in files}
    seeds = sorted(r["seed"] for r in runs["DPO"])
    table = lambda rs, key: np.array([r["heldout"][key] for r in rs], dtype=float)  # noqa: E731  [S, P]
    start = {key: np.array([starts[s][key] for s in seeds], dtype=float) for key in ("correct", "gold_logp")}
    dpo = {key: table(runs["DPO"], key) for key in ("correct", "gold_logp")}
    variants = {}
    for name, rs in runs.items():
        if [r["seed"] for r in rs] != seeds:
            raise SystemExit(f"{name} ran seeds {[r['seed'] for r in rs]}, DPO {seeds}: run the missing seeds first.")
        acc = table(rs, "correct")
        variants[name] = {
            "learning_rate": chosen[name],
            "rate_selection": selection[name],
            "dev_accuracy_by_rate": {str(lr): statistics.fmean(a for a, _ in v) for lr, v in dev_scores[name].items()},
            "per_seed_accuracy": acc.mean(1).tolist(),
            "accuracy": float(acc.mean()),
            "gold_logp": float(table(rs, "gold_logp").mean()),
            "vs_dpo_accuracy": compare(acc, dpo["correct"]),
            "vs_dpo_gold_logp": compare(table(rs, "gold_logp"), dpo["gold_logp"]),
            "vs_start_accuracy": compare(acc, start["correct"]),
            "cpu_s_per_step": statistics.fmean(r["train_cpu_seconds"] / r["steps"] for r in rs),
            "triplet": triplet_diagnostics(rs),
        }
    head = {
        "benchmark": "tiny",
        "title": "Tiny arithmetic, start varied per seed",
        "doc": "docs/tiny_benchmark.md",
        "metric": "held-out greedy accuracy",
        "start": float(start["correct"].mean()),
        "prompt_ci_kind": "bootstrap over prompts, seeds kept",
        "variants": {
            name: {
                "seeds": seeds,
                "per_seed": v["per_seed_accuracy"],
                "prompt_ci": [v["vs_dpo_accuracy"]["prompt_level"]["ci_low"], v["vs_dpo_accuracy"]["prompt_level"]["ci_high"]],
                "cpu_s_per_step": v["cpu_s_per_step"],
            }
            for name, v in variants.items()
        },
    }  # fmt: skip
    return {
        "seeds": seeds,
        "grid_seeds": grid_seeds,
        "learning_rates": rates,
        "start_per_seed": start["correct"].mean(1).tolist(),
        "pairs_per_seed": {f["seed"]: f["pairs"] for f in files},
        "gate": gate(list(runs), compare(dpo["correct"], start["correct"])),
        "variants": variants,
        "cpu_seconds": sum(f["cpu_seconds"] for f in files),
        "args": [f["args"] for f in files],
        "headline": head,
    }


def fmt_ci(comparison: dict, digits: int = 3) -> str:
    ci = headline_ci(comparison)
    return f"{ci['mean']:+.{digits}f} [{ci['ci_low']:+.{digits}f}, {ci['ci_high']:+.{digits}f}]"


def markdown(summary: dict) -> str:
    lines = [
        "| variant | lr (dev) | held-out accuracy | Δ vs DPO, seed-level 95% CI | prompt-level CI | Δ gold log-prob vs DPO "
        "| CPU s/step | anchor = chosen / rejected | ‖g_trip‖/‖g_DPO‖ | cos(g_DPO, g_trip) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in summary["variants"].items():
        prompt = v["vs_dpo_accuracy"]["prompt_level"]
        t = v["triplet"] or {}
        copies = (
            f"{t['triplet/anchor_equals_chosen']:.2f} / {t['triplet/anchor_equals_rejected']:.2f}"
            if "triplet/anchor_equals_chosen" in t else "–"
        )  # fmt: skip
        edge = f" ({v['rate_selection']['edge']} edge)" if v["rate_selection"]["edge"] else ""
        lines.append(
            f"| {name} | {v['learning_rate']:g}{edge} | {v['accuracy']:.3f} | {fmt_ci(v['vs_dpo_accuracy'])} "
            f"| [{prompt['ci_low']:+.3f}, {prompt['ci_high']:+.3f}] | {fmt_ci(v['vs_dpo_gold_logp'])} "
            f"| {v['cpu_s_per_step']:.3f} | {copies} "
            f"| {t['gradient_norm_ratio']:.2f} | {t['gradient_cosine']:+.2f} |"
            if "gradient_norm_ratio" in t
            else f"| {name} | {v['learning_rate']:g}{edge} | {v['accuracy']:.3f} | {fmt_ci(v['vs_dpo_accuracy'])} "
            f"| [{prompt['ci_low']:+.3f}, {prompt['ci_high']:+.3f}] | {fmt_ci(v['vs_dpo_gold_logp'])} "
            f"| {v['cpu_s_per_step']:.3f} | {copies} | – | – |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["choose", "report"])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--grid-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if args.command == "report":
        files = []
        for path in args.files:
            data = json.loads(Path(path).read_text())
            data["kind"] = "-final" if path.endswith("-final.json") else "-grid"
            files.append(data)
        summary = report(files, args.grid_seeds)
        Path(args.output).write_text(json.dumps(summary, indent=1))
        print(summary["gate"]["message"])
        print(markdown(summary))
        return
    selection = choose_rates(dev_scores_of(load_runs(args.files)))
    for name, sel in selection.items():
        edge = f" (at the grid's {sel['edge']} edge: try {sel['beyond']:g})" if sel["edge"] else ""
        print(f"{name}: {sel['learning_rate']:g}{edge}")
    Path(args.output).write_text(json.dumps({name: sel["learning_rate"] for name, sel in selection.items()}, indent=2))


if __name__ == "__main__":
    main()
