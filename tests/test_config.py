"""Tests of `TIDPOConfig`: validation of every TI-DPO field, refusal of DPO options without a token-weighted form,
and the paper's Table B13 defaults."""

import pytest

from trl_tidpo.ops.weighted_losses import LOSS_TYPES

from trl_tidpo import TIDPOConfig


def _config(tmp_path, **kwargs) -> TIDPOConfig:
    return TIDPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to=[], **kwargs)


@pytest.mark.parametrize("field", ["span_default_weight", "difference_shared_weight", "difference_differing_weight"])
def test_a_boolean_weight_is_refused(tmp_path, field):
    """A weight is `modeling.weight_columns.is_weight`: `True` is not read as the weight 1."""
    with pytest.raises(ValueError, match=f"`{field}` must be finite and >= 0, got True"):
        _config(tmp_path, **{field: True})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("token_weighting", "random"),
        ("importance_model", "critic"),
        ("importance_lambda", -0.1),
        ("importance_lambda", 1.1),
        ("prior_sigma_ratio", 0.0),
        ("prior_sigma_ratio", -0.25),
        ("weight_span", "prompt"),
        ("weight_normalization", "max"),
        ("triplet_gamma", -0.1),
        ("triplet_margin", -0.01),
        ("anchor_source", "reference"),
        ("anchor_max_new_tokens", 0),
        ("anchor_temperature", 0.0),
        ("anchor_top_k", -1),
        ("anchor_top_p", 0.0),
        ("anchor_top_p", 1.5),
        ("tdpo_alpha", -0.5),
        ("kl_chunk_size", 0),
    ],
)
def test_invalid_value_raises_naming_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        _config(tmp_path, **{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("importance_lambda", 0.0),
        ("importance_lambda", 1.0),
        ("triplet_gamma", 0.0),
        ("triplet_margin", 0.0),
        ("anchor_max_new_tokens", 1),
        ("anchor_top_k", 0),
        ("anchor_top_p", 1.0),
        ("kl_chunk_size", 1),
        ("token_weighting", "uniform"),
        ("weight_span", "sequence"),
        ("weight_normalization", "sum"),
        ("anchor_source", "dataset"),
    ],
)
def test_boundary_values_are_accepted(tmp_path, field, value):
    assert getattr(_config(tmp_path, **{field: value}), field) == value


def test_unknown_loss_type_raises(tmp_path):
    with pytest.raises(ValueError, match="not a TRL 1.16 loss type") as excinfo:
        _config(tmp_path, loss_type=["sigmoid", "dpo_plus"], loss_weights=[1.0, 1.0])
    assert "dpo_plus" in str(excinfo.value)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_trl_loss_type_is_accepted(tmp_path, loss_type):
    smoothing = 0.1 if loss_type == "exo_pair" else 0.0
    assert _config(tmp_path, loss_type=loss_type, label_smoothing=smoothing).loss_type == [loss_type]


def test_tdpo_alpha_with_ipo_raises(tmp_path):
    with pytest.raises(ValueError, match="tdpo_alpha"):
        _config(tmp_path, loss_type="ipo", tdpo_alpha=0.5)


def test_tdpo_alpha_with_ipo_in_a_combination_raises(tmp_path):
    with pytest.raises(ValueError, match="tdpo_alpha"):
        _config(tmp_path, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 1.0], tdpo_alpha=0.5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust"])
def test_tdpo_alpha_with_margin_losses_is_accepted(tmp_path, loss_type):
    assert _config(tmp_path, loss_type=loss_type, tdpo_alpha=0.5).tdpo_alpha == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"use_weighting": True},
        {"ld_alpha": 0.5},
        {"f_divergence_type": "forward_kl"},
        {"f_divergence_type": "js_divergence"},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    ],
)
def test_dpo_options_with_a_token_weighted_form_are_accepted(tmp_path, kwargs):
    config = _config(tmp_path, **kwargs)
    assert all(getattr(config, key) == value for key, value in kwargs.items())


def test_tdpo_alpha_with_an_f_divergence_raises(tmp_path):
    with pytest.raises(ValueError, match="reverse-KL"):
        _config(tmp_path, tdpo_alpha=0.5, f_divergence_type="forward_kl")


def test_tdpo_alpha_with_exo_pair_and_discopop_is_accepted(tmp_path):
    config = _config(tmp_path, loss_type=["exo_pair", "discopop"], loss_weights=[1.0, 1.0], label_smoothing=0.1, tdpo_alpha=0.5)
    assert config.tdpo_alpha == 0.5



