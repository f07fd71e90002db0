"""TI-DPO (Token-Importance Guided Direct Preference Optimization) for Hugging Face TRL."""

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first use, so that `trl-tidpo --help` does not pay for TRL,
# transformers and torch (about 10 s on a small machine).
_LAZY_NAMES = {
    "DataCollatorForTIDPO": ".modeling.collator",
    "TIDPOConfig": ".trainer.tidpo_config",
    "TIDPOTrainer": ".trainer.tidpo_trainer",
    "TokenImportanceCallback": ".tools.callbacks",
    "TokenWeights": ".tools.explain",
    "add_contrastive_weight_columns": ".modeling.contrastive_models",
    "compute_cdpo_weight_columns": ".modeling.cdpo",
    "compute_tis_dpo_weight_columns": ".modeling.tis_dpo",
    "token_weights": ".tools.explain",
    "train_contrastive_models": ".modeling.contrastive_models",
}
__all__ = [
    "DataCollatorForTIDPO",
    "TIDPOConfig",
    "TIDPOTrainer",
    "TokenImportanceCallback",
    "TokenWeights",
    "add_contrastive_weight_columns",
    "compute_cdpo_weight_columns",
    "compute_tis_dpo_weight_columns",
    "token_weights",
    "train_contrastive_models",
]

if TYPE_CHECKING:
    from .modeling.collator import DataCollatorForTIDPO
    from .modeling.cdpo import compute_cdpo_weight_columns
    from .modeling.contrastive_models import add_contrastive_weight_columns, train_contrastive_models
    from .modeling.tis_dpo import compute_tis_dpo_weight_columns
    from .tools.callbacks import TokenImportanceCallback
    from .tools.explain import TokenWeights, token_weights
    from .trainer.tidpo_config import TIDPOConfig
    from .trainer.tidpo_trainer import TIDPOTrainer


def __getattr__(name: str):
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
