"""The differentiable ray transform ``A`` acting on batches of images.

``A`` maps images ``x`` of shape ``(..., H, W)`` (usually ``(B, C, H, W)``) to
sinograms ``A x`` of shape ``(..., n_angles, n_detectors)``: line integrals of
``x`` along the rays of a :class:`~recon.operators.geometry.Geometry`. Its adjoint is
taken with respect to the plain Euclidean inner products
``<Ax, y> = sum(A(x) * y) = sum(x * A^T(y))``, which is what autograd differentiates
with: the gradient of ``x -> <A x, g>`` is ``A^T g`` and vice versa. Both directions
are ``torch.autograd.Function``\\ s that call each other in ``backward``, so double
backward works on every backend.

Backends
--------
``"torch"`` (default)
    Joseph's projector in plain PyTorch, exactly matched adjoint, CPU and CUDA,
    float32 and float64; ``method="sparse"`` (cached CSR matrix, the default),
    ``"matrix_free"`` (weights recomputed on the fly, see
    :mod:`recon.operators._torch_backend`) or ``"fused"`` (no matrix: four coefficients per
    ray, ``(A x)_r = L_r sum_s [(1 - f) x[i, s] + f x[i + 1, s]]`` with
    ``i + f = c0_r + s c1_r``, marched by one Triton kernel per direction on CUDA and by
    their pure-torch reference on the CPU; the same matrix as ``sparse`` up to float
    rounding, see :mod:`recon.operators._fused_backend`).
``"astra"``
    ASTRA Toolbox, slice by slice on the CPU (or its CUDA projector when built
    with CUDA). Reference implementation, float32 internally.
``"odl"``
    ``odl.applications.tomo.RayTransform`` (ODL 1.0, ASTRA inside), slice by slice,
    its weighted adjoint rescaled to the Euclidean transpose.
"""

from __future__ import annotations

import math
import os

import torch

from .geometry import Geometry, _check_subset

__all__ = ["RayTransform", "subset_data", "BACKENDS"]

BACKENDS = ("torch", "astra", "odl")
_METHODS = ("auto", "sparse", "matrix_free", "fused")


class _Apply(torch.autograd.Function):
    """``x -> A x`` (``transpose=False``) or ``y -> A^T y``; backward applies the other."""

    @staticmethod
    def forward(ctx, x, op, transpose):
        ctx.op = op
        ctx.transpose = transpose
        return op._raw(x, transpose)

    @staticmethod
    def backward(ctx, grad):
        return _Apply.apply(grad, ctx.op, not ctx.transpose), None, None


def _check_tensor(t, name: str, shape: tuple, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"`{name}` must be float32 or float64, got dtype {t.dtype}")
    if t.ndim < 2 or tuple(t.shape[-2:]) != tuple(shape):
        raise ValueError(
            f"`{name}` has shape {tuple(t.shape)} but this RayTransform expects (..., "
            f"{shape[0]}, {shape[1]}) ({what}); make the geometry match the data"
        )


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"`{name}` contains {bad} NaN or infinite value(s)")


