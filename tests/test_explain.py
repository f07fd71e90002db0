"""`token_weights` (tools/explain.py): the weights the trainer would give one completion, for inspection."""

import pytest
import torch
from helpers_trainer import hybrid_weights_loop, load, raw_importance, tokenize_row

from trl_tidpo import TIDPOConfig, token_weights


PROMPT, COMPLETION = "what should i do about a headache ?", " rest and drink water ."


@pytest.mark.parametrize(
    "options",
    [{}, {"importance_lambda": 1.0, "weight_normalization": "sum"}, {"weight_span": "sequence", "prior_sigma_ratio": 0.5}],
)
def test_weights_match_an_independent_attribution(model_dir, tokenizer, options):
    """Per completion token: `inputs_embeds` attribution of one row, mixed with the prior by explicit loops."""
    model = load(model_dir)
    ids, start = tokenize_row(tokenizer, PROMPT, COMPLETION)
    settings = dict(options)
    lam = settings.get("importance_lambda", 0.7)
    rho = settings.get("prior_sigma_ratio", 0.25)
    span = list(range(start, len(ids))) if settings.get("weight_span", "completion") == "completion" else list(range(len(ids)))
    expected, fallback = hybrid_weights_loop(
        raw_importance(model, ids), span, lam, rho, settings.get("weight_normalization", "mean")
    )
    view = token_weights(model, tokenizer, PROMPT, COMPLETION, **options)
    assert view.token_ids == ids[start:]
    assert not view.fallback and not fallback
    torch.testing.assert_close(
        torch.tensor(view.weights), torch.tensor([expected[j] for j in range(start, len(ids))]), atol=1e-5, rtol=1e-4
    )


def test_defaults_are_the_configs(model_dir, tokenizer):
    """No options given: the `TIDPOConfig` defaults, the same numbers as passing them explicitly."""
    model = load(model_dir)
    config = TIDPOConfig(output_dir="unused", use_cpu=True, bf16=False)
    assert token_weights(model, tokenizer, PROMPT, COMPLETION) == token_weights(
        model, tokenizer, PROMPT, COMPLETION, **config.weight_options()
    )


def test_importance_and_prior_are_the_mixed_parts(model_dir, tokenizer):
    """`weights = n · (λ Î + (1 − λ) P̂)` token by token, with the returned `importance` and `prior`."""
    view = token_weights(load(model_dir), tokenizer, PROMPT, COMPLETION, importance_lambda=0.3)
    n = len(view.weights)
    for w, i, p in zip(view.weights, view.importance, view.prior, strict=True):
        assert w == pytest.approx(n * (0.3 * i + 0.7 * p), rel=1e-5)
    assert sum(view.importance) == pytest.approx(1.0, rel=1e-5)
    assert sum(view.prior) == pytest.approx(1.0, rel=1e-5)


def test_unknown_option_is_named(model_dir, tokenizer):
    with pytest.raises(TypeError, match="importance_lamda"):
        token_weights(load(model_dir), tokenizer, PROMPT, COMPLETION, importance_lamda=0.5)


def test_model_is_left_in_training_mode(model_dir, tokenizer):
    model = load(model_dir).train()
    token_weights(model, tokenizer, PROMPT, COMPLETION)
    assert model.training and all(p.grad is None for p in model.parameters())
