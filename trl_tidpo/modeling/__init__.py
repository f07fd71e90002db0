"""
Model-facing code: everything that runs a model or shapes its batches, below the trainer.

- `attribution`: the one attribution path (embedding hook, final-position target, activation-only backward).
- `forwards`: the policy, reference and anchor forwards, returning typed `PairForward` / `AnchorForward`.
- `anchors`: policy-sampled and dataset anchors; `collator`: `DataCollatorForTIDPO`.
- `tokenization`: TRL-compatible tokenisation of completions and anchors.
- `weight_columns`, `weight_cache`: per-token weight columns and their content-keyed Arrow cache.
- `contrastive_scoring`: running π+ and π− over a dataset's completions, and the weight columns' shared plumbing
  (the trainer's tokenisation, the content hash, `ContrastiveScoring`, `add_weight_columns`), for the two below.
- `tis_dpo`: TIS-DPO's contrastive-model weights; `cdpo`: cDPO's contrastive-estimation weights.
- `contrastive_models`: π+ and π− trained from the training pairs (SFT or DPO / reverse DPO recipes), and the weight
  columns they give.

Imports from `ops` only (never from `trainer` or `tools`).
"""