class RayTransform:
    """Ray transform ``A`` of a CT geometry, as a differentiable batched linear operator.

    Parameters
    ----------
    geometry : Geometry
        :class:`ParallelBeamGeometry` or :class:`FanBeamGeometry`.
    backend : {"torch", "astra", "odl"}
        Implementation (module docstring). Only ``"torch"`` runs on CUDA tensors
        without copies and is exactly matched in float64.
    method : {"auto", "sparse", "matrix_free", "fused"}
        ``torch`` backend only: cached sparse matrix, on-the-fly weights, or the fused
        matrix-free kernels (``"auto"`` = ``"sparse"``).
    kernel : {"auto", "triton", "torch"}
        ``fused`` only: ``"auto"`` runs the Triton kernels on CUDA tensors (when Triton is
        importable; on CPU tensors only under ``TRITON_INTERPRET=1``) and the pure-torch
        reference of the same arithmetic otherwise; ``"triton"`` / ``"torch"`` force one.
    cache : bool or path
        ``torch``/``sparse`` only: where to cache the matrix on disk (``True``: the
        default folder, ``$RECON_CACHE_DIR`` or ``~/.cache/recon/ray_transform``;
        ``False``: memory only).
    check_finite : bool
        Raise ``ValueError`` on NaN/Inf inputs (costs one reduction, and a device
        synchronisation on CUDA).

    Examples
    --------
    >>> geom = ParallelBeamGeometry((64, 64), n_angles=30)
    >>> A = RayTransform(geom)
    >>> y = A(torch.rand(2, 1, 64, 64))          # (2, 1, 30, 91)
    >>> x = A.T(y)                                # (2, 1, 64, 64)
    """

    def __init__(self, geometry: Geometry, backend: str = "torch", *, method: str = "auto",
                 cache=True, check_finite: bool = True, kernel: str = "auto", _impl=None):
        if not isinstance(geometry, Geometry):
            raise TypeError(f"`geometry` must be a Geometry, got {type(geometry).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
        if method not in _METHODS:
            raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}")
        if not isinstance(cache, (bool, str, os.PathLike)):
            raise ValueError(f"`cache` must be True, False or a folder path, got {cache!r}")
        if backend != "torch" and method in ("matrix_free", "fused"):
            raise ValueError(f"`method`={method!r} needs backend='torch', got backend={backend!r}")
        from ._fused_backend import KERNELS

        if kernel not in KERNELS:
            raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}")
        if kernel != "auto" and method != "fused":
            raise ValueError(f"`kernel`={kernel!r} needs method='fused', got method={method!r}")
        self.geometry = geometry
        self.backend = backend
        self.method = "sparse" if method == "auto" else method
        self.cache = cache
        self.check_finite = check_finite
        self.kernel = kernel
        self._norm: float | None = None
        self._adjoint_op = None
        if _impl is not None:  # a backend's own subset (see :meth:`subset`)
            self._impl = _impl
        elif backend == "torch":
            from ._torch_backend import MatrixFreeProjector, SparseProjector

            if self.method == "sparse":
                self._impl = SparseProjector(geometry, cache=cache)
            elif self.method == "fused":
                from ._fused_backend import FusedProjector

                self._impl = FusedProjector(geometry, kernel=kernel)
            else:
                self._impl = MatrixFreeProjector(geometry)
        elif backend == "astra":
            from ._astra_backend import AstraProjector

            self._impl = AstraProjector(geometry)
        else:
            from ._odl_backend import OdlProjector

            self._impl = OdlProjector(geometry)

    # ------------------------------------------------------------------ shapes
    @property
    def domain_shape(self) -> tuple[int, int]:
        """Image shape ``(H, W)``."""
        return self.geometry.image_shape

    @property
    def range_shape(self) -> tuple[int, int]:
        """Sinogram shape ``(n_angles, n_detectors)``."""
        return self.geometry.range_shape

    # ------------------------------------------------------------- application
    def _raw(self, t: torch.Tensor, transpose: bool) -> torch.Tensor:
        in_shape = self.range_shape if transpose else self.domain_shape
        out_shape = self.domain_shape if transpose else self.range_shape
        lead = t.shape[:-2]
        flat = t.reshape((-1,) + tuple(in_shape))
        if flat.shape[0] == 0:
            return t.new_zeros(lead + tuple(out_shape))
        res = self._impl.backproject(flat) if transpose else self._impl.project(flat)
        return res.reshape(lead + tuple(out_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sinogram ``A x``: ``(..., H, W) -> (..., n_angles, n_det)``, same dtype/device.

        ``(A x)[a, k] = sum_p A[(a, k), p] x[p]`` approximates the line integral
        ``∫ x(p + t d) dt`` of ray ``(a, k)`` (length units times attenuation).
        """
        _check_tensor(x, "x", self.domain_shape, "image_shape")
        if self.check_finite:
            _check_finite(x, "x")
        return _Apply.apply(x, self, False)

    __call__ = forward

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Back projection ``A^T y``: ``(..., n_angles, n_det) -> (..., H, W)``.

        The Euclidean adjoint: ``sum(A(x) * y) == sum(x * A.adjoint(y))``.
        """
        _check_tensor(y, "y", self.range_shape, "(n_angles, n_detectors)")
        if self.check_finite:
            _check_finite(y, "y")
        return _Apply.apply(y, self, True)

    @property
    def T(self) -> "AdjointRayTransform":
        """The adjoint as an operator: ``A.T(y) == A.adjoint(y)``, ``A.T.T is A``."""
        if self._adjoint_op is None:
            self._adjoint_op = AdjointRayTransform(self)
        return self._adjoint_op

    # --------------------------------------------------------------- derived
    def norm(self, *, max_iter: int = 200, rtol: float = 1e-6, seed: int = 0,
             device: str | torch.device | None = None) -> float:
        """Operator 2-norm ``||A|| = sqrt(lambda_max(A^T A))`` by the power method (cached).

        Iterates ``v <- A^T A v / ||A^T A v||`` from a seeded random start until the
        Rayleigh quotient changes by less than ``rtol`` (relative), at most
        ``max_iter`` times; float64 for the ``torch`` backend, on ``device`` (default: the
        GPU for ``method="fused"`` when CUDA is available, whose kernels make it fast, else
        the CPU). The first call's value is cached whatever the device.
        """
        if device is None:
            device = "cuda" if self.method == "fused" and torch.cuda.is_available() else "cpu"
        if self._norm is None:
            dtype = torch.float64 if self.backend == "torch" else torch.float32
            gen = torch.Generator().manual_seed(seed)
            v = torch.randn((1,) + self.domain_shape, generator=gen, dtype=dtype).to(device)
            v /= torch.linalg.vector_norm(v)
            lam = 0.0
            for _ in range(max_iter):
                w = self._raw(self._raw(v, False), True)
                new = float(torch.sum(w * v))
                nrm = float(torch.linalg.vector_norm(w))
                if nrm == 0.0:
                    break
                v = w / nrm
                if abs(new - lam) <= rtol * abs(new):
                    lam = new
                    break
                lam = new
            self._norm = math.sqrt(max(lam, 0.0))
        return self._norm

    def _like(self, geometry: Geometry, impl=None) -> "RayTransform":
        return RayTransform(geometry, self.backend, method=self.method, cache=self.cache,
                            check_finite=self.check_finite, kernel=self.kernel, _impl=impl)

    def subset(self, i: int, m: int) -> "RayTransform":
        """Operator of the angles ``i, i + m, i + 2m, ...`` (data: :func:`subset_data`).

        A backend that can slice its own representation (the sparse ``torch`` backend: rows
        of its matrix when it is in memory) provides ``subset(i, m, geometry)``.
        """
        _check_subset(i, m, self.geometry.n_angles)
        geom = self.geometry.subset(i, m)
        slicer = getattr(self._impl, "subset", None)
        return self._like(geom, slicer(i, m, geom) if slicer is not None else None)

    def coarsen(self, factor: int) -> "RayTransform":
        """Same angles, detector and physical extent on the ``(H//factor, W//factor)`` grid.

        ``A.coarsen(2)(avg_pool2d(x, 2)) ≈ A(x)``: sketched operators for sketched LSPD.
        """
        return self._like(self.geometry.coarsen(factor))

    def __repr__(self) -> str:
        extra = f", kernel={self.kernel!r}" if self.kernel != "auto" else ""
        return (f"RayTransform({self.geometry!r}, backend={self.backend!r}, "
                f"method={self.method!r}{extra})")

    # Operators are immutable: copies share the instance, pickles store only the settings
    # (the matrix is rebuilt or loaded from the disk cache on first use after unpickling).
    def __deepcopy__(self, memo) -> "RayTransform":
        return self

    def __reduce__(self):
        return (_rebuild, (self.geometry, self.backend, self.method, self.cache, self.check_finite,
                           self.kernel))


def _rebuild(geometry, backend, method, cache, check_finite, kernel="auto") -> RayTransform:
    return RayTransform(geometry, backend, method=method, cache=cache, check_finite=check_finite,
                        kernel=kernel)


class AdjointRayTransform:
    """``A^T`` as an operator object (returned by :attr:`RayTransform.T`)."""

    def __init__(self, op: RayTransform):
        self._op = op

    @property
    def T(self) -> RayTransform:
        """The original operator ``A``."""
        return self._op

    @property
    def geometry(self) -> Geometry:
        """The geometry of ``A``."""
        return self._op.geometry

    @property
    def domain_shape(self) -> tuple[int, int]:
        """Sinogram shape ``(n_angles, n_detectors)``."""
        return self._op.range_shape

    @property
    def range_shape(self) -> tuple[int, int]:
        """Image shape ``(H, W)``."""
        return self._op.domain_shape

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y``."""
        return self._op.adjoint(y)

    __call__ = forward

    def adjoint(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``."""
        return self._op.forward(x)

    def norm(self, **kwargs) -> float:
        """``||A^T|| = ||A||``."""
        return self._op.norm(**kwargs)

    def __repr__(self) -> str:
        return f"{self._op!r}.T"


def subset_data(sinogram: torch.Tensor, i: int, m: int) -> torch.Tensor:
    """Rows ``i, i + m, ...`` of the angle axis: ``sinogram[..., i::m, :]``.

    Matches :meth:`RayTransform.subset`: ``A.subset(i, m)(x) == subset_data(A(x), i, m)``.
    """
    if not isinstance(sinogram, torch.Tensor) or sinogram.ndim < 2:
        raise ValueError(f"`sinogram` must be a tensor (..., n_angles, n_det), got {type(sinogram).__name__}"
                         + (f" of shape {tuple(sinogram.shape)}" if isinstance(sinogram, torch.Tensor) else ""))
    _check_subset(i, m, sinogram.shape[-2])
    return sinogram[..., i::m, :]
