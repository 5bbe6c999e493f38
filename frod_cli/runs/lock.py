"""One frod command at a time per run directory (or per output a verb writes): an OS-level lock held for the
length of the command, released by the kernel when the process ends, killed or not.

The lock is `fcntl.flock` on a hidden sibling, `<parent>/.<name>.frod-lock`, never a file inside what it guards:
a run directory stays "new" to frod_cli/runs/directory.py while it is locked, and a finished run never holds a
lock file. One lock stands for a run directory, its overwrite staging sibling (`.<name>.frod-overwrite`) and
every output written inside it (`eval.json`, `merged/`, `merge.json`, `export-*`), so `frod train` (a new run, a
resumed one, a replacement) and the verbs writing into that run take the same lock. An output elsewhere is
locked by its own path. Within one multi-process launch only the main process takes it.

The lock file holds its holder's pid; it is removed at release (while still locked, and a waiting opener checks
that the file it locked is still the one at that path), so nothing is left behind but by a killed process, and
that leftover holds no lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Iterator, List, Optional

from frod_cli import FrodCliError
from frod_cli.runs.directory import missing_dirs, remove_if_empty

SUFFIX = ".frod-lock"


def lock_file(path: str) -> str:
    p = os.path.abspath(path)
    return os.path.join(os.path.dirname(p), f".{os.path.basename(p)}{SUFFIX}")


def holder_pids(lock_path: str, fd: Optional[int] = None) -> List[int]:
    """The pids holding a flock on `lock_path`: the kernel's table (/proc/locks, by inode), else the pid the
    holder wrote into the file."""
    try:
        inode = os.fstat(fd).st_ino if fd is not None else os.stat(lock_path).st_ino
        with open("/proc/locks", encoding="ascii") as f:
            pids = [int(p[4]) for p in (line.split() for line in f)
                    if len(p) > 5 and p[1] == "FLOCK" and p[5].rsplit(":", 1)[-1] == str(inode)]
        if pids:
            return sorted(set(pids))
    except (OSError, ValueError):
        pass
    try:
        with open(lock_path, encoding="ascii") as f:
            text = f.read().strip()
        return [int(text)] if text.isdigit() else []
    except OSError:
        return []


class Lock:
    """The lock of one path, held by this process from `acquire` to `release`."""

    def __init__(self, path: str, what: str):
        self.path, self.what = os.path.abspath(path), what
        self.file = lock_file(self.path)
        self.fd: Optional[int] = None
        self.made: List[str] = []

    def acquire(self) -> "Lock":
        self.made = missing_dirs(os.path.dirname(self.file))
        for _ in range(100):  # another holder may remove the file between our open and our flock
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                pids = holder_pids(self.file, fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                self._refuse(pids)
            if self._still_ours(fd):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return self
            os.close(fd)
        raise FrodCliError(f"{self.what} {self.path}: could not take its lock {self.file}")

    def _open(self) -> int:
        """The lock file, opened (created, with its directory, if missing); a directory that refuses it is refused
        here, before any work, naming what was to be written."""
        try:
            os.makedirs(os.path.dirname(self.file), exist_ok=True)
            return os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self.release()
            where = os.path.dirname(self.file) if e.filename in (None, self.file) else e.filename
            raise FrodCliError(f"{self.what} {self.path} is not writable: {where}: {e.strerror or e}") from None

    def _still_ours(self, fd: int) -> bool:
        try:
            return os.stat(self.file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _refuse(self, pids: List[int]) -> None:
        self.release()
        who = f"pid {', '.join(map(str, pids))}" if pids else "a process whose pid it did not record"
        raise FrodCliError(f"{self.what} {self.path} is in use by another frod command ({who}): wait for it to "
                           "end, or pick another")

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.file)  # still locked: whoever opened it before sees it gone and opens afresh
            os.close(self.fd)
            self.fd = None
        remove_if_empty(self.made)
        self.made = []


HELD: List[Lock] = []  # this process's locks, innermost last


def hold(path: str, what: str = "run directory") -> Lock:
    """Take the lock of `path` for the rest of the command (or of the enclosing `scope`); a path this process
    holds already is held once. Refuses in one line, naming the holder's pid, when another process holds it."""
    for lock in HELD:
        if lock.path == os.path.abspath(path):
            return lock
    lock = Lock(path, what).acquire()
    HELD.append(lock)
    return lock


def enclosing_run(path: str) -> Optional[str]:
    """The run directory `path` lies in (or is), if any."""
    from frod_cli.runs.reader import is_run_dir

    p = os.path.abspath(path)
    while True:
        if is_run_dir(p):
            return p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def hold_output(out: str) -> Lock:
    """An output a verb writes: inside a run directory it is guarded by the run's own lock (the one `frod train`
    takes: one frod command writes into a run at a time), elsewhere by its own."""
    run = enclosing_run(out)
    return hold(run) if run is not None else hold(out, "output")


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Locks taken inside the block are released at its end (a sweep's job: its own run directory)."""
    depth = len(HELD)
    try:
        yield
    finally:
        release_all(depth)


def release_all(depth: int = 0) -> None:
    while len(HELD) > depth:
        HELD.pop().release()
