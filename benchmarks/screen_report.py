"""
Rate selection and the report of a per-seed screen (`benchmarks/tiny_screen.py`'s JSON files).

    python benchmarks/screen_report.py choose runs/seed*-grid.json --output runs/chosen.json
    python benchmarks/screen_report.py report runs/*.json --output docs/tiny_screen.json
"""

import argparse
import json
import statistics
from pathlib import Path


def load_runs(paths: list[str]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths]


def choose_rates(grid_files: list[dict]) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """
    Per variant, the rate with the best mean dev accuracy over the grid seeds (ties: the best mean dev gold log-prob),
    and every rate's mean dev accuracy.
    """
    scores: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for f in grid_files:
        for run in f["runs"]:
            scores.setdefault(run["variant"], {}).setdefault(run["learning_rate"], []).append(
                (statistics.mean(run["dev"]["correct"]), statistics.mean(run["dev"]["gold_logp"]))
            )
    chosen, dev = {}, {}
    for name, by_rate in scores.items():
        means = {lr: tuple(statistics.mean(s[i] for s in runs) for i in (0, 1)) for lr, runs in by_rate.items()}
        chosen[name] = max(means, key=means.get)
        dev[name] = {lr: m[0] for lr, m in sorted(means.items())}
    return chosen, dev


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["choose"])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    chosen, dev = choose_rates(load_runs(args.files))
    for name, by_rate in dev.items():
        rates = sorted(by_rate)
        edge = " (at the grid's edge)" if chosen[name] in (rates[0], rates[-1]) else ""
        print(f"{name}: {chosen[name]:g}{edge}; dev " + ", ".join(f"{lr:g}: {acc:.3f}" for lr, acc in by_rate.items()))
    Path(args.output).write_text(json.dumps(chosen, indent=2))


if __name__ == "__main__":
    main()
