"""Phantoms: random ellipses (Adler & Öktem 2018 style), lesion phantoms with masks, Shepp–Logan.

All phantoms live in *normalised coordinates*: the image rectangle is ``[-1, 1]^2``
with ``x`` to the right (columns) and ``y`` up (row 0 at the top), the convention of
:mod:`recon.operators.geometry` scaled by the half-extent. An ellipse is the row
``(value, a, b, cx, cy, angle)``: semi-axes ``a`` (along its own x axis) and ``b``,
centre ``(cx, cy)``, rotation ``angle`` (radians, counter-clockwise). Pixel values
are dimensionless attenuation in ``[0, 1]`` (1 about bone-like, ~0.3 soft tissue in
the lesion phantoms); multiply by an attenuation scale for physical units.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "render_ellipses",
    "random_ellipses",
    "ellipse_phantom",
    "lesion_phantom",
    "shepp_logan",
    "SHEPP_LOGAN_ELLIPSES",
]

#: Modified Shepp–Logan (Toft 1996) in ``(value, a, b, cx, cy, angle)`` rows; values add up.
SHEPP_LOGAN_ELLIPSES = np.array([
    [1.00, 0.6900, 0.9200, 0.00, 0.0000, 0.0],
    [-0.80, 0.6624, 0.8740, 0.00, -0.0184, 0.0],
    [-0.20, 0.1100, 0.3100, 0.22, 0.0000, -18.0],
    [-0.20, 0.1600, 0.4100, -0.22, 0.0000, 18.0],
    [0.10, 0.2100, 0.2500, 0.00, 0.3500, 0.0],
    [0.10, 0.0460, 0.0460, 0.00, 0.1000, 0.0],
    [0.10, 0.0460, 0.0460, 0.00, -0.1000, 0.0],
    [0.10, 0.0460, 0.0230, -0.08, -0.6050, 0.0],
    [0.10, 0.0230, 0.0230, 0.00, -0.6060, 0.0],
    [0.10, 0.0230, 0.0460, 0.06, -0.6050, 0.0],
])
SHEPP_LOGAN_ELLIPSES[:, 5] *= math.pi / 180.0


def _grid(shape, dtype=torch.float64):
    H, W = shape
    y = 1.0 - (torch.arange(H, dtype=dtype) + 0.5) * (2.0 / H)
    x = -1.0 + (torch.arange(W, dtype=dtype) + 0.5) * (2.0 / W)
    return x[None, :], y[:, None]


def _inside(params, x, y) -> torch.Tensor:
    _, a, b, cx, cy, ang = (float(v) for v in params)
    c, s = math.cos(ang), math.sin(ang)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def render_ellipses(ellipses, shape, *, mode: str = "add") -> torch.Tensor:
    """Rasterise ellipses (rows ``(value, a, b, cx, cy, angle)``) on an ``(H, W)`` grid.

    A pixel belongs to an ellipse when its centre does. ``mode="add"`` sums the
    values of all ellipses covering a pixel; ``mode="set"`` paints them in order
    (later ellipses overwrite). Returns a float64 tensor.
    """
    if mode not in ("add", "set"):
        raise ValueError(f"`mode` must be 'add' or 'set', got {mode!r}")
    ellipses = np.asarray(ellipses, dtype=np.float64).reshape(-1, 6)
    if np.any(ellipses[:, 1:3] <= 0):
        raise ValueError(f"ellipse semi-axes must be positive, got {ellipses[:, 1:3].min()}")
    x, y = _grid(shape)
    img = torch.zeros(tuple(shape), dtype=torch.float64)
    for row in ellipses:
        inside = _inside(row, x, y)
        if mode == "add":
            img += row[0] * inside
        else:
            img = torch.where(inside, torch.as_tensor(row[0], dtype=img.dtype), img)
    return img


def random_ellipses(rng: np.random.Generator, n_mean: float = 50.0, *, interior: bool = False) -> np.ndarray:
    """Random ellipse parameters in the style of Adler & Öktem (2018).

    ``n ~ Poisson(n_mean)`` ellipses with value ``(U - 1/2) * Exp(0.4)``, semi-axes
    ``Exp(0.2)`` each (clipped to ``>= 0.01``), centre uniform in ``[-1, 1]^2``
    (``[-1/2, 1/2]^2`` if ``interior``) and angle uniform in ``[0, 2 pi)``.
    """
    n = int(rng.poisson(n_mean))
    lim = 0.5 if interior else 1.0
    out = np.empty((n, 6))
    out[:, 0] = (rng.random(n) - 0.5) * rng.exponential(0.4, n)
    out[:, 1] = np.maximum(rng.exponential(0.2, n), 0.01)
    out[:, 2] = np.maximum(rng.exponential(0.2, n), 0.01)
    out[:, 3] = rng.uniform(-lim, lim, n)
    out[:, 4] = rng.uniform(-lim, lim, n)
    out[:, 5] = rng.uniform(0, 2 * np.pi, n)
    return out


def ellipse_phantom(shape, rng: np.random.Generator, n_mean: float = 50.0, *,
                    interior: bool = False, min_support: float = 0.01,
                    max_draws: int = 100) -> torch.Tensor:
    """Random-ellipse phantom in ``[0, 1]``: :func:`random_ellipses` summed, negative
    parts clipped to 0 and the result divided by its maximum.

    A draw whose positive part covers less than ``min_support`` of the pixels (e.g. no ellipse,
    or only negative ones) is redrawn from the same ``rng``, up to ``max_draws`` times, so a data
    set never holds an empty image (whose PSNR is undefined).
    """
    if not 0.0 <= min_support < 1.0:
        raise ValueError(f"min_support must lie in [0, 1), got {min_support!r}")
    for _ in range(max_draws):
        img = render_ellipses(random_ellipses(rng, n_mean, interior=interior), shape).clamp_min(0.0)
        if float((img > 0).double().mean()) >= min_support:
            break
    else:
        raise ValueError(f"no phantom with support ≥ {min_support} in {max_draws} draws "
                         f"(n_mean={n_mean}); raise n_mean or lower min_support")
    return img / float(img.max())


def _point_in_ellipse(rng, ell, margin: float) -> tuple[float, float]:
    """Uniform point in the ellipse ``ell`` shrunk by the factor ``1 - margin``."""
    _, a, b, cx, cy, ang = ell
    r = math.sqrt(rng.random()) * (1.0 - margin)
    t = rng.uniform(0, 2 * math.pi)
    u, v = a * r * math.cos(t), b * r * math.sin(t)
    c, s = math.cos(ang), math.sin(ang)
    return cx + u * c - v * s, cy + u * s + v * c


def lesion_phantom(shape, rng: np.random.Generator, *, lesion_rate: float = 1.5,
                   n_texture: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Abdomen-like phantom with small lesions inside an organ, and the lesion mask.

    A stand-in for liver-tumour slices: a body ellipse (value 0.25-0.35), an organ
    ellipse inside it (value +0.15-0.25 above the body), ``Poisson(n_texture)`` faint
    texture ellipses (``±0.05``) and a bright spine-like ellipse (0.8-1.0); then
    ``1 + Poisson(lesion_rate - 1)`` lesions (semi-axes 0.04-0.12, value 0.08-0.2
    below the organ) painted inside the organ. Values lie in ``[0, 1]``.

    Returns
    -------
    image, mask : torch.Tensor (H, W) float64
        ``mask`` is 1 on lesion pixels and 0 elsewhere.
    """
    if lesion_rate < 1:
        raise ValueError(f"`lesion_rate` must be >= 1 (at least one lesion), got {lesion_rate!r}")
    body_val = rng.uniform(0.25, 0.35)
    body = (body_val, rng.uniform(0.75, 0.9), rng.uniform(0.55, 0.72),
            rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), rng.uniform(-0.15, 0.15))
    organ_val = body_val + rng.uniform(0.15, 0.25)
    oc = _point_in_ellipse(rng, body, 0.6)
    organ = (organ_val, rng.uniform(0.25, 0.38), rng.uniform(0.2, 0.32),
             oc[0] - 0.15, oc[1], rng.uniform(0, np.pi))
    rows = [body, organ]
    for _ in range(int(rng.poisson(n_texture))):
        cx, cy = _point_in_ellipse(rng, body, 0.3)
        rows.append((rng.uniform(-0.05, 0.05), rng.uniform(0.02, 0.15), rng.uniform(0.02, 0.15),
                     cx, cy, rng.uniform(0, np.pi)))
    rows.append((rng.uniform(0.8, 1.0), rng.uniform(0.06, 0.1), rng.uniform(0.05, 0.08),
                 body[3] + rng.uniform(-0.05, 0.05), body[4] - 0.7 * body[2], 0.0))
    img = render_ellipses([rows[0]], shape, mode="set")
    img = img + render_ellipses(np.asarray(rows[2:-1]), shape) if len(rows) > 3 else img
    body_in = render_ellipses([(1.0,) + tuple(body[1:])], shape) > 0
    organ_in = (render_ellipses([(1.0,) + tuple(organ[1:])], shape) > 0) & body_in
    img = torch.where(organ_in, img - body_val + organ_val, img)
    spine = render_ellipses([(1.0,) + tuple(rows[-1][1:])], shape) > 0
    img = torch.where(spine, torch.as_tensor(rows[-1][0], dtype=img.dtype), img)
    mask = torch.zeros(tuple(shape), dtype=torch.bool)
    n_lesions = 1 + int(rng.poisson(lesion_rate - 1.0))
    for _ in range(n_lesions):
        size = rng.uniform(0.04, 0.12)
        cx, cy = _point_in_ellipse(rng, organ, min(0.9, size / min(organ[1], organ[2]) + 0.1))
        les = (1.0, size * rng.uniform(0.7, 1.0), size * rng.uniform(0.7, 1.0), cx, cy, rng.uniform(0, np.pi))
        inside = (render_ellipses([les], shape) > 0) & organ_in
        img = torch.where(inside, organ_val - rng.uniform(0.08, 0.2) + 0 * img, img)
        mask |= inside
    return img.clamp(0.0, 1.0), mask.to(torch.float64)


def shepp_logan(shape) -> torch.Tensor:
    """Modified Shepp–Logan phantom on an ``(H, W)`` grid, values in ``[0, 1]`` (float64)."""
    return render_ellipses(SHEPP_LOGAN_ELLIPSES, shape).clamp(0.0, 1.0)
