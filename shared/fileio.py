"""Atomic, durable file writes: readers see the old file or the new one, never a torn one.

Every writer goes to a temporary file in the destination folder, flushes and fsyncs it, then
renames it over the destination (``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], mode: int = 0o644) -> None:
    """Call ``write`` on a temporary binary file beside ``path``, fsync, then rename it over ``path``.

    ``mode``: the file's permissions (mkstemp's 0600 otherwise; partners' private state passes 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npz_atomic(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], mode: int = 0o644) -> None:
    def write(fh: IO[bytes]) -> None:
        np.savez(fh, **arrays)  # type: ignore[arg-type]

    write_atomic(path, write, mode)


def write_text_atomic(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> None:
    def write(fh: IO[bytes]) -> None:
        fh.write(text.encode("utf-8"))

    write_atomic(path, write, mode)


def json_default(obj: Any) -> Any:
    """JSON for numpy scalars and arrays, and paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def compute_strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite number as None (JSON null), numpy values as Python ones: what a strict
    JSON parser (RFC 8259; JavaScript's ``JSON.parse``, Go, jq) reads. The published files (metrics.json,
    rounds.jsonl) are written through it: Python's default NaN / Infinity literals are not JSON."""
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: compute_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [compute_strict_json(v) for v in obj]
    return obj


def dumps_strict(obj: Any, indent: int | None = None) -> str:
    """:func:`compute_strict_json` of ``obj`` as JSON text (never a NaN / Infinity literal)."""
    return json.dumps(compute_strict_json(obj), indent=indent, default=json_default, allow_nan=False)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, mode: int = 0o644) -> None:
    """``obj`` as indented JSON, atomically; ``mode`` 0o600 for a partner's private records (set before the
    rename, so the file is never readable by others, not even for a moment)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=json_default) + "\n", mode)


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing, unreadable, not JSON or not an object."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None
