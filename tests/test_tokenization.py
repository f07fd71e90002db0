"""Tests of `trl_tidpo.modeling.tokenization`: one (prompt, completion) tokenised exactly as TRL's
`DPOTrainer._prepare_dataset` tokenises `chosen`, chat-template arguments included."""

import json

import pytest
from conftest import WORDS
from datasets import Dataset

from trl_tidpo.modeling.tis_dpo import tokenize_preference_dataset
from trl_tidpo.modeling.tokenization import tokenize_completion
from trl_tidpo.tools.demo.tiny_models import build_word_tokenizer

# The test chat template, plus two things it renders only when asked: the tools and a `verbose` template argument
TOOLS_TEMPLATE = (
    "{% if tools %}{% for tool in tools %}{{ tool['name'] }} {% endfor %}{% endif %}"
    "{% if verbose %}please answer {% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> {{ message['content'] }} "
    "{% else %}<|assistant|> {{ message['content'] }}<eos> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
TOOLS = [{"name": "doctor"}, {"name": "water"}]


@pytest.fixture(scope="module")
def tools_tokenizer():
    tokenizer = build_word_tokenizer(WORDS + ["and", "story", "answer"])
    tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


def tools_dataset() -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "what"}]],
            "chosen": [[{"role": "assistant", "content": "hello world"}], [{"role": "assistant", "content": "yes"}]],
            "rejected": [[{"role": "assistant", "content": "bad"}], [{"role": "assistant", "content": "no"}]],
            "tools": [json.dumps(TOOLS), json.dumps(TOOLS[:1])],  # TRL decodes a JSON string
            "chat_template_kwargs": [{"verbose": True}, {"verbose": False}],
        }
    )


def test_tools_and_chat_template_kwargs_tokenise_as_trl(tools_tokenizer):
    """The example's `tools` (a JSON string) and `chat_template_kwargs` reach the chat template as in TRL's own
    `_prepare_dataset`: the prompt and completion ids equal TRL's, and differ from a rendering without them."""
    dataset = tools_dataset()
    trl_rows = tokenize_preference_dataset(dataset, tools_tokenizer)
    for example, trl_row in zip(dataset, trl_rows, strict=True):
        prompt_ids, chosen_ids = tokenize_completion(
            tools_tokenizer, example["prompt"], example["chosen"], example["tools"], example["chat_template_kwargs"]
        )
        assert (prompt_ids, chosen_ids) == (trl_row["prompt_ids"], trl_row["chosen_ids"])
        bare_prompt_ids, _ = tokenize_completion(tools_tokenizer, example["prompt"], example["chosen"])
        assert bare_prompt_ids != prompt_ids  # the tools were rendered: the comparison is not vacuous
    verbose = tools_tokenizer.convert_tokens_to_ids("please")
    assert verbose in trl_rows[0]["prompt_ids"] and verbose not in trl_rows[1]["prompt_ids"]


def test_plain_text_gets_eos_and_no_template(tokenizer):
    prompt_ids, completion_ids = tokenize_completion(tokenizer, "hello", " world")
    assert prompt_ids == tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert completion_ids == tokenizer(" world", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
