"""Atomic, safe checkpoint files.

``save_checkpoint`` writes to a temporary file in the destination folder, flushes it to disk
and renames it over the destination with :func:`os.replace` (atomic on POSIX and Windows), so
a crash mid-write never leaves a truncated checkpoint behind.  ``load_checkpoint`` uses
``torch.load(..., weights_only=True)``: only tensors and plain containers / numbers / strings
are unpickled, so loading a file from elsewhere cannot run code.  Checkpoints must therefore
hold only such values (state dicts, lists, dicts, numbers, strings, ``None``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file + ``os.replace``); return the path.

    Missing parent folders are created.  On any error the temporary file is removed and the
    previous content of ``path`` (if any) is left untouched.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping, got {type(state).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)
