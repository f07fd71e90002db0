"""
A new user's first mistakes, each answered by one line on stderr and exit code 2 before any model loads: a malformed
JSON, JSON Lines or CSV file (for `train` and for `explain --dataset`), a value that is not among a flag's choices, a
config value out of range. And `trl-tidpo train --help` opens with TI-DPO's own options.
"""

import inspect
import json
import os
import subprocess
import sys

import pytest
from datasets import load_dataset

from trl_tidpo.tools import explain_dataset, train_script
from trl_tidpo.tools.cli import main
from trl_tidpo.tools.data_files import check_data_file
from trl_tidpo.trainer.tidpo_config import TIDPOConfig


ROW = {"prompt": "hi", "chosen": " yes", "rejected": " no"}
LINE = json.dumps(ROW)

# name -> (file name, content, what the one line must say besides the file name)
MALFORMED = {
    "json-trailing-comma": (
        "pairs.json", f"[\n  {LINE},\n  {LINE},\n]\n", ["is not valid JSON: line 3, column 56", "a trailing comma before ']'"]
    ),
    "json-unclosed": ("pairs.json", f"[\n  {LINE},\n  {LINE}\n", ["is not valid JSON: line 4", "Expecting ',' delimiter"]),
    "jsonl-bad-line": (
        "pairs.jsonl", f"{LINE}\n{LINE}\n{LINE[:-1]},}}\n", ["line 3 is not valid JSON", "a trailing comma before '}'"]
    ),
    "jsonl-unquoted-key": ("pairs.jsonl", f'{LINE}\n{{prompt: "hi"}}\n', ["line 2 is not valid JSON", "property name"]),
    "jsonl-line-not-an-object": ("pairs.jsonl", f'{LINE}\n["hi", " yes", " no"]\n', ["line 2 is a JSON list, not an object"]),
    "csv-long-row": ("pairs.csv", "prompt,chosen,rejected\nhi,yes,no\nhi,yes, no,extra\n", ["line 3 has 4 field(s), the header has 3"]),
    "csv-short-row": ("pairs.csv", "prompt,chosen,rejected\nhi,yes,no\n\nhi,yes\n", ["line 4 has 2 field(s), the header has 3"]),
    "json-empty-list": ("pairs.json", "[]\n", ["holds no rows"]),
    "jsonl-blank-lines-only": ("pairs.jsonl", "\n\n", ["holds no rows"]),
    "csv-header-only": ("pairs.csv", "prompt,chosen,rejected\n", ["holds no rows"]),
    "csv-unclosed-quote": ("pairs.csv", 'prompt,chosen,rejected\nhi,yes,no\n"hi,yes,no\n', ["is not valid CSV from line 3"]),
}  # fmt: skip


def _write(tmp_path, case: str) -> str:
    name, content, _ = MALFORMED[case]
    path = tmp_path / name
    path.write_text(content)
    return str(path)


