"""
Views of per-token TI-DPO weights: self-contained HTML (no server, no script, every text escaped) and a terminal
rendering (colour on a terminal, plain numbers when piped).
"""

import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

from datasets import Dataset

from ..modeling.tis_dpo import tokenize_preference_dataset
from ..modeling.weight_columns import WEIGHT_COLUMNS


# Weight shading, diverging around the mean weight (1 under TI-DPO's mean normalisation): white at the mean, blue below
# it, red above it, full colour at `spread` away from it (see `scale_spread`). Black text stays readable on both ends.
_HIGH_RGB = (214, 96, 77)
_LOW_RGB = (67, 147, 195)
SCALE_QUANTILE = 0.95  # the colour scale saturates here (see `scale_spread` and `scale_max`)
# 256-colour background ramp for terminals, from white to red.
_ANSI_RAMP = (231, 230, 229, 223, 216, 209, 202, 196)

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 75em;
       color: #1f2937; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.1em; margin: 0 0 .4em; } h3 { font-size: .95em; margin: .2em 0; }
.verdict { font-size: 1.08em; background: #f3f4f6; border-left: 4px solid #374151; padding: .6em .9em;
           max-width: 60em; }
.verdict p { margin: .3em 0; }
.note { color: #4b5563; max-width: 60em; }
.legend { display: flex; flex-wrap: wrap; gap: .6em 1.5em; align-items: center; margin: 1em 0; font-size: .9em; }
.ramp { display: inline-block; width: 12em; height: 1em; border: 1px solid #d1d5db; vertical-align: middle;
        background: linear-gradient(to right, rgb(67,147,195), rgb(255,255,255), rgb(214,96,77)); }
.table-card { max-width: 100%; overflow-x: auto; }
table.summary { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
table.summary td, table.summary th { border: 1px solid #d1d5db; padding: .25em .6em; text-align: right; }
table.summary th { overflow-wrap: anywhere; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
.pair { border: 1px solid #e5e7eb; border-radius: 6px; padding: .8em 1em; margin: 1em 0; }
.prompt { color: #374151; margin-bottom: .5em; overflow-wrap: anywhere; }
.sides { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 1.5em; }
@media (max-width: 50em) { .sides { grid-template-columns: minmax(0, 1fr); } }
.side { min-width: 0; }
.side h3.chosen { color: #15803d; } .side h3.rejected { color: #b91c1c; }
.tokens { line-height: 1.5em; font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: .92em; }
.tok { display: inline-block; max-width: 100%; overflow-wrap: anywhere; white-space: pre-wrap; padding: .1em .2em;
       margin: 2px 1px; border-radius: 3px; vertical-align: top; }
.tok.critical { outline: 2px solid #1d4ed8; outline-offset: 1px; }
.tok.special { background: repeating-linear-gradient(45deg, #f3f4f6, #f3f4f6 3px, #e5e7eb 3px, #e5e7eb 6px);
               color: #6b7280; border: 1px dashed #9ca3af; }
.tok.special small { color: #374151; margin-left: .3em; }
.stats { color: #6b7280; font-size: .8em; margin-top: .3em; }
"""


@dataclass
class TokenRow:
    """
    One completion to draw: its tokens (display text), weights, optional critical flags and per-token details.
    `special` marks EOS and other special tokens, which are left out of the colour scale (they still get their colour,
    saturated when above it).
    """

    tokens: Sequence[str]
    weights: Sequence[float]
    critical: Sequence[bool] | None = None
    importance: Sequence[float] | None = None
    prior: Sequence[float] | None = None
    caption: str = ""
    special: Sequence[bool] | None = None

    def __post_init__(self):
        for name in ("weights", "critical", "importance", "prior", "special"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.tokens):
                raise ValueError(f"`{name}` has {len(values)} entries for {len(self.tokens)} tokens.")


@dataclass
class PairView:
    """A preference pair to draw side by side."""

    prompt: str
    chosen: TokenRow
    rejected: TokenRow
    title: str = ""
    notes: list[str] = field(default_factory=list)


_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def visible(token: str) -> str:
    """
    Token text with line breaks and tabs made visible and other control characters (terminal escapes included)
    written as `\\xNN`, so every token takes room and none can act on the terminal. An empty token shows as `∅`.
    """
    out = "".join(_VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in token)
    return out or "∅"


def shade(weight: float, center: float, spread: float) -> str:
    """
    CSS colour of `weight` on a diverging scale: white at `center`, blue below it, red above it, full colour at
    `spread` or more away from it.
    """
    t = 0.0 if spread <= 0 else min(max((weight - center) / spread, -1.0), 1.0)
    end = _HIGH_RGB if t > 0 else _LOW_RGB
    r, g, b = (round(255 + abs(t) * (c - 255)) for c in end)
    return f"rgb({r},{g},{b})"


def tokens_html(row: TokenRow, center: float, spread: float) -> str:
    """
    `<span>`s of `row`'s tokens, shaded by weight (`shade`), critical ones outlined, details in the hover title.
    Special tokens (EOS, chat markers) are left out of the scale: grey and hatched, their weight written beside them.
    """
    spans = []
    for i, (token, weight) in enumerate(zip(row.tokens, row.weights)):
        critical = row.critical is not None and row.critical[i]
        special = row.special is not None and row.special[i]
        classes = "tok" + (" critical" if critical else "") + (" special" if special else "")
        details = f"weight {weight:.3f}"
        if row.importance is not None:
            details += f" · importance {row.importance[i]:.3f}"
        if row.prior is not None:
            details += f" · prior {row.prior[i]:.3f}"
        if critical:
            details += " · critical"
        if special:
            details += " · special token, left out of the colour scale"
        text = html.escape(visible(token))
        if special:
            label = f"{text}<small>{weight:.2f}</small>"
            spans.append(f'<span class="{classes}" title="{html.escape(details)}">{label}</span>')
        else:
            style = f"background:{shade(weight, center, spread)}"
            spans.append(f'<span class="{classes}" style="{style}" title="{html.escape(details)}">{text}</span>')
    return "".join(spans)


def _row_block(row: TokenRow, heading: str, css_class: str, center: float, spread: float) -> str:
    caption = f'<div class="stats">{html.escape(row.caption)}</div>' if row.caption else ""
    return (
        f'<div class="side"><h3 class="{css_class}">{html.escape(heading)}</h3>'
        f'<div class="tokens">{tokens_html(row, center, spread)}</div>{caption}</div>'
    )


def _legend(center: float, spread: float, with_critical: bool, with_special: bool) -> str:
    # The samples' class starts with "sample" so that `<span class="tok` counts a page's own tokens only
    critical = '<span><span class="sample tok critical">token</span> critical token (ground truth)</span>'
    critical = critical if with_critical else ""
    special = (
        '<span><span class="sample tok special">&lt;eos&gt;<small>w</small></span> special token (end of sequence, '
        "chat markers): left out of the colour scale, its weight written beside it</span>"
        if with_special
        else ""
    )
    return (
        f'<div class="legend"><span>weight ≤ {center - spread:.2f}</span><span class="ramp"></span>'
        f"<span>≥ {center + spread:.2f}</span>"
        f"<span>(white: the mean weight, {center:.2f}; blue: below it, red: above it; full colour at the "
        f"{SCALE_QUANTILE:.0%} quantile of the distance from the mean over the other tokens)</span>"
        f"{critical}{special}<span>hover a token for its weight, importance and prior</span></div>"
    )


def _summary_table(summary: Sequence[Sequence[str]]) -> str:
    if not summary:
        return ""
    head, *body = summary
    rows = ["<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in head) + "</tr>"]
    rows += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body]
    return f'<div class="table-card"><table class="summary">{"".join(rows)}</table></div>'


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def scale_max(weights: Sequence[float], quantile: float = SCALE_QUANTILE) -> float:
    """
    Where the colour scale saturates: the `quantile` of `weights` (nearest rank), or their maximum when that quantile
    is not positive. The end-of-sequence token and a few others often weigh several times the rest; scaled to the
    maximum, every content token would be nearly white.

    Returns:
        `float`: 1.0 for no weights.
    """
    ordered = sorted(weights)
    if not ordered:
        return 1.0
    value = ordered[max(math.ceil(quantile * len(ordered)) - 1, 0)]
    return value if value > 0 else ordered[-1]


def _page_vmax(rows: Sequence[TokenRow]) -> float:
    """`scale_max` of the rows' content tokens (all tokens when every one is special or none is marked)."""
    return scale_max(_content_weights(rows))


def _content_weights(rows: Sequence[TokenRow]) -> list[float]:
    """The weights of the rows' tokens that are not special (all of them when every one is special)."""
    content = [w for row in rows for i, w in enumerate(row.weights) if row.special is None or not row.special[i]]
    return content or [w for row in rows for w in row.weights]


def scale_center(rows: Sequence[TokenRow]) -> float:
    """
    Where the colour scale is white: the mean weight over every token of `rows`, special ones included. With TI-DPO's
    `weight_normalization="mean"` each completion's weights average 1, so this is 1. Returns 1.0 for no tokens.
    """
    weights = [w for row in rows for w in row.weights]
    return sum(weights) / len(weights) if weights else 1.0


def scale_spread(weights: Sequence[float], center: float, quantile: float = SCALE_QUANTILE) -> float:
    """
    How far from `center` the colour saturates: the `quantile` (nearest rank) of `|w - center|` over `weights`, or
    their largest distance when that quantile is 0, so that a few outliers do not leave the rest pale.

    Returns:
        `float`: 1.0 when every weight equals `center` (or there is none).
    """
    distances = sorted(abs(w - center) for w in weights)
    if not distances or distances[-1] <= 0:
        return 1.0
    value = distances[max(math.ceil(quantile * len(distances)) - 1, 0)]
    return value if value > 0 else distances[-1]


def _verdict_html(verdict: Sequence[str]) -> str:
    if not verdict:
        return ""
    return '<div class="verdict">' + "".join(f"<p>{html.escape(line)}</p>" for line in verdict) + "</div>"


def pairs_page(
    pairs: Sequence[PairView],
    title: str,
    intro: str = "",
    summary: Sequence[Sequence[str]] = (),
    verdict: Sequence[str] = (),
) -> str:
    """
    A self-contained HTML page: an optional verdict (one paragraph per string) and summary table, then each pair's
    prompt and its chosen and rejected completions side by side, every token shaded by its weight on one diverging
    scale for the whole page (white at the mean weight, `scale_center`; special tokens left out).

    Returns:
        `str`: the HTML document.
    """
    rows = [row for pair in pairs for row in (pair.chosen, pair.rejected)]
    center = scale_center(rows)
    spread = scale_spread(_content_weights(rows), center)
    with_critical = any(row.critical is not None and any(row.critical) for row in rows)
    with_special = any(row.special is not None and any(row.special) for row in rows)
    blocks = []
    for pair in pairs:
        notes = "".join(f'<div class="stats">{html.escape(note)}</div>' for note in pair.notes)
        sides = _row_block(pair.chosen, "chosen", "chosen", center, spread)
        sides += _row_block(pair.rejected, "rejected", "rejected", center, spread)
        blocks.append(
            f'<div class="pair"><h2>{html.escape(pair.title)}</h2>'
            f'<div class="prompt"><b>Prompt:</b> {html.escape(pair.prompt)}</div><div class="sides">{sides}'
            f"</div>{notes}</div>"
        )
    intro_html = f'<p class="note">{html.escape(intro)}</p>' if intro else ""
    legend = _legend(center, spread, with_critical, with_special)
    body = _verdict_html(verdict) + intro_html + _summary_table(summary) + legend + "\n".join(blocks)
    return _page(title, body)


def completion_page(prompt: str, row: TokenRow, title: str, intro: str = "") -> str:
    """A self-contained HTML page of one prompt and its completion's token weights. Returns the HTML document."""
    center = scale_center([row])
    spread = scale_spread(_content_weights([row]), center)
    intro_html = f'<p class="note">{html.escape(intro)}</p>' if intro else ""
    caption = f'<div class="stats">{html.escape(row.caption)}</div>' if row.caption else ""
    with_special = row.special is not None and any(row.special)
    body = (
        intro_html
        + _legend(center, spread, row.critical is not None and any(row.critical), with_special)
        + f'<div class="pair"><div class="prompt"><b>Prompt:</b> {html.escape(prompt)}</div>'
        f'<div class="tokens">{tokens_html(row, center, spread)}</div>{caption}</div>'
    )
    return _page(title, body)


# ---------------------------------------------------------------------------------------------------- terminal


def use_color(stream: IO, mode: str = "auto") -> bool:
    """`mode` "always"/"never", or "auto": colour only on a terminal, unless `NO_COLOR` is set or `TERM=dumb`."""
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"colour mode must be 'auto', 'always' or 'never', got {mode!r}.")
    if mode != "auto":
        return mode == "always"
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return hasattr(stream, "isatty") and stream.isatty()


def _ansi(token: str, weight: float, vmax: float) -> str:
    t = 0.0 if vmax <= 0 else min(max(weight / vmax, 0.0), 1.0)
    code = _ANSI_RAMP[round(t * (len(_ANSI_RAMP) - 1))]
    return f"\x1b[48;5;{code}m\x1b[38;5;16m{token}\x1b[0m"


def terminal_view(row: TokenRow, color: bool) -> str:
    """
    The completion for a terminal: with `color`, the tokens inline on a white → red background by weight, then a
    table (index, token, weight, importance, prior) that is all there is without colour (plain numbers for pipes).

    Returns:
        `str`, lines joined by newlines.
    """
    lines = []
    vmax = _page_vmax([row])
    if color:
        lines.append(" ".join(_ansi(visible(t), w, vmax) for t, w in zip(row.tokens, row.weights)))
        lines.append("")
    width = max([len(visible(t)) for t in row.tokens] + [5])
    header = f"{'#':>4}  {'token':<{width}}  {'weight':>8}"
    if row.importance is not None:
        header += f"  {'importance':>10}"
    if row.prior is not None:
        header += f"  {'prior':>8}"
    lines.append(header)
    for i, (token, weight) in enumerate(zip(row.tokens, row.weights)):
        line = f"{i:>4}  {visible(token):<{width}}  {weight:>8.4f}"
        if row.importance is not None:
            line += f"  {row.importance[i]:>10.4f}"
        if row.prior is not None:
            line += f"  {row.prior[i]:>8.4f}"
        lines.append(line)
    if row.caption:
        lines.append(row.caption)
    return "\n".join(lines)


def weight_columns_page(
    dataset: Dataset, tokenizer, indices: Sequence[int] | None = None, title: str = "TIS-DPO token weights"
) -> str:
    """
    A self-contained HTML page of the weight columns of `dataset`: each selected pair's chosen
    and rejected completion tokens shaded by their weight. Works for any dataset with the two columns (TIS-DPO,
    user-supplied or cached reference weights).

    Args:
        dataset (`Dataset`): with `chosen_token_weights` / `rejected_token_weights`, tokenised or not.
        tokenizer: the tokenizer the weights were computed with.
        indices (`Sequence[int]`, *optional*): rows to show; the first 10 by default.

    Returns:
        `str`: the HTML document.
    """
    missing = [column for column in WEIGHT_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(f"The dataset has no {missing} column(s) to show.")
    subset = dataset.select(range(min(len(dataset), 10)) if indices is None else indices)
    if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(subset.column_names):
        subset = tokenize_preference_dataset(subset, tokenizer)
    pairs = []
    for index, row in zip(indices or range(len(subset)), subset, strict=True):
        sides = {
            side: TokenRow(
                tokens=[tokenizer.decode([token]) for token in row[f"{side}_ids"]],
                weights=row[f"{side}_token_weights"],
                caption=f"mean weight {sum(row[f'{side}_token_weights']) / max(1, len(row[f'{side}_ids'])):.3f}",
            )
            for side in ("chosen", "rejected")
        }
        prompt = tokenizer.decode(row["prompt_ids"])
        pairs.append(PairView(prompt, sides["chosen"], sides["rejected"], f"pair {index}"))
    intro = (
        "Per-token weights from the chosen_token_weights / rejected_token_weights columns. TIS-DPO: "
        "w = exp(μ·clamp(log π+ − log π−, L, U)), μ = +1 on chosen and −1 on rejected tokens."
    )
    return pairs_page(pairs, title, intro=intro)


def display_tokens(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token as the text it stands for (byte-level BPE markers such as `Ġ` resolved)."""
    return [tokenizer.decode([token_id]) for token_id in token_ids]
