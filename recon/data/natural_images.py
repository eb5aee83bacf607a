"""Natural test images that ship with scikit-image, cut into patches for denoising experiments.

No download: every image listed in :data:`BUNDLED` is inside the scikit-image wheel. Patches are
grey-scale, float, in ``[0, 1]``, drawn deterministically from ``seed``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["BUNDLED", "load_bundled_image", "image_patches", "denoising_batch"]

#: scikit-image images that ship inside its wheel (no pooch download needed)
BUNDLED = ("camera", "astronaut", "coins", "moon", "page", "text", "brick", "grass", "gravel",
           "coffee", "chelsea", "rocket", "clock", "immunohistochemistry", "cell")


def load_bundled_image(name: str) -> np.ndarray:
    """Grey-scale float64 image in ``[0, 1]`` from ``skimage.data`` (colour → luminance)."""
    if name not in BUNDLED:
        raise ValueError(f"name must be one of {BUNDLED}, got {name!r}")
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.util import img_as_float

    img = img_as_float(getattr(skimage.data, name)())
    if img.ndim == 3:
        img = rgb2gray(img[..., :3])
    return np.clip(img, 0.0, 1.0)


def image_patches(n: int, size: int = 64, names: Optional[Sequence[str]] = None, seed: int = 0,
                  downscale: int = 2, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` random ``size×size`` grey patches, shape ``(n, 1, size, size)``, values in ``[0, 1]``.

    Images are cycled in order (``names`` or :data:`BUNDLED`), each first downscaled by
    ``downscale`` (local mean) so a 64×64 patch shows whole structures; the patch position is
    drawn from ``numpy.random.default_rng(seed)``.
    """
    if n < 1 or size < 4:
        raise ValueError(f"need n ≥ 1 and size ≥ 4, got n={n}, size={size}")
    if downscale < 1:
        raise ValueError(f"downscale must be ≥ 1, got {downscale}")
    from skimage.transform import downscale_local_mean

    names = tuple(names or BUNDLED)
    rng = np.random.default_rng(seed)
    cache: Dict[str, np.ndarray] = {}
    out = np.empty((n, 1, size, size))
    for i in range(n):
        name = names[i % len(names)]
        if name not in cache:
            img = load_bundled_image(name)
            cache[name] = downscale_local_mean(img, (downscale, downscale)) if downscale > 1 else img
        img = cache[name]
        if img.shape[0] < size or img.shape[1] < size:
            raise ValueError(f"image {name!r} ({img.shape}) is smaller than size={size} after downscale={downscale}")
        r = rng.integers(0, img.shape[0] - size + 1)
        c = rng.integers(0, img.shape[1] - size + 1)
        out[i, 0] = img[r:r + size, c:c + size]
    return torch.from_numpy(out).to(dtype)


def denoising_batch(n: int = 16, size: int = 64, sigma: float = 0.1, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> Dict[str, Tensor]:
    """``{"image": clean, "y": clean + σ·N(0, 1)}`` from :func:`image_patches` (noise seeded too)."""
    if not sigma >= 0:
        raise ValueError(f"sigma must be ≥ 0, got {sigma!r}")
    clean = image_patches(n, size, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(clean.shape, generator=g, dtype=torch.float64).to(dtype)
    return {"image": clean, "y": clean + sigma * noise}
