"""The ``odl`` backend: ``odl.applications.tomo.RayTransform`` (ODL 1.0), slice by slice.

Layout: ODL indexes an image by ``[ix, iy]`` with ``x`` along the first axis and ``y``
growing with the second; our ``(H, W)`` images have row 0 at the top. Hence
``odl_array = image[::-1, :].T`` and back. The angle and detector partitions are
built from the exact angles and bin centres of the geometry, so both backends see the
same rays.

Inner products: ODL's ``adjoint`` is taken with respect to its weighted ``L^2``
inner products (cell volume ``c_X`` on images, ``c_Y`` on sinograms); the Euclidean
transpose that :class:`~recon.operators.RayTransform` promises is
``A^T = (c_X / c_Y) * A_odl^*``.
"""

from __future__ import annotations

import numpy as np
import torch

from .geometry import FanBeamGeometry, Geometry, ParallelBeamGeometry


def odl_available() -> bool:
    """Whether ODL with its tomography module and a working ASTRA/skimage backend imports."""
    try:
        import odl.applications.tomo as tomo

        return bool(tomo.ASTRA_AVAILABLE or tomo.SKIMAGE_AVAILABLE)
    except Exception:  # pragma: no cover - depends on the installation
        return False


def _tomo():
    try:
        import odl
        import odl.applications.tomo as tomo
    except Exception as exc:
        raise ImportError(
            "backend='odl' needs ODL >= 1.0 (pip install odl) with astra-toolbox; "
            f"importing it failed: {exc}"
        ) from exc
    return odl, tomo


def odl_operator(geometry: Geometry, impl: str | None = None, dtype: str = "float32"):
    """``(odl RayTransform, angle order)`` for ``geometry``.

    ``angle order`` is the permutation that sorts the angles (ODL needs increasing
    angles); sinogram rows are permuted back by the caller.
    """
    odl, tomo = _tomo()
    H, W = geometry.image_shape
    h, w = geometry.extent
    space = odl.uniform_discr([-w / 2, -h / 2], [w / 2, h / 2], (W, H), dtype=dtype)
    order = np.argsort(geometry.angles, kind="stable")
    angles = geometry.angles[order]
    if angles.size > 1 and np.any(np.diff(angles) <= 0):
        raise ValueError("backend='odl' needs distinct angles, got repeated values in `angles`")
    if angles.size == 1:
        apart = odl.nonuniform_partition(angles, min_pt=angles[0] - 0.5, max_pt=angles[0] + 0.5)
    else:
        apart = odl.nonuniform_partition(angles)
    s = geometry.detector_positions()
    ds = geometry.detector_spacing
    dpart = odl.uniform_partition(s[0] - ds / 2, s[-1] + ds / 2, geometry.n_detectors)
    if isinstance(geometry, ParallelBeamGeometry):
        geom = tomo.Parallel2dGeometry(apart, dpart)
    elif isinstance(geometry, FanBeamGeometry):
        geom = tomo.FanBeamGeometry(apart, dpart, src_radius=geometry.source_radius,
                                    det_radius=geometry.detector_radius)
    else:
        raise ValueError(f"`geometry` of type {type(geometry).__name__} is not supported by ODL")
    if impl is None:
        impl = "astra_cuda" if tomo.ASTRA_CUDA_AVAILABLE else ("astra_cpu" if tomo.ASTRA_AVAILABLE else "skimage")
    if isinstance(geometry, ParallelBeamGeometry) and geometry.detector_offset != 0 and impl != "astra_cuda":
        # ODL 1.0 hands 2-D parallel geometries to ASTRA's CPU code as a centred 'parallel'
        # geometry, silently dropping any detector shift.
        raise ValueError(
            f"backend='odl' ({impl}) ignores detector shifts for parallel beam in ODL "
            f"{odl.__version__}; got detector_offset={geometry.detector_offset!r} (use backend='astra')"
        )
    return tomo.RayTransform(space, geom, impl=impl), order


def to_odl(image: np.ndarray) -> np.ndarray:
    """Our ``(H, W)`` image -> ODL's ``(W, H)`` array (x first, y increasing)."""
    return np.ascontiguousarray(image[::-1, :].T)


def from_odl(arr: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_odl`."""
    return np.ascontiguousarray(arr.T[::-1, :])


def _values(element) -> np.ndarray:
    data = element.asarray() if hasattr(element, "asarray") else element
    if isinstance(data, torch.Tensor):
        data = data.cpu().numpy()
    return np.asarray(data)


class OdlProjector:
    """Forward and Euclidean back projection through ODL (see the module docstring)."""

    method = "odl"

    def __init__(self, geometry: Geometry, impl: str | None = None):
        self.geometry = geometry
        self.op, self._order = odl_operator(geometry, impl)
        self._inverse = np.argsort(self._order)
        self._adjoint_scale = float(self.op.domain.weighting.const) / float(self.op.range.weighting.const)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, H, W) -> (N, n_angles, n_det)``."""
        arr = x.detach().to("cpu", torch.float32).numpy()
        out = np.empty((arr.shape[0],) + self.geometry.range_shape, dtype=np.float32)
        for n in range(arr.shape[0]):
            out[n] = _values(self.op(self.op.domain.element(to_odl(arr[n]))))[self._inverse]
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)

    def backproject(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, n_angles, n_det) -> (N, H, W)``, ``(c_X / c_Y)`` times ODL's adjoint."""
        arr = y.detach().to("cpu", torch.float32).numpy()
        out = np.empty((arr.shape[0],) + self.geometry.image_shape, dtype=np.float32)
        adj = self.op.adjoint
        for n in range(arr.shape[0]):
            el = self.op.range.element(np.ascontiguousarray(arr[n][self._order]))
            out[n] = from_odl(_values(adj(el))) * self._adjoint_scale
        return torch.from_numpy(out).to(device=y.device, dtype=y.dtype)
