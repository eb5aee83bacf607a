"""The ``torch`` backend: Joseph's projector as a cached sparse matrix or matrix-free.

Two exact implementations of the same matrix ``A`` (rows: rays ``a * n_det + k``,
columns: pixels ``i * W + j``; entries from :func:`~recon.operators._joseph.joseph_weights`):

``sparse``
    ``A^T`` is stored as one CSR matrix (pixel-major: row ``p`` lists the rays through
    pixel ``p``) with 32-bit indices, built once per geometry, kept in memory while any
    operator uses it and cached on disk. A batch ``(N, H, W)`` is laid out as one dense
    ``(H*W, N)`` row-major block, so a single sparse-dense product serves the whole
    batch and each stored entry reads or writes one contiguous row of ``N`` values. On
    the CPU the products run in SciPy: the adjoint as ``A^T @ Y`` (CSR, gather) and the
    forward as ``(A^T)^T @ X`` (the same arrays read as CSC, scatter). Pixel-major order
    reads the image sequentially in both directions, which at 512x512 is ~3x faster
    than a ray-major CSR forward product; SciPy also has no per-call set-up cost
    (``torch.sparse`` on the CPU re-analyses the matrix on every call). On CUDA both
    ``A`` and ``A^T`` are kept as ``torch.sparse_csr_tensor`` and multiplied by cuSPARSE.
``matrix_free``
    The weights are recomputed on the fly for chunks of angles: the forward pass
    gathers pixels, the adjoint scatters with ``index_add_`` using the same indices and
    weights, so it is the exact transpose. Reads no matrix; meant for GPUs.

Both paths act on plain tensors (no autograd); :mod:`.ray_transform` wraps them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

from ._joseph import joseph_weights
from .geometry import Geometry

log = logging.getLogger(__name__)

_FORMAT_VERSION = 3
_LOCK = threading.Lock()
_MEMORY_CACHE: "weakref.WeakValueDictionary[str, SystemMatrix]" = weakref.WeakValueDictionary()
#: Elements of the gathered intermediate per chunk of the matrix-free path.
_CHUNK_ELEMENTS = 1 << 25
#: Weights computed per chunk while assembling the sparse matrix (cache-friendly size).
_BUILD_CHUNK_ELEMENTS = 1 << 22


def default_cache_dir() -> Path:
    """Directory of the on-disk matrix cache.

    ``$RECON_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/recon/ray_transform`` (default
    ``~/.cache/recon/ray_transform``).
    """
    env = os.environ.get("RECON_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "recon" / "ray_transform"


def _angle_chunk(geometry: Geometry, per_angle_factor: int = 1, elements: int | None = None) -> int:
    per_angle = geometry.n_detectors * max(geometry.image_shape) * 2 * per_angle_factor
    return max(1, (elements or _CHUNK_ELEMENTS) // per_angle)


def build_csr(geometry: Geometry):
    """Assemble ``A^T`` (pixel-major) as ``scipy.sparse.csr_array`` (float64 values, int32 indices)."""
    import scipy.sparse as sp

    n_rows = geometry.n_angles * geometry.n_detectors
    n_cols = geometry.image_shape[0] * geometry.image_shape[1]
    chunk = _angle_chunk(geometry, elements=_BUILD_CHUNK_ELEMENTS)
    counts, cols, vals = [], [], []
    for a0 in range(0, geometry.n_angles, chunk):
        idx, w = joseph_weights(geometry, slice(a0, a0 + chunk))
        idx = idx.reshape(-1, idx.shape[-2] * 2)
        w = w.reshape(idx.shape)
        keep = w != 0
        counts.append(keep.sum(1).numpy())
        cols.append(idx[keep].numpy())
        vals.append(w[keep].numpy())
    nnz = int(sum(c.sum() for c in counts))
    if nnz >= 2**31 - 1:
        raise ValueError(f"geometry {geometry} needs {nnz} non-zeros, more than 32-bit indices allow")
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts), out=indptr[1:])
    mat = sp.csr_array(
        (np.concatenate(vals), np.concatenate(cols).astype(np.int32), indptr.astype(np.int32)),
        shape=(n_rows, n_cols),
    )
    return mat.T.tocsr()  # CSR of the transpose: sorted indices, pixel-major


class SystemMatrix:
    """``A^T`` of one geometry as a CSR matrix, with per-dtype/device copies.

    Use :meth:`get` to share one instance between operators of equal geometry.
    """

    def __init__(self, mat_t):
        self.shape = mat_t.shape[::-1]  # shape of A: (rays, pixels)
        self.nnz = int(mat_t.nnz)
        self._host = {np.dtype(np.float64): mat_t}
        self._device: dict = {}

    # ------------------------------------------------------------ construction
    @classmethod
    def get(cls, geometry: Geometry, cache: bool | str | os.PathLike = True) -> "SystemMatrix":
        """The matrix of ``geometry`` from memory, the disk cache, or freshly built.

        ``cache``: ``True`` uses :func:`default_cache_dir`, a path uses that folder,
        ``False`` never touches the disk.
        """
        key = geometry.cache_key()
        with _LOCK:
            hit = _MEMORY_CACHE.get(key)
            if hit is not None:
                return hit
            folder = None if cache is False else (default_cache_dir() if cache is True else Path(cache))
            path = None if folder is None else folder / f"joseph_v{_FORMAT_VERSION}_{key[:40]}.npz"
            mat_t = _load(path, geometry) if path is not None else None
            if mat_t is None:
                mat_t = build_csr(geometry)
                if path is not None:
                    _save(path, mat_t)
            obj = cls(mat_t)
            _MEMORY_CACHE[key] = obj
            return obj

    def angle_subset(self, geometry: Geometry, i: int, m: int, subset_geometry: Geometry) -> "SystemMatrix":
        """The matrix of the angles ``i, i + m, ...`` of ``geometry`` (rays ``a * n_det + k``).

        Slices the rows out of this matrix (no rebuild); shared through the in-memory cache
        under ``subset_geometry``'s key like :meth:`get`.
        """
        n_det = geometry.n_detectors
        angles = np.arange(geometry.n_angles)[i::m]
        rows = (angles[:, None] * n_det + np.arange(n_det)[None, :]).reshape(-1)
        key = subset_geometry.cache_key()
        with _LOCK:
            hit = _MEMORY_CACHE.get(key)
            if hit is None:
                hit = type(self)(self._host[np.dtype(np.float64)][:, rows].tocsr())
                _MEMORY_CACHE[key] = hit
            return hit

    # ------------------------------------------------------------------ access
    def host(self, dtype):
        """SciPy CSR ``A^T`` with values of numpy ``dtype`` (index arrays shared)."""
        import scipy.sparse as sp

        dtype = np.dtype(dtype)
        if dtype not in self._host:
            m = self._host[np.dtype(np.float64)]
            self._host[dtype] = sp.csr_array((m.data.astype(dtype), m.indices, m.indptr), shape=m.shape)
        return self._host[dtype]

    def torch(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """``torch.sparse_csr_tensor`` copies of ``(A, A^T)`` on ``device``."""
        key = (dtype, str(device))
        if key not in self._device:
            np_dtype = torch.empty((), dtype=dtype).numpy().dtype
            mat_t = self.host(np_dtype)
            mats = []
            for m in (mat_t.T.tocsr(), mat_t):
                mats.append(
                    torch.sparse_csr_tensor(
                        torch.from_numpy(m.indptr.astype(np.int32)),
                        torch.from_numpy(m.indices.astype(np.int32)),
                        torch.from_numpy(m.data),
                        size=m.shape,
                        check_invariants=False,
                    ).to(device)
                )
            self._device[key] = tuple(mats)
        return self._device[key]


_ARRAYS = ("indptr", "indices", "data", "shape")


def _checksum(arrays: dict) -> str:
    """Hex SHA-256 of the cache arrays (dtype, shape and bytes of each, in a fixed order)."""
    h = hashlib.sha256(f"joseph-cache-v{_FORMAT_VERSION}".encode())
    for name in _ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _save(path: Path, mat) -> None:  # mat: the CSR A^T
    """Write ``mat`` and its checksum to ``path`` atomically (``recon.io.atomic_write``); never pickles."""
    from ..io import atomic_write

    arrays = {"indptr": mat.indptr, "indices": mat.indices, "data": mat.data,
              "shape": np.asarray(mat.shape, dtype=np.int64)}
    try:
        with atomic_write(path, "wb") as fh:
            np.savez(fh, **arrays, checksum=np.asarray(_checksum(arrays)))
    except OSError as exc:  # a read-only or full disk must not break the operator
        log.warning("could not write ray-transform cache %s: %s", path, exc)


def _validate(z, expect: tuple[int, int]) -> dict:
    """The arrays of an opened cache file, or ``ValueError`` saying what is wrong with them."""
    arrays = {name: z[name] for name in _ARRAYS}
    if str(z["checksum"]) != _checksum(arrays):
        raise ValueError("checksum mismatch (file modified or damaged)")
    indptr, indices, data = arrays["indptr"], arrays["indices"], arrays["data"]
    if tuple(int(s) for s in arrays["shape"]) != expect:
        raise ValueError(f"shape {tuple(arrays['shape'])} != {expect}")
    if indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
        raise ValueError(f"index arrays of dtype {indptr.dtype}, {indices.dtype} are not integers")
    if indptr.ndim != 1 or indptr.shape[0] != expect[0] + 1 or indices.ndim != 1 \
            or data.shape != indices.shape:
        raise ValueError("array lengths do not form a CSR matrix")
    if indptr[0] != 0 or indptr[-1] != indices.shape[0] or np.any(np.diff(indptr) < 0):
        raise ValueError("row pointers are not a non-decreasing 0 .. nnz sequence")
    if indices.size and (indices.min() < 0 or indices.max() >= expect[1]):
        raise ValueError(f"column indices outside [0, {expect[1]})")
    if data.dtype != np.float64 or not np.all(np.isfinite(data)):
        raise ValueError("values are not finite float64")
    return arrays


def _load(path: Path, geometry: Geometry):
    """The cached CSR ``A^T`` at ``path``, or ``None`` (missing or invalid: caller rebuilds)."""
    import scipy.sparse as sp

    if not path.is_file():
        return None
    expect = (geometry.image_shape[0] * geometry.image_shape[1], geometry.n_angles * geometry.n_detectors)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = _validate(z, expect)
        return sp.csr_array((arrays["data"], arrays["indices"].astype(np.int32, copy=False),
                             arrays["indptr"].astype(np.int32, copy=False)), shape=expect)
    except Exception as exc:  # noqa: BLE001 - any damage (zip, zlib, EOF, values): rebuild
        log.warning("ray-transform cache %s is invalid (%s: %s); rebuilding it",
                    path, type(exc).__name__, exc)
        return None


# ---------------------------------------------------------------- projectors
class SparseProjector:
    """Projector that multiplies by the cached CSR matrix (SciPy on CPU, cuSPARSE on CUDA)."""

    method = "sparse"

    def __init__(self, geometry: Geometry, cache=True, matrix: SystemMatrix | None = None):
        self.geometry = geometry
        self.cache = cache
        self._matrix = matrix

    @property
    def matrix(self) -> SystemMatrix:
        """The :class:`SystemMatrix`, built or loaded on first use."""
        if self._matrix is None:
            self._matrix = SystemMatrix.get(self.geometry, self.cache)
        return self._matrix

    def subset(self, i: int, m: int, geometry: Geometry) -> "SparseProjector":
        """Projector of the angles ``i, i + m, ...`` (``geometry``: their geometry).

        Reuses this projector's matrix rows when the matrix is in memory, else builds lazily.
        """
        matrix = None
        if self._matrix is not None:
            matrix = self._matrix.angle_subset(self.geometry, i, m, geometry)
        return SparseProjector(geometry, cache=self.cache, matrix=matrix)

    def _apply(self, x: torch.Tensor, transpose: bool, out_shape) -> torch.Tensor:
        x = x.detach()
        n = x.shape[0]
        cols = x.reshape(n, -1).t()  # (n_in, N) view
        if x.device.type == "cpu":
            dense = np.ascontiguousarray(cols.numpy())
            mat_t = self.matrix.host(dense.dtype)
            res = torch.from_numpy(np.asarray((mat_t if transpose else mat_t.T) @ dense))
        else:
            mat = self.matrix.torch(x.dtype, x.device)[int(transpose)]
            res = torch.sparse.mm(mat, cols.contiguous())
        return res.t().reshape((n,) + tuple(out_shape)).contiguous()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, H, W) -> (N, n_angles, n_det)``."""
        return self._apply(x, False, self.geometry.range_shape)

    def backproject(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, n_angles, n_det) -> (N, H, W)``, the exact transpose of :meth:`project`."""
        return self._apply(y, True, self.geometry.image_shape)


class MatrixFreeProjector:
    """Projector that recomputes Joseph's weights on the fly (gather / ``index_add_``)."""

    method = "matrix_free"

    def __init__(self, geometry: Geometry):
        self.geometry = geometry

    def _chunks(self, n: int):
        step = _angle_chunk(self.geometry, max(1, n))
        for a0 in range(0, self.geometry.n_angles, step):
            yield slice(a0, min(a0 + step, self.geometry.n_angles))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, H, W) -> (N, n_angles, n_det)`` by gathering pixels per chunk of angles."""
        n = x.shape[0]
        flat = x.reshape(n, -1)
        out = x.new_empty((n,) + self.geometry.range_shape)
        for sl in self._chunks(n):
            idx, w = joseph_weights(self.geometry, sl, device=x.device, dtype=x.dtype)
            out[:, sl] = (flat[:, idx] * w).sum((-1, -2))
        return out

    def backproject(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, n_angles, n_det) -> (N, H, W)``: ``index_add_`` with the forward's indices and weights."""
        n = y.shape[0]
        out = y.new_zeros((n, self.geometry.image_shape[0] * self.geometry.image_shape[1]))
        for sl in self._chunks(n):
            idx, w = joseph_weights(self.geometry, sl, device=y.device, dtype=y.dtype)
            contrib = y[:, sl, :, None, None] * w
            out.index_add_(1, idx.reshape(-1), contrib.reshape(n, -1))
        return out.reshape((n,) + self.geometry.image_shape)
