"""
The paper's case study side by side (TI-DPO §5.4, Tables B2-B4): the paper's three headache responses scored with
this package's weight code on SmolLM2-135M-Instruct, before and after TI-DPO training (a LoRA adapter, e.g. the one
`benchmarks/real_model.py --save-adapter DIR` writes, one per learning rate: `DIR/lr0.0002`), aggregated to the paper's words, max-rescaled as the paper displays
them, and rank-correlated with the paper's printed weights beside a trivial baseline (word length).

    python benchmarks/case_study.py --adapter real-model-runs/tidpo-adapter-seed0 --output case_study.json
"""

import argparse
import json
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from smollm2_task import completion_ids

from trl_tidpo import token_weights
from trl_tidpo.tools.demo.metrics import average_ranks
from trl_tidpo.tools.demo.smollm2 import load_smollm2

PROMPT = "I have a headache, what should I do?"
# The paper's texts and printed per-word weights (/work/shared/PAPER_CASE_STUDY.md). B's table omits "but", "if",
# "the": those words are scored but left out of the comparison.
RESPONSES = {
    "A (preferred)": (
        "Based on your symptoms, it is recommended that you seek medical attention promptly and avoid self-medicating.",
        [("Based", .05), ("on", .05), ("your", .05), ("symptoms", .18), ("it", .03), ("is", .03), ("recommended", .20),
         ("that", .02), ("you", .02), ("seek", .93), ("medical", .87), ("attention", .85), ("promptly", 1.00),
         ("and", .03), ("avoid", .92), ("self-medicating", .89)],
    ),
    "B (intermediate)": (
        (
            "According to your description, it is advised to get more rest, but if the symptoms worsen, you should "
            "consult a doctor."
        ),
        [("According", .04), ("to", .04), ("your", .04), ("description", .07), ("it", .03), ("is", .03),
         ("advised", .13), ("to", .02), ("get", .06), ("more", .06), ("rest", .11), ("symptoms", .18),
         ("worsen", .88), ("you", .03), ("should", .82), ("consult", .90), ("doctor", .95)],
    ),
    "C (non-preferred)": (
        "Don't worry, you can just take some painkillers casually, it should be fine.",
        [("Don't", .21), ("worry", .18), ("you", .04), ("can", .04), ("just", .09), ("take", .03), ("some", .09),
         ("painkillers", .91), ("casually", 1.00), ("it", .02), ("should", .06), ("be", .03), ("fine", .97)],
    ),
}  # fmt: skip
PUNCTUATION = ",.!?;:"


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    rx, ry = average_ranks(x), average_ranks(y)  # a shift of every rank leaves the correlation unchanged
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def word_weights(tokenizer, text: str, token_ids: list[int], values: list[float]) -> list[dict]:
    """
    Aggregate per-token values to the whitespace words of `text`: each token belongs to the word its first
    non-space character falls in; punctuation-only tokens and the template's closing tokens are left out. Returns one
    dict per word with `word` (trailing punctuation stripped), `sum` and `max` of its tokens' values.
    """
    words = [(m.start(), m.end(), m.group().rstrip(PUNCTUATION)) for m in re.finditer(r"\S+", text)]
    out = [{"word": w, "sum": 0.0, "max": 0.0, "tokens": []} for _, _, w in words]
    position = 0
    for token_id, value in zip(token_ids, values):
        piece = tokenizer.decode([token_id])
        first = position + (len(piece) - len(piece.lstrip()))
        position += len(piece)
        if first >= len(text) or not piece.strip() or all(c in PUNCTUATION for c in piece.strip()):
            continue
        index = next(i for i, (start, end, _) in enumerate(words) if start <= first < end)
        out[index]["sum"] += value
        out[index]["max"] = max(out[index]["max"], value)
        out[index]["tokens"].append(piece)
    return out


