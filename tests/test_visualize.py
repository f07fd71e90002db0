import io
import re

import pytest

from trl_tidpo.tools.visualize import (
    PairView,
    TokenRow,
    completion_page,
    pairs_page,
    shade,
    terminal_view,
    use_color,
    visible,
)


SCRIPT = "<script>alert('x')</script>"


def _row(tokens, weights, critical=None):
    return TokenRow(tokens=tokens, weights=weights, critical=critical, importance=[0.1] * len(tokens), prior=[0.2] * len(tokens))


def test_pairs_page_escapes_completion_prompt_and_title():
    pair = PairView(
        prompt='say "<b>hi</b>"',
        chosen=_row([" ok", SCRIPT], [1.0, 2.0], [False, True]),
        rejected=_row(["<img src=x onerror=alert(1)>"], [1.0]),
        title="pair <1>",
    )
    page = pairs_page([pair], title="T <i>", summary=[["metric", "DPO"], ["<acc>", "1.0"]])
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<b>hi</b>" not in page and "&lt;b&gt;hi&lt;/b&gt;" in page
    assert "&lt;acc&gt;" in page and "pair &lt;1&gt;" in page and "T &lt;i&gt;" in page
    # Self-contained: no script and no external resource
    assert "<script" not in page.lower() and "src=" not in page.replace("src=x", "")


HIGH, LOW, WHITE = "rgb(214,96,77)", "rgb(67,147,195)", "rgb(255,255,255)"


def test_pairs_page_shades_around_the_mean_and_outlines_critical_tokens():
    pair = PairView(prompt="p", chosen=_row(["a", "b"], [0.0, 4.0], [False, True]), rejected=_row(["c"], [2.0], [False]))
    page = pairs_page([pair], title="t")
    spans = re.findall(r'<span class="(tok[^"]*)" style="background:([^"]+)" title="([^"]+)">([^<]*)</span>', page)
    by_text = {text: (cls, color, title) for cls, color, title, text in spans}
    # Mean weight 2: c is white; a and b are 2 away, the 95% quantile of the distances (3rd of 3): full colour
    assert by_text["c"][:2] == ("tok", WHITE)
    assert by_text["a"][:2] == ("tok", LOW)
    assert by_text["b"][:2] == ("tok critical", HIGH)
    assert "weight 4.000 · importance 0.100 · prior 0.200 · critical" in by_text["b"][2]
    assert "the mean weight, 2.00" in page and "weight ≤ 0.00" in page and "≥ 4.00" in page


def test_shade_diverges_from_the_center_and_clamps():
    assert shade(1.0, 1.0, 0.5) == WHITE
    # a fifth of the way up: 255 - 0.2 * (255 - 214) = 246.8, 255 - 0.2 * 159 = 223.2, 255 - 0.2 * 178 = 219.4
    assert shade(1.2, 1.0, 1.0) == "rgb(247,223,219)"
    # a fifth of the way down: 255 - 0.2 * 188 = 217.4, 255 - 0.2 * 108 = 233.4, 255 - 0.2 * 60 = 243
    assert shade(0.8, 1.0, 1.0) == "rgb(217,233,243)"
    assert shade(5.0, 1.0, 2.0) == shade(3.0, 1.0, 2.0) == HIGH
    assert shade(-5.0, 1.0, 2.0) == shade(-1.0, 1.0, 2.0) == LOW


def test_completion_page_escapes():
    page = completion_page(SCRIPT, _row([SCRIPT], [1.0]), title="x")
    assert "<script>" not in page and page.count("&lt;script&gt;") == 2


def test_token_row_checks_lengths():
    with pytest.raises(ValueError, match="`weights` has 1 entries for 2 tokens"):
        TokenRow(tokens=["a", "b"], weights=[1.0])


def test_visible_neutralises_control_characters():
    assert visible("a\nb\tc") == "a↵b⇥c"
    assert visible("\x1b[31mred") == "\\x1b[31mred"
    assert visible("") == "∅"


