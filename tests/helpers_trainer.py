"""
Independent reference computations for the trainer tests: one row at a time, full `[L, vocab]` logits, explicit Python
loops. Nothing here calls `trl_tidpo`, so the tests compare the trainer against code that shares none of its paths.
"""

import math

import torch
import torch.nn.functional as F
from datasets import Dataset


CPU_ARGS = {
    "bf16": False,
    "use_cpu": True,
    "report_to": [],
    "save_strategy": "no",
    "gradient_checkpointing": False,
    "seed": 0,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "logging_steps": 1,
    "disable_tqdm": True,
}


def tokenize_row(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    """
    Token ids of `prompt + completion + EOS` (TRL's text format) and the index of the first completion token.

    Returns:
        `tuple[list[int], int]`: the row's ids and where its completion starts.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids, "the test data must tokenise with the prompt as a prefix"
    return full, len(prompt_ids)


def token_logps(model, ids: list[int]) -> torch.Tensor:
    """`[L-1]` log-probabilities of tokens 1..L-1 from the model's full logits (entry i scores token i+1)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logps = F.log_softmax(logits[:-1], dim=-1)
    return torch.stack([logps[i, ids[i + 1]] for i in range(len(ids) - 1)])


def token_log_distributions(model, ids: list[int]) -> torch.Tensor:
    """`[L-1, vocab]` next-token log-distributions at positions 0..L-2, from full logits."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return F.log_softmax(logits[:-1], dim=-1)


def raw_importance(model, ids: list[int]) -> list[float]:
    """
    `I[j] = Σ_k |∂s/∂e[j, k]|` for one unpadded row, `s` = max logit at the last position (TI-DPO Eq. 5-6), with the
    gradient taken w.r.t. `inputs_embeds` of a plain forward.
    """
    embeds = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits[0]
    target = logits[len(ids) - 1].max()
    (grad,) = torch.autograd.grad(target, embeds)
    return [float(grad[0, j].abs().sum()) for j in range(len(ids))]


def gaussian_prior_loop(n: int, sigma_ratio: float) -> list[float]:
    """Normalised Gaussian prior over span positions 0..n-1: μ = (n-1)/2, σ = max(1, ρ n)."""
    mu = (n - 1) / 2
    sigma = max(1.0, sigma_ratio * n)
    density = [math.exp(-0.5 * ((p - mu) / sigma) ** 2) for p in range(n)]
    total = sum(density)
    return [d / total for d in density]


def hybrid_weights_loop(
    importance: list[float], span: list[int], lam: float, sigma_ratio: float, normalization: str
) -> tuple[dict[int, float], bool]:
    """
    TI-DPO weights of the span positions `span` of one row (Eq. 7-8), by explicit loops.

    Returns:
        `tuple[dict[int, float], bool]`: weight per position, and whether the row fell back to the prior (its span
        importance sums to 0 or is not finite).
    """
    n = len(span)
    total = sum(importance[j] for j in span)
    fallback = not (math.isfinite(total) and total > 0)
    prior = gaussian_prior_loop(n, sigma_ratio)
    weights = {}
    for p, j in enumerate(span):
        if fallback:
            h = prior[p]
        else:
            h = lam * importance[j] / total + (1 - lam) * prior[p]
        weights[j] = h * n if normalization == "mean" else h
    return weights, fallback


def expected_shifted_weights(
    model,
    rows: list[tuple[list[int], int]],
    width: int,
    lam: float,
    sigma_ratio: float,
    span: str,
    normalization: str,
    importance_fn=raw_importance,
) -> tuple[torch.Tensor, list[bool]]:
    """
    The weights the trainer should apply to `rows` (`(ids, completion_start)` each), on TRL's shifted axis: entry `i`
    of a row weighs token `i+1`, 0 off the completion. Returns `[R, width]` float32 and each row's fallback flag.
    """
    out = torch.zeros(len(rows), width)
    fallbacks = []
    for r, (ids, start) in enumerate(rows):
        positions = list(range(start, len(ids))) if span == "completion" else list(range(len(ids)))
        weights, fallback = hybrid_weights_loop(importance_fn(model, ids), positions, lam, sigma_ratio, normalization)
        fallbacks.append(fallback)
        for j in range(start, len(ids)):
            out[r, j - 1] = weights[j]
    return out, fallbacks


def sequential_kl_loop(policy, ref, ids: list[int], start: int) -> torch.Tensor:
    """
    TDPO's `K = Σ_{j ≥ start} Σ_v πref(v|<j) (log πref(v|<j) - log πθ(v|<j))` of one row, from full distributions
    (policy terms differentiable).
    """
    policy_logps = token_log_distributions(policy, ids)
    with torch.no_grad():
        ref_logps = token_log_distributions(ref, ids)
    kl = torch.zeros(())
    for j in range(start, len(ids)):
        kl = kl + (ref_logps[j - 1].exp() * (ref_logps[j - 1] - policy_logps[j - 1])).sum()
    return kl


def completion_logratios(policy, ref, ids: list[int], start: int) -> torch.Tensor:
    """Per-token log-ratios `log πθ - sg(log πref)` of the completion tokens of one row, `[n]`."""
    lp = token_logps(policy, ids)
    with torch.no_grad():
        lr = token_logps(ref, ids)
    return torch.stack([lp[j - 1] - lr[j - 1] for j in range(start, len(ids))])


def clone_params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def load(path: str):
    """A fresh copy of the model saved at `path`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def first_batch(trainer, n: int = 4) -> dict:
    """The first `n` prepared training rows, collated by the trainer's own collator (no shuffling)."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def text_rows(tokenizer, dataset, n: int = 4) -> list[tuple[list[int], int]]:
    """`(ids, completion_start)` of the chosen rows, then the rejected rows, of the first `n` examples."""
    chosen = [tokenize_row(tokenizer, ex["prompt"], ex["chosen"]) for ex in dataset.select(range(n))]
    rejected = [tokenize_row(tokenizer, ex["prompt"], ex["rejected"]) for ex in dataset.select(range(n))]
    return chosen + rejected


def assert_columns_close(dataset: Dataset, expected: dict, atol: float = 1e-5) -> None:
    """Each list column of `dataset` named in `expected` (`{column: rows}`) matches it row by row: same lengths, values
    within `atol` / `rtol=1e-5`."""
    for column, rows in expected.items():
        assert len(dataset[column]) == len(rows)
        for index, (got, want) in enumerate(zip(dataset[column], rows, strict=True)):
            assert len(got) == len(want), f"{column} row {index}"
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=atol, rtol=1e-5)
