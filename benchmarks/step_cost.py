"""
Step cost of TI-DPO relative to TRL's `DPOTrainer`: median step time and peak memory of each mode, as
ratios to DPO on the same model, data, batch and settings, plus the one-time cost of precomputing reference weights.
Results and their reading: docs/benchmarks.md, "Step cost".

Method
------
- Model: a random-init Llama built from a config (no download), default hidden 512, 8 layers, vocab 8192, on synthetic
  text rows of exactly `--seq-len` tokens (prompt `--prompt-len`, completions filling the rest, EOS included) and
  dataset anchors of `--anchor-len` tokens.
- Time: every mode of a setting is built in one process and stepped in alternation (DPO, mode 1, mode 2, ..., DPO,
  mode 1, ...) on the same batches, after `--warmup` untimed rounds. One step is `trainer.training_step(model, batch)`
  (forward, backward and everything each mode does per step: attribution, anchor sampling, KL); the optimizer step,
  identical in every mode, is left out, which makes the ratios slightly conservative. Reported: the median over
  rounds of the paired ratio `t_mode / t_dpo` of the same round (robust to load that drifts between rounds), for wall
  time and for process CPU time (all threads). On a shared machine, `--threads 1` with `OMP_WAIT_POLICY=PASSIVE` gives
  stable numbers: wall and CPU time then agree and other processes only take their share of the other core.
- FLOPs (`--measure flops`): matmul and attention FLOPs of one step per mode (`torch.utils.flop_counter`, forward and
  backward), a cross-check independent of the machine's load. It undercounts what is latency-bound (generation).
- Python overhead (`--measure overhead`): the median step time, in ms (process CPU time on a CPU), of each mode on a
  1-layer, 16-hidden model (`OVERHEAD_MODEL` in `step_cost_measures.py`) whose kernels take microseconds, so what is
  left is the step's Python: the trainer's code, TRL's and the libraries'. It is printed next to the ratios, which a
  small per-step cost hides on a large model, and shows a regression such as a per-step package-metadata lookup
  (~1 ms each) in ms.
- Memory: each mode runs in a fresh subprocess (so no other trainer's tensors are counted) for `--memory-steps`
  steps. On CUDA, `torch.cuda.max_memory_allocated()`. On CPU, torch has no allocator statistics, so it is the
  process's resident-set high-water mark (`VmHWM` in `/proc/self/status`; not `ru_maxrss`, which Linux carries
  over from the parent across `execve`) minus the resident set measured just before the models are built; the
  subprocess runs with `MALLOC_MMAP_THRESHOLD_=65536`, which makes glibc serve every tensor larger than 64 KiB from
  its own mmap and return it on free, so the resident set follows the live tensors. Both include weights,
  reference, gradients and activations (no optimizer state: no optimizer step is taken). The dataset is
  file-backed, so the reference mode runs twice: once computing the cached weights (peak including that one-time
  pass) and once reading them (peak of the training steps).
- Precompute: wall time of computing the reference token weights (`importance_model="reference"`) for the benchmark
  dataset, also per batch in DPO steps.
- `--precompute-ref-log-probs`: every mode, DPO included, with `precompute_ref_log_probs=True`. In the `full` setting
  no `ref_model` is passed then, so, as in TRL, no reference is kept in memory (the policy at construction serves the
  one-time precompute), except for the modes that still run the reference at every step (policy anchors), which get
  the explicit reference. `tdpo_kl` refuses the option. Compare its peaks with a run without the flag.

Settings: `full` = full fine-tuning, no gradient checkpointing, explicit reference model; `lora` = LoRA with TRL's
`ModelConfig` defaults (r 16, alpha 32, dropout 0.05, PEFT's default q_proj/v_proj) and TRL's default gradient
checkpointing (`DPOConfig.gradient_checkpointing=True`, transformers' non-reentrant default), reference = adapter
disabled. Checkpointing is switched on the way `Trainer.train()` does before its first step.

Examples (each setting takes about 8 minutes with all modes on 2 idle CPU cores):
    python benchmarks/step_cost.py --settings full
    python benchmarks/step_cost.py --settings lora --modes weights dataset_anchors --measure time flops --steps 4
    python benchmarks/step_cost.py --preset gpu --device cuda --dtype bf16    # ~0.5B Llama on one GPU
"""

