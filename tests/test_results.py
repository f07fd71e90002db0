"""The verdict and the results table come from the benchmark summary JSON; the pages that show them are up to date."""

import json
from pathlib import Path

import pytest

from trl_tidpo.tools import results
from trl_tidpo.tools.results import END_MARKER, START_MARKER, load_summary, outcome, render, results_table, verdict


ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/benchmarks.md")


def _summary(rows, benchmarks=("tiny", "smol", "text")):
    specs = {
        name: {"title": f"{name} bench", "doc": f"docs/{name}.md", "metric": "accuracy", "seeds": 5, "start": 0.25,
               "dpo": 0.5, "ci_kind": "t over seed means"}
        for name in benchmarks
    }  # fmt: skip
    out = []
    for variant, benchmark, delta, low, high in rows:
        out.append({"variant": variant, "benchmark": benchmark, "delta": delta, "ci": [low, high], "prompt_ci": None,
                    "seeds": 5, "cpu_s_per_step": 1.0, "cpu_ratio_vs_dpo": 1.5})  # fmt: skip
    return {"command": "python benchmarks/summarize.py", "date": "2026-12-07", "benchmarks": specs, "rows": out}


def _all(variant, delta, low, high, benchmarks=("tiny", "smol", "text")):
    return [(variant, name, delta, low, high) for name in benchmarks]


def test_outcome_reads_the_interval_not_the_point():
    assert outcome([0.001, 0.2]) == "wins"
    assert outcome([-0.2, -0.001]) == "loses"
    assert outcome([-0.01, 0.3]) == outcome([0.0, 0.3]) == outcome([-0.3, 0.0]) == "ties"  # 0 inside, or on an end


def test_verdict_when_a_ci_excludes_zero_upward():
    summary = _summary(
        [("prior", "tiny", 0.05, 0.01, 0.09), ("prior", "smol", 0.02, 0.004, 0.03), ("prior", "text", 0, -0.01, 0.01)]
    )
    sentence = verdict(summary)
    assert sentence == (
        "Against DPO on 3 benchmarks (tiny bench, smol bench and text bench), by seed-level 95% confidence intervals "
        "of the difference: prior beats DPO on two."
    )


def test_verdict_when_every_interval_holds_zero():
    summary = _summary(_all("difference", 0.002, -0.005, 0.01) + _all("prior", -0.01, -0.02, 0.001))
    sentence = verdict(summary)
    assert "no variant beats DPO on any" in sentence
    assert "difference and prior cannot be told apart from it on any (every interval holds 0)" in sentence
    assert "loses" not in sentence


def test_verdict_when_variants_lose():
    rows = _all("TI-DPO", -0.3, -0.35, -0.25) + [("no triplet", "tiny", -0.02, -0.03, -0.003)]
    rows += [("no triplet", "smol", 0.0, -0.01, 0.01), ("no triplet", "text", 0.0, -0.01, 0.01)]
    sentence = verdict(_summary(rows))
    # Most losses first; a variant that loses somewhere is not among those that cannot be told apart
    assert sentence.endswith(": no variant beats DPO on any; TI-DPO loses to it on three, no triplet on one.")


def test_verdict_groups_variants_by_count_and_names_those_run_on_some_benchmarks_only():
    rows = _all("TI-DPO", -0.3, -0.35, -0.25) + [("cDPO", "tiny", 0.1, 0.05, 0.15), ("TIS", "tiny", 0.1, 0.05, 0.15)]
    rows += [("TIS", "smol", 0.1, 0.05, 0.15), ("tied", "tiny", 0.1, 0.05, 0.15), ("tied", "text", 0.0, -0.1, 0.1)]
    sentence = verdict(_summary(rows))
    assert sentence.endswith(
        ": TIS beats DPO on two, cDPO and tied on one; TI-DPO loses to it on three; cDPO ran on tiny bench only; "
        "TIS ran on tiny bench and smol bench only; tied ran on tiny bench and text bench only."
    )


def test_verdict_leaves_out_rows_of_dpo_itself():
    summary = _summary(_all("DPO", 0.0, 0.0, 0.0) + _all("difference", 0.0, -0.01, 0.01))
    assert "DPO cannot" not in verdict(summary) and "difference cannot be told apart" in verdict(summary)


def test_results_table_cells():
    rows = [("TI-DPO", "tiny", -0.357, -0.393, -0.321), ("TI-DPO", "smol", 0.0004, -0.0101, 0.0126)]
    table = results_table(_summary(rows, benchmarks=("tiny", "smol"))).splitlines()
    assert table[0] == (
        "| variant | tiny bench: Δ accuracy vs DPO [95% CI] | CPU/step vs DPO "
        "| smol bench: Δ accuracy vs DPO [95% CI] | CPU/step vs DPO |"
    )
    assert table[2] == "| DPO (its own score: start → trained) | 0.250 → 0.500 | 1.00× | 0.250 → 0.500 | 1.00× |"
    # Bold where the interval excludes 0; a true minus sign; rounding to 3 decimals
    assert table[3] == "| TI-DPO | **−0.357 [−0.393, −0.321]** | 1.50× | +0.000 [−0.010, +0.013] | 1.50× |"


