"""
TI-DPO under DeepSpeed ZeRO-2 and ZeRO-3, two CPU processes (`DS_ACCELERATOR=cpu`, gloo), launched like the README's
CPU command: `accelerate launch` with the shipped `zero2`/`zero3` config and `--num_processes 2 --mixed_precision no`,
and the script's `--use_cpu --bf16 False`. A tiny local model, policy anchors on.

Five short runs, shared by the tests (about 20 s each on 2 cores; the first DeepSpeed run of a machine also JIT-builds
its shm communication op, about a minute):
- DDP (the `test_distributed` command) and ZeRO-2, 2 steps of plain SGD from the same start on the same data: the
  parameters after the update are a linear function of the all-reduced gradients, so equal parameters mean equal
  gradients (Adam's first steps are nearly sign(gradient) and would hide a gradient error);
- ZeRO-3, 4 steps with a checkpoint at step 2, and the same run resumed from that checkpoint;
- ZeRO-3 with LoRA and gradient checkpointing (which TRL makes reentrant under ZeRO-3) and dataset anchors, 2 steps.

Each rank records the distributed type and world size its trainer saw, its log history and every parameter, gathered
from the ZeRO-3 partitions.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ANCHORS, PAIRS


pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed: pip install 'trl-tidpo[deepspeed]'"
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "trl_tidpo" / "accelerate_configs"

RECORDING_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from trl_tidpo.trainer.tidpo_trainer import TIDPOTrainer
    from trl_tidpo.tools.train_script import main

    record = {}
    train = TIDPOTrainer.train
    def recording_train(self, *args, **kwargs):
        output = train(self, *args, **kwargs)
        params = {}
        for name, param in self.model.named_parameters():
            if hasattr(param, "ds_id"):  # a ZeRO-3 partition: gather the whole parameter (collective, same order)
                import deepspeed
                with deepspeed.zero.GatheredParameters([param]):
                    params[name] = param.detach().clone()
            else:
                params[name] = param.detach().clone()
        torch.save(params, os.path.join(os.environ["RECORD_DIR"], f"params{dist.get_rank()}.pt"))
        record.update(
            distributed_type=self.accelerator.distributed_type.value,
            zero_stage=self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else None,
            world_size=self.args.world_size,
            torch_world_size=dist.get_world_size(),
            log_history=self.state.log_history,
        )
        return output
    TIDPOTrainer.train = recording_train

    status = main()
    with open(os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(record, f)
    sys.exit(status)
    """
)

TRAINING_ARGS = [
    "--use_cpu", "--bf16", "False", "--report_to", "none", "--disable_tqdm", "True",
    "--gradient_checkpointing", "False", "--per_device_train_batch_size", "2", "--logging_steps", "1",
    "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--seed", "0",
    "--triplet_gamma", "0.1", "--anchor_source", "policy", "--anchor_max_new_tokens", "3",
    "--tdpo_alpha", "0.5",  # the sequential KL: its LM-head projection is gathered by the head's ZeRO-3 hooks
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deepspeed")
    (path / "pairs.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "chosen": " " + c, "rejected": " " + r}) + "\n" for p, c, r in PAIRS)
    )
    (path / "pairs_with_anchors.jsonl").write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": " " + c, "rejected": " " + r, "anchor": a}) + "\n"
            for (p, c, r), a in zip(PAIRS, ANCHORS, strict=True)
        )
    )
    (path / "recording_tidpo.py").write_text(RECORDING_SCRIPT)
    return path


