"""
The demo's preference data, built so that the ground truth is known: each pair's chosen and rejected responses
differ in a few **critical tokens** (e.g. "seek medical attention" vs "take painkillers casually"), surrounded by
filler that both responses share and by one random distractor word that differs but carries no preference.

The bundled file `data/critical_pairs.jsonl` is `generate_pairs()` written out (`python -m trl_tidpo.tools.demo.data`);
a test checks that they agree. Critical tokens are stored as character spans of the completion, so any tokenizer
can be scored against them (`critical_token_labels`).
"""

import argparse
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ...modeling.tokenization import tokenize_completion


DATA_FILE = "critical_pairs.jsonl"

# Each topic: prompts, then (good, bad) critical phrases. A pair draws one prompt and one good/bad phrase pairing.
TOPICS: dict[str, dict[str, list]] = {
    "headache": {
        "prompts": ["i have a headache , what should i do ?", "my head hurts a lot , any advice ?"],
        "phrases": [
            ("seek medical attention", "take painkillers casually"),
            ("rest in a dark room", "ignore the pain"),
            ("drink some water", "drink more coffee"),
        ],
    },
    "fever": {
        "prompts": ["my child has a high fever , what now ?", "i feel hot and have a fever , help ?"],
        "phrases": [
            ("call a doctor", "wait and see"),
            ("keep her hydrated", "skip her fluids"),
            ("check the temperature", "guess the temperature"),
        ],
    },
    "burn": {
        "prompts": ["i burned my hand on the stove , what should i do ?", "how do i treat a small burn ?"],
        "phrases": [
            ("cool it under water", "put butter on it"),
            ("cover it loosely", "pop the blisters"),
            ("watch for infection", "scratch the skin"),
        ],
    },
    "money": {
        "prompts": ["how should i save money ?", "i want to start saving , any tips ?"],
        "phrases": [
            ("set a monthly budget", "buy lottery tickets"),
            ("build an emergency fund", "borrow from friends"),
            ("pay off debt first", "ignore your debt"),
        ],
    },
    "password": {
        "prompts": ["how do i keep my accounts safe ?", "what makes a good password ?"],
        "phrases": [
            ("use a password manager", "reuse one password"),
            ("enable two factor login", "share your codes"),
            ("choose long passphrases", "choose your birthday"),
        ],
    },
    "driving": {
        "prompts": ["i feel sleepy while driving , what should i do ?", "how do i drive safely at night ?"],
        "phrases": [
            ("pull over and rest", "speed up to arrive"),
            ("keep a safe distance", "follow very closely"),
            ("wear your seatbelt", "text while driving"),
        ],
    },
    "study": {
        "prompts": ["how can i prepare for my exam ?", "i have a test next week , any advice ?"],
        "phrases": [
            ("review your notes daily", "cram the night before"),
            ("sleep well before", "stay up all night"),
            ("practice old questions", "skip the practice"),
        ],
    },
    "cooking": {
        "prompts": ["how do i cook chicken safely ?", "is my chicken done , how can i tell ?"],
        "phrases": [
            ("use a meat thermometer", "trust the color"),
            ("wash your hands", "reuse the board"),
            ("cook it through", "serve it pink"),
        ],
    },
}

# Filler shared by both responses of a pair (chunks of a few words), and distractors: one per response, drawn
# independently for chosen and rejected, so they differ without saying which response is better.
FILLER_CHUNKS = [
    "i think", "you could", "for now", "if possible", "as usual", "step by step", "at home", "this week",
    "and then", "to be safe", "in general", "most of the time", "right away", "after that", "for a while",
    "when you can", "in my view", "as a rule", "every day", "later on",
]
DISTRACTORS = ["really", "truly", "surely", "clearly", "simply", "basically", "frankly", "totally", "quite", "rather"]


@dataclass
class GeneratorConfig:
    """Sizes of the generated dataset: `num_train` + `num_test` pairs, 2-4 filler chunks per response."""

    num_train: int = 320
    num_test: int = 80
    min_chunks: int = 2
    max_chunks: int = 4
    seed: int = 0


def _completion(words: list[str], critical: range) -> tuple[str, list[list[int]]]:
    """`" " + " ".join(words)` and the character spans `[start, end)` of the words at `critical` indices."""
    text, spans = "", []
    for i, word in enumerate(words):
        text += " "
        if i in critical:
            spans.append([len(text), len(text) + len(word)])
        text += word
    return text, spans