def _one_line(capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("trl-tidpo") and "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a model (or, for `explain`, a tokenizer) fails the test: the errors must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(train_script, "TIDPOTrainer", refuse)
    monkeypatch.setattr(train_script, "load_quantized_model", refuse)
    monkeypatch.setattr(explain_dataset, "load_model", refuse)
    monkeypatch.setattr(explain_dataset, "load_tokenizer", refuse)
    monkeypatch.delenv("TRL_TIDPO_DEBUG", raising=False)


def _train(model_dir, data, tmp_path, *extra: str) -> int:
    return main(["train", "--model_name_or_path", model_dir, "--dataset_name", str(data), "--output_dir",
                 str(tmp_path / "out"), "--use_cpu", "--report_to", "none", "--max_steps", "1", *extra])  # fmt: skip


# ------------------------------------------------------------------------------------------------ malformed files


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_file_for_train(tmp_path, model_dir, capsys, no_model_loads, case):
    path = _write(tmp_path, case)
    assert _train(model_dir, path, tmp_path) == 2
    _one_line(capsys, "trl-tidpo train: error: ", f"`--dataset_name {path}`: {path}", *MALFORMED[case][2])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_file_for_explain(tmp_path, model_dir, capsys, no_model_loads, case):
    path = _write(tmp_path, case)
    assert main(["explain", "--model", model_dir, "--dataset", path]) == 2
    _one_line(capsys, "trl-tidpo explain: error: ", f"`--dataset {path}`: {path}", *MALFORMED[case][2])


def test_malformed_file_in_a_data_folder(tmp_path, model_dir, capsys, no_model_loads):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(f"{LINE}\n")
    (tmp_path / "data" / "test.jsonl").write_text(f"{LINE}\n{LINE},\n")
    assert _train(model_dir, tmp_path / "data", tmp_path) == 2
    _one_line(capsys, f"{tmp_path / 'data' / 'test.jsonl'} line 2 is not valid JSON")


def test_malformed_file_fails_before_a_launcher_starts(tmp_path, model_dir, capsys, no_model_loads, monkeypatch):
    monkeypatch.setattr(train_script, "launch", lambda *args: pytest.fail("launched with a malformed file"))
    path = _write(tmp_path, "jsonl-bad-line")
    assert _train(model_dir, path, tmp_path, "--accelerate_config", "single_gpu") == 2
    _one_line(capsys, f"{path} line 3 is not valid JSON")


def test_a_file_datasets_cannot_read_is_named(tmp_path):
    """What the checks do not parse (a damaged parquet file) still names the file, in one line."""
    path = tmp_path / "pairs.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=f"`--dataset_name {path}`: `datasets` could not read {path}: ") as error:
        train_script.load_preference_dataset(str(path))
    assert "\n" not in str(error.value)


def test_explain_reads_a_malformed_file_without_torch_or_trl(tmp_path):
    """`explain --dataset` only reads the file before it fails: no trainer, TRL, transformers or torch."""
    path = _write(tmp_path, "json-trailing-comma")
    code = (
        "import sys\nfrom trl_tidpo.tools.cli import main\n"
        f"code = main(['explain', '--model', 'no-model-needed', '--dataset', {path!r}])\n"
        "print(code, sorted(m for m in ('torch', 'trl', 'transformers') if m in sys.modules))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.strip() == "2 []", result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "line 3, column 56" in result.stderr


def test_train_in_its_own_process_prints_one_line(tmp_path, model_dir):
    """As a user runs it: `trl-tidpo train` with a malformed file prints exactly one line on stderr (no notice from
    the imports of peft / bitsandbytes / kernels, no FutureWarning from TRL's checkpointing default) and exits 2."""
    path = _write(tmp_path, "json-trailing-comma")
    argv = ["train", "--model_name_or_path", model_dir, "--dataset_name", path, "--output_dir", str(tmp_path / "out"),
            "--use_cpu", "--report_to", "none"]  # fmt: skip
    # Python's own warning filters, as a user has them, and no `--debug` left in the environment by another test
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TRL_TIDPO_DEBUG")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "trl_tidpo.tools.cli", *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 3, column 56" in lines[0], result.stderr


@pytest.mark.parametrize(
    "name, content",
    [
        ("pretty.json", json.dumps([ROW, ROW], indent=2)),
        ("one-line-list.json", json.dumps([ROW, ROW])),
        ("lines-in.json", f"{LINE}\n{LINE}\n"),
        ("blank-lines.jsonl", f"{LINE}\n\n{LINE}\n"),
        ("conversational.jsonl", "".join(json.dumps({k: [{"role": "user", "content": v}] for k, v in ROW.items()})
                                         + "\n" for _ in range(2))),
        ("bom.jsonl", f"\ufeff{LINE}\n{LINE}\n"),
        ("quoted.csv", 'prompt,chosen,rejected\n"hi, there","yes ""sure""","no\nnever"\nhi,yes,no\n'),
        ("crlf.csv", "prompt,chosen,rejected\r\nhi,yes,no\r\nhi,yes,no\r\n"),
    ],
)
def test_valid_files_pass_the_checks_and_load(tmp_path, name, content):
    """No false refusal: each file `datasets` reads as two rows passes the checks."""
    path = tmp_path / name
    path.write_text(content, encoding="utf-8", newline="")
    check_data_file(path, f"--dataset_name {path}")
    builder = "csv" if name.endswith(".csv") else "json"
    assert load_dataset(builder, data_files=str(path), split="train").num_rows == 2


# ------------------------------------------------------------------------------------------------ flags and config


def test_invalid_choice_is_one_line_naming_the_flag_and_its_choices(tmp_path, model_dir, capsys, no_model_loads):
    pairs = _write_pairs(tmp_path)
    assert _train(model_dir, pairs, tmp_path, "--token_weighting", "tidpo") == 2
    line = _one_line(capsys, "trl-tidpo train: error: argument --token_weighting", "invalid choice: 'tidpo'")
    for choice in TIDPOConfig.__dataclass_fields__["token_weighting"].metadata["choices"]:
        assert choice in line


def test_value_of_the_wrong_type_is_one_line(tmp_path, model_dir, capsys, no_model_loads):
    assert _train(model_dir, _write_pairs(tmp_path), tmp_path, "--learning_rate", "fast") == 2
    _one_line(capsys, "argument --learning_rate", "invalid float value: 'fast'")


def test_config_value_out_of_range_is_one_line(tmp_path, model_dir, capsys, no_model_loads):
    """A `TIDPOConfig.__post_init__` refusal (here `beta`) comes out as one line."""
    assert _train(model_dir, _write_pairs(tmp_path), tmp_path, "--beta", "-1") == 2
    _one_line(capsys, "trl-tidpo train: error: `beta` must be a finite number > 0", "got -1.0")


@pytest.mark.parametrize("steps", ["-5", "0"])
def test_bad_max_steps_is_one_line(tmp_path, model_dir, capsys, no_model_loads, steps):
    """`--max_steps` other than -1 or >= 1 is refused before any model loads (it used to train three epochs)."""
    assert _train(model_dir, _write_pairs(tmp_path), tmp_path, "--max_steps", steps) == 2
    _one_line(capsys, "trl-tidpo train: error:", "`max_steps`")


def test_explain_invalid_choice_is_one_line(model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--model", model_dir, "--prompt", "a", "--completion", "b", "--weight-span", "all"])
    assert exit_info.value.code == 2
    _one_line(capsys, "--weight-span", "invalid choice: 'all'", "completion", "sequence")


def _write_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{LINE}\n")
    return path


# ------------------------------------------------------------------------------------------------ train --help


def test_train_help_opens_with_tidpo_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage: trl-tidpo train [--config RECIPE.yaml] --model_name_or_path")
    heading = next(i for i, line in enumerate(lines) if line.startswith("TI-DPO options"))
    assert heading < 10 and lines[heading + 1].startswith("  --token_weighting")  # in TIDPOConfig's order
    # The section runs until the next heading (a line that does not start with a space)
    end = next(i for i in range(heading + 1, len(lines)) if lines[i] and not lines[i].startswith(" "))
    section = "\n".join(lines[heading:end])
    own = inspect.get_annotations(TIDPOConfig)
    assert "token_weighting" in own and "max_steps" not in own
    for name in own:
        assert f"  --{name}" in section, name
    rest = "\n".join(lines[end:])
    assert "--learning_rate" in rest and "--token_weighting" not in rest