def score(model, tokenizer, text: str, paper: list[tuple[str, float]]) -> dict:
    """Our word weights of one response (defaults, λ=1 and prior alone), aligned to the paper's printed words."""
    prompt = [{"role": "user", "content": PROMPT}]
    completion = [{"role": "assistant", "content": text}]
    _, ids = completion_ids(tokenizer, prompt, completion)
    variants = {
        "ours (λ=0.7)": token_weights(model, tokenizer, prompt, completion),
        "ours (λ=1)": token_weights(model, tokenizer, prompt, completion, importance_lambda=1.0),
        "prior alone": token_weights(model, tokenizer, prompt, completion, importance_lambda=0.0),
    }
    closing = [
        i
        for i, token_id in enumerate(ids)
        if token_id in tokenizer.all_special_ids or not tokenizer.decode([token_id]).strip()
    ]
    result = {"closing_share_lambda1": sum(variants["ours (λ=1)"].importance[i] for i in closing), "words": {}}
    for name, tw in variants.items():
        assert tw.token_ids == ids
        words = word_weights(tokenizer, text, ids, tw.weights)
        # align to the paper's list: its words appear in order (B's skips three)
        aligned, cursor = [], 0
        for word, _ in paper:
            while words[cursor]["word"] != word:
                cursor += 1
            aligned.append(words[cursor])
            cursor += 1
        for agg in ("max", "sum"):
            values = [w[agg] for w in aligned]
            top = max(values)
            result["words"].setdefault(name, {})[agg] = [v / top for v in values]
    return result


def markdown(results: dict, adapter: str | None) -> str:
    lines = []
    models = list(results)
    for response, (_, paper) in RESPONSES.items():
        columns = [(m, name) for m in models for name in ("ours (λ=0.7)", "ours (λ=1)")]
        lines += [
            f"\n**{response}** (word weights, max-rescaled; max over a word's tokens)\n",
            "| word | paper | " + " | ".join(f"{name}, {m}" for m, name in columns) + " |",
            "|---" * (len(columns) + 2) + "|",
        ]
        for i, (word, value) in enumerate(paper):
            cells = [f"{results[m][response]['words'][name]['max'][i]:.2f}" for m, name in columns]
            lines.append(f"| {word} | {value:.2f} | " + " | ".join(cells) + " |")
    lines += [
        "\nSpearman rank correlation with the paper's printed weights:\n",
        "| weights | " + " | ".join(RESPONSES) + " |",
        "|---" * (len(RESPONSES) + 1) + "|",
    ]
    baseline = [spearman([len(w) for w, _ in paper], [v for _, v in paper]) for _, paper in RESPONSES.values()]
    lines.append("| word length (characters), no model | " + " | ".join(f"{r:+.2f}" for r in baseline) + " |")
    for m in models:
        for name in ("ours (λ=0.7)", "ours (λ=1)", "prior alone"):
            for agg in ("max", "sum"):
                cells = [
                    f"{spearman(results[m][r]['words'][name][agg], [v for _, v in RESPONSES[r][1]]):+.2f}"
                    for r in RESPONSES
                ]
                lines.append(f"| {name}, {agg} over tokens, {m} | " + " | ".join(cells) + " |")
    lines += [
        "\nShare of the gradient attribution (λ=1, completion span) on the closing `<|im_end|>` and newline:\n",
        "| model | " + " | ".join(RESPONSES) + " |",
        "|---" * (len(RESPONSES) + 1) + "|",
    ]
    for m in models:
        lines.append(
            f"| {m} | " + " | ".join(f"{results[m][r]['closing_share_lambda1']:.2f}" for r in RESPONSES) + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default=None, help="LoRA adapter of a TI-DPO run (the 'after' model)")
    parser.add_argument("--output", default="case_study.json")
    args = parser.parse_args(argv)
    model, tokenizer = load_smollm2()
    results = {"before training": {r: score(model, tokenizer, text, paper) for r, (text, paper) in RESPONSES.items()}}
    if args.adapter:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(model, args.adapter).eval()
        results["after TI-DPO"] = {r: score(tuned, tokenizer, text, paper) for r, (text, paper) in RESPONSES.items()}
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(markdown(results, args.adapter))
    return 0


if __name__ == "__main__":
    sys.exit(main())
