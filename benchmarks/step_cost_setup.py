"""
The pieces of `step_cost.py` that build what is measured: the modes compared (`MODES`), the model sizes (`PRESETS`),
the random-init Llama and the synthetic preference rows, each mode's trainer on a fresh policy with the same initial
weights (`build_trainer`, TI-DPO modes as `TimedTIDPOTrainer`), the fixed batches and the preparation `Trainer.train()`
does before its first step.
"""

import argparse
import os
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

from trl_tidpo import TIDPOConfig, TIDPOTrainer
from trl_tidpo.tools.demo.tiny_models import build_word_tokenizer
from trl_tidpo.trainer.precompute import reference_needed_at_each_step

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


# ---------------------------------------------------------------- stepping


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prepare_for_steps(trainer) -> None:
    """What `Trainer.train()` does before its first step that `training_step` relies on."""
    args = trainer.args
    if args.activation_checkpointing:  # transformers 5 turns checkpointing on in `train()`, not in `__init__`
        kwargs = dict(args.activation_checkpointing_kwargs or {})
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
