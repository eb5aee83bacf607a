"""Task losses on network logits: segmentation (CE, soft Dice, IoU, log-cosh Dice, weighted
sums) and classification (cross-entropy), plus :class:`TaskLoss`, the upper-level loss
``ℓ(x) = L(T_φ(x), s)`` of task-adapted bilevel learning.

Shapes: segmentation logits ``(B, K, H, W)`` with integer labels ``(B, H, W)`` in
``{0..K−1} ∪ {ignore_index}``; classification logits ``(B, K)`` with labels ``(B,)`` in
``{0..K−1}``. Pixels labelled ``ignore_index`` count in no loss. With softmax probabilities
``p_{k,i}``, one-hot labels ``t_{k,i}`` and the sums over all valid pixels of the batch

    ``I_k = Σ_i p_{k,i} t_{k,i}``,  ``P_k = Σ_i p_{k,i}``,  ``T_k = Σ_i t_{k,i}``  (pixel counts),

the soft losses are (``ε`` a smoothing count, default 1 pixel)

* soft Dice: ``1 − mean_k (2 I_k + ε) / (P_k + T_k + ε)``;
* soft IoU (Jaccard): ``1 − mean_k (I_k + ε) / (P_k + T_k − I_k + ε)``;
* log-cosh Dice: ``log(cosh(soft Dice loss))``.

All are dimensionless and lie in ``[0, 1]`` (CE in ``[0, ∞)`` nats per pixel).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel
from bilevel import OuterLoss

from .operator import TaskOperator

__all__ = ["check_segmentation", "check_classification", "segmentation_cross_entropy",
           "soft_dice_loss", "soft_iou_loss", "log_cosh_dice_loss", "classification_cross_entropy",
           "SegmentationLoss", "ClassificationLoss", "TaskLoss", "SEGMENTATION_TERMS",
           "as_task_operator"]


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check_labels(labels: Tensor, num_classes: int, ignore_index: Optional[int]) -> None:
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got "
                        f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bool(bad.any()):
        vals = torch.unique(labels[bad])[:8].tolist()
        raise ValueError(f"labels out of range: values {vals} are not in [0, {num_classes}) "
                         f"nor the ignore_index {ignore_index}")


def check_segmentation(logits: Tensor, labels: Tensor, ignore_index: Optional[int] = 255) -> None:
    """Raise ``ValueError``/``TypeError`` unless logits ``(B, K, H, W)`` match labels ``(B, H, W)``
    with values in ``{0..K−1} ∪ {ignore_index}``."""
    if not isinstance(logits, Tensor) or logits.dim() != 4:
        raise ValueError(f"task network output {_shape(logits)} does not match the labels "
                         f"{_shape(labels)}: segmentation logits must be (B, K, H, W)")
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"task network output {tuple(logits.shape)} does not match the labels "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
                         f" (expected labels of shape (B, H, W) = {tuple(logits.shape[:1] + logits.shape[2:])})")
    _check_labels(labels, logits.shape[1], ignore_index)


def check_classification(logits: Tensor, labels: Tensor) -> None:
    """Raise ``ValueError``/``TypeError`` unless logits ``(B, K)`` match labels ``(B,)`` in ``0..K−1``."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"task network output {_shape(logits)} does not match the labels "
                         f"{_shape(labels)}: classification logits must be (B, K)")
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:1]:
        raise ValueError(f"task network output {tuple(logits.shape)} does not match the labels "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
                         f" (expected labels of shape ({logits.shape[0]},))")
    _check_labels(labels, logits.shape[1], None)


def segmentation_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Pixel-wise cross-entropy ``mean_i −log p_{s_i, i}`` over the valid pixels (nats).
    Zero (with a graph) when every pixel is ignored."""
    check_segmentation(logits, labels, ignore_index)
    if not bool((labels != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def _soft_counts(logits: Tensor, labels: Tensor, ignore_index: int):
    """``(I_k, P_k, T_k)`` over the valid pixels of the batch (module docstring)."""
    check_segmentation(logits, labels, ignore_index)
    k = logits.shape[1]
    valid = (labels != ignore_index).unsqueeze(1).to(logits.dtype)          # (B,1,H,W)
    p = torch.softmax(logits, dim=1) * valid
    t = F.one_hot(labels.clamp(0, k - 1) * (labels != ignore_index), k).permute(0, 3, 1, 2)
    t = t.to(logits.dtype) * valid
    dims = (0, 2, 3)
    return (p * t).sum(dims), p.sum(dims), t.sum(dims)


def soft_dice_loss(logits: Tensor, labels: Tensor, ignore_index: int = 255, eps: float = 1.0) -> Tensor:
    """Soft Dice loss ``1 − mean_k (2I_k + ε)/(P_k + T_k + ε)`` (module docstring)."""
    i, p, t = _soft_counts(logits, labels, ignore_index)
    return 1.0 - ((2 * i + eps) / (p + t + eps)).mean()


def soft_iou_loss(logits: Tensor, labels: Tensor, ignore_index: int = 255, eps: float = 1.0) -> Tensor:
    """Soft IoU (Jaccard) loss ``1 − mean_k (I_k + ε)/(P_k + T_k − I_k + ε)``."""
    i, p, t = _soft_counts(logits, labels, ignore_index)
    return 1.0 - ((i + eps) / (p + t - i + eps)).mean()


def log_cosh_dice_loss(logits: Tensor, labels: Tensor, ignore_index: int = 255, eps: float = 1.0) -> Tensor:
    """Log-cosh Dice loss ``log(cosh(D))`` with ``D`` the soft Dice loss."""
    return torch.log(torch.cosh(soft_dice_loss(logits, labels, ignore_index, eps)))


#: the named terms a :class:`SegmentationLoss` can combine
SEGMENTATION_TERMS: Mapping[str, Callable[..., Tensor]] = {
    "ce": segmentation_cross_entropy, "dice": soft_dice_loss, "iou": soft_iou_loss,
    "log_cosh_dice": log_cosh_dice_loss}


def classification_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy ``mean_b −log softmax(z_b)_{s_b}`` (nats per image)."""
    check_classification(logits, labels)
    return F.cross_entropy(logits, labels)


