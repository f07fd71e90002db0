"""
The text benchmark's task (`benchmarks/text_benchmark.py`): verifiable instruction following in the style of IFEval.
Each prompt is a short question about a topic plus ONE constraint that a program checks:

- `lowercase`: the whole response in lowercase letters;
- `end_word`: the response ends with a given word;
- `yes_no`: the response starts with "Yes" or "No";
- `max_words`: at most N words;
- `keyword`: the response contains a given word;
- `no_commas`: no comma anywhere.

Topics come from fixed word lists, drawn with a seeded RNG (nothing is downloaded). Every topic belongs to one split,
so no prompt text (and no topic) is shared between the held-out, dev and train splits. Preference pairs are on-policy:
chosen = a sampled completion that passes the constraint, rejected = one that fails it (`pairs_from_samples`).
"""

import random
import re
from collections.abc import Callable

SYSTEM_PROMPT = "You are a helpful assistant. Answer in one or two sentences."

TOPICS = """
apples bananas bicycles birds books bread bridges butterflies cameras candles cars castles cats cheese chess chocolate
clocks clouds coffee computers cookies cows deserts dogs dolphins dragons elephants farms festivals fire fish flowers
forests frogs gardens glaciers gloves guitars hats honey horses hospitals ice islands jungles kites ladders lakes lamps
libraries lions maps markets mirrors money mountains museums music newspapers oceans owls painting parks penguins
pianos pizza planets poetry rabbits rain rainbows rice rivers robots roses sailing sand schools shoes snow soap soccer
spiders stars storms sugar sunsets swimming tea telescopes tennis tigers tomatoes trains trees tulips umbrellas
villages violins volcanoes walking watches waterfalls whales wind windows winter wolves wool yoga zebras airplanes
ants baking balloons beaches bees boats bottles buses cactus camping canals carpets caves chairs circuses coins
comets cotton crabs dancing diamonds drums eagles eggs engines fences ferries fireworks foxes gold grapes hammers
helmets hiking insects jazz jellyfish kangaroos keys kittens knitting lemons lighthouses magnets maple marbles
meadows milk moons mushrooms noodles oranges orchards pandas paper parrots pencils photography pillows pirates
puzzles quilts radios rockets running salt sculpture seeds sheep skiing snails soup squirrels stamps statues
strawberries submarines sunflowers tents theaters tigers toys tractors tunnels turtles vegetables wagons whistles
""".split()

QUESTIONS = [
    "Write a sentence about {topic}.",
    "Tell me something interesting about {topic}.",
    "Why do people like {topic}?",
    "Describe {topic} to a child.",
    "Give one fact about {topic}.",
    "What is your opinion of {topic}?",
]
YES_NO_QUESTIONS = [
    "Are {topic} important?",
    "Do you like {topic}?",
    "Can {topic} be dangerous?",
    "Are {topic} good for children?",
    "Should everyone learn about {topic}?",
    "Are {topic} expensive?",
]
END_WORDS = "today again together forever home now everywhere outside tonight here".split()
KEYWORDS = "sunshine banana purple ocean whisper river garden silver thunder pencil blanket coffee lantern".split()
MAX_WORDS = (8, 10, 12)


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def check_lowercase(text: str, param=None) -> bool:
    """Some letter, and no uppercase letter."""
    return any(c.isalpha() for c in text) and text == text.lower()


def check_end_word(text: str, param: str) -> bool:
    """The last word (punctuation and quotes ignored, any case) is `param`."""
    words = _words(text)
    return bool(words) and words[-1].lower() == param.lower()


def check_yes_no(text: str, param=None) -> bool:
    """The first word (leading quotes and punctuation ignored) is "Yes" or "No", any case."""
    words = _words(text)
    return bool(words) and words[0].lower() in ("yes", "no")


def check_max_words(text: str, param: int) -> bool:
    """Between 1 and `param` words (a word: a run of letters, digits or apostrophes)."""
    return 1 <= len(_words(text)) <= param


def check_keyword(text: str, param: str) -> bool:
    """`param` appears as a whole word, any case."""
    return re.search(rf"\b{re.escape(param)}\b", text, flags=re.IGNORECASE) is not None


def check_quotes(text: str, param=None) -> bool:
    """The whole response (surrounding whitespace ignored) wrapped in double quotation marks, with something inside."""
    text = text.strip()
    return len(text) > 2 and text[0] in '"“' and text[-1] in '"”' and bool(_words(text))


def check_no_commas(text: str, param=None) -> bool:
    """Some word, and no comma (ASCII or full-width)."""
    return bool(_words(text)) and "," not in text and "，" not in text


