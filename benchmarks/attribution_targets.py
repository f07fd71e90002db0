"""
Attribution targets beyond the paper's, on the demo's critical-token benchmark (`benchmarks/critical_tokens.py`'s data
and models): per seed, the demo's tiny Llama after its SFT warm-up, then trained with DPO and with TI-DPO (defaults);
on the held-out pairs, how well each target's normalised attribution (λ=1) ranks the known critical tokens (pooled
ROC-AUC and top-k share, with and without special tokens), beside the trainer's default weights (λ=0.7). The same
target code (`attributions_by_target`) also measured them on SmolLM2 pairs (docs/real_model.md, Part 2).

    python benchmarks/attribution_targets.py --seeds 0 1 2 --steps 300 --output attribution_targets.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from trl_tidpo import token_weights

# The demo's data, model builders and metrics (package internals, as `critical_tokens.py` uses them)
from trl_tidpo.tools.demo.data import critical_token_labels, load_pairs
from trl_tidpo.tools.demo.metrics import roc_auc, top_k_share
from trl_tidpo.tools.demo.runner import VARIANTS, DemoConfig, build_tokenizer, limit_cpu_threads, sft_warmup, train_variant
from trl_tidpo.modeling.tokenization import tokenize_completion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import mean_std  # noqa: E402


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


def measure(model, tokenizer, rows: list[dict], reference=None) -> dict[str, dict[str, float]]:
    """Critical-token ROC-AUC / top-k share of each target (and of the default TI-DPO weights) on `rows`."""
    scores: dict[str, list[list[float]]] = {}
    labels, special = [], []
    special_ids = set(tokenizer.all_special_ids)
    for row in rows:
        for side in ("chosen", "rejected"):
            prompt_ids, comp_ids = tokenize_completion(tokenizer, row["prompt"], row[side])
            closing = closing_token_count(tokenizer, comp_ids)
            for name, values in attributions_by_target(model, prompt_ids, comp_ids, closing, reference).items():
                scores.setdefault(name, []).append(values)
            default = token_weights(model, tokenizer, row["prompt"], row[side]).weights
            scores.setdefault("TI-DPO weights (λ=0.7, paper target)", []).append(default)
            labels.append(critical_token_labels(tokenizer, row["prompt"], row[side], row[f"{side}_critical"]))
            special.append([token_id in special_ids for token_id in comp_ids])
    out = {}
    for name, rows_scores in scores.items():
        metrics = {}
        for suffix, keep_special in (("", True), ("_content", False)):
            kept = [
                (
                    [s for s, sp in zip(ss, sps) if keep_special or not sp],
                    [c for c, sp in zip(cs, sps) if keep_special or not sp],
                )
                for ss, cs, sps in zip(rows_scores, labels, special)
            ]
            metrics[f"roc_auc{suffix}"] = roc_auc([s for ss, _ in kept for s in ss], [c for _, cs in kept for c in cs])
            metrics[f"top_k_share{suffix}"] = statistics.mean(top_k_share(ss, cs) for ss, cs in kept if any(cs))
        out[name] = metrics
    return out


def run_seed(seed: int, args, work: Path) -> dict:
    config = DemoConfig(output_dir=str(work / f"seed-{seed}"), steps=args.steps, seed=seed, progress_bars=False)
    rows = load_pairs()
    train_rows = [row for row in rows if row["split"] == "train"]
    test_rows = [row for row in rows if row["split"] == "test"][: args.max_eval_pairs]
    limit_cpu_threads(config)
    tokenizer = build_tokenizer(config, rows)
    start = sft_warmup(config, tokenizer, train_rows, work / f"seed-{seed}" / "start-model")
    reference = AutoModelForCausalLM.from_pretrained(start).eval()
    result = {"start": measure(reference, tokenizer, test_rows)}
    for name in ("DPO", "TI-DPO"):
        with tempfile.TemporaryDirectory() as run_dir:
            model, _ = train_variant(config, name, VARIANTS[name], start, tokenizer, train_rows, Path(run_dir))
        result[name] = measure(model, tokenizer, test_rows, reference=reference)
    return result


def markdown(per_seed: list[dict]) -> str:
    names = list(TARGETS) + ["TI-DPO weights (λ=0.7, paper target)"]
    lines = []
    for key, label in (
        ("roc_auc_content", "ROC-AUC, special tokens left out"),
        ("roc_auc", "ROC-AUC, all tokens"),
        ("top_k_share_content", "top-k share, special tokens left out"),
    ):
        lines += [f"\n{label}:\n", "| target | start (SFT) model | after DPO | after TI-DPO |", "|---|---|---|---|"]
        for name in names:
            cells = []
            for model in ("start", "DPO", "TI-DPO"):
                values = [run[model][name][key] for run in per_seed if name in run[model]]
                cells.append(mean_std(values) if values else "n/a")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-eval-pairs", type=int, default=None)
    parser.add_argument("--output", default="attribution_targets.json")
    parser.add_argument("--work-dir", default="attribution-target-runs")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    per_seed = []
    for seed in args.seeds:
        per_seed.append(run_seed(seed, args, Path(args.work_dir)))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "total_seconds": time.perf_counter() - t0, "per_seed": per_seed}, f, indent=2)
    print(markdown(per_seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