class SegmentationLoss(nn.Module):
    """Weighted sum ``Σ_j w_j L_j(logits, labels)`` of the terms in :data:`SEGMENTATION_TERMS`.

    The default ``weights={"ce": 1, "dice": 1, "iou": 1, "log_cosh_dice": 1}`` is the
    reference's ``L_CE + L_Dice + L_IoU + L_LogCoshDice`` (§3.4.1.2).
    """

    def __init__(self, weights: Optional[Mapping[str, float]] = None, ignore_index: int = 255):
        super().__init__()
        weights = dict(weights if weights is not None else {k: 1.0 for k in SEGMENTATION_TERMS})
        unknown = sorted(set(weights) - set(SEGMENTATION_TERMS))
        if unknown or not weights:
            raise ValueError(f"weights has unknown or no term(s) {unknown or weights}; "
                             f"known: {sorted(SEGMENTATION_TERMS)}")
        for k, w in weights.items():
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"weights[{k!r}] must be a finite number >= 0, got {w!r}")
        self.weights, self.ignore_index = weights, int(ignore_index)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return sum(w * SEGMENTATION_TERMS[k](logits, labels, self.ignore_index)
                   for k, w in self.weights.items())


class ClassificationLoss(nn.Module):
    """Cross-entropy of class logits ``(B, K)`` against labels ``(B,)``."""

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return classification_cross_entropy(logits, labels)


_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


def _mode_dependent_in_training(network: nn.Module) -> List[str]:
    """Names of the batch-norm / instance-norm / dropout modules of ``network`` in training mode."""
    return [n or type(network).__name__ for n, m in network.named_modules()
            if m.training and isinstance(m, _MODE_DEPENDENT)]


def as_task_operator(task: nn.Module) -> bilevel.TaskOperator:
    """``task`` itself if it is a :class:`bilevel.TaskOperator`; a raw network otherwise becomes a
    :class:`TaskOperator` whose trainable parameters are those with ``requires_grad`` and that is
    in eval mode (batch-norm on its running statistics, dropout off).

    A raw network found in training mode with batch-norm or dropout modules gets a
    ``UserWarning``: evaluated as it was, every loss evaluation would normalise with batch
    statistics and overwrite the pretrained running statistics.
    """
    if isinstance(task, bilevel.TaskOperator):
        return task
    if not isinstance(task, nn.Module):
        raise TypeError(f"task must be an nn.Module, got {type(task).__name__}")
    moded = _mode_dependent_in_training(task)
    wrapped = TaskOperator(task, finetune=[n for n, p in task.named_parameters() if p.requires_grad])
    if moded:
        warnings.warn(
            f"TaskLoss: the task network {type(task).__name__} was in training mode with "
            f"{len(moded)} batch-norm/dropout module(s) (e.g. {moded[:3]}); it is now in eval "
            f"mode, so the loss uses the pretrained running statistics and leaves them unchanged. "
            f"To fine-tune blocks in training mode, pass TaskOperator(network, finetune=[...]) "
            f"and call .train() on it.", UserWarning, stacklevel=3)
    return wrapped


class TaskLoss(OuterLoss):
    """Upper-level task loss ``ℓ(x, θ, batch) = L(T_φ(x), batch[label_key])``.

    ``task`` is the task operator ``T_φ``, a :class:`bilevel.TaskOperator` (usually a
    :class:`recon.tasks.TaskOperator`; its fine-tuned parameters are this loss's trainable
    parameters). A raw network is wrapped by :func:`as_task_operator`: its parameters with
    ``requires_grad`` stay trainable and it is put in eval mode (with a warning if it was in
    training mode with batch-norm or dropout), so the loss never runs batch-norm on batch
    statistics nor overwrites the pretrained ones. ``loss`` maps ``(logits, labels)`` to a scalar
    (e.g. :class:`SegmentationLoss`, :class:`ClassificationLoss`). ``x`` is cast to the
    network's floating dtype (differentiably), so a float64 inner problem can feed a float32 net.
    """

    def __init__(self, task: nn.Module, loss: Callable[[Tensor, Tensor], Tensor],
                 label_key: str = "label"):
        super().__init__()
        if not isinstance(task, nn.Module):
            raise TypeError(f"task must be an nn.Module, got {type(task).__name__}")
        if not callable(loss):
            raise TypeError(f"loss must be callable, got {type(loss).__name__}")
        self.task, self.loss, self.label_key = as_task_operator(task), loss, label_key

    def forward(self, x: Tensor, theta: Any, batch: Any) -> Tensor:
        """``L(T_φ(x), batch[label_key])``."""
        if not isinstance(batch, Mapping) or self.label_key not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"batch must be a mapping with key {self.label_key!r}; got {keys}")
        p = next(self.task.parameters(), None)
        if p is not None and p.is_floating_point() and x.dtype != p.dtype:
            x = x.to(p.dtype)       # e.g. a float64 inner solution into a float32 network
        return self.loss(self.task(x), batch[self.label_key])
