"""The `trl-tidpo demo`: TI-DPO vs DPO on preference pairs whose critical tokens are known."""
