"""
Checkpoints a run can trust (`trl_tidpo/trainer/checkpoints.py` and the training script): `last` takes the newest
complete checkpoint, a damaged one is named with the complete one before it, a new run does not write over another
run's checkpoints, and SIGTERM saves a checkpoint that resumes onto the uninterrupted run's loss trajectory.
Every refusal leaves the files on disk as they were.
"""

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import TrainerControl, TrainerState
from test_train_script import ROWS, cpu_argv, write_jsonl

from trl_tidpo.tools.train_script import main
from trl_tidpo.trainer.checkpoints import (
    SaveOnSignalCallback,
    check_checkpoint,
    check_output_dir,
    checkpoint_problem,
    last_complete_checkpoint,
    list_checkpoints,
    resolve_resume,
)


pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(output_dir: Path, step: int, weights: str = "model.safetensors") -> Path:
    """A checkpoint folder with every file `Trainer` writes for resuming (small, but real formats)."""
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, folder / weights)
    torch.save({"state": {0: torch.ones(64)}}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"python": 0, "cpu": torch.get_rng_state()}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` and the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------------------------- what is complete


def test_a_complete_checkpoint_has_no_problem(tmp_path):
    assert checkpoint_problem(make_checkpoint(tmp_path, 2)) is None
    assert checkpoint_problem(make_checkpoint(tmp_path, 3, weights="adapter_model.safetensors")) is None
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-2"]


def cut_short(folder: Path) -> None:
    """What a kill or a full disk during the save leaves: the model card only."""
    for path in folder.iterdir():
        path.unlink()
    (folder / "README.md").write_text("card")


DAMAGES = {
    "save-cut-short": (cut_short, "no trainer_state.json"),
    "truncated-state": (lambda f: truncate(f / "trainer_state.json"), "trainer_state.json does not parse"),
    "truncated-weights": (lambda f: truncate(f / "model.safetensors", 0.9), "model.safetensors is truncated"),
    "truncated-header": (lambda f: truncate(f / "model.safetensors", 0.01), "model.safetensors is truncated"),
    "no-weights": (lambda f: (f / "model.safetensors").unlink(), "no model weights"),
    "truncated-optimizer": (lambda f: truncate(f / "optimizer.pt"), "optimizer.pt is truncated"),
    "no-optimizer": (lambda f: (f / "optimizer.pt").unlink(), "no optimizer state (optimizer.pt)"),
    "truncated-scheduler": (lambda f: truncate(f / "scheduler.pt"), "scheduler.pt is truncated"),
    "truncated-rng-state": (lambda f: truncate(f / "rng_state.pth"), "rng_state.pth is truncated"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGES), ids=list(DAMAGES))
def test_damaged_checkpoint_is_named_with_the_complete_one_before_it(tmp_path, case):
    damage, problem = DAMAGES[case]
    make_checkpoint(tmp_path, 2)
    damage(make_checkpoint(tmp_path, 4))
    assert checkpoint_problem(tmp_path / "checkpoint-4").startswith(problem)
    before = snapshot(tmp_path)
    named = re.escape(f"Checkpoint `{tmp_path / 'checkpoint-4'}` is damaged: {problem}")
    earlier = re.escape(f". The newest complete checkpoint before it is `{tmp_path / 'checkpoint-2'}`.")
    with pytest.raises(ValueError, match=named + ".*" + earlier):
        check_checkpoint(tmp_path / "checkpoint-4")
    assert snapshot(tmp_path) == before


def test_last_skips_newer_incomplete_checkpoints_with_a_warning(tmp_path, caplog):
    make_checkpoint(tmp_path, 2)
    truncate(make_checkpoint(tmp_path, 10, weights="adapter_model.safetensors") / "adapter_model.safetensors")
    (tmp_path / "checkpoint-12").mkdir()
    (tmp_path / "checkpoint-12" / "README.md").write_text("card")
    before = snapshot(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert "skipping incomplete checkpoint(s) checkpoint-12 (no trainer_state.json); checkpoint-10 " in caplog.text
    assert "adapter_model.safetensors is truncated" in caplog.text
    assert snapshot(tmp_path) == before


def test_last_without_a_complete_checkpoint_says_so(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ValueError, match=r"holds no complete checkpoint to resume from \(incomplete: checkpoint-3 "):
        last_complete_checkpoint(tmp_path)


def test_save_only_model_checkpoints_need_no_optimizer(tmp_path):
    folder = make_checkpoint(tmp_path, 2)
    (folder / "optimizer.pt").unlink()
    (folder / "scheduler.pt").unlink()
    assert checkpoint_problem(folder, require_optimizer=False) is None
    assert checkpoint_problem(folder) == "no optimizer state (optimizer.pt)"


def test_output_dir_with_another_runs_checkpoints_is_refused(tmp_path):
    make_checkpoint(tmp_path, 5)
    with pytest.raises(ValueError, match=r"already holds checkpoints of another run \(checkpoint-5\).*"
                                         r"--resume_from_checkpoint last.*--overwrite_output_dir"):  # fmt: skip
        check_output_dir(tmp_path, resuming=False, overwrite=False)
    assert check_output_dir(tmp_path, resuming=True, overwrite=False) == []
    assert check_output_dir(tmp_path, resuming=False, overwrite=True) == [tmp_path / "checkpoint-5"]
    assert check_output_dir(tmp_path / "new", resuming=False, overwrite=False) == []


# ------------------------------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, model_dir):
    """A 2-step script run that saved checkpoint-2 (complete), and its data file."""
    root = tmp_path_factory.mktemp("run")
    data = write_jsonl(root / "pairs.jsonl", ROWS)
    assert main(cpu_argv(model_dir, data, root / "out", "--save_strategy", "steps", "--save_steps", "2")) == 0
    assert checkpoint_problem(root / "out" / "checkpoint-2") is None
    return root


def test_script_refuses_a_damaged_checkpoint_and_changes_nothing(trained_run, model_dir, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    for path in (trained_run / "out" / "checkpoint-2").iterdir():
        (out / "checkpoint-2" / path.name).write_bytes(path.read_bytes())
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "README.md").write_text("card")
    before = snapshot(tmp_path)
    argv = cpu_argv(model_dir, trained_run / "pairs.jsonl", out, "--resume_from_checkpoint", str(out / "checkpoint-4"))
    with pytest.raises(ValueError, match=re.escape(
        f"Checkpoint `{out / 'checkpoint-4'}` is damaged: no trainer_state.json. The newest complete checkpoint "
        f"before it is `{out / 'checkpoint-2'}`."
    )):  # fmt: skip
        main(argv)
    assert snapshot(tmp_path) == before


def test_script_refuses_a_new_run_over_old_checkpoints_and_changes_nothing(trained_run, model_dir):
    out = trained_run / "out"
    before = snapshot(out)
    with pytest.raises(ValueError, match="already holds checkpoints of another run"):
        main(cpu_argv(model_dir, trained_run / "pairs.jsonl", out))
    assert snapshot(out) == before


def test_script_resumes_last_complete_and_overwrite_starts_afresh(trained_run, model_dir, tmp_path, caplog):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    for path in (trained_run / "out" / "checkpoint-2").iterdir():
        (out / "checkpoint-2" / path.name).write_bytes(path.read_bytes())
    (out / "checkpoint-4").mkdir()  # a save cut short
    data = trained_run / "pairs.jsonl"
    with caplog.at_level(logging.WARNING):
        argv = cpu_argv(model_dir, data, out, "--resume_from_checkpoint", "last", "--max_steps", "3",
                        "--save_strategy", "steps", "--save_steps", "10")  # fmt: skip
        assert main(argv) == 0
    assert "skipping incomplete checkpoint(s) checkpoint-4 (no trainer_state.json)" in caplog.text
    assert f"Resuming from {out / 'checkpoint-2'} (step 2)." in caplog.text
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3  # one step after checkpoint-2's two

    assert main(cpu_argv(model_dir, data, out, "--overwrite_output_dir", "True")) == 0
    assert list_checkpoints(out) == []  # the earlier run's checkpoints are gone, the new run saved none


# ------------------------------------------------------------------------------------------------- signals


def _agree_worker(rank: int, port: int, results) -> None:
    """One of two gloo processes: only rank 0 received SIGTERM; both must decide to save and stop."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from transformers import TrainerControl

    from trl_tidpo.trainer.checkpoints import SaveOnSignalCallback

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    callback = SaveOnSignalCallback()
    if rank == 0:
        callback._pending = signal.SIGTERM
    control = callback.on_step_end(SimpleNamespace(world_size=2, device="cpu"), None, TrainerControl())
    results.put((rank, (callback.received, control.should_save, control.should_training_stop)))
    dist.destroy_process_group()


def test_every_rank_saves_and_stops_when_one_received_the_signal():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("fork").SimpleQueue()
    # fork: the children start with everything imported, in a fraction of a second
    mp.start_processes(_agree_worker, args=(port, results), nprocs=2, join=True, start_method="fork")
    decided = dict(results.get() for _ in range(2))
    assert decided == {0: (signal.SIGTERM, True, True), 1: (signal.SIGTERM, True, True)}


def test_signal_message_names_the_checkpoint_it_saved(tmp_path, caplog):
    """After a signal, the save that follows is named (folder and step); a save without a signal says nothing."""
    args, state, control = SimpleNamespace(world_size=1, output_dir=str(tmp_path)), TrainerState(), TrainerControl()
    callback = SaveOnSignalCallback()
    state.global_step = 6
    with caplog.at_level(logging.WARNING):
        callback.on_save(args, state, control)  # a scheduled save: no signal
        assert callback.saved_checkpoint is None and "saved checkpoint" not in caplog.text
        state.global_step = 7
        callback._pending = signal.SIGINT
        callback.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop
        callback.on_save(args, state, control)
    assert callback.saved_checkpoint == tmp_path / "checkpoint-7"
    assert f"SIGINT: saved checkpoint {tmp_path / 'checkpoint-7'} (step 7); stopping." in caplog.text


def test_resume_from_a_missing_folder_names_it(tmp_path):
    """`resolve_resume`, what the trainer and the script both call: a missing folder is named; None/False resume
    nothing."""
    with pytest.raises(FileNotFoundError, match=r"nowhere/checkpoint-5`: no such checkpoint folder"):
        resolve_resume("nowhere/checkpoint-5", tmp_path)
    assert resolve_resume(None, tmp_path) is None and resolve_resume(False, tmp_path) is None