def test_results_table_marks_a_benchmark_a_variant_did_not_run():
    table = results_table(_summary([("cDPO", "tiny", 0.1, 0.05, 0.15)], benchmarks=("tiny", "smol")))
    assert table.splitlines()[-1] == "| cDPO | **+0.100 [+0.050, +0.150]** | 1.50× | not run | – |"


def test_render_replaces_only_the_marked_section_and_links_from_the_page():
    summary = _summary(_all("difference", 0.0, -0.01, 0.01, benchmarks=("tiny",)), benchmarks=("tiny",))
    text = f"# Title\n\nbefore\n{START_MARKER}\nold text\n{END_MARKER}\nafter\n"
    out = render(text, summary, "docs/benchmarks.md")
    assert out.startswith(f"# Title\n\nbefore\n{START_MARKER}\n**Against DPO")
    assert out.endswith(f"\n{END_MARKER}\nafter\n")
    assert "old text" not in out and "[tiny bench](tiny.md): accuracy, 5 seeds." in out
    assert "Intervals: t over seed means." in out and "(benchmarks_summary.json)" in out
    assert "[tiny bench](docs/tiny.md)" in render(text, summary, "README.md")
    assert render(out, summary, "docs/benchmarks.md") == out  # rendering twice changes nothing
    with pytest.raises(ValueError, match="page.md needs exactly one"):
        render("no markers", summary, "page.md")


def test_load_summary_names_the_file_and_what_is_missing(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"command": "c", "date": "d", "benchmarks": {}}))
    with pytest.raises(ValueError, match=r"s.json is not a benchmark summary: it has no 'rows' key"):
        load_summary(path)
    row = {"variant": "x", "benchmark": "nope", "delta": 0, "ci": [0, 0]}
    path.write_text(json.dumps({**_summary([]), "rows": [row]}))
    with pytest.raises(ValueError, match=r"row 0 names benchmark 'nope'"):
        load_summary(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_summary(tmp_path / "missing.json")


def test_check_and_write_commands(tmp_path, monkeypatch, capsys):
    summary_path = tmp_path / "summary.json"
    summary_path.write_text(json.dumps(_summary(_all("difference", 0.0, -0.01, 0.01))))
    page = tmp_path / "page.md"
    page.write_text(f"x\n{START_MARKER}\n{END_MARKER}\n")
    monkeypatch.setattr(results, "PACKAGED_SUMMARY", tmp_path / "packaged.json")
    assert results.main(["--check", str(page), "--summary", str(summary_path)]) == 1
    assert results.main(["--write", str(page), "--summary", str(summary_path)]) == 0
    assert (tmp_path / "packaged.json").read_bytes() == summary_path.read_bytes()
    assert results.main(["--check", str(page), "--summary", str(summary_path)]) == 0
    assert "difference cannot be told apart" in page.read_text()
    assert results.main(["--check", str(page), "--summary", str(tmp_path / "none.json")]) == 2
    assert "No benchmark summary at" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- this repository


def test_the_packaged_summary_is_the_docs_summary():
    assert results.PACKAGED_SUMMARY.read_bytes() == (ROOT / "docs" / results.SUMMARY_NAME).read_bytes()


@pytest.mark.parametrize("page", PAGES)
def test_results_sections_are_rendered_from_the_summary(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    summary = load_summary(ROOT / "docs" / results.SUMMARY_NAME)
    assert render(text, summary, page) == text, f"run: python -m trl_tidpo.tools.results --write {' '.join(PAGES)}"


def test_a_benchmark_that_failed_its_gate_ranks_nothing():
    summary = _summary(_all("TI-DPO", -0.3, -0.35, -0.25) + [("prior", "tiny", 0.05, 0.01, 0.09)])
    summary["benchmarks"]["smol"]["gate_passed"] = False
    sentence = verdict(summary)
    assert sentence.startswith("Against DPO on 2 benchmarks (tiny bench and text bench)")
    assert "TI-DPO loses to it on two" in sentence  # not three: smol's interval does not count
    assert "(smol bench failed its sanity gate: DPO did not beat the start by 2 standard errors there" in sentence
    table = results_table(summary)
    assert "smol bench (gate failed: ranks nothing): Δ accuracy vs DPO" in table
    ti_dpo = next(line for line in table.splitlines() if line.startswith("| TI-DPO |")).split(" | ")
    assert ti_dpo[1].startswith("**") and not ti_dpo[3].startswith("**")  # tiny bold, smol not
