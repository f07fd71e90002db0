"""
One table of every behavioural benchmark: each variant's held-out metric minus DPO's, with its seed-level 95 % CI, and
its CPU per step, read from the benchmarks' JSONs (never typed by hand). The README's results paragraph, the demo's
verdict and `docs/benchmarks.md`'s opening table are rendered from the file this writes.

    python benchmarks/summarize.py               # docs/tiny_screen.json, real_model.json and text_benchmark.json
    python benchmarks/summarize.py other.json         # ... and any other benchmark JSON

Output (`--output`, default `docs/benchmarks_summary.json`):

    {"command": str, "date": "YYYY-MM-DD",
     "benchmarks": {NAME: {"title", "doc", "metric", "seeds", "start", "dpo", "ci_kind", "gate_passed", "gate"}},
     "rows": [{"variant", "benchmark", "delta", "ci": [lo, hi], "prompt_ci": [lo, hi] | null, "seeds",
               "cpu_s_per_step", "cpu_ratio_vs_dpo"}]}

`gate_passed` is the benchmark's sanity gate (DPO beat its start by more than 2 SE), `None` for the JSONs written
before the headline kept it; where it is `False` the benchmark ranks nothing and the rendered verdict says so.
`delta` is the mean over the seeds both ran of (variant − DPO) per-seed held-out metric; `ci` is the Student
t-interval over those per-seed differences (`bench_stats.seed_level_ci`; with one seed, the prompt-level interval and
`ci_kind` says so); `prompt_ci` is the benchmark's bootstrap interval over prompts (and seeds, for the JSONs written
before the seed-level protocol). A benchmark JSON is read from its `headline` block (`bench_report.headline`), or, for
the JSONs written before it, from the tiny or SmolLM2 benchmark's own layout.
"""

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import seed_level_ci  # noqa: E402

DEFAULT_INPUTS = ["docs/tiny_screen.json", "docs/real_model.json", "docs/text_benchmark.json"]
LEGACY = {
    "tiny": {"title": "Tiny arithmetic (tiny Llama from scratch)", "doc": "docs/tiny_benchmark.md"},
    "smollm2": {"title": "SmolLM2-135M-Instruct arithmetic (LoRA)", "doc": "docs/real_model.md"},
}


def _legacy_tiny(data: dict) -> dict:
    steps = data["args"]["steps"]
    variants = {}
    for name, v in data["variants"].items():
        ci = v["vs_dpo"]["accuracy"]
        variants[name] = {
            "seeds": v["seeds"],
            "per_seed": v["accuracy"],
            # the legacy JSON keeps each run's CPU (training and its evaluation), not the training's alone
            "cpu_s_per_step": statistics.fmean(v["cpu_seconds"]) / steps,
            "prompt_ci": None if name == "DPO" else [ci["ci_low"], ci["ci_high"]],
        }
    return {
        "benchmark": "tiny", **LEGACY["tiny"], "metric": "held-out accuracy",
        "start": data["start"]["heldout_accuracy"], "prompt_ci_kind": "bootstrap over prompts × seeds",
        "variants": variants,
    }  # fmt: skip


def _legacy_smollm2(data: dict) -> dict:
    rep = data["report"]
    variants = {}
    for name, v in rep["variants"].items():
        ci = v.get("vs_dpo_correct")
        variants[name] = {
            "seeds": v["seeds"],
            "per_seed": v["accuracy_per_seed"],
            "cpu_s_per_step": v["cpu_seconds_per_step"],
            "prompt_ci": [ci["ci_low"], ci["ci_high"]] if ci else None,
        }
    return {
        "benchmark": "smollm2", **LEGACY["smollm2"], "metric": "held-out accuracy",
        "start": rep["start"]["accuracy"], "prompt_ci_kind": "bootstrap over prompts × seeds", "variants": variants,
    }  # fmt: skip


def read_headline(path: Path) -> tuple[dict, dict | None]:
    """
    The benchmark's `headline` block (or one built from a JSON written before the block existed), and the `gate` the
    JSON keeps beside it, if any (the tiny screen's), from one read of the file.
    """
    data = json.loads(path.read_text())
    if "headline" in data:
        return data["headline"], data.get("gate")
    if "report" in data and "records" in data:
        return _legacy_smollm2(data), data.get("gate")
    if isinstance(data.get("variants"), dict) and "sft" in data:
        return _legacy_tiny(data), data.get("gate")
    raise SystemExit(
        f"{path}: not a benchmark JSON this script can read (no `headline` block, and neither the tiny nor the SmolLM2 "
        "benchmark's layout). Rerun the benchmark, or pass only benchmark JSONs."
    )


