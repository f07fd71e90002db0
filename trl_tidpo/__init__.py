"""TI-DPO (Token-Importance Guided Direct Preference Optimization) for Hugging Face TRL."""

from .anchors import DataCollatorForTIDPO
from .explain import TokenWeights, token_weights
from .tidpo_config import TIDPOConfig
from .tidpo_trainer import TIDPOTrainer


__version__ = "0.1.0"
__all__ = ["DataCollatorForTIDPO", "TIDPOConfig", "TIDPOTrainer", "TokenWeights", "token_weights"]
