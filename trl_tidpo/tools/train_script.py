"""
The TI-DPO training script: TRL's `trl dpo` script (`trl/scripts/dpo.py`) with [`TIDPOTrainer`] in place of
`DPOTrainer`. `examples/tidpo.py` and `trl-tidpo train` run this same code.

Every [`TIDPOConfig`] field (and so every `DPOConfig` / `TrainingArguments` field) is a flag, as are TRL's
`ScriptArguments`, `ModelConfig` (`--use_peft`, `--lora_r`, `--load_in_4bit`, ...) and `DatasetMixtureConfig`;
`--config recipe.yaml` sets their defaults and flags override it. `--help` lists them all.

# QLoRA on one GPU (the paper's setting, see `examples/recipes/`)
```bash
trl-tidpo train --config examples/recipes/llama31_8b_qlora_ultrafeedback.yaml
```

# Several GPUs (DDP; or `fsdp2`, `zero2`, `zero3`, or a path to your own accelerate config)
```bash
trl-tidpo train --accelerate_config multi_gpu --num_processes 8 \
    --model_name_or_path Qwen/Qwen2-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized \
    --use_peft --lora_r 16 --lora_alpha 32 --output_dir Qwen2-0.5B-TI-DPO
```
Flags that are not the script's (`--num_processes 8`) go to `accelerate launch`, as with TRL's CLI.

# Two processes on CPU (DDP over gloo)
```bash
OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
    --mixed_precision no --dynamo_backend no --main_process_port 0 examples/tidpo.py \
    --model_name_or_path ./tiny-model --dataset_name ./pairs.jsonl --use_cpu --bf16 False --output_dir out
```
`accelerate launch --cpu --num_processes 2` silently starts one process; `--multi_gpu` without
`ACCELERATE_USE_CPU=true` starts two unsynchronised processes that each train on all the data.

`--dataset_name` is a hub id or a local path: a JSON / JSONL / parquet / CSV file (its rows are the training
split), a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a folder of data files.

`--precompute_ref_log_probs True` caches the reference's log-probs per completion token (TRL caches sums; TI-DPO's
weights are known only at the step) and, for full fine-tuning, frees the reference unless policy anchors or per-step
reference attribution still need it; it is refused with `--tdpo_alpha > 0`.
"""

import gc
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from packaging.version import Version
from transformers.utils import is_bitsandbytes_available
from trl import (
    DatasetMixtureConfig,
    ModelConfig,
    ScriptArguments,
    TrlParser,
    get_dataset,
    get_peft_config,
    get_quantization_config,
)

from ..trainer.checkpoints import SaveOnSignalCallback, check_output_dir, resolve_resume
from ..trainer.dataset_checks import check_dataset_columns
from ..trainer.tidpo_config import TIDPOConfig
from ..trainer.tidpo_trainer import TIDPOTrainer
from .launcher import ACCELERATE_CONFIG_NAMES, LAUNCHED_ENV, inside_launcher, launch  # noqa: F401
from .loading import check_local_data, load_preference_dataset, looks_like_path
from .script_parser import ScriptParser


logger = get_logger(__name__)


@dataclass
class TIDPOScriptArguments(ScriptArguments):
    """
    TRL's [`~trl.ScriptArguments`] plus `accelerate_config` and `overwrite_output_dir`.

    Args:
        accelerate_config (`str`, *optional*):
            Run under `accelerate launch` with this config: a file path, or the name of one shipped with trl-tidpo
            (`single_gpu`, `multi_gpu`, `fsdp2`, `zero2`, `zero3`). Unknown flags go to `accelerate launch`.
        overwrite_output_dir (`bool`, defaults to `False`):
            Start a new run in an `output_dir` that holds another run's `checkpoint-N` folders, deleting those
            folders (transformers 5 dropped its flag of that name). Without it such a run is refused.
    """

    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "Run under `accelerate launch` with this config: a path, or one shipped with trl-tidpo "
            f"({', '.join(ACCELERATE_CONFIG_NAMES)}). Flags the script does not know (e.g. `--num_processes 8`) "
            "go to `accelerate launch`."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an `output_dir` that holds another run's `checkpoint-N` folders, deleting "
            "those folders. Without it such a run is refused (unless it resumes with `--resume_from_checkpoint`)."
        },
    )


