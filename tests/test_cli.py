import json
import os
import subprocess
import sys
import types

import pytest
import torch
from transformers import ViTConfig

from trl_tidpo import token_weights
from trl_tidpo.tools.cli import main


def _explain(*args):
    return main(["explain", *args])


def _one_line_error(capsys, *fragments):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("trl-tidpo")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_missing_model_path(tmp_path, capsys):
    assert _explain("--model", str(tmp_path / "nope"), "--prompt", "hi", "--completion", "yes") == 2
    _one_line_error(capsys, "--model", "does not exist")


def test_folder_without_a_model(tmp_path, capsys):
    assert _explain("--model", str(tmp_path), "--prompt", "hi", "--completion", "yes") == 2
    _one_line_error(capsys, "--model", "is not a causal LM")


def test_model_that_is_not_a_causal_lm(tmp_path, capsys):
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    assert _explain("--model", str(tmp_path), "--prompt", "hi", "--completion", "yes") == 2
    _one_line_error(capsys, "--model", "is not a causal LM")


def test_empty_completion(model_dir, capsys):
    assert _explain("--model", model_dir, "--prompt", "hi", "--completion", "  ") == 2
    _one_line_error(capsys, "--completion is empty")


def test_completion_longer_than_the_context(model_dir, capsys):
    # The tiny Llama has 512 positions
    assert _explain("--model", model_dir, "--prompt", "hello", "--completion", "good " * 600) == 2
    _one_line_error(capsys, "--completion is too long", "the model's context is 512")


def test_missing_required_argument_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--prompt", "hi", "--completion", "yes"])
    assert exit_info.value.code == 2
    _one_line_error(capsys, "--model")


def test_demo_argument_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--steps", "0"])
    assert exit_info.value.code == 2
    _one_line_error(capsys, "--steps", "positive integer")
    assert main(["demo", "--model", "gpt-9"]) == 2
    _one_line_error(capsys, "--model must be 'tiny' or 'smollm2-135m-instruct'")


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "demo" in out and "explain" in out and "train" in out


def test_explain_prints_the_same_weights_as_token_weights(model_dir, tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    assert _explain("--model", model_dir, "--prompt", "the sky is", "--completion", "blue .", "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    # The CLI wraps chat models in their template (this tokenizer has one)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    expected = token_weights(
        model, tokenizer, [{"role": "user", "content": "the sky is"}], [{"role": "assistant", "content": "blue ."}]
    )
    assert printed["token_ids"] == expected.token_ids
    assert printed["weights"] == pytest.approx(expected.weights, abs=1e-5)


def test_explain_plain_output_and_html(model_dir, tmp_path, capsys):
    html_path = tmp_path / "w.html"
    args = ["--model", model_dir, "--prompt", "<script>", "--completion", "blue .", "--chat-template", "off"]
    assert _explain(*args, "--html", str(html_path)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out  # captured output is not a terminal: plain numbers
    rows = [r for r in (line.split() for line in out.splitlines()) if len(r) == 5 and r[0].isdigit()]
    assert [row[1] for row in rows] == ["blue", ".", "<eos>"]
    assert sum(float(row[2]) for row in rows) == pytest.approx(3.0, abs=1e-3)  # "mean" scaling: weights average 1
    page = html_path.read_text()
    assert "&lt;script&gt;" in page and "<script>" not in page


def test_train_forwards_its_arguments(monkeypatch):
    seen = {}
    fake = types.ModuleType("trl_tidpo.tools.train_script")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "trl_tidpo.tools.train_script", fake)
    assert main(["train", "--model_name_or_path", "x", "--help"]) == 0
    assert seen["argv"] == ["--model_name_or_path", "x", "--help"]


def test_console_entry_point_error_has_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "trl_tidpo.tools.cli", "explain", "--model", str(tmp_path / "missing"), "--prompt", "a",
         "--completion", "b"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("trl-tidpo")]
    assert len(errors) == 1 and "does not exist" in errors[0]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------- train


def _train_argv(model: str, data, output_dir, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", model, "--dataset_name", str(data), "--output_dir", str(output_dir),
            "--report_to", "none", "--max_steps", "1", *extra]  # fmt: skip


def _pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "chosen": " yes", "rejected": " no"}) + "\n")
    return path


def _latin1_jsonl(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "hi", "chosen": " yes", "rejected": " no"}\n{"prompt": "caf\xe9", "chosen": " a", '
                     b'"rejected": " b"}\n')  # fmt: skip
    return path


