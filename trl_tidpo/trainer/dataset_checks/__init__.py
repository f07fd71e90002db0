"""
Checks of the datasets handed to `TIDPOTrainer`, by concern: `columns` (which columns a configuration needs or
refuses), `rows` (every row, before tokenisation), `lengths` (prompts that fill `max_length`, rows past the model's
positions).
"""

from .columns import (
    check_columns,
    check_dataset_columns,
    check_token_weight_columns,
    named_datasets,
    reads_dataset_anchors,
    token_weight_columns_read,
)
from .lengths import (
    check_positions,
    drop_overlong_prompt_rows,
    model_max_positions,
    overlong_prompt_filter,
    overlong_prompt_rows,
    report_dropped_overlong_prompts,
    rows_past_positions,
)
from .rows import DatasetRowError, RowChecker, check_dataset_rows, check_rows, streamed_row_check


__all__ = [
    "DatasetRowError",
    "RowChecker",
    "check_columns",
    "check_dataset_columns",
    "check_dataset_rows",
    "check_positions",
    "check_rows",
    "check_token_weight_columns",
    "drop_overlong_prompt_rows",
    "model_max_positions",
    "named_datasets",
    "overlong_prompt_filter",
    "overlong_prompt_rows",
    "reads_dataset_anchors",
    "report_dropped_overlong_prompts",
    "rows_past_positions",
    "streamed_row_check",
    "token_weight_columns_read",
]