def make_parser(prog: str | None = "trl-tidpo train") -> TrlParser:
    """The script's parser: a `TrlParser` over the script, training, model and dataset-mixture arguments, with one-line
    argument errors and TI-DPO's own options first in `--help` (see `ScriptParser`)."""
    return ScriptParser((TIDPOScriptArguments, TIDPOConfig, ModelConfig, DatasetMixtureConfig), TIDPOConfig, prog=prog)


def main(argv: list[str] | None = None) -> int:
    """
    Parse `argv` (default: `sys.argv[1:]`) and train, or re-run under `accelerate launch` when asked to.

    Returns:
        `int`: the exit status, 0 on success. Bad input raises (`ValueError`, `ImportError`, `FileNotFoundError`)
        before anything is written to `output_dir`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, training_args, model_args, dataset_args, config_remaining, cli_remaining = parse_arguments(argv)
    if inside_launcher():
        # The launcher already applied its flags: a recipe's launch keys and `accelerate_config` come back here
        if cli_remaining:
            raise ValueError(
                f"Unknown argument(s) {cli_remaining}: not `trl-tidpo train` flags. This process was started by a "
                "launcher, so launch flags go before the script name in its command line."
            )
        ignored = config_remaining + (["accelerate_config"] if script_args.accelerate_config else [])
        if ignored and os.environ.get(LAUNCHED_ENV) != "1":
            logger.warning(f"Already running under a launcher: ignoring the launch settings {ignored}.")
        return train(script_args, training_args, model_args, dataset_args)
    launch_args = config_remaining + cli_remaining
    if script_args.accelerate_config is not None or launch_args:
        check_arguments(training_args, model_args, script_args)  # here too: fail before any process starts
        if script_args.dataset_name and not dataset_args.datasets:
            check_local_data(script_args.dataset_name)
        return launch(argv, script_args.accelerate_config, launch_args, cli_remaining)
    return train(script_args, training_args, model_args, dataset_args)


def parse_arguments(argv: list[str]) -> tuple:
    """
    `make_parser().parse_args_and_config(argv)` with its remaining strings separated, and transformers' bf16/GPU
    error (bf16 is `DPOConfig`'s default) turned into the flag to pass.

    Returns:
        `tuple`: `(script_args, training_args, model_args, dataset_args, config_remaining, cli_remaining)`.
    """
    parser = make_parser()
    try:
        return parser.parse_args_and_config(argv, return_remaining_strings=True, separate_remaining_strings=True)
    except ValueError as error:
        if "doesn't support bf16/gpu" not in str(error):
            raise
        if torch.cuda.is_available():  # a GPU without bf16 (before Ampere)
            raise ValueError(
                "This GPU has no bf16 (`--bf16` is on by default): pass `--bf16 False` (or `--fp16`), or `--use_cpu`."
            ) from None
        raise ValueError("No GPU found: pass `--use_cpu` to train on the CPU.") from None


# ---------------------------------------------------------------------------------------------- validation


def check_arguments(
    training_args: TIDPOConfig, model_args: ModelConfig, script_args: TIDPOScriptArguments | None = None
) -> str | None:
    """
    The checks that need neither data nor a model: the model path, quantization, the checkpoint to resume and
    whether `output_dir` holds another run's checkpoints. Nothing is written.

    Returns:
        `str | None`: the checkpoint folder for `Trainer.train(resume_from_checkpoint=...)`.
    """
    if model_args.model_name_or_path is None:
        raise ValueError("`--model_name_or_path` is required: a hub model id or a local folder.")
    check_model_path(model_args.model_name_or_path)
    check_quantization(model_args)
    resume = check_resume(training_args)
    overwrite = script_args.overwrite_output_dir if script_args is not None else False
    check_output_dir(training_args.output_dir, resuming=resume is not None, overwrite=overwrite)
    return resume


def check_model_path(name: str) -> None:
    """A `--model_name_or_path` written as a local path (`./m`, `/m`, `~/m`, `a/b/c`) must exist: checked before the
    hub is tried, which would answer with a repo-id error."""
    path = Path(name).expanduser()
    if looks_like_path(name) and not path.exists():
        raise FileNotFoundError(
            f"`--model_name_or_path {name}`: no such folder. Pass the folder of a saved model (with its "
            "config.json), or a hub model id such as `Qwen/Qwen2-0.5B-Instruct`."
        )
    if path.is_file():
        raise ValueError(f"`--model_name_or_path {name}` is a file: pass the folder that holds config.json.")
    if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise ValueError(
            f"`--model_name_or_path {name}` has no config.json: not a folder written by `save_pretrained`. Pass the "
            "folder of a saved model, or a hub model id."
        )


def check_quantization(model_args: ModelConfig) -> None:
    """Fail early when `--load_in_4bit` / `--load_in_8bit` cannot work: no LoRA, no bitsandbytes, no backend."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return
    flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
    if not model_args.use_peft:
        raise ValueError(
            f"`{flag}` freezes the base model in low precision, so only LoRA adapters can train: add `--use_peft` "
            f"(QLoRA), or drop `{flag}` to fine-tune the full model."
        )
    if not is_bitsandbytes_available():
        raise ImportError(
            f"`{flag}` needs bitsandbytes (>= 0.46.1), which is not installed or too old. Install it with "
            f"`pip install -U 'trl-tidpo[quantization]'` (or `pip install -U bitsandbytes`), or drop `{flag}`."
        )
    from transformers.integrations.bitsandbytes import validate_bnb_backend_availability

    try:
        validate_bnb_backend_availability(raise_exception=True)
    except RuntimeError as error:
        raise RuntimeError(
            f"`{flag}`: {error} Install a bitsandbytes build for your device, or drop `{flag}`."
        ) from error


def check_resume(training_args: TIDPOConfig) -> str | None:
    """
    The checkpoint folder to resume from: `--resume_from_checkpoint` itself, which must be complete, or for
    `"true"`/`"last"` the newest complete checkpoint in `output_dir` (newer incomplete ones are skipped with a
    warning). None when not resuming.
    """
    require_optimizer = not training_args.save_only_model
    return resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir, require_optimizer)