# family: (instruction template, checker, parameter choices or None)
FAMILIES: dict[str, tuple[str, Callable[..., bool], tuple | list | None]] = {
    "lowercase": (
        "Your entire response must be in lowercase letters, with no capital letters at all.",
        check_lowercase,
        None,
    ),
    "end_word": ('End your response with the word "{param}".', check_end_word, END_WORDS),
    "yes_no": ('Start your response with "Yes" or "No".', check_yes_no, None),
    "max_words": ("Answer in at most {param} words.", check_max_words, MAX_WORDS),
    "keyword": ('Include the word "{param}" in your response.', check_keyword, KEYWORDS),
    "no_commas": ("Do not use any commas in your response.", check_no_commas, None),
    "quotes": ("Wrap your entire response in double quotation marks.", check_quotes, None),
}


def check(prompt: dict, text: str) -> bool:
    """Whether `text` satisfies `prompt`'s constraint (`prompt` as `make_prompts` builds it)."""
    return FAMILIES[prompt["family"]][1](text, prompt["param"])


def make_prompts(
    num_eval: int,
    num_dev: int,
    num_train: int,
    seed: int = 1234,
    families: list[str] | tuple[str, ...] = tuple(FAMILIES),
) -> tuple[list[dict], list[dict], list[dict]]:
    """
    `(held_out, dev, train)` prompts, the families in turn within each split. The topics are shuffled with `seed` and
    cut into three disjoint blocks in proportion to the split sizes, so no topic (hence no prompt text) is in two
    splits; within a split every prompt text is distinct.

    Returns:
        three lists of `{"question", "family", "param", "instruction", "text"}`, `text` = question + instruction.
    """
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"Unknown families {unknown}; choose from {list(FAMILIES)}.")
    rng = random.Random(seed)
    topics = sorted(set(TOPICS))
    rng.shuffle(topics)
    total = num_eval + num_dev + num_train
    cut1 = round(len(topics) * num_eval / total)
    cut2 = cut1 + max(1, round(len(topics) * num_dev / total)) if num_dev else cut1
    blocks = (topics[:cut1], topics[cut1:cut2], topics[cut2:])
    splits = []
    for block, count in zip(blocks, (num_eval, num_dev, num_train)):
        prompts, seen, tries = [], set(), 0
        while len(prompts) < count:
            tries += 1
            if tries > 50 * count + 100:
                raise ValueError(
                    f"Cannot draw {count} distinct prompts from {len(block)} topics: lower the split size."
                )
            family = families[len(prompts) % len(families)]
            template, _, choices = FAMILIES[family]
            param = rng.choice(choices) if choices else None
            questions = YES_NO_QUESTIONS if family == "yes_no" else QUESTIONS
            question = rng.choice(questions).format(topic=rng.choice(block))
            instruction = template.format(param=param)
            text = f"{question} {instruction}"
            if text in seen:
                continue
            seen.add(text)
            prompts.append(
                {"question": question, "family": family, "param": param, "instruction": instruction, "text": text}
            )
        splits.append(prompts)
    return splits[0], splits[1], splits[2]


def chat_prompt(prompt: dict) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt["text"]}]


def pairs_from_samples(prompts: list[dict], samples: list[list[str]], seed: int = 0) -> tuple[list[dict], dict]:
    """
    On-policy preference pairs: for each prompt, chosen = a sampled completion that passes its constraint and rejected
    = one that fails it, each picked at random (seeded) among the distinct passing / failing samples. A prompt whose
    samples all pass, or all fail, gives no pair; both are counted. Empty samples are dropped first (counted).

    Args:
        prompts: as `make_prompts` returns them.
        samples: per prompt, its sampled completion texts.

    Returns:
        `(pairs, counts)`: pairs as `{**prompt, "prompt", "chosen", "rejected", "pass_rate"}` (conversational, for
        TRL), and `{"prompts", "pairs", "all_pass", "all_fail", "empty_samples", "by_family"}`.
    """
    if len(prompts) != len(samples):
        raise ValueError(f"{len(prompts)} prompts but {len(samples)} sample lists: give one list per prompt.")
    rng = random.Random(seed)
    pairs, counts = (
        [],
        {"prompts": len(prompts), "pairs": 0, "all_pass": 0, "all_fail": 0, "empty_samples": 0, "by_family": {}},
    )
    for prompt, texts in zip(prompts, samples):
        # An empty completion fails every constraint but trains on its EOS alone (TIDPOTrainer refuses it): dropped
        counts["empty_samples"] += sum(not t.strip() for t in texts)
        texts = [t for t in texts if t.strip()]
        verdicts = [check(prompt, t) for t in texts]
        passing = sorted({t for t, ok in zip(texts, verdicts) if ok})
        failing = sorted({t for t, ok in zip(texts, verdicts) if not ok})
        if not failing:
            counts["all_pass"] += 1
            continue
        if not passing:
            counts["all_fail"] += 1
            continue
        pairs.append(
            {
                **prompt,
                "prompt": chat_prompt(prompt),
                "chosen": [{"role": "assistant", "content": rng.choice(passing)}],
                "rejected": [{"role": "assistant", "content": rng.choice(failing)}],
                "pass_rate": sum(verdicts) / len(verdicts),
            }
        )
        counts["by_family"][prompt["family"]] = counts["by_family"].get(prompt["family"], 0) + 1
    counts["pairs"] = len(pairs)
    return pairs, counts


