r"""The joint loss of task-adapted reconstruction.

.. math::

    L(x; ψ) = (1 − C)\,\operatorname{mean}_{b,c,i,j}(x − x^*)^2
              + C\,\bigl(\mathrm{CE} + \mathrm{Dice}\bigr)\bigl(S_ψ(x), s\bigr),

with ``x`` a reconstruction ``(B, 1, H, W)`` (image units), ``x*`` the ground truth
``batch["image"]``, ``s`` the lesion mask ``batch["mask"]`` (``{0, 1}``, same shape) and
``S_ψ`` a segmentation network returning two-class logits ``(B, 2, H, W)``. CE is the
pixel-wise cross-entropy (nats), Dice the soft Dice loss of :mod:`recon.tasks` (both classes).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from torch import Tensor, nn

from bilevel.problem import OuterLoss, Theta

__all__ = ["JointLoss", "check_weight", "check_masks", "mask_labels"]


def check_weight(C: Any) -> float:
    """``float(C)`` if it is a number in ``[0, 1]``; else ``ValueError`` / ``TypeError``."""
    if isinstance(C, bool) or not isinstance(C, (int, float)):
        raise TypeError(f"C (task weight) must be a number in [0, 1], got {type(C).__name__} {C!r}")
    if not (math.isfinite(C) and 0.0 <= C <= 1.0):
        raise ValueError(f"C (task weight) must lie in [0, 1], got {C!r}")
    return float(C)


def check_masks(masks: Tensor, images: Tensor, name: str = "mask") -> None:
    """Raise ``ValueError`` unless ``masks`` has the shape of ``images`` and holds only 0 / 1."""
    if not isinstance(masks, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(masks).__name__}")
    if tuple(masks.shape) != tuple(images.shape):
        raise ValueError(f"{name} has shape {tuple(masks.shape)} but the images have shape "
                         f"{tuple(images.shape)}; masks must match the images")
    bad = ~((masks == 0) | (masks == 1))
    if bool(bad.any()):
        raise ValueError(f"{name} must hold only 0 and 1, found {int(bad.sum())} other value(s), "
                         f"e.g. {float(masks[bad][0])}")


def mask_labels(masks: Tensor) -> Tensor:
    """``(B, 1, H, W)`` {0, 1} masks → ``(B, H, W)`` int64 class labels."""
    return masks[:, 0].round().long()


class JointLoss(OuterLoss):
    """``(1 − C)·MSE(x, batch["image"]) + C·(CE + Dice)(S_ψ(x), batch["mask"])`` (module docstring).

    ``segmenter`` is ``S_ψ`` (its trainable parameters are this loss's trainable parameters, so
    :func:`bilevel.hypergrad.outer_gradients` and the estimators return ``∇_ψL``); it may be
    ``None`` when ``C = 0``. ``θ`` is not used (``L`` depends on it through ``x`` only).
    """

    def __init__(self, segmenter: Optional[nn.Module], C: float = 0.5,
                 image_key: str = "image", mask_key: str = "mask"):
        super().__init__()
        from recon.tasks import SegmentationLoss

        self.C = check_weight(C)
        if segmenter is None and self.C > 0:
            raise ValueError(f"C={self.C} > 0 needs a segmenter, got None")
        if segmenter is not None and not isinstance(segmenter, nn.Module):
            raise TypeError(f"segmenter must be an nn.Module, got {type(segmenter).__name__}")
        self.segmenter = segmenter
        self.task_loss = SegmentationLoss({"ce": 1.0, "dice": 1.0})
        self.image_key, self.mask_key = image_key, mask_key

    def parts(self, x: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(MSE, CE + Dice)``; the task part is 0 without a segmenter or at ``C = 0`` (which
        needs no ``mask``)."""
        for key in (self.image_key, self.mask_key) if self.C > 0 else (self.image_key,):
            if not isinstance(batch, Mapping) or key not in batch:
                keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
                raise ValueError(f"batch must be a mapping with key {key!r}; got {keys}")
        image = batch[self.image_key]
        if tuple(x.shape) != tuple(image.shape):
            raise ValueError(f"x has shape {tuple(x.shape)} but batch[{self.image_key!r}] has "
                             f"shape {tuple(image.shape)}")
        mse = ((x - image) ** 2).mean()
        if self.segmenter is None or self.C == 0.0:
            return mse, mse.new_zeros(())
        mask = batch[self.mask_key]
        check_masks(mask, image, f"batch[{self.mask_key!r}]")
        return mse, self.task_loss(self.segmenter(x), mask_labels(mask))

    def forward(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        mse, task = self.parts(x, batch)
        if self.C == 0.0:
            return mse
        if self.C == 1.0:
            return task
        return (1.0 - self.C) * mse + self.C * task
