"""
The `trl-tidpo demo`: SFT warm-up, then DPO and TI-DPO from the same starting point, scored on held-out pairs whose
critical tokens are known. `run_comparison` is shared with `benchmarks/critical_tokens.py`.
"""

import copy
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM, PrinterCallback, ProgressCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from ..explain import token_weights
from ..visualize import display_tokens
from ...trainer.tidpo_config import WEIGHT_OPTIONS, TIDPOConfig
from ...trainer.tidpo_trainer import TIDPOTrainer
from .tiny_models import build_tiny_llama, build_word_tokenizer
from ...modeling.tokenization import tokenize_completion
from .data import critical_token_labels, load_pairs, to_conversational, vocabulary
from .metrics import critical_base_rate, preference_accuracy, weight_metrics


TINY_MODEL = "tiny"
# TI-DPO settings compared by the benchmark; the demo runs "DPO" and "TI-DPO".
VARIANTS: dict[str, dict[str, Any] | None] = {
    "DPO": None,
    "TI-DPO": {},
    "TI-DPO λ=1 (gradient only)": {"importance_lambda": 1.0},
    "TI-DPO λ=0 (prior only)": {"importance_lambda": 0.0},
    "TI-DPO no triplet": {"triplet_gamma": 0.0},
}


@dataclass
class DemoConfig:
    """Everything one comparison depends on; the `trl-tidpo demo` flags set the first five."""

    output_dir: str = "tidpo-demo"
    steps: int = 150
    seed: int = 0
    device: str = "auto"
    model: str = TINY_MODEL
    sft_steps: int = 60
    learning_rate: float = 5e-4
    sft_learning_rate: float = 3e-3
    beta: float = 0.1
    batch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    anchor_max_new_tokens: int = 24
    num_html_pairs: int = 12
    max_eval_pairs: int | None = None
    lora_r: int = 16
    progress_bars: bool = True
    variants: list[str] = field(default_factory=lambda: ["DPO", "TI-DPO"])
    eval_at_steps: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- setup


def use_cpu(device: str) -> bool:
    """`--device`: "cpu", "cuda" or "auto" (CUDA when available)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"`--device` must be 'auto', 'cpu' or 'cuda', got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device cuda` was requested but no CUDA device is available.")
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


class _BarsWithoutLogLines(ProgressCallback):
    """TRL's progress bars, without printing a metrics dict at every logged step (we log every step for curves)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def _common_args(config: DemoConfig, output_dir: Path, steps: int) -> dict[str, Any]:
    return {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "per_device_train_batch_size": config.batch_size,
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "bf16": False,
        "use_cpu": use_cpu(config.device),
        "gradient_checkpointing": False,
        "disable_tqdm": not config.progress_bars,
        "dataloader_num_workers": 0,
    }


