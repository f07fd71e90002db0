"""`TokenImportanceCallback`: watch TI-DPO's token weights of a few fixed pairs change during training."""

import html
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..trainer.tidpo_config import WEIGHT_OPTIONS, weight_option_defaults
from .explain import token_weights
from .visualize import PairView, TokenRow, pairs_page, visible



class TokenImportanceCallback(TrainerCallback):
    """
    Renders the TI-DPO weights (`trl_tidpo.token_weights`, the trainer's own weight code) of a few fixed preference
    pairs at each evaluation, and every `every_n_steps` training steps if set, into
    `<output_dir>/token_importance/step-<N>.html`. When TensorBoard or W&B is in `report_to`, the weights are logged
    there too (TensorBoard: a text table; W&B: the HTML page).

    Opt-in and cheap for a handful of pairs: one forward and one activation-only backward per completion, on the main
    process only (so not with FSDP or ZeRO-3, whose sharded parameters need every process in the forward).

    Args:
        examples (`list[dict]`): pairs with `prompt`, `chosen` and `rejected`, in the training data's format (strings
            or chat messages).
        every_n_steps (`int`, *optional*): also render every that many training steps.
        output_subdir (`str`): folder under `args.output_dir` for the HTML files.
        **weight_kwargs: `importance_lambda`, `prior_sigma_ratio`, `weight_span`, `weight_normalization`; by default
            those of the trainer's `TIDPOConfig` (or the `TIDPOConfig` defaults for other trainers).
    """

    def __init__(
        self,
        examples: list[dict[str, Any]],
        every_n_steps: int | None = None,
        output_subdir: str = "token_importance",
        **weight_kwargs: Any,
    ):
        if not examples:
            raise ValueError("`examples` is empty: give at least one pair with 'prompt', 'chosen' and 'rejected'.")
        for i, example in enumerate(examples):
            missing = [key for key in ("prompt", "chosen", "rejected") if key not in example]
            if missing:
                raise ValueError(f"`examples[{i}]` is missing {missing}; each pair needs 'prompt', 'chosen', 'rejected'.")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be >= 1 or None, got {every_n_steps}.")
        unknown = set(weight_kwargs) - set(WEIGHT_OPTIONS)
        if unknown:
            raise ValueError(f"Unknown weight option(s) {sorted(unknown)}; accepted: {list(WEIGHT_OPTIONS)}.")
        self.examples = examples
        self.every_n_steps = every_n_steps
        self.output_subdir = output_subdir
        self.weight_kwargs = weight_kwargs
        self.written: list[Path] = []
        self._tb_writer = None

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self.render(args, state, model, processing_class)

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.render(args, state, model, processing_class)

    def on_train_end(self, args, state, control, **kwargs):
        if self._tb_writer is not None:
            self._tb_writer.close()

    def _weight_options(self, args) -> dict[str, Any]:
        from_args = {name: getattr(args, name) for name in WEIGHT_OPTIONS if hasattr(args, name)}
        return {**weight_option_defaults(), **from_args, **self.weight_kwargs}

    def render(self, args, state, model, processing_class) -> Path | None:
        """Compute the weights, write the HTML page, log to the trackers. Returns the page's path (main process)."""
        if not state.is_world_process_zero:
            return None
        if model is None or processing_class is None:
            raise ValueError("TokenImportanceCallback needs the trainer's `model` and `processing_class`.")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        options = self._weight_options(args)
        pairs = [self._pair_view(model, tokenizer, i, example, options) for i, example in enumerate(self.examples)]
        title = f"TI-DPO token weights at step {state.global_step}"
        page = pairs_page(pairs, title=title, intro=f"Weights with {options}.")
        path = Path(args.output_dir) / self.output_subdir / f"step-{state.global_step:06d}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
        self.written.append(path)
        self._log_to_trackers(args, state, pairs, page)
        return path

    @staticmethod
    def _pair_view(model, tokenizer, index: int, example: dict, options: dict) -> PairView:
        rows = {}
        special_ids = set(tokenizer.all_special_ids)
        for side in ("chosen", "rejected"):
            tw = token_weights(model, tokenizer, example["prompt"], example[side], **options)
            tokens = [tokenizer.decode([token_id]) for token_id in tw.token_ids]
            special = [token_id in special_ids for token_id in tw.token_ids]  # left out of the colour scale
            rows[side] = TokenRow(tokens, tw.weights, importance=tw.importance, prior=tw.prior, special=special)
        prompt = example["prompt"] if isinstance(example["prompt"], str) else str(example["prompt"])
        return PairView(prompt=prompt, chosen=rows["chosen"], rejected=rows["rejected"], title=f"Pair {index + 1}")

    def _log_to_trackers(self, args, state, pairs: list[PairView], page: str) -> None:
        report_to = args.report_to or []
        if "tensorboard" in report_to:
            if self._tb_writer is None:
                from torch.utils.tensorboard import SummaryWriter

                log_dir = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs")
                self._tb_writer = SummaryWriter(log_dir=os.path.join(log_dir, "token_importance"))
            self._tb_writer.add_text("token_importance", markdown_table(pairs), state.global_step)
            self._tb_writer.flush()
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"token_importance": wandb.Html(page), "train/global_step": state.global_step}, commit=False)


def markdown_table(pairs: list[PairView]) -> str:
    """The pairs as markdown (TensorBoard's text view): per completion, `token (weight)` in order, top weights bold."""
    lines = []
    for pair in pairs:
        lines.append(f"**{html.escape(pair.title)}** — {html.escape(pair.prompt)}\n")
        lines.append("| side | tokens (weight) |\n|---|---|")
        for side, row in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            top = sorted(row.weights, reverse=True)[: max(1, len(row.weights) // 5)][-1]
            cells = []
            for token, weight in zip(row.tokens, row.weights):
                text = f"{html.escape(visible(token)).replace('|', '&#124;')} ({weight:.2f})"
                cells.append(f"**{text}**" if weight >= top else text)
            lines.append(f"| {side} | {' '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)
