"""2-D CT acquisition geometries: parallel beam and flat-detector fan beam.

Coordinate conventions (shared by every backend)
------------------------------------------------
An image tensor has shape ``(H, W)`` (rows, columns). It covers the rectangle
``[-w/2, w/2] x [-h/2, h/2]`` of the plane, where ``(h, w) = extent`` is its
physical size in *length units* (the default ``extent = (H, W)`` makes one pixel
one unit long, as in ASTRA and in Adler & Öktem's learned primal-dual setup).
Pixel ``(i, j)`` has its centre at::

    x_j = -w/2 + (j + 1/2) * dx,      y_i = h/2 - (i + 1/2) * dy,

so column index grows with ``x`` (to the right) and row 0 is the top (largest ``y``),
the way images are displayed. Pixel values are attenuation coefficients in
``1 / length unit``; sinogram values are line integrals, hence dimensionless.

For an angle ``phi`` write ``theta = (cos phi, sin phi)`` and
``theta_perp = (-sin phi, cos phi)``.

* Parallel beam: detector bin ``k`` measures the line ``{p : <p, theta> = s_k}``,
  travelled in direction ``theta_perp``, with
  ``s_k = (k - (n_det - 1)/2) * ds + detector_offset``. This is the textbook Radon
  transform ``(R f)(phi, s) = ∫ f(s theta + t theta_perp) dt``, and the same
  convention as ``odl.applications.tomo.Parallel2dGeometry``.
* Fan beam (flat detector): the source sits at ``-R_s * theta_perp`` and the
  detector line at distance ``R_d`` on the other side, at ``R_d * theta_perp``, with
  bin ``k`` at ``R_d * theta_perp + u_k * theta``; ``u_k`` as ``s_k`` above. This is
  the convention of ``odl.applications.tomo.FanBeamGeometry`` with a flat detector.

Every geometry exposes its rays as ``(points, directions)`` so the projector code is
geometry-agnostic.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["Geometry", "ParallelBeamGeometry", "FanBeamGeometry"]


def _as_pair(value, name: str) -> tuple[float, float]:
    """Return ``value`` as a pair of positive finite floats (``(v, v)`` for a scalar)."""
    if isinstance(value, (int, float, np.integer, np.floating)):
        pair = (float(value), float(value))
    else:
        try:
            pair = tuple(float(v) for v in value)
        except TypeError as exc:
            raise ValueError(f"`{name}` must be a number or a pair of numbers, got {value!r}") from exc
        if len(pair) != 2:
            raise ValueError(f"`{name}` must be a number or a pair of numbers, got {value!r}")
    if not all(math.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"`{name}` must be positive and finite, got {value!r}")
    return pair


def _positive(value, name: str) -> float:
    """``value`` as a positive finite float, else ``ValueError`` naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}") from exc
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"`{name}` must be positive and finite, got {value!r}")
    return v


def _check_image_shape(image_shape) -> tuple[int, int]:
    try:
        shape = tuple(int(s) for s in image_shape)
    except TypeError as exc:
        raise ValueError(f"`image_shape` must be a pair (H, W) of ints, got {image_shape!r}") from exc
    if len(shape) != 2 or min(shape) < 1 or tuple(image_shape) != shape:
        raise ValueError(f"`image_shape` must be a pair (H, W) of positive ints, got {image_shape!r}")
    return shape


def _make_angles(n_angles, angles, full_range: float) -> np.ndarray:
    if angles is not None and n_angles is not None and len(np.atleast_1d(angles)) != n_angles:
        raise ValueError(
            f"give either `n_angles` or `angles`; got n_angles={n_angles} and {len(angles)} angles"
        )
    if angles is None:
        if n_angles is None:
            raise ValueError("give `n_angles` or `angles`, got neither")
        if int(n_angles) != n_angles or n_angles < 1:
            raise ValueError(f"`n_angles` must be a positive int, got {n_angles!r}")
        return np.arange(int(n_angles), dtype=np.float64) * (full_range / int(n_angles))
    arr = np.asarray(angles, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"`angles` must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`angles` must be finite, got {arr}")
    return arr.copy()


