"""
Checkpoints a run can trust: which `checkpoint-N` folders are complete, the newest complete one for
`resume_from_checkpoint="last"`, a refusal to start a new run over another run's checkpoints, and
`SaveOnSignalCallback`, which turns SIGTERM / SIGINT into a checkpoint at the end of the current step.

A save cut short (a kill, a full disk) leaves a folder that transformers' `get_last_checkpoint` still picks; and
transformers silently resumes without the optimizer when `optimizer.pt` is missing. Here a checkpoint is complete when
its weights (full or adapter, safetensors headers and sizes intact), `trainer_state.json` (parses), optimizer and
scheduler (readable archives) are all there.
"""

import json
import logging
import re
import signal
import struct
import zipfile
from pathlib import Path

from transformers import TrainerCallback


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")  # transformers' `PREFIX_CHECKPOINT_DIR` folders
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "trainer_state.json"


# ------------------------------------------------------------------------------------------------- file checks


def _safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file `path` cannot be loaded (header unreadable, data cut short), or None."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (header_size,) = struct.unpack("<Q", head)
        if header_size > size - 8:
            return f"{path.name} is truncated (its header says {header_size} bytes, the file has {size})"
        try:
            header = json.loads(file.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{path.name} has an unreadable header"
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_size + data_end > size:
        return f"{path.name} is truncated ({size} of {8 + header_size + data_end} bytes)"
    return None


def _archive_problem(path: Path) -> str | None:
    """Why the `torch.save` file `path` (a zip archive) cannot be read, or None. Reads only its directory."""
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError):
        return f"{path.name} is truncated or not a torch.save archive"


def _weights_problem(folder: Path) -> str | None:
    for index_name in WEIGHT_INDEXES:
        if (folder / index_name).is_file():
            try:
                shards = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError):
                return f"{index_name} does not parse"
            missing = [shard for shard in shards if not (folder / shard).is_file()]
            if missing:
                return f"{index_name} names missing shard(s) {missing}"
            problems = [_safetensors_problem(folder / shard) for shard in shards if shard.endswith(".safetensors")]
            return next((problem for problem in problems if problem), None)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            path = folder / name
            return _safetensors_problem(path) if name.endswith(".safetensors") else _archive_problem(path)
    if _deepspeed_folder(folder) is not None or any(folder.glob("pytorch_model_fsdp*")):
        return None  # DeepSpeed / FSDP sharded states: loaded by their engines
    return f"no model weights ({' or '.join(WEIGHT_FILES[:2])})"


def _deepspeed_folder(folder: Path) -> Path | None:
    """The `global_stepN` folder named by a DeepSpeed checkpoint's `latest` file, when it exists."""
    latest = folder / "latest"
    if latest.is_file() and (folder / latest.read_text().strip()).is_dir():
        return folder / latest.read_text().strip()
    return None


def _optimizer_problem(folder: Path) -> str | None:
    if _deepspeed_folder(folder) is not None or any(p.is_dir() for p in folder.glob("optimizer*")):
        return None  # DeepSpeed keeps it in global_stepN/, FSDP in an optimizer_N/ folder
    for name in OPTIMIZER_FILES:
        if (folder / name).is_file():
            return _archive_problem(folder / name)
    return f"no optimizer state ({OPTIMIZER_FILES[0]})"


def checkpoint_problem(folder: str | Path, require_optimizer: bool = True) -> str | None:
    """
    What makes the checkpoint `folder` unusable for resuming, or None when it is complete.

    Args:
        folder: a `checkpoint-N` folder written by `Trainer`.
        require_optimizer: also require the optimizer and scheduler states (False for `save_only_model=True` runs).

    Returns:
        `str | None`: the first problem found, naming the file (e.g. `"optimizer.pt is truncated ..."`).
    """
    folder = Path(folder)
    state = folder / STATE_FILE
    if not state.is_file():
        return f"no {STATE_FILE}"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return f"{STATE_FILE} does not parse"
    problem = _weights_problem(folder)
    for rng_state in sorted(folder.glob("rng_state*.pth")):  # optional, but loaded when present
        problem = problem or _archive_problem(rng_state)
    if problem is None and require_optimizer:
        problem = _optimizer_problem(folder)
        if problem is None and _deepspeed_folder(folder) is None:
            scheduler = folder / SCHEDULER_FILE
            problem = _archive_problem(scheduler) if scheduler.is_file() else f"no scheduler state ({SCHEDULER_FILE})"
    return problem


# ------------------------------------------------------------------------------------------------- choosing one


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, newest (highest N) first; empty when there is none."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))
    ]
    return [path for _, path in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str | Path, require_optimizer: bool = True) -> Path:
    """
    The newest complete checkpoint of `output_dir` (what `resume_from_checkpoint="last"` means here). Newer
    incomplete ones are skipped with a warning that names them and what they lack.

    Raises:
        ValueError: when `output_dir` has no complete checkpoint.
    """
    skipped = []
    for folder in list_checkpoints(output_dir):
        problem = checkpoint_problem(folder, require_optimizer)
        if problem is None:
            if skipped:
                logger.warning(f"Resuming from {folder}: skipping incomplete checkpoint(s) {'; '.join(skipped)}.")
            return folder
        skipped.append(f"{folder.name} ({problem})")
    detail = f" (incomplete: {'; '.join(skipped)})" if skipped else ""
    raise ValueError(
        f"`{output_dir}` holds no complete checkpoint to resume from{detail}. Drop `resume_from_checkpoint` to "
        "start afresh, or pass a checkpoint folder."
    )


