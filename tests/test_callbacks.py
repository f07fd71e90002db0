import pytest

from trl_tidpo import TIDPOConfig, TIDPOTrainer
from trl_tidpo.modeling.tokenization import tokenize_completion
from trl_tidpo.tools.callbacks import TokenImportanceCallback, markdown_table
from trl_tidpo.tools.visualize import PairView, TokenRow


def _args(tmp_path, **kwargs):
    return TIDPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        triplet_gamma=0.0,
        disable_tqdm=True,
        **kwargs,
    )


def test_renders_the_pairs_at_each_evaluation(model_dir, tokenizer, standard_dataset, tmp_path):
    examples = [{"prompt": "what should i do about a headache ?", "chosen": " rest .", "rejected": " <script> now !"}]
    callback = TokenImportanceCallback(examples)
    trainer = TIDPOTrainer(
        model=model_dir,
        args=_args(tmp_path),
        train_dataset=standard_dataset,
        eval_dataset=standard_dataset.select(range(4)),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    assert [p.name for p in callback.written] == ["step-000001.html", "step-000002.html"]
    page = callback.written[-1].read_text()
    assert "TI-DPO token weights at step 2" in page
    expected = sum(len(tokenize_completion(tokenizer, examples[0]["prompt"], examples[0][side])[1]) for side in ("chosen", "rejected"))
    assert page.count('<span class="tok') == expected  # one shaded span per completion token
    assert "<script>" not in page


def test_every_n_steps_renders_during_training(model_dir, tokenizer, standard_dataset, tmp_path):
    callback = TokenImportanceCallback([{"prompt": "hello", "chosen": " world", "rejected": " bad"}], every_n_steps=1)
    args = _args(tmp_path)
    args.eval_strategy = "no"
    trainer = TIDPOTrainer(
        model=model_dir, args=args, train_dataset=standard_dataset, processing_class=tokenizer, callbacks=[callback]
    )
    trainer.train()
    assert len(callback.written) == 2


def test_weight_options_come_from_the_config_unless_given(tmp_path):
    args = _args(tmp_path, importance_lambda=0.2, weight_span="sequence")
    options = TokenImportanceCallback([{"prompt": "a", "chosen": "b", "rejected": "c"}])._weight_options(args)
    assert options == {
        "importance_lambda": 0.2,
        "prior_sigma_ratio": 0.25,
        "weight_span": "sequence",
        "weight_normalization": "mean",
    }
    override = TokenImportanceCallback([{"prompt": "a", "chosen": "b", "rejected": "c"}], importance_lambda=1.0)
    assert override._weight_options(args)["importance_lambda"] == 1.0


def test_rejects_bad_examples_and_options():
    with pytest.raises(ValueError, match="is empty"):
        TokenImportanceCallback([])
    with pytest.raises(ValueError, match=r"`examples\[0\]` is missing \['rejected'\]"):
        TokenImportanceCallback([{"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match="every_n_steps"):
        TokenImportanceCallback([{"prompt": "a", "chosen": "b", "rejected": "c"}], every_n_steps=0)
    with pytest.raises(ValueError, match="Unknown weight option"):
        TokenImportanceCallback([{"prompt": "a", "chosen": "b", "rejected": "c"}], beta=0.1)


def test_markdown_table_escapes_and_bolds_the_top_weights():
    row = TokenRow(["a|b", "<i>", "c", "d", "e"], [0.5, 3.0, 0.5, 0.5, 0.5])
    text = markdown_table([PairView(prompt="p", chosen=row, rejected=row, title="t")])
    assert "**&lt;i&gt; (3.00)**" in text and "a&#124;b (0.50)" in text and "<i>" not in text


def test_pages_leave_special_tokens_out_of_the_colour_scale(model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    callback = TokenImportanceCallback([{"prompt": "hello", "chosen": " world", "rejected": " bad"}])
    pair = callback._pair_view(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, 0, callback.examples[0], {})
    # Plain text: EOS is appended, and it is the only special token of each completion
    assert pair.chosen.special[-1] and pair.rejected.special[-1]
    assert not any(pair.chosen.special[:-1]) and not any(pair.rejected.special[:-1])
