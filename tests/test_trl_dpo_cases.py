"""
The intent of TRL's own `DPOTrainer` tests (tests/test_dpo_trainer.py, TRL 1.16), run on both trainers: TRL's
`DPOTrainer` with `DPOConfig`, and `TIDPOTrainer` with `TIDPOConfig(token_weighting="uniform", triplet_gamma=0)`, which
must behave the same. Offline on CPU: a tiny Llama and a word-level tokenizer (conftest) stand in for the hub models
and the `trl-internal-testing/zen` datasets, and each training runs 1-2 steps.

Ported (intent, not code): every loss type trains, evaluates and moves every parameter (`test_train_loss_types`);
multi-loss (MPO), and WPO with LD-DPO and an f-divergence together, train (one run where TRL has one per option: the
one-step parity of each, alone, is in tests/test_dpo_parity.py); gradient checkpointing; float16 `model_init_kwargs`;
per-example `chat_template_kwargs`; a model passed as an instance; an explicit reference stays frozen; `sync_ref_model`
moves the reference; PEFT (a `peft_config`, a `PeftModel`, with gradient checkpointing: base frozen, adapter moves);
the four dataset formats (standard, conversational, implicit prompt), tokenised alike by both; an `IterableDataset` for
training; eval datasets of every shape at init, passed to `evaluate()` (also after training), and during training (a
dict of datasets, `compute_metrics`); pairs whose prompt fills `max_length` dropped
(`test_fully_truncated_completion_examples_dropped`, with TI-DPO's warning); the model tags; the collator's padding,
masks and `pad_to_multiple_of`; and the errors: no or an unsupported train dataset, a streaming one without
`max_steps`, a missing column, a `loss_weights` of the wrong length, an unknown loss type, `ref_model is model`,
`exo_pair` without label smoothing, `router_aux_loss_coef` on a dense model, `sync_ref_model` with PEFT, a LoRA adapter
on `lm_head`.

Skipped, and why:
- every `precompute_ref_log_probs` case (`test_evaluate_with_eval_dataset[...-True]`,
  `test_evaluate_precompute_ref_log_probs_*`, `test_precompute_ref_log_probs_raises_for_iterable_dataset`, the
  collator's `ref_*_logps`): another change covers reference precomputation;
- vision / VLM (`TestDataCollatorForVisionPreference`, `TestDPOTrainerVLM`, `test_train_vlm_gemma_3n`): TI-DPO is
  text-only and refuses image datasets (tests/test_trainer.py);
- Liger (`test_train_with_liger*`, `test_liger_kernel_*`, `test_init_fails_with_*_and_liger`): deprecated in TRL 1.16
  and not installed;
- `test_train_padding_free`: needs flash-attention kernels on a GPU (TRL 1.16 disables `padding_free` anyway; its
  warning is checked in tests/test_dpo_parity.py);
- hub-only cases: `test_trust_remote_code` (a remote-code model on the hub), `test_train_gpt_oss` /
  `test_train_toolcall_data` (hub datasets and a GPT-OSS tokenizer), the model zoo of `test_train`, and
  `test_train_moe_*` on GPT-OSS (a tiny MoE built from a config is covered by tests/test_dpo_parity.py);
- `test_peft_with_quantization` (bitsandbytes 4-bit with float16 compute): QLoRA on CPU is tested on TI-DPO in
  tests/test_training_paths.py, and is not a uniform-parity question.
"""

import logging

import pytest
import torch
from datasets import Dataset, DatasetDict, IterableDatasetDict
from helpers_trainer import CPU_ARGS, clone_params, load
from peft import LoraConfig, get_peft_model
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_tidpo import TIDPOConfig, TIDPOTrainer
from trl_tidpo.modeling.collator import DataCollatorForTIDPO
from trl_tidpo.ops.weighted_losses import LOSS_TYPES