import argparse
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from datasets import disable_progress_bars
from transformers.utils import logging as hf_logging

from step_cost_measures import memory_child, run_memory, run_overhead, run_timing
from step_cost_setup import DEFAULT_MODES, MODES, PRESETS, Setup, build_data

# targets (SPEC §5 and docs/benchmarks.md): (step-time ratio, memory ratio) per (mode, setting); None = report only
TARGETS = {
    ("weights", "full"): (1.30, 1.15),
    ("weights", "lora"): (1.55, 1.15),
    ("reference", "full"): (1.05, 1.05),
    ("reference", "lora"): (1.05, 1.05),
    ("policy_anchors", "full"): (2.0, 1.3),
    ("policy_anchors", "lora"): (2.0, 1.3),
    ("dataset_anchors", "full"): (1.6, 1.3),
    ("dataset_anchors", "lora"): (1.6, 1.3),
    ("tdpo_kl", "full"): (None, 1.5),
    ("tdpo_kl", "lora"): (None, 1.5),
}


# ---------------------------------------------------------------- report


def verdict(value: float | None, target: float | None) -> str:
    if target is None or value is None:
        return "—"
    return "yes" if value <= target else "NO"


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_table(results: dict, args: argparse.Namespace) -> None:
    print(
        "\n| mode | setting | DPO step (median wall, cpu) | wall-time ratio (range) | CPU-time ratio (range) "
        "| Python overhead ms/step (tiny model; over DPO) | FLOP ratio | memory ratio | target time / memory "
        "| met? (by wall / memory) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for setting, res in results.items():
        timing, memory, overhead = res.get("time", {}), res.get("memory", {}), res.get("overhead", {})
        for mode in ["dpo", *args.modes]:
            t, m, o = timing.get(mode, {}), memory.get(mode, {}), overhead.get(mode, {})
            python_ms = fmt(o.get("overhead_ms"), ".1f")
            if o and mode != "dpo":
                python_ms += f" ({o['overhead_over_dpo_ms']:+.1f})"
            ratio, mem, cpu = t.get("paired_ratio_median"), m.get("ratio"), t.get("cpu_ratio_median")
            spread = f" ({t['paired_ratio_min']:.2f}–{t['paired_ratio_max']:.2f})" if ratio is not None else ""
            cpu_spread = f" ({t['cpu_ratio_min']:.2f}–{t['cpu_ratio_max']:.2f})" if cpu is not None else ""
            if mode == "dpo":
                target, met = "—", "—"
                first = (
                    f"{fmt(t.get('median_s'), '.2f')} s, {fmt(t.get('median_cpu_s'), '.2f')} s; "
                    f"{fmt(m.get('peak_bytes', 0) / 2**20 if m else None, '.0f')} MiB"
                )
            else:
                target_t, target_m = TARGETS.get((mode, setting), (None, None))
                target = f"{fmt(target_t, '.2f') if target_t else 'report'} / {fmt(target_m, '.2f')}"
                met = f"{verdict(ratio, target_t)} / {verdict(mem, target_m)}"
                first = ""
            print(
                f"| {MODES[mode][1]} | {setting} | {first} | {fmt(ratio, '.2f')}{spread} | "
                f"{fmt(cpu, '.2f')}{cpu_spread} | "
                f"{python_ms} | {fmt(t.get('flop_ratio'), '.2f')} | {fmt(mem, '.2f')} | {target} | {met} |"
            )
    for setting, res in results.items():
        for mode, t in res.get("time", {}).items():
            if "anchor_sampling_median_s" in t:
                print(
                    f"\n[{setting}] {mode}: anchor sampling alone {t['anchor_sampling_median_s']:.2f} s per step "
                    "(median)"
                )
            if "precompute_s" in t:
                per_batch = t.get("precompute_in_dpo_steps_per_batch")
                with_precompute = res.get("memory", {}).get(mode, {}).get("with_precompute_ratio")
                if with_precompute:
                    print(f"\n[{setting}] peak memory including the one-time precompute: {with_precompute:.2f}x DPO's")
                print(
                    f"\n[{setting}] one-time precompute of the reference weights ({mode}): "
                    f"{t['precompute_s']:.2f} s for "
                    f"{t['precompute_pairs']} pairs"
                    + (f" = {per_batch:.2f} DPO steps per batch of the dataset, once" if per_batch else "")
                )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu", help="default sizes (flags below override)")
    for name in PRESETS["cpu"]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--anchor-len", type=int, default=64, help="tokens of a dataset anchor (with EOS)")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (each mode once per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--memory-steps", type=int, default=1, help="steps per memory subprocess")
    parser.add_argument("--settings", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--modes", nargs="+", choices=[m for m in MODES if m != "dpo"], default=DEFAULT_MODES)
    parser.add_argument(
        "--measure",
        nargs="+",
        choices=["time", "memory", "flops", "overhead"],
        default=["time", "memory", "flops", "overhead"],
        help="flops: matmul/attention FLOPs of one step per mode (torch.utils.flop_counter), independent of load; "
        "overhead: per-step Python overhead in ms, the step time on a 1-layer, 16-hidden model",
    )
    parser.add_argument("--overhead-steps", type=int, default=10, help="timed rounds of the overhead measure")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", default=None, help="write all results to this file")
    parser.add_argument(
        "--precompute-batch-size",
        type=int,
        default=None,
        help="pairs per batch of the one-time reference precompute (TRL's precompute_ref_batch_size; "
        "default: --batch-size)",
    )
    parser.add_argument(
        "--precompute-ref-log-probs",
        action="store_true",
        help="every mode (DPO too) with precompute_ref_log_probs=True; full setting: no reference kept where none "
        "is needed",
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.seq_len - args.prompt_len < 2:
        parser.error("--seq-len must exceed --prompt-len by at least 2")
    if args.precompute_ref_log_probs and "tdpo_kl" in args.modes:
        parser.error(
            "--precompute-ref-log-probs: tdpo_kl refuses precompute_ref_log_probs (its KL runs the reference)"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    disable_progress_bars()
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tokenizer, dataset = build_data(args)
    with tempfile.TemporaryDirectory() as output_dir:
        setup = Setup(args, tokenizer, dataset, device, dtype, output_dir)
        if args.memory_child:
            setting, mode = args.memory_child.split(":")
            print("MEMORY " + json.dumps(memory_child(setup, setting, mode)), flush=True)
            return
        print(
            f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; rows {args.seq_len} tokens "
            f"(prompt {args.prompt_len}), batch {args.batch_size} pairs; {args.device} {args.dtype}, "
            f"{torch.get_num_threads()} threads; load {os.getloadavg()}",
            flush=True,
        )
        results = {}
        for setting in args.settings:
            results[setting] = {}
            if "time" in args.measure or "flops" in args.measure:
                setup.shared_ref = None
                results[setting]["time"] = run_timing(setup, setting, args.modes)
            if "overhead" in args.measure:
                results[setting]["overhead"] = run_overhead(args, setting, args.modes)
            if "memory" in args.measure:
                data_dir = os.path.join(output_dir, f"data-{setting}")
                dataset.save_to_disk(data_dir)
                results[setting]["memory"] = run_memory(args, setting, args.modes, data_dir)
    print_table(results, args)
    print(f"\nload average at the end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "load_end": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
