"""
Pieces shared by the SmolLM2 benchmark runners (`real_model.py`, `text_benchmark.py`) and their task and training
modules: CPU accounting, the JSON cache and summary file, the summary's header, the options every runner takes, the
merge of split runs with the learning rates selected again from every dev result, the closing sanity gate, the
per-run progress line and the summed completion log-probs of tokenised rows.
"""

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_report
import bench_stats


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (`resource.getrusage`)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def cached(path: Path, compute):
    """JSON cache keyed by the caller (the file name holds a hash of every setting the value depends on)."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


def write_summary(summary: dict, path: str) -> None:
    """The summary as indented JSON at `path` (its folder made)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=1))


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "python": sys.version.split()[0]}  # fmt: skip


def summary_header(args) -> dict[str, Any]:
    """The first keys of a run's summary: its args, the machine, the versions, the date and the load at start."""
    import torch

    return {
        "args": vars(args),
        "machine": {"device": args.device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": os.getloadavg(),
    }


def runner_parser(doc: str, quick_help: str, prepare_help: str) -> tuple[argparse.ArgumentParser, Callable]:
    """The runner's parser (described by its docstring's first paragraph) with the options every runner opens with."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help=quick_help)
    add("--prepare", action="store_true", help=prepare_help)
    add("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    add("--grid-seeds", type=int, nargs="*", default=[0], help="seeds that run the grid (none: --seeds at one rate)")
    return parser, add


def apply_quick(parser: argparse.ArgumentParser, args, quick: dict[str, Any]) -> None:
    """`--quick`: each of `quick`'s settings replaces its option's value where that was left at its default."""
    if args.quick:
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)


def merge_runs(paths: list[str], merge_keys: tuple[str, ...], absorb: Callable[[str, dict, dict], None]):
    """
    The first run's summary with every later run folded in: refused where a `merge_keys` setting or the start
    evaluation differs; `absorb(path, run, summary)` checks and folds the benchmark's own parts (it raises to refuse);
    records concatenated; variants, selected rates, seeds, grid seeds and grid united. Returns (summary, runs).
    """
    runs = [with_canonical_rates(json.loads(Path(path).read_text())) for path in paths]
    summary = runs[0]
    for path, run_ in zip(paths[1:], runs[1:]):
        differing = [k for k in merge_keys if run_["args"].get(k) != summary["args"].get(k)]
        if differing or run_["start"]["eval"]["correct"] != summary["start"]["eval"]["correct"]:
            raise SystemExit(f"Cannot merge {path}: its settings differ ({differing or 'the start evaluation'}).")
        absorb(path, run_, summary)
        for name, lr in run_["selected_lr"].items():
            summary["selected_lr"].setdefault(name, lr)
        summary["records"] += run_["records"]
        summary["variants"] += [v for v in run_["variants"] if v not in summary["variants"]]
        for key in ("seeds", "grid_seeds", "lr_grid"):
            summary["args"][key] = sorted(set(summary["args"][key]) | set(run_["args"][key]))
    return summary, runs


def with_canonical_rates(run: dict) -> dict:
    """
    `run` with every learning rate (records, selected rates, `--lr-grid`) as a `bench_stats.canonical_rate`: runs
    written before `extend_grid` rounded its rates hold 0.004999999999999999 where a later run holds 5e-3.
    """
    for record in run["records"]:
        record["learning_rate"] = bench_stats.canonical_rate(record["learning_rate"])
    run["selected_lr"] = {name: bench_stats.canonical_rate(lr) for name, lr in run["selected_lr"].items()}
    run["args"]["lr_grid"] = [bench_stats.canonical_rate(lr) for lr in run["args"]["lr_grid"]]
    return run


def reselect_learning_rates(summary: dict) -> None:
    """Each variant's rate from all the dev results of its grid runs; refuse runs of other seeds at another rate."""
    grid_seeds = summary["args"]["grid_seeds"]
    summary.setdefault("selection", {})
    for name in summary["variants"]:
        runs = [r for r in summary["records"] if r["variant"] == name]
        scores = bench_report.dev_scores(runs, name, grid_seeds)
        if scores:
            summary["selection"][name] = bench_stats.select_learning_rate(scores, sorted(scores))
            summary["selected_lr"][name] = summary["selection"][name]["learning_rate"]
        chosen = summary["selected_lr"].get(name)
        if chosen is None:
            raise SystemExit(f"Cannot merge: {name} has no dev results and no selected learning rate.")
        summary["selection"].setdefault(name, {"learning_rate": chosen, "edge": None, "beyond": None})
        stray = sorted({r["learning_rate"] for r in runs if r["seed"] not in grid_seeds} - {chosen})
        if stray:
            raise SystemExit(
                f"Cannot merge: {name} selected learning rate {chosen:g}, but seeds outside the grid ran at {stray}."
            )


def close_with_gate(summary: dict) -> dict:
    """Print the run's CPU and wall time and the sanity gate's verdict; exit 3 where the gate failed."""
    cpu, wall = summary.get("total_cpu_seconds") or 0, summary.get("total_seconds") or 0
    print(f"\nCPU {cpu:.0f} s (getrusage), wall {wall:.0f} s")
    gate = summary["report"]["gate"]
    if gate["passed"] is None:
        print(f"\nWARNING: {gate['message']}", file=sys.stderr)
    elif not gate["passed"]:
        print(f"\nSANITY GATE FAILED: {gate['message']}", file=sys.stderr)
        raise SystemExit(3)
    return summary


def logged_means(history: list[dict]) -> dict[str, float]:
    """The mean over training of each logged `triplet/`, `rewards/` and `token_weights/` metric (e.g. the share of rows
    whose anchor copies the chosen or rejected completion, `triplet/anchor_equals_*`)."""
    keys = sorted({k for entry in history for k in entry if k.startswith(("triplet/", "rewards/", "token_weights/"))})
    return {k: sum(e[k] for e in history if k in e) / sum(k in e for e in history) for k in keys}


def print_run(name: str, lr: float, seed: int, result: str, dev: str | None, cost: str) -> None:
    """One trained run's progress line: `name, lr, seed: result[; dev]; cost`."""
    print(f"{name}, lr {lr:g}, seed {seed}: {result}" + (f"; {dev}" if dev else "") + f"; {cost}", flush=True)


def summed_logps(model, pad_id: int, rows: list[tuple[list[int], int]], batch_size: int) -> list[float]:
    """
    Per row `(token ids, start)`, the log-prob of tokens `start:` given those before them, summed; the rows in
    right-padded batches of `batch_size`, the model in eval mode meanwhile, no gradient.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            length = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([r + [pad_id] * (length - len(r)) for r, _ in chunk], device=device)
            attention = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r, _ in chunk], device=device)
            scored = torch.tensor(
                [[0] * s + [1] * (len(r) - s) + [0] * (length - len(r)) for r, s in chunk], device=device
            )[:, 1:]
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
            logps = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None]).squeeze(-1)  # [B, L-1]
            out += (logps * scored).sum(-1).tolist()
    model.train(was_training)
    return out