def summarize_benchmark(head: dict, gate: dict | None = None) -> tuple[dict, list[dict]]:
    """The benchmark's entry and its rows (one per variant, DPO first) from its headline block."""
    name = head["benchmark"]
    if "DPO" not in head["variants"]:
        raise SystemExit(f"Benchmark {name!r} has no DPO run: nothing to compare the variants with.")
    dpo = head["variants"]["DPO"]
    dpo_by_seed = dict(zip(dpo["seeds"], dpo["per_seed"]))
    one_seed = len(dpo["seeds"]) < 2
    gate = head.get("gate") or gate  # the tiny screen keeps its gate beside the headline
    entry = {
        "gate_passed": None if gate is None else gate["passed"],
        "gate": None if gate is None else gate["message"],
        "title": head["title"],
        "doc": head["doc"],
        "metric": head["metric"],
        "seeds": len(dpo["seeds"]),
        "start": head["start"],
        "dpo": statistics.fmean(dpo["per_seed"]),
        "ci_kind": (
            f"prompt-level ({head.get('prompt_ci_kind', 'bootstrap over prompts')}): one seed, no seed-level interval"
            if one_seed
            else f"seed-level: Student t-interval over the per-seed differences vs DPO (df = seeds − 1); prompt_ci: "
            f"{head.get('prompt_ci_kind', 'bootstrap over prompts')}"
        ),
    }
    rows = []
    for variant, v in sorted(head["variants"].items(), key=lambda kv: kv[0] != "DPO"):
        seeds = [s for s in v["seeds"] if s in dpo_by_seed]
        if not seeds:
            raise SystemExit(f"Benchmark {name!r}: {variant} shares no seed with DPO ({v['seeds']} vs {dpo['seeds']}).")
        differences = [v["per_seed"][v["seeds"].index(s)] - dpo_by_seed[s] for s in seeds]
        interval = seed_level_ci(differences)
        if variant == "DPO":
            ci = [0.0, 0.0]
        elif interval["se"] is not None:
            ci = [interval["ci_low"], interval["ci_high"]]
        else:
            ci = v["prompt_ci"]
        cpu, dpo_cpu = v.get("cpu_s_per_step"), dpo.get("cpu_s_per_step")
        rows.append(
            {
                "variant": variant,
                "benchmark": name,
                "delta": interval["mean"],
                "ci": ci,
                "prompt_ci": None if variant == "DPO" else v.get("prompt_ci"),
                "seeds": len(seeds),
                "cpu_s_per_step": cpu,
                "cpu_ratio_vs_dpo": cpu / dpo_cpu if cpu is not None and dpo_cpu else None,
            }
        )
    return entry, rows


def summarize(paths: list[Path], command: str) -> dict:
    out = {"command": command, "date": time.strftime("%Y-%m-%d", time.gmtime()), "benchmarks": {}, "rows": []}
    for path in paths:
        entry, rows = summarize_benchmark(*read_headline(path))
        name = rows[0]["benchmark"]
        if name in out["benchmarks"]:
            raise SystemExit(f"{path}: benchmark {name!r} is already in the summary (two JSONs of one benchmark).")
        out["benchmarks"][name] = entry
        out["rows"] += rows
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", help=f"benchmark JSONs beyond the defaults ({', '.join(DEFAULT_INPUTS)})")
    parser.add_argument("--no-defaults", action="store_true", help="read only the JSONs given")
    parser.add_argument("--output", default="docs/benchmarks_summary.json")
    args = parser.parse_args(argv)
    inputs = ([] if args.no_defaults else DEFAULT_INPUTS) + [p for p in args.inputs if p not in DEFAULT_INPUTS]
    argv = sys.argv[1:] if argv is None else argv
    summary = summarize([Path(p) for p in inputs], shlex.join(["python", "benchmarks/summarize.py", *argv]))
    Path(args.output).write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    for row in summary["rows"]:
        lo, hi = row["ci"] or (float("nan"), float("nan"))
        print(f"{row['benchmark']:>8} | {row['variant']:<32} | {row['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {row['seeds']} seeds")
    print(f"Wrote {args.output}")
    return summary


if __name__ == "__main__":
    main()
