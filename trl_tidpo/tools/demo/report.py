"""What the demo leaves behind: the printed table, `summary.json`, `token_importance.html`, `training_curves.png`."""

import json
from pathlib import Path
from typing import Any

from ..results import load_summary, verdict
from ..visualize import PairView, TokenRow, pairs_page


PLOT_INSTALL_HINT = 'pip install "trl-tidpo[plot]"  (or: pip install matplotlib)'

# (summary key, label, format) of each table row
TABLE_ROWS = [
    ("accuracy", "held-out preference accuracy", "{:.3f}"),
    ("margin", "mean reward margin", "{:+.3f}"),
    ("roc_auc", "critical-token ROC-AUC of weights", "{:.3f}"),
    ("top_k_share", "critical share of top-k weights (k = the response's critical tokens)", "{:.3f}"),
    ("roc_auc_content", "  same ROC-AUC, special tokens left out", "{:.3f}"),
    ("top_k_share_content", "  same top-k share, special tokens left out", "{:.3f}"),
    ("seconds_per_step", "seconds per step", "{:.3f}"),
]


WEIGHT_METRICS = ("roc_auc", "top_k_share", "roc_auc_content", "top_k_share_content")
BASELINE_NAMES = ("starting model", "Gaussian prior alone", "uniform weights", "random weights (expected)")