# ---------------------------------------------------------------------------------------------------- model side


def generate(
    model,
    tokenizer,
    prompts: list[dict],
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float | None,
    batch_size: int,
    seed: int = 0,
) -> list[list[tuple[str, bool]]]:
    """
    `samples` completions of each prompt (greedy when `temperature` is None; else plain sampling at that temperature,
    top-k and top-p off), as `(text, ended)`: the text up to the end-of-turn token (stripped), and whether the model
    ended its turn within `max_new_tokens`.
    """
    import torch

    device = next(model.parameters()).device
    texts = [
        tokenizer.apply_chat_template(chat_prompt(p), tokenize=False, add_generation_prompt=True)
        for p in prompts
        for _ in range(samples)
    ]
    kwargs = (
        {"do_sample": False}
        if temperature is None
        else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    )
    out: list[tuple[str, bool]] = []
    torch.manual_seed(seed)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(device)
            generated = model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs
            )
            for row in generated[:, enc["input_ids"].size(1) :].tolist():
                ended = tokenizer.eos_token_id in row
                row = row[: row.index(tokenizer.eos_token_id)] if ended else row
                out.append((tokenizer.decode(row, skip_special_tokens=True).strip(), ended))
    tokenizer.padding_side = side
    model.train(was_training)
    return [out[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def completion_logps(model, tokenizer, rows: list[tuple[list[dict], str]], batch_size: int = 16) -> list[float]:
    """
    `log π(completion | prompt)` summed over the completion's tokens (its closing `<|im_end|>` included), each row
    `(chat prompt, completion text)` tokenised as TRL's DPOTrainer tokenises conversational data.
    """
    from bench_runner import summed_logps

    encoded = []
    for prompt, completion in rows:
        prompt_ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        full = tokenizer.apply_chat_template(
            prompt + [{"role": "assistant", "content": completion}], tokenize=True, return_dict=True
        )["input_ids"]
        start = 0
        while start < min(len(prompt_ids), len(full)) and prompt_ids[start] == full[start]:
            start += 1
        encoded.append((full, start))
    return summed_logps(model, tokenizer.pad_token_id, encoded, batch_size)


def evaluate(model, tokenizer, prompts: list[dict], likelihood_pairs: list[dict], args) -> dict[str, list]:
    """
    Per prompt, greedy `correct` (0/1: the constraint passes), `malformed` (0/1: no end of turn within
    `args.max_new_tokens`) and `text`; per likelihood pair, `gold_logp` = the log-prob margin
    `log π(passing sample) − log π(failing sample)` (the name the shared report reads).
    """
    outputs = generate(
        model,
        tokenizer,
        prompts,
        samples=1,
        max_new_tokens=args.max_new_tokens,
        temperature=None,
        batch_size=args.gen_batch_size,
    )
    texts = [o[0][0] for o in outputs]
    result = {
        "correct": [int(check(p, t)) for p, t in zip(prompts, texts)],
        "malformed": [int(not o[0][1]) for o in outputs],
        "text": texts,
    }
    result["gold_logp"] = likelihood_margins(model, tokenizer, likelihood_pairs)
    return result


def likelihood_margins(model, tokenizer, pairs: list[dict]) -> list[float]:
    """Per pair, `log π(chosen | prompt) − log π(rejected | prompt)` (summed over each completion's tokens)."""
    rows = [(p["prompt"], p[side][0]["content"]) for p in pairs for side in ("chosen", "rejected")]
    logps = completion_logps(model, tokenizer, rows) if rows else []
    return [logps[2 * i] - logps[2 * i + 1] for i in range(len(pairs))]
