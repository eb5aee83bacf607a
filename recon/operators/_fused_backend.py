r"""The ``fused`` method of the ``torch`` backend: Joseph's projector without a stored matrix.

Same discretisation as :mod:`._joseph` (and hence as the sparse matrix), rewritten so that one
ray needs four numbers. Along ray ``r`` the sample of step ``s`` (column ``s`` for a
column-stepping ray, ``|d_x| >= |d_y|``; row ``s`` otherwise) sits at the fractional index

.. math::

    c_r(s) = c^0_r + s\, c^1_r

of the interpolated axis (the row index for a column-stepping ray), an affine function of
``s``: for a column-stepping ray with point ``p`` and direction ``d``,
``c^0 = (h/2 - p_y - (x_0 - p_x) d_y/d_x)/dy - 1/2`` (``x_0 = -w/2 + dx/2``) and
``c^1 = -(dx/dy)(d_y/d_x)``; rows and columns swap for a row-stepping ray. With
``i = floor(c)``, ``f = c - i`` and the step length ``L_r = dx/|d_x|`` (or ``dy/|d_y|``)

.. math::

    (A x)_r = L_r \sum_{s} \bigl[(1 - f)\, x[i, s] + f\, x[i + 1, s]\bigr]

(indices outside the image count as zero), which is exactly ``sum_p A[r, p] x[p]`` of the
sparse matrix: the branch, ``c^0``, ``c^1`` and ``L`` are computed once per ray in float64
from the geometry, and ``c_r(s)`` is evaluated in float64 too (whatever the data's dtype; only
``f`` and the products are in the data's dtype), so both paths choose the same pixels with
weights that differ only by float64 rounding; in float32 the results differ from the
sparse matrix's by its own float32 rounding. The adjoint scatters
``L_r (1 - f) y_r`` and ``L_r f y_r`` to the same two pixels: the same index/weight pairs read
backwards, so ``<A x, y> = <x, A^T y>`` holds to rounding.

Two implementations compute this arithmetic:

``"torch"``
    pure PyTorch, chunked over angles (gather / ``index_add_``); runs anywhere and is the
    reference the kernels are tested against.
``"triton"``
    Triton kernels, one program per (detector block, angle, batch block): the forward
    marches the block of rays through the image and gathers; the adjoint either marches the
    same rays and scatters with ``atomic_add`` (any geometry; summation order, hence the last
    bits of float32 results, may vary between runs), or, for parallel beam, runs one program
    per pixel block that gathers from the few rays of each angle that can reach the pixel and
    keeps exactly the forward's (index, weight) pairs (deterministic, no atomics). Both are
    the exact transpose of the forward's arithmetic. The
    per-ray coefficients are computed once per tile and shared by the ``BLOCK_B`` slices of
    the batch block, so the time per slice falls with the batch. Column-stepping rays read a
    transposed copy of the image, so neighbouring rays read neighbouring addresses. Used for
    CUDA tensors when Triton is importable, and for CPU tensors under ``TRITON_INTERPRET=1``
    (Triton's interpreter; slow, for tests).

Subsets are slices of the per-ray tables (no rebuild), coarse grids a new table (O(rays)).
"""

from __future__ import annotations

import math
import os

import torch

from .geometry import Geometry

__all__ = ["FusedProjector", "ray_tables", "triton_available", "KERNELS"]

#: ``kernel`` choices of :class:`FusedProjector`.
KERNELS = ("auto", "triton", "torch")
#: Elements of the gathered intermediate per chunk of the torch reference.
_CHUNK_ELEMENTS = 1 << 24


