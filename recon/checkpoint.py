"""Atomic, safe checkpoint files.

``save_checkpoint`` writes through :func:`recon.io.atomic_write` (temporary file in the
destination folder, ``fsync``, :func:`os.replace`), so a crash mid-write never leaves a
truncated checkpoint behind, and temporary files of killed writers are removed by the next
save.  ``load_checkpoint`` uses ``torch.load(..., weights_only=True)``: only tensors and plain
containers / numbers / strings are unpickled, so loading a file from elsewhere cannot run
code.  A file that cannot be read raises :class:`CorruptCheckpointError` naming the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from .io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "CorruptCheckpointError"]


class CorruptCheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (truncated, overwritten, not a checkpoint)."""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`recon.io.atomic_write`); return the path.

    Missing parent folders are created.  On any error the temporary file is removed and the
    previous content of ``path`` (if any) is left untouched.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"`state` must be a mapping, got {type(state).__name__}")
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        torch.save(dict(state), handle)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises ``FileNotFoundError`` for a missing file and :class:`CorruptCheckpointError`
    (a ``ValueError``) naming the file for an unreadable one or one holding disallowed
    (non-tensor, non-plain) objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain values and "
            f"is refused (never unpickled): {str(exc).splitlines()[0]}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            AttributeError, IndexError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it and train again, or "
            f"resume from another copy") from exc
    if not isinstance(state, dict):
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} holds a {type(state).__name__}, expected a dict")
    return state