def check_checkpoint(folder: str | Path, require_optimizer: bool = True) -> Path:
    """
    `folder` itself when it is a complete checkpoint.

    Raises:
        ValueError: naming the damaged file, and the newest complete checkpoint before it in the same `output_dir`.
    """
    folder = Path(folder)
    problem = checkpoint_problem(folder, require_optimizer)
    if problem is None:
        return folder
    step = CHECKPOINT_PATTERN.match(folder.name)
    earlier = [
        p for p in list_checkpoints(folder.parent)
        if step and int(CHECKPOINT_PATTERN.match(p.name).group(1)) < int(step.group(1))
    ]  # fmt: skip
    complete = next((p for p in earlier if checkpoint_problem(p, require_optimizer) is None), None)
    hint = f"The newest complete checkpoint before it is `{complete}`." if complete else "No earlier one is complete."
    raise ValueError(
        f"Checkpoint `{folder}` is damaged: {problem}. {hint} Resume from a complete one, or start afresh."
    )


def resolve_resume(
    resume_from_checkpoint: str | bool | None, output_dir: str | Path, require_optimizer: bool = True
) -> str | None:
    """
    The checkpoint folder a run resumes from, checked complete; None when it does not resume (None or False). What
    both `TIDPOTrainer.train` and the training script's `--resume_from_checkpoint` mean:

    - `True`, `"true"` or `"last"`: the newest *complete* checkpoint of `output_dir` (`last_complete_checkpoint`;
      transformers takes the newest folder, even one a kill or a full disk cut short);
    - a folder: itself, refused when damaged (`check_checkpoint`, naming the file and the complete one before it).

    Args:
        require_optimizer: also require the optimizer and scheduler states (False for `save_only_model=True` runs).

    Raises:
        ValueError: no complete checkpoint in `output_dir`, or a damaged folder.
        FileNotFoundError: a path that is no folder.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("true", "last"):
        try:
            return str(last_complete_checkpoint(output_dir, require_optimizer))
        except ValueError as error:
            raise ValueError(f"`--resume_from_checkpoint {str(resume_from_checkpoint).lower()}`: {error}") from None
    if not Path(resume_from_checkpoint).is_dir():
        raise FileNotFoundError(
            f"`--resume_from_checkpoint {resume_from_checkpoint}`: no such checkpoint folder. Pass a `checkpoint-N` "
            "folder written by a previous run, `last` for the latest one in `output_dir`, or drop the flag."
        )
    return str(check_checkpoint(resume_from_checkpoint, require_optimizer))


def checkpoint_step(folder: str | Path) -> int:
    """The optimizer step a complete checkpoint was saved at (`global_step` of its `trainer_state.json`)."""
    return int(json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))["global_step"])


def check_output_dir(output_dir: str | Path, resuming: bool, overwrite: bool) -> list[Path]:
    """
    Refuse a new run into an `output_dir` that holds another run's `checkpoint-N` folders: their steps would mix
    with the new run's, and `"last"` could later resume the wrong run.

    Returns:
        `list[Path]`: the old checkpoints that `overwrite` allows to delete (empty when resuming or none exist).

    Raises:
        ValueError: when there are old checkpoints and neither `resuming` nor `overwrite`.
    """
    old = list_checkpoints(output_dir)
    if not old or resuming:
        return []
    if not overwrite:
        names = ", ".join(p.name for p in old[:3]) + (", ..." if len(old) > 3 else "")
        raise ValueError(
            f"`output_dir` `{output_dir}` already holds checkpoints of another run ({names}). Resume it with "
            "`--resume_from_checkpoint last`, choose another `--output_dir`, or pass `--overwrite_output_dir` to "
            "delete those checkpoints and start afresh."
        )
    return old


# ------------------------------------------------------------------------------------------------- signals


class SaveOnSignalCallback(TrainerCallback):
    """
    On SIGTERM or SIGINT (what schedulers and preemptible machines send, and Ctrl-C), finish the current optimizer
    step, save a checkpoint and stop training; a second signal interrupts at once. After `trainer.train()` returns,
    `received` holds the signal number (None when training ended normally), and `saved_checkpoint` the folder saved
    on it (a warning names it).

    Every process installs the handlers; at each step end the processes agree (a max over ranks), so all save and stop
    at the same step even when only one of them received the signal. The handlers are installed at `on_train_begin`
    (main thread only) and the previous ones restored at `on_train_end`.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.saved_checkpoint: Path | None = None
        self._pending: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self._pending is not None:  # second signal: the user means it
            self._restore()
            signal.raise_signal(signum)
            return
        self._pending = signum
        logger.warning(
            f"Received {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping."
        )

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.received, self._pending, self.saved_checkpoint = None, None, None
        try:
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        except ValueError:  # not the main thread: signals cannot be caught here
            logger.warning("SaveOnSignalCallback: not in the main thread, so SIGTERM/SIGINT will not be caught.")

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._agreed_signal(args)
        if signum:
            self.received = signum
            control.should_save = True  # Trainer saves on this flag whatever `save_strategy` says
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.received is not None and self.saved_checkpoint is None:
            # the folder `Trainer._save_checkpoint` just wrote (`PREFIX_CHECKPOINT_DIR`-step, in `output_dir`)
            self.saved_checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            logger.warning(
                f"{signal.Signals(self.received).name}: saved checkpoint {self.saved_checkpoint} (step "
                f"{state.global_step}); stopping. Resume with `--resume_from_checkpoint last` (or this folder)."
            )

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()

    def _agreed_signal(self, args) -> int:
        """The signal any process received (0 if none): every rank must take the same decision."""
        signum = self._pending or 0
        if args.world_size > 1:
            import torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flag = torch.tensor([signum], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                signum = int(flag.item())
        return signum
