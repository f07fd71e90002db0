"""Tests of `trl_tidpo.modeling.anchors`: policy anchor sampling (its generation settings and EOS ids) and the
tokenisation of a dataset `anchor` column."""

import pytest
import torch
from conftest import WORDS
from helpers_trainer import CPU_ARGS, first_batch, load
from test_tokenization import TOOLS_TEMPLATE, tools_dataset
from transformers import GenerationConfig

from trl_tidpo import TIDPOConfig, TIDPOTrainer
from trl_tidpo.modeling.anchors import anchor_eos_token_ids, sample_policy_anchors, tokenize_anchor
from trl_tidpo.modeling.tis_dpo import tokenize_preference_dataset
from trl_tidpo.tools.demo.tiny_models import build_word_tokenizer

SAMPLING = {"do_sample": True, "max_new_tokens": 8, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def left_padded_prompts(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def sample(model, tokenizer, ids, mask, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return sample_policy_anchors(
        model,
        ids,
        mask,
        SAMPLING,
        eos_token_id=anchor_eos_token_ids(model.generation_config, tokenizer.eos_token_id),
        pad_token_id=tokenizer.pad_token_id,
    )


@pytest.mark.parametrize("settings", [{"repetition_penalty": 5.0}, {"no_repeat_ngram_size": 1}])
def test_model_generation_settings_do_not_change_anchors(model_dir, tokenizer, settings):
    """Anchors are sampled with the anchor settings alone: a checkpoint's own generation settings (here a strong
    repetition penalty, a no-repeat n-gram size) leave the anchors of a seed unchanged."""
    ids, mask = left_padded_prompts(tokenizer, ["what should i do about a headache ?", "hello", "tell me a story"])
    plain = load(model_dir).eval()
    tuned = load(model_dir).eval()
    for name, value in settings.items():
        setattr(tuned.generation_config, name, value)
    expected = sample(plain, tokenizer, ids, mask)
    got = sample(tuned, tokenizer, ids, mask)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert tuned.generation_config.to_dict() != plain.generation_config.to_dict()  # restored after sampling
    for name, value in settings.items():
        assert getattr(tuned.generation_config, name) == value


def test_anchor_eos_ids_keep_the_model_list_and_add_the_tokenizer_eos():
    assert anchor_eos_token_ids(GenerationConfig(eos_token_id=[7, 3]), 3) == [7, 3]
    assert anchor_eos_token_ids(GenerationConfig(eos_token_id=7), 3) == [7, 3]
    assert anchor_eos_token_ids(GenerationConfig(), 3) == [3]


def test_policy_anchors_stop_at_any_of_the_model_eos_ids(tmp_path, model_dir, tokenizer, standard_dataset):
    """
    A model whose generation config lists two EOS ids: each anchor stops at the first of either. The second id is the
    token the first anchor starts with (found by a first draw), so with the same seed that anchor must stop after one
    token, and every anchor must be the first draw's cut after its first token among the two ids.
    """
    trainer = TIDPOTrainer(
        model=model_dir,
        args=TIDPOConfig(output_dir=str(tmp_path), **CPU_ARGS, anchor_source="policy", anchor_max_new_tokens=8),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    eos = tokenizer.eos_token_id
    trainer.model.generation_config.eos_token_id = eos

    def anchors() -> list[list[int]]:
        torch.manual_seed(0)
        rows = trainer._sample_policy_anchors(trainer.model, batch)
        return [ids[mask.bool()].tolist() for ids, mask in zip(rows.input_ids, rows.completion_mask, strict=True)]

    first = anchors()
    other_eos = first[0][0]
    assert other_eos not in (eos, tokenizer.pad_token_id)
    trainer.model.generation_config.eos_token_id = [other_eos, eos]
    second = anchors()

    assert second[0] == [other_eos]
    for row, (before, after) in enumerate(zip(first, second, strict=True)):
        stops = [k for k, token in enumerate(before) if token in (other_eos, eos)]
        assert after == (before[: stops[0] + 1] if stops else before), row


def test_dataset_anchor_tokenises_with_the_example_tools_and_template_kwargs():
    """An anchor equal to `chosen` gets exactly TRL's `chosen_ids` when the chat template renders the example's `tools`
    and `chat_template_kwargs` (both shift the prompt, so leaving them out would misalign the anchor)."""
    tokenizer = build_word_tokenizer(WORDS + ["and", "story", "answer"])
    tokenizer.chat_template = TOOLS_TEMPLATE
    rows = tokenize_preference_dataset(tools_dataset(), tokenizer)
    for index, row in enumerate(rows):
        example = {**row, "anchor": row["chosen"]}
        assert tokenize_anchor(example, index, tokenizer, implicit_prompt=False) == {"anchor_ids": row["chosen_ids"]}


def test_dataset_anchor_whose_prompt_tokens_differ_raises_naming_the_row(tokenizer):
    """`hello` + `world` (no space) tokenises as one unknown word: the anchor's row does not start with the example's
    `prompt_ids`, so it would be scored after another context than the pair. Raise, naming the row."""
    example = {"prompt": "hello", "anchor": "world", "prompt_ids": tokenizer("hello")["input_ids"]}
    with pytest.raises(ValueError, match="Row 5: the anchor's tokenised row does not start with the example's prompt"):
        tokenize_anchor(example, 5, tokenizer, implicit_prompt=False)
    assert tokenize_anchor({**example, "anchor": " world"}, 5, tokenizer, implicit_prompt=False) == {
        "anchor_ids": tokenizer(" world")["input_ids"] + [tokenizer.eos_token_id]
    }


def test_policy_anchor_generation_stops_at_the_longest_completion_with_the_same_losses(
    tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset
):
    """
    The triplet distances read an anchor only where it overlaps the chosen/rejected completions, so generation is
    capped at the batch's longest completion: fewer tokens are generated, and with the same seed the loss and the
    triplet distances are those of an uncapped sampling (`anchor_max_new_tokens=32`, completions of at most 7 tokens).
    """
    trainer = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir),  # another model: the log-ratios, and so the distances, are not 0
        args=TIDPOConfig(output_dir=str(tmp_path), **CPU_ARGS, anchor_source="policy", anchor_max_new_tokens=32),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    longest = int(batch["completion_mask"].sum(dim=-1).max())
    assert longest < 32
    generated, samples = [], []
    generate = trainer.model.generate

    def counting_generate(*args, **kwargs):
        sequences = generate(*args, **kwargs)
        generated.append(sequences.size(1) - kwargs["input_ids"].size(1))
        samples.append(sequences)
        return sequences

    trainer.model.generate = counting_generate
    trainer.model.train()

    def step(cap: bool):
        torch.manual_seed(0)
        if not cap:  # what an uncapped sampling does: `anchor_max_new_tokens` only
            trainer._longest_completion = lambda inputs: 10**6
        policy, parts = trainer._loss_parts(trainer.model, batch)
        trainer.__dict__.pop("_longest_completion", None)
        loss = (parts.dpo_losses + trainer.args.triplet_gamma * parts.triplet.loss).detach()
        return loss, parts.triplet.dist_pos.detach(), parts.triplet.dist_neg.detach()

    capped, uncapped = step(cap=True), step(cap=False)
    assert generated == [longest, 32]  # the tiny random policy rarely samples EOS: uncapped runs to the limit
    assert torch.equal(samples[0], samples[1][:, : samples[0].size(1)])  # the same tokens, exactly, up to the cap
    for got, expected in zip(capped, uncapped, strict=True):
        # float32 rounding only: the anchor rows' width changes the forward's reduction order (measured: <= 5e-7)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (capped[1] > 0).all()  # the anchors overlap the completions: the distances are not trivially 0
