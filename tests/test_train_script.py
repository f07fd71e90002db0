"""
The training script (`trl_tidpo/train_script.py`, run by `examples/tidpo.py` and `trl-tidpo train`): flags and
`--config` recipes, local datasets, the shipped accelerate configs and `--accelerate_config`, QLoRA from flags, and bad
input that must fail before anything is written to `output_dir`.
"""

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PAIRS
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl import DPOConfig

from trl_tidpo import TIDPOConfig
from trl_tidpo.tools import launcher, train_script
from trl_tidpo.tools.train_script import ACCELERATE_CONFIG_NAMES, LAUNCHED_ENV, load_preference_dataset, main, make_parser


RECIPE = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "llama31_8b_qlora_ultrafeedback.yaml"
ROWS = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", ROWS)


def cpu_argv(model_dir: str, dataset: Path | str, output_dir: Path, *extra: str) -> list[str]:
    """A short CPU run of the script on the tiny model."""
    return [
        "--model_name_or_path", model_dir,
        "--dataset_name", str(dataset),
        "--output_dir", str(output_dir),
        "--use_cpu", "--bf16", "False",
        "--report_to", "none",
        "--save_strategy", "no",
        "--gradient_checkpointing", "False",
        "--per_device_train_batch_size", "2",
        "--max_steps", "2",
        "--learning_rate", "1e-2",
        "--triplet_gamma", "0",
        "--disable_tqdm", "True",
        *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- flags


def test_help_lists_every_tidpo_field_with_its_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    packed = "".join(text.split())  # argparse wraps help text, also after hyphens
    own_fields = {f.name for f in dataclasses.fields(TIDPOConfig)} - {f.name for f in dataclasses.fields(DPOConfig)}
    assert "importance_lambda" in own_fields and "triplet_gamma" in own_fields
    for field in dataclasses.fields(TIDPOConfig):
        if field.name in own_fields:
            assert f"--{field.name} " in text, field.name
            assert "".join(field.metadata["help"].split()) in packed, field.name
    flags = ["--model_name_or_path", "--dataset_name", "--use_peft", "--lora_r", "--lora_alpha",
             "--lora_target_modules", "--load_in_4bit", "--load_in_8bit", "--accelerate_config", "--beta"]  # fmt: skip
    for flag in flags:
        assert f"{flag} " in text, flag


def test_recipe_sets_defaults_and_flags_override_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("beta: 0.3\nimportance_lambda: 0.5\ntriplet_gamma: 0.2\nlora_r: 8\noutput_dir: from-recipe\n")
    _, args, model_args, _ = make_parser().parse_args_and_config(
        ["--config", str(recipe), "--importance_lambda", "0.9", "--use_cpu"]
    )
    assert (args.beta, args.importance_lambda, args.triplet_gamma, args.output_dir) == (0.3, 0.9, 0.2, "from-recipe")
    assert model_args.lora_r == 8


def test_paper_recipe_has_table_b13_values_and_only_known_keys():
    *parsed, config_remaining, cli_remaining = make_parser().parse_args_and_config(
        ["--config", str(RECIPE), "--use_cpu"], return_remaining_strings=True, separate_remaining_strings=True
    )
    script_args, args, model_args, _ = parsed
    assert config_remaining == [] and cli_remaining == []
    # TI-DPO values of the paper's Table B13 (SPEC.md §2-4)
    assert args.beta == 0.1
    assert args.importance_lambda == 0.7
    assert args.triplet_gamma == 0.1
    assert args.tdpo_alpha == 0.5
    assert args.prior_sigma_ratio == 0.25
    assert args.token_weighting == "ti_dpo" and args.anchor_source == "policy"
    # QLoRA on one GPU
    assert model_args.model_name_or_path == "meta-llama/Llama-3.1-8B-Instruct"
    assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4" and model_args.use_peft
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert script_args.dataset_name == "trl-lib/ultrafeedback_binarized"


# ---------------------------------------------------------------------------------------------------------- runs


def test_script_trains_from_jsonl_and_saves_model_with_card(tmp_path, model_dir, pairs_file):
    output_dir = tmp_path / "out"
    assert main(cpu_argv(model_dir, pairs_file, output_dir)) == 0
    saved = load_file(output_dir / "model.safetensors")
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert set(saved) <= set(initial)
    assert sum(not torch.equal(saved[name], initial[name]) for name in saved) == len(saved)  # trained, then saved
    card = (output_dir / "README.md").read_text()
    assert "trained with TI-DPO" in card and "2505.19653" in card


def test_script_with_lora_flags_saves_the_adapter(tmp_path, model_dir, pairs_file):
    output_dir = tmp_path / "out"
    argv = cpu_argv(model_dir, pairs_file, output_dir, "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
                    "--lora_target_modules", "q_proj", "v_proj")  # fmt: skip
    assert main(argv) == 0
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    adapter = load_file(output_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert not (output_dir / "model.safetensors").exists()


def test_paper_recipe_runs_qlora_on_a_tiny_model(tmp_path, model_dir, pairs_file):
    """The recipe as shipped (4-bit NF4 QLoRA, policy anchors, sequential KL, checkpointing) on a tiny model."""
    output_dir = tmp_path / "out"
    argv = ["--config", str(RECIPE),
            "--model_name_or_path", model_dir, "--dataset_name", str(pairs_file), "--output_dir", str(output_dir),
            "--dtype", "float32", "--use_cpu", "--bf16", "False", "--eval_strategy", "no", "--save_strategy", "no",
            "--max_steps", "1", "--anchor_max_new_tokens", "3", "--lora_target_modules", "q_proj", "v_proj",
            "--disable_tqdm", "True"]  # fmt: skip
    assert main(argv) == 0
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert "TI-DPO" in (output_dir / "README.md").read_text()


@pytest.mark.parametrize("marker", [LAUNCHED_ENV, "ACCELERATE_DYNAMO_BACKEND"], ids=["our-relaunch", "user-launch"])
def test_launched_process_trains_and_ignores_the_recipes_launch_keys(
    tmp_path, model_dir, pairs_file, monkeypatch, marker
):
    """Under `accelerate launch` (ours, or the user's) a recipe's launch keys were already used: train, no relaunch."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("num_processes: 2\naccelerate_config: multi_gpu\ntriplet_gamma: 0.0\n")
    monkeypatch.setenv(marker, "1" if marker == LAUNCHED_ENV else "no")
    monkeypatch.setattr(train_script, "launch", lambda *args: pytest.fail("relaunched"))
    output_dir = tmp_path / "out"
    assert main(["--config", str(recipe), *cpu_argv(model_dir, pairs_file, output_dir)]) == 0
    assert (output_dir / "model.safetensors").is_file()


def test_launched_process_refuses_unknown_flags(tmp_path, model_dir, pairs_file, monkeypatch):
    monkeypatch.setenv(LAUNCHED_ENV, "1")
    with pytest.raises(ValueError, match=r"\['--num_processes', '2'\]: not `trl-tidpo train` flags"):
        main(cpu_argv(model_dir, pairs_file, tmp_path / "out", "--num_processes", "2"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------- datasets


def _save_folder(tmp_path: Path) -> Path:
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "saved")
    return tmp_path / "saved"


def _save_dict_folder(tmp_path: Path) -> Path:
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:2])}).save_to_disk(tmp_path / "dd")
    return tmp_path / "dd"


def _files_folder(tmp_path: Path) -> Path:
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "files" / "test.jsonl", ROWS[:2])
    return tmp_path / "files"


def _json_list(tmp_path: Path) -> Path:
    (tmp_path / "pairs.json").write_text(json.dumps(ROWS))
    return tmp_path / "pairs.json"


def _parquet(tmp_path: Path) -> Path:
    Dataset.from_list(ROWS).to_parquet(tmp_path / "pairs.parquet")
    return tmp_path / "pairs.parquet"


def _csv(tmp_path: Path) -> Path:
    Dataset.from_list(ROWS).to_csv(tmp_path / "pairs.csv", index=False)
    return tmp_path / "pairs.csv"


@pytest.mark.parametrize(
    "make, splits",
    [
        (lambda tmp_path: write_jsonl(tmp_path / "pairs.jsonl", ROWS), {"train"}),
        (_json_list, {"train"}),
        (_parquet, {"train"}),
        (_csv, {"train"}),
        (_save_folder, {"train"}),
        (_save_dict_folder, {"train", "test"}),
        (_files_folder, {"train", "test"}),
    ],
    ids=["jsonl", "json", "parquet", "csv", "save_to_disk-Dataset", "save_to_disk-DatasetDict", "folder-of-files"],
)
def test_local_dataset_formats_load_as_splits(tmp_path, make, splits):
    dataset = load_preference_dataset(str(make(tmp_path)))
    assert set(dataset) == splits
    assert dataset["train"].to_list() == ROWS


def test_single_file_becomes_the_requested_train_split(tmp_path):
    dataset = load_preference_dataset(str(write_jsonl(tmp_path / "p.jsonl", ROWS)), train_split="train_prefs")
    assert list(dataset) == ["train_prefs"]


def test_hub_id_goes_to_load_dataset(monkeypatch):
    calls = []
    # `load_preference_dataset` imports `datasets.load_dataset` when called (so that `--help` stays light)
    monkeypatch.setattr("datasets.load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or "ds")
    assert load_preference_dataset("trl-lib/ultrafeedback_binarized", "default") == "ds"
    assert calls == [(("trl-lib/ultrafeedback_binarized",), {"name": "default", "streaming": False})]


def test_unsupported_file_type_is_named(tmp_path):
    (tmp_path / "pairs.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        load_preference_dataset(str(tmp_path / "pairs.txt"))


# ---------------------------------------------------------------------------------------------------------- accelerate


@pytest.mark.parametrize(
    "name, distributed_type",
    [
        ("single_gpu", "NO"),
        ("multi_gpu", "MULTI_GPU"),
        ("fsdp2", "FSDP"),
        ("zero2", "DEEPSPEED"),
        ("zero3", "DEEPSPEED"),
    ],
)
def test_shipped_accelerate_configs_resolve_by_name(name, distributed_type):
    path = Path(launcher.resolve_accelerate_config(name))
    assert path.name == f"{name}.yaml" and path.parent.name == "accelerate_configs"
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] == distributed_type
    assert config["compute_environment"] == "LOCAL_MACHINE"
    if name.startswith("zero"):
        assert config["deepspeed_config"]["zero_stage"] == int(name[-1])
    if name == "fsdp2":
        assert config["fsdp_config"]["fsdp_version"] == 2
    assert set(ACCELERATE_CONFIG_NAMES) == {"single_gpu", "multi_gpu", "fsdp2", "zero2", "zero3"}


def test_accelerate_config_path_and_bad_name(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: 'NO'\n")
    assert launcher.resolve_accelerate_config(str(own)) == str(own)
    with pytest.raises(ValueError, match=r"zero9.*neither a file nor a config shipped.*multi_gpu"):
        launcher.resolve_accelerate_config("zero9")


def test_accelerate_config_relaunches_the_script_under_accelerate(tmp_path, model_dir, pairs_file, monkeypatch):
    """`--accelerate_config NAME` plus launch flags: the script re-runs as a module under `accelerate launch`."""
    import accelerate.commands.launch as accelerate_launch

    launched = []

    def fake_launch_command(args):
        launched.append((args, os.environ.get(LAUNCHED_ENV)))

    monkeypatch.setattr(accelerate_launch, "launch_command", fake_launch_command)
    output_dir = tmp_path / "out"
    script_argv = cpu_argv(model_dir, pairs_file, output_dir)
    assert main(["--accelerate_config", "multi_gpu", *script_argv[:4], "--num_processes", "2", *script_argv[4:]]) == 0

    ((args, marker),) = launched
    assert Path(args.config_file).name == "multi_gpu.yaml" and Path(args.config_file).is_file()
    assert args.num_processes == 2
    assert args.module and args.training_script == "trl_tidpo.tools.train_script"
    assert args.training_script_args == script_argv  # launch flags removed, the rest in order
    assert marker == "1" and LAUNCHED_ENV not in os.environ  # set for the children only
    assert not output_dir.exists()  # the parent process trained nothing


def test_unknown_flag_is_named_and_nothing_launches(tmp_path, model_dir, pairs_file, monkeypatch):
    import accelerate.commands.launch as accelerate_launch

    monkeypatch.setattr(accelerate_launch, "launch_command", lambda args: pytest.fail("launched"))
    with pytest.raises(ValueError, match=re.escape("['--lora_rr']")):
        main(cpu_argv(model_dir, pairs_file, tmp_path / "out", "--lora_rr", "3"))
    assert not (tmp_path / "out").exists()


def test_bad_flags_fail_before_launching(tmp_path, model_dir, pairs_file, monkeypatch):
    import accelerate.commands.launch as accelerate_launch

    monkeypatch.setattr(accelerate_launch, "launch_command", lambda args: pytest.fail("launched"))
    argv = cpu_argv(model_dir, pairs_file, tmp_path / "out", "--accelerate_config", "multi_gpu", "--load_in_4bit")
    with pytest.raises(ValueError, match="add `--use_peft`"):
        main(argv)


# ---------------------------------------------------------------------------------------------------------- bad input


def _drop_column(column):
    return lambda tmp_path: write_jsonl(
        tmp_path / "d.jsonl", [{k: v for k, v in r.items() if k != column} for r in ROWS]
    )


def _empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    return tmp_path / "empty.jsonl"


def _no_bitsandbytes(monkeypatch):
    monkeypatch.setattr(train_script, "is_bitsandbytes_available", lambda *args: False)


def _unsupported_backend(monkeypatch):
    import transformers.integrations.bitsandbytes as bnb_integration

    def refuse(raise_exception=False):
        raise RuntimeError("None of the available devices `available_devices = {'cpu'}` are supported.")

    monkeypatch.setattr(bnb_integration, "validate_bnb_backend_availability", refuse)


BAD_INPUT = {
    "missing-rejected": (_drop_column("rejected"), [], None, ValueError, r"missing column\(s\) \['rejected'\]"),
    "missing-chosen": (_drop_column("chosen"), [], None, ValueError, r"missing column\(s\) \['chosen'\]"),
    "missing-anchor": (
        None, ["--triplet_gamma", "0.1", "--anchor_source", "dataset"], None, ValueError,
        r"missing column\(s\) \['anchor'\].*anchor_source='policy'",
    ),
    "empty-dataset": (_empty_file, [], None, ValueError, r"empty\.jsonl` is an empty file: .* at least one"),
    "every-completion-empty-after-truncation": (
        None, ["--max_length", "1"], None, ValueError,
        r"Every pair of the train dataset \(8\) has a prompt of `max_length=1` tokens or more.*completions empty",
    ),
    "4bit-without-bitsandbytes": (
        None, ["--load_in_4bit", "--use_peft"], _no_bitsandbytes, ImportError,
        r"`--load_in_4bit` needs bitsandbytes.*pip install",
    ),
    "4bit-unsupported-backend": (
        None, ["--load_in_4bit", "--use_peft"], _unsupported_backend, RuntimeError,
        r"`--load_in_4bit`: None of the available devices.*drop `--load_in_4bit`",
    ),
    "8bit-without-lora": (None, ["--load_in_8bit"], None, ValueError, r"`--load_in_8bit`.*add `--use_peft`"),
    "precompute-ref-log-probs-with-kl": (
        None, ["--precompute_ref_log_probs", "True", "--tdpo_alpha", "0.5"], None, ValueError,
        r"precompute_ref_log_probs=True` with `tdpo_alpha > 0`.*tdpo_alpha=0",
    ),
    "missing-train-split": (
        _save_dict_folder, ["--dataset_train_split", "train_prefs"], None, ValueError,
        r"no split 'train_prefs' \(it has \['train', 'test'\]\).*--dataset_train_split",
    ),
    "missing-eval-split": (
        None, ["--eval_strategy", "steps"], None, ValueError, r"no split 'test'.*--eval_strategy no",
    ),
    "missing-checkpoint": (
        None, ["--resume_from_checkpoint", "nowhere/checkpoint-5"], None, FileNotFoundError,
        r"nowhere/checkpoint-5`: no such checkpoint folder",
    ),
    "missing-dataset-file": (
        lambda tmp_path: tmp_path / "absent.jsonl", [], None, FileNotFoundError, r"absent\.jsonl`: no such file",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_fails_early_and_writes_nothing(tmp_path, model_dir, pairs_file, monkeypatch, case):
    make_data, extra, setup, error, message = BAD_INPUT[case]
    if setup is not None:
        setup(monkeypatch)
    dataset = make_data(tmp_path) if make_data is not None else pairs_file
    output_dir = tmp_path / "out"
    with pytest.raises(error, match=message):
        main(cpu_argv(model_dir, dataset, output_dir, *extra))
    assert not output_dir.exists()


def test_missing_model_is_named(tmp_path, pairs_file):
    with pytest.raises(ValueError, match="--model_name_or_path` is required"):
        main(cpu_argv(model_dir=None, dataset=pairs_file, output_dir=tmp_path / "out")[2:])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "variable, engine", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")]
)
def test_script_warns_when_the_accelerate_config_engine_was_not_applied(monkeypatch, caplog, capsys, variable, engine):
    """On CPU accelerate runs an FSDP config as plain DDP without a word (and DeepSpeed under ACCELERATE_USE_CPU)."""
    import logging
    from types import SimpleNamespace

    from accelerate import PartialState
    from accelerate.utils import DistributedType

    PartialState()  # accelerate's logger needs the state
    accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2, print=print)
    monkeypatch.setenv(variable, "true")
    with caplog.at_level(logging.WARNING):
        train_script.report_distributed_type(accelerator)
    assert "Distributed type: MULTI_CPU, 2 process(es)." in capsys.readouterr().out
    assert f"asked for {engine}, but the trainer runs under MULTI_CPU" in caplog.text
    monkeypatch.delenv(variable)
    caplog.clear()
    train_script.report_distributed_type(accelerator)
    assert "asked for" not in caplog.text