def launch(workdir: Path, name: str, engine: str, model_dir: str, *extra: str) -> tuple[list[dict], list[dict]]:
    """Run the recording script in two CPU processes under `engine` ("ddp", "zero2", "zero3"); per-rank records."""
    record_dir = workdir / name
    record_dir.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # two processes on a 2-core machine
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "RECORD_DIR": str(record_dir),
    }
    if engine == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
        launch_args = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                       "--dynamo_backend", "no"]  # fmt: skip
    else:
        env["DS_ACCELERATOR"] = "cpu"
        env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed into plain DDP
        launch_args = ["--config_file", str(CONFIGS / f"{engine}.yaml"), "--num_processes", "2",
                       "--mixed_precision", "no"]  # fmt: skip
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", *launch_args, "--main_process_port", "0",
        str(workdir / "recording_tidpo.py"),
        "--model_name_or_path", model_dir, "--dataset_name", str(workdir / "pairs.jsonl"),
        "--output_dir", str(workdir / name / "out"), *TRAINING_ARGS, *extra,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    records = [json.loads((record_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    params = [torch.load(record_dir / f"params{rank}.pt") for rank in (0, 1)]
    for record in records:
        record["stdout"] = result.stdout
    return records, params


@pytest.fixture(scope="module")
def ddp_run(workdir, model_dir):
    return launch(workdir, "ddp", "ddp", model_dir, "--max_steps", "2", "--save_strategy", "no")


@pytest.fixture(scope="module")
def zero2_run(workdir, model_dir):
    return launch(workdir, "zero2", "zero2", model_dir, "--max_steps", "2", "--save_strategy", "no")


@pytest.fixture(scope="module")
def zero3_run(workdir, model_dir):
    return launch(workdir, "zero3", "zero3", model_dir, "--max_steps", "4", "--save_strategy", "steps",
                  "--save_steps", "2")  # fmt: skip


@pytest.fixture(scope="module")
def zero3_resumed_run(workdir, model_dir, zero3_run):
    checkpoint = workdir / "zero3" / "out" / "checkpoint-2"
    return launch(workdir, "zero3-resumed", "zero3", model_dir, "--max_steps", "4", "--save_strategy", "no",
                  "--resume_from_checkpoint", str(checkpoint))  # fmt: skip


@pytest.fixture(scope="module")
def zero3_lora_checkpointing_run(workdir, model_dir):
    """
    LoRA + gradient checkpointing under ZeRO-3, where TRL makes checkpointing reentrant: attribution in its own forward,
    dataset anchors stacked with the pairs in one forward, the reference from the disabled adapter. Dataset anchors,
    because policy anchors re-enable checkpointing before the first forward and so hid a first step that ran
    non-reentrant (TRL's setting reached `gradient_checkpointing_kwargs` but not `activation_checkpointing_kwargs`).
    """
    return launch(workdir, "zero3-lora", "zero3", model_dir, "--max_steps", "2", "--save_strategy", "no",
                  "--dataset_name", str(workdir / "pairs_with_anchors.jsonl"), "--anchor_source", "dataset",
                  "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
                  "--gradient_checkpointing", "True")  # fmt: skip


def step_logs(record: dict) -> list[dict]:
    return [log for log in record["log_history"] if "loss" in log]


@pytest.mark.parametrize("run, stage", [("zero2_run", 2), ("zero3_run", 3), ("zero3_lora_checkpointing_run", 3)])
def test_zero_stage_trains_tidpo_with_anchors(request, run, stage):
    records, _ = request.getfixturevalue(run)
    for record in records:
        assert record["distributed_type"] == "DEEPSPEED" and record["zero_stage"] == stage
        assert record["world_size"] == record["torch_world_size"] == 2
    assert f"Distributed type: DEEPSPEED, ZeRO stage {stage}, 2 process(es)." in records[0]["stdout"]
    steps = step_logs(records[0])
    assert [log["step"] for log in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 2
    for log in steps:
        for key in ("loss", "rewards/margins", "token_weights/mean", "token_weights/std", "token_weights/entropy",
                    "triplet/loss", "triplet/dist_pos", "triplet/anchor_tokens", "kl/chosen",
                    "kl/rejected"):  # fmt: skip
            assert math.isfinite(log[key]), key
        assert log["token_weights/fallback_rows"] == 0
        assert log["token_weights/mean"] == pytest.approx(1.0, abs=1e-5)  # "mean" normalisation, real TI-DPO weights
        assert log["token_weights/std"] > 0
    assert steps[-1]["rewards/margins"] != 0  # it trained


@pytest.mark.parametrize("run", ["zero2_run", "zero3_run", "ddp_run", "zero3_lora_checkpointing_run"])
def test_both_ranks_end_with_identical_parameters(request, run):
    _, (params0, params1) = request.getfixturevalue(run)
    assert params0.keys() == params1.keys() and params0
    for name in params0:
        torch.testing.assert_close(params0[name], params1[name], rtol=0, atol=0, msg=name)


def test_zero2_matches_ddp_from_the_same_start(ddp_run, zero2_run, model_dir):
    """Same start, same shards, same anchors (same seeds): ZeRO-2's partitioned gradients and SGD equal DDP's."""
    from safetensors.torch import load_file

    ddp, ddp_params = ddp_run[0][0], ddp_run[1][0]
    zero2, zero2_params = zero2_run[0][0], zero2_run[1][0]
    initial = load_file(Path(model_dir) / "model.safetensors")
    for name, value in ddp_params.items():
        assert not torch.equal(value, initial[name]), name  # every parameter moved
        torch.testing.assert_close(zero2_params[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for key in ("loss", "token_weights/std", "triplet/loss", "kl/rejected", "rewards/margins"):
        assert [log[key] for log in step_logs(zero2)] == pytest.approx([log[key] for log in step_logs(ddp)], rel=1e-5)


def test_zero3_first_steps_match_zero2(zero2_run, zero3_run):
    """
    ZeRO-3 attributes in a separate forward (exact) and projects the sequential KL through the head module: its first
    two steps log what ZeRO-2 logs.
    """
    zero2, zero3 = step_logs(zero2_run[0][0]), step_logs(zero3_run[0][0])[:2]
    for key in ("loss", "token_weights/std", "token_weights/max", "triplet/loss", "kl/rejected", "rewards/margins"):
        assert [log[key] for log in zero3] == pytest.approx([log[key] for log in zero2], rel=1e-5, abs=1e-7), key


def test_zero3_resume_continues_the_same_trajectory(zero3_run, zero3_resumed_run):
    """Resumed from the ZeRO-3 checkpoint of step 2, steps 3-4 log the uninterrupted run's losses and end equal."""
    full, resumed = step_logs(zero3_run[0][0]), step_logs(zero3_resumed_run[0][0])
    assert [log["step"] for log in resumed] == [1, 2, 3, 4]  # steps 1-2 come back with the checkpoint's state
    resumed = resumed[2:]
    for key in ("loss", "token_weights/std", "triplet/loss", "rewards/margins"):
        assert [log[key] for log in resumed] == pytest.approx([log[key] for log in full[2:]], rel=1e-5), key
    full_params, resumed_params = zero3_run[1][0], zero3_resumed_run[1][0]
    for name, value in full_params.items():
        torch.testing.assert_close(resumed_params[name], value, rtol=1e-5, atol=1e-6, msg=name)
