import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_tidpo.tools.demo.tiny_models import build_tiny_llama, build_word_tokenizer  # noqa: E402


WORDS = (
    "what should i do about a headache the sky is blue green red rest drink water see doctor take pills now "
    "ignore it please answer yes no maybe why how tell me story cat dog ran fast slow hello world good bad"
).split() + [".", ",", "?", "!"]

PAIRS = [
    ("what should i do about a headache ?", "rest and drink water .", "take pills now !"),
    ("the sky is", "blue .", "green and red and bad ."),
    ("tell me a story", "the cat ran fast .", "no ."),
    ("hello", "hello world , how good !", "bad"),
    ("why is the sky blue ?", "see doctor .", "ignore it please ."),
    ("how", "slow", "fast dog ran ."),
    ("what", "yes", "no maybe"),
    ("please answer", "yes , good answer .", "ignore it"),
]

# Dataset anchors for PAIRS (anchor_source="dataset"), one per pair
ANCHORS = [
    " rest and water now please .",  # longer than its chosen response
    " blue",  # shorter than its chosen response
    " the dog ran .",
    " hello world",
    " see doctor .",
    " slow and fast",
    " yes yes",
    " yes , good .",
]


@pytest.fixture(scope="session")
def tokenizer():
    return build_word_tokenizer(WORDS + ["and", "story", "answer"])


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama and its tokenizer saved to a folder, so trainers can load it by path (offline)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def standard_dataset():
    return Dataset.from_dict(
        {"prompt": [p for p, _, _ in PAIRS], "chosen": [" " + c for _, c, _ in PAIRS], "rejected": [" " + r for _, _, r in PAIRS]}
    )


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def ref_model_dir(tmp_path_factory, tokenizer):
    """A second tiny Llama (another seed), so policy/reference log-ratios and weights differ at step 0."""
    path = tmp_path_factory.mktemp("tiny-llama-ref")
    build_tiny_llama(len(tokenizer), seed=1).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is several times faster than two on a shared 2-core machine, and deterministic.
    Modules that run many tiny trainer steps use it (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def contrastive_model(tokenizer, seed: int, head_offset: int):
    """
    A tiny Llama (`seed`) whose output embedding is redrawn at scale 0.5 from seed `head_offset + seed`, so that the
    contrastive scores of two such models spread out (TIS-DPO's log-ratios past the clamp bounds, cDPO's p_t over
    (0, 1)). In eval mode.
    """
    model = build_tiny_llama(len(tokenizer), seed=seed)
    generator = torch.Generator().manual_seed(head_offset + seed)
    with torch.no_grad():
        model.lm_head.weight.copy_(0.5 * torch.randn(model.lm_head.weight.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def positive(request, tokenizer):
    """π+ of a contrastive-weighting test module: `contrastive_model` of seed 1, the module's `HEAD_SEED_OFFSET`."""
    return contrastive_model(tokenizer, 1, request.module.HEAD_SEED_OFFSET)


@pytest.fixture(scope="module")
def negative(request, tokenizer):
    """π− of a contrastive-weighting test module: `contrastive_model` of seed 2, the module's `HEAD_SEED_OFFSET`."""
    return contrastive_model(tokenizer, 2, request.module.HEAD_SEED_OFFSET)


SYSTEM_PROMPTS = ["please answer good", "ignore it bad"]
# The test tokenizer's template, plus a system role (its content, then the conversation)
SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}<|user|> {{ message['content'] }} "
    "{% else %}<|assistant|> {{ message['content'] }}<eos> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
CHAT_PAIRS = [("hello", "hello world", "bad"), ("what", "yes", "no maybe"), ("how", "slow", "fast dog ran")]


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The `tokenizer` fixture's vocabulary and `SYSTEM_TEMPLATE` (for the prompt-based contrastive variant)."""
    tokenizer = build_word_tokenizer(WORDS + ["and", "story", "answer"])
    tokenizer.chat_template = SYSTEM_TEMPLATE
    return tokenizer


def chat_dataset(pairs=CHAT_PAIRS) -> Dataset:
    """Conversational preference rows of `(prompt, chosen, rejected)` texts."""
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p, _, _ in pairs],
            "chosen": [[{"role": "assistant", "content": c}] for _, c, _ in pairs],
            "rejected": [[{"role": "assistant", "content": r}] for _, _, r in pairs],
        }
    )
