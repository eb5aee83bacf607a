"""The one way ``recon`` writes files: atomically, durably, without leftovers.

:func:`atomic_write` opens a temporary file *in the destination folder*, hands it to the
caller, flushes and ``fsync``\\ s it, then renames it over the destination with
:func:`os.replace` (atomic on POSIX and Windows) and ``fsync``\\ s the folder.  A crash or an
exception at any point leaves the previous content of the destination untouched; on an
exception the temporary file is removed.  A process killed with ``SIGKILL`` cannot clean up,
so temporary names carry the writer's process id (``.<name>.<pid>.<random>.tmp``) and every
later write to the same destination removes the temporary files of writers that no longer
run (:func:`clean_stale_temps`).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_write", "clean_stale_temps", "temp_files"]

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files of :func:`atomic_write` for destination ``path`` (any writer)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    out = []
    for entry in path.parent.iterdir():
        match = _TEMP.match(entry.name)
        if match and match["name"] == path.name:
            out.append(entry)
    return sorted(out)


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files for ``path`` left by writers that no longer run; return them."""
    removed = []
    for tmp in temp_files(path):
        pid = int(_TEMP.match(tmp.name)["pid"])
        if not _pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Context manager yielding a file object whose content replaces ``path`` on success.

    ``mode`` is ``"wb"`` (bytes) or ``"w"`` (UTF-8 text).  Missing parent folders are created.
    On success: flush, ``fsync``, ``os.replace(tmp, path)``, ``fsync`` of the folder.  On any
    exception the temporary file is removed and ``path`` keeps its previous content.

    >>> with atomic_write("out/table.json", "w") as fh:
    ...     fh.write("{}")
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"`mode` must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"`path` {str(path)!r} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
