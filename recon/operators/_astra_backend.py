"""The ``astra`` backend: ASTRA Toolbox 2-D projectors, applied slice by slice.

The geometry is passed to ASTRA as vector geometries (``parallel_vec`` /
``fanflat_vec``) in the physical ``(x, y)`` coordinates of
:mod:`recon.operators.geometry`; ASTRA's 2-D volume layout (row 0 at the top, column
index growing with ``x``) is the same as ours, so no data is flipped. On the CPU the
projectors are ``linear`` (Joseph, parallel beam) and ``line_fanflat`` (fan beam),
whose back projection is the exact transpose of the forward projection. With a
CUDA-enabled ASTRA the ``cuda`` projector is used; its back projection is only
approximately matched. ASTRA computes in float32; results are cast back.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .geometry import FanBeamGeometry, Geometry, ParallelBeamGeometry


def astra_available() -> bool:
    """Whether ``import astra`` works."""
    try:
        import astra  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


def _astra():
    try:
        import astra
    except Exception as exc:
        raise ImportError(
            "backend='astra' needs the ASTRA Toolbox (pip install astra-toolbox); "
            f"importing it failed: {exc}"
        ) from exc
    return astra


def astra_geometries(geometry: Geometry):
    """ASTRA ``(volume geometry, projection geometry)`` dicts for ``geometry``."""
    astra = _astra()
    H, W = geometry.image_shape
    h, w = geometry.extent
    dy, dx = geometry.pixel_size
    if not math.isclose(dy, dx, rel_tol=1e-9):
        raise ValueError(f"backend='astra' needs square pixels (its 2-D CPU projectors assume "
                         f"them), got pixel size {dy:g} × {dx:g} from extent {tuple(geometry.extent)} "
                         f"on image_shape {(H, W)}; use backend='torch' or an extent in the ratio "
                         f"of the image shape")
    vol = astra.create_vol_geom(H, W, -w / 2, w / 2, -h / 2, h / 2)
    phi = geometry.angles
    theta = np.stack([np.cos(phi), np.sin(phi)], -1)
    perp = np.stack([-np.sin(phi), np.cos(phi)], -1)
    off = geometry.detector_offset
    u = geometry.detector_spacing * theta
    if isinstance(geometry, ParallelBeamGeometry):
        vec = np.concatenate([perp, off * theta, u], axis=1)
        proj = astra.create_proj_geom("parallel_vec", geometry.n_detectors, vec)
    elif isinstance(geometry, FanBeamGeometry):
        src = -geometry.source_radius * perp
        det = geometry.detector_radius * perp + off * theta
        vec = np.concatenate([src, det, u], axis=1)
        proj = astra.create_proj_geom("fanflat_vec", geometry.n_detectors, vec)
    else:
        raise ValueError(f"`geometry` of type {type(geometry).__name__} is not supported by ASTRA")
    return vol, proj


class AstraProjector:
    """Forward and back projection with ASTRA (see the module docstring)."""

    method = "astra"

    def __init__(self, geometry: Geometry, use_cuda: bool | None = None):
        astra = _astra()
        self.geometry = geometry
        if use_cuda is None:
            use_cuda = bool(getattr(astra, "use_cuda", lambda: False)())
        self.use_cuda = use_cuda
        self._vol, self._proj = astra_geometries(geometry)
        if use_cuda:
            kind = "cuda"
        else:
            kind = "linear" if isinstance(geometry, ParallelBeamGeometry) else "line_fanflat"
        self._projector = astra.create_projector(kind, self._proj, self._vol)

    def __del__(self):  # pragma: no cover - interpreter shutdown order varies
        try:
            import astra

            astra.projector.delete(self._projector)
        except Exception:
            pass

    def _slices(self, x: torch.Tensor, fn, out_shape) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).numpy()
        out = np.empty((arr.shape[0],) + tuple(out_shape), dtype=np.float32)
        for n in range(arr.shape[0]):
            out[n] = fn(np.ascontiguousarray(arr[n]))
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)

    def _fp(self, img: np.ndarray) -> np.ndarray:
        astra = _astra()
        sid, sino = astra.create_sino(img, self._projector)
        astra.data2d.delete(sid)
        return sino

    def _bp(self, sino: np.ndarray) -> np.ndarray:
        astra = _astra()
        vid, vol = astra.create_backprojection(sino, self._projector)
        astra.data2d.delete(vid)
        return vol

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, H, W) -> (N, n_angles, n_det)``."""
        return self._slices(x, self._fp, self.geometry.range_shape)

    def backproject(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, n_angles, n_det) -> (N, H, W)``."""
        return self._slices(y, self._bp, self.geometry.image_shape)