def triton_available() -> bool:
    """Whether ``import triton`` works (it is imported lazily, only by the ``triton`` kernel)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# ---------------------------------------------------------------- per-ray tables
def ray_tables(geometry: Geometry) -> dict[str, torch.Tensor]:
    r"""Per-ray coefficients of Joseph's projector, float64 / int32, each ``(n_angles, n_det)``.

    ``c0``, ``c1``: the interpolated index ``c(s) = c0 + s c1`` at step ``s``; ``length``: the
    step length ``L``; ``column``: 1 for column-stepping rays (``|d_x| >= |d_y|``), else 0;
    ``lo``, ``hi``: a step range ``[lo, hi)`` outside which both weights are zero (``c(s)``
    leaves ``(-1, n_interp)``), padded by one step on each side so rounding never cuts a sample.
    """
    H, W = geometry.image_shape
    h, w = geometry.extent
    dy, dx = geometry.pixel_size
    p, d = geometry.rays(None, dtype=torch.float64)
    px, py, ux, uy = p[..., 0], p[..., 1], d[..., 0], d[..., 1]
    column = ux.abs() >= uy.abs()
    one = torch.ones_like(ux)
    sux, suy = torch.where(column, ux, one), torch.where(column, one, uy)
    x0, y0 = -w / 2 + 0.5 * dx, h / 2 - 0.5 * dy
    c0_col = (h / 2 - (py + (x0 - px) / sux * uy)) / dy - 0.5
    c1_col = -(dx * uy / sux) / dy
    c0_row = (px + (y0 - py) / suy * ux + w / 2) / dx - 0.5
    c1_row = -(dy * ux / suy) / dx
    c0 = torch.where(column, c0_col, c0_row)
    c1 = torch.where(column, c1_col, c1_row)
    length = torch.where(column, dx / ux.abs(), dy / uy.abs())
    n_steps = torch.where(column, torch.tensor(W), torch.tensor(H)).to(torch.float64)
    n_interp = torch.where(column, torch.tensor(H), torch.tensor(W)).to(torch.float64)
    lo, hi = _step_range(c0, c1, n_interp, n_steps)
    return {"c0": c0, "c1": c1, "length": length, "column": column.to(torch.int32),
            "lo": lo, "hi": hi}


def _step_range(c0, c1, n_interp, n_steps):
    """Steps ``s`` in ``[0, n_steps)`` with ``-1 < c0 + s c1 < n_interp``, widened by one."""
    flat = c1 == 0
    safe = torch.where(flat, torch.ones_like(c1), c1)
    a, b = (-1.0 - c0) / safe, (n_interp - c0) / safe
    s_min, s_max = torch.minimum(a, b), torch.maximum(a, b)
    inside = (c0 > -1.0) & (c0 < n_interp)
    s_min = torch.where(flat, torch.where(inside, 0.0, math.inf), s_min)
    s_max = torch.where(flat, torch.where(inside, n_steps, -math.inf), s_max)
    lo = torch.clamp(torch.floor(s_min) - 1, min=0.0)
    lo = torch.minimum(lo, n_steps)
    hi = torch.minimum(torch.ceil(s_max) + 2, n_steps)
    hi = torch.maximum(hi, lo)
    return lo.to(torch.int32), hi.to(torch.int32)


# ---------------------------------------------------------------- torch reference
def _reference_samples(tab: dict, geometry: Geometry, sl: slice, dtype):
    """Flat indices into the two-layer image buffer and weights of the rays of angles ``sl``.

    Layer 0 is the image ``(H, W)`` (row-stepping rays read ``x[s, i]``), layer 1 its
    transpose ``(W, H)`` (column-stepping rays read ``x[i, s]`` at ``s * H + i``).
    Returns ``index, weight``, each ``(n_a, n_det, S, 2)``.
    """
    H, W = geometry.image_shape
    c0, c1 = tab["c0"][sl], tab["c1"][sl]  # float64
    col = tab["column"][sl].bool()
    device = c0.device
    S = max(H, W)
    s = torch.arange(S, device=device)
    coord = c0[..., None] + s.to(c0.dtype) * c1[..., None]
    base = torch.floor(coord)
    f = (coord - base).to(dtype)
    i0 = base.long()
    n_steps = torch.where(col, W, H)[..., None]
    n_interp = torch.where(col, H, W)[..., None]
    idx = torch.stack([i0, i0 + 1], -1)
    ok = ((s < n_steps) [..., None]) & (idx >= 0) & (idx < n_interp[..., None])
    flat = torch.where(col[..., None, None], H * W, 0) + s[:, None] * n_interp[..., None] + idx
    wts = torch.stack([1.0 - f, f], -1) * tab["length"][sl].to(dtype)[..., None, None]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(ok, flat, 0), torch.where(ok, wts, zero)


def _two_layers(x: torch.Tensor) -> torch.Tensor:
    """``(N, H, W) -> (N, 2 H W)``: the image and its transpose, flattened side by side."""
    n = x.shape[0]
    return torch.cat([x.reshape(n, -1), x.transpose(1, 2).reshape(n, -1)], 1)


def _fold_layers(buf: torch.Tensor, shape) -> torch.Tensor:
    """Inverse bookkeeping of :func:`_two_layers`: ``layer0 + layer1^T`` as ``(N, H, W)``."""
    H, W = shape
    n = buf.shape[0]
    a = buf[:, : H * W].reshape(n, H, W)
    b = buf[:, H * W:].reshape(n, W, H).transpose(1, 2)
    return a + b


def _reference_project(x, tab, geometry):
    n = x.shape[0]
    src = _two_layers(x)
    out = x.new_empty((n,) + geometry.range_shape)
    for sl in _chunks(geometry, n):
        idx, w = _reference_samples(tab, geometry, sl, x.dtype)
        out[:, sl] = (src[:, idx] * w).sum((-1, -2))
    return out


def _reference_backproject(y, tab, geometry):
    n = y.shape[0]
    H, W = geometry.image_shape
    buf = y.new_zeros((n, 2 * H * W))
    for sl in _chunks(geometry, n):
        idx, w = _reference_samples(tab, geometry, sl, y.dtype)
        contrib = y[:, sl, :, None, None] * w
        buf.index_add_(1, idx.reshape(-1), contrib.reshape(n, -1))
    return _fold_layers(buf, geometry.image_shape)


def _chunks(geometry: Geometry, n: int):
    per_angle = geometry.n_detectors * max(geometry.image_shape) * 2 * max(1, n)
    step = max(1, _CHUNK_ELEMENTS // per_angle)
    for a0 in range(0, geometry.n_angles, step):
        yield slice(a0, min(a0 + step, geometry.n_angles))


def _block_ranges(lo: torch.Tensor, hi: torch.Tensor, block: int):
    """Per ``(angle, detector block)`` step range: union of the rays' ``[lo, hi)`` (int32)."""
    n_a, n_det = lo.shape
    pad = (-n_det) % block
    lo = torch.nn.functional.pad(lo, (0, pad), value=torch.iinfo(torch.int32).max)
    hi = torch.nn.functional.pad(hi, (0, pad), value=0)
    blo = lo.reshape(n_a, -1, block).amin(-1)
    bhi = hi.reshape(n_a, -1, block).amax(-1)
    return blo.contiguous(), torch.maximum(bhi, blo).contiguous()


