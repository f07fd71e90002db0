"""The README stays short and leads to the docs pages; every relative link of the README and docs/ resolves."""

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)  # no "#" comments of code
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def test_slug_matches_github():
    heading = "Token weights: uniform, TI-DPO, TIS-DPO, or your own"
    assert slug(heading) == "token-weights-uniform-ti-dpo-tis-dpo-or-your-own"
    assert slug("What each option costs") == "what-each-option-costs"


def test_readme_is_at_most_250_lines_and_links_every_docs_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for page in ("usage", "configuration", "distributed", "metrics_and_extension", "benchmarks"):
        assert f"](docs/{page}.md" in text, f"the README does not link docs/{page}.md"
    assert "## Quickstart on a CPU" in text


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name} links {target}: no such heading"


def test_the_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    command = ci[ci.index("# The README's test command:") + 1]
    assert command == "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q"
    assert f"```bash\n{command}\n```" in readme and readme.count(f"&& {command}") == 1
