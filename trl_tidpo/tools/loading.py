"""
What the tools load: a causal LM, a PEFT adapter, a tokenizer (`trl-tidpo explain`) and a preference dataset
(`--dataset_name` of the training script, `--dataset` of `explain`). Failures are one-line reasons that name the
option. Imports `datasets`, `transformers` and `peft` only when a function needs them.
"""

from pathlib import Path
from typing import TYPE_CHECKING

from .data_files import DATA_FILE_BUILDERS, check_data_file
from .errors import CLIError, one_line


if TYPE_CHECKING:
    from datasets import DatasetDict, IterableDatasetDict


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_model(name: str):
    """
    A causal LM and its tokenizer from a folder, or SmolLM2 by name.

    Raises:
        CLIError: one-line reasons: no such folder, not a causal LM, the named model's package is missing.
    """
    from .demo.smollm2 import SMOLLM2_NAME, ModelNotInstalledError, is_smollm2, load_smollm2

    if is_smollm2(name):
        try:
            return load_smollm2(name)
        except ModelNotInstalledError as error:
            raise CLIError(str(error)) from None
    if not Path(name).exists():
        raise CLIError(f"--model: {name!r} does not exist; give the folder of a saved causal LM, or {SMOLLM2_NAME!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise CLIError(f"--model: {name!r} is not a causal LM that transformers can load ({_reason(error)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise CLIError(f"--model: no tokenizer could be loaded from {name!r} ({_reason(error)})") from None
    return model.eval(), tokenizer


def load_adapter(model, path: str):
    """`model` with the PEFT adapter saved in `path` applied (eval mode). Raises `CLIError` when it cannot be."""
    if not (Path(path) / "adapter_config.json").is_file():
        raise CLIError(f"--adapter: {path!r} has no adapter_config.json (not a saved PEFT adapter)")
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, path).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CLIError(f"--adapter: {path!r} does not fit this model ({_reason(error)})") from None


def load_tokenizer(name: str):
    """The tokenizer of `--model` (a folder or SmolLM2 by name), without loading the model."""
    from .demo.smollm2 import ModelNotInstalledError, is_smollm2
    from .demo.smollm2 import load_tokenizer as load_smollm2_tokenizer

    if is_smollm2(name):
        try:
            return load_smollm2_tokenizer(name)
        except ModelNotInstalledError as error:
            raise CLIError(str(error)) from None
    if not Path(name).exists():
        raise CLIError(f"--model: {name!r} does not exist; give the folder of a saved model and its tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise CLIError(f"--model: no tokenizer could be loaded from {name!r} ({_reason(error)})") from None


def looks_like_path(name: str) -> bool:
    """Whether `name` is written as a local path (`./x`, `/x`, `~/x`, `a/b/c`, `x.jsonl`) rather than a hub id."""
    return name.startswith((".", "/", "~")) or Path(name).suffix in DATA_FILE_BUILDERS or name.count("/") > 1


def check_local_data(name: str, option: str = "--dataset_name") -> None:
    """
    The checks of `load_preference_dataset` that need no `datasets`: a local file of a supported type, not empty,
    readable (UTF-8, valid JSON / JSON Lines / CSV); every JSON/CSV file of a local folder readable. A hub id passes.

    Raises:
        ValueError / FileNotFoundError: naming `option`, the file and, for a malformed file, the line and the fault.
    """
    path = Path(name).expanduser()
    flag = f"{option} {name}"
    if path.is_file():
        if path.suffix.lower() not in DATA_FILE_BUILDERS:
            raise ValueError(
                f"`{flag}`: unsupported file type {path.suffix!r}. Use one of {sorted(DATA_FILE_BUILDERS)}, a folder "
                "written by `save_to_disk`, or a hub dataset id."
            )
        if path.stat().st_size == 0:  # `datasets` fails on it with a bare StopIteration
            raise ValueError(
                f"`{flag}` is an empty file: TI-DPO needs at least one preference pair (`prompt`, `chosen`, `rejected`)."
            )
        check_data_file(path, flag)
    elif path.is_dir():
        if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            for data_file in sorted(path.rglob("*")):
                if data_file.is_file():
                    check_data_file(data_file, flag)
    elif looks_like_path(name):
        raise FileNotFoundError(
            f"`{flag}`: no such file or folder. Pass a JSON/JSONL/parquet/CSV file, a folder written by `save_to_disk`, "
            "or a hub dataset id."
        )


def load_preference_dataset(
    name: str,
    config: str | None = None,
    train_split: str = "train",
    streaming: bool = False,
    option: str = "--dataset_name",
) -> "DatasetDict | IterableDatasetDict":
    """
    Load `--dataset_name`: a hub id, or a local file / folder, after `check_local_data`.

    A JSON, JSONL, parquet or CSV file becomes the `train_split` split; a folder written by `save_to_disk` is loaded
    with `load_from_disk` (a single `Dataset` becomes `train_split`); any other folder goes to `load_dataset`, which
    reads split names from its file names (`train.jsonl`, `test.jsonl`, ...).

    Args:
        option (`str`): the flag named in error messages (`--dataset` for `trl-tidpo explain`).

    Returns:
        `DatasetDict` (`IterableDatasetDict` when `streaming`).
    """
    check_local_data(name, option)
    from datasets import Dataset, DatasetDict, IterableDatasetDict, load_dataset, load_from_disk
    from datasets.exceptions import DatasetGenerationError

    path = Path(name).expanduser()
    if path.is_file():
        builder = DATA_FILE_BUILDERS[path.suffix.lower()]
        try:
            return load_dataset(builder, data_files={train_split: str(path)}, streaming=streaming)
        except (DatasetGenerationError, ValueError) as error:  # what the checks miss (e.g. a damaged parquet file)
            reason = one_line(error.__cause__ or error)
            raise ValueError(f"`{option} {name}`: `datasets` could not read {path}: {reason}") from error
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        dataset = load_from_disk(str(path))
        if isinstance(dataset, Dataset):
            dataset = DatasetDict({train_split: dataset})
        if streaming:
            dataset = IterableDatasetDict({split: ds.to_iterable_dataset() for split, ds in dataset.items()})
        return dataset
    return load_dataset(str(path) if path.is_dir() else name, name=config, streaming=streaming)
