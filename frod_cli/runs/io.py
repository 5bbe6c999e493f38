"""Writing run files so that nothing already written is lost or half-written: every file is written to a
temporary sibling and renamed into place; logs are appended a line at a time and flushed."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List

from frod_cli.frod.atomic import atomic_dir, atomic_file, recover_atomic_dir  # noqa: F401  (re-exported)


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
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        self.f.write(json.dumps(clean_json(record), default=_json_default) + "\n")
        self.f.flush()

    def close(self) -> None:
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
