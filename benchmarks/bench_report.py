"""
The report shared by the behavioural benchmarks: every number of the tables computed from the runs' records
(`build_report`), the markdown tables (`markdown`), the `headline` block that `benchmarks/summarize.py` reads, and the
plot of accuracy against learning rate.

A record is one trained (variant, learning rate, seed):
`{"variant", "learning_rate", "seed", "cpu_seconds_per_step", "eval": {"correct": [P], "gold_logp": [P],
"malformed": [P], ...}, "dev": {"accuracy", "gold_logp"} (grid runs only)}`; the start model's held-out evaluation is
given per seed (the same one for every seed when the seeds share their start).
"""

import math
import statistics
from typing import Any

import numpy as np

import bench_stats


def selected_records(records: list[dict], variant: str, learning_rate: float) -> dict[int, dict]:
    """The variant's runs at its selected learning rate, by seed."""
    return {r["seed"]: r for r in records if r["variant"] == variant and r["learning_rate"] == learning_rate}


def dev_scores(records: list[dict], variant: str, grid_seeds: list[int]) -> dict[float, list[tuple[float, float]]]:
    """`{lr: [(dev accuracy, dev gold log-prob) per grid seed]}` of a variant's grid runs (`select_learning_rate`)."""
    scores: dict[float, list] = {}
    for r in records:
        if r["variant"] == variant and r["seed"] in grid_seeds and "dev" in r:
            scores.setdefault(r["learning_rate"], []).append((r["dev"]["accuracy"], r["dev"]["gold_logp"]))
    return scores


def _matrix(runs: dict[int, dict], seeds: list[int], key: str) -> np.ndarray:
    return np.array([runs[s]["eval"][key] for s in seeds], dtype=float)


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def build_report(
    records: list[dict],
    start: dict[int, dict],
    selection: dict[str, dict],
    *,
    grid_seeds: list[int],
    families: list[str] | None = None,
    gradient_share: dict[str, list[float] | float] | None = None,
    reps: int = 4000,
) -> dict[str, Any]:
    """
    Everything the tables show. Per variant at its selected rate (`selection[name]`: `select_learning_rate`'s output):
    per-seed held-out accuracy, gold log-prob and malformed share, prompts gained/lost against the seed's start, CPU
    per step, accuracy per family (`families`: one family name per held-out prompt), and `bench_stats.compare`
    against the start and (paired by seed and prompt) against DPO, overall and per family. Also every grid point and
    the sanity gate.
    """
    gradient_share = gradient_share or {}
    variants = [v for v in selection if any(r["variant"] == v for r in records)]
    any_start = next(iter(start.values()))
    family_names = sorted(set(families)) if families else []
    out: dict[str, Any] = {
        "start": {
            "accuracy": statistics.fmean(statistics.fmean(s["correct"]) for s in start.values()),
            "gold_logp": statistics.fmean(statistics.fmean(s["gold_logp"]) for s in start.values()),
            "malformed": statistics.fmean(statistics.fmean(s["malformed"]) for s in start.values()),
            "accuracy_per_seed": {str(seed): statistics.fmean(s["correct"]) for seed, s in start.items()},
        },
        "variants": {},
        "grid": {},
    }
    index = {f: [i for i, g in enumerate(families) if g == f] for f in family_names} if families else {}
    for f, rows in index.items():
        out["start"][f"accuracy/{f}"] = statistics.fmean(
            statistics.fmean(s["correct"][i] for i in rows) for s in start.values()
        )
    dpo = selected_records(records, "DPO", selection["DPO"]["learning_rate"]) if "DPO" in variants else None
    for name in variants:
        runs = selected_records(records, name, selection[name]["learning_rate"])
        seeds = sorted(runs)
        correct, logp = _matrix(runs, seeds, "correct"), _matrix(runs, seeds, "gold_logp")
        start_correct = np.array([start.get(s, any_start)["correct"] for s in seeds], dtype=float)
        gained, lost = bench_stats.gained_lost(correct, start_correct)
        shares = gradient_share.get(name)
        entry = {
            **selection[name],
            "seeds": seeds,
            "accuracy_per_seed": correct.mean(1).tolist(),
            "gold_logp_per_seed": logp.mean(1).tolist(),
            "malformed_per_seed": _matrix(runs, seeds, "malformed").mean(1).tolist(),
            "gained_per_seed": gained,
            "lost_per_seed": lost,
            "cpu_seconds_per_step": _mean_or_none([runs[s].get("cpu_seconds_per_step") for s in seeds]),
            "decisive_gradient_share": _mean_or_none(shares) if isinstance(shares, list) else shares,
            "vs_start": bench_stats.compare(correct, start_correct, reps=reps, seed=1),
        }
        for f, rows in index.items():
            entry[f"accuracy/{f}"] = float(correct[:, rows].mean())
        if dpo is not None and name != "DPO":
            common = [s for s in seeds if s in dpo]
            if common:
                entry["paired_seeds"] = common
                for key in ("correct", "gold_logp"):
                    entry[f"vs_dpo_{key}"] = bench_stats.compare(
                        _matrix(runs, common, key), _matrix(dpo, common, key), reps=reps, seed=2
                    )
                for f, rows in index.items():
                    entry[f"vs_dpo_correct/{f}"] = bench_stats.compare(
                        _matrix(runs, common, "correct")[:, rows], _matrix(dpo, common, "correct")[:, rows],
                        reps=reps, seed=3,
                    )  # fmt: skip
        out["variants"][name] = entry
        grid: dict[str, dict] = {}
        for r in records:
            if r["variant"] == name and r["seed"] in grid_seeds:
                point = grid.setdefault(str(r["learning_rate"]), {"seeds": [], "accuracy": [], "dev_accuracy": []})
                point.setdefault("gold_logp", [])
                point["seeds"].append(r["seed"])
                point["accuracy"].append(statistics.fmean(r["eval"]["correct"]))
                point["gold_logp"].append(statistics.fmean(r["eval"]["gold_logp"]))
                if "dev" in r:
                    point["dev_accuracy"].append(r["dev"]["accuracy"])
        out["grid"][name] = grid
    out["gate"] = bench_stats.gate(variants, out["variants"]["DPO"]["vs_start"] if "DPO" in variants else None)
    return out


