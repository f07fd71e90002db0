"""
The measured verdict, read from the benchmark summary JSON and never typed by hand.

`docs/benchmarks_summary.json` (written by `benchmarks/summarize.py`; a copy ships with the package, beside the demo's
data) holds, per benchmark, DPO's score and each variant's difference from DPO with its seed-level 95% CI. From it
this module writes:

- `verdict`: one sentence in plain words (which variants' intervals exclude 0, in which direction, on how many
  benchmarks), the closing line of `trl-tidpo demo`;
- `results_table`: the variant × benchmark table (Δ vs DPO [CI], CPU per step relative to DPO);
- the sections of `README.md` and `docs/benchmarks.md` between `<!-- results:start -->` and `<!-- results:end -->`:

    python -m trl_tidpo.tools.results --write README.md docs/benchmarks.md   # after a new summary
    python -m trl_tidpo.tools.results --check README.md docs/benchmarks.md   # exit 1 if a section is stale

Standard library only: the demo prints the verdict without importing anything more.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


SUMMARY_NAME = "benchmarks_summary.json"
PACKAGED_SUMMARY = Path(__file__).resolve().parent / "demo" / "data" / SUMMARY_NAME
DOCS_SUMMARY = Path("docs") / SUMMARY_NAME
START_MARKER = "<!-- results:start -->"
END_MARKER = "<!-- results:end -->"
# Rows of the summary that are DPO itself (its difference from itself is 0 by definition), if the script writes them
DPO_NAMES = ("DPO", "dpo")


def load_summary(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """
    The benchmark summary at `path` (default: the copy shipped with the package), checked for the keys this module
    reads.

    Raises:
        FileNotFoundError: naming the file, if it does not exist.
        ValueError: naming the file and the missing key or the row, if the JSON is not a summary.
    """
    path = Path(PACKAGED_SUMMARY if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"No benchmark summary at {path}: `python benchmarks/summarize.py` writes it.")
    summary = json.loads(path.read_text(encoding="utf-8"))
    for key in ("command", "date", "benchmarks", "rows"):
        if key not in summary:
            raise ValueError(f"{path} is not a benchmark summary: it has no {key!r} key.")
    for index, row in enumerate(summary["rows"]):
        missing = [key for key in ("variant", "benchmark", "delta", "ci") if key not in row]
        if missing:
            raise ValueError(f"{path}: row {index} has no {missing} key(s).")
        if row["benchmark"] not in summary["benchmarks"]:
            raise ValueError(f"{path}: row {index} names benchmark {row['benchmark']!r}, which `benchmarks` lacks.")
    return summary


def _variant_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in summary["rows"] if row["variant"] not in DPO_NAMES]


def gate_failed(spec: dict[str, Any]) -> bool:
    """Whether a benchmark failed its sanity gate (DPO did not beat its start by 2 SE): it then ranks nothing.
    Summaries written before the gate was recorded count as passed."""
    return spec.get("gate_passed") is False


def _variants(summary: dict[str, Any]) -> list[str]:
    """Variant names in the order of their first row."""
    return list(dict.fromkeys(row["variant"] for row in _variant_rows(summary)))


def outcome(ci: list[float]) -> str:
    """`"wins"` if the 95% CI of Δ vs DPO lies above 0, `"loses"` if below, `"ties"` if it holds 0."""
    low, high = ci
    if low > 0:
        return "wins"
    if high < 0:
        return "loses"
    return "ties"


def outcomes(summary: dict[str, Any]) -> dict[str, dict[str, str]]:
    """`{variant: {benchmark: "wins" | "loses" | "ties"}}` over the benchmarks each variant was measured on whose
    sanity gate passed (a benchmark that failed it ranks nothing)."""
    out: dict[str, dict[str, str]] = {variant: {} for variant in _variants(summary)}
    for row in _variant_rows(summary):
        if not gate_failed(summary["benchmarks"][row["benchmark"]]):
            out[row["variant"]][row["benchmark"]] = outcome(row["ci"])
    return {variant: by_bench for variant, by_bench in out.items() if by_bench}


def _names(items: list[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def short_title(title: str) -> str:
    """A benchmark's title without its parenthesis: "Tiny arithmetic (tiny Llama from scratch)" → "Tiny arithmetic"."""
    return title.split(" (")[0]


_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _number(count: int) -> str:
    return _NUMBERS[count] if count < len(_NUMBERS) else str(count)