def baseline_metrics(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """
    What the weight metrics of trained models should be read against, by `BASELINE_NAMES`: TI-DPO's weights of the
    starting model and of the prior alone (λ = 0), uniform weights (ROC-AUC 0.5: all tied; top-k share from the
    ties broken toward the earlier token), and random weights (expected ROC-AUC 0.5 and top-k share the base rate of
    critical tokens).
    """
    half = {"roc_auc": 0.5, "roc_auc_content": 0.5}
    random = {**half, "top_k_share": summary["base_rate"], "top_k_share_content": summary["base_rate_content"]}
    return dict(zip(BASELINE_NAMES, (summary["start"], summary["prior_only"], summary.get("uniform", half), random)))


def table_rows(summary: dict[str, Any], with_baselines: bool = False) -> list[list[str]]:
    """
    The side-by-side table as rows of strings; the first row is the header. `with_baselines` adds a column per
    baseline (`baseline_metrics`), filled on the weight-metric rows and "–" elsewhere.
    """
    names = list(summary["results"])
    baselines = baseline_metrics(summary) if with_baselines else {}
    rows = [["metric", *names, *baselines]]
    for key, label, fmt in TABLE_ROWS:
        cells = [fmt.format(summary["results"][name][key]) for name in names]
        cells += [fmt.format(b[key]) if key in WEIGHT_METRICS and key in b else "–" for b in baselines.values()]
        rows.append([label, *cells])
    return rows


def format_table(summary: dict[str, Any]) -> str:
    """The table for the terminal, with the baselines the weight metrics should be read against."""
    rows = table_rows(summary)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    start, prior = summary["start"], summary["prior_only"]
    start_name = "starting model (after SFT)" if summary["config"]["model"] == "tiny" else "starting model"

    def pair(m: dict, suffix: str) -> str:
        return f"{m['roc_auc' + suffix]:.3f} / {m['top_k_share' + suffix]:.3f}"

    lines += [
        "",
        f"Held-out pairs: {summary['num_test_pairs']}; rewards are beta * (log pi - log pi_ref) summed over the completion.",
        "Weight metrics: TI-DPO's weights (trl_tidpo.token_weights) of each trained policy vs the known critical tokens.",
        "Baselines, ROC-AUC / top-k share (all tokens; special tokens left out):",
        f"  {start_name}: {pair(start, '')}; {pair(start, '_content')}",
        f"  Gaussian prior alone: {pair(prior, '')}; {pair(prior, '_content')}",
        f"  random weights (expected): 0.500 / {summary['base_rate']:.3f}; 0.500 / {summary['base_rate_content']:.3f}",
    ]
    if "uniform" in summary:
        lines.insert(-1, f"  uniform weights (all tied): {pair(summary['uniform'], '')}; {pair(summary['uniform'], '_content')}")
    return "\n".join(lines)


def summary_json(summary: dict[str, Any]) -> dict[str, Any]:
    """`summary` without the per-token rows, with the per-step curves (loss, reward accuracy) kept."""
    out = {key: value for key, value in summary.items() if key != "results"}
    out["results"] = {}
    for name, result in summary["results"].items():
        entry = {key: value for key, value in result.items() if key not in ("weight_rows", "log_history")}
        entry["held_out_curve"] = {str(step): point for step, point in result["held_out_curve"].items()}
        entry["curves"] = {
            "step": [h["step"] for h in result["log_history"]],
            "loss": [h["loss"] for h in result["log_history"]],
            "rewards/accuracies": [h.get("rewards/accuracies") for h in result["log_history"]],
        }
        out["results"][name] = entry
    return out


def write_summary(summary: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(summary_json(summary), indent=2) + "\n", encoding="utf-8")


def pair_views(summary: dict[str, Any], test_rows: list[dict], variant: str, num_pairs: int) -> list[PairView]:
    """The first `num_pairs` held-out pairs with `variant`'s weights, for the HTML page."""
    by_pair: dict[int, dict[str, dict]] = {}
    for row in summary["results"][variant]["weight_rows"]:
        by_pair.setdefault(row["pair"], {})[row["side"]] = row
    views = []
    for index in sorted(by_pair)[:num_pairs]:
        sides = {
            side: TokenRow(
                tokens=r["tokens"],
                weights=r["weights"],
                critical=r["critical"],
                importance=r["importance"],
                prior=r["prior"],
                caption=_caption(r),
                special=r.get("special"),
            )
            for side, r in by_pair[index].items()
        }
        pair = test_rows[index]
        views.append(PairView(prompt=pair["prompt"], chosen=sides["chosen"], rejected=sides["rejected"], title=f"Held-out pair {index + 1} ({pair['topic']})"))
    return views


def _caption(row: dict) -> str:
    critical = [w for w, c in zip(row["weights"], row["critical"]) if c]
    other = [w for w, c in zip(row["weights"], row["critical"]) if not c]
    if not critical or not other:
        return ""
    return f"mean weight: critical {sum(critical) / len(critical):.2f}, other {sum(other) / len(other):.2f}"


def _finding(auc: float) -> str:
    """Plain words for a critical-token ROC-AUC."""
    if auc < 0.45:
        return "worse than chance"
    if auc < 0.55:
        return "no better than chance"
    if auc < 0.65:
        return "only a little better than chance"
    return "better than chance" if auc < 0.8 else "well"


def page_verdict(summary: dict[str, Any], variant: str = "TI-DPO") -> list[str]:
    """
    The top of the HTML page: one sentence on what this run shows (do `variant`'s weights find the critical tokens,
    and its accuracy against DPO's), in words a newcomer reads, then the benchmarks' verdict (`results.verdict`).
    """
    result = summary["results"][variant]
    auc, auc_content = result["roc_auc"], result["roc_auc_content"]
    accuracy = f"held-out preference accuracy {result['accuracy']:.2f}"
    if "DPO" in summary["results"] and variant != "DPO":
        accuracy += f" against DPO's {summary['results']['DPO']['accuracy']:.2f}"
    run = (
        f"In this run ({summary['config']['steps']} steps, one seed), {variant}'s token weights pick out the critical "
        f"tokens {_finding(auc)}: ROC-AUC {auc:.2f} ({auc_content:.2f} leaving out the end-of-sequence token), where "
        "0.5 is chance (a critical token outweighs a random other token half the time) and 1 would mean every "
        f"critical token outweighs every other token; {accuracy}."
    )
    return [run, "On the benchmarks that decide (docs/benchmarks.md): " + verdict(load_summary())]


READING_GUIDE = (
    "ROC-AUC: the chance that a critical token of a held-out response weighs more than a random non-critical one "
    "(0.5: chance; 1: always). Top-k share: in each response, the share of critical tokens among its k heaviest "
    "tokens, where k is the number of critical tokens in that response (1: the critical tokens are exactly the "
    "heaviest; random weights give the critical tokens' base rate, in the last column)."
)


def special_share_note(rows: list[dict]) -> str:
    """
    When the special tokens (EOS) of `rows` average well above 1, say so: they take weight from the rest, which is
    why most other tokens sit below 1 (blue) on a scale white at 1.
    """
    special = [w for row in rows for w, s in zip(row["weights"], row.get("special") or []) if s]
    if not special or sum(special) / len(special) < 1.5:
        return ""
    return (
        f" The special tokens average {sum(special) / len(special):.1f} here (written beside them), taking weight "
        "from the rest: most other tokens fall below 1."
    )


def write_html(summary: dict[str, Any], test_rows: list[dict], path: Path, variant: str = "TI-DPO", num_pairs: int = 12) -> None:
    intro = (
        f"Held-out preference pairs after {summary['config']['steps']} steps of {variant} training. Every completion "
        "token is shaded by the weight TI-DPO gives it (trl_tidpo.token_weights on the trained policy: gradient "
        "attribution mixed with a Gaussian prior, averaging 1 per completion): red above 1, blue below. Outlined "
        "tokens are the critical tokens in which chosen and rejected were built to differ; the other words are shared "
        "filler, one random distractor word per side, the final '.' and the end-of-sequence token."
        + special_share_note(summary["results"][variant]["weight_rows"])
        + " "
        + READING_GUIDE
    )
    page = pairs_page(
        pair_views(summary, test_rows, variant, num_pairs),
        title="TI-DPO token weights on held-out pairs",
        intro=intro,
        summary=table_rows(summary, with_baselines=True),
        verdict=page_verdict(summary, variant),
    )
    path.write_text(page, encoding="utf-8")


def write_curves(summary: dict[str, Any], path: Path) -> bool:
    """
    `training_curves.png`: training loss and in-batch reward accuracy per step for each variant (raw and a running
    mean). Returns False, writing nothing, when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, result), color in zip(summary["results"].items(), ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")):
        history = result["log_history"]
        steps = [h["step"] for h in history]
        for ax, key in zip(axes, ("loss", "rewards/accuracies")):
            values = [h.get(key, float("nan")) for h in history]
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _running_mean(values, 10), color=color, label=name, linewidth=1.8)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[1].set(title="reward accuracy (training batch)", xlabel="step", ylabel="chosen reward > rejected", ylim=(-0.05, 1.05))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("DPO vs TI-DPO from the same start (faint: per step; solid: running mean of 10)", fontsize=10)
    fig.text(
        0.5,
        0.005,
        "TI-DPO's loss includes γ × the triplet loss, and its rewards are token-weighted (as TIDPOTrainer logs them).",
        ha="center",
        fontsize=8,
        color="dimgray",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _running_mean(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out
