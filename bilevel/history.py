"""Result and History records of outer loops, and tolerance schedules.

Library code never prints: every outer loop returns a :class:`Result` whose :class:`History`
holds one record per outer iteration. Progress bars and plots read the History.
"""
from __future__ import annotations

import math
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

from torch import Tensor

__all__ = ["History", "Result", "tolerance_schedule", "SCHEDULES", "check_writable",
           "CorruptCheckpointError", "verify_checkpoint"]


class CorruptCheckpointError(ValueError):
    """A checkpoint file exists but its content cannot be trusted: truncated, overwritten,
    bytes changed after it was written (a record's CRC-32 does not match), or not a
    checkpoint at all.  The message names the file."""


def verify_checkpoint(path) -> None:
    """Check every record of the ``torch.save`` zip archive at ``path`` against the CRC-32
    stored when it was written (:meth:`zipfile.ZipFile.testzip`); raise
    :class:`CorruptCheckpointError` naming the file (and the damaged record) otherwise.

    ``torch.load`` reads tensor records without checking their CRC, so a flipped byte inside
    a tensor would otherwise load as a silently different value.
    """
    name = os.fspath(path)
    try:
        with zipfile.ZipFile(name) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CorruptCheckpointError(
            f"checkpoint {name!r} is not a readable torch.save archive ({type(exc).__name__}: "
            f"{str(exc)[:200]}); it is truncated, overwritten or not a checkpoint") from None
    if bad is not None:
        raise CorruptCheckpointError(
            f"checkpoint {name!r} is corrupt: record {bad!r} does not match the CRC-32 stored "
            f"when it was written (bytes changed on disk); delete it or use another copy")


class History:
    """Per-outer-iteration records (a list of dicts with the same keys).

    Standard keys: ``iteration``, ``upper_loss``, ``grad_norm``, ``tol``, ``inner_iterations``
    (max over samples), ``cg_iterations``, ``seconds`` (wall time of that iteration),
    ``elapsed`` (cumulative seconds), ``cost`` (cumulative inner + CG iterations), ``step_size``,
    ``accepted``, ``inner_converged``, ``cg_converged`` and ``theta`` (floats per name).
    Optimisers may add keys (MAID: ``eps``, ``delta``, ``error_bound``).
    """

    def __init__(self, records: Optional[List[Dict[str, Any]]] = None):
        self.records: List[Dict[str, Any]] = list(records or [])

    def append(self, **record: Any) -> None:
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __iter__(self):
        return iter(self.records)

    def column(self, key: str) -> list:
        """All values of ``key`` in iteration order (``None`` where a record lacks it)."""
        if self.records and all(key not in r for r in self.records):
            raise KeyError(f"no History record has key {key!r}; keys: {sorted(self.records[0])}")
        return [r.get(key) for r in self.records]

    def as_dict(self) -> Dict[str, list]:
        """Column-oriented copy, convenient for JSON."""
        keys: List[str] = []
        for r in self.records:
            keys += [k for k in r if k not in keys]
        return {k: [r.get(k) for r in self.records] for k in keys}

    def plot(self, path: Optional[str] = None, y: str = "upper_loss", x: str = "iteration",
             ax=None, label: Optional[str] = None, logy: bool = True):
        """Line plot of column ``y`` against column ``x`` (matplotlib); saved to ``path`` if given."""
        import matplotlib
        if path is not None and ax is None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(self.column(x), self.column(y), marker=".", label=label)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(y.replace("_", " "))
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if own and path is not None:
            fig.tight_layout()
            save_figure(fig, path)
            plt.close(fig)
        return ax