def _counted(variants: dict[str, dict[str, str]], kind: str, verb: tuple[str, str]) -> str:
    """
    "A beats DPO on two, B and C on one": the variants with at least one benchmark of `kind`, grouped by how many,
    most first, in the summary's order within a group; `verb` is (singular, plural).
    """
    groups: dict[int, list[str]] = {}
    for name, by_bench in variants.items():
        count = sum(o == kind for o in by_bench.values())
        if count:
            groups.setdefault(count, []).append(name)
    phrases = []
    for count in sorted(groups, reverse=True):
        names = groups[count]
        subject = _names(names)
        if not phrases:
            subject += " " + verb[len(names) > 1]
        phrases.append(f"{subject} on {_number(count)}")
    return ", ".join(phrases)


def verdict(summary: dict[str, Any]) -> str:
    """
    One sentence, in plain words, of what the summary measured against DPO: which variants' seed-level 95% CIs lie
    above 0 ("beats"), below 0 ("loses to it"), or hold 0 on every benchmark ("cannot be told apart"), on how many
    benchmarks, and which variants ran on only some of them. A benchmark that failed its sanity gate counts for
    nothing and is named at the end.
    """
    failed = [short_title(spec["title"]) for spec in summary["benchmarks"].values() if gate_failed(spec)]
    failed_note = (
        f" ({_names(failed)} failed {'its' if len(failed) == 1 else 'their'} sanity gate: DPO did not beat the start "
        "by 2 standard errors there, so it ranks nothing)"
        if failed
        else ""
    )
    benchmarks = {name: spec for name, spec in summary["benchmarks"].items() if not gate_failed(spec)}
    titles = {name: short_title(spec["title"]) for name, spec in benchmarks.items()}
    by_variant = outcomes(summary)
    if not by_variant:
        return f"The benchmark summary of {summary['date']} holds no variant to compare with DPO{failed_note}."
    count = len(titles)
    head = (
        f"Against DPO on {count} benchmark{'s' if count > 1 else ''} ({_names(list(titles.values()))}), by "
        "seed-level 95% confidence intervals of the difference"
    )
    parts = [_counted(by_variant, "wins", ("beats DPO", "beat DPO")) or "no variant beats DPO on any"]
    losses = _counted(by_variant, "loses", ("loses to it", "lose to it"))
    if losses:
        parts.append(losses)
    ties = [name for name, by_bench in by_variant.items() if all(o == "ties" for o in by_bench.values())]
    if ties:
        parts.append(f"{_names(ties)} cannot be told apart from it on any (every interval holds 0)")
    partial: dict[tuple[str, ...], list[str]] = {}
    for name, by_bench in by_variant.items():
        if len(by_bench) < count:
            partial.setdefault(tuple(b for b in benchmarks if b in by_bench), []).append(name)
    parts += [f"{_names(names)} ran on {_names([titles[b] for b in ran])} only" for ran, names in partial.items()]
    return f"{head}: {'; '.join(parts)}{failed_note}."


def signed(value: float, digits: int = 3) -> str:
    """`+0.012`, `−0.300` (a true minus sign), `+0.000` for 0."""
    text = f"{value:+.{digits}f}"
    return text.replace("-", "−")


def _cell(row: dict[str, Any] | None, ranks: bool = True) -> tuple[str, str]:
    if row is None:
        return "not run", "–"
    low, high = row["ci"]
    delta = f"{signed(row['delta'])} [{signed(low)}, {signed(high)}]"
    if ranks and outcome(row["ci"]) != "ties":
        delta = f"**{delta}**"
    ratio = row.get("cpu_ratio_vs_dpo")
    return delta, "–" if ratio is None else f"{ratio:.2f}×"