# ---------------------------------------------------------------------------------------------- data and model


def load_splits(script_args: TIDPOScriptArguments, training_args: TIDPOConfig, dataset_args: DatasetMixtureConfig):
    """
    The training and (when `eval_strategy != "no"`) evaluation datasets, checked for their splits, columns and rows.

    Returns:
        `tuple`: `(train_dataset, eval_dataset or None)`.
    """
    if dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are given: `datasets` is used, `dataset_name` ignored.")
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_preference_dataset(
            script_args.dataset_name,
            script_args.dataset_config,
            script_args.dataset_train_split,
            script_args.dataset_streaming,
        )
    else:
        raise ValueError("No data: pass `--dataset_name` (a hub id or a local file/folder) or `datasets` in a recipe.")

    def split(name: str, flag: str):
        if name not in dataset:
            raise ValueError(
                f"The dataset has no split {name!r} (it has {list(dataset)}). Set `{flag}` to one of them."
                + (" Or set `--eval_strategy no`." if flag == "--dataset_test_split" else "")
            )
        return dataset[name]

    train_dataset = split(script_args.dataset_train_split, "--dataset_train_split")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = split(script_args.dataset_test_split, "--dataset_test_split")
    check_dataset_columns(training_args, train_dataset, eval_dataset)
    return train_dataset, eval_dataset


def load_quantized_model(model_args: ModelConfig, training_args: TIDPOConfig):
    """
    The base model in 4-bit (NF4 by default) or 8-bit through bitsandbytes, prepared for QLoRA with
    `peft.prepare_model_for_kbit_training` (norms and head in float32, input gradients on, optional checkpointing).
    """
    from peft import prepare_model_for_kbit_training
    from trl.trainer.utils import create_model_from_path

    model_init_kwargs = dict(training_args.model_init_kwargs or {})
    model_init_kwargs["quantization_config"] = get_quantization_config(model_args)
    if torch.cuda.is_available() and not training_args.use_cpu:
        model_init_kwargs["device_map"] = {"": PartialState().local_process_index}  # one GPU per process
    model = create_model_from_path(model_args.model_name_or_path, **model_init_kwargs)
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=training_args.gradient_checkpointing,
        gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs,
    )


# ---------------------------------------------------------------------------------------------- training


# What `accelerate launch` sets in the processes it starts when its config asks for an engine
REQUESTED_ENGINES = {"ACCELERATE_USE_DEEPSPEED": DistributedType.DEEPSPEED, "ACCELERATE_USE_FSDP": DistributedType.FSDP}


