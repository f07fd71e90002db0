"""
The SmolLM2 benchmark's task (`benchmarks/real_model.py`): arithmetic questions whose answers a program checks, split
into held-out, dev and train prompts (swapped-operand twins never in two splits), the chat prompt and the answer
prefix, on-policy preference pairs sampled from the start model, and the evaluation (greedy accuracy, malformed
answers, the gold answer's log-probability).

Two readings of an answer: the greedy evaluation is *strict* (`read_answer`: an integer, then the end or a full stop no
digit follows; " 91.4" and " 15 + 49" are malformed), the pair sampler *loose* (`LEADING_NUMBER`: the integer a sample
starts with, so " 91.4" gives a rejected answer 91).
"""

import random
import re
import statistics
import sys

import torch
from bench_runner import summed_logps
from tqdm.auto import tqdm

SYSTEM_PROMPT = "Answer with one number."
ANSWER_PREFIX = "The answer is"  # the assistant turn starts with it, so an answer is a few tokens
LEADING_NUMBER = re.compile(r" (-?\d+)(?!\d)")  # loose: a sampled answer's leading integer (the pairs)
QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
# The families: the benchmark's two, and one neither benchmark trains on (to re-check a shipped option)
FAMILIES = {
    "addition": lambda: [(f"What is {a} + {b}?", a + b) for a in range(10, 50) for b in range(10, 50)],
    "multiplication": lambda: [(f"What is {a} * {b}?", a * b) for a in range(2, 70) for b in range(2, 10)],
    "subtraction": lambda: [(f"What is {a} - {b}?", a - b) for a in range(20, 100) for b in range(10, 20) if a > b],
}


def twin_key(question: str) -> tuple:
    """
    The key two questions share when one is the other with its operands swapped (`23 + 41` and `41 + 23`, `7 * 3`
    and `3 * 7`): same answer, nearly the same tokens, so they must not sit in two splits. Subtraction has no twin.
    """
    a, op, b = QUESTION.fullmatch(question).groups()
    a, b = int(a), int(b)
    return (op, min(a, b), max(a, b)) if op in "+*" else (op, a, b)


def make_problems(
    num_train: int,
    num_eval: int,
    seed: int = 1234,
    num_dev: int = 0,
    families=("addition", "multiplication"),
    train_seed: int | str | None = None,
) -> tuple[list[dict], ...]:
    """
    `(train, held_out)`, or `(train, dev, held_out)` with `num_dev`: the families in turn, every distinct problem drawn
    without replacement, held-out first, then dev (both fixed by `seed`), then train: from what is left, drawn with
    `train_seed` when given (each training seed its own draw; `seed` otherwise). A question and its swapped-operand
    twin (`twin_key`) never sit in two splits: drawing one removes the other from the pool.
    """
    rng = random.Random(seed)
    pools = {}
    for family in families:
        pools[family] = FAMILIES[family]()
        rng.shuffle(pools[family])
    used: set[tuple] = set()
    splits: dict[str, list[dict]] = {"eval": [], "dev": [], "train": []}
    for split, count in (("eval", num_eval), ("dev", num_dev), ("train", num_train)):
        if split == "train" and train_seed is not None:
            draw = random.Random(train_seed)
            for family in families:
                pools[family] = sorted(pools[family])
                draw.shuffle(pools[family])
        for i in range(count):
            family = families[i % len(families)]
            while pools[family] and twin_key(pools[family][-1][0]) in used:
                pools[family].pop()  # the twin of a question already drawn
            if not pools[family]:
                raise ValueError(f"Not enough distinct {family} problems for {num_train} + {num_dev} + {num_eval}.")
            question, answer = pools[family].pop()
            used.add(twin_key(question))
            splits[split].append({"question": question, "answer": answer, "family": family})
    if num_dev:
        return splits["train"], splits["dev"], splits["eval"]
    return splits["train"], splits["eval"]


