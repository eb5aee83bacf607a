"""Task metrics: Dice and IoU per class and their means (with an ignore index), accuracy and
top-k accuracy.

Segmentation scores are computed from the confusion matrix ``M`` accumulated over all valid
pixels (label ``≠ ignore_index``) of the data set, ``M[t, p]`` = number of pixels of true class
``t`` predicted as ``p``. With ``TP_k = M[k, k]``, ``FP_k = Σ_t M[t, k] − TP_k`` and
``FN_k = Σ_p M[k, p] − TP_k``:

* Dice ``D_k = 2TP_k / (2TP_k + FP_k + FN_k)``;
* IoU ``J_k = TP_k / (TP_k + FP_k + FN_k)``;

a class absent from both prediction and target has no score (NaN) and is left out of the
means ``mean Dice = nanmean_k D_k`` and ``mIoU = nanmean_k J_k`` (dimensionless, in [0, 1]).
Logits or scores holding NaN or inf raise ``ValueError``: ``argmax`` would turn them into class
0 and a plausible score.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

__all__ = ["confusion_matrix", "dice_per_class", "iou_per_class", "mean_dice", "mean_iou",
           "segmentation_scores", "top_k_accuracy", "classification_accuracy"]


def _check_finite(pred: Tensor, name: str = "pred") -> None:
    """``ValueError`` for NaN / inf scores: their argmax (class 0 for NaN) is no prediction."""
    if pred.is_floating_point() and not bool(torch.isfinite(pred).all()):
        n_bad = int((~torch.isfinite(pred)).sum())
        raise ValueError(f"`{name}` holds {n_bad} NaN or infinite values; a prediction from "
                         f"them (argmax of NaN is class 0) would score as if it were real")


def _labels_of(pred: Tensor, target: Tensor) -> Tensor:
    _check_finite(pred)
    if pred.dim() == target.dim() + 1:
        pred = pred.argmax(1)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} does not match target {tuple(target.shape)}")
    return pred


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int,
                     ignore_index: Optional[int] = 255) -> Tensor:
    """``(K, K)`` int64 matrix ``M[t, p]`` over the valid pixels; ``pred`` is labels shaped like
    ``target`` or logits with a class axis at dim 1 (argmax taken)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    pred = _labels_of(pred, target).reshape(-1).long()
    target = target.reshape(-1).long()
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    pred, target = pred[valid], target[valid]
    bad = (target < 0) | (target >= num_classes) | (pred < 0) | (pred >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"labels out of range: target/pred values outside [0, {num_classes}) "
                         f"(ignore_index={ignore_index}), e.g. {torch.unique(target[bad])[:8].tolist()}")
    idx = target * num_classes + pred
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _tp_fp_fn(cm: Tensor):
    cm = cm.to(torch.float64)
    tp = cm.diagonal()
    return tp, cm.sum(0) - tp, cm.sum(1) - tp


def dice_per_class(cm: Tensor) -> Tensor:
    """``D_k = 2TP/(2TP + FP + FN)`` per class from a confusion matrix (NaN if absent)."""
    tp, fp, fn = _tp_fp_fn(cm)
    den = 2 * tp + fp + fn
    return torch.where(den > 0, 2 * tp / den.clamp_min(1), torch.full_like(den, float("nan")))


def iou_per_class(cm: Tensor) -> Tensor:
    """``J_k = TP/(TP + FP + FN)`` per class from a confusion matrix (NaN if absent)."""
    tp, fp, fn = _tp_fp_fn(cm)
    den = tp + fp + fn
    return torch.where(den > 0, tp / den.clamp_min(1), torch.full_like(den, float("nan")))


def mean_dice(pred: Tensor, target: Tensor, num_classes: int, ignore_index: Optional[int] = 255) -> float:
    """Mean Dice over the classes present in prediction or target."""
    return float(torch.nanmean(dice_per_class(confusion_matrix(pred, target, num_classes, ignore_index))))


def mean_iou(pred: Tensor, target: Tensor, num_classes: int, ignore_index: Optional[int] = 255) -> float:
    """Mean IoU (mIoU) over the classes present in prediction or target."""
    return float(torch.nanmean(iou_per_class(confusion_matrix(pred, target, num_classes, ignore_index))))


def segmentation_scores(cm: Tensor) -> Dict[str, object]:
    """``{"dice", "iou"`` (per-class lists, NaN for absent classes), ``"mean_dice", "mean_iou",
    "pixel_accuracy"}`` from a confusion matrix (e.g. a sum over batches)."""
    d, j = dice_per_class(cm), iou_per_class(cm)
    total = float(cm.sum())
    return {"dice": d.tolist(), "iou": j.tolist(), "mean_dice": float(torch.nanmean(d)),
            "mean_iou": float(torch.nanmean(j)),
            "pixel_accuracy": float(cm.diagonal().sum()) / total if total else float("nan")}


def top_k_accuracy(logits: Tensor, target: Tensor, k: int = 5) -> float:
    """Fraction of samples whose true class is among the ``k`` largest logits ``(B, K)``."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (B, K) and target (B,), got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    _check_finite(logits, "logits")
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == target[:, None]).any(1).to(torch.float64).mean())


def classification_accuracy(logits: Tensor, target: Tensor) -> float:
    """Top-1 accuracy ``mean_b [argmax z_b = s_b]``."""
    return top_k_accuracy(logits, target, 1)
