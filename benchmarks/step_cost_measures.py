"""
The measures of `step_cost.py`, each on the trainers `step_cost_setup` builds: the step time of every mode in one
process, stepped in alternation (`run_timing`, with the FLOPs of one step), the per-step Python overhead on a model of
no compute (`run_overhead`) and the peak memory of each mode in a fresh subprocess (`run_memory`, which re-runs
`step_cost.py --memory-child`, answered by `memory_child`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from step_cost_setup import (
    Setup,
    TimedTIDPOTrainer,
    batches,
    build_data,
    build_trainer,
    prepare_for_steps,
    synchronize,
)

# ---------------------------------------------------------------- one step, its FLOPs


def timed_step(trainer, batch: dict, device: torch.device) -> tuple[float, float]:
    """
    Wall-clock and process CPU seconds of one `training_step` (forward + backward); gradients are cleared afterwards,
    untimed. CPU time (all threads of this process) is what the step computed, whatever else runs on the machine;
    with `--threads 1` it is the single-core step time without the other processes' share.
    """
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer.training_step(trainer.model, batch)
    synchronize(device)
    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    trainer.model.zero_grad(set_to_none=True)
    return elapsed, elapsed_cpu


class _GlobalOnly:
    """Stands in for `FlopCounterMode`'s module tracker, whose multi-grad hooks refuse `autograd.grad` w.r.t. a leaf
    (the frozen embedding output under LoRA); only the global total is needed here."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def flop_counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    return counter


# ---------------------------------------------------------------- time (one process, alternation)


