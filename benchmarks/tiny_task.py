"""
The tiny arithmetic benchmark's task and model (`benchmarks/tiny_arithmetic.py`): two-digit addition with carries,
one token per digit ("4 7 + 3 8 =" → " 8 5"), SFT data that teaches a systematic mistake (carries dropped), a word-level tokenizer of digits and symbols, a tiny Llama trained from
scratch (plain PyTorch SFT), greedy exact-match accuracy, the gold answer's log-probability, and on-policy preference
pairs sampled from the SFT model.

Every prompt has the same length (6 tokens), so batched generation needs no padding.
"""

import random
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trl_tidpo.tools.demo.tiny_models import build_tiny_llama, build_word_tokenizer

WORDS = [str(d) for d in range(10)] + ["+", "="]
MAX_ANSWER_DIGITS = 3  # 99 + 99 = 198


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        """`"4 7 + 3 8 ="`: one token per digit (the tokenizer splits on whitespace)."""
        return f"{spaced(self.a)} + {spaced(self.b)} ="

    @property
    def answer(self) -> str:
        """The gold completion, `" 8 5"` (TRL appends the EOS)."""
        return " " + spaced(self.a + self.b)

    @property
    def carries(self) -> bool:
        """Whether the sum has a carry (units into tens, or tens into hundreds)."""
        return self.a % 10 + self.b % 10 >= 10 or self.a // 10 + self.b // 10 >= 10

    @property
    def carry_dropped(self) -> str:
        """
        The systematic mistake the SFT data teaches: every carry forgotten, digit by digit modulo 10 (`29 + 53 → " 7 2"`,
        `74 + 51 → " 2 5"`). It differs from the gold answer at its first token whenever the sum carries.
        """
        return f" {(self.a // 10 + self.b // 10) % 10} {(self.a + self.b) % 10}"


def spaced(number: int) -> str:
    return " ".join(str(number))


def build_tokenizer():
    return build_word_tokenizer(WORDS)


