r"""Anatomy-like random phantoms: layouts, textures, thin structures and irregular lesions.

Networks trained only on smooth random ellipses keep little of their gain on real slices, whose
statistics differ: a body outline with a fat layer, organs of random contrast, bone rings,
air-filled lungs with vessels, thin bright curves, irregular lesions and tissue texture.
:func:`anatomy_phantom` draws such an image from one ``numpy.random.Generator`` (the same seed
gives the same image), in the normalised coordinates of :mod:`recon.data.phantoms`
(``[-1, 1]²``, ``y`` up).  Values are dimensionless attenuation in ``[0, 1]`` (air 0, water-like
soft tissue ~0.3, bone up to 1).

One phantom is a *layout* drawn uniformly from :data:`LAYOUTS`:

- ``"thorax"``: body, two lungs (near-air, with branching vessels), heart, spine, ribs;
- ``"abdomen"``: body, liver-, kidney- and bowel-like organs, spine;
- ``"head"``: skull ring (cortical bone), brain, ventricles, sulcus-like thin curves;
- ``"ellipses"``: the random-ellipse family (:func:`~recon.data.phantoms.random_ellipses`).

then ``Poisson(n_lesions)`` irregular lesions (star-shaped blobs ``r(φ) = 1 + Σ_k c_k
cos(kφ + φ_k)``, contrast ±0.05–0.25), ``Poisson(n_vessels)`` thin curves (quadratic Bézier,
0.5–2 pixels wide) and a multiplicative texture ``x ← x (1 + t · n)`` with ``n`` a sum of
Gaussian-smoothed white noise at two scales (unit standard deviation) and ``t ~ U(0, texture)``.
Finally the image is scaled by ``U(0.6, 1) / max``, so its peak value is random.  With
probability ``zoom`` the field of view is a crop: the coordinates are ``(x, y) / z + s`` with
``z ~ U(1.3, 3)`` and shift ``s ~ U(-0.5, 0.5)²``, so the anatomy runs past the image border as in
a clinical region of interest (a network that only saw air around the body adds border
artefacts to such slices).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["LAYOUTS", "anatomy_phantom"]

LAYOUTS = ("thorax", "abdomen", "head", "ellipses")


def _grid(shape):
    H, W = shape
    y = 1.0 - (np.arange(H) + 0.5) * (2.0 / H)
    x = -1.0 + (np.arange(W) + 0.5) * (2.0 / W)
    return x[None, :], y[:, None]


def _blob(grid, rng, centre, axes, angle, roughness=0.0) -> np.ndarray:
    """Boolean mask of a star-shaped blob: an ellipse whose radius is ``r(φ) = 1 + Σ c_k cos``."""
    x, y = grid
    c, s = math.cos(angle), math.sin(angle)
    u = ((x - centre[0]) * c + (y - centre[1]) * s) / axes[0]
    v = (-(x - centre[0]) * s + (y - centre[1]) * c) / axes[1]
    radius = np.ones_like(u + v)
    if roughness > 0:
        phi = np.arctan2(v, u)
        for k in range(2, 6):
            radius = radius + rng.uniform(0, roughness / k) * np.cos(k * phi + rng.uniform(0, 6.3))
    return u ** 2 + v ** 2 <= radius ** 2


def _curve(grid, rng, p0, p2, width) -> np.ndarray:
    """Mask of a quadratic Bézier curve from ``p0`` to ``p2`` of ``width`` (normalised units)."""
    x, y = grid
    p0, p2 = np.asarray(p0), np.asarray(p2)
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.25 * np.linalg.norm(p2 - p0) + 1e-3, 2)
    t = np.linspace(0, 1, 64)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2
    dist = np.full(np.broadcast_shapes(x.shape, y.shape), np.inf)
    for px, py in pts:
        dist = np.minimum(dist, (x - px) ** 2 + (y - py) ** 2)
    return dist <= (width / 2) ** 2


def _texture(shape, rng) -> np.ndarray:
    """Unit-variance smooth noise: white noise blurred at 1 and 4 % of the image size, summed."""
    from scipy.ndimage import gaussian_filter

    out = np.zeros(shape)
    for sigma in (0.01 * max(shape), 0.04 * max(shape)):
        n = gaussian_filter(rng.standard_normal(shape), max(sigma, 0.5))
        out += n / (n.std() + 1e-12)
    return out / math.sqrt(2.0)


def _body(grid, rng, img):
    """Body outline with a fat layer; returns (inner mask, tissue value, body axes)."""
    a, b = rng.uniform(0.7, 0.92), rng.uniform(0.55, 0.8)
    centre = rng.uniform(-0.05, 0.05, 2)
    angle = rng.uniform(-0.2, 0.2)
    outer = _blob(grid, rng, centre, (a, b), angle, 0.08)
    fat = rng.uniform(0.18, 0.27)
    img[outer] = fat
    shrink = rng.uniform(0.85, 0.95)
    inner = _blob(grid, rng, centre, (a * shrink, b * shrink), angle, 0.05) & outer
    tissue = rng.uniform(0.28, 0.38)
    img[inner] = tissue
    return inner, tissue, (a, b, centre)


def _organ(grid, rng, img, inside, centre, axes, value, roughness=0.15):
    mask = _blob(grid, rng, centre, axes, rng.uniform(0, math.pi), roughness) & inside
    img[mask] = value
    return mask


def _bone_ring(grid, rng, img, centre, axes, thickness, inside=None):
    """Cortical bone ring (value 0.8-1) around marrow (0.4-0.6)."""
    outer = _blob(grid, rng, centre, axes, 0.0, 0.02)
    inner = _blob(grid, rng, centre, (axes[0] - thickness, axes[1] - thickness), 0.0, 0.02)
    if inside is not None:
        outer &= inside
    img[outer] = rng.uniform(0.8, 1.0)
    img[inner & outer] = rng.uniform(0.4, 0.6)


def _thorax(grid, rng, img, inside, tissue, body):
    a, b, (cx, cy) = body
    lungs = np.zeros(img.shape, bool)
    for side in (-1, 1):
        centre = (cx + side * a * rng.uniform(0.4, 0.5), cy + rng.uniform(-0.05, 0.15) * b)
        lungs |= _organ(grid, rng, img, inside, centre,
                        (a * rng.uniform(0.3, 0.4), b * rng.uniform(0.55, 0.7)),
                        rng.uniform(0.0, 0.05), 0.1)
    for _ in range(int(rng.poisson(12))):  # vessels branching in the lungs
        p0 = (cx + rng.uniform(-0.3, 0.3) * a, cy + rng.uniform(-0.2, 0.2) * b)
        p2 = p0 + rng.normal(0, 0.3, 2)
        img[_curve(grid, rng, p0, p2, rng.uniform(0.01, 0.03)) & lungs] = tissue * 0.9
    _organ(grid, rng, img, inside, (cx + rng.uniform(-0.15, 0.05), cy - 0.1 * b),
           (0.22 * a, 0.3 * b), tissue + rng.uniform(0.02, 0.1))
    _bone_ring(grid, rng, img, (cx, cy - 0.8 * b), (0.09, 0.08), 0.03, inside)
    for _ in range(int(rng.integers(4, 9))):  # rib cross-sections near the outline
        phi = rng.uniform(0, 2 * math.pi)
        c = (cx + 0.85 * a * math.cos(phi), cy + 0.85 * b * math.sin(phi))
        _bone_ring(grid, rng, img, c, (0.04, 0.03), 0.015, inside)


def _abdomen(grid, rng, img, inside, tissue, body):
    a, b, (cx, cy) = body
    _organ(grid, rng, img, inside, (cx - 0.35 * a, cy + 0.15 * b), (0.4 * a, 0.45 * b),
           tissue + rng.uniform(0.03, 0.12), 0.2)  # liver
    for side in (-1, 1):  # kidneys
        _organ(grid, rng, img, inside, (cx + side * 0.4 * a, cy - 0.45 * b), (0.12, 0.17),
               tissue + rng.uniform(0.05, 0.15), 0.1)
    for _ in range(int(rng.poisson(4))):  # bowel loops: gas (dark) or contrast (bright)
        centre = (cx + rng.uniform(0.0, 0.6) * a, cy + rng.uniform(-0.3, 0.5) * b)
        value = rng.choice([rng.uniform(0.0, 0.1), rng.uniform(0.45, 0.7)])
        _organ(grid, rng, img, inside, centre, rng.uniform(0.04, 0.12, 2), value, 0.3)
    _bone_ring(grid, rng, img, (cx, cy - 0.75 * b), (0.1, 0.09), 0.03, inside)


def _head(grid, rng, img, inside, tissue, body):
    a, b, (cx, cy) = body
    _bone_ring(grid, rng, img, (cx, cy), (0.95 * a, 0.95 * b), rng.uniform(0.04, 0.08))
    brain = _blob(grid, rng, (cx, cy), (0.85 * a, 0.85 * b), 0.0, 0.02)
    img[brain] = tissue
    for side in (-1, 1):  # ventricles
        _organ(grid, rng, img, brain, (cx + side * 0.1 * a, cy + 0.05), (0.06, 0.2),
               tissue - rng.uniform(0.1, 0.2), 0.3)
    for _ in range(int(rng.poisson(10))):  # sulci: thin dark curves near the cortex
        phi = rng.uniform(0, 2 * math.pi)
        p0 = np.array([cx + 0.8 * a * math.cos(phi), cy + 0.8 * b * math.sin(phi)])
        img[_curve(grid, rng, p0, p0 * 0.8, rng.uniform(0.01, 0.02)) & brain] = tissue - 0.05


def _ellipses(grid, rng, img, inside, tissue, body):
    from .phantoms import random_ellipses, render_ellipses

    img[:] = render_ellipses(random_ellipses(rng, rng.uniform(5, 30)), img.shape).numpy()
    np.clip(img, 0, None, out=img)
    img /= max(float(img.max()), 1e-12) / rng.uniform(0.4, 0.9)


_LAYOUT_FUNCTIONS = {"thorax": _thorax, "abdomen": _abdomen, "head": _head,
                     "ellipses": _ellipses}


def anatomy_phantom(shape, rng: np.random.Generator, *, layouts=LAYOUTS, texture: float = 0.15,
                    n_lesions: float = 2.0, n_vessels: float = 4.0,
                    zoom: float = 0.4) -> torch.Tensor:
    """One anatomy-like phantom (see the module docstring), ``(H, W)`` float64 in ``[0, 1]``.

    ``layouts``: the layouts drawn from (uniformly); ``texture``: the largest relative texture
    amplitude ``t``; ``n_lesions`` / ``n_vessels``: Poisson means of lesions and thin curves;
    ``zoom``: probability of a zoomed-in crop (``0``: the whole body is always in view).
    """
    H, W = (int(shape), int(shape)) if np.isscalar(shape) else (int(shape[0]), int(shape[1]))
    if H < 2 or W < 2:
        raise ValueError(f"shape must be at least 2 x 2, got {shape!r}")
    unknown = [name for name in layouts if name not in _LAYOUT_FUNCTIONS]
    if not layouts or unknown:
        raise ValueError(f"layouts must be a non-empty subset of {LAYOUTS}, got {layouts!r}")
    for name, value in (("texture", texture), ("n_lesions", n_lesions), ("n_vessels", n_vessels)):
        if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (isinstance(zoom, (int, float)) and 0 <= zoom <= 1):
        raise ValueError(f"zoom must be a probability in [0, 1], got {zoom!r}")
    grid, img, z = _grid((H, W)), np.zeros((H, W)), 1.0
    if rng.random() < zoom:
        z, shift = rng.uniform(1.3, 3.0), rng.uniform(-0.5, 0.5, 2)
        grid = (grid[0] / z + shift[0], grid[1] / z + shift[1])
    inside, tissue, body = _body(grid, rng, img)
    _LAYOUT_FUNCTIONS[layouts[int(rng.integers(len(layouts)))]](grid, rng, img, inside, tissue,
                                                                body)
    support = img > 0
    _details(grid, rng, img, support, n_lesions, n_vessels, 2.0 / (z * max(H, W)))
    img *= 1.0 + rng.uniform(0, texture) * _texture((H, W), rng) * support
    np.clip(img, 0.0, None, out=img)
    img *= rng.uniform(0.6, 1.0) / max(float(img.max()), 1e-12)
    return torch.from_numpy(img.clip(0.0, 1.0))


def _details(grid, rng, img, support, n_lesions, n_vessels, pixel):
    """Irregular lesions (some with a bright calcification) and thin bright curves.

    ``pixel``: the pixel size in the (possibly zoomed) normalised coordinates."""
    rows, cols = np.nonzero(support)
    if rows.size == 0:
        return
    x, y = grid

    def point():
        k = int(rng.integers(rows.size))
        return np.array([x[0, cols[k]], y[rows[k], 0]])

    for _ in range(int(rng.poisson(n_lesions))):
        centre, size = point(), rng.uniform(0.03, 0.15)
        mask = _blob(grid, rng, centre, size * rng.uniform(0.6, 1.0, 2), rng.uniform(0, 3.2),
                     0.4) & support
        img[mask] = np.clip(img[mask] + rng.choice([-1, 1]) * rng.uniform(0.05, 0.25), 0, 1)
        if rng.random() < 0.25:
            img[_blob(grid, rng, centre, (0.015, 0.015), 0.0) & support] = rng.uniform(0.7, 1.0)
    for _ in range(int(rng.poisson(n_vessels))):
        p0 = point()
        p2 = p0 + rng.normal(0, 0.35, 2)
        mask = _curve(grid, rng, p0, p2, rng.uniform(0.5, 2.0) * pixel) & support
        img[mask] = img[mask] + rng.uniform(0.1, 0.3)
