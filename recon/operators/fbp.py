"""Filtered back projection (FBP) for parallel- and fan-beam sinograms.

Parallel beam. With ``p(phi, s)`` the sinogram, the inversion formula is ::

    f(x) = ∫_0^pi q(phi, <x, theta(phi)>) dphi,   q(phi, .) = p(phi, .) * h,

where ``h`` is the ramp filter (Fourier transform ``|nu|``, ``nu`` in cycles per
length unit) times a window. Discretely, ``q`` is computed by zero-padded FFT
convolution with the band-limited ramp of Kak & Slaney (``h[0] = 1/(4 ds^2)``,
``h[k] = -1/(pi k ds)^2`` for odd ``k``, 0 for even ``k``; no DC bias), and the
angular integral by the operator's back projection: since a pixel of area
``dx dy`` spreads ``sum_k A[(a, k), p] ≈ dx dy / ds`` over the bins of one angle, ::

    f ≈ ds / (dx dy) * A^T( Δphi_a * q ),

with ``Δphi_a`` the angle quadrature weights (``pi / n_angles`` for uniform angles,
also for subsets and uneven angle sets). This uses the operator's own adjoint, so FBP
runs on every backend and is differentiable.

Fan beam (flat detector, full ``2 pi`` scan). With detector coordinates rescaled to
the virtual detector through the rotation centre, ``u' = u R_s / (R_s + R_d)``, ::

    q(beta, u') = [ p(beta, u') R_s / sqrt(R_s^2 + u'^2) ] * h,
    f(x) = 1/2 ∫_0^{2 pi} q(beta, u'(x)) / U(x, beta)^2 dbeta,
    U = (R_s + <x, theta_perp>) / R_s,   u'(x) = R_s <x, theta> / (R_s + <x, theta_perp>),

implemented as a pixel-driven back projection with linear interpolation in ``u'``
(Kak & Slaney, ch. 3.4.2).

Windows (``nu_n = nu / nu_max`` with ``nu_max = 1 / (2 ds)``, ``c`` the frequency
scaling; all set to 0 for ``nu_n > c``, as in ODL's ``fbp_op``):
``ram-lak`` 1, ``shepp-logan`` ``sinc(nu_n / (2c))``, ``cosine`` ``cos(pi nu_n / (2c))``,
``hamming`` ``0.54 + 0.46 cos(pi nu_n / c)``, ``hann`` ``cos^2(pi nu_n / (2c))``.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch

from .geometry import FanBeamGeometry, Geometry, ParallelBeamGeometry
from .ray_transform import RayTransform

__all__ = ["fbp", "ramp_filter", "FILTERS"]

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")
_CHUNK_ELEMENTS = 1 << 24
#: Filter responses and angle weights already on a device, so a repeated ``fbp`` copies
#: nothing from the host (and can be captured in a CUDA graph once it has run once).
_CONSTANTS: dict = {}
_MAX_CONSTANTS = 64


@torch.compiler.disable
def _constant(key_fn, make, like: torch.Tensor) -> torch.Tensor:
    """``torch.as_tensor(make())`` in ``like``'s dtype and device, cached under ``key_fn()``.

    Not traced by ``torch.compile`` (the key hashes numpy arrays): a compiled caller gets the
    cached tensor as an input."""
    full = key_fn() + (like.dtype, str(like.device))
    hit = _CONSTANTS.get(full)
    if hit is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
        hit = _CONSTANTS[full] = torch.as_tensor(make(), dtype=like.dtype, device=like.device)
    return hit


def _window(name: str, nu: np.ndarray, scaling: float) -> np.ndarray:
    if name == "ram-lak":
        win = np.ones_like(nu)
    elif name == "shepp-logan":
        win = np.sinc(nu / (2 * scaling))
    elif name == "cosine":
        win = np.cos(np.pi * nu / (2 * scaling))
    elif name == "hamming":
        win = 0.54 + 0.46 * np.cos(np.pi * nu / scaling)
    else:  # hann
        win = np.cos(np.pi * nu / (2 * scaling)) ** 2
    win[nu > scaling] = 0.0
    return win


def _check_filter(filter: str, frequency_scaling: float) -> str:
    name = str(filter).lower().replace("_", "-")
    if name not in FILTERS:
        raise ValueError(f"`filter` must be one of {FILTERS}, got {filter!r}")
    if not (isinstance(frequency_scaling, numbers.Real) and not isinstance(frequency_scaling, bool)
            and 0 < frequency_scaling <= 1):
        raise ValueError(f"`frequency_scaling` must be in (0, 1], got {frequency_scaling!r}")
    return name


def filter_response(n: int, spacing: float, filter: str = "ram-lak",
                    frequency_scaling: float = 1.0) -> np.ndarray:
    """Real frequency response (``rfft`` layout, length ``n//2 + 1``) of the windowed ramp.

    ``spacing`` times the DFT of the Kak–Slaney ramp kernel of length ``n``, times the
    window; approximates ``|nu|`` (cycles per length unit) below the cut-off.
    """
    name = _check_filter(filter, frequency_scaling)
    k = np.fft.fftfreq(n, d=1.0 / n)  # integer offsets -n/2 .. n/2-1, circular order
    h = np.zeros(n)
    h[0] = 1.0 / (4.0 * spacing**2)
    odd = np.abs(k) % 2 == 1
    h[odd] = -1.0 / (np.pi * k[odd] * spacing) ** 2
    resp = spacing * np.real(np.fft.rfft(h))
    nu = np.abs(np.fft.rfftfreq(n)) * 2.0  # normalised to the Nyquist frequency
    return resp * _window(name, nu, float(frequency_scaling))


def ramp_filter(sinogram: torch.Tensor, spacing: float, filter: str = "ram-lak",
                frequency_scaling: float = 1.0, padding: bool = True) -> torch.Tensor:
    """Convolve every row (last axis, bin width ``spacing``) with the windowed ramp filter.

    With ``padding`` the rows are zero-padded to a power of two ``>= 2 n`` so the
    circular FFT convolution equals the linear one.
    """
    n = sinogram.shape[-1]
    size = 1 << max(1, math.ceil(math.log2(2 * n))) if padding else n
    resp = _constant(lambda: ("ramp", size, float(spacing), filter, float(frequency_scaling)),
                     lambda: filter_response(size, spacing, filter, frequency_scaling), sinogram)
    spec = torch.fft.rfft(sinogram, n=size, dim=-1)
    return torch.fft.irfft(spec * resp, n=size, dim=-1)[..., :n]


def fbp(sinogram: torch.Tensor, operator, filter: str = "ram-lak", frequency_scaling: float = 1.0,
        *, padding: bool = True) -> torch.Tensor:
    """Filtered back projection ``(..., n_angles, n_det) -> (..., H, W)``.

    Parameters
    ----------
    sinogram : torch.Tensor
        Data ``(B, C, n_angles, n_det)`` (any leading dims), float32 or float64.
    operator : RayTransform or Geometry
        The acquisition (a geometry gets a ``torch``-backend operator).
    filter : {"ram-lak", "shepp-logan", "cosine", "hamming", "hann"}
        Window applied to the ramp (module docstring).
    frequency_scaling : float in (0, 1]
        Cut-off as a fraction of the Nyquist frequency.
    padding : bool
        Zero-pad before filtering (default; avoids wrap-around).

    Returns
    -------
    torch.Tensor
        Image in the units of the operator's domain (attenuation per length unit).
    """
    if isinstance(operator, Geometry):
        operator = RayTransform(operator)
    if not isinstance(operator, RayTransform):
        raise TypeError(f"`operator` must be a RayTransform or Geometry, got {type(operator).__name__}")
    _check_filter(filter, frequency_scaling)
    geom = operator.geometry
    if not isinstance(sinogram, torch.Tensor) or sinogram.ndim < 2 \
            or tuple(sinogram.shape[-2:]) != geom.range_shape:
        shape = tuple(sinogram.shape) if isinstance(sinogram, torch.Tensor) else type(sinogram).__name__
        raise ValueError(f"`sinogram` has shape {shape}, expected (..., {geom.range_shape[0]}, "
                         f"{geom.range_shape[1]}) for {geom!r}")
    if sinogram.numel() == 0:
        return sinogram.new_zeros(tuple(sinogram.shape[:-2]) + tuple(geom.image_shape))
    weights = _constant(lambda: ("angle_weights", geom.cache_key()), geom.angle_weights, sinogram)
    if isinstance(geom, ParallelBeamGeometry):
        q = ramp_filter(sinogram, geom.detector_spacing, filter, frequency_scaling, padding)
        dy, dx = geom.pixel_size
        return operator.adjoint(q * weights[:, None]) * (geom.detector_spacing / (dx * dy))
    if isinstance(geom, FanBeamGeometry):
        _warn_short_scan(geom)
        return _fan_fbp(sinogram, geom, weights, filter, frequency_scaling, padding)
    raise ValueError(f"`operator` geometry {type(geom).__name__} has no FBP")


def _warn_short_scan(geom: FanBeamGeometry) -> None:
    """A ``RuntimeWarning`` when the fan-beam angles cover less than ``2π`` (their span plus one
    mean step): the fan formula counts every ray twice over a full turn and has no Parker
    weights for a short scan, so such a reconstruction is wrong (a relative error of 0.9 on the
    Shepp-Logan phantom for ``π`` plus the fan angle)."""
    angles = np.asarray(geom.angles, dtype=np.float64)
    if angles.size < 2:
        covered = 0.0
    else:
        covered = float(np.ptp(angles)) * angles.size / (angles.size - 1)
    if covered < 2 * math.pi * (1 - 1e-6):
        warnings.warn(f"fbp: the fan-beam angles cover {covered:.3f} rad, less than a full turn "
                      f"(2π = {2 * math.pi:.3f}); fan-beam FBP here needs a full scan (there are no "
                      f"short-scan Parker weights), so this reconstruction is wrong",
                      RuntimeWarning, stacklevel=3)


def _fan_fbp(sinogram, geom: FanBeamGeometry, weights, filter, frequency_scaling, padding):
    rs = geom.source_radius
    scale = rs / (rs + geom.detector_radius)
    du = geom.detector_spacing * scale
    u = torch.as_tensor(geom.detector_positions() * scale, dtype=sinogram.dtype, device=sinogram.device)
    q = ramp_filter(sinogram * (rs / torch.sqrt(rs**2 + u**2)), du, filter, frequency_scaling, padding)
    q = q * (0.5 * weights[:, None])
    lead = sinogram.shape[:-2]
    q = q.reshape((-1,) + geom.range_shape)
    n = q.shape[0]
    H, W = geom.image_shape
    h, w = geom.extent
    dy, dx = geom.pixel_size
    opts = dict(dtype=sinogram.dtype, device=sinogram.device)
    ys = h / 2 - (torch.arange(H, **opts) + 0.5) * dy
    xs = -w / 2 + (torch.arange(W, **opts) + 0.5) * dx
    X = xs[None, :].expand(H, W).reshape(1, -1)
    Y = ys[:, None].expand(H, W).reshape(1, -1)
    out = q.new_zeros((n, H * W))
    phi_all = torch.tensor(np.array(geom.angles), **opts)
    step = max(1, _CHUNK_ELEMENTS // max(1, n * H * W))
    for a0 in range(0, geom.n_angles, step):
        phi = phi_all[a0:a0 + step, None]
        c, s = torch.cos(phi), torch.sin(phi)
        dist = rs + (-s * X + c * Y)  # R_s + <x, theta_perp>
        upos = rs * (c * X + s * Y) / dist
        kf = (upos - u[0]) / du
        k0 = torch.floor(kf)
        frac = kf - k0
        k0 = k0.long()
        qa = q[:, a0:a0 + step]  # (n, n_c, n_det)
        vals = 0.0
        for kk, wt in ((k0, 1.0 - frac), (k0 + 1, frac)):
            ok = (kk >= 0) & (kk < geom.n_detectors)
            idx = kk.clamp(0, geom.n_detectors - 1).expand(n, -1, -1)
            vals = vals + torch.gather(qa, 2, idx) * (wt * ok)
        out = out + (vals * (1.0 / (dist / rs) ** 2)).sum(1)
    return out.reshape(lead + (H, W))