def check_writable(path, name: str = "checkpoint") -> None:
    """Fail early (``ValueError`` naming ``name``) when ``path`` cannot be a file: it is a
    directory, or a parent of it is an existing file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")
    full = os.path.abspath(os.fspath(path))
    if os.path.isdir(full):
        raise ValueError(f"{name} {os.fspath(path)!r} is a directory; give a file path")
    parent = os.path.dirname(full)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise ValueError(f"{name} {os.fspath(path)!r}: its parent {parent!r} is a file, not a folder")


def plain_payload(obj: Any, where: str = "payload") -> Any:
    """``obj`` with numpy scalars and arrays turned into Python numbers and tensors, paths into
    strings, tuples into lists; anything else that ``torch.load(..., weights_only=True)`` would
    refuse raises ``TypeError`` naming where it sits (so a saved Result can always be loaded)."""
    import numpy as np
    import torch

    if isinstance(obj, np.generic):  # before float: np.float64 is a float subclass
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return {k: plain_payload(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_payload(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, torch.dtype):
        return obj
    raise TypeError(f"Result.save: {where} is a {type(obj).__name__}, which a weights-only load "
                    f"cannot read; store tensors, numbers, strings, lists or dicts")


def save_figure(fig, path: str) -> None:
    """Write a matplotlib figure atomically (temporary file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    ext = os.path.splitext(path)[1] or ".png"
    fd, tmp = tempfile.mkstemp(suffix=ext, dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclass
class Result:
    """Outcome of an outer loop, after ``scipy.optimize.OptimizeResult``.

    ``theta`` the final hyperparameters (the last accepted iterate), ``x`` the inner solution at
    ``theta``, ``history`` the per-iteration records, ``success``/``message`` why it stopped,
    ``n_iter`` outer iterations, ``params`` the outer loss' trainable parameters (if any) by
    name. ``best_theta``/``best_x``/``best_loss``/``best_iteration``: the accepted iterate with
    the lowest upper loss (as computed at the accuracy used there); ``last_theta`` the last
    point the loop tried (accepted or not).
    """

    theta: Dict[str, Tensor]
    x: Optional[Tensor]
    history: History
    success: bool
    message: str
    n_iter: int
    params: Dict[str, Tensor] = field(default_factory=dict)
    #: what an outer loop needs to continue this run (``HOAG.run(..., resume=result)``)
    state: Dict[str, Any] = field(default_factory=dict)
    best_theta: Optional[Dict[str, Tensor]] = None
    best_x: Optional[Tensor] = None
    best_loss: float = math.nan
    best_iteration: Optional[int] = None
    last_theta: Optional[Dict[str, Tensor]] = None

    _FIELDS = ("theta", "x", "history", "success", "message", "n_iter", "params", "state",
               "best_theta", "best_x", "best_loss", "best_iteration", "last_theta")

    def save(self, path: str) -> None:
        """Write the result atomically (temporary file + rename) with ``torch.save``; only
        tensors, numbers, strings, lists and dicts are stored, so :meth:`load` can use
        ``torch.load(..., weights_only=True)``."""
        import torch
        payload = {k: getattr(self, k) for k in self._FIELDS}
        payload["history"] = self.history.records
        payload = {k: plain_payload(v, k) for k, v in payload.items()}
        payload["format"] = "bilevel.Result/1"
        check_writable(path, "path")
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str) -> "Result":
        """Read a result written by :meth:`save` (``weights_only=True``: nothing is unpickled).

        Raises ``FileNotFoundError`` for a missing file and :class:`CorruptCheckpointError` (a
        ``ValueError``) naming the file for an empty, corrupt (every record's CRC-32 is
        checked, :func:`verify_checkpoint`) or foreign one."""
        import torch
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no Result checkpoint at {path!r}")
        if os.path.getsize(path) == 0:
            raise CorruptCheckpointError(f"Result checkpoint {path!r} is empty (an interrupted "
                                         f"write?)")
        verify_checkpoint(path)
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt zip, truncated file, forbidden pickle content
            raise CorruptCheckpointError(
                f"Result checkpoint {path!r} is corrupt or not a bilevel Result "
                f"({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(d, dict) or d.get("format") != "bilevel.Result/1":
            raise CorruptCheckpointError(f"{path!r} is not a bilevel Result checkpoint (written by "
                             f"Result.save); found {type(d).__name__}")
        kwargs = {k: d[k] for k in cls._FIELDS if k in d}
        kwargs["history"] = History(d["history"])
        return cls(**kwargs)

    @property
    def upper_loss(self) -> float:
        """Upper loss of the last accepted iterate."""
        acc = [r for r in self.history if r.get("accepted", True)]
        return acc[-1]["upper_loss"] if acc else math.nan


SCHEDULES = ("geometric", "quadratic", "cubic", "constant")


def tolerance_schedule(kind: Union[str, Callable[[int], float]], tol0: float = 1e-2,
                       rate: float = 0.9, tol_min: float = 0.0) -> Callable[[int], float]:
    """Inner/CG tolerance ``ε_k`` for outer iteration ``k = 0, 1, ...``.

    ``geometric``: ``ε₀ rᵏ``; ``quadratic``: ``ε₀/(k+1)²``; ``cubic``: ``ε₀/(k+1)³``;
    ``constant``: ``ε₀``; or any callable ``k ↦ ε_k``. Values are floored at ``tol_min``.
    """
    if callable(kind):
        return lambda k: max(float(kind(k)), tol_min)
    if kind not in SCHEDULES:
        raise ValueError(f"tolerance schedule must be one of {SCHEDULES} or a callable, got {kind!r}")
    if not (tol0 > 0 and math.isfinite(tol0)):
        raise ValueError(f"tol0 must be a finite positive number, got {tol0!r}")
    if kind == "geometric" and not (0 < rate <= 1):
        raise ValueError(f"rate must lie in (0, 1] for a geometric schedule, got {rate!r}")
    f = {
        "geometric": lambda k: tol0 * rate ** k,
        "quadratic": lambda k: tol0 / (k + 1) ** 2,
        "cubic": lambda k: tol0 / (k + 1) ** 3,
        "constant": lambda k: tol0,
    }[kind]
    return lambda k: max(f(k), tol_min)
