"""
Tools built on the trainer: the CLI, the training script and its launcher, `token_weights`/explain, HTML and terminal
views, the `TokenImportanceCallback`, and the demo with its offline model builders.
"""