def test_terminal_view_plain_has_numbers_and_no_escape_codes():
    text = terminal_view(_row(["hello", "\x1b[2J", "world"], [0.5, 1.25, 1.25]), color=False)
    assert "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].split() == ["#", "token", "weight", "importance", "prior"]
    assert lines[1].split() == ["0", "hello", "0.5000", "0.1000", "0.2000"]
    assert lines[2].split() == ["1", "\\x1b[2J", "1.2500", "0.1000", "0.2000"]


def test_terminal_view_colour_shades_tokens():
    text = terminal_view(_row(["low", "high"], [0.0, 2.0]), color=True)
    first = text.splitlines()[0]
    assert "\x1b[48;5;231m\x1b[38;5;16mlow\x1b[0m" in first  # white background at 0
    assert "\x1b[48;5;196m\x1b[38;5;16mhigh\x1b[0m" in first  # red at the maximum


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_use_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert use_color(_Tty()) is True
    assert use_color(io.StringIO()) is False  # piped
    assert use_color(io.StringIO(), "always") is True
    assert use_color(_Tty(), "never") is False
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_color(_Tty()) is False
    with pytest.raises(ValueError, match="colour mode"):
        use_color(_Tty(), "sometimes")


def test_colour_scale_saturates_at_the_95th_percentile_not_at_an_outlier():
    from trl_tidpo.tools.visualize import scale_center, scale_spread

    # 19 weights at 1 ± 0.05 k (k = 0..9 each side but 0 once) and one at 9.0: distances from 1 sorted, the
    # nearest-rank 95th percentile is the 19th of 20: 0.45, not the outlier's 8.0
    weights = [1 + 0.05 * k for k in range(-9, 10)] + [9.0]
    assert scale_spread(weights, 1.0) == pytest.approx(0.45)
    assert scale_spread([1.0] * 19 + [3.0], 1.0) == 2.0  # a zero quantile falls back to the largest distance
    assert scale_spread([1.0, 1.0], 1.0) == scale_spread([], 1.0) == 1.0
    assert scale_center([TokenRow(["a", "b"], [0.5, 1.5]), TokenRow(["c"], [4.0])]) == pytest.approx(2.0)


def test_special_tokens_are_left_out_of_the_colour_scale():
    # Content 0.25..1.0 and an EOS of 2.5: six weights that average 1, as TI-DPO's mean normalisation gives
    content = [0.25, 0.5, 0.75, 1.0, 1.0]
    row = TokenRow([f"t{i}" for i in range(5)] + ["<eos>"], content + [2.5], special=[False] * 5 + [True])
    page = pairs_page([PairView(prompt="p", chosen=row, rejected=row)], title="T")
    # Distances of the content weights from 1: 0.75 at most (the 5th of 5 at the 95% quantile); EOS's 1.5 is not used
    assert "weight ≤ 0.25" in page and "≥ 1.75" in page and "the mean weight, 1.00" in page
    assert f'style="background:{LOW}" title="weight 0.250">t0<' in page
    assert f'style="background:{WHITE}" title="weight 1.000">t3<' in page
    # EOS: no colour of the scale, hatched, its weight written beside it
    special = re.findall(r'<span class="tok special" title="([^"]+)">([^<]*)<small>([^<]*)</small></span>', page)
    assert special == [("weight 2.500 · special token, left out of the colour scale", "&lt;eos&gt;", "2.50")] * 2
    with pytest.raises(ValueError, match="`special` has 1 entries for 2 tokens"):
        TokenRow(["a", "b"], [1.0, 1.0], special=[True])


def test_verdict_opens_the_page():
    row = TokenRow(["a"], [1.0])
    page = pairs_page([PairView("p", row, row)], title="T", intro="intro", verdict=["First <b>.", "Second."])
    assert '<h1>T</h1>\n<div class="verdict"><p>First &lt;b&gt;.</p><p>Second.</p></div><p class="note">intro' in page
