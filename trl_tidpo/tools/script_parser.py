"""
The parser of `trl-tidpo train`: TRL's `TrlParser` (every dataclass field a flag, `--config recipe.yaml` for defaults)
with two changes for a first run. An argument error is one line (argparse prints its usage, about 180 lines of flags,
before the error), and `--help` starts with TI-DPO's own options (they came after 900 lines of `TrainingArguments`).
"""

import inspect

from trl import TrlParser

from .errors import CLIError


USAGE = "%(prog)s [--config RECIPE.yaml] --model_name_or_path MODEL --dataset_name DATA [--output_dir DIR] [OPTIONS]"
TIDPO_GROUP_TITLE = "TI-DPO options (TIDPOConfig's own; DPOConfig's, the Trainer's, the model's and the script's follow)"


class ScriptParser(TrlParser):
    """
    `TrlParser` over `dataclass_types` whose argument errors raise `CLIError` (one line, exit code 2 under
    `trl-tidpo train`) instead of printing the usage, and whose `--help` lists the fields that `first` declares itself
    (not those it inherits) first, under their own heading.

    Args:
        dataclass_types: the dataclasses whose fields are flags, as for `TrlParser`.
        first (`type`): the dataclass whose own fields open `--help` (`TIDPOConfig`).
        **kwargs: passed to `TrlParser` (`prog`, ...).
    """

    def __init__(self, dataclass_types, first: type, **kwargs):
        super().__init__(dataclass_types, usage=USAGE, **kwargs)
        order = {name: i for i, name in enumerate(inspect.get_annotations(first))}  # as `first` declares them
        group = self.add_argument_group(TIDPO_GROUP_TITLE)
        # argparse has no public way to move an argument between groups, nor to order the groups of `--help`
        own = [action for action in self._optionals._group_actions if action.dest in order]
        for action in sorted(own, key=lambda action: order[action.dest]):
            self._optionals._group_actions.remove(action)
            group._group_actions.append(action)
        self._action_groups.remove(group)
        self._action_groups.insert(0, group)

    def error(self, message: str):
        """An argument error (an unknown choice, a value of the wrong type, a missing value): one line."""
        raise CLIError(f"{message} (`{self.prog} --help` lists the options)")