TRAINERS = {
    "DPOTrainer": (DPOTrainer, DPOConfig, {}),
    "TIDPOTrainer": (TIDPOTrainer, TIDPOConfig, {"token_weighting": "uniform", "triplet_gamma": 0.0}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=list(TRAINERS))
def kind(request) -> str:
    return request.param


def make_args(kind: str, tmp_path, **options):
    _, config_class, extra = TRAINERS[kind]
    defaults = {**CPU_ARGS, "max_steps": 1, "learning_rate": 0.1}
    return config_class(output_dir=str(tmp_path / kind), **{**defaults, **extra, **options})


def make_trainer(kind: str, tmp_path, model, train_dataset, tokenizer, options: dict | None = None, **kwargs):
    trainer_class = TRAINERS[kind][0]
    args = make_args(kind, tmp_path, **(options or {}))
    return trainer_class(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, **kwargs)


def assert_all_changed(before: dict, model) -> None:
    for name, param in before.items():
        assert not torch.equal(param, model.get_parameter(name)), f"Parameter {name} has not changed."


def assert_trained(trainer) -> None:
    before = clone_params(trainer.model)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert_all_changed(before, trainer.model)


def assert_lora_trained(trainer, base_names: set) -> None:
    """PEFT: the base model's parameters are unchanged, every adapter parameter moved."""
    before = clone_params(trainer.model)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    adapters = 0
    for name, param in before.items():
        new = trainer.model.get_parameter(name)
        if name in base_names:
            torch.testing.assert_close(param, new, msg=f"Parameter {name} has changed.")
        elif "base_layer" not in name and "lora_" in name and ".ref." not in name:
            adapters += 1
            assert not torch.equal(param, new), f"Parameter {name} has not changed."
    assert adapters > 0


PEFT_OPTIONS = {"learning_rate": 1.0, "max_steps": 2}  # LoRA's B starts at 0: A gets a gradient from step 2


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_train_loss_types(kind, tmp_path, model_dir, tokenizer, standard_dataset, loss_type):
    """Every loss type trains, evaluates during training, and moves every parameter (TRL: test_train_loss_types)."""
    options = {
        "loss_type": loss_type,
        "label_smoothing": 1e-3 if loss_type == "exo_pair" else 0.0,
        "eval_strategy": "steps",
        "eval_steps": 1,
    }
    trainer = make_trainer(
        kind, tmp_path, model_dir, standard_dataset, tokenizer, options, eval_dataset=standard_dataset.select(range(4))
    )
    assert_trained(trainer)
    assert any("eval_loss" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"loss_type": ["sigmoid", "bco_pair", "sft"]}, id="mpo"),
        pytest.param({"use_weighting": True, "ld_alpha": 0.5, "f_divergence_type": "js_divergence"}, id="wpo-ld-js"),
        pytest.param({"gradient_checkpointing": True}, id="gradient_checkpointing"),
    ],
)
def test_train_with_option(kind, tmp_path, model_dir, tokenizer, standard_dataset, options):
    """TRL: test_train_multi_loss_types, _with_wpo, _with_ld, _with_f_divergence, _with_gradient_checkpointing."""
    assert_trained(make_trainer(kind, tmp_path, model_dir, standard_dataset, tokenizer, options))