def _angle_weights(angles: np.ndarray, period: float) -> np.ndarray:
    """Quadrature weights ``Δphi_a`` for integrals over angles on a circle of ``period``.

    Each angle gets half the distance to its two neighbours (angles taken modulo
    ``period``, wrapping around). For ``n`` uniform angles this is ``period / n``.
    A single angle gets the whole period.
    """
    n = angles.size
    if n == 1:
        return np.array([period])
    wrapped = np.mod(angles, period)
    order = np.argsort(wrapped, kind="stable")
    srt = wrapped[order]
    gaps = np.diff(np.concatenate([srt, srt[:1] + period]))  # gap to the next angle
    w_sorted = 0.5 * (gaps + np.roll(gaps, 1))
    weights = np.empty(n)
    weights[order] = w_sorted
    return weights


class Geometry:
    """Base class of 2-D CT geometries (see the module docstring for conventions).

    Attributes
    ----------
    image_shape : (H, W)
        Image grid size in pixels.
    extent : (h, w)
        Physical size of the image rectangle in length units.
    angles : numpy.ndarray
        Acquisition angles ``phi`` in radians, shape ``(n_angles,)``.
    n_detectors : int
        Number of detector bins.
    detector_spacing : float
        Bin width ``ds`` in length units (on the detector line for fan beam).
    detector_offset : float
        Shift of the detector centre along ``theta``, length units.
    """

    kind = "base"
    #: Period of the angle variable for FBP quadrature (pi for parallel beam, 2 pi for fan).
    angle_period = math.pi

    def __init__(self, image_shape, angles, n_detectors, detector_spacing, extent, detector_offset):
        self.image_shape = _check_image_shape(image_shape)
        self.extent = _as_pair(extent if extent is not None else self.image_shape, "extent")
        self.angles = angles
        self.angles.setflags(write=False)
        if int(n_detectors) != n_detectors or n_detectors < 1:
            raise ValueError(f"`n_detectors` must be a positive int, got {n_detectors!r}")
        self.n_detectors = int(n_detectors)
        self.detector_spacing = float(detector_spacing)
        if not (math.isfinite(self.detector_spacing) and self.detector_spacing > 0):
            raise ValueError(f"`detector_spacing` must be positive and finite, got {detector_spacing!r}")
        self.detector_offset = float(detector_offset)
        if not math.isfinite(self.detector_offset):
            raise ValueError(f"`detector_offset` must be finite, got {detector_offset!r}")

    # ------------------------------------------------------------------ shapes
    @property
    def n_angles(self) -> int:
        """Number of projection angles."""
        return int(self.angles.size)

    @property
    def domain_shape(self) -> tuple[int, int]:
        """Image shape ``(H, W)``."""
        return self.image_shape

    @property
    def range_shape(self) -> tuple[int, int]:
        """Sinogram shape ``(n_angles, n_detectors)``."""
        return (self.n_angles, self.n_detectors)

    @property
    def pixel_size(self) -> tuple[float, float]:
        """Pixel size ``(dy, dx) = (h / H, w / W)`` in length units."""
        return (self.extent[0] / self.image_shape[0], self.extent[1] / self.image_shape[1])

    def detector_positions(self) -> np.ndarray:
        """Bin centres ``s_k = (k - (n_det - 1)/2) ds + offset``, shape ``(n_det,)``."""
        k = np.arange(self.n_detectors, dtype=np.float64)
        return (k - (self.n_detectors - 1) / 2.0) * self.detector_spacing + self.detector_offset

    def angle_weights(self) -> np.ndarray:
        """Quadrature weights ``Δphi`` (radians) of the angles, used by FBP."""
        return _angle_weights(self.angles, self.angle_period)

    # ------------------------------------------------------------- rays
    def rays(self, angle_index=None, *, device=None, dtype=torch.float64):
        """Rays of the given angles as ``(points, directions)``, each ``(n_a, n_det, 2)``.

        ``points[a, k]`` is a point on ray ``(a, k)`` and ``directions[a, k]`` its unit
        direction, in ``(x, y)`` physical coordinates.
        """
        raise NotImplementedError

    # ------------------------------------------------------- derived geometries
    def _replace(self, **changes) -> "Geometry":
        raise NotImplementedError

    def select_angles(self, index) -> "Geometry":
        """The same geometry restricted to ``angles[index]`` (a slice, ints or a mask)."""
        angles = np.atleast_1d(self.angles[index])
        if angles.size == 0:
            raise ValueError(f"`index` {index!r} selects no angle out of {self.n_angles}")
        return self._replace(angles=angles)

    def subset(self, i: int, m: int) -> "Geometry":
        """Geometry of every ``m``-th angle starting at ``i``: ``angles[i::m]``."""
        _check_subset(i, m, self.n_angles)
        return self.select_angles(slice(i, None, m))

    def coarsen(self, factor: int) -> "Geometry":
        """Same angles, detector and physical extent on an ``(H/factor, W/factor)`` grid.

        ``factor`` must divide ``H`` and ``W`` (each coarse pixel is ``factor x factor`` fine
        pixels), else ``ValueError``.
        """
        if int(factor) != factor or factor < 1:
            raise ValueError(f"`factor` must be a positive int, got {factor!r}")
        H, W = self.image_shape
        if H // factor < 1 or W // factor < 1:
            raise ValueError(f"`factor`={factor} is too large for image_shape {self.image_shape}")
        if H % factor or W % factor:
            raise ValueError(
                f"`factor`={factor} does not divide image_shape {self.image_shape}: the coarse "
                f"pixels would be {H / (H // factor):g} x {W / (W // factor):g} fine pixels, not "
                f"{factor} x {factor}; pick a factor of both sides or resize the images")
        return self._replace(image_shape=(H // int(factor), W // int(factor)))

    # ------------------------------------------------------------- identity
    def _description(self) -> tuple:
        return (
            self.kind,
            self.image_shape,
            tuple(float(e).hex() for e in self.extent),
            self.n_detectors,
            float(self.detector_spacing).hex(),
            float(self.detector_offset).hex(),
        )

    def cache_key(self) -> str:
        """Hex SHA-256 of everything that defines the discretised operator."""
        h = hashlib.sha256(repr(self._description()).encode())
        h.update(np.ascontiguousarray(self.angles, dtype="<f8").tobytes())
        return h.hexdigest()

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.cache_key() == other.cache_key()

    def __hash__(self) -> int:
        return hash(self.cache_key())

    def _check_inside(self, radius: float, name: str) -> None:
        half_diag = 0.5 * math.hypot(*self.extent)
        if radius <= half_diag:
            raise ValueError(
                f"`{name}`={radius} must exceed the image half-diagonal {half_diag:.6g} "
                "(the source must lie outside the image)"
            )


def _check_subset(i, m, n) -> None:
    if int(m) != m or m < 1:
        raise ValueError(f"`m` must be a positive int, got {m!r}")
    if int(i) != i or not 0 <= i < m:
        raise ValueError(f"`i` must be an int in [0, m={m}), got {i!r}")
    if i >= n:
        raise ValueError(f"subset i={i} of m={m} is empty for {n} angles")


class ParallelBeamGeometry(Geometry):
    """2-D parallel-beam geometry.

    Parameters
    ----------
    image_shape : (H, W)
        Image grid in pixels.
    n_angles : int, optional
        Number of angles, uniform in ``[0, pi)``: ``phi_a = a * pi / n_angles``.
    angles : array_like, optional
        Explicit 1-D array of angles in radians (instead of ``n_angles``).
    n_detectors : int, optional
        Number of detector bins; default ``ceil(hypot(h, w) / ds)``, so every ray
        through the image is seen (``≈ ceil(sqrt(2) * max(H, W))`` for square pixels).
    detector_spacing : float, optional
        Bin width ``ds`` in length units; default the smaller pixel side.
    extent : float or (h, w), optional
        Physical size of the image rectangle (full side lengths, length units);
        default ``(H, W)``, i.e. unit pixels.
    detector_offset : float
        Shift of the detector centre along ``theta`` (length units), default 0.

    The measured data are ``(R f)(phi_a, s_k) = ∫ f(s_k theta_a + t theta_a_perp) dt``.
    """

    kind = "parallel"
    angle_period = math.pi

    def __init__(
        self,
        image_shape: Sequence[int],
        n_angles: int | None = None,
        *,
        angles=None,
        n_detectors: int | None = None,
        detector_spacing: float | None = None,
        extent=None,
        detector_offset: float = 0.0,
    ):
        shape = _check_image_shape(image_shape)
        ext = _as_pair(extent if extent is not None else shape, "extent")
        ds = min(ext[0] / shape[0], ext[1] / shape[1]) if detector_spacing is None \
            else _positive(detector_spacing, "detector_spacing")
        if n_detectors is None:
            n_detectors = max(1, math.ceil(math.hypot(*ext) / float(ds) - 1e-9))
        super().__init__(shape, _make_angles(n_angles, angles, math.pi), n_detectors, ds, ext, detector_offset)

    def rays(self, angle_index=None, *, device=None, dtype=torch.float64):
        """Rays ``(s_k theta, theta_perp)`` of the given angles, each ``(n_a, n_det, 2)``."""
        phi = torch.tensor(np.array(self.angles if angle_index is None else self.angles[angle_index]),
                           dtype=torch.float64).reshape(-1)
        s = torch.as_tensor(self.detector_positions(), dtype=torch.float64)
        theta = torch.stack([torch.cos(phi), torch.sin(phi)], -1)  # (n_a, 2)
        perp = torch.stack([-torch.sin(phi), torch.cos(phi)], -1)
        points = s[None, :, None] * theta[:, None, :]
        directions = perp[:, None, :].expand_as(points)
        return points.to(device=device, dtype=dtype), directions.to(device=device, dtype=dtype)

    def _replace(self, **changes):
        kw = dict(
            image_shape=self.image_shape, angles=self.angles, n_detectors=self.n_detectors,
            detector_spacing=self.detector_spacing, extent=self.extent,
            detector_offset=self.detector_offset,
        )
        kw.update(changes)
        return ParallelBeamGeometry(**kw)

    def __repr__(self) -> str:
        return (
            f"ParallelBeamGeometry(image_shape={self.image_shape}, n_angles={self.n_angles}, "
            f"n_detectors={self.n_detectors}, detector_spacing={self.detector_spacing:g}, "
            f"extent={self.extent})"
        )


class FanBeamGeometry(Geometry):
    """2-D fan-beam geometry with a flat detector.

    Parameters
    ----------
    image_shape : (H, W)
        Image grid in pixels.
    n_angles : int, optional
        Number of source angles, uniform in ``[0, 2 pi)``.
    angles : array_like, optional
        Explicit source angles in radians.
    source_radius : float
        Distance ``R_s`` from the source to the rotation centre (length units); must
        exceed the image half-diagonal. Default ``2 * max(h, w)``.
    detector_radius : float
        Distance ``R_d`` from the rotation centre to the detector line. Default
        ``max(h, w)``.
    n_detectors : int, optional
        Number of bins; default: enough to see the whole image disc.
    detector_spacing : float, optional
        Bin width ``du`` on the detector line (length units); default the pixel size
        times the magnification ``(R_s + R_d) / R_s``.
    extent, detector_offset
        As for :class:`ParallelBeamGeometry`.

    Ray ``(a, k)`` goes from the source ``-R_s theta_perp`` to the bin centre
    ``R_d theta_perp + u_k theta`` (``theta = theta(phi_a)``).
    """

    kind = "fan"
    angle_period = 2.0 * math.pi

    def __init__(
        self,
        image_shape: Sequence[int],
        n_angles: int | None = None,
        *,
        angles=None,
        source_radius: float | None = None,
        detector_radius: float | None = None,
        n_detectors: int | None = None,
        detector_spacing: float | None = None,
        extent=None,
        detector_offset: float = 0.0,
    ):
        shape = _check_image_shape(image_shape)
        ext = _as_pair(extent if extent is not None else shape, "extent")
        size = max(ext)
        self.source_radius = 2.0 * size if source_radius is None else _positive(source_radius, "source_radius")
        self.detector_radius = float(size if detector_radius is None else detector_radius)
        if not (math.isfinite(self.detector_radius) and self.detector_radius >= 0):
            raise ValueError(f"`detector_radius` must be finite and >= 0, got {detector_radius!r}")
        self.extent = ext
        self._check_inside(self.source_radius, "source_radius")
        mag = (self.source_radius + self.detector_radius) / self.source_radius
        pix = min(ext[0] / shape[0], ext[1] / shape[1])
        du = pix * mag if detector_spacing is None else _positive(detector_spacing, "detector_spacing")
        if n_detectors is None:
            r = 0.5 * math.hypot(*ext)
            u_max = r * (self.source_radius + self.detector_radius) / math.sqrt(self.source_radius**2 - r**2)
            n_detectors = max(1, math.ceil(2.0 * u_max / float(du) - 1e-9))
        super().__init__(shape, _make_angles(n_angles, angles, 2.0 * math.pi), n_detectors, du, ext, detector_offset)

    @property
    def magnification(self) -> float:
        """``(R_s + R_d) / R_s``: detector-plane size of an object at the centre."""
        return (self.source_radius + self.detector_radius) / self.source_radius

    def rays(self, angle_index=None, *, device=None, dtype=torch.float64):
        """Rays from the source ``-R_s theta_perp`` towards each bin centre, each ``(n_a, n_det, 2)``."""
        phi = torch.tensor(np.array(self.angles if angle_index is None else self.angles[angle_index]),
                           dtype=torch.float64).reshape(-1)
        u = torch.as_tensor(self.detector_positions(), dtype=torch.float64)
        theta = torch.stack([torch.cos(phi), torch.sin(phi)], -1)
        perp = torch.stack([-torch.sin(phi), torch.cos(phi)], -1)
        src = -self.source_radius * perp  # (n_a, 2)
        det = self.detector_radius * perp[:, None, :] + u[None, :, None] * theta[:, None, :]
        d = det - src[:, None, :]
        d = d / torch.linalg.vector_norm(d, dim=-1, keepdim=True)
        points = src[:, None, :].expand_as(d)
        return points.to(device=device, dtype=dtype), d.to(device=device, dtype=dtype)

    def _replace(self, **changes):
        kw = dict(
            image_shape=self.image_shape, angles=self.angles, source_radius=self.source_radius,
            detector_radius=self.detector_radius, n_detectors=self.n_detectors,
            detector_spacing=self.detector_spacing, extent=self.extent,
            detector_offset=self.detector_offset,
        )
        kw.update(changes)
        return FanBeamGeometry(**kw)

    def _description(self) -> tuple:
        return super()._description() + (
            float(self.source_radius).hex(), float(self.detector_radius).hex()
        )

    def __repr__(self) -> str:
        return (
            f"FanBeamGeometry(image_shape={self.image_shape}, n_angles={self.n_angles}, "
            f"source_radius={self.source_radius:g}, detector_radius={self.detector_radius:g}, "
            f"n_detectors={self.n_detectors}, detector_spacing={self.detector_spacing:g}, "
            f"extent={self.extent})"
        )
