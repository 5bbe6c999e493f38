"""What `frod train` may do with the directory it is pointed at: a finished run is a user's asset.

    state         what is there                                      frod train
    new           nothing, or an empty directory                     trains there
    incomplete    checkpoints/step-N/ and no metrics.json            resumes it (same config) or refuses
    failed        a run's .hydra/ without checkpoint or metrics.json  restarts it if the command is the same
    finished      metrics.json                                       refuses, unless train.overwrite=true
    foreign       any other files                                    refuses

train.overwrite=true on a finished run trains in a hidden sibling, `.<name>.frod-overwrite`, and swaps it into
place only when the new run has finished: until then the old run stays whole, and a run killed midway leaves
it untouched (the same command again resumes the sibling). The swap is two renames; `recover_swap` completes
one that a crash interrupted between them.

Nothing is written into the run directory before the run is accepted (every check passed, data and model
loaded): Hydra writes no `.hydra/` of its own (`hydra.output_subdir: null`); `write_hydra_files` writes it at
acceptance, and log records wait in a `RunLog` buffer until train.log may be opened.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
from pathlib import Path
from typing import Any, List, Optional, Sequence

from frod_cli.runs.reader import RunPaths, is_run_dir, latest_checkpoint, read_overrides

NEW, INCOMPLETE, FAILED, FINISHED, FOREIGN = "new", "incomplete", "failed", "finished", "foreign"
STAGING_SUFFIX = ".frod-overwrite"
OLD_SUFFIX = ".frod-replaced"
# Files a run writes at its top level (a failed run's are cleared before it restarts; train.log is kept).
RUN_FILES = ("metrics.jsonl", "metrics.json", "predictions.jsonl", "loss.png", "eval.json", "merge.json")
RUN_DIRS = ("adapter", "merged", "trackers", "checkpoints")


def state_of(path: str) -> str:
    p = Path(path)
    if not p.exists() or (p.is_dir() and not any(p.iterdir())):
        return NEW
    if not p.is_dir():
        return FOREIGN
    if RunPaths.of(p).metrics.is_file():
        return FINISHED
    if latest_checkpoint(str(p)) is not None:
        return INCOMPLETE
    if is_run_dir(p):
        return FAILED
    return FOREIGN


def staging_dir(path: str) -> str:
    p = Path(os.path.abspath(path))
    return str(p.parent / f".{p.name}{STAGING_SUFFIX}")


def _replaced_dir(path: str) -> str:
    p = Path(os.path.abspath(path))
    return str(p.parent / f".{p.name}{OLD_SUFFIX}")


def swap_into_place(staging: str, path: str) -> None:
    """The finished run in `staging` becomes `path`; the run that was there is deleted."""
    old = _replaced_dir(path)
    if os.path.exists(old):
        shutil.rmtree(old)
    os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_swap(path: str) -> None:
    """Finish a swap a crash interrupted: the new run (finished, in the staging sibling) goes into place if the
    old one had already been moved aside; a leftover moved-aside run is deleted once the new one is in place."""
    old, staging = _replaced_dir(path), staging_dir(path)
    if not os.path.exists(old):
        return
    if not os.path.exists(path) and RunPaths.of(staging).metrics.is_file():
        os.replace(staging, path)
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)


def same_command(path: str, overrides: Sequence[str]) -> bool:
    """A failed run may restart in place only for the very same command (overrides)."""
    return sorted(read_overrides(path)) == sorted(o for o in overrides if not o.startswith("hydra."))


def clear_failed_run(path: str) -> None:
    """The files of a run that failed before its first checkpoint, except its train.log (the failure's record)."""
    p = Path(path)
    for name in RUN_FILES:
        (p / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(p / name, ignore_errors=True)


def write_hydra_files(path: str, config: Any, hydra_config: Any, overrides: Sequence[str]) -> None:
    """.hydra/config.yaml, hydra.yaml and overrides.yaml, atomically. config.yaml is the config the run trains
    with (the recipe's per_method settings, a task type's defaults and the user's data files applied, values
    resolved), so that eval, merge and generate rebuild exactly that run."""
    from omegaconf import OmegaConf

    from frod_cli.runs.io import atomic_write_text

    d = os.path.join(path, ".hydra")
    for name, node in (("config.yaml", config), ("hydra.yaml", {"hydra": hydra_config}),
                       ("overrides.yaml", list(overrides))):
        node = node if OmegaConf.is_config(node) else OmegaConf.create(node)
        atomic_write_text(os.path.join(d, name), OmegaConf.to_yaml(node))


class _QuietFileHandler(logging.FileHandler):
    """train.log: a record the disk refuses is dropped, not printed with a traceback on stderr (logging's way);
    the write that matters (a checkpoint, metrics.jsonl) fails too and ends the command with one line."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass


class RunLog:
    """The records of one run: held in memory from the start, written to <run>/train.log once the run is
    accepted (`open`), dropped if it is refused. Console output is the logging config's, unchanged."""

    FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"

    def __init__(self, level: int = logging.INFO):
        self.buffer: Optional[logging.handlers.MemoryHandler] = logging.handlers.MemoryHandler(
            capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        self.buffer.setLevel(level)
        self.file: Optional[logging.Handler] = None
        logging.getLogger().addHandler(self.buffer)

    def open(self, path: str) -> None:
        """Start <path> (appended to when it exists: a resumed run) with the records held so far."""
        handler = _QuietFileHandler(path, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter(self.FORMAT))
        handler.setLevel(self.buffer.level if self.buffer is not None else logging.INFO)
        if self.buffer is not None:
            self.buffer.setTarget(handler)
            self.buffer.flush()
            self._drop_buffer()
        self.file = handler
        logging.getLogger().addHandler(handler)

    def _drop_buffer(self) -> None:
        if self.buffer is not None:
            logging.getLogger().removeHandler(self.buffer)
            self.buffer.setTarget(None)
            self.buffer.close()
            self.buffer = None

    def close(self) -> None:
        self._drop_buffer()
        if self.file is not None:
            logging.getLogger().removeHandler(self.file)
            self.file.close()
            self.file = None


def check_output(path: str, overwrite: bool, key: str = "output") -> None:
    """The rule of every verb that writes a file or directory the user names (eval, merge, generate, export):
    an existing one is refused unless overwrite=true, which replaces it only once the new one is complete."""
    from frod_cli import FrodCliError

    if os.path.lexists(path) and not overwrite:
        kind = "directory" if os.path.isdir(path) else "file"
        raise FrodCliError(f"{key} {path}: the {kind} exists; overwrite=true replaces it (once the new one is "
                           "complete), or name another")


def leftovers(path: str) -> List[str]:
    """Top-level names in `path` (for messages)."""
    return sorted(os.listdir(path))[:5] if os.path.isdir(path) else []


def missing_dirs(path: str) -> List[str]:
    """`path` and those of its ancestors that do not exist yet, outermost first: what creating it would make."""
    out: List[str] = []
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        out.insert(0, path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


def remove_if_empty(dirs: Sequence[str]) -> None:
    """Remove the directories a refused or failed command made (`missing_dirs` before it ran), innermost first,
    each only while empty: anything written into one since keeps it."""
    for d in reversed(list(dirs)):
        try:
            os.rmdir(d)
        except OSError:
            pass

