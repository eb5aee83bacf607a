"""Atomic, verified, safe checkpoint files, and the one resume rule of every ``recon`` trainer.

``save_checkpoint`` writes through :func:`recon.io.atomic_write` (temporary file in the
destination folder, ``fsync``, :func:`os.replace`), so a crash mid-write never leaves a
truncated checkpoint behind, and temporary files of killed writers are removed by the next
save.  It stores only what ``torch.load(..., weights_only=True)`` can read back: numpy scalars
and arrays and ``pathlib`` paths are converted (to Python numbers, tensors and strings), any
other object is refused *before* writing with a ``TypeError`` naming its key.

``load_checkpoint`` first checks every record of the file against the CRC-32 stored when it
was written (:func:`bilevel.history.verify_checkpoint`: ``torch.load`` itself never checks it,
so a flipped byte inside a tensor would load as a different number), then uses
``torch.load(..., weights_only=True)``: only tensors and plain containers / numbers / strings
are unpickled, so loading a file from elsewhere cannot run code.  A file that cannot be
trusted raises :class:`CorruptCheckpointError` naming the file (the class of
:mod:`bilevel.history`, shared with :meth:`bilevel.Result.load`).

The resume rule (:func:`check_resume`): a trainer that continues a checkpoint compares the
settings saved in it with the current ones and refuses every difference, listing each one as
``key: saved (saved) != now (now)`` (:class:`ResumeMismatchError`), unless the caller names the
keys that may change (``ignore``) or explicitly accepts the changes (``accept_changes=True``,
which warns with the same list).
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from bilevel.history import CorruptCheckpointError, verify_checkpoint

from .io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "CorruptCheckpointError", "plain_state",
           "ResumeMismatchError", "settings_differences", "check_resume", "check_finite_state"]


class ResumeMismatchError(ValueError):
    """A resume with settings that differ from those saved in the checkpoint."""


_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device,
           torch.Size)


def plain_state(value: Any, where: str = "state") -> Any:
    """``value`` with numpy scalars → Python numbers, numpy arrays → tensors, paths →
    strings (recursively through dicts, lists and tuples); ``TypeError`` naming ``where`` for
    any other object, which ``torch.load(..., weights_only=True)`` would refuse."""
    if isinstance(value, torch.Tensor) or type(value) in _LEAVES:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {plain_state(k, f"key of {where}"): plain_state(v, f"{where}[{k!r}]")
                for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(plain_state(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"`{where}` is a {type(value).__module__}.{type(value).__qualname__}; a "
                    f"checkpoint holds only tensors, numbers, strings, lists, tuples and dicts "
                    f"(it must load with weights_only=True); convert it first")


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` (through :func:`plain_state`) to ``path`` atomically; return the path.

    Missing parent folders are created.  On any error the temporary file is removed and the
    previous content of ``path`` (if any) is left untouched.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"`state` must be a mapping, got {type(state).__name__}")
    payload = plain_state(dict(state))
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (CRC-checked, ``weights_only``).

    Raises ``FileNotFoundError`` for a missing file and :class:`CorruptCheckpointError`
    (a ``ValueError``) naming the file for a damaged or unreadable one or one holding
    disallowed (non-tensor, non-plain) objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    verify_checkpoint(path)
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


def check_finite_state(state_dict: Mapping[str, Any], what: str) -> None:
    """``FloatingPointError`` naming ``what`` and the first entries of ``state_dict`` (a
    model's weights and buffers) that hold NaN or infinite values."""
    bad = [name for name, t in state_dict.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point()
           and not bool(torch.isfinite(t).all())]
    if bad:
        raise FloatingPointError(f"{what} holds NaN or infinite values in {bad[:5]}"
                                 f"{' ...' if len(bad) > 5 else ''}")


# ---------------------------------------------------------------------------- the resume rule
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    return a == b


def _ignored(name: str, ignore: Iterable[str]) -> bool:
    return any(name == pat or name.endswith("." + pat) for pat in ignore)


def settings_differences(saved: Any, now: Any, prefix: str = "",
                         ignore: Iterable[str] = ()) -> list[str]:
    """Lines ``key: saved (saved) != now (now)`` for every leaf that differs (nested dicts;
    tuples and lists compare equal).  Dotted names in ``ignore`` (or ending in
    ``"." + name``) are skipped; a key present on one side only shows as ``'<missing>'``."""
    ignore = tuple(ignore)
    if isinstance(saved, Mapping) and isinstance(now, Mapping):
        out = []
        for key in sorted(set(saved) | set(now), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if _ignored(name, ignore):
                continue
            out += settings_differences(saved.get(key, "<missing>"), now.get(key, "<missing>"),
                                        name, ignore)
        return out
    a, b = _as_lists(plain_state(saved)), _as_lists(plain_state(now))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        if all(_same(x, y) for x, y in zip(a, b)):
            return []
    elif _same(a, b):
        return []
    return [f"{prefix}: {saved!r} (saved) != {now!r} (now)"]


def _as_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    return value


def check_resume(path: str | os.PathLike, saved: Mapping[str, Any], now: Mapping[str, Any], *,
                 ignore: Iterable[str] = (), accept_changes: bool = False,
                 hint: str = "use the saved settings, or a new output folder") -> list[str]:
    """The resume rule of every trainer: refuse to continue the checkpoint at ``path`` when
    its ``saved`` settings differ from the ``now`` ones.

    Raises :class:`ResumeMismatchError` listing every difference
    (:func:`settings_differences`) and ending with ``hint``; with ``accept_changes=True`` it
    warns (``UserWarning``) with the same list instead.  Returns the differences.
    """
    diffs = settings_differences(dict(saved), dict(now), ignore=ignore)
    if diffs:
        text = (f"cannot resume {os.fspath(path)!r} with other settings than it was trained "
                f"with:\n  " + "\n  ".join(diffs))
        if not accept_changes:
            raise ResumeMismatchError(f"{text}\n{hint}")
        warnings.warn(text.replace("cannot resume", "resuming", 1) + "\n(changes accepted)",
                      stacklevel=2)
    return diffs
