"""
`TokenImportanceCallback` with the real trackers: TensorBoard (event files read back with TensorBoard's own reader) and
W&B in offline mode (nothing leaves the machine; the offline run's files are read back).
"""

import glob
import os
import time
from pathlib import Path

import pytest

from trl_tidpo import TIDPOConfig, TIDPOTrainer, TokenImportanceCallback

EXAMPLES = [{"prompt": "what should i do about a headache ?", "chosen": " rest .", "rejected": " ignore it !"}]


def _args(tmp_path, report_to):
    return TIDPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=report_to,
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        triplet_gamma=0.0,
        disable_tqdm=True,
        seed=0,
    )


def test_tensorboard_gets_scalars_and_the_token_weight_table(
    model_dir, tokenizer, standard_dataset, tmp_path, monkeypatch
):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    callback = TokenImportanceCallback(EXAMPLES, every_n_steps=1)
    trainer = TIDPOTrainer(
        model=model_dir,
        args=_args(tmp_path, ["tensorboard"]),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()

    runs = tmp_path / "out" / "runs"
    # the callback's writer: one text entry per render, at the training step it was rendered
    text_run = event_accumulator.EventAccumulator(str(runs / "token_importance"), size_guidance={"tensors": 0})
    text_run.Reload()
    assert text_run.Tags()["tensors"] == ["token_importance/text_summary"]
    events = text_run.Tensors("token_importance/text_summary")
    assert [event.step for event in events] == [1, 2]
    table = events[-1].tensor_proto.string_val[0].decode()
    assert "what should i do about a headache ?" in table
    assert table.count("| chosen |") == 1 and table.count("| rejected |") == 1
    assert "rest" in table and "ignore" in table and "(" in table  # tokens with their weights

    # the Trainer's own TensorBoard run: TI-DPO's weight statistics next to the loss, at both steps
    (scalar_dir,) = [path for path in runs.iterdir() if path.name != "token_importance"]
    scalars = event_accumulator.EventAccumulator(str(scalar_dir))
    scalars.Reload()
    tags = scalars.Tags()["scalars"]
    for tag in ("train/loss", "train/rewards/margins", "train/token_weights/mean", "train/token_weights/entropy"):
        assert tag in tags
        assert [event.step for event in scalars.Scalars(tag)] == [1, 2]
    # the weights average 1 over each completion (weight_normalization="mean")
    assert scalars.Scalars("train/token_weights/mean")[0].value == pytest.approx(1.0, abs=1e-4)


def test_wandb_offline_run_holds_the_token_weight_pages(model_dir, tokenizer, standard_dataset, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "trl-tidpo-test")
    callback = TokenImportanceCallback(EXAMPLES, every_n_steps=1)
    trainer = TIDPOTrainer(
        model=model_dir,
        args=_args(tmp_path, ["wandb"]),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    try:
        trainer.train()
        run_dir = wandb.run.dir
    finally:
        wandb.finish()

    assert os.path.basename(os.path.dirname(run_dir)).startswith("offline-run-")
    pages = sorted(glob.glob(os.path.join(run_dir, "media", "html", "token_importance_*.html")))
    assert len(pages) == 2  # one page per render (steps 1 and 2)
    texts = [Path(page).read_text(encoding="utf-8") for page in pages]
    for text in texts:
        assert "TI-DPO token weights at step" in text
        assert "what should i do about a headache ?" in text
    assert {"TI-DPO token weights at step 1" in text for text in texts} == {True, False}
    # the run's history (the binary .wandb log) holds the Trainer's scalars and the pages' key
    (log,) = glob.glob(os.path.join(os.path.dirname(run_dir), "run-*.wandb"))
    keys = (b"token_importance", b"train/loss", b"train/token_weights/mean")
    # wandb's service process may still be writing the log when `finish` returns: wait for it (at most 60 s)
    deadline = time.monotonic() + 60
    while not all(key in Path(log).read_bytes() for key in keys) and time.monotonic() < deadline:
        time.sleep(0.2)
    data = Path(log).read_bytes()
    assert all(key in data for key in keys)
