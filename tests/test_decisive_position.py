"""`benchmarks/decisive_position.py`: where pairs first differ, and the prior's weight there, against explicit
formulas."""

import math
import sys
from pathlib import Path

import pytest

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
    result = decisive_position.measure(decisive_position.tokenized(tokenizer, pairs))
    _, chosen = decisive_position.completion_ids(tokenizer, prompt, pairs[1]["chosen"])  # smollm2_task's
    assert tokenizer.decode(chosen).split()[:3] == ["cats", "purr", "yes"]
    assert result["pairs"] == 2 and result["first_difference_at_0"] == 0.5
    assert result["first_difference_median"] == (0 + 2) / 2


def test_contrastive_weight_at_the_first_difference_is_relative_to_its_row_mean():
    tokenizer = build_word_tokenizer(["yes", "no", "cats", "purr"])
    prompt = [{"role": "user", "content": "cats"}]
    pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "yes cats purr"}],
            "rejected": [{"role": "assistant", "content": "no cats purr"}]}  # fmt: skip
    _, chosen = decisive_position.completion_ids(tokenizer, prompt, pair["chosen"])
    n = len(chosen)  # the words, then the template's end-of-turn tokens
    columns = {
        "chosen_token_weights": [[3.0] + [1.0] * (n - 1)],  # the first (differing) token weighs 3, the rest 1
        "rejected_token_weights": [[0.5] * (n + 1)],  # one weight too many: counted as misaligned
    }
    result = decisive_position.measure_weights(decisive_position.tokenized(tokenizer, [pair]), columns)
    assert math.isclose(result["chosen_relative_weight_there_median"], 3.0 / ((3.0 + n - 1) / n))
    assert result["rejected_relative_weight_there_median"] == 1.0
    assert (result["chosen_rows_misaligned"], result["rejected_rows_misaligned"]) == (0, 1)


def test_a_weight_cache_is_read_with_its_seeds_own_pairs(tmp_path):
    import text_train

    pool = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(10)]
    path = tmp_path / "sft-tis_dpo-seed3-0123456789ab.json"
    path.write_text('{"chosen_token_weights": [[1.0], [1.0], [1.0], [1.0]], "rejected_token_weights": [[1.0]]}')
    seed, pairs, columns = decisive_position.cached_seed_weights(str(path), pool)
    assert seed == 3 and len(columns["chosen_token_weights"]) == 4
    assert pairs == text_train.seed_pairs(pool, 3, 4)  # the draw the training used, as many pairs as weight rows
    assert pairs != text_train.seed_pairs(pool, 2, 4)
    other = tmp_path / "weights.json"
    other.write_text("{}")
    with pytest.raises(SystemExit, match="no '-seed<N>-'"):
        decisive_position.cached_seed_weights(str(other), pool)