def limit_cpu_threads(config: DemoConfig) -> None:
    """
    One intra-op thread for the tiny model on CPU, unless `OMP_NUM_THREADS` says otherwise: its matrices are too
    small to gain from more, and spinning threads collapse on a busy machine (measured on 2 cores with other jobs
    running: 0.13-0.19 s per TI-DPO step with 1 thread, 0.5-7.9 s with 2).
    """
    if config.model == TINY_MODEL and use_cpu(config.device) and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def _quiet_bars(trainer) -> None:
    """Keep TRL's progress bars (if enabled) but not a printed metrics dict per step."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if not trainer.args.disable_tqdm:
        trainer.add_callback(_BarsWithoutLogLines)


def build_tokenizer(config: DemoConfig, rows: list[dict]):
    """The word-level tokenizer of the demo's vocabulary (tiny model) or the pretrained model's tokenizer."""
    if config.model == TINY_MODEL:
        return build_word_tokenizer(vocabulary(rows))
    from .smollm2 import load_tokenizer

    return load_tokenizer(config.model)


def sft_warmup(config: DemoConfig, tokenizer, train_rows: list[dict], out: Path) -> Path:
    """
    A seeded tiny Llama, trained briefly with TRL's `SFTTrainer` on both responses of every training pair (so it
    learns the language but prefers neither side), saved with its tokenizer to `out`. Returns `out`.
    """
    model = build_tiny_llama(
        len(tokenizer),
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        seed=config.seed,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    texts = [(row["prompt"], row[side]) for row in train_rows for side in ("chosen", "rejected")]
    dataset = Dataset.from_dict({"prompt": [p for p, _ in texts], "completion": [c for _, c in texts]})
    with tempfile.TemporaryDirectory() as run_dir:
        args = SFTConfig(**_common_args(config, Path(run_dir), config.sft_steps), learning_rate=config.sft_learning_rate)
        args.per_device_train_batch_size = 2 * config.batch_size
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        _quiet_bars(trainer)
        print(f"\n== SFT warm-up: {config.sft_steps} steps ==", flush=True)
        trainer.train()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prepare_start(config: DemoConfig, tokenizer, train_rows: list[dict], out: Path):
    """
    The starting policy (and reference) of every variant: for the tiny model, the folder `sft_warmup` saved; for
    SmolLM2, the loaded model itself (already instruction-tuned: no warm-up; trained with LoRA, so the reference is
    the same model with the adapter off and no copy is saved).
    """
    if config.model == TINY_MODEL:
        return sft_warmup(config, tokenizer, train_rows, out)
    from .smollm2 import load_smollm2

    model, _ = load_smollm2(config.model)
    return model


# ---------------------------------------------------------------------------------------------------- training


class HeldOutCurve(TrainerCallback):
    """Held-out `preference_metrics` at the given training steps (learning speed, before accuracy saturates)."""

    def __init__(self, steps: list[int], reference, tokenizer, rows: list[dict], beta: float):
        self.steps, self.reference, self.tokenizer, self.rows, self.beta = set(steps), reference, tokenizer, rows, beta
        self.points: dict[int, dict[str, float]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            was_training = model.training
            model.eval()
            reference = self.reference.to(next(model.parameters()).device)
            self.points[state.global_step] = preference_metrics(model, reference, self.tokenizer, self.rows, self.beta)
            model.train(was_training)


def train_variant(
    config: DemoConfig,
    name: str,
    overrides: dict[str, Any] | None,
    start,
    tokenizer,
    train_rows: list[dict],
    run_dir: Path,
    callbacks: list[TrainerCallback] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """
    Train `start` (a folder, or a model that is copied) with `DPOTrainer` (`overrides=None`) or `TIDPOTrainer`
    (`TIDPOConfig(**overrides)`), same seed, steps and learning rate. Returns the trained policy and
    `{"seconds_per_step", "log_history"}`.
    """
    dataset = Dataset.from_dict({key: [row[key] for row in train_rows] for key in ("prompt", "chosen", "rejected")})
    common = _common_args(config, run_dir, config.steps)
    common.update(learning_rate=config.learning_rate, beta=config.beta, max_length=256)
    peft_config = None
    if config.model != TINY_MODEL:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules="all-linear")
    if overrides is None:
        args, trainer_cls = DPOConfig(**common), DPOTrainer
    else:
        tidpo = {"anchor_max_new_tokens": config.anchor_max_new_tokens, **overrides}
        args, trainer_cls = TIDPOConfig(**common, **tidpo), TIDPOTrainer
    model = str(start) if isinstance(start, Path) else copy.deepcopy(start)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    _quiet_bars(trainer)
    print(f"\n== {name}: {config.steps} steps ==", flush=True)
    start_time = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start_time
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    model = trainer.model.eval()
    return model, {"seconds_per_step": seconds / config.steps, "log_history": history}


# ---------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sequence_logps(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 16) -> list[float]:
    """
    Sum of `log π(completion token | prefix)` over each completion's tokens (EOS included), tokenised exactly as the
    trainers tokenise them. Returns one float per pair.
    """
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        pairs = [tokenize_completion(tokenizer, p, c) for p, c in zip(prompts[i : i + batch_size], completions[i : i + batch_size])]
        width = max(len(p) + len(c) for p, c in pairs)
        ids = torch.full((len(pairs), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        scored = torch.zeros_like(ids)
        for row, (p, c) in enumerate(pairs):
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            attention[row, : len(p) + len(c)] = 1
            scored[row, len(p) : len(p) + len(c)] = 1
        ids, attention, scored = ids.to(device), attention.to(device), scored.to(device)
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
        logps = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None]).squeeze(-1)
        out.extend((logps * scored[:, 1:]).sum(dim=-1).tolist())
    return out


def preference_metrics(model, reference, tokenizer, rows: list[dict], beta: float) -> dict[str, float]:
    """
    Held-out DPO implicit rewards `β (log π(y) - log π_ref(y))` (unweighted sums, the same yardstick for every
    variant): `accuracy` (chosen reward > rejected reward) and mean reward `margin`.
    """
    prompts = [row["prompt"] for row in rows]
    rewards = {}
    for side in ("chosen", "rejected"):
        completions = [row[side] for row in rows]
        policy = sequence_logps(model, tokenizer, prompts, completions)
        ref = sequence_logps(reference, tokenizer, prompts, completions)
        rewards[side] = [beta * (p - r) for p, r in zip(policy, ref)]
    margins = [c - r for c, r in zip(rewards["chosen"], rewards["rejected"])]
    return {
        "accuracy": preference_accuracy(rewards["chosen"], rewards["rejected"]),
        "margin": sum(margins) / len(margins),
    }


def weight_options(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The `token_weights` options a variant's `TIDPOConfig` overrides (λ, ρ, span, scaling); none for DPO."""
    return {key: value for key, value in (overrides or {}).items() if key in WEIGHT_OPTIONS}


