"""TI-DPO (Token-Importance Guided Direct Preference Optimization) for Hugging Face TRL."""

from .anchors import DataCollatorForTIDPO
from .callbacks import TokenImportanceCallback
from .explain import TokenWeights, token_weights
from .tidpo_config import TIDPOConfig
from .tidpo_trainer import TIDPOTrainer
from .tis_dpo import compute_tis_dpo_weight_columns


__version__ = "0.1.0"
__all__ = [
    "DataCollatorForTIDPO",
    "TIDPOConfig",
    "TIDPOTrainer",
    "TokenImportanceCallback",
    "TokenWeights",
    "compute_tis_dpo_weight_columns",
    "token_weights",
]
