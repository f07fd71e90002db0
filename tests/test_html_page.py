"""
The demo's HTML page in a real headless browser (Chromium), at 1,000 and 1,600 px: a screenshot of each, and no element
outside its card. Skipped only when no Chromium is installed (CI installs Debian's `chromium` in `.ci/run`).
Set `TRL_TIDPO_SCREENSHOT_DIR` to keep the screenshots.
"""

import html
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from trl_tidpo.tools.demo.data import load_pairs
from trl_tidpo.tools.demo.report import write_html


CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
WIDTHS = (1000, 1600)  # the screenshots; the overflow check also runs at 1,400 px (where rows overflowed before)
CARDS = ".pair, .verdict, .table-card, .legend, .note"

# Written into a copy of the page (the page itself has no script): every visible element that reaches outside the
# card it sits in, a table that has to scroll, and the page's own horizontal overflow, as JSON on <body>
PROBE = """<script>
const root = document.documentElement;
const out = {width: window.innerWidth, page: root.scrollWidth - root.clientWidth, items: []};
for (const el of document.body.querySelectorAll('*')) {
  if (el.tagName === 'SCRIPT' || el.tagName === 'STYLE') continue;
  const card = el.parentElement.closest('%s') || document.body;
  const r = el.getBoundingClientRect(), c = card.getBoundingClientRect();
  if (r.width > 0 && (r.right > c.right + 0.5 || r.left < c.left - 0.5))
    out.items.push(el.tagName + '.' + el.className + ': ' + el.textContent.slice(0, 40));
}
for (const el of document.querySelectorAll('.table-card'))
  if (el.scrollWidth > el.clientWidth) out.items.push('the summary table scrolls');
document.body.setAttribute('data-overflow', JSON.stringify(out));
</script>""" % CARDS


def _chromium(tmp_path: Path, width: int, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / f'profile-{width}'}", f"--window-size={width},1400", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def _demo_summary(test_rows: list[dict]) -> dict:
    """
    A `run_comparison` summary of the bundled held-out pairs with made-up weights (mean 1 per response, EOS heavy), and
    two pairs built to overflow a careless layout: a 120-token response and one 300-character token.
    """
    weight_rows = []
    for index, row in enumerate(test_rows[:6]):
        for side in ("chosen", "rejected"):
            words = row[side].split()
            if index == 4 and side == "chosen":
                words = (words * 12)[:120]
            if index == 5 and side == "rejected":
                words = ["x" * 300, *words]
            tokens = [*words, "<eos>"]
            raw = [0.4 + 0.3 * (i % 5) for i in range(len(words))] + [4.0]
            weights = [w * len(raw) / sum(raw) for w in raw]
            critical = [word in row[f"{side}_phrase"].split() for word in words] + [False]
            special = [False] * len(words) + [True]
            weight_rows.append({"pair": index, "side": side, "tokens": tokens, "weights": weights,
                                "critical": critical, "importance": weights, "prior": weights, "special": special})
    metrics = {"roc_auc": 0.48, "top_k_share": 0.2, "roc_auc_content": 0.53, "top_k_share_content": 0.31}
    result = {"accuracy": 1.0, "margin": 3.5, "seconds_per_step": 0.1, **metrics}
    return {
        "config": {"steps": 150, "model": "tiny"},
        "results": {"DPO": {**result, "weight_rows": []}, "TI-DPO": {**result, "weight_rows": weight_rows}},
        "start": metrics, "prior_only": metrics, "uniform": metrics, "base_rate": 0.25, "base_rate_content": 0.27,
    }  # fmt: skip


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory) -> Path:
    test_rows = [row for row in load_pairs() if row["split"] == "test"]
    path = tmp_path_factory.mktemp("page") / "token_importance.html"
    write_html(_demo_summary(test_rows), test_rows, path, num_pairs=6)
    return path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("width", WIDTHS)
def test_screenshot_at_width(demo_page, tmp_path, width):
    folder = Path(os.environ.get("TRL_TIDPO_SCREENSHOT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / f"token_importance_{width}px.png"
    _chromium(tmp_path, width, f"--screenshot={shot}", demo_page.as_uri())
    assert _png_size(shot) == (width, 1400)


@pytest.mark.parametrize("width", (1000, 1400, 1600))
def test_no_element_overflows_its_card(demo_page, tmp_path, width):
    probe = tmp_path / "probe.html"
    probe.write_text(demo_page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, width, "--virtual-time-budget=3000", "--dump-dom", probe.as_uri()).stdout
    found = re.search(r'data-overflow="([^"]*)"', dom)
    assert found, "the probe did not run"
    report = json.loads(html.unescape(found.group(1)))
    assert report["width"] == width  # the layout was made at the width asked for
    assert report["page"] == 0, f"the page scrolls sideways by {report['page']} px"
    assert report["items"] == []


def test_the_probe_finds_an_overflow(tmp_path):
    """The check can fail: a card with a fixed-width child wider than itself."""
    page = tmp_path / "wide.html"
    page.write_text('<html><body><div class="pair" style="width:300px"><div style="width:900px">x</div></div>'
                    f"{PROBE}</body></html>")  # fmt: skip
    dom = _chromium(tmp_path, 1000, "--virtual-time-budget=3000", "--dump-dom", page.as_uri()).stdout
    report = json.loads(html.unescape(re.search(r'data-overflow="([^"]*)"', dom).group(1)))
    assert report["items"] == ["DIV.: x"]