def headline(report: dict, *, benchmark: str, title: str, doc: str, metric: str = "held-out accuracy") -> dict:
    """The block `benchmarks/summarize.py` reads: per variant, its per-seed held-out accuracy and CPU per step, and the
    run's sanity gate (did DPO beat the start: can this benchmark rank variants at all)."""
    variants = {}
    for name, e in report["variants"].items():
        prompt = (e.get("vs_dpo_correct") or {}).get("prompt_level")
        variants[name] = {
            "seeds": e["seeds"],
            "per_seed": e["accuracy_per_seed"],
            "cpu_s_per_step": e["cpu_seconds_per_step"],
            "prompt_ci": [prompt["ci_low"], prompt["ci_high"]] if prompt else None,
            "learning_rate": e["learning_rate"],
            "lr_edge": e.get("edge"),
        }
    return {
        "benchmark": benchmark, "title": title, "doc": doc, "metric": metric, "start": report["start"]["accuracy"],
        "prompt_ci_kind": "bootstrap over prompts (seeds kept)", "variants": variants, "gate": report.get("gate"),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------- markdown


def mean_std(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def fmt_ci(stats: dict | None, digits: int = 3) -> str:
    """`+0.012 [−0.004, +0.030]`, or the mean alone when the interval is undefined (one seed), "–" without stats."""
    if not stats:
        return "–"
    if stats.get("ci_low") is None:
        return f"{stats['mean']:+.{digits}f} [n/a: one seed]"
    return f"{stats['mean']:+.{digits}f} [{stats['ci_low']:+.{digits}f}, {stats['ci_high']:+.{digits}f}]"


def fmt_lr(entry: dict) -> str:
    edge = entry.get("edge")
    return f"{entry['learning_rate']:g}" + (f" ({edge} edge)" if edge else "")


def markdown(report: dict) -> str:
    """The main table (seed-level CIs first, the prompt-level one beside), per seed, the gate, per family, the grid."""
    rep, names = report, list(report["variants"])
    families = sorted(k.split("/", 1)[1] for k in rep["start"] if k.startswith("accuracy/"))
    dpo_cpu = rep["variants"].get("DPO", {}).get("cpu_seconds_per_step")
    start = rep["start"]
    lines = [
        f"Start model: held-out accuracy {start['accuracy']:.3f} (malformed {start['malformed']:.3f}), gold log-prob "
        f"{start['gold_logp']:.3f}" + "".join(f"; {f} {start[f'accuracy/{f}']:.3f}" for f in families) + ".",
        "",
        "| variant | learning rate (dev) | held-out accuracy | Δ vs DPO [95% CI, seed-level] | Δ vs DPO [95% CI, "
        "prompt-level] | gold log-prob | Δ gold log-prob vs DPO [seed-level] | malformed | "
        + "".join(f"{f} | " for f in families)
        + "gained / lost vs start | CPU-s / step | decisive-token gradient share |",
        "|---" * (11 + len(families)) + "|",
    ]
    for name in names:
        e = rep["variants"][name]
        cpu = "–" if e["cpu_seconds_per_step"] is None else f"{e['cpu_seconds_per_step']:.2f}"
        if dpo_cpu and e["cpu_seconds_per_step"] and name != "DPO":
            cpu += f" ({e['cpu_seconds_per_step'] / dpo_cpu:.2f}×)"
        share = "–" if e["decisive_gradient_share"] is None else f"{e['decisive_gradient_share']:.3f}"
        acc, logp = e.get("vs_dpo_correct"), e.get("vs_dpo_gold_logp")
        lines.append(
            f"| {name} | {fmt_lr(e)} | {mean_std(e['accuracy_per_seed'])} | "
            f"{fmt_ci(acc and acc['seed_level'])} | {fmt_ci(acc and acc['prompt_level'])} | "
            f"{mean_std(e['gold_logp_per_seed'], 2)} | {fmt_ci(logp and logp['seed_level'], 2)} | "
            f"{mean_std(e['malformed_per_seed'])} | "
            + "".join(f"{e[f'accuracy/{f}']:.3f} | " for f in families)
            + f"{statistics.fmean(e['gained_per_seed']):.1f} / {statistics.fmean(e['lost_per_seed']):.1f} | "
            f"{cpu} | {share} |"
        )
    lines += ["", "Per seed, held-out accuracy at the selected learning rate:", ""]
    for name in names:
        e = rep["variants"][name]
        lines.append(f"- {name}: " + " / ".join(f"{a:.3f}" for a in e["accuracy_per_seed"]) + f" (seeds {e['seeds']})")
    lines += ["", f"Sanity gate: {rep['gate']['message']}"]
    edges = [f"{n} ({rep['variants'][n]['edge']} edge)" for n in names if rep["variants"][n].get("edge")]
    if edges:
        lines += [
            "",
            "Learning rate at an edge of the grid (the dev optimum may lie outside it; `--extend-grid` runs the next "
            "rate): " + ", ".join(edges) + ".",
        ]
    per_family = [n for n in names if any(f"vs_dpo_correct/{f}" in rep["variants"][n] for f in families)]
    if per_family:
        lines += ["", "Δ accuracy vs DPO per family [95% CI, seed-level]:", "", "| variant | " + " | ".join(families) + " |"]
        lines.append("|---" * (len(families) + 1) + "|")
        for name in per_family:
            cells = [fmt_ci(rep["variants"][name][f"vs_dpo_correct/{f}"]["seed_level"]) for f in families]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    grid_lrs = sorted({float(lr) for g in rep["grid"].values() for lr in g})
    lines += [
        "",
        "Every grid point (mean over the grid seeds): held-out accuracy / dev accuracy / held-out gold log-prob:",
        "",
        "| variant | " + " | ".join(f"lr {lr:g}" for lr in grid_lrs) + " |",
        "|---" * (len(grid_lrs) + 1) + "|",
    ]
    for name, grid in rep["grid"].items():
        cells = []
        for lr in grid_lrs:
            point = grid.get(str(lr))
            if not point:
                cells.append("–")
                continue
            dev = f"{statistics.fmean(point['dev_accuracy']):.3f}" if point["dev_accuracy"] else "–"
            cells.append(f"{statistics.fmean(point['accuracy']):.3f} / {dev} / {statistics.fmean(point['gold_logp']):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: str, title: str) -> None:
    """Held-out accuracy against learning rate: grid lines (grid seeds) and the selected rate (mean ± std, all seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.axhline(report["start"]["accuracy"], color="grey", linestyle=":", label="start model")
    for name, grid in report["grid"].items():
        lrs = sorted(grid, key=float)
        line = ax.plot(
            [float(lr) for lr in lrs], [statistics.fmean(grid[lr]["accuracy"]) for lr in lrs], marker="o", label=name
        )
        e = report["variants"][name]
        accs = e["accuracy_per_seed"]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ax.errorbar([e["learning_rate"]], [statistics.fmean(accs)], yerr=[std], fmt="*", markersize=12,
                    color=line[0].get_color())  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (lines: grid seeds; stars: selected, mean ± std over all seeds)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
