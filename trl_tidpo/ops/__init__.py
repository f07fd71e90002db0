"""
The mathematics of TI-DPO as pure tensor functions: no model, no trainer, each formula in its own module.

- `prior`: the Gaussian positional prior (Eq. 8's P).
- `importance`: raw attribution → normalised importance → hybrid weights (Eq. 6–8).
- `weighted_losses`: the token-weighted DPO losses (Eq. 9–12) for every TRL loss type.
- `triplet`: the triplet distances and loss (Eq. 13–14).
- `sequential_kl`: TDPO's sequential KL, in chunks of positions.
- `pair_alignment`: a pair's common prefix and suffix, the `"difference"` weights, prefix tying.

Imports nothing from the rest of the package.
"""
