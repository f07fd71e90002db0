"""
How the command line reports errors: a user error (a bad flag, file or row) is one line on stderr and exit code 2; a
bug keeps its traceback. Standard library only, and nothing of its sibling modules, so that every tool can import it.
"""

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path


EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
DEBUG_ENV = "TRL_TIDPO_DEBUG"
DEBUG_FLAG = "--debug"
# What bad flags, files or data raise, in our checks and in the libraries (transformers' argument checks, a missing
# file, a hub id that does not exist, a package to install). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, ImportError, OSError)
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


class CLIError(Exception):
    """A user error: printed as one line, no traceback."""


def one_line(error: BaseException) -> str:
    """`error`'s message on one line (library messages often span several), or its type name when it has none."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def is_user_error(error: BaseException) -> bool:
    """Whether `error` reports bad input (printed as one line) rather than a bug (traceback kept)."""
    if isinstance(error, (CLIError, *USER_ERRORS)):
        return True
    # Our own checks raise RuntimeError for a setup that cannot work (e.g. no bitsandbytes backend for the device)
    frames = error.__traceback__
    while frames is not None and frames.tb_next is not None:
        frames = frames.tb_next
    raised_here = frames is not None and frames.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)
    return isinstance(error, RuntimeError) and raised_here


def debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """
    `argv` without `--debug`, and whether tracebacks are wanted (`--debug`, or `TRL_TIDPO_DEBUG=1`). `--debug` sets
    `TRL_TIDPO_DEBUG=1`, so that processes started by a launcher keep their tracebacks too.
    """
    if DEBUG_FLAG in argv:
        argv = [arg for arg in argv if arg != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"
    return argv, os.environ.get(DEBUG_ENV, "0") not in ("", "0")


# Loggers that print at `import peft` on a machine without a GPU or without the hub, about kernels no CPU run uses:
# offline, the `kernels` package skips a trust check, and bitsandbytes finds no CPU 4-bit kernel in its cache. A
# user's one-line error would otherwise come after them. `--debug` keeps them.
IMPORT_NOTICE_LOGGERS = ("kernels", "bitsandbytes.backends.cpu")


def quiet_import_notices() -> None:
    """Raise the import-time notice loggers (`IMPORT_NOTICE_LOGGERS`) to ERROR."""
    for name in IMPORT_NOTICE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def run_script(prog: str, main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """
    Run `main(argv)` with user errors as one line on stderr (`<prog>: error: <message>`) and exit code 2; `--debug`
    (dropped from `argv`) or `TRL_TIDPO_DEBUG=1` keeps their traceback. Bugs always keep theirs.

    Returns:
        `int`: `main`'s exit status (0 when it returns None); 2 on a user error, 130 on Ctrl-C.
    """
    argv, debug = debug_requested(argv)
    if not debug:
        quiet_import_notices()
    try:
        result = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        hint = "" if isinstance(error, CLIError) else " (`--debug` shows the traceback)"  # ours say what to do
        print(f"{prog}: error: {one_line(error)}{hint}", file=sys.stderr)
        return EXIT_USAGE
    return result if isinstance(result, int) else 0