def run_timing(setup: Setup, setting: str, modes: list[str]) -> dict:
    """Median step time (alternating modes round by round) and, with `--measure flops`, FLOPs of one step per mode."""
    args = setup.args
    trainers, result = {}, {}
    for mode in ["dpo", *modes]:
        start = time.perf_counter()
        trainers[mode] = build_trainer(setup, mode, setting)
        prepare_for_steps(trainers[mode])
        result[mode] = {}
        if isinstance(trainers[mode], TimedTIDPOTrainer) and trainers[mode].precompute_seconds:
            result[mode]["precompute_s"] = trainers[mode].precompute_seconds
            result[mode]["precompute_pairs"] = len(setup.dataset)
        print(f"[{setting}] built {mode} in {time.perf_counter() - start:.1f}s", flush=True)
    data = {mode: batches(trainer, args) for mode, trainer in trainers.items()}
    times = {mode: [] for mode in trainers}
    cpu_times = {mode: [] for mode in trainers}
    rounds = args.warmup + args.steps if "time" in args.measure else 0
    for round_ in range(rounds):
        for mode, trainer in trainers.items():
            torch.manual_seed(round_)  # the same anchor-sampling seed for every mode of a round
            elapsed, elapsed_cpu = timed_step(trainer, data[mode][round_ % len(data[mode])], setup.device)
            if round_ >= args.warmup:
                times[mode].append(elapsed)
                cpu_times[mode].append(elapsed_cpu)
        print(
            f"[{setting}] round {round_}{' (warm-up)' if round_ < args.warmup else ''}: "
            + ", ".join(
                f"{m} {t[-1]:.2f}s (cpu {cpu_times[m][-1]:.2f}s)"
                for m, t in times.items()
                if t and round_ >= args.warmup
            )
            + f"  load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    if rounds:
        for mode, trainer in trainers.items():
            sampling = getattr(trainer, "anchor_seconds", [])[args.warmup : args.warmup + args.steps]
            if sampling:  # part of the step time: anchor generation alone
                result[mode]["anchor_sampling_median_s"] = statistics.median(sampling)
        dpo, dpo_cpu = times["dpo"], cpu_times["dpo"]
        for mode, values in times.items():
            paired = [t / d for t, d in zip(values, dpo)]
            paired_cpu = [t / d for t, d in zip(cpu_times[mode], dpo_cpu)]
            result[mode].update(
                times=values,
                cpu_times=cpu_times[mode],
                median_s=statistics.median(values),
                median_cpu_s=statistics.median(cpu_times[mode]),
                ratio_of_medians=statistics.median(values) / statistics.median(dpo),
                paired_ratio_median=statistics.median(paired),
                paired_ratio_min=min(paired),
                paired_ratio_max=max(paired),
                cpu_ratio_median=statistics.median(paired_cpu),
                cpu_ratio_min=min(paired_cpu),
                cpu_ratio_max=max(paired_cpu),
            )
            if "precompute_s" in result[mode]:
                batches_in_dataset = result[mode]["precompute_pairs"] / args.batch_size
                result[mode]["precompute_in_dpo_steps_per_batch"] = (
                    result[mode]["precompute_s"] / batches_in_dataset / result["dpo"]["median_s"]
                )
    if (
        "flops" in args.measure
    ):  # load-independent cross-check: matmul/attention FLOPs of one step (forward + backward)
        for mode, trainer in trainers.items():
            torch.manual_seed(0)
            with flop_counter() as counter:
                timed_step(trainer, data[mode][0], setup.device)
            result[mode]["flops"] = counter.get_total_flops()
        for mode, values in result.items():
            values["flop_ratio"] = values["flops"] / result["dpo"]["flops"]
            print(f"[{setting}] FLOPs {mode}: {values['flops'] / 1e9:.1f} G ({values['flop_ratio']:.2f}x)")
    return result


# ---------------------------------------------------------------- per-step Python overhead (a model of no compute)

# A model whose kernels take microseconds: its step time is the step's Python (the trainer's own code, TRL's, the
# libraries'), which a compute-bound ratio hides on a small model and a GPU hides entirely.
OVERHEAD_MODEL = {
    "hidden": 16, "intermediate": 32, "layers": 1, "heads": 2, "kv_heads": 1, "vocab": 64,
    "seq_len": 24, "prompt_len": 8, "anchor_len": 8,
}  # fmt: skip


def run_overhead(args: argparse.Namespace, setting: str, modes: list[str]) -> dict:
    """
    Median time of one step (ms; process CPU time on a CPU, robust to other load, wall time on a GPU) per mode on
    `OVERHEAD_MODEL`, alternating modes round by round as
    `run_timing` does: the per-step Python overhead. A regression in it (e.g. a per-step package-metadata lookup,
    ~1 ms each) shows here in ms whatever the model size.
    """
    micro = argparse.Namespace(**{**vars(args), **OVERHEAD_MODEL})
    micro.steps, micro.warmup, micro.data_dir, micro.precompute_batch_size = args.overhead_steps, 2, None, None
    tokenizer, dataset = build_data(micro)
    with tempfile.TemporaryDirectory() as output_dir:
        setup = Setup(micro, tokenizer, dataset, torch.device(args.device), torch.float32, output_dir)
        trainers = {mode: build_trainer(setup, mode, setting) for mode in ["dpo", *modes]}
        for trainer in trainers.values():
            prepare_for_steps(trainer)
        data = {mode: batches(trainer, micro) for mode, trainer in trainers.items()}
        times = {mode: [] for mode in trainers}
        for round_ in range(micro.warmup + micro.steps):
            for mode, trainer in trainers.items():
                torch.manual_seed(round_)
                elapsed, elapsed_cpu = timed_step(trainer, data[mode][round_ % len(data[mode])], setup.device)
                if round_ >= micro.warmup:  # CPU time on CPU: the step's own work, whatever else loads the machine
                    times[mode].append((elapsed_cpu if setup.device.type == "cpu" else elapsed) * 1e3)
    result = {mode: {"overhead_ms": statistics.median(values)} for mode, values in times.items()}
    for mode, values in result.items():
        values["overhead_over_dpo_ms"] = values["overhead_ms"] - result["dpo"]["overhead_ms"]
        print(
            f"[{setting}] Python overhead per step (tiny model) {mode}: {values['overhead_ms']:.1f} ms "
            f"({values['overhead_over_dpo_ms']:+.1f} ms over DPO)",
            flush=True,
        )
    return result


# ---------------------------------------------------------------- memory (fresh subprocess per mode)


def rss_bytes() -> int:
    """This process's resident set now, in bytes (`/proc/self/statm`)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """
    This process's resident-set high-water mark in bytes: `VmHWM` of `/proc/self/status`. Not `getrusage`'s
    `ru_maxrss`: Linux keeps that across `execve`, so a memory subprocess of a parent that has held 2.5 GiB reports
    2.5 GiB whatever it does (a default run, which times every mode before the memory pass, read every mode's peak
    as the parent's).
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(
        "/proc/self/status has no VmHWM line: the CPU memory measure needs Linux (or measure on --device cuda)."
    )


def memory_child(setup: Setup, setting: str, mode: str) -> dict:
    """Peak memory of `mode` over `--memory-steps` steps, in this (fresh) process."""
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = rss_bytes()
    trainer = build_trainer(setup, mode, setting)
    prepare_for_steps(trainer)
    data = batches(trainer, setup.args)
    for step in range(setup.args.memory_steps):
        torch.manual_seed(step)
        timed_step(trainer, data[step % len(data)], setup.device)
    if setup.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        method = "torch.cuda.max_memory_allocated"
    else:
        peak = peak_rss_bytes()
        method = "VmHWM - RSS before models (MALLOC_MMAP_THRESHOLD_=65536)"
    precompute = getattr(trainer, "precompute_seconds", 0.0)
    batches_computed = getattr(trainer, "precompute_batches", 0)
    return {
        "peak_bytes": peak - baseline, "method": method, "precompute_s": precompute,
        "precompute_batches": batches_computed,
    }  # fmt: skip


# the script a memory subprocess runs: the CLI, whose `--memory-child` calls `memory_child` above
STEP_COST_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_cost.py")


def memory_subprocess(setting: str, mode: str, data_dir: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [
        sys.executable, STEP_COST_SCRIPT, *sys.argv[1:], "--memory-child", f"{setting}:{mode}",
        "--data-dir", data_dir,
    ]  # fmt: skip
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory run of {setting}:{mode} failed:\n{out.stderr[-4000:]}")
    line = [row for row in out.stdout.splitlines() if row.startswith("MEMORY ")][-1]
    return json.loads(line[len("MEMORY ") :])


def run_memory(args: argparse.Namespace, setting: str, modes: list[str], data_dir: str) -> dict:
    """
    Peak memory per mode, each in a fresh process. The dataset is file-backed (`data_dir`), so precomputed reference
    weights are cached next to it: the "reference" mode runs twice, first computing the weights (its peak includes
    that one-time pass, reported as `with_precompute`), then reading them from the cache (training steps only).
    """
    result = {}
    for mode in ["dpo", *modes]:
        if mode == "reference":
            first = memory_subprocess(setting, mode, data_dir)
            result[mode] = memory_subprocess(setting, mode, data_dir)
            if result[mode]["precompute_batches"] or not first["precompute_batches"]:
                raise RuntimeError(
                    f"the reference runs did not compute then read the cached weights: the first computed "
                    f"{first['precompute_batches']} batch(es), the second {result[mode]['precompute_batches']} "
                    f"(expected > 0, then 0); is `datasets` caching disabled, or {data_dir} not writable?"
                )
            result[mode]["with_precompute_bytes"] = first["peak_bytes"]
        else:
            result[mode] = memory_subprocess(setting, mode, data_dir)
        print(f"[{setting}] memory {mode}: {result[mode]['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    dpo_peak = result["dpo"]["peak_bytes"]
    for mode, values in result.items():
        values["ratio"] = values["peak_bytes"] / dpo_peak
        if "with_precompute_bytes" in values:
            values["with_precompute_ratio"] = values["with_precompute_bytes"] / dpo_peak
            print(
                f"[{setting}] memory {mode} including the one-time precompute: "
                f"{values['with_precompute_bytes'] / 2**20:.0f} MiB ({values['with_precompute_ratio']:.2f}x)"
            )
    return result
