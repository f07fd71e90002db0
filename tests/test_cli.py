import json
import os
import subprocess
import sys
import types

import pytest
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