def chat_prompt(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def generation_text(tokenizer, question: str) -> str:
    """The prompt as the model sees it when answering: chat template, then the start of the assistant turn."""
    return (
        tokenizer.apply_chat_template(chat_prompt(question), tokenize=False, add_generation_prompt=True)
        + ANSWER_PREFIX
    )


def parse_answer(text: str) -> int | None:
    """The first integer of a generated answer (after the prefix), or None."""
    match = re.search(r"-?\d+", text)
    return int(match.group()) if match else None


@torch.no_grad()
def generate(
    model,
    tokenizer,
    questions: list[str],
    *,
    samples: int,
    max_new_tokens: int,
    sample: bool,
    batch_size: int,
    desc: str,
    seed: int = 0,
) -> list[list[tuple[str, bool]]]:
    """
    `samples` continuations of each question's prompt (greedy when `sample` is False), as `(text, ended)`: the text up
    to the end-of-turn token, and whether the model ended its turn within `max_new_tokens`.
    """
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    texts = [generation_text(tokenizer, q) for q in questions for _ in range(samples)]
    out: list[tuple[str, bool]] = []
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    for i in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False, file=sys.stdout):
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(
            device
        )
        kwargs = {"do_sample": True, "temperature": 0.8, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
        generated = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
        for row in generated[:, enc["input_ids"].size(1) :].tolist():
            ended = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if ended else row
            out.append((tokenizer.decode(row, skip_special_tokens=True), ended))
    tokenizer.padding_side = "right"
    model.train(was_training)
    return [out[i * samples : (i + 1) * samples] for i in range(len(questions))]


def completion_ids(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    """Prompt and completion token ids as TRL's DPOTrainer tokenises conversational data."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    return prompt_ids[:start], full_ids[start:]


def sample_answers(model, tokenizer, problems: list[dict], args, desc: str, seed: int) -> list[list[str]]:
    """`args.samples` answers per problem sampled from the model (temperature 0.8, top-k and top-p off; `seed`)."""
    answers = generate(
        model,
        tokenizer,
        [p["question"] for p in problems],
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        sample=True,
        batch_size=args.gen_batch_size,
        desc=desc,
        seed=seed,
    )
    return [[text for text, _ in samples] for samples in answers]


def pairs_from_samples(tokenizer, problems: list[dict], samples: list[list[str]]) -> list[dict]:
    """
    Preference pairs: rejected = the model's own most frequent wrong answer among its samples, chosen = the gold
    answer. A sample's answer is read *loosely* (`LEADING_NUMBER`: the integer it starts with, whatever follows, so
    " 91.4" counts as 91 and " 15 + 49" as 15; samples that start otherwise are dropped), unlike the greedy evaluation's
    strict `read_answer`; both are written as
    "The answer is N." (the words the model itself uses after the prefix). Prompts whose samples hold no wrong
    answer give no pair. Each pair records its critical token: the first completion token where the two diverge.
    """
    pairs = []
    for problem, texts in zip(problems, samples):
        numbers = [int(m.group(1)) for text in texts if (m := LEADING_NUMBER.match(text))]
        wrong = [n for n in numbers if n != problem["answer"]]
        if not wrong:
            continue
        prompt = chat_prompt(problem["question"])
        chosen = [{"role": "assistant", "content": f"{ANSWER_PREFIX} {problem['answer']}."}]
        rejected = [{"role": "assistant", "content": f"{ANSWER_PREFIX} {max(set(wrong), key=wrong.count)}."}]
        _, chosen_ids = completion_ids(tokenizer, prompt, chosen)
        _, rejected_ids = completion_ids(tokenizer, prompt, rejected)
        critical = next(i for i, (a, b) in enumerate(zip(chosen_ids, rejected_ids)) if a != b)
        pairs.append(
            {
                **problem,
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "critical": critical,
                "chosen_len": len(chosen_ids),
                "rejected_len": len(rejected_ids),
                "num_correct": len(numbers) - len(wrong),
                "num_wellformed": len(numbers),
            }
        )
    return pairs


# Strict: a well-formed greedy answer: an integer, then the end or a full stop that no digit follows (" 91.4" is not 91, nor
# " 15 + 49" 15)
WELLFORMED_ANSWER = re.compile(r" (-?\d+)(?:\.(?!\d)|$)")


def read_answer(text: str) -> int | None:
    """The integer a greedy answer (the text after "The answer is") gives, or None when it is malformed."""
    match = WELLFORMED_ANSWER.match(text)
    return int(match.group(1)) if match else None


def greedy_answers(model, tokenizer, problems: list[dict], args, desc: str) -> dict[str, list]:
    """
    Greedy answers to `problems`: per problem, `correct` (0/1), `malformed` (0/1: no well-formed integer) and the
    `text`. `correct` is the headline metric.
    """
    outputs = generate(
        model,
        tokenizer,
        [p["question"] for p in problems],
        samples=1,
        max_new_tokens=args.max_new_tokens,
        sample=False,
        batch_size=args.gen_batch_size,
        desc=desc,
    )
    texts = [out[0][0] for out in outputs]
    values = [read_answer(text) for text in texts]
    return {
        "correct": [int(v == p["answer"]) for v, p in zip(values, problems)],
        "malformed": [int(v is None) for v in values],
        "text": texts,
    }


def gold_logps(model, tokenizer, problems: list[dict], batch_size: int = 32) -> list[float]:
    """Per problem, `log π("The answer is N." + closing tokens | prompt)` of the gold answer N, summed over tokens."""
    rows = []
    for p in problems:
        completion = [{"role": "assistant", "content": f"{ANSWER_PREFIX} {p['answer']}."}]
        prompt_ids, comp_ids = completion_ids(tokenizer, chat_prompt(p["question"]), completion)
        rows.append((prompt_ids + comp_ids, len(prompt_ids)))
    return summed_logps(model, tokenizer.pad_token_id, rows, batch_size)


def evaluate(model, tokenizer, problems: list[dict], args, desc: str) -> dict[str, list]:
    """Greedy answers and gold-answer log-probs of `problems`, one entry per problem."""
    result = greedy_answers(model, tokenizer, problems, args, desc)
    result["gold_logp"] = gold_logps(model, tokenizer, problems)
    return result


def summarize_evaluation(evaluation: dict[str, list], problems: list[dict]) -> dict[str, float]:
    """Accuracy, malformed share and mean gold log-prob, overall and per family."""
    out = {
        "accuracy": statistics.mean(evaluation["correct"]),
        "malformed": statistics.mean(evaluation["malformed"]),
        "gold_logp": statistics.mean(evaluation["gold_logp"]),
    }
    for family in sorted({p["family"] for p in problems}):
        index = [i for i, p in enumerate(problems) if p["family"] == family]
        out[f"accuracy/{family}"] = statistics.mean(evaluation["correct"][i] for i in index)
    return out
