"""A small dense-matrix parallel-beam ray transform for model tests.

It follows the ``RayTransform`` protocol of :mod:`recon.operators` (``forward``/``__call__``,
``adjoint``, ``subset``, ``coarsen``, ``norm``, ``domain_shape``, ``range_shape``) with an
explicit matrix ``M`` of shape ``(n_angles * n_det, H * W)``, so the model tests do not depend
on the real projector.  Line integrals are approximated by sampling each ray at half-pixel
spacing with bilinear interpolation on an image covering ``[-1, 1]^2``.
"""

from __future__ import annotations

import math

import torch


class DenseRayTransform:
    """``(A x)[a, s] = ∫ x(s·n_a + t·d_a) dt`` as a dense matrix on an ``H × W`` grid."""

    def __init__(self, image_shape, angles, n_det=None, det_spacing=None):
        self.image_shape = tuple(int(v) for v in image_shape)
        self.angles = torch.as_tensor(angles, dtype=torch.float64).reshape(-1)
        h, w = self.image_shape
        self.n_det = int(n_det if n_det is not None else math.ceil(math.sqrt(2) * max(h, w)))
        self.det_spacing = float(det_spacing if det_spacing is not None else 2.0 / max(h, w))
        self.matrix = self._build()
        self._cache = {}

    @property
    def domain_shape(self):
        return self.image_shape

    @property
    def range_shape(self):
        return (int(self.angles.numel()), self.n_det)

    def _build(self) -> torch.Tensor:
        h, w = self.image_shape
        dx, dy = 2.0 / w, 2.0 / h
        dt = min(dx, dy) / 2
        s = (torch.arange(self.n_det, dtype=torch.float64) - (self.n_det - 1) / 2) * self.det_spacing
        t = torch.arange(-math.sqrt(2), math.sqrt(2) + dt, dt, dtype=torch.float64)
        cos, sin = torch.cos(self.angles), torch.sin(self.angles)
        # points (angle, det, t)
        px = s[None, :, None] * cos[:, None, None] - t[None, None, :] * sin[:, None, None]
        py = s[None, :, None] * sin[:, None, None] + t[None, None, :] * cos[:, None, None]
        u = (px + 1) / dx - 0.5  # column coordinate
        v = (1 - py) / dy - 0.5  # row coordinate
        u0, v0 = torch.floor(u), torch.floor(v)
        fu, fv = u - u0, v - v0
        rows = torch.arange(self.angles.numel() * self.n_det).reshape(-1, self.n_det, 1).expand_as(u)
        matrix = torch.zeros(self.angles.numel() * self.n_det, h * w, dtype=torch.float64)
        for du, dv, weight in ((0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)),
                               (0, 1, (1 - fu) * fv), (1, 1, fu * fv)):
            col, row = (u0 + du).long(), (v0 + dv).long()
            inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
            flat = row[inside] * w + col[inside]
            matrix.index_put_((rows[inside], flat), weight[inside] * dt, accumulate=True)
        return matrix

    def _matrix_like(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.device, t.dtype)
        if key not in self._cache:
            self._cache[key] = self.matrix.to(device=t.device, dtype=t.dtype)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.domain_shape:
            raise ValueError(f"x has spatial shape {tuple(x.shape[-2:])}, expected {self.domain_shape}")
        out = x.flatten(-2) @ self._matrix_like(x).T
        return out.unflatten(-1, self.range_shape)

    __call__ = forward

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if tuple(y.shape[-2:]) != self.range_shape:
            raise ValueError(f"y has shape {tuple(y.shape[-2:])}, expected {self.range_shape}")
        out = y.flatten(-2) @ self._matrix_like(y)
        return out.unflatten(-1, self.domain_shape)

    def norm(self) -> float:
        return float(torch.linalg.matrix_norm(self.matrix, ord=2))

    def subset(self, i: int, m: int) -> "DenseRayTransform":
        return DenseRayTransform(self.image_shape, self.angles[i::m], self.n_det, self.det_spacing)

    def coarsen(self, factor: int) -> "DenseRayTransform":
        h, w = self.image_shape
        return DenseRayTransform((h // factor, w // factor), self.angles, self.n_det, self.det_spacing)


def parallel_angles(n_angles: int) -> torch.Tensor:
    """``n_angles`` equispaced angles in ``[0, π)``."""
    return torch.arange(n_angles, dtype=torch.float64) * math.pi / n_angles


def dense_fbp(sinogram: torch.Tensor, op: DenseRayTransform) -> torch.Tensor:
    """A crude ramp-filtered backprojection for tests (scale matched to ``A``)."""
    n = sinogram.shape[-1]
    ramp = torch.fft.rfftfreq(2 * n, d=op.det_spacing, dtype=sinogram.dtype, device=sinogram.device)
    padded = torch.nn.functional.pad(sinogram, (0, n))
    filtered = torch.fft.irfft(torch.fft.rfft(padded) * ramp, n=2 * n)[..., :n]
    scale = math.pi / (op.range_shape[0] * op.det_spacing)
    return op.adjoint(filtered) * scale
