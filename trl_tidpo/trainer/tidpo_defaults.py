"""
The defaults and choices of the `TIDPOConfig` fields that the command line also offers. `TIDPOConfig` takes them from
here, and `trl-tidpo explain` reads them here without importing TRL or torch (so that `trl-tidpo --help` answers at
once). Standard library only: change a default here, and both follow.
"""

# The options of the hybrid weights (Eq. 7-8)
WEIGHT_OPTIONS = ("importance_lambda", "prior_sigma_ratio", "weight_span", "weight_normalization")

DEFAULTS = {
    "token_weighting": "ti_dpo",
    "span_default_weight": 1.0,
    "importance_lambda": 0.7,
    "prior_sigma_ratio": 0.25,
    "weight_span": "completion",
    "weight_normalization": "mean",
    "difference_shared_weight": 0.5,
    "difference_differing_weight": 1.0,
}

CHOICES = {
    "token_weighting": ("ti_dpo", "uniform", "dataset", "tis_dpo", "cdpo", "difference"),
    "weight_span": ("completion", "sequence"),
    "weight_normalization": ("mean", "sum"),
}