def weight_rows(model, tokenizer, rows: list[dict], **weight_kwargs) -> list[dict[str, Any]]:
    """
    TI-DPO's weights (`trl_tidpo.token_weights`) of every held-out chosen and rejected completion, with their
    critical-token labels: one dict per completion (`pair`, `side`, `tokens`, `weights`, `critical`, ...).
    """
    out = []
    special_ids = set(tokenizer.all_special_ids)
    for index, row in enumerate(rows):
        for side in ("chosen", "rejected"):
            tw = token_weights(model, tokenizer, row["prompt"], row[side], **weight_kwargs)
            labels = critical_token_labels(tokenizer, row["prompt"], row[side], row[f"{side}_critical"])
            out.append(
                {
                    "pair": index,
                    "side": side,
                    "token_ids": tw.token_ids,
                    "tokens": display_tokens(tokenizer, tw.token_ids),
                    "weights": tw.weights,
                    "importance": tw.importance,
                    "prior": tw.prior,
                    "critical": labels,
                    "special": [token_id in special_ids for token_id in tw.token_ids],
                }
            )
    return out


def run_comparison(config: DemoConfig, rows: list[dict] | None = None) -> dict[str, Any]:
    """
    SFT warm-up (tiny model), then each of `config.variants` from the same start; held-out metrics for each.

    Returns:
        `dict` with `results[variant]` (`accuracy`, `margin`, `roc_auc`, `top_k_share`, `seconds_per_step`,
        `log_history`, `weight_rows`), `start` (the weights' metrics on the starting model), `base_rate` and `config`.
    """
    rows = load_pairs() if rows is None else rows
    if config.model != TINY_MODEL:  # a chat model: the pairs as chat messages, through its chat template
        rows = [to_conversational(row) for row in rows]
    train_rows = [row for row in rows if row["split"] == "train"]
    test_rows = [row for row in rows if row["split"] == "test"][: config.max_eval_pairs]
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    limit_cpu_threads(config)
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config, rows)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir, warnings.catch_warnings():
        # transformers 5 renames TrainingArguments fields that TRL's configs still set; not actionable here
        warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
        return _compare(config, rows, tokenizer, train_rows, test_rows, out, Path(run_dir), t0)