def results_table(summary: dict[str, Any]) -> str:
    """
    Markdown: one row per variant, two columns per benchmark (Δ vs DPO with its seed-level 95% CI, bold when the
    interval excludes 0 and the benchmark passed its sanity gate; CPU seconds per step over DPO's), and a first row
    with DPO's own score (start → after DPO).
    """
    benchmarks = summary["benchmarks"]
    header = ["variant"]
    for spec in benchmarks.values():
        failed = " (gate failed: ranks nothing)" if gate_failed(spec) else ""
        header += [f"{short_title(spec['title'])}{failed}: Δ {spec['metric']} vs DPO [95% CI]", "CPU/step vs DPO"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    dpo = ["DPO (its own score: start → trained)"]
    for spec in benchmarks.values():
        dpo += [f"{spec['start']:.3f} → {spec['dpo']:.3f}", "1.00×"]
    lines.append("| " + " | ".join(dpo) + " |")
    cells = {(row["variant"], row["benchmark"]): row for row in _variant_rows(summary)}
    for variant in _variants(summary):
        row = [variant]
        for name in benchmarks:
            row += list(_cell(cells.get((variant, name)), ranks=not gate_failed(benchmarks[name])))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _link(doc: str, from_dir: Path) -> str:
    """`doc` (a path from the repository root) relative to `from_dir` (the folder of the page that links it)."""
    return Path(os.path.relpath(doc, from_dir)).as_posix()


def results_section(summary: dict[str, Any], page: str | os.PathLike) -> str:
    """
    What goes between the markers of `page` (a path from the repository root, for the relative links): the verdict,
    the table, how each benchmark was measured, and where the numbers come from.
    """
    from_dir = Path(page).parent
    specs = summary["benchmarks"].values()
    notes = [
        f"[{spec['title']}]({_link(spec['doc'], from_dir)}): {spec['metric']}, {spec['seeds']} seeds" for spec in specs
    ]
    kinds = list(dict.fromkeys(spec["ci_kind"] for spec in specs))
    if len(kinds) == 1:
        intervals = f"Intervals: {kinds[0]}."
    else:
        intervals = "Intervals: " + "; ".join(f"{short_title(s['title'])}: {s['ci_kind']}" for s in specs) + "."
    source = _link(DOCS_SUMMARY.as_posix(), from_dir)
    return "\n".join(
        [
            f"**{verdict(summary)}**",
            "",
            results_table(summary),
            "",
            f"Bold: the interval excludes 0 (on a benchmark that passed its sanity gate). {intervals} Benchmarks: "
            + "; ".join(notes)
            + ".",
            f"Rendered from [{SUMMARY_NAME}]({source}) ({summary['date']}; `{summary['command']}`) by "
            "`python -m trl_tidpo.tools.results --write README.md docs/benchmarks.md`.",
        ]
    )


def render(text: str, summary: dict[str, Any], page: str | os.PathLike) -> str:
    """
    `text` with its section between `START_MARKER` and `END_MARKER` replaced by `results_section`.

    Raises:
        ValueError: naming `page`, if it lacks one marker or has them out of order or more than once.
    """
    if text.count(START_MARKER) != 1 or text.count(END_MARKER) != 1:
        raise ValueError(f"{page} needs exactly one {START_MARKER!r} and one {END_MARKER!r} line.")
    start = text.index(START_MARKER) + len(START_MARKER)
    end = text.index(END_MARKER)
    if end < start:
        raise ValueError(f"{page}: {END_MARKER!r} comes before {START_MARKER!r}.")
    return text[:start] + "\n" + results_section(summary, page) + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trl_tidpo.tools.results",
        description="Render the results sections of the given pages from the benchmark summary JSON.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--write", nargs="+", metavar="PAGE", help="rewrite the sections of these pages (and the packaged copy)"
    )
    mode.add_argument("--check", nargs="+", metavar="PAGE", help="exit 1 if a section, or the packaged copy, is stale")
    mode.add_argument("--verdict", action="store_true", help="print the one-sentence verdict")
    parser.add_argument("--summary", default=str(DOCS_SUMMARY), help=f"the summary JSON (default: {DOCS_SUMMARY})")
    args = parser.parse_args(argv)
    try:
        summary = load_summary(args.summary)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.verdict:
        print(verdict(summary))
        return 0
    stale = []
    for page in args.write or args.check:
        text = Path(page).read_text(encoding="utf-8")
        try:
            new = render(text, summary, page)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if new != text:
            stale.append(page)
            if args.write:
                Path(page).write_text(new, encoding="utf-8")
    source = Path(args.summary).read_bytes()
    if not PACKAGED_SUMMARY.is_file() or PACKAGED_SUMMARY.read_bytes() != source:
        stale.append(str(PACKAGED_SUMMARY))
        if args.write:
            PACKAGED_SUMMARY.write_bytes(source)
    if args.check and stale:
        command = f"python -m trl_tidpo.tools.results --write {' '.join(args.check)}"
        print(f"stale: {', '.join(stale)}; run {command}", file=sys.stderr)
        return 1
    for page in stale if args.write else ():
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
