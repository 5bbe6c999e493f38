"""Atomic directory writes (stdlib only): a directory is built under a temporary sibling name and moved
into place whole, so a kill leaves either the previous complete version or the new one."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def chmod_tree(path: str) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries: give them the usual umask modes."""
    mask = _umask()
    if os.path.isdir(path):
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def install_dir(tmp: str, path: str) -> None:
    """Move the finished directory `tmp` to `path`, replacing a previous version only at the last moment
    (`recover_atomic_dir` repairs the one window between the two renames)."""
    tmp, path = os.path.abspath(str(tmp)), os.path.abspath(str(path))
    chmod_tree(tmp)
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
        os.rmdir(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def atomic_dir(path: str, write: Callable[[str], None]) -> None:
    """Let `write(tmp_dir)` fill a temporary sibling directory, then move it to `path` (replacing
    any previous version only once the new one is complete)."""
    path = os.path.abspath(str(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        write(tmp)
        install_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_atomic_dir(path: str) -> None:
    """Undo the one window `atomic_dir` leaves: killed between moving the old version aside and moving
    the new one in, `path` is missing and `.<name>.old-*` holds the previous complete version."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return
    parent, name = os.path.dirname(path), os.path.basename(path)
    if not os.path.isdir(parent):
        return
    olds = sorted((e for e in os.listdir(parent) if e.startswith(f".{name}.old-")),
                  key=lambda e: os.path.getmtime(os.path.join(parent, e)), reverse=True)
    if olds:
        os.replace(os.path.join(parent, olds[0]), path)


def atomic_file(path: str, write: Callable[[str], None]) -> None:
    """Let `write(tmp_file)` write a temporary sibling of `path`, then rename it into place: a reader sees
    the previous file or the complete new one, never a part of it."""
    path = os.path.abspath(str(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    os.close(fd)
    try:
        write(tmp)
        chmod_tree(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