def report_distributed_type(accelerator) -> None:
    """
    Print the distributed type the trainer runs under, and warn when the accelerate config asked for DeepSpeed or FSDP
    but the trainer did not get it: accelerate falls back to plain data parallelism without a word on CPU (FSDP needs
    CUDA; `ACCELERATE_USE_CPU=true` also turns DeepSpeed off).
    """
    running = accelerator.distributed_type
    detail = ""
    if running == DistributedType.DEEPSPEED:
        detail = f", ZeRO stage {accelerator.state.deepspeed_plugin.zero_stage}"
    elif running == DistributedType.FSDP:
        detail = f", FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    accelerator.print(f"Distributed type: {running.value}{detail}, {accelerator.num_processes} process(es).")
    for variable, requested in REQUESTED_ENGINES.items():
        if os.environ.get(variable, "false").lower() == "true" and running != requested:
            logger.warning(
                f"The accelerate config asked for {requested.value}, but the trainer runs under {running.value}: "
                "accelerate fell back silently. FSDP needs CUDA GPUs; DeepSpeed on CPU needs `DS_ACCELERATOR=cpu` "
                "and must not be combined with `ACCELERATE_USE_CPU=true` (see the README's CPU command)."
            )


def train(
    script_args: TIDPOScriptArguments,
    training_args: TIDPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig,
) -> int:
    """
    Validate everything that can be validated without a model, then load, train, save and (optionally) push.

    SIGTERM or SIGINT during training saves a checkpoint at the end of the current step and stops (see
    `SaveOnSignalCallback`); the final model is then not saved to `output_dir`.

    Returns:
        `int`: 0; after a signal, 128 + its number (143 for SIGTERM, 130 for SIGINT), as a shell reports it.
    """
    resume = check_arguments(training_args, model_args, script_args)
    train_dataset, eval_dataset = load_splits(script_args, training_args, dataset_args)
    if script_args.overwrite_output_dir and resume is None:
        delete_old_checkpoints(training_args.output_dir)

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    if model_args.load_in_4bit or model_args.load_in_8bit:
        model = load_quantized_model(model_args, training_args)
        training_args.model_init_kwargs = None  # used above; the trainer receives a loaded model
    else:
        model = model_args.model_name_or_path

    trainer = TIDPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
    )
    on_signal = SaveOnSignalCallback()
    trainer.add_callback(on_signal)
    report_distributed_type(trainer.accelerator)
    if script_args.ignore_bias_buffers:
        # torch distributed hack, as in TRL's script
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]

    trainer.train(resume_from_checkpoint=resume)
    if on_signal.received is not None:
        trainer.accelerator.print(
            f"Stopped by {signal.Signals(on_signal.received).name} at step {trainer.state.global_step}: checkpoint "
            f"saved in {training_args.output_dir}. Resume with `--resume_from_checkpoint last`."
        )
    else:
        trainer.accelerator.print("Training completed.")
        trainer.save_model(training_args.output_dir)
        trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub and on_signal.received is None:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    # Free the DDP wrapper before the process group goes: its reducer holds the group, and a gloo group destroyed by
    # that reducer after `end()` waits forever on a peer that has exited (seen with torch 2.13, about 1 run in 5).
    accelerator = trainer.accelerator
    accelerator.free_memory()
    del trainer
    gc.collect()
    if Version(transformers.__version__) >= Version("5.18.0"):
        accelerator.end_training()  # what `trainer.end()` does: finish the trackers and destroy the process group
    return 0 if on_signal.received is None else 128 + on_signal.received


def delete_old_checkpoints(output_dir: str) -> None:
    """`--overwrite_output_dir`: delete the `checkpoint-N` folders of an earlier run (main process only)."""
    old = check_output_dir(output_dir, resuming=False, overwrite=True)
    if old and PartialState().is_main_process:
        logger.warning(f"--overwrite_output_dir: deleting the earlier run's {[p.name for p in old]} in {output_dir}.")
        for folder in old:
            shutil.rmtree(folder)
    PartialState().wait_for_everyone()


if __name__ == "__main__":
    # Processes started by `accelerate launch` run this module: same one-line errors as `trl-tidpo train`
    from trl_tidpo.tools.errors import run_script

    sys.exit(run_script("trl-tidpo train", main, sys.argv[1:]))
