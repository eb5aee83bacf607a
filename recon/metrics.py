"""Image-quality and segmentation metrics, one value per image.

Shapes: inputs are batches ``(B, ...)`` — usually ``(B, C, H, W)`` — and every
metric returns a tensor of shape ``(B,)`` (one value per image, no averaging over the
batch); a single 2-D image ``(H, W)`` gives a 0-dim tensor. Computation is in
float64; results are float64 tensors on the input's device. Metrics are evaluation
tools: they run under ``torch.no_grad`` semantics only where noted (PSNR and SSIM are
differentiable, Dice/IoU on thresholded masks are not).

Data-range convention (PSNR, SSIM): ``data_range=None`` uses, per image, the range of
the *reference* ``max(ref) - min(ref)``; pass a number (e.g. 1.0 for images in
``[0, 1]``) to fix it across images, as ``skimage.metrics`` requires for float data.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "dice", "iou", "accuracy", "mse"]


def _pair(x: torch.Tensor, ref: torch.Tensor, names=("x", "ref")) -> tuple[torch.Tensor, torch.Tensor, bool]:
    for t, n in zip((x, ref), names):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{n}` must be a torch.Tensor, got {type(t).__name__}")
    if x.shape != ref.shape:
        raise ValueError(f"`{names[0]}` and `{names[1]}` must have the same shape, got "
                         f"{tuple(x.shape)} and {tuple(ref.shape)}")
    if x.ndim < 2:
        raise ValueError(f"`{names[0]}` must have at least 2 dims (H, W), got shape {tuple(x.shape)}")
    single = x.ndim == 2
    if single:
        x, ref = x[None], ref[None]
    return x.to(torch.float64), ref.to(torch.float64), single


def _data_range(ref: torch.Tensor, data_range) -> torch.Tensor:
    """Per-image data range ``(B,)``."""
    if data_range is None:
        if ref.shape[0] == 0:
            return ref.new_zeros((0,))
        flat = ref.flatten(1)
        dr = flat.amax(1) - flat.amin(1)
        flat_images = torch.nonzero(~(dr > 0)).reshape(-1).tolist()
        if flat_images:
            raise ValueError(
                f"`data_range`=None uses the range max(ref) - min(ref) of each reference, but "
                f"reference image(s) {flat_images[:10]} are constant (or not finite), so "
                f"PSNR / SSIM are undefined; pass `data_range` explicitly (e.g. 1.0)")
        return dr
    if isinstance(data_range, torch.Tensor):
        dr = data_range.to(torch.float64, copy=False).to(ref.device).reshape(-1)
        if dr.numel() not in (1, ref.shape[0]):
            raise ValueError(f"`data_range` must be a number or have {ref.shape[0]} entries, got {dr.numel()}")
        if not bool(torch.all(torch.isfinite(dr) & (dr > 0))):
            raise ValueError(f"`data_range` must be finite and > 0, got {data_range.tolist()}")
        return dr.expand(ref.shape[0])
    if not (isinstance(data_range, numbers.Real) and not isinstance(data_range, bool)
            and math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"`data_range` must be None or a positive number, got {data_range!r}")
    return torch.full((ref.shape[0],), float(data_range), dtype=torch.float64, device=ref.device)


def mse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image ``mean((x - ref)^2)``."""
    x, ref, single = _pair(x, ref)
    out = ((x - ref) ** 2).reshape(x.shape[0], -1).mean(1)
    return out[0] if single else out


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range=None) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image: ``10 log10(data_range^2 / MSE(x, ref))``.

    ``data_range`` defaults to ``max(ref) - min(ref)`` of each image (module docstring);
    agrees with ``skimage.metrics.peak_signal_noise_ratio(ref, x, data_range=...)``.
    Identical images give ``inf``.
    """
    x, ref, single = _pair(x, ref)
    err = ((x - ref) ** 2).flatten(1).mean(1)  # (B,); an empty batch gives an empty result
    dr = _data_range(ref, data_range)
    out = 10.0 * torch.log10(dr**2 / err)
    return out[0] if single else out


def _gaussian_kernel(sigma: float, truncate: float, device) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range=None, *, win_size: int = 7,
         gaussian: bool = False, sigma: float = 1.5, K1: float = 0.01, K2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), per image, averaged over channels.

    With local means ``mu``, variances ``v`` and covariance ``v_xy`` over a sliding
    window, ``C1 = (K1 L)^2``, ``C2 = (K2 L)^2`` and ``L`` the data range::

        SSIM = mean over valid pixels of
               (2 mu_x mu_r + C1)(2 v_xr + C2) / ((mu_x^2 + mu_r^2 + C1)(v_x + v_r + C2)).

    Defaults match ``skimage.metrics.structural_similarity(ref, x, data_range=L)``
    (7x7 uniform window, sample covariance, border of half a window excluded);
    ``gaussian=True`` matches ``gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False`` (11x11 Gaussian window). Inputs ``(B, C, H, W)``,
    ``(B, H, W)`` or ``(H, W)``; ``data_range`` as in :func:`psnr`.
    """
    x, ref, single = _pair(x, ref)
    B = x.shape[0]
    dr = _data_range(ref, data_range)
    if B == 0:
        return x.new_zeros((0,))
    img_x = x.reshape((-1, 1) + tuple(x.shape[-2:]))
    img_r = ref.reshape(img_x.shape)
    n_ch = img_x.shape[0] // B
    if gaussian:
        k1 = _gaussian_kernel(sigma, 3.5, x.device)
        size = k1.numel()
        kern_h, kern_w = k1.view(1, 1, -1, 1), k1.view(1, 1, 1, -1)

        def filt(t):
            return F.conv2d(F.conv2d(t, kern_h), kern_w)

        cov_norm = 1.0
    else:
        if int(win_size) != win_size or win_size < 3 or win_size % 2 == 0:
            raise ValueError(f"`win_size` must be an odd int >= 3, got {win_size!r}")
        size = int(win_size)

        def filt(t):
            return F.avg_pool2d(t, size, stride=1)

        cov_norm = size * size / (size * size - 1.0)
    if min(x.shape[-2:]) < size:
        raise ValueError(f"`x` and `ref` images of shape {tuple(x.shape[-2:])} are smaller than the "
                         f"{size}x{size} SSIM window; pass a smaller odd `win_size`")
    # (co)variances of images shifted by the reference's mean: same values, no cancellation
    # in E[x²] - E[x]² when the images sit far from 0
    shift = img_r.mean(dim=(-2, -1), keepdim=True)
    xs, rs = img_x - shift, img_r - shift
    uxs, urs = filt(xs), filt(rs)
    vx = cov_norm * (filt(xs * xs) - uxs * uxs)
    vr = cov_norm * (filt(rs * rs) - urs * urs)
    vxr = cov_norm * (filt(xs * rs) - uxs * urs)
    ux, ur = uxs + shift, urs + shift
    L = dr.repeat_interleave(n_ch).view(-1, 1, 1, 1)
    c1, c2 = (K1 * L) ** 2, (K2 * L) ** 2
    s = ((2 * ux * ur + c1) * (2 * vxr + c2)) / ((ux**2 + ur**2 + c1) * (vx + vr + c2))
    s = s.clamp(-1.0, 1.0)  # |SSIM| <= 1 holds exactly; only rounding can leave the interval
    out = s.reshape(B, n_ch, -1).mean(-1).mean(-1)
    return out[0] if single else out


