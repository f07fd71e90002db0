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


def test_pairs_page_shades_by_weight_and_outlines_critical_tokens():
    pair = PairView(prompt="p", chosen=_row(["a", "b"], [0.0, 4.0], [False, True]), rejected=_row(["c"], [2.0], [False]))
    page = pairs_page([pair], title="t")
    spans = re.findall(r'<span class="(tok[^"]*)" style="background:([^"]+)" title="([^"]+)">([^<]*)</span>', page)
    by_text = {text: (cls, color, title) for cls, color, title, text in spans}
    assert by_text["a"][:2] == ("tok", "rgb(255,255,255)")  # weight 0: white
    assert by_text["b"][:2] == ("tok critical", "rgb(234,88,12)")  # the page maximum: full colour
    assert by_text["c"][1] == shade(2.0, 4.0)  # one scale for the whole page
    assert "weight 4.000 · importance 0.100 · prior 0.200 · critical" in by_text["b"][2]


def test_shade_saturates_and_clamps():
    assert shade(0.0, 2.0) == "rgb(255,255,255)"
    # a quarter of the way: 255 - 0.25 * (255 - 234) = 249.75, 255 - 0.25 * 167 = 213.25, 255 - 0.25 * 243 = 194.25
    assert shade(0.5, 2.0) == "rgb(250,213,194)"
    assert shade(5.0, 2.0) == shade(2.0, 2.0) == "rgb(234,88,12)"
    assert shade(-1.0, 2.0) == "rgb(255,255,255)"


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
    from trl_tidpo.tools.visualize import scale_max

    # 19 content tokens between 0.5 and 1.4 and one EOS at 9.0: nearest-rank 95th percentile = 19th of 20 sorted
    weights = [0.5 + 0.05 * i for i in range(19)] + [9.0]
    assert scale_max(weights) == pytest.approx(sorted(weights)[18])
    assert scale_max([0.0] * 19 + [3.0]) == 3.0  # a non-positive quantile falls back to the maximum
    assert scale_max([]) == 1.0
    page = completion_page("p", _row([f"t{i}" for i in range(20)], weights), title="T")
    full = r'style="background:rgb\(234,88,12\)" title="[^"]*">'
    assert re.search(full + "t18<", page) and re.search(full + "t19<", page)  # the largest content token and EOS
    assert not re.search(full + "t17<", page)
    assert "≥ 1.40" in page and "95% quantile" in page


def test_special_tokens_are_left_out_of_the_colour_scale():
    # Content weights 0.2..1.0 (five tokens), EOS 6.0 on each of two rows: EOS would set a scale where 1.0 is pale
    content = [0.2, 0.4, 0.6, 0.8, 1.0]
    rows = [
        TokenRow([f"t{i}" for i in range(6)], content + [6.0], special=[False] * 5 + [True]),
        TokenRow([f"u{i}" for i in range(6)], content + [6.0], special=[False] * 5 + [True]),
    ]
    pair = PairView(prompt="p", chosen=rows[0], rejected=rows[1])
    page = pairs_page([pair], title="T")
    assert "≥ 1.00" in page  # nearest-rank 95% quantile of the ten content weights: the 10th, 1.0
    assert 'style="background:rgb(234,88,12)" title="weight 1.000">t4<' in page
    assert 'style="background:rgb(234,88,12)" title="weight 6.000">t5<' in page
    with pytest.raises(ValueError, match="`special` has 1 entries for 2 tokens"):
        TokenRow(["a", "b"], [1.0, 1.0], special=[True])