def _losses(state_file: Path) -> list[tuple[int, float]]:
    history = json.loads(state_file.read_text())["log_history"]
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


def test_sigterm_saves_a_checkpoint_that_resumes_onto_the_same_losses(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    steps = "40"
    run = ["--max_steps", steps, "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1000"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "run.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "trl_tidpo.tools.cli", "train", *cpu_argv(model_dir, data, tmp_path / "cut", *run)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 120
        while "'loss'" not in log_path.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # a few steps in, with most still to run
        assert process.wait(timeout=120) == 128 + signal.SIGTERM, log_path.read_text()
    output = log_path.read_text()
    assert "Traceback" not in output
    (saved,) = list_checkpoints(tmp_path / "cut")
    cut_step = int(saved.name.split("-")[1])
    assert 1 <= cut_step < int(steps)
    assert checkpoint_problem(saved) is None
    assert f"Stopped by SIGTERM at step {cut_step}: checkpoint saved in {tmp_path / 'cut'}" in output
    assert f"SIGTERM: saved checkpoint {saved} (step {cut_step}); stopping." in output
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # no final model from a cut run

    assert main(cpu_argv(model_dir, data, tmp_path / "cut", *run, "--resume_from_checkpoint", "last")) == 0
    assert main(cpu_argv(model_dir, data, tmp_path / "whole", *run)) == 0
    resumed = _losses(tmp_path / "cut" / f"checkpoint-{steps}" / "trainer_state.json")
    whole = _losses(tmp_path / "whole" / f"checkpoint-{steps}" / "trainer_state.json")
    assert [step for step, _ in resumed] == list(range(1, int(steps) + 1))
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in whole], abs=1e-6)


def test_api_resume_true_takes_the_newest_complete_checkpoint(trained_run, model_dir, tmp_path, caplog):
    """`TIDPOTrainer.train(resume_from_checkpoint=True)`, as transformers users write it, skips a cut-short save."""
    from datasets import Dataset

    from trl_tidpo import TIDPOConfig, TIDPOTrainer

    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    for path in (trained_run / "out" / "checkpoint-2").iterdir():
        (out / "checkpoint-2" / path.name).write_bytes(path.read_bytes())
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "README.md").write_text("card")
    args = TIDPOConfig(output_dir=str(out), use_cpu=True, bf16=False, report_to=[], save_strategy="no", max_steps=3,
                       per_device_train_batch_size=2, learning_rate=1e-2, triplet_gamma=0.0, disable_tqdm=True)  # fmt: skip
    trainer = TIDPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(ROWS))
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    assert "skipping incomplete checkpoint(s) checkpoint-4 (no trainer_state.json)" in caplog.text
    assert f"Resuming from {out / 'checkpoint-2'} (step 2)." in caplog.text
    assert trainer.state.global_step == 3
    with pytest.raises(ValueError, match=r"checkpoint-4` is damaged: no trainer_state.json\. The newest complete"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