def _masks(pred, target, threshold):
    pred, target, single = _pair(pred, target, ("pred", "target"))
    p = (pred > threshold).reshape(pred.shape[0], -1)
    t = (target > 0.5).reshape(target.shape[0], -1)
    finite = torch.isfinite(pred).reshape(pred.shape[0], -1).all(1)
    return p, t, single, finite


def _nan_unless(finite: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` with NaN for the images whose prediction is not finite (no mask exists)."""
    return torch.where(finite, out, torch.full_like(out, float("nan")))


def dice(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Dice coefficient ``2 |P ∩ T| / (|P| + |T|)`` per image (1 when both masks are empty).

    ``P = pred > threshold`` (probabilities or {0, 1} masks), ``T = target > 0.5``.  An image
    whose ``pred`` holds NaN or inf scores NaN (``NaN > threshold`` is no prediction).
    """
    p, t, single, finite = _masks(pred, target, threshold)
    inter = (p & t).sum(1).to(torch.float64)
    total = (p.sum(1) + t.sum(1)).to(torch.float64)
    out = _nan_unless(finite, torch.where(total > 0, 2 * inter / total.clamp_min(1),
                                          torch.ones_like(total)))
    return out[0] if single else out


def iou(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Intersection over union (Jaccard) ``|P ∩ T| / |P ∪ T|`` per image (1 if both empty;
    NaN if ``pred`` holds NaN or inf)."""
    p, t, single, finite = _masks(pred, target, threshold)
    inter = (p & t).sum(1).to(torch.float64)
    union = (p | t).sum(1).to(torch.float64)
    out = _nan_unless(finite, torch.where(union > 0, inter / union.clamp_min(1),
                                          torch.ones_like(union)))
    return out[0] if single else out


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of correct class predictions (0-dim tensor).

    ``pred``: labels of ``target``'s shape, or scores with one extra class axis at
    dim 1 (argmax taken).  NaN if ``pred`` holds NaN or inf (argmax of NaN is no class).
    """
    if pred.is_floating_point() and not bool(torch.isfinite(pred).all()):
        return torch.tensor(float("nan"), dtype=torch.float64, device=pred.device)
    if pred.ndim == target.ndim + 1:
        pred = pred.argmax(1)
    if pred.shape != target.shape:
        raise ValueError(f"`pred` {tuple(pred.shape)} does not match `target` {tuple(target.shape)}")
    return (pred == target).to(torch.float64).mean()
