"""`benchmarks/decisive_position.py`: where pairs first differ, and the prior's weight there, against explicit
formulas."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import decisive_position  # noqa: E402

from trl_tidpo.tools.demo.tiny_models import build_word_tokenizer  # noqa: E402


def test_first_difference_of_completions():
    assert decisive_position.first_difference([5, 6, 7], [5, 9, 7]) == 1
    assert decisive_position.first_difference([4, 6], [5, 6]) == 0
    assert decisive_position.first_difference([5, 6], [5, 6, 7]) == 2  # a prefix: the shorter's length


def test_prior_weight_is_the_mean_one_gaussian_of_spec():
    n = 12
    mu, sigma = (n - 1) / 2, max(1.0, 0.25 * n)
    p = [math.exp(-0.5 * ((j - mu) / sigma) ** 2) for j in range(n)]
    for position in (0, 5, 11):
        expected = n * p[position] / sum(p)
        assert math.isclose(decisive_position.prior_weight_at(n, position), expected, rel_tol=1e-5)
    assert decisive_position.prior_weight_at(n, 0) < 0.5 < 1.0 < decisive_position.prior_weight_at(n, 5)


def test_measure_reads_completions_after_the_chat_prompt():
    tokenizer = build_word_tokenizer(["yes", "no", "cats", "purr"])
    prompt = [{"role": "user", "content": "cats"}]
    pairs = [
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "yes cats purr"}],
         "rejected": [{"role": "assistant", "content": "no cats purr"}]},
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "cats purr yes"}],
         "rejected": [{"role": "assistant", "content": "cats purr no"}]},
    ]  # fmt: skip
    result = decisive_position.measure(tokenizer, pairs)
    _, chosen = decisive_position.completion_ids(tokenizer, prompt, pairs[1]["chosen"])  # smollm2_task's
    assert tokenizer.decode(chosen).split()[:3] == ["cats", "purr", "yes"]
    assert result["pairs"] == 2 and result["first_difference_at_0"] == 0.5
    assert result["first_difference_median"] == (0 + 2) / 2
