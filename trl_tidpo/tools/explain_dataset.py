"""
`trl-tidpo explain --dataset FILE --row N`: the weights the trainer will use for one row of a dataset file (span
columns, weight columns, or TI-DPO's from `--model`), in the terminal, as JSON, or as an HTML page, so that an
annotation can be checked before training on it.
"""

import argparse
import json
import sys
from pathlib import Path

from ..trainer.tidpo_defaults import DEFAULTS
from .errors import CLIError
from .loading import load_adapter, load_model, load_preference_dataset, load_tokenizer


# Where `--token-weighting` takes the weights from: TIDPOConfig's sources a row can show, and "auto"
TOKEN_WEIGHTING_CHOICES = ("auto", "dataset", "ti_dpo", "difference")


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--dataset` options of `trl-tidpo explain`."""
    group = parser.add_argument_group("a dataset row (instead of --prompt/--completion)")
    group.add_argument("--dataset", help="a JSON/JSONL/parquet/CSV file or a save_to_disk folder, as the training "
                       "script's --dataset_name")  # fmt: skip
    group.add_argument("--row", type=int, default=0, help="the row to show (default: 0)")
    group.add_argument("--split", default="train", help="the split of a save_to_disk folder (default: train)")
    group.add_argument("--token-weighting", choices=TOKEN_WEIGHTING_CHOICES, default="auto",
                       help="where the weights come from (auto: the row's span or weight columns if it has them, "
                       "else TI-DPO's from --model; difference: the pair's shared vs differing tokens)")  # fmt: skip
    group.add_argument("--difference-shared-weight", type=float, default=DEFAULTS["difference_shared_weight"],
                       help="'difference': weight of the tokens both completions share (default: %(default)s)")
    group.add_argument("--difference-differing-weight", type=float, default=DEFAULTS["difference_differing_weight"],
                       help="'difference': weight of the differing tokens (default: %(default)s)")  # fmt: skip
    group.add_argument("--span-default-weight", type=float, default=DEFAULTS["span_default_weight"],
                       help="weight of tokens outside every span (default: %(default)s)")  # fmt: skip


def load_row(name: str, split: str, row: int) -> dict:
    """Row `row` of split `split` of the dataset file or folder `name`. Raises `CLIError` with the reason."""
    try:
        splits = load_preference_dataset(name, option="--dataset")  # a single file or Dataset: the "train" split
    except (ValueError, OSError) as error:
        raise CLIError(str(error).strip().splitlines()[0]) from None
    if split not in splits:
        raise CLIError(f"--split: the dataset has no split {split!r}; it has {list(splits)}")
    dataset = splits[split]
    if not 0 <= row < len(dataset):
        raise CLIError(f"--row {row}: the {split!r} split has {len(dataset)} rows (0 to {len(dataset) - 1})")
    return dataset[row]


def explain_dataset(args: argparse.Namespace, options: dict) -> int:
    """Print (and with `--html`, write) the weights of `--row` of `--dataset`. Returns the exit code."""
    values = {}
    for name in ("span_default_weight", "difference_shared_weight", "difference_differing_weight"):
        values[name] = getattr(args, name)
        if not values[name] >= 0 or values[name] == float("inf"):
            raise CLIError(f"--{name.replace('_', '-')} must be finite and >= 0, got {values[name]}")
    default = values["span_default_weight"]
    difference = (values["difference_shared_weight"], values["difference_differing_weight"])
    import datasets

    datasets.disable_progress_bars()  # one row: the preparation's progress bars would only clutter the view
    example = load_row(args.dataset, args.split, args.row)  # a malformed file fails here, before torch or a model
    from ..modeling.weight_columns import WEIGHT_COLUMNS
    from ..modeling.weight_spans import span_columns_of
    from .explain import dataset_row_weights

    has_columns = bool(span_columns_of(example)) or any(column in example for column in WEIGHT_COLUMNS)
    needs_model = args.token_weighting == "ti_dpo" or (args.token_weighting == "auto" and not has_columns)
    model = None
    if needs_model:
        model, tokenizer = load_model(args.model)
        if args.adapter is not None:
            model = load_adapter(model, args.adapter)
    else:
        tokenizer = load_tokenizer(args.model)
    try:
        weights = dataset_row_weights(
            tokenizer, example, args.row, Path(args.dataset).name, model, args.token_weighting, default, difference,
            **options,
        )
    except ValueError as error:
        raise CLIError(str(error)) from None
    _show(args, tokenizer, weights, default, options, difference)
    return 0


def _describe(weights, default: float, options: dict, difference: tuple[float, float]) -> str:
    if weights.source == "difference":
        text = (
            f"difference weights (shared tokens {difference[0]}, differing tokens {difference[1]}, "
            f"normalization={options['weight_normalization']}; the untruncated pair)"
        )
    elif weights.source == "spans":
        text = f"weights from the span columns (tokens outside every span: {default})"
    elif weights.source == "columns":
        text = "weights from the chosen_token_weights / rejected_token_weights columns"
    else:
        text = (
            f"TI-DPO weights (λ={options['importance_lambda']}, ρ={options['prior_sigma_ratio']}, "
            f"span={options['weight_span']}, normalization={options['weight_normalization']})"
        )
    if weights.pair_weight is not None:
        text += f"; pair_weight {weights.pair_weight} (scales this pair's loss)"
    return text


def _show(
    args: argparse.Namespace, tokenizer, weights, default: float, options: dict, difference: tuple[float, float]
) -> None:
    from .visualize import PairView, TokenRow, display_tokens, pairs_page, terminal_view, use_color

    rows = {}
    for side in ("chosen", "rejected"):
        tw = getattr(weights, side)
        caption = f"{len(tw.token_ids)} {side} tokens (chat template and EOS included, as in training)"
        if tw.fallback and weights.source == "difference":
            caption += "; its raw weights sum to 0: uniform weights, as in training"
        elif tw.fallback:
            caption += "; the attribution could not be normalised: weights are the prior alone"
        rows[side] = TokenRow(display_tokens(tokenizer, tw.token_ids), tw.weights, importance=tw.importance,
                              prior=tw.prior, caption=caption)  # fmt: skip
    description = _describe(weights, default, options, difference)
    if args.json:
        keys = ("token_ids", "weights", "importance", "prior", "fallback")
        sides = {side: {"tokens": list(rows[side].tokens), **{k: getattr(getattr(weights, side), k) for k in keys}}
                 for side in rows}  # fmt: skip
        print(json.dumps({"row": args.row, "source": weights.source, "pair_weight": weights.pair_weight, **sides}))
    else:
        print(f"Row {args.row} of {args.dataset}: {description}")
        color = use_color(sys.stdout, args.color)
        for side in ("chosen", "rejected"):
            print(f"\n{side}:")
            print(terminal_view(rows[side], color))
    if args.html:
        prompt = tokenizer.decode(weights.prompt_ids)
        pair = PairView(prompt, rows["chosen"], rows["rejected"], title=f"row {args.row}", notes=[description])
        page = pairs_page([pair], title="Token weights of a dataset row", intro=f"{args.dataset}: {description}.")
        try:
            Path(args.html).write_text(page, encoding="utf-8")
        except OSError as error:
            raise CLIError(f"--html: cannot write {args.html!r} ({error.strerror})") from None
        if not args.json:
            print(f"Wrote {args.html}")
