"""TI-DPO (Token-Importance Guided Direct Preference Optimization) for Hugging Face TRL."""

from .modeling.collator import DataCollatorForTIDPO
from .tools.callbacks import TokenImportanceCallback
from .tools.explain import TokenWeights, token_weights
from .trainer.tidpo_config import TIDPOConfig
from .trainer.tidpo_trainer import TIDPOTrainer
from .modeling.tis_dpo import compute_tis_dpo_weight_columns


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
