"""
Two data-parallel processes on CPU (DDP over gloo, loopback only): `accelerate launch` runs the training script on a
tiny local model, with token weights and the triplet loss (policy anchors) on.

The command is the one the README gives for CPU. Two traps it avoids, measured here: `accelerate launch --cpu
--num_processes 2` silently starts one process, and `--multi_gpu` without `ACCELERATE_USE_CPU=true` starts two
unsynchronised processes that each train on all the data. So the test proves that two ranks ran: each records the world
size its trainer saw, the prompts its data loader gave it, and its local and gathered metric values.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import PAIRS


REPO = Path(__file__).resolve().parents[1]

# Runs `trl_tidpo.tools.train_script.main` unchanged, with recorders around the collator, the metric gather and `train`
RECORDING_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from trl_tidpo import DataCollatorForTIDPO
    from trl_tidpo.trainer.tidpo_trainer import TIDPOTrainer
    from trl_tidpo.tools.train_script import main

    record = {"prompts": [], "gathered": []}

    collate = DataCollatorForTIDPO.torch_call
    def torch_call(self, examples):
        record["prompts"].extend(example["prompt_ids"] for example in examples)
        return collate(self, examples)
    DataCollatorForTIDPO.torch_call = torch_call

    from trl_tidpo.trainer.metrics import Gather
    gather_mean = Gather.mean
    def recording_gather_mean(self, tensor):
        value = gather_mean(self, tensor)
        record["gathered"].append((tensor.detach().float().reshape(-1).tolist(), value))
        return value
    Gather.mean = recording_gather_mean

    train = TIDPOTrainer.train
    def recording_train(self, *args, **kwargs):
        output = train(self, *args, **kwargs)
        record.update(
            world_size=self.args.world_size,
            num_processes=self.accelerator.num_processes,
            process_index=self.accelerator.process_index,
            backend=dist.get_backend(),
            torch_world_size=dist.get_world_size(),
            log_history=self.state.log_history,
            # Per-parameter sums: equal on both ranks only if DDP all-reduced every gradient (the ranks saw different
            # pairs, and the policy runs two forwards, pairs then anchors, before each backward)
            param_sums=[p.detach().double().sum().item() for p in self.model.parameters()],
        )
        return output
    TIDPOTrainer.train = recording_train

    status = main()
    with open(os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(record, f)
    sys.exit(status)
    """
)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, model_dir) -> tuple[dict, dict, Path]:
    tmp_path = tmp_path_factory.mktemp("ddp")
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "chosen": " " + c, "rejected": " " + r}) + "\n" for p, c, r in PAIRS)
    )
    script = tmp_path / "recording_tidpo.py"
    script.write_text(RECORDING_SCRIPT)
    output_dir = tmp_path / "out"
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",  # two processes on a 2-core machine
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "RECORD_DIR": str(tmp_path),
    }
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "0",
        str(script),
        "--model_name_or_path", model_dir, "--dataset_name", str(data), "--output_dir", str(output_dir),
        "--use_cpu", "--bf16", "False", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True",
        "--gradient_checkpointing", "False", "--per_device_train_batch_size", "2", "--max_steps", "2",
        "--logging_steps", "1", "--learning_rate", "1e-2",
        "--triplet_gamma", "0.1", "--anchor_source", "policy", "--anchor_max_new_tokens", "3",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks[0], ranks[1], output_dir


def test_two_cpu_processes_train_on_their_own_shards(two_rank_run):
    rank0, rank1, output_dir = two_rank_run
    # two ranks really ran, in one gloo group that the trainer saw
    for index, rank in enumerate((rank0, rank1)):
        assert rank["process_index"] == index
        assert rank["world_size"] == rank["num_processes"] == rank["torch_world_size"] == 2
        assert rank["backend"] == "gloo"
    # each rank got its own shard: 2 steps x 2 pairs each, disjoint, together the whole dataset once
    prompts0 = {tuple(p) for p in rank0["prompts"]}
    prompts1 = {tuple(p) for p in rank1["prompts"]}
    assert len(rank0["prompts"]) == len(rank1["prompts"]) == 4
    assert len(prompts0) == len(prompts1) == 4 and not prompts0 & prompts1
    assert len(prompts0 | prompts1) == len(PAIRS)
    # metrics are gathered across ranks: both ranks log the mean over both ranks' values
    assert len(rank0["gathered"]) == len(rank1["gathered"]) > 0
    for (local0, value0), (local1, value1) in zip(rank0["gathered"], rank1["gathered"], strict=True):
        assert value0 == pytest.approx(value1, rel=1e-6, abs=1e-7)
        assert value0 == pytest.approx(sum(local0 + local1) / len(local0 + local1), rel=1e-5, abs=1e-6)
    assert any(local0 != local1 for (local0, _), (local1, _) in zip(rank0["gathered"], rank1["gathered"], strict=True))
    # losses finite, TI-DPO metrics logged
    steps = [log for log in rank0["log_history"] if "loss" in log]
    assert [log["step"] for log in steps] == [1, 2]
    for log in steps:
        for key in ("loss", "token_weights/mean", "triplet/loss", "rewards/margins"):
            assert math.isfinite(log[key]), key
        assert log["token_weights/fallback_rows"] == 0
    assert (output_dir / "model.safetensors").is_file()
    assert "TI-DPO" in (output_dir / "README.md").read_text()


def test_two_cpu_processes_keep_identical_parameters(two_rank_run):
    """DDP synchronised the update: after two steps on different shards, both ranks hold the same parameters."""
    rank0, rank1, _ = two_rank_run
    assert len(rank0["param_sums"]) == len(rank1["param_sums"]) > 0
    assert rank0["param_sums"] == pytest.approx(rank1["param_sums"], rel=1e-9, abs=1e-9)


def test_accelerate_config_flag_relaunches_the_script_in_a_child_process(tmp_path, model_dir, monkeypatch):
    """`--accelerate_config PATH`: `main` re-runs itself under `accelerate launch` (one CPU process here)."""
    from trl_tidpo.tools import train_script

    config = tmp_path / "cpu.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: 'no'\nnum_machines: 1\n"
        "num_processes: 1\nuse_cpu: true\n"
    )
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "chosen": " " + c, "rejected": " " + r}) + "\n" for p, c, r in PAIRS)
    )
    output_dir = tmp_path / "out"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(train_script, "train", lambda *args: pytest.fail("the launching process trained"))
    argv = [
        "--accelerate_config", str(config),
        "--model_name_or_path", model_dir, "--dataset_name", str(data), "--output_dir", str(output_dir),
        "--use_cpu", "--bf16", "False", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True",
        "--gradient_checkpointing", "False", "--per_device_train_batch_size", "2", "--max_steps", "1",
        "--triplet_gamma", "0",
    ]  # fmt: skip
    assert train_script.main(argv) == 0
    assert (output_dir / "model.safetensors").is_file()  # written by the launched process
    assert "TI-DPO" in (output_dir / "README.md").read_text()