def gather_plan(tables: dict) -> tuple | None:
    r"""Per-angle data of the gather adjoint, or ``None`` where it does not apply.

    Applies when within every angle all rays share ``c1``, ``length`` and the stepping
    direction and ``c0`` is affine in the bin ``k`` (parallel beam): ``c0_k = alpha + beta k``
    (to 1e-6). Returns ``(alpha, beta, slope, column)`` (per angle; float64, float64, float64,
    int32) and the number of candidate bins per pixel and angle, ``ceil(2 / min |beta|) + 4``
    (``None`` above 64, where the scatter is cheaper).
    """
    c0, c1, length, col = (tables[k] for k in ("c0", "c1", "length", "column"))
    n_det = c0.shape[1]
    if n_det < 2 or any(bool((t != t[:, :1]).any()) for t in (c1, length, col)):
        return None
    alpha = c0[:, 0].contiguous()
    beta = (c0[:, -1] - c0[:, 0]) / (n_det - 1)
    fit = alpha[:, None] + beta[:, None] * torch.arange(n_det, dtype=torch.float64)
    if bool((beta.abs() < 1e-6).any()) or float((fit - c0).abs().max()) > 1e-6:
        return None
    n_cand = int(math.ceil(2.0 / float(beta.abs().min()))) + 4
    if n_cand > 64:
        return None
    return (alpha, beta.contiguous(), c1[:, 0].contiguous(), col[:, 0].contiguous()), n_cand