def test_defaults_follow_table_b13(tmp_path):
    config = _config(tmp_path)
    assert config.token_weighting == "ti_dpo"
    assert config.importance_lambda == 0.7
    assert config.prior_sigma_ratio == 0.25
    assert config.weight_span == "completion"
    assert config.weight_normalization == "mean"
    assert config.triplet_gamma == 0.1
    assert config.triplet_margin == 0.01
    assert config.anchor_source == "policy"
    assert config.anchor_max_new_tokens == 64
    assert config.anchor_temperature == 0.8
    assert config.anchor_top_k == 50
    assert config.anchor_top_p == 0.95
    assert config.tdpo_alpha == 0.0
    assert config.kl_chunk_size == 64
    # Inherited DPO settings the method relies on.
    assert config.loss_type == ["sigmoid"]
    assert config.beta == 0.1


def test_every_tidpo_field_has_help(tmp_path):
    """TRL convention: every field carries `metadata={"help": ...}` (feeds the CLI parser)."""
    import dataclasses

    from trl import DPOConfig

    dpo_fields = {f.name for f in dataclasses.fields(DPOConfig)}
    own = [f for f in dataclasses.fields(TIDPOConfig) if f.name not in dpo_fields]
    assert {"token_weighting", "importance_lambda", "triplet_gamma", "tdpo_alpha"} <= {f.name for f in own}
    for f in own:
        assert f.metadata.get("help"), f.name


def test_dropout_must_be_off_for_ti_dpo_weights(tmp_path):
    """SPEC §2: weights come from the model with dropout off; the fused attribution shares the training forward."""
    with pytest.raises(ValueError, match="disable_dropout"):
        _config(tmp_path, disable_dropout=False)
    assert _config(tmp_path, disable_dropout=False, token_weighting="uniform").disable_dropout is False


def test_cached_reference_weights_with_sync_ref_model_raise(tmp_path):
    """TRL's `SyncRefModelCallback` moves the reference during training: weights cached from it once would go stale."""
    with pytest.raises(ValueError, match="precompute_token_weights=False"):
        _config(tmp_path, importance_model="reference", precompute_token_weights=True, sync_ref_model=True)


def test_reference_weights_each_step_with_sync_ref_model_are_accepted(tmp_path):
    _config(tmp_path, importance_model="reference", precompute_token_weights=False, sync_ref_model=True)


# ---------------------------------------------------------------- DPOConfig numbers the loss reads (TRL checks none)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("beta", 0.0, "a finite number > 0"),
        ("beta", -0.1, "a finite number > 0"),
        ("beta", float("nan"), "a finite number > 0"),
        ("beta", float("inf"), "a finite number > 0"),
        ("label_smoothing", -0.1, "in [0, 0.5)"),
        ("label_smoothing", 0.5, "in [0, 0.5)"),
        ("discopop_tau", 0.0, "a finite number > 0"),
        ("discopop_tau", -1.0, "a finite number > 0"),
        ("f_alpha_divergence_coef", float("nan"), "a finite number"),
        ("ld_alpha", -0.1, "in [0, 1] or None"),
        ("ld_alpha", 1.5, "in [0, 1] or None"),
        ("max_length", 0, "an integer >= 1 or None"),
        ("max_length", -5, "an integer >= 1 or None"),
        ("precompute_ref_batch_size", 0, "an integer >= 1 or None"),
        ("ref_model_mixup_alpha", 1.2, "in [0, 1]"),
        ("ref_model_mixup_alpha", -0.2, "in [0, 1]"),
        ("ref_model_sync_steps", 0, "an integer >= 1"),
    ],
)
def test_out_of_range_dpo_number_raises_naming_the_field(tmp_path, field, value, allowed):
    with pytest.raises(ValueError) as excinfo:
        _config(tmp_path, **{field: value})
    assert str(excinfo.value).startswith(f"`{field}` must be {allowed}")
    assert repr(value) in str(excinfo.value)


