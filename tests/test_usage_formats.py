"""The "Dataset formats" lines of docs/usage.md are true: each, alone in a JSONL file, trains one step through the script."""

import json
import re
from pathlib import Path

import pytest
from test_train_script import cpu_argv

from trl_tidpo.tools.train_script import main


pytestmark = pytest.mark.usefixtures("one_thread")
USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def usage_format_lines() -> list[str]:
    """The JSON lines of the ```jsonl block that follows "## Dataset formats"."""
    text = USAGE.read_text(encoding="utf-8")
    section = text[text.index("## Dataset formats") :]
    block = re.search(r"```jsonl\n(.*?)```", section, re.DOTALL).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_usage_doc_shows_the_four_formats():
    rows = [json.loads(line) for line in usage_format_lines()]
    assert len(rows) == 4
    plain, conversational, implicit, weighted = rows
    assert isinstance(plain["prompt"], str) and isinstance(conversational["prompt"], list)
    assert "prompt" not in implicit
    assert {"chosen_token_weights", "rejected_token_weights"} <= set(weighted)


@pytest.mark.parametrize("index", range(4), ids=["plain", "conversational", "implicit-prompt", "weight-columns"])
def test_each_usage_doc_format_line_trains(model_dir, tmp_path, index):
    line = usage_format_lines()[index]
    data = tmp_path / "pairs.jsonl"
    data.write_text((line + "\n") * 2)  # two rows: one batch of the script's batch size 2
    extra = ["--max_steps", "1"]
    if "chosen_token_weights" in line:
        extra += ["--token_weighting", "dataset"]
    assert main(cpu_argv(model_dir, data, tmp_path / "out", *extra)) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
