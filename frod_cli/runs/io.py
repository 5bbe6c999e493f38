"""Writing run files so that nothing already written is lost or half-written: every file is written to a
temporary sibling and renamed into place; logs are appended a line at a time and flushed."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from typing import Any, Callable, Dict, Iterator, List

from frod_cli.frod import atomic as _atomic
from frod_cli.frod.atomic import recover_atomic_dir  # noqa: F401  (re-exported)

_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """A write that the file system refuses (no space, quota, read-only, permission) names `path`, the file or
    directory frod was writing, rather than a temporary sibling or nothing (an OSError raised by a write() has no
    file name; safetensors reports the OS error in its message only)."""
    try:
        yield
    except OSError as e:
        if e.filename is not None and ".tmp-" not in str(e.filename):  # not in a temporary sibling: it says where
            raise
        raise OSError(e.errno, e.strerror or os.strerror(e.errno or 0), path) from e
    except Exception as e:  # noqa: BLE001 - only an I/O error reported inside another exception's message
        m = _OS_ERROR_CODE.search(str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), path) from e


def atomic_dir(path: str, write: Callable[[str], None]) -> None:
    """frod_cli.frod.atomic.atomic_dir, its file-system errors naming `path`."""
    with naming(str(path)):
        _atomic.atomic_dir(path, write)


def atomic_file(path: str, write: Callable[[str], None]) -> None:
    """frod_cli.frod.atomic.atomic_file, its file-system errors naming `path`."""
    with naming(str(path)):
        _atomic.atomic_file(path, write)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def clean_json(o: Any) -> Any:
    """NaN/inf -> None, so the JSON is standard."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: clean_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_json(v) for v in o]
    return o


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_file(path, write)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(clean_json(obj), indent=2, default=_json_default) + "\n")


class JsonlWriter:
    """Appends one JSON object per line, flushed at once (a log: readable while training)."""

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        with naming(self.path):  # a line cut by a full disk is cut off again when the run resumes
            self.f.write(json.dumps(clean_json(record), default=_json_default) + "\n")
            self.f.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # every line was flushed as written: a failed one has raised already
            self.f.close()


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows
