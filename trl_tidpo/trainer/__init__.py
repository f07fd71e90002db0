"""`TIDPOConfig` and `TIDPOTrainer`: the thin TRL adapter that wires `modeling` and `ops` into `DPOTrainer`."""
