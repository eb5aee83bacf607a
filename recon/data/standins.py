"""Stand-ins for Cityscapes and Stanford Dogs that need no download, made from the handwritten
digits scikit-learn ships (1797 real 8×8 scans, :func:`recon.data.load_digits_images`).

* :func:`digit_classification` -- the digits upsampled to ``size × size`` (10 classes).
* :func:`digit_scenes` -- ``size × size`` scenes of 2..4 digits of random size and position (not
  overlapping where there is room) on a dark background, with a per-pixel label map: 0 for background, ``1 + d`` for a pixel of
  digit ``d`` (11 classes); a pixel belongs to a digit where that digit's intensity is ≥ 0.3.
  To label a pixel the segmenter must recognise the digit's shape, so noise hurts it.

Both split the 1797 digits by index into ``train`` (i mod 4 ≠ 0, 1347 digits) and ``test``
(i mod 4 = 0, 450 digits), so test scenes and images use digits never seen in training.
:func:`stack_items` turns any ``{"image", "label"}`` data set into two tensors and
:func:`add_gaussian_noise` makes the seeded noisy copies ``y = x + σ·n``, ``n ~ N(0, I)``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from .digits import load_digits_images

__all__ = ["digit_classification", "digit_scenes", "add_gaussian_noise", "stack_items",
           "SCENE_CLASSES"]

SCENE_CLASSES = ("background",) + tuple(f"digit {d}" for d in range(10))


@lru_cache(maxsize=4)
def _digits(size: int, pad: int):
    images, labels = load_digits_images(size, pad=pad)
    images.requires_grad_(False)
    return images, labels


def _split_indices(n: int, split: str) -> torch.Tensor:
    idx = torch.arange(n)
    if split == "train":
        return idx[idx % 4 != 0]
    if split == "test":
        return idx[idx % 4 == 0]
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")


def digit_classification(n: int | None = None, size: int = 32, split: str = "train",
                         seed: int = 0) -> Dict[str, torch.Tensor]:
    """``{"image": (n, 1, size, size) in [0, 1], "label": (n,) in 0..9}`` from the digits of
    ``split``; ``n=None`` takes them all, else a seeded random subset of ``n`` (≤ the split)."""
    images, labels = _digits(int(size), 1)          # cached; indexing below copies
    idx = _split_indices(len(labels), split)
    if n is not None:
        _check_n(n)
        if n > len(idx):
            raise ValueError(f"n={n} exceeds the {len(idx)} digits of the {split!r} split")
        g = torch.Generator().manual_seed(seed)
        idx = idx[torch.randperm(len(idx), generator=g)[:n]]
    return {"image": images[idx], "label": labels[idx]}


def _free_spot(boxes: list, s: int, size: int, g: torch.Generator, tries: int = 20):
    """Top-left corner of an ``s × s`` box overlapping none of ``boxes`` (at most ``tries``
    draws; the last draw is kept if all overlap). Appends the box to ``boxes``."""
    for _ in range(tries):
        r, c = (int(v) for v in torch.randint(0, size - s + 1, (2,), generator=g))
        if all(r + s <= r2 or r2 + s2 <= r or c + s <= c2 or c2 + s2 <= c for r2, c2, s2 in boxes):
            break
    boxes.append((r, c, s))
    return r, c


def digit_scenes(n: int, size: int = 64, split: str = "train", seed: int = 0,
                 digit_sizes: Sequence[int] = (18, 28), n_digits: Sequence[int] = (2, 4)
                 ) -> Dict[str, torch.Tensor]:
    """``n`` seeded scenes ``{"image": (n, 1, size, size) in [0, 1], "label": (n, size, size)}``
    (module docstring); digit edge lengths are drawn from ``digit_sizes`` (inclusive range)."""
    _check_n(n)
    if not isinstance(size, int) or size < max(digit_sizes):
        raise ValueError(f"size must be an int >= the largest digit size {max(digit_sizes)}, got {size!r}")
    base, labels = _digits(8, 0)
    idx = _split_indices(len(labels), split)
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, size, size)
    masks = torch.zeros(n, size, size, dtype=torch.int64)
    for b in range(n):
        k = int(torch.randint(n_digits[0], n_digits[1] + 1, (1,), generator=g))
        boxes = []
        for _ in range(k):
            j = int(idx[torch.randint(len(idx), (1,), generator=g)])
            s = int(torch.randint(digit_sizes[0], digit_sizes[1] + 1, (1,), generator=g))
            digit = F.interpolate(base[j:j + 1], size=(s, s), mode="bilinear", align_corners=False)[0, 0]
            r, c = _free_spot(boxes, s, size, g)
            on = digit >= 0.3
            patch = images[b, 0, r:r + s, c:c + s]
            images[b, 0, r:r + s, c:c + s] = torch.maximum(patch, digit.clamp(0, 1))
            masks[b, r:r + s, c:c + s][on] = 1 + int(labels[j])
    return {"image": images, "label": masks}


def add_gaussian_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Seeded noisy copy ``y = x + σ·n``, ``n ~ N(0, I)`` (σ in image units; no clipping)."""
    if not isinstance(sigma, (int, float)) or not sigma >= 0 or sigma == float("inf"):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g, dtype=images.dtype)
    return images + sigma * noise.to(images.device)


def stack_items(dataset, keys: Sequence[str] = ("image", "label")) -> Dict[str, torch.Tensor]:
    """Stack a data set of ``{"image", "label"}`` items into ``{key: (N, ...)}`` tensors."""
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    items = [dataset[i] for i in range(len(dataset))]
    for k in keys:
        if k not in items[0]:
            raise ValueError(f"dataset items need a {k!r} entry, got keys {sorted(items[0])}")
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in keys}