def make_pair(rng: random.Random, topic: str, min_chunks: int = 2, max_chunks: int = 4) -> dict[str, Any]:
    """One preference pair of `topic`: shared filler, a critical phrase at a random place, one distractor each."""
    spec = TOPICS[topic]
    prompt = rng.choice(spec["prompts"])
    good, bad = rng.choice(spec["phrases"])
    chunks = [rng.choice(FILLER_CHUNKS).split() for _ in range(rng.randint(min_chunks, max_chunks))]
    cut = rng.randint(0, len(chunks))  # the critical phrase goes between chunks: start, middle or end
    before = [w for chunk in chunks[:cut] for w in chunk]
    after = [w for chunk in chunks[cut:] for w in chunk]
    # The distractor sits in the filler (same index on both sides), never inside the critical phrase
    slot = rng.randint(0, len(before) + len(after))
    distract_chosen, distract_rejected = rng.sample(DISTRACTORS, 2)

    def response(phrase: str, distractor: str) -> tuple[str, list[list[int]]]:
        filler = before + after
        filler = filler[:slot] + [distractor] + filler[slot:]
        head = len(before) + (1 if slot <= len(before) else 0)  # filler words before the critical phrase
        words = filler[:head] + phrase.split() + filler[head:] + ["."]
        return _completion(words, range(head, head + len(phrase.split())))

    chosen, chosen_spans = response(good, distract_chosen)
    rejected, rejected_spans = response(bad, distract_rejected)
    return {
        "topic": topic,
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_phrase": good,
        "rejected_phrase": bad,
        "chosen_critical": chosen_spans,
        "rejected_critical": rejected_spans,
    }


def generate_pairs(config: GeneratorConfig | None = None) -> list[dict[str, Any]]:
    """
    The demo dataset: `num_train` then `num_test` pairs (field `split`: "train"/"test"), deterministic in `seed`.

    Returns:
        `list[dict]`: rows with `prompt`, `chosen`, `rejected` (completions start with a space), `chosen_critical`
        and `rejected_critical` (character spans `[start, end)` of the critical words), and bookkeeping fields.
    """
    config = config or GeneratorConfig()
    rng = random.Random(config.seed)
    topics = sorted(TOPICS)
    rows = []
    for i in range(config.num_train + config.num_test):
        row = make_pair(rng, topics[i % len(topics)], config.min_chunks, config.max_chunks)
        rows.append({"id": i, "split": "train" if i < config.num_train else "test", **row})
    return rows


def vocabulary(rows: list[dict[str, Any]]) -> list[str]:
    """Every word of the prompts and responses, sorted (the demo's word-level tokenizer is built from it)."""
    words = set()
    for row in rows:
        for key in ("prompt", "chosen", "rejected"):
            words.update(row[key].split())
    return sorted(words)


def load_pairs(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The rows of a demo JSONL file; by default the bundled `critical_pairs.jsonl`."""
    if path is None:
        text = resources.files("trl_tidpo.tools.demo").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def to_conversational(row: dict[str, Any]) -> dict[str, Any]:
    """
    `row` as chat messages (for chat models): the prompt as a user turn, each response (leading space dropped) as an
    assistant turn, critical spans shifted to match.
    """
    out = dict(row, prompt=[{"role": "user", "content": row["prompt"]}])
    for side in ("chosen", "rejected"):
        text = row[side]
        strip = len(text) - len(text.lstrip())
        out[side] = [{"role": "assistant", "content": text[strip:]}]
        out[f"{side}_critical"] = [[start - strip, end - strip] for start, end in row[f"{side}_critical"]]
    return out


def critical_token_labels(tokenizer, prompt: Any, completion: Any, spans: list[list[int]]) -> list[bool]:
    """
    Which completion tokens (as `tokenize_completion` produces them: EOS or the chat template's closing tokens
    included) are critical: a token is critical when its characters overlap a critical span of the completion text
    (for chat messages, of the assistant message's content).

    Raises:
        ValueError: if the tokenizer cannot give character offsets that line up with `tokenize_completion`.

    Returns:
        `list[bool]`, one entry per completion token.
    """
    _, completion_ids = tokenize_completion(tokenizer, prompt, completion)
    if isinstance(prompt, list):  # chat messages: spans are relative to the assistant message's content
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        shift = full.rfind(completion[-1]["content"])
        encoding = tokenizer(text=full, return_offsets_mapping=True, add_special_tokens=False)
    else:
        full = prompt + completion + (tokenizer.eos_token or "")
        shift = len(prompt)
        encoding = tokenizer(text=full, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    if shift < 0 or ids[len(ids) - len(completion_ids) :] != completion_ids:
        raise ValueError(
            "The tokenizer splits the prompt/completion boundary differently when tokenising the whole text; the "
            "critical-token labels cannot be aligned. Start plain-text completions with a space."
        )
    labels = []
    for start, end in offsets[len(ids) - len(completion_ids) :]:
        labels.append(any(start < s_end + shift and s_start + shift < end for s_start, s_end in spans))
    return labels


def write_pairs(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write `rows` as JSONL (one pair per line)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the demo's critical-token preference pairs.")
    parser.add_argument("--out", default=str(Path(__file__).parent / "data" / DATA_FILE))
    args = parser.parse_args(argv)
    write_pairs(args.out, generate_pairs())


if __name__ == "__main__":
    main()
