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
- Python overhead (`--measure overhead`): the median step time, in ms (process CPU time on a CPU), of each mode on a 1-layer, 16-hidden model
  (`OVERHEAD_MODEL`) whose kernels take microseconds, so what is left is the step's Python: the trainer's code, TRL's
  and the libraries'. It is printed next to the ratios, which a small per-step cost hides on a large model, and
  shows a regression such as a per-step package-metadata lookup (~1 ms each) in ms.
- Memory: each mode runs in a fresh subprocess (so no other trainer's tensors are counted) for `--memory-steps`
  steps. On CUDA, `torch.cuda.max_memory_allocated()`. On CPU, torch has no allocator statistics, so it is the
  process's resident-set high-water mark (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) minus the resident set
  measured just before the models are built; the subprocess runs with `MALLOC_MMAP_THRESHOLD_=65536`, which makes
  glibc serve every tensor larger than 64 KiB from its own mmap and return it on free, so the resident set follows
  the live tensors. Both include weights, reference, gradients and activations (no optimizer state: no optimizer step
  is taken). The dataset is file-backed, so the reference mode runs twice: once computing the cached weights (peak
  including that one-time pass) and once reading them (peak of the training steps).
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
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from datasets import Dataset, disable_progress_bars
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging
from trl import DPOConfig, DPOTrainer

from trl_tidpo import TIDPOConfig, TIDPOTrainer
from trl_tidpo.tools.demo.tiny_models import build_word_tokenizer
from trl_tidpo.trainer.tidpo_trainer import reference_needed_at_each_step

# name -> (TIDPOConfig overrides, description); "dpo" is TRL's DPOTrainer itself
MODES = {
    "dpo": (None, "TRL DPOTrainer (baseline)"),
    "uniform": ({"token_weighting": "uniform", "triplet_gamma": 0.0}, "TIDPOTrainer, uniform weights (γ=0)"),
    "weights": ({"triplet_gamma": 0.0}, "weights only, current policy each step (γ=0)"),
    "reference": (
        {"importance_model": "reference", "precompute_token_weights": True, "triplet_gamma": 0.0},
        "reference weights, precomputed and cached (γ=0)",
    ),
    "policy_anchors": (
        {"triplet_gamma": 0.1, "anchor_source": "policy", "anchor_max_new_tokens": 64},
        "full TI-DPO, policy-sampled anchors (64 new tokens)",
    ),
    "dataset_anchors": ({"triplet_gamma": 0.1, "anchor_source": "dataset"}, "full TI-DPO, dataset anchors"),
    "tdpo_kl": ({"triplet_gamma": 0.0, "tdpo_alpha": 0.5}, "weights (γ=0) + sequential KL, tdpo_alpha=0.5"),
}
DEFAULT_MODES = ["weights", "reference", "policy_anchors", "dataset_anchors", "tdpo_kl"]

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

PRESETS = {
    # compute-dominated on a 2-core CPU, a few seconds per DPO step
    "cpu": {
        "hidden": 512,
        "layers": 8,
        "intermediate": 1376,
        "heads": 8,
        "kv_heads": 4,
        "vocab": 8192,
        "seq_len": 256,
        "prompt_len": 64,
        "batch_size": 4,
    },
    # ~0.5B parameters, for one GPU in bf16
    "gpu": {
        "hidden": 1536,
        "layers": 16,
        "intermediate": 4096,
        "heads": 12,
        "kv_heads": 4,
        "vocab": 32000,
        "seq_len": 1024,
        "prompt_len": 256,
        "batch_size": 4,
    },
}


@dataclass
class Setup:
    """Everything a mode needs to build its trainer."""

    args: argparse.Namespace
    tokenizer: object
    dataset: Dataset
    device: torch.device
    dtype: torch.dtype
    output_dir: str
    shared_ref: LlamaForCausalLM | None = None


class TimedTIDPOTrainer(TIDPOTrainer):
    """
    TIDPOTrainer that records how long computing the reference token weights and sampling anchors took, and how many
    batches the precompute ran (0 when its columns came from the cache: the timed method also runs on a cache hit, to
    hash the reference and read the file, so its time alone cannot tell a hit from a miss).
    """

    precompute_seconds: float = 0.0

    def __init__(self, *args, **kwargs):
        self.anchor_seconds = []
        self.precompute_batches = 0
        super().__init__(*args, **kwargs)

    def _precompute_model(self, model):
        self.precompute_batches += 1  # called once per batch of a precompute that computes (never on a cache hit)
        return super()._precompute_model(model)

    def _add_reference_weight_columns(self, *args, **kwargs):
        start = time.perf_counter()
        super()._add_reference_weight_columns(*args, **kwargs)
        self.precompute_seconds += time.perf_counter() - start

    def _sample_policy_anchors(self, *args, **kwargs):
        synchronize(self.accelerator.device)
        start = time.perf_counter()
        batch = super()._sample_policy_anchors(*args, **kwargs)
        synchronize(self.accelerator.device)
        self.anchor_seconds.append(time.perf_counter() - start)
        return batch


# ---------------------------------------------------------------- model, data, trainers


def build_model(args: argparse.Namespace, tokenizer, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """A random-init Llama (same seed every call, so every mode starts from the same weights)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_len, args.prompt_len + args.anchor_len) + 64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def build_data(args: argparse.Namespace) -> tuple[object, Dataset]:
    """
    A word-level tokenizer of `--vocab` tokens and `(warmup + steps) * batch_size` random preference pairs whose rows
    tokenise to exactly `seq_len` tokens (prompt `prompt_len`, chosen/rejected `seq_len - prompt_len` with EOS) and
    an `anchor` column of `anchor_len` tokens (with EOS), the length of a policy anchor.
    """
    words = [f"w{i}" for i in range(args.vocab - 6)]  # 6 special tokens
    tokenizer = build_word_tokenizer(words)
    if args.data_dir:  # a memory subprocess: the parent's file-backed copy, so cached weights are shared
        return tokenizer, Dataset.load_from_disk(args.data_dir)
    generator = torch.Generator().manual_seed(0)
    n = (args.warmup + max(args.steps, args.memory_steps)) * args.batch_size

    def text(length: int) -> list[str]:
        ids = torch.randint(len(words), (n, length), generator=generator).tolist()
        return [" ".join(words[i] for i in row) for row in ids]

    completion_len = args.seq_len - args.prompt_len - 1  # + EOS
    dataset = Dataset.from_dict(
        {
            "prompt": text(args.prompt_len),
            "chosen": [" " + t for t in text(completion_len)],
            "rejected": [" " + t for t in text(completion_len)],
            "anchor": [" " + t for t in text(args.anchor_len - 1)],
        }
    )
    return tokenizer, dataset


def common_args(setup: Setup, setting: str) -> dict:
    on_cuda = setup.device.type == "cuda"
    return {
        "output_dir": setup.output_dir,
        "per_device_train_batch_size": setup.args.batch_size,
        "max_length": None,
        "bf16": on_cuda and setup.dtype == torch.bfloat16,
        "use_cpu": not on_cuda,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
        "gradient_checkpointing": setting == "lora",
        "dataloader_num_workers": 0,
        "precompute_ref_log_probs": setup.args.precompute_ref_log_probs,
    }


def build_trainer(setup: Setup, mode: str, setting: str):
    """The trainer of `mode` in `setting`, on a fresh policy with the benchmark's initial weights."""
    overrides, _ = MODES[mode]
    dataset = (
        setup.dataset
        if overrides and overrides.get("anchor_source") == "dataset"
        else setup.dataset.remove_columns("anchor")
    )
    kwargs = {
        "model": build_model(setup.args, setup.tokenizer, setup.device, setup.dtype),
        "train_dataset": dataset,
        "processing_class": setup.tokenizer,
    }
    if overrides is None:
        config = DPOConfig(**common_args(setup, setting))
    else:
        if setup.args.precompute_batch_size:
            overrides = {**overrides, "precompute_ref_batch_size": setup.args.precompute_batch_size}
        config = TIDPOConfig(**common_args(setup, setting), **overrides)
    if setting == "lora":
        # TRL's ModelConfig defaults (lora_r=16, lora_alpha=32, lora_dropout=0.05, PEFT's default target modules)
        kwargs["peft_config"] = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM")
    elif not config.precompute_ref_log_probs or (overrides is not None and reference_needed_at_each_step(config)):
        if setup.shared_ref is None:  # frozen: one copy serves every trainer of the process
            setup.shared_ref = build_model(setup.args, setup.tokenizer, setup.device, setup.dtype).eval()
        kwargs["ref_model"] = setup.shared_ref
    if overrides is None:
        return DPOTrainer(args=config, **kwargs)
    return TimedTIDPOTrainer(args=config, **kwargs)


def batches(trainer, args: argparse.Namespace) -> list[dict]:
    """The same pairs for every mode: rows `[k*B, (k+1)*B)` collated by the trainer's own collator, no shuffling."""
    dataset, b = trainer.train_dataset, args.batch_size
    return [trainer.data_collator([dataset[i] for i in range(k * b, (k + 1) * b)]) for k in range(len(dataset) // b)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def prepare_for_steps(trainer) -> None:
    """What `Trainer.train()` does before its first step that `training_step` relies on."""
    args = trainer.args
    if args.activation_checkpointing:  # transformers 5 turns checkpointing on in `train()`, not in `__init__`
        kwargs = dict(args.activation_checkpointing_kwargs or {})
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()


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
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        method = "ru_maxrss - RSS before models (MALLOC_MMAP_THRESHOLD_=65536)"
    precompute = getattr(trainer, "precompute_seconds", 0.0)
    batches_computed = getattr(trainer, "precompute_batches", 0)
    return {
        "peak_bytes": peak - baseline, "method": method, "precompute_s": precompute,
        "precompute_batches": batches_computed,
    }  # fmt: skip


def memory_subprocess(setting: str, mode: str, data_dir: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [
        sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--memory-child", f"{setting}:{mode}",
        "--data-dir", data_dir,
    ]  # fmt: skip
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory run of {setting}:{mode} failed:\n{out.stderr[-4000:]}")
    line = [l for l in out.stdout.splitlines() if l.startswith("MEMORY ")][-1]
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
                f"| {MODES[mode][1]} | {setting} | {first} | {fmt(ratio, '.2f')}{spread} | {fmt(cpu, '.2f')}{cpu_spread} | "
                f"{python_ms} | {fmt(t.get('flop_ratio'), '.2f')} | {fmt(mem, '.2f')} | {target} | {met} |"
            )
    for setting, res in results.items():
        for mode, t in res.get("time", {}).items():
            if "anchor_sampling_median_s" in t:
                print(
                    f"\n[{setting}] {mode}: anchor sampling alone {t['anchor_sampling_median_s']:.2f} s per step (median)"
                )
            if "precompute_s" in t:
                per_batch = t.get("precompute_in_dpo_steps_per_batch")
                with_precompute = res.get("memory", {}).get(mode, {}).get("with_precompute_ratio")
                if with_precompute:
                    print(f"\n[{setting}] peak memory including the one-time precompute: {with_precompute:.2f}x DPO's")
                print(
                    f"\n[{setting}] one-time precompute of the reference weights ({mode}): {t['precompute_s']:.2f} s for "
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
        help="pairs per batch of the one-time reference precompute (TRL's precompute_ref_batch_size; default: --batch-size)",
    )
    parser.add_argument(
        "--precompute-ref-log-probs",
        action="store_true",
        help="every mode (DPO too) with precompute_ref_log_probs=True; full setting: no reference kept where none is needed",
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
        parser.error("--precompute-ref-log-probs: tdpo_kl refuses precompute_ref_log_probs (its KL runs the reference)")
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