def _compare(config, rows, tokenizer, train_rows, test_rows, out: Path, run_dir: Path, t0: float) -> dict[str, Any]:
    start = prepare_start(config, tokenizer, train_rows, out / "start-model")
    warmup_seconds = time.perf_counter() - t0
    reference = AutoModelForCausalLM.from_pretrained(start) if isinstance(start, Path) else start
    reference.eval()
    start_rows = weight_rows(reference, tokenizer, test_rows)
    prior_rows = weight_rows(reference, tokenizer, test_rows, importance_lambda=0.0)  # the model plays no part
    summary: dict[str, Any] = {
        "config": {k: v for k, v in asdict(config).items() if k != "progress_bars"},
        "num_train_pairs": len(train_rows),
        "num_test_pairs": len(test_rows),
        "warmup_seconds": warmup_seconds,
        "start": weight_metrics(start_rows),
        "prior_only": weight_metrics(prior_rows),
        "uniform": weight_metrics([{**row, "weights": [1.0] * len(row["weights"])} for row in start_rows]),
        "base_rate": critical_base_rate(start_rows),
        "base_rate_content": critical_base_rate(start_rows, content_only=True),
        "results": {},
    }
    for name in config.variants:
        curve = HeldOutCurve(config.eval_at_steps, reference, tokenizer, test_rows, config.beta)
        run = run_dir / f"run-{len(summary['results'])}"
        model, info = train_variant(config, name, VARIANTS[name], start, tokenizer, train_rows, run, [curve])
        reference = reference.to(next(model.parameters()).device)
        result = preference_metrics(model, reference, tokenizer, test_rows, config.beta)
        # Each TI-DPO variant is scored with the weights it trained with; DPO with TI-DPO's default weights
        rows_w = weight_rows(model, tokenizer, test_rows, **weight_options(VARIANTS[name]))
        result.update(weight_metrics(rows_w), **info, weight_rows=rows_w, held_out_curve=curve.points)
        summary["results"][name] = result
        if name == "TI-DPO":
            # Tiny model: the whole model (for `explain --model`); LoRA: the adapter (for `explain --adapter`)
            model.save_pretrained(out / "tidpo-model")
            tokenizer.save_pretrained(out / "tidpo-model")
    return summary


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """
    `trl-tidpo demo`: the comparison, then the table on stdout and `summary.json`, `token_importance.html`,
    `training_curves.png` (with matplotlib) and the TI-DPO-trained model (`tidpo-model/`) in `config.output_dir`.

    Returns:
        `dict`: the summary (as `run_comparison`), plus `wall_seconds` and `files` (what was written).
    """
    from ..results import load_summary, verdict
    from .report import PLOT_INSTALL_HINT, format_table, write_curves, write_html, write_summary

    t0 = time.perf_counter()
    rows = load_pairs()
    summary = run_comparison(config, rows)
    out = Path(config.output_dir)
    test_rows = [row for row in rows if row["split"] == "test"][: config.max_eval_pairs]  # plain text, for display
    files = [out / "summary.json", out / "token_importance.html"]
    write_html(summary, test_rows, files[1], num_pairs=config.num_html_pairs)
    if write_curves(summary, out / "training_curves.png"):
        files.append(out / "training_curves.png")
        plot_note = ""
    else:
        plot_note = f"training_curves.png was not written: matplotlib is not installed. Install it with: {PLOT_INSTALL_HINT}"
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["files"] = [str(f) for f in files]
    write_summary(summary, files[0])

    print("\n" + format_table(summary))
    print(f"\nWrote {', '.join(str(f) for f in files)} and the TI-DPO model to {out / 'tidpo-model'}")
    if plot_note:
        print(plot_note)
    example = test_rows[0]
    model_args = (
        f"--model {out / 'tidpo-model'} --chat-template off"
        if config.model == TINY_MODEL
        else f"--model {config.model} --adapter {out / 'tidpo-model'}"
    )
    print(
        f"Inspect any completion: trl-tidpo explain {model_args} "
        f"--prompt {json.dumps(example['prompt'])} --completion {json.dumps(example['chosen'].strip())}"
    )
    print(f"Total time: {summary['wall_seconds']:.0f} s")
    # This task cannot tell the weightings apart (every variant learns it); the benchmarks can: their verdict, read
    # from the summary JSON that docs/benchmarks.md is rendered from, is the last line
    print("This toy task cannot tell the weightings apart; the benchmarks can (docs/benchmarks.md). " + verdict(load_summary()))
    return summary
