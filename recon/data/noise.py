"""Measurement noise and sparse-view data simulation for sinograms.

Noise models are callables ``noise(sinogram, generator) -> noisy sinogram`` that act
on a batch ``(..., n_angles, n_det)`` and draw from the given ``torch.Generator`` only,
so data are reproducible by seed.

* :class:`GaussianNoise` — additive white noise relative to the signal:
  ``y + level * mean(|y|) * N(0, 1)``, the mean taken per sample (over the last three
  axes, or over everything for a 2-D input).
* :class:`PoissonNoise` — low-dose transmission data (Beer–Lambert): photon counts
  ``b ~ Poisson(I0 * exp(-mu_scale * y))``, zero counts set to ``min_count``, and the
  returned data ``-log(b / I0) / mu_scale`` in the units of ``y`` (line integrals).
  ``mu_scale`` converts the sinogram's units to optical depth (e.g. the attenuation of
  water per length unit when images are in units of water). The reference text uses
  ``I0 = 7e4``.

Sparse view: :func:`select_views` keeps a subset of the angles (data and geometry).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ..operators.geometry import Geometry

__all__ = ["GaussianNoise", "PoissonNoise", "select_views", "as_noise_model"]

#: Rates above this are sampled from the normal approximation ``N(λ, λ)`` (relative error of
#: its moments below 1e-6; ``torch.poisson`` returns garbage from 2**63 on).
POISSON_NORMAL_RATE = 2.0**40


def _is_real(value) -> bool:
    """A real number (Python or NumPy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_sinogram(sinogram, what: str) -> None:
    if not isinstance(sinogram, torch.Tensor) or not sinogram.is_floating_point():
        raise TypeError(f"`sinogram` must be a floating-point torch.Tensor, got "
                        f"{type(sinogram).__name__}"
                        + (f" of dtype {sinogram.dtype}" if isinstance(sinogram, torch.Tensor) else ""))
    bad = ~torch.isfinite(sinogram)
    if bool(bad.any()):
        raise ValueError(f"`sinogram` holds {int(bad.sum())} NaN or infinite value(s); {what} "
                         f"needs finite data (check the simulation or the data file)")


class GaussianNoise:
    """Relative white Gaussian noise ``y + level * mean(|y|) * N(0, 1)`` (per sample).

    Parameters
    ----------
    level : float >= 0
        Noise standard deviation relative to the mean absolute sinogram value
        (e.g. 0.05 for 5 %).
    """

    def __init__(self, level: float):
        if not (_is_real(level) and math.isfinite(level) and level >= 0):
            raise ValueError(f"`level` must be a finite number >= 0, got {level!r}")
        self.level = float(level)

    def __call__(self, sinogram: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``sinogram + level * mean(|sinogram|) * N(0, 1)``; ``ValueError`` on NaN / Inf data."""
        _check_sinogram(sinogram, "GaussianNoise")
        dims = tuple(range(max(sinogram.ndim - 3, 0), sinogram.ndim)) if sinogram.ndim >= 3 else None
        scale = sinogram.abs().mean(dim=dims, keepdim=True) if dims else sinogram.abs().mean()
        noise = torch.randn(sinogram.shape, generator=generator, dtype=sinogram.dtype, device=sinogram.device)
        return sinogram + self.level * scale * noise

    def __repr__(self) -> str:
        return f"GaussianNoise(level={self.level:g})"


class PoissonNoise:
    """Low-dose Poisson noise on transmission counts (module docstring).

    Parameters
    ----------
    I0 : float > 0
        Incident photons per detector bin (unattenuated count).
    mu_scale : float > 0
        Factor turning sinogram values into optical depth: counts are
        ``I0 * exp(-mu_scale * y)``.
    min_count : float > 0
        Value replacing zero counts before the logarithm (default 1 photon).
    """

    def __init__(self, I0: float = 7e4, mu_scale: float = 1.0, min_count: float = 1.0):
        for name, val in (("I0", I0), ("mu_scale", mu_scale), ("min_count", min_count)):
            if not (_is_real(val) and math.isfinite(val) and val > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {val!r}")
        if min_count > I0:
            raise ValueError(f"`min_count` must not exceed `I0`, got min_count={min_count!r}, I0={I0!r}")
        self.I0 = float(I0)
        self.mu_scale = float(mu_scale)
        self.min_count = float(min_count)

    def counts(self, sinogram: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Photon counts ``b ~ Poisson(λ)``, ``λ = I0 exp(-mu_scale y)`` (float, same dtype).

        Rates above :data:`POISSON_NORMAL_RATE` are drawn from the normal approximation
        ``λ + sqrt(λ) N(0, 1)``.  ``ValueError`` for NaN / Inf data, or data so negative that
        ``λ`` overflows the dtype (negative line integrals: more photons than emitted).
        """
        _check_sinogram(sinogram, "PoissonNoise")
        rate = self.I0 * torch.exp(-self.mu_scale * sinogram)
        if not bool(torch.isfinite(rate).all()):
            raise ValueError(
                f"`sinogram` values down to {float(sinogram.min()):.4g} give photon rates "
                f"I0*exp(-mu_scale*y) beyond {sinogram.dtype} (I0={self.I0:g}, "
                f"mu_scale={self.mu_scale:g}); line integrals must not be that negative: "
                f"check the data or lower mu_scale")
        large = rate > POISSON_NORMAL_RATE
        if not bool(large.any()):
            return torch.poisson(rate, generator=generator)
        small = torch.poisson(torch.where(large, torch.zeros_like(rate), rate), generator=generator)
        z = torch.randn(rate.shape, generator=generator, dtype=rate.dtype, device=rate.device)
        return torch.where(large, rate + torch.sqrt(rate) * z, small)

    def __call__(self, sinogram: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noisy line integrals ``-log(max(b, min_count) / I0) / mu_scale``."""
        b = self.counts(sinogram, generator).clamp_min(self.min_count)
        return -torch.log(b / self.I0) / self.mu_scale

    def __repr__(self) -> str:
        return f"PoissonNoise(I0={self.I0:g}, mu_scale={self.mu_scale:g}, min_count={self.min_count:g})"


def as_noise_model(noise):
    """``None`` -> ``None``; a number -> :class:`GaussianNoise`; a callable as is."""
    if noise is None:
        return None
    if _is_real(noise):
        return GaussianNoise(float(noise))
    if callable(noise):
        return noise
    raise ValueError(f"`noise` must be None, a relative Gaussian level or a noise model, got {noise!r}")


def select_views(sinogram: torch.Tensor, geometry: Geometry, *, step: int | None = None,
                 n_views: int | None = None, index=None):
    """Sparse-view data: keep some angles of ``sinogram`` and of its ``geometry``.

    Give exactly one of ``step`` (every ``step``-th angle), ``n_views`` (that many
    angles, as evenly spaced as the grid allows) or ``index`` (explicit indices).

    Returns
    -------
    sinogram : torch.Tensor
        ``(..., n_kept, n_det)``.
    geometry : Geometry
        The geometry of the kept angles.
    """
    if sum(v is not None for v in (step, n_views, index)) != 1:
        raise ValueError(f"give exactly one of `step`, `n_views`, `index`; got step={step!r}, "
                         f"n_views={n_views!r}, index={index!r}")
    n = geometry.n_angles
    if tuple(sinogram.shape[-2:]) != geometry.range_shape:
        raise ValueError(f"`sinogram` has shape {tuple(sinogram.shape)}, expected (..., "
                         f"{geometry.range_shape[0]}, {geometry.range_shape[1]}) for `geometry`")
    if step is not None:
        if int(step) != step or not 1 <= step <= n:
            raise ValueError(f"`step` must be an int in [1, {n}], got {step!r}")
        idx = np.arange(0, n, int(step))
    elif n_views is not None:
        if int(n_views) != n_views or not 1 <= n_views <= n:
            raise ValueError(f"`n_views` must be an int in [1, {n}], got {n_views!r}")
        idx = np.unique(np.floor(np.arange(int(n_views)) * n / int(n_views)).astype(np.int64))
    else:
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        if idx.size == 0 or idx.min() < -n or idx.max() >= n:
            raise ValueError(f"`index` must hold angle indices in [0, {n}), got {index!r}")
    return sinogram[..., torch.as_tensor(idx, device=sinogram.device), :], geometry.select_angles(idx)