def _latin1_csv(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,chosen,rejected\nhi,yes,no\nhi,yes,no\nna\xefve,a,b\n")
    return path


TRAIN_USER_ERRORS = {
    "missing-local-model": (
        lambda tmp_path, model_dir: (str(tmp_path / "tiny-model"), _pairs(tmp_path), ["--use_cpu"]),
        "`--model_name_or_path {tmp}/tiny-model`: no such folder. Pass the folder of a saved model",
    ),
    "missing-relative-model": (
        lambda tmp_path, model_dir: ("./no-such-tiny-model", _pairs(tmp_path), ["--use_cpu"]),
        "`--model_name_or_path ./no-such-tiny-model`: no such folder.",
    ),
    "model-folder-without-config": (
        lambda tmp_path, model_dir: (str(tmp_path), _pairs(tmp_path), ["--use_cpu"]),
        "`--model_name_or_path {tmp}` has no config.json: not a folder written by `save_pretrained`.",
    ),
    "non-utf8-jsonl": (
        lambda tmp_path, model_dir: (model_dir, _latin1_jsonl(tmp_path), ["--use_cpu"]),
        "{tmp}/latin1.jsonl is not UTF-8 text: line 2 has the byte 0xe9 (file offset 69). Re-save the file as UTF-8",
    ),
    "non-utf8-csv": (
        lambda tmp_path, model_dir: (model_dir, _latin1_csv(tmp_path), ["--use_cpu"]),
        "{tmp}/latin1.csv is not UTF-8 text: line 4 has the byte 0xef",
    ),
    "non-utf8-file-in-a-folder": (
        lambda tmp_path, model_dir: (model_dir, _latin1_jsonl(tmp_path).parent, ["--use_cpu"]),
        "{tmp}/latin1.jsonl is not UTF-8 text: line 2 has the byte 0xe9",
    ),
    "resume-last-without-checkpoint": (
        lambda tmp_path, model_dir: (model_dir, _pairs(tmp_path), ["--use_cpu", "--resume_from_checkpoint", "last"]),
        "`--resume_from_checkpoint last`: `{tmp}/out` holds no complete checkpoint to resume from.",
    ),
}


@pytest.mark.parametrize("case", list(TRAIN_USER_ERRORS), ids=list(TRAIN_USER_ERRORS))
def test_train_user_errors_are_one_line_and_exit_2(tmp_path, model_dir, capsys, case, monkeypatch):
    monkeypatch.delenv("TRL_TIDPO_DEBUG", raising=False)
    make, message = TRAIN_USER_ERRORS[case]
    model, data, extra = make(tmp_path, model_dir)
    assert main(_train_argv(model, data, tmp_path / "out", *extra)) == 2
    hint = "(`--debug` shows the traceback)"
    _one_line_error(capsys, "trl-tidpo train: error: ", message.format(tmp=tmp_path), hint)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the hint is for machines without a GPU")
def test_train_without_gpu_and_without_use_cpu_says_to_pass_it(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.delenv("TRL_TIDPO_DEBUG", raising=False)
    assert main(_train_argv(model_dir, _pairs(tmp_path), tmp_path / "out")) == 2
    _one_line_error(capsys, "trl-tidpo train: error: No GPU found: pass `--use_cpu` to train on the CPU.")


def test_train_debug_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("TRL_TIDPO_DEBUG", raising=False)
    argv = _train_argv(str(tmp_path / "nope"), _pairs(tmp_path), tmp_path / "out", "--use_cpu")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        main([*argv, "--debug"])
    monkeypatch.setenv("TRL_TIDPO_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        main(argv)


def test_train_bugs_keep_their_traceback(tmp_path, model_dir, monkeypatch):
    from trl_tidpo.tools import train_script

    monkeypatch.delenv("TRL_TIDPO_DEBUG", raising=False)

    def broken(*args):
        raise RuntimeError("a bug deep inside a library")

    monkeypatch.setattr(train_script, "train", broken)
    with pytest.raises(RuntimeError, match="a bug deep inside"):
        main(_train_argv(model_dir, _pairs(tmp_path), tmp_path / "out", "--use_cpu"))
    monkeypatch.setattr(train_script, "train", lambda *args: {}["missing"])
    with pytest.raises(KeyError):
        main(_train_argv(model_dir, _pairs(tmp_path), tmp_path / "out", "--use_cpu"))


def test_one_line_joins_a_multiline_message():
    from trl_tidpo.tools.errors import one_line

    assert one_line(ValueError("first\n  second\n\nthird")) == "first second third"
    assert one_line(ValueError()) == "ValueError"


def test_explain_defaults_and_choices_are_tidpo_configs():
    """`explain`'s weight options offer `TIDPOConfig`'s defaults and choices (read without importing TRL)."""
    from trl_tidpo import TIDPOConfig
    from trl_tidpo.tools.cli import build_parser

    args = build_parser().parse_args(["explain", "--model", "m", "--dataset", "d.jsonl"])
    fields = TIDPOConfig.__dataclass_fields__
    names = ["importance_lambda", "prior_sigma_ratio", "weight_span", "weight_normalization", "span_default_weight",
             "difference_shared_weight", "difference_differing_weight"]  # fmt: skip
    assert {name: getattr(args, name) for name in names} == {name: fields[name].default for name in names}
    actions = {action.dest: action for action in build_parser()._subparsers._group_actions[0].choices["explain"]._actions}
    for name in ("weight_span", "weight_normalization"):
        assert list(actions[name].choices) == fields[name].metadata["choices"]