# ---------------------------------------------------------------- projector
class FusedProjector:
    """Matrix-free Joseph projector from per-ray tables (Triton kernels or their torch reference).

    ``kernel``: ``"auto"`` (Triton for CUDA tensors when importable, and for CPU tensors under
    ``TRITON_INTERPRET=1``; the torch reference otherwise), ``"triton"`` (always the kernels;
    a CPU tensor then needs ``TRITON_INTERPRET=1``) or ``"torch"`` (always the reference).
    """

    method = "fused"
    #: Rays (detector bins of one angle) per Triton program.
    block_d = 64

    def __init__(self, geometry: Geometry, kernel: str = "auto", tables: dict | None = None):
        if kernel not in KERNELS:
            raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}")
        self.geometry = geometry
        self.kernel = kernel
        self._tables = ray_tables(geometry) if tables is None else tables
        self._device_tables: dict = {}
        #: Triton adjoint: ``"auto"`` (gather where :func:`gather_plan` applies, else
        #: scatter), ``"gather"`` or ``"scatter"``.
        self.adjoint_kernel = "auto"
        self._plan = gather_plan(self._tables)

    def subset(self, i: int, m: int, geometry: Geometry) -> "FusedProjector":
        """Projector of the angles ``i, i + m, ...``: rows ``i::m`` of the ray tables."""
        tables = {k: v[i::m].contiguous() for k, v in self._tables.items()}
        return FusedProjector(geometry, self.kernel, tables)

    def uses_triton(self, t: torch.Tensor) -> bool:
        """Whether a tensor like ``t`` goes through the Triton kernels (else the torch reference)."""
        if self.kernel == "torch":
            return False
        on_cpu = t.device.type == "cpu"
        if self.kernel == "triton":
            if on_cpu and not _interpreting():
                raise ValueError("`kernel`='triton' on a CPU tensor needs TRITON_INTERPRET=1 "
                                 "(Triton's interpreter); use kernel='torch' or a CUDA tensor")
            if not triton_available():
                raise ValueError("`kernel`='triton' needs the triton package, which is not "
                                 "importable here; use kernel='torch'")
            return True
        return (not on_cpu or _interpreting()) and triton_available()

    def tables(self, dtype: torch.dtype, device) -> dict:
        """The ray tables on ``device`` (cached per dtype/device): ``c0``, ``c1`` in float64
        (the sample positions are computed in float64 whatever the data's dtype), ``length``
        in ``dtype``."""
        key = (dtype, str(device))
        if key not in self._device_tables:
            tab = {k: v.to(device) for k, v in self._tables.items()}
            tab["length"] = tab["length"].to(dtype)
            self._device_tables[key] = tab
        return self._device_tables[key]

    def _kernel_args(self, t: torch.Tensor) -> tuple:
        tab = self.tables(t.dtype, t.device)
        key = ("blocks", self.block_d, str(t.device))
        if key not in self._device_tables:
            lo, hi = _block_ranges(self._tables["lo"], self._tables["hi"], self.block_d)
            self._device_tables[key] = (lo.to(t.device), hi.to(t.device))
        return tuple(tab[k] for k in ("c0", "c1", "length", "column")) + self._device_tables[key]

    def _use_gather(self) -> bool:
        if self.adjoint_kernel not in ("auto", "gather", "scatter"):
            raise ValueError(f"`adjoint_kernel` must be 'auto', 'gather' or 'scatter', got "
                             f"{self.adjoint_kernel!r}")
        if self.adjoint_kernel == "gather" and self._plan is None:
            raise ValueError("`adjoint_kernel`='gather' needs parallel rays per angle "
                             f"(parallel beam); {self.geometry!r} has none")
        return self.adjoint_kernel != "scatter" and self._plan is not None

    def _device_plan(self, device) -> tuple:
        key = ("plan", str(device))
        if key not in self._device_tables:
            self._device_tables[key] = tuple(t.to(device) for t in self._plan[0])
        return self._device_tables[key]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, H, W) -> (N, n_angles, n_det)``."""
        x = x.detach().contiguous()
        if self.uses_triton(x):
            from . import _fused_triton

            return _fused_triton.project(_two_layers(x), self._kernel_args(x),
                                         self.geometry.image_shape, *self.geometry.range_shape,
                                         block_d=self.block_d)
        return _reference_project(x, self.tables(x.dtype, x.device), self.geometry)

    def backproject(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, n_angles, n_det) -> (N, H, W)``, the transpose of :meth:`project`."""
        y = y.detach().contiguous()
        if self.uses_triton(y):
            from . import _fused_triton

            args = self._kernel_args(y)
            if self._use_gather():
                plan = self._device_plan(y.device)
                return _fused_triton.backproject_gather(y, args[:3], plan, self._plan[1],
                                                        self.geometry.image_shape)
            buf = _fused_triton.backproject(y, args, self.geometry.image_shape,
                                            block_d=self.block_d)
            return _fold_layers(buf, self.geometry.image_shape)
        return _reference_backproject(y, self.tables(y.dtype, y.device), self.geometry)