def build_model(tokenizer, hidden_size: int, num_layers: int, seed: int):
    return build_tiny_llama(
        len(tokenizer),
        hidden_size=hidden_size,
        num_layers=num_layers,
        seed=seed,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def make_splits(sizes: dict[str, int], seed: int) -> dict[str, list[Problem]]:
    """
    Disjoint splits of the 8,100 problems `a + b` with `a, b` in 10..99, drawn in the order of `sizes` (e.g. held-out,
    dev, then `"sft": -1` for every problem left), so no problem is in two splits.
    """
    problems = [Problem(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(problems)
    splits, start = {}, 0
    for name, size in sizes.items():
        end = len(problems) if size < 0 else start + size
        if end > len(problems):
            raise ValueError(f"The splits {sizes} need more than the {len(problems)} distinct problems.")
        splits[name] = problems[start:end]
        start = end
    return splits


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def sequences(tokenizer, problems: list[Problem], completions: list[str] | None = None):
    """
    Right-padded `prompt + completion + EOS` ids as TRL tokenises non-chat data, and the mask of the completion tokens
    (EOS included): `input_ids [N, T]`, `completion_mask [N, T]`.
    """
    completions = completions if completions is not None else [p.answer for p in problems]
    prompts = encode(tokenizer, [p.prompt for p in problems])
    answers = [ids + [tokenizer.eos_token_id] for ids in encode(tokenizer, completions)]
    length = max(len(p) + len(a) for p, a in zip(prompts, answers))
    input_ids = torch.full((len(problems), length), tokenizer.pad_token_id)
    completion_mask = torch.zeros(len(problems), length, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        input_ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        completion_mask[i, len(p) : len(p) + len(a)] = 1
    return input_ids, completion_mask


def completion_logps(model, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the completion tokens' log-probs, `[N]` (right padding needs no attention mask for causal scoring)."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    logps = torch.gather(F.log_softmax(logits, -1), 2, input_ids[:, 1:, None]).squeeze(-1)
    return (logps * completion_mask[:, 1:]).sum(-1)


def sft_completions(problems: list[Problem], carry_drop_rate: float, seed: int) -> list[str]:
    """
    The SFT targets: the gold answer, except that a problem with a carry is answered with its carries dropped
    (`Problem.carry_dropped`) with probability `carry_drop_rate` (one draw per problem, seeded). A systematic, checkable
    mistake for preference training to remove; its first wrong digit (the first token) is the decisive token.
    """
    rng = random.Random(seed)
    return [p.carry_dropped if p.carries and rng.random() < carry_drop_rate else p.answer for p in problems]


def sft(
    model,
    tokenizer,
    problems: list[Problem],
    completions: list[str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> list[float]:
    """
    Supervised training from scratch on `problems` and their `completions` (loss on the completion and EOS): AdamW,
    linear warm-up over 5 % of the steps then cosine decay, batches drawn with a seeded generator. Returns the loss per
    step.
    """
    input_ids, completion_mask = sequences(tokenizer, problems, completions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()),
    )
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(problems), (batch_size,), generator=generator)
        ids, mask = input_ids[rows], completion_mask[rows]
        loss = -completion_logps(model, ids, mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def generate(
    model, tokenizer, problems: list[Problem], *, temperature: float | None, seed: int = 0
) -> list[list[int]]:
    """
    One continuation per problem (greedy when `temperature` is None), up to `MAX_ANSWER_DIGITS + 1` tokens, without KV
    cache (the sequences are 10 tokens); each is cut after its first EOS. All prompts have the same length.
    """
    was_training = model.training
    model.eval()
    ids = torch.tensor(encode(tokenizer, [p.prompt for p in problems]))
    start = ids.size(1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(MAX_ANSWER_DIGITS + 1):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
        if temperature is None:
            token = logits.argmax(-1)
        else:
            token = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator).squeeze(-1)
        ids = torch.cat([ids, token[:, None]], 1)
    model.train(was_training)
    out = []
    for row in ids[:, start:].tolist():
        out.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return out


def gold_ids_of(tokenizer, completion: str) -> list[int]:
    """A completion's ids with the EOS, as generated."""
    return encode(tokenizer, [completion])[0] + [tokenizer.eos_token_id]


def gold_ids(tokenizer, problem: Problem) -> list[int]:
    return gold_ids_of(tokenizer, problem.answer)


def correct(tokenizer, problems: list[Problem], outputs: list[list[int]]) -> list[bool]:
    """Exact match: the output is the gold digits followed by the EOS."""
    return [out == gold_ids(tokenizer, p) for p, out in zip(problems, outputs)]


def well_formed(tokenizer, output: list[int]) -> bool:
    """One to `MAX_ANSWER_DIGITS` digit tokens, then the EOS."""
    digit_ids = set(tokenizer.convert_tokens_to_ids([str(d) for d in range(10)]))
    return (
        1 < len(output) <= MAX_ANSWER_DIGITS + 1
        and output[-1] == tokenizer.eos_token_id
        and all(t in digit_ids for t in output[:-1])
    )


@torch.no_grad()
def evaluate(model, tokenizer, problems: list[Problem]) -> dict[str, list]:
    """
    Per problem: greedy exact match (`correct`), the gold answer's log-prob with EOS (`gold_logp`), whether the greedy
    answer is malformed (`malformed`, not digits then EOS), and the first outputs as text (`outputs`, for reading).
    """
    was_training = model.training
    model.eval()
    outputs = generate(model, tokenizer, problems, temperature=None)
    input_ids, completion_mask = sequences(tokenizer, problems)
    gold = completion_logps(model, input_ids, completion_mask)
    model.train(was_training)
    return {
        "correct": correct(tokenizer, problems, outputs),
        "gold_logp": gold.tolist(),
        "malformed": [not well_formed(tokenizer, out) for out in outputs],
        "outputs": [f"{p.prompt} →{tokenizer.decode(out)}" for p, out in zip(problems[:8], outputs)],
    }


def sample_pairs(
    model, tokenizer, problems: list[Problem], *, samples: int, temperature: float, seed: int
) -> list[dict]:
    """
    On-policy pairs: `samples` answers per problem at `temperature`; chosen = the gold answer (sampled at least once),
    rejected = the most frequent well-formed wrong answer (`well_formed`; ties: the first sampled). Problems without
    both give no pair. `first_divergent` is the index of the first completion token (EOS included) where the two
    differ.
    """
    outputs = generate(
        model, tokenizer, [p for p in problems for _ in range(samples)], temperature=temperature, seed=seed
    )
    digits = {tokenizer.convert_tokens_to_ids(str(d)): str(d) for d in range(10)}
    pairs = []
    for i, problem in enumerate(problems):
        gold = gold_ids(tokenizer, problem)
        rows = outputs[i * samples : (i + 1) * samples]
        wrong = [tuple(r) for r in rows if r != gold and well_formed(tokenizer, r)]
        if gold not in rows or not wrong:
            continue
        rejected = list(Counter(wrong).most_common(1)[0][0])
        first = next(j for j, (c, r) in enumerate(zip(gold, rejected)) if c != r)
        pairs.append(
            {
                "prompt": problem.prompt,
                "chosen": problem.answer,
                "rejected": " " + " ".join(digits[t] for t in rejected[:-1]),
                "first_divergent": first,
                "sample_accuracy": rows.count(gold) / samples,
                "rejected_is_carry_dropped": problem.carries
                and rejected == gold_ids_of(tokenizer, problem.carry_dropped),
            }
        )
    return pairs
