"""`DataCollatorForTIDPO`: TRL's preference collator plus prompts (policy anchors), anchor rows, token weights and
precomputed per-token reference log-probs."""

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from .weight_columns import PAIR_WEIGHT_COLUMN, check_pair_weight


def _truncate(ids: list[int], max_length: int | None, truncation_mode: str) -> list[int]:
    if max_length is None:
        return ids
    return ids[:max_length] if truncation_mode == "keep_start" else ids[-max_length:]


@dataclass
class DataCollatorForTIDPO(DataCollatorForPreference):
    """
    TRL's `DataCollatorForPreference`, plus what TI-DPO's anchors need.

    Besides `input_ids`, `attention_mask` and `completion_mask` (`[2B, T]`, chosen rows then rejected rows), it returns:

    - with `return_prompts=True`: `prompt_input_ids` and `prompt_attention_mask` `[B, P]`, left-padded, the prompts
      policy anchors are sampled from;
    - when examples carry `anchor_ids`: `anchor_input_ids`, `anchor_attention_mask`, `anchor_completion_mask`
      `[B, T_a]`, right-padded and truncated like the chosen and rejected rows;
    - when examples carry `chosen_token_weights` and `rejected_token_weights` (one float per completion token):
      `token_weights` `[2B, T]` float32, aligned with `input_ids` (0 on prompt and padding), truncated like them;
    - when examples carry `chosen_ref_token_logps` and `rejected_ref_token_logps` (`precompute_ref_log_probs=True`, one
      float per completion token): `ref_token_logps` `[2B, T]` float32, on the same layout as `token_weights`; with
      `anchor_ref_token_logps` too, `anchor_ref_token_logps` `[B, T_a]` aligned with `anchor_input_ids`;
    - when examples carry `pair_weight` (one float per pair): `pair_weight` `[B]` float32.
    """

    return_prompts: bool = False

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        width = output["input_ids"].size(1)
        if "chosen_token_weights" in examples[0]:
            output["token_weights"] = self._completion_values(
                examples, ("chosen_token_weights", "rejected_token_weights"), width
            )
        if "chosen_ref_token_logps" in examples[0]:
            output["ref_token_logps"] = self._completion_values(
                examples, ("chosen_ref_token_logps", "rejected_ref_token_logps"), width
            )
        if PAIR_WEIGHT_COLUMN in examples[0]:
            # checked again here for streamed datasets, which the trainer cannot check ahead
            weights = [check_pair_weight(example[PAIR_WEIGHT_COLUMN], "a row of this batch") for example in examples]
            output[PAIR_WEIGHT_COLUMN] = torch.tensor(weights, dtype=torch.float32)
        if self.return_prompts:
            prompts = [torch.tensor(example["prompt_ids"], dtype=torch.long) for example in examples]
            output["prompt_input_ids"] = pad(prompts, padding_value=self.pad_token_id, padding_side="left")
            output["prompt_attention_mask"] = pad(
                [torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left"
            )
        if "anchor_ids" in examples[0]:
            ids, completion = [], []
            for example in examples:
                row = example["prompt_ids"] + example["anchor_ids"]
                mask = [0] * len(example["prompt_ids"]) + [1] * len(example["anchor_ids"])
                ids.append(torch.tensor(_truncate(row, self.max_length, self.truncation_mode), dtype=torch.long))
                completion.append(torch.tensor(_truncate(mask, self.max_length, self.truncation_mode)))
            output["anchor_input_ids"] = pad(ids, padding_value=self.pad_token_id, padding_side="right")
            output["anchor_attention_mask"] = pad(
                [torch.ones_like(i) for i in ids], padding_value=0, padding_side="right"
            )
            output["anchor_completion_mask"] = pad(completion, padding_value=0, padding_side="right")
            if "anchor_ref_token_logps" in examples[0]:
                output["anchor_ref_token_logps"] = self._completion_values(
                    examples, ("anchor_ref_token_logps",), output["anchor_input_ids"].size(1)
                )
        return output

    def _completion_values(self, examples: list[dict[str, Any]], columns: tuple[str, ...], width: int) -> torch.Tensor:
        """`[len(columns) * B, width]` float32: each column's per-completion-token values placed after the prompt (0
        elsewhere), truncated like the rows and right-padded; the rows of `columns[0]` first."""
        rows = []
        for column in columns:
            for example in examples:
                row = [0.0] * len(example["prompt_ids"]) + list(example[column])
                row = _truncate(row, self.max_length, self.truncation_mode)
                rows.append(row + [0.0] * (width - len(row)))
        return torch.tensor(rows, dtype=torch.float32)
