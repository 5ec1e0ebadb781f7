"""Writing results: every file is written whole or not at all (a temporary file renamed into place), so an
interrupted run never leaves half a report."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path: str | Path, data: str | bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode) as f:
        f.write(data)
    os.replace(tmp, path)


def write_json(summary: dict, path: str | Path):
    atomic_write(path, json.dumps(summary, indent=2, default=_jsonable) + "\n")


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
