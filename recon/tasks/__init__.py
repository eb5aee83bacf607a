"""Task operators and task losses for task-adapted reconstruction (reference §3.4).

* :class:`TaskOperator` -- a pretrained task network ``T_φ`` with fine-tuned / frozen blocks;
* losses on logits: :func:`segmentation_cross_entropy`, :func:`soft_dice_loss`,
  :func:`soft_iou_loss`, :func:`log_cosh_dice_loss`, :class:`SegmentationLoss` (weighted sums),
  :func:`classification_cross_entropy`, :class:`ClassificationLoss`;
* :class:`TaskLoss` -- the bilevel upper loss ``ℓ(x) = L(T_φ(x), s)``;
* :func:`pretrain` / :func:`load_task_network` -- ``T*`` on clean data, atomic checkpoints,
  resume (command line: ``python -m recon.tasks pretrain``);
* :mod:`recon.tasks.experiment` / :mod:`recon.tasks.example` -- the rows of Tables 3.3 / 3.4;
* metrics (:mod:`recon.tasks.metrics`): Dice / IoU per class and mean with an ignore index,
  accuracy, top-k accuracy.
"""
from .losses import (SEGMENTATION_TERMS, ClassificationLoss, SegmentationLoss, TaskLoss,
                     check_classification, check_segmentation, classification_cross_entropy,
                     log_cosh_dice_loss, segmentation_cross_entropy, soft_dice_loss, soft_iou_loss)
from .metrics import (classification_accuracy, confusion_matrix, dice_per_class, iou_per_class,
                      mean_dice, mean_iou, segmentation_scores, top_k_accuracy)
from .operator import TaskOperator, last_blocks
from .pretrain import build_task_network, load_task_network, predict, pretrain

__all__ = [
    "TaskOperator", "last_blocks", "TaskLoss", "SegmentationLoss", "ClassificationLoss",
    "SEGMENTATION_TERMS", "check_segmentation", "check_classification",
    "segmentation_cross_entropy", "soft_dice_loss", "soft_iou_loss", "log_cosh_dice_loss",
    "classification_cross_entropy",
    "confusion_matrix", "dice_per_class", "iou_per_class", "mean_dice", "mean_iou",
    "segmentation_scores", "top_k_accuracy", "classification_accuracy",
    "pretrain", "build_task_network", "load_task_network", "predict",
]
