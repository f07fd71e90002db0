"""
Re-running the training script under `accelerate launch` (`trl-tidpo train --accelerate_config NAME|PATH`): the
shipped configs, and the command line that sends the launch flags to `accelerate` and the script flags to the script.
"""

import os
from importlib import resources
from pathlib import Path


# Set in the processes `accelerate launch` starts for us, so they train instead of launching again
LAUNCHED_ENV = "TRL_TIDPO_LAUNCHED"
SCRIPT_MODULE = "trl_tidpo.tools.train_script"  # the module the launched processes run
ACCELERATE_CONFIG_NAMES = ("single_gpu", "multi_gpu", "fsdp2", "zero2", "zero3")


def inside_launcher() -> bool:
    """Whether this process was started by `accelerate launch` (ours or the user's) or `torchrun`."""
    return (
        os.environ.get(LAUNCHED_ENV) == "1"
        or "LOCAL_RANK" in os.environ  # torchrun, and accelerate's multi-process launchers
        or "ACCELERATE_DYNAMO_BACKEND" in os.environ  # set by every `accelerate launch`, one process included
    )


def resolve_accelerate_config(name_or_path: str) -> str:
    """
    The accelerate config file for `--accelerate_config`: `name_or_path` itself if it is a file, else the config of
    that name shipped in `trl_tidpo/accelerate_configs/`.

    Returns:
        `str`: a path to a YAML file.
    """
    if Path(name_or_path).is_file():
        return name_or_path
    candidate = resources.files("trl_tidpo").joinpath("accelerate_configs", f"{name_or_path}.yaml")
    if not candidate.is_file():
        raise ValueError(
            f"`--accelerate_config {name_or_path}` is neither a file nor a config shipped with trl-tidpo "
            f"({', '.join(ACCELERATE_CONFIG_NAMES)}). Pass one of those names or the path to an accelerate config."
        )
    return str(candidate)


def _drop_flag(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def _subtract_subsequence(argv: list[str], subsequence: list[str]) -> list[str]:
    """`argv` with the ordered `subsequence` removed (the launch flags, which the parser returned in order)."""
    rest, it = [], iter(subsequence)
    current = next(it, None)
    for arg in argv:
        if current is not None and arg == current:
            current = next(it, None)
        else:
            rest.append(arg)
    return rest


def build_launch_args(
    argv: list[str], accelerate_config: str | None, launch_args: list[str], cli_remaining: list[str]
) -> list[str]:
    """
    The `accelerate launch` command line (without the program name) that re-runs this script under `accelerate`.

    Args:
        argv (`list[str]`): the script's own command line.
        accelerate_config (`str`, *optional*): `--accelerate_config`, a name or a path.
        launch_args (`list[str]`): arguments the script's parser did not know (from the recipe and the command
            line), meant for `accelerate launch`.
        cli_remaining (`list[str]`): those of `launch_args` that came from `argv`.

    Returns:
        `list[str]`: `[launch flags..., "-m", "trl_tidpo.tools.train_script", script flags...]`.
    """
    from accelerate.commands.launch import launch_command_parser

    known = launch_command_parser()._option_string_actions
    unknown = [arg for arg in launch_args if arg.startswith("--") and arg.split("=")[0] not in known]
    if unknown:
        raise ValueError(
            f"Unknown argument(s) {unknown}: neither a `trl-tidpo train` flag (see `--help`) nor an `accelerate "
            "launch` flag."
        )
    if accelerate_config is not None:
        launch_args = ["--config_file", resolve_accelerate_config(accelerate_config)] + launch_args
    script_argv = _drop_flag(_subtract_subsequence(argv, cli_remaining), "--accelerate_config")
    script_argv = _drop_flag(script_argv, "--accelerate-config")  # the parser's dashed alias
    return [*launch_args, "-m", SCRIPT_MODULE, *script_argv]


def launch(argv: list[str], accelerate_config: str | None, launch_args: list[str], cli_remaining: list[str]) -> int:
    """Re-run the script under `accelerate launch` (in processes of its own); returns 0 once they succeeded."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    command = build_launch_args(argv, accelerate_config, launch_args, cli_remaining)
    os.environ[LAUNCHED_ENV] = "1"  # inherited by the launched processes
    try:
        launch_command(launch_command_parser().parse_args(command))
    finally:
        os.environ.pop(LAUNCHED_ENV, None)
    return 0
