"""The handwritten digits that ship with scikit-learn, upsampled: a small MNIST stand-in.

``sklearn.datasets.load_digits`` holds 1797 images of 8x8 pixels with values 0..16
(no download). They are scaled to ``[0, 1]`` and resized with bilinear
interpolation (antialiased when shrinking) to the requested size, e.g. 28x28 as in
section 3.1.1 of the reference text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["load_digits_images", "N_DIGITS"]

#: Number of images in scikit-learn's digits data set.
N_DIGITS = 1797


def load_digits_images(image_size=28, *, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(images (N, 1, H, W) float32 in [0, 1], labels (N,) int64)``.

    Parameters
    ----------
    image_size : int or (H, W)
        Output size.
    pad : int
        Zero border (in 8x8-pixel units before resizing) added around each digit, so
        it sits inside the field of view like MNIST's 4-pixel margin (``pad=1``).
    """
    from sklearn.datasets import load_digits

    size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"`image_size` must be a positive int or pair, got {image_size!r}")
    if int(pad) != pad or pad < 0:
        raise ValueError(f"`pad` must be an int >= 0, got {pad!r}")
    bunch = load_digits()
    imgs = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    if pad:
        imgs = F.pad(imgs, (pad, pad, pad, pad))
    out = F.interpolate(imgs, size=size, mode="bilinear", align_corners=False,
                        antialias=size[0] < imgs.shape[-2] or size[1] < imgs.shape[-1])
    return out.clamp(0.0, 1.0), torch.as_tensor(bunch.target, dtype=torch.int64)