def test_negative_beta_message_says_why(tmp_path):
    with pytest.raises(ValueError, match=r"β < 0 optimises the reversed preference"):
        _config(tmp_path, beta=-0.1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("beta", 1e-4),
        ("label_smoothing", 0.0),
        ("label_smoothing", 0.49),
        ("ld_alpha", 0.0),
        ("ld_alpha", 1.0),
        ("ld_alpha", None),
        ("max_length", 1),
        ("max_length", None),
        ("precompute_ref_batch_size", 1),
        ("ref_model_mixup_alpha", 0.0),
        ("ref_model_mixup_alpha", 1.0),
        ("ref_model_sync_steps", 1),
        ("f_alpha_divergence_coef", 1.0),
    ],
)
def test_dpo_number_boundaries_are_accepted(tmp_path, field, value):
    assert getattr(_config(tmp_path, **{field: value}), field) == value


@pytest.mark.parametrize(
    ("loss_weights", "message"),
    [
        ([1.0, -0.5], r"`loss_weights` must be finite numbers >= 0, got \[1.0, -0.5\]"),
        ([1.0, float("nan")], r"`loss_weights` must be finite numbers >= 0"),
        ([1.0, float("inf")], r"`loss_weights` must be finite numbers >= 0"),
        ([0.0, 0.0], r"`loss_weights` are all 0 \(\[0.0, 0.0\]\): the loss would be 0 with no gradient"),
    ],
)
def test_bad_loss_weights_raise(tmp_path, loss_weights, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=loss_weights)


def test_loss_weights_length_is_left_to_trl(tmp_path):
    """TRL's own clear message for a count that does not match `loss_type`."""
    with pytest.raises(ValueError, match="`loss_weights` must have the same length as `loss_type`"):
        _config(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0])


def test_zero_weight_on_one_loss_is_accepted(tmp_path):
    assert _config(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.0]).loss_weights == [1.0, 0.0]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("f_divergence_type", "kl", r"`f_divergence_type` must be one of \('reverse_kl', 'forward_kl'"),
        ("truncation_mode", "keep_middle", r"`truncation_mode` must be 'keep_start' or 'keep_end' \(deprecated\)"),
    ],
)
def test_unknown_dpo_choice_raises(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **{field: value})


@pytest.mark.parametrize("max_steps", [0, -5, -2, 2.5, True])
def test_max_steps_other_than_minus_one_or_positive_raises(tmp_path, max_steps):
    """transformers trains `num_train_epochs` for any `max_steps <= 0` without a word; the config refuses it."""
    with pytest.raises(ValueError) as excinfo:
        _config(tmp_path, max_steps=max_steps)
    message = str(excinfo.value)
    assert message.startswith("`max_steps` must be -1 (train for `num_train_epochs`) or an integer >= 1")
    assert f"got {max_steps!r}" in message and "Set `max_steps` to a positive number of steps" in message


@pytest.mark.parametrize("max_steps", [-1, 1, 40])
def test_max_steps_minus_one_or_positive_is_accepted(tmp_path, max_steps):
    assert _config(tmp_path, max_steps=max_steps).max_steps == max_steps


def test_anchor_generation_kwargs_are_the_anchor_fields(tmp_path):
    config = _config(tmp_path, anchor_max_new_tokens=7, anchor_temperature=0.5, anchor_top_k=0, anchor_top_p=0.9)
    assert config.anchor_generation_kwargs() == {
        "do_sample": True, "max_new_tokens": 7, "temperature": 0.5, "top_k": 0, "top_p": 0.9,
    }  # fmt: skip


def test_checkpointing_default_is_on_without_a_future_warning(tmp_path):
    """TRL's default (checkpointing on) under transformers' current name: no `gradient_checkpointing` FutureWarning at
    construction. A `gradient_checkpointing` the user passes is still honoured (transformers translates it)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = TIDPOConfig(output_dir=str(tmp_path), use_cpu=True)
    assert config.gradient_checkpointing is True
    assert not [w for w in caught if issubclass(w.category, FutureWarning) and "checkpointing" in str(w.message)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        off = TIDPOConfig(output_dir=str(tmp_path), use_cpu=True, gradient_checkpointing=False)
    assert off.gradient_checkpointing is False


@pytest.mark.parametrize("argv, expected", [([], True), (["--gradient_checkpointing"], True),
                                            (["--gradient_checkpointing", "False"], False)])  # fmt: skip
def test_gradient_checkpointing_flag_parses_as_before(tmp_path, argv, expected):
    """On the command line the re-declared field still reads as TRL's bool did: bare means True."""
    import warnings

    from transformers import HfArgumentParser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        (config,) = HfArgumentParser(TIDPOConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--use_cpu", "True", *argv]
        )
    assert config.gradient_checkpointing is expected
