"""
What needs a CUDA GPU (marker `gpu`, skipped without one: `pytest -m gpu` runs only these), and the GPU check script
(`benchmarks/gpu_check.py`) tested on CPU for everything that does not need CUDA.

On a GPU: QLoRA (4-bit NF4) TI-DPO steps, bf16 weights that are finite with no fallback rows, and FSDP2 with one
process. The full check (SmolLM2-135M-Instruct, step-cost ratios, one JSON summary) is `bash benchmarks/gpu_check.sh`.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PAIRS
from helpers_trainer import CPU_ARGS, first_batch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_ARGS = {**CPU_ARGS, "use_cpu": False, "bf16": True}


def step_logs(trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "loss" in log and "train_loss" not in log]


@pytest.mark.gpu
@requires_cuda
def test_qlora_nf4_tidpo_steps_on_cuda(tmp_path, model_dir, tokenizer, standard_dataset):
    import bitsandbytes as bnb
    from trl import ModelConfig, get_peft_config

    from trl_tidpo import TIDPOConfig, TIDPOTrainer
    from trl_tidpo.tools.train_script import load_quantized_model

    model_args = ModelConfig(
        model_name_or_path=model_dir, dtype="bfloat16", load_in_4bit=True, bnb_4bit_quant_type="nf4", use_peft=True,
        lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"],
    )  # fmt: skip
    args = TIDPOConfig(output_dir=str(tmp_path), **{**GPU_ARGS, "learning_rate": 1e-2, "max_steps": 2,
                                                     "triplet_gamma": 0.1, "anchor_max_new_tokens": 4})  # fmt: skip
    model = load_quantized_model(model_args, args)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    trainer = TIDPOTrainer(
        model=model, args=args, train_dataset=standard_dataset, processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )  # fmt: skip
    lora = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" in name}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert lora and all(not torch.equal(params[name], value) for name, value in lora.items())
    for log in step_logs(trainer):
        assert all(math.isfinite(log[k]) for k in ("loss", "token_weights/std", "triplet/loss"))
        assert log["token_weights/fallback_rows"] == 0


@pytest.mark.gpu
@requires_cuda
def test_bf16_weights_are_finite_without_fallback_on_cuda(tmp_path, model_dir, tokenizer, standard_dataset):
    from transformers import AutoModelForCausalLM

    from trl_tidpo import TIDPOConfig, TIDPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    args = TIDPOConfig(output_dir=str(tmp_path), **{**GPU_ARGS, "max_steps": 2, "triplet_gamma": 0.0,
                                                     "gradient_checkpointing": True})  # fmt: skip
    trainer = TIDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=standard_dataset,
                           processing_class=tokenizer)  # fmt: skip
    batch = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in first_batch(trainer).items()}
    trainer.model.train()
    weights, fallback = trainer.compute_token_weights(trainer.concatenated_forward(trainer.model, batch))
    assert weights.dtype == torch.float32 and torch.isfinite(weights).all() and not fallback.any()
    trainer.train()
    assert all(log["token_weights/fallback_rows"] == 0 and math.isfinite(log["loss"]) for log in step_logs(trainer))


@pytest.mark.gpu
@requires_cuda
def test_fsdp2_one_process_trains_tidpo(tmp_path, model_dir):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--config_file", str(REPO / "trl_tidpo" / "accelerate_configs" / "fsdp2.yaml"), "--num_processes", "1",
        "--main_process_port", "0", "-m", "trl_tidpo.tools.train_script",
        "--model_name_or_path", model_dir, "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
        "--report_to", "none", "--save_strategy", "no", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--triplet_gamma", "0.1", "--anchor_max_new_tokens", "3", "--disable_tqdm", "True",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "Distributed type: FSDP, FSDP2, 1 process(es)." in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- the GPU check, on CPU


def test_gpu_check_dry_run_builds_and_validates_every_command(tmp_path):
    import gpu_check

    out = tmp_path / "summary.json"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    summary = json.loads(out.read_text())
    assert summary["mode"] == "dry-run" and set(summary["checks"]) == set(gpu_check.CHECKS)
    for name, entry in summary["checks"].items():
        assert entry["passed"] is None and entry["command"], name
    assert "--load_in_4bit" in summary["checks"]["qlora"]["command"]
    assert "fsdp2.yaml --num_processes 1" in summary["checks"]["fsdp2"]["command"]
    assert "--preset gpu --device cuda --dtype bf16" in summary["checks"]["step_cost"]["command"]
    assert gpu_check.TOTAL_BUDGET_S == 480  # under 8 minutes on one GPU, whatever each check takes


def test_gpu_check_refuses_to_run_without_cuda(tmp_path, monkeypatch):
    import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path / "summary.json")])


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu_runs_and_judges_the_qlora_check(tmp_path):
    """
    The check's own plumbing end to end on CPU at tiny sizes, for its QLoRA check (the bf16 check shares all of it):
    the script's run, its log history, the judgement, the JSON summary. About 30 s; `--smoke` with every check
    (step_cost's memory subprocesses included) takes about 4 minutes here and was run by hand.
    """
    out = tmp_path / "summary.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--checks", "qlora", "fsdp2",
               "--out", str(out), "--workdir", str(tmp_path / "work")]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["passed"] is True
    entry = summary["checks"]["qlora"]
    assert entry["passed"] and [step["step"] for step in entry["steps"]] == [1, 2], entry
    assert all(step["token_weights/fallback_rows"] == 0 for step in entry["steps"])
    assert summary["checks"]["fsdp2"]["passed"] is None  # skipped: CUDA only


def test_gpu_check_reads_step_cost_ratios(tmp_path):
    """`judge_step_cost` on the layout `step_cost.py --json` writes (keys as in `step_cost_measures.run_timing` /
    `run_memory`)."""
    import gpu_check

    modes = ["dpo", *gpu_check.STEP_COST_MODES]
    time_results = {m: {"paired_ratio_median": 1.0 + i / 10} for i, m in enumerate(modes)}
    memory_results = {m: {"ratio": 1.0 + i / 100, "peak_bytes": 1} for i, m in enumerate(modes)}
    results = {"full": {"time": time_results, "memory": memory_results}}
    path = tmp_path / "step_cost.json"
    path.write_text(json.dumps({"args": {}, "results": results}))
    summary = gpu_check.judge_step_cost(path)
    assert summary["passed"]
    assert summary["step_time_ratio_to_dpo"] == {"weights": 1.1, "reference": 1.2, "dataset_anchors": 1.3,
                                                 "policy_anchors": 1.4}  # fmt: skip
    assert summary["peak_memory_ratio_to_dpo"]["policy_anchors"] == 1.04