def test_train_model_instance(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """A model passed as an instance trains (TRL: test_train_model)."""
    assert_trained(make_trainer(kind, tmp_path, load(model_dir), standard_dataset, tokenizer))


def test_train_with_explicit_ref_model(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """The policy moves, the explicit reference does not (TRL: test_train_with_explicit_ref_model)."""
    trainer = make_trainer(kind, tmp_path, model_dir, standard_dataset, tokenizer, ref_model=load(model_dir))
    before = clone_params(trainer.model)
    trainer.train()
    assert_all_changed(before, trainer.model)
    for name, param in before.items():
        torch.testing.assert_close(param, trainer.ref_model.get_parameter(name), msg=f"Reference {name} has changed.")


def test_train_with_sync_ref_model(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """With `sync_ref_model`, the reference moves too (TRL: test_train_with_sync_ref_model)."""
    options = {"sync_ref_model": True, "ref_model_sync_steps": 1, "max_steps": 2}
    trainer = make_trainer(kind, tmp_path, model_dir, standard_dataset, tokenizer, options)
    before_ref = clone_params(trainer.ref_model)
    assert_trained(trainer)
    for name, param in before_ref.items():
        assert not torch.equal(param, trainer.ref_model.get_parameter(name)), f"Reference {name} has not changed."


def test_train_with_iterable_dataset(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """A streaming dataset trains with `max_steps` (TRL: test_train_with_iterable_dataset)."""
    iterable = standard_dataset.to_iterable_dataset()
    assert_trained(make_trainer(kind, tmp_path, model_dir, iterable, tokenizer, {"max_steps": 2}))


def conversational(dataset: Dataset) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in dataset["prompt"]],
            "chosen": [[{"role": "assistant", "content": c.strip()}] for c in dataset["chosen"]],
            "rejected": [[{"role": "assistant", "content": r.strip()}] for r in dataset["rejected"]],
        }
    )


def implicit_prompt(dataset: Dataset) -> Dataset:
    """The prompt folded into both completions (text, or the message lists)."""
    return Dataset.from_dict(
        {
            "chosen": [p + c for p, c in zip(dataset["prompt"], dataset["chosen"])],
            "rejected": [p + r for p, r in zip(dataset["prompt"], dataset["rejected"])],
        }
    )


DATASET_FORMATS = {
    "standard_preference": lambda ds: ds,
    "conversational_preference": conversational,
    "standard_implicit_prompt_preference": implicit_prompt,
    "conversational_implicit_prompt_preference": lambda ds: implicit_prompt(conversational(ds)),
}


@pytest.mark.parametrize("dataset_format", list(DATASET_FORMATS))
def test_train_dataset_format(kind, tmp_path, model_dir, tokenizer, standard_dataset, dataset_format):
    """Each preference dataset format tokenises and trains (TRL: test_train_dataset_format)."""
    dataset = DATASET_FORMATS[dataset_format](standard_dataset)
    trainer = make_trainer(kind, tmp_path, model_dir, dataset, tokenizer)
    assert all(len(row["chosen_ids"]) > 0 and len(row["rejected_ids"]) > 0 for row in trainer.train_dataset)
    assert_trained(trainer)


def test_same_tokenisation_of_every_format(tmp_path, model_dir, tokenizer, standard_dataset):
    """Both trainers tokenise every dataset format into the same prompt/chosen/rejected ids."""
    for dataset_format, convert in DATASET_FORMATS.items():
        dataset = convert(standard_dataset)
        prepared = [make_trainer(kind, tmp_path, model_dir, dataset, tokenizer).train_dataset for kind in TRAINERS]
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert prepared[0][column] == prepared[1][column], (dataset_format, column)


def test_train_model_dtype(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """`model_init_kwargs={"dtype": float16}`: loads, trains and stays in float16 (TRL: test_train_model_dtype)."""
    options = {"model_init_kwargs": {"dtype": torch.float16}}
    trainer = make_trainer(kind, tmp_path, model_dir, standard_dataset, tokenizer, options)
    before = clone_params(trainer.model)
    trainer.train()
    for name, param in before.items():
        new = trainer.model.get_parameter(name)
        assert new.dtype == torch.float16
        if "norm" not in name:  # TRL skips the layer norms here too
            assert not torch.equal(param, new), f"Parameter {name} has not changed."


def test_train_with_chat_template_kwargs(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """Per-example `chat_template_kwargs` reach the chat template (TRL: test_train_with_chat_template_kwargs)."""
    polite = tokenizer.__class__.from_pretrained(model_dir)
    polite.chat_template = polite.chat_template.replace("<|user|> {{", "<|user|> {% if polite %}please {% endif %}{{")
    dataset = conversational(standard_dataset)
    dataset = dataset.add_column("chat_template_kwargs", [{"polite": bool(i % 2)} for i in range(len(dataset))])
    trainer = make_trainer(kind, tmp_path, model_dir, dataset, polite)
    please = polite.convert_tokens_to_ids("please")
    assert [row["prompt_ids"][1] == please for row in trainer.train_dataset.select(range(4))] == [False, True] * 2
    assert_trained(trainer)


# ---------------------------------------------------------------------------------------------------- PEFT


def test_train_with_peft_config(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """A `peft_config`: base frozen, adapter trained (TRL: test_train_dense_with_peft_config_lora)."""
    base_names = {f"base_model.model.{n}" for n, _ in load(model_dir).named_parameters()}
    trainer = make_trainer(
        kind, tmp_path, model_dir, standard_dataset, tokenizer, PEFT_OPTIONS, peft_config=lora_config()
    )
    assert_lora_trained(trainer, base_names)


def test_train_peft_model(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """A `PeftModel` passed in (TRL: test_train_peft_model)."""
    model = load(model_dir)
    base_names = {f"base_model.model.{n}" for n, _ in model.named_parameters()}
    model = get_peft_model(model, lora_config())
    trainer = make_trainer(kind, tmp_path, model, standard_dataset, tokenizer, PEFT_OPTIONS)
    assert_lora_trained(trainer, base_names)


def test_train_with_peft_config_and_gradient_checkpointing(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """TRL: test_train_with_peft_config_and_gradient_checkpointing."""
    base_names = {f"base_model.model.{n}" for n, _ in load(model_dir).named_parameters()}
    options = {**PEFT_OPTIONS, "gradient_checkpointing": True}
    trainer = make_trainer(kind, tmp_path, model_dir, standard_dataset, tokenizer, options, peft_config=lora_config())
    assert_lora_trained(trainer, base_names)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "peft"])
def test_tag_added(kind, tmp_path, model_dir, tokenizer, standard_dataset, peft):
    """TRL: test_tag_added, test_tag_added_peft."""
    trainer = make_trainer(
        kind, tmp_path, model_dir, standard_dataset, tokenizer, peft_config=lora_config() if peft else None
    )
    for tag in ("dpo", "trl"):
        assert tag in trainer.model.model_tags


# ---------------------------------------------------------------------------------------------------- eval datasets


def eval_dataset_of(shape: str, dataset: Dataset):
    split = dataset.to_iterable_dataset() if "iterable" in shape else dataset
    if shape in ("dataset", "iterable_dataset"):
        return split
    if shape in ("dataset_dict", "iterable_dataset_dict"):
        return (IterableDatasetDict if "iterable" in shape else DatasetDict)({"data1": split, "data2": split})
    return {"data1": split, "data2": split}  # dict_of_dataset, dict_of_iterable_dataset


EVAL_SHAPES = ["dataset", "iterable_dataset", "dataset_dict", "iterable_dataset_dict"]
EVAL_SHAPES += ["dict_of_dataset", "dict_of_iterable_dataset"]


@pytest.mark.parametrize("shape", EVAL_SHAPES)
def test_evaluate_with_eval_dataset(kind, tmp_path, model_dir, tokenizer, standard_dataset, shape):
    """`evaluate()` takes an unprepared dataset of any shape (TRL: test_evaluate_with_eval_dataset, no precompute)."""
    trainer = make_trainer(kind, tmp_path, model_dir, standard_dataset, tokenizer)
    metrics = trainer.evaluate(eval_dataset=eval_dataset_of(shape, standard_dataset.select(range(4))))
    keys = ["eval_loss"] if shape in ("dataset", "iterable_dataset") else ["eval_data1_loss", "eval_data2_loss"]
    for key in keys:
        assert metrics[key] > 0


@pytest.mark.parametrize("shape", [*EVAL_SHAPES, "none"])
def test_init_with_eval_dataset(kind, tmp_path, model_dir, tokenizer, standard_dataset, shape):
    """An eval dataset of any shape is tokenised at init, each split on its own (TRL: test_init_with_eval_dataset)."""
    eval_dataset = None if shape == "none" else eval_dataset_of(shape, standard_dataset.select(range(4)))
    trainer = make_trainer(kind, tmp_path, model_dir, standard_dataset, tokenizer, eval_dataset=eval_dataset)
    if shape == "none":
        assert trainer.eval_dataset is None
    elif isinstance(trainer.eval_dataset, dict):
        assert set(trainer.eval_dataset) == {"data1", "data2"}
        for split in trainer.eval_dataset.values():
            assert "prompt_ids" in next(iter(split))
    else:
        assert "prompt_ids" in next(iter(trainer.eval_dataset))


def test_evaluate_after_training(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """A dataset passed to `evaluate()` after training is scored by the trained policy against the frozen reference."""
    trainer = make_trainer(kind, tmp_path, model_dir, standard_dataset, tokenizer, ref_model=load(model_dir))
    eval_split = standard_dataset.select(range(4))
    before = trainer.evaluate(eval_dataset=eval_split)
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    trainer.train()
    after = trainer.evaluate(eval_dataset=eval_split)
    assert after["eval_rewards/margins"] != pytest.approx(0.0, abs=1e-6)


def test_train_with_multiple_eval_datasets(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """TRL: test_train_with_eval, test_train_with_multiple_eval_dataset."""
    split = standard_dataset.select(range(4))
    options = {"eval_strategy": "steps", "eval_steps": 1}
    trainer = make_trainer(
        kind, tmp_path, model_dir, standard_dataset, tokenizer, options, eval_dataset={"data1": split, "data2": split}
    )
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"eval_data1_loss", "eval_data2_loss", "eval_rewards/margins"} <= logged  # TRL's metric keys: no split name


def test_train_with_compute_metrics(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """TRL: test_train_with_compute_metrics."""
    options = {"eval_strategy": "steps", "eval_steps": 1}
    trainer = make_trainer(
        kind, tmp_path, model_dir, standard_dataset, tokenizer, options,
        eval_dataset=standard_dataset.select(range(4)), compute_metrics=lambda _: {"my_metric": 0.123},
    )  # fmt: skip
    with pytest.warns(FutureWarning):  # logits for `compute_metrics` take an extra forward (deprecated in TRL too)
        trainer.train()
    assert any(entry.get("eval_my_metric") == 0.123 for entry in trainer.state.log_history)


# ----------------------------------------------------------------------------------------------- over-long prompts

OVERLONG = Dataset.from_dict(
    {
        "prompt": ["hello", "what should i do about a headache the sky is blue", "why", "tell me a story"],
        "chosen": [" good", " yes", " blue .", " the cat ran ."],
        "rejected": [" bad", " no", " red", " no ."],
    }
)  # with max_length=6, the second prompt (11 tokens) fills it


def test_fully_truncated_pairs_dropped(kind, tmp_path, model_dir, tokenizer):
    """With `keep_start`, a pair whose prompt alone fills `max_length` is dropped while the dataset is prepared (TRL:
    test_fully_truncated_completion_examples_dropped)."""
    trainer = make_trainer(kind, tmp_path, model_dir, OVERLONG, tokenizer, {"max_length": 6})
    assert len(trainer.train_dataset) == 3
    assert trainer.train_dataset["prompt_ids"] == [
        tokenizer(p, add_special_tokens=False)["input_ids"] for p in OVERLONG.select([0, 2, 3])["prompt"]
    ]


def test_fully_truncated_pairs_dropped_with_a_warning(tmp_path, model_dir, tokenizer, caplog):
    """TI-DPO says what TRL drops silently: one warning per dataset naming it, the count and the fix."""
    eval_dataset = {"long": OVERLONG.select([1, 2]), "short": OVERLONG.select([0, 3])}
    with caplog.at_level(logging.WARNING, logger="trl_tidpo.trainer.tidpo_trainer"):
        trainer = make_trainer(
            "TIDPOTrainer", tmp_path, model_dir, OVERLONG, tokenizer, {"max_length": 6}, eval_dataset=eval_dataset
        )
    messages = [r.getMessage() for r in caplog.records if "Dropped" in r.getMessage()]
    assert len(messages) == 2, messages  # train and eval["long"]; nothing about eval["short"]
    assert "Dropped 1 of the 4 pairs of the train dataset" in messages[0]
    assert "Dropped 1 of the 2 pairs of the long dataset" in messages[1]
    assert all("max_length=6" in m and "raise `max_length`" in m for m in messages)
    assert len(trainer.eval_dataset["long"]) == 1 and len(trainer.eval_dataset["short"]) == 2


def test_every_pair_fully_truncated_raises(tmp_path, model_dir, tokenizer):
    """Nothing left to train on is an error, not an empty run."""
    with pytest.raises(ValueError, match=r"Every pair of the train dataset \(1\).*max_length=6"):
        make_trainer("TIDPOTrainer", tmp_path, model_dir, OVERLONG.select([1]), tokenizer, {"max_length": 6})


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("shape", ["dataset", "iterable_dataset", "none", "unsupported_dataset_dict"])
def test_init_with_train_dataset(kind, tmp_path, model_dir, tokenizer, standard_dataset, shape):
    """TRL: test_init_with_train_dataset."""
    train_dataset = {
        "dataset": standard_dataset,
        "iterable_dataset": standard_dataset.to_iterable_dataset(),
        "none": None,
        "unsupported_dataset_dict": DatasetDict({"train": standard_dataset}),
    }[shape]
    if shape == "none":
        with pytest.raises(ValueError, match="`train_dataset` is required"):
            make_trainer(kind, tmp_path, model_dir, train_dataset, tokenizer)
    elif shape == "unsupported_dataset_dict":
        with pytest.raises(TypeError, match="`train_dataset` must be a `Dataset` or `IterableDataset`"):
            make_trainer(kind, tmp_path, model_dir, train_dataset, tokenizer)
    else:
        trainer = make_trainer(kind, tmp_path, model_dir, train_dataset, tokenizer, {"max_steps": 3})
        assert "prompt_ids" in next(iter(trainer.train_dataset))


def test_iterable_dataset_needs_max_steps(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """A streaming dataset has no length: without `max_steps` the trainer refuses to train (transformers' check)."""
    with pytest.raises(ValueError, match="max_steps"):
        make_trainer(kind, tmp_path, model_dir, standard_dataset.to_iterable_dataset(), tokenizer, {"max_steps": -1})


@pytest.mark.parametrize("missing", ["chosen", "rejected"])
def test_missing_column_raises(kind, tmp_path, model_dir, tokenizer, standard_dataset, missing):
    """A dataset without 'chosen' or 'rejected' cannot train: both trainers refuse it at construction (TI-DPO with a
    ValueError naming the column; TRL fails when tokenising)."""
    dataset = standard_dataset.remove_columns(missing)
    expected = (ValueError, f"missing column.*'{missing}'") if kind == "TIDPOTrainer" else (KeyError, missing)
    with pytest.raises(expected[0], match=expected[1]):
        make_trainer(kind, tmp_path, model_dir, dataset, tokenizer)


def test_bad_loss_weights_length_raises(kind, tmp_path):
    with pytest.raises(ValueError, match="`loss_weights` must have the same length as `loss_type`"):
        make_args(kind, tmp_path, loss_type=["sigmoid", "ipo"], loss_weights=[1.0])


def test_unknown_loss_type_raises(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """An unknown loss type never trains: TI-DPO refuses it in the config, TRL at the first loss."""
    if kind == "TIDPOTrainer":
        with pytest.raises(ValueError, match="not a TRL 1.16 loss type"):
            make_args(kind, tmp_path, loss_type="not_a_loss")
        return
    trainer = make_trainer(kind, tmp_path, model_dir, standard_dataset, tokenizer, {"loss_type": "not_a_loss"})
    with pytest.raises(ValueError, match="not_a_loss"):
        trainer.train()


def test_ref_model_is_model_raises(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    model = load(model_dir)
    with pytest.raises(ValueError, match="cannot be the same object"):
        make_trainer(kind, tmp_path, model, standard_dataset, tokenizer, ref_model=model)


def test_exo_pair_without_label_smoothing_raises(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    with pytest.raises(ValueError, match="Label smoothing must be greater than 0.0"):
        make_trainer(kind, tmp_path, model_dir, standard_dataset, tokenizer, {"loss_type": "exo_pair"})


def test_router_aux_loss_coef_on_dense_model_raises(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    with pytest.raises(ValueError, match="not a Mixture-of-Experts model"):
        make_trainer(kind, tmp_path, model_dir, standard_dataset, tokenizer, {"router_aux_loss_coef": 0.01})


def test_sync_ref_model_with_peft_raises(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    with pytest.raises(NotImplementedError, match="sync_ref_model=True"):
        make_trainer(
            kind, tmp_path, model_dir, standard_dataset, tokenizer, {"sync_ref_model": True}, peft_config=lora_config()
        )


def test_lora_on_lm_head_raises(kind, tmp_path, model_dir, tokenizer, standard_dataset):
    """TRL refuses an adapter on `lm_head` (it reads `lm_head.weight` directly), and so must TI-DPO."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="lm_head"):
        make_trainer(kind, tmp_path, model_dir, standard_dataset, tokenizer, peft_config=config)


# ---------------------------------------------------------------------------------------------------- collator

EXAMPLES = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
    {"prompt_ids": [7, 8], "chosen_ids": [9, 10], "rejected_ids": [11, 12, 13]},
]


@pytest.mark.parametrize("collator_class", [DataCollatorForPreference, DataCollatorForTIDPO])
def test_collator_padding_and_masks(collator_class):
    """TRL: TestDataCollatorForPreference.test_padding_and_masks, for TRL's collator and TI-DPO's."""
    result = collator_class(pad_token_id=0)(EXAMPLES)
    assert set(result) == {"input_ids", "attention_mask", "completion_mask"}
    expected_ids = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 8, 11, 12, 13]]
    expected_attention = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    expected_completion = [[0, 0, 0, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1]]
    assert result["input_ids"].tolist() == expected_ids
    assert result["attention_mask"].tolist() == expected_attention
    assert result["completion_mask"].tolist() == expected_completion


@pytest.mark.parametrize("collator_class", [DataCollatorForPreference, DataCollatorForTIDPO])
def test_collator_pad_to_multiple_of(collator_class):
    """TRL: TestDataCollatorForPreference.test_with_pad_to_multiple_of."""
    examples = [
        {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]},
        {"prompt_ids": [4, 5], "chosen_ids": [6, 7], "rejected_ids": [8, 9]},
    ]
    result = collator_class(pad_token_id=0, pad_to_multiple_of=5)(examples)
    assert result["input_ids"].tolist() == [[1, 2, 0, 0, 0], [4, 5, 6, 7, 0], [1, 3, 0, 0, 0], [4, 5, 8, 9, 0]]


def test_default_collators_agree(tmp_path, model_dir, tokenizer, standard_dataset):
    """The trainers' default collators give the same batch for the same prepared rows."""
    dpo, tidpo = (make_trainer(kind, tmp_path, model_dir, standard_dataset, tokenizer) for kind in TRAINERS)
    rows = [dpo.train_dataset[i] for i in range(4)]
    expected, result = dpo.data_collator(rows), tidpo.data_collator(rows)
    assert set(result) == set(expected)
    for key in expected:
        assert torch.equal(result[key], expected[key]), key


def test_fully_truncated_pairs_dropped_from_a_stream_with_a_warning(tmp_path, model_dir, tokenizer, caplog):
    """A streamed dataset cannot be counted ahead: the same pairs as TRL are dropped, with a warning at the first."""
    prepared = {}
    for kind in TRAINERS:
        with caplog.at_level(logging.WARNING, logger="trl_tidpo.trainer.tidpo_trainer"):
            trainer = make_trainer(
                kind, tmp_path, model_dir, OVERLONG.to_iterable_dataset(), tokenizer, {"max_length": 6}
            )
            prepared[kind] = [row["prompt_ids"] for row in trainer.train_dataset]  # the filter runs as rows stream
    assert len(prepared["TIDPOTrainer"]) == 3 and prepared["TIDPOTrainer"] == prepared["DPOTrainer"]
    messages = [r.getMessage() for r in caplog.records if "streamed train dataset" in r.getMessage()]
    assert len(messages) == 1 and "max_length=6" in messages[0] and "raise `max_length`" in messages[0]
