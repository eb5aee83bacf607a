"""The data and default networks of the two task experiments, by name.

========================  ==========================================  ==========================
task / source              data                                        default network ``T``
========================  ==========================================  ==========================
segmentation / standin     :func:`recon.data.digit_scenes` 64×64, 11    U-Net, 1→11, c=8, depth 3
segmentation / cityscapes  :class:`recon.data.CityscapesSegmentation`  U-Net, 3→19, c=16, depth 3
classification / standin   :func:`recon.data.digit_classification` 32  ResNet-18, 1→10
classification / dogs      :class:`recon.data.StanfordDogs` 64×64      ResNet-50, 3→120
========================  ==========================================  ==========================

Real data sets are read from ``root`` (no download); the stand-ins come from scikit-learn.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["TASKS", "SOURCES", "load_task_data", "default_network_config", "default_size",
           "num_classes"]

TASKS = ("segmentation", "classification")
SOURCES = {"segmentation": ("standin", "cityscapes"), "classification": ("standin", "stanford-dogs")}


def _check(task: str, source: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if source not in SOURCES[task]:
        raise ValueError(f"source for {task} must be one of {SOURCES[task]}, got {source!r}")


def num_classes(task: str, source: str) -> int:
    """Number of classes of a task / source pair (11, 19, 10 or 120)."""
    _check(task, source)
    return {("segmentation", "standin"): 11, ("segmentation", "cityscapes"): 19,
            ("classification", "standin"): 10, ("classification", "stanford-dogs"): 120}[(task, source)]


def default_size(task: str, source: str):
    """Default image size: 64 (scenes, dogs), 32 (digits) or (64, 128) (Cityscapes)."""
    _check(task, source)
    return {"cityscapes": (64, 128), "stanford-dogs": 64}.get(source, 64 if task == "segmentation" else 32)


def default_network_config(task: str, source: str) -> Dict[str, Any]:
    """The default task network config (see the table in the module docstring)."""
    k = num_classes(task, source)
    if task == "segmentation":
        rgb = source == "cityscapes"
        return {"kind": "unet", "in_channels": 3 if rgb else 1, "num_classes": k,
                "base_channels": 16 if rgb else 8, "depth": 3}
    if source == "standin":
        return {"kind": "resnet18", "in_channels": 1, "num_classes": k}
    return {"kind": "resnet50", "in_channels": 3, "num_classes": k}


def _square_side(size, source: str) -> int:
    """The side of a square ``size`` (an int or ``(s, s)``), else ``ValueError`` naming it."""
    side = size
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        side = size[0]
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 1:
        raise ValueError(f"size must be an int >= 1 or a square (s, s) for source {source!r} "
                         f"(its images are square), got {size!r}")
    return int(side)


def load_task_data(task: str, source: str, split: str, n: Optional[int] = None, size=None,
                   root: Optional[str] = None, seed: int = 0) -> Dict[str, torch.Tensor]:
    """``{"image": (N, C, H, W) in [0, 1], "label": ...}`` for a task / source / split.

    ``split`` is ``"train"`` or ``"test"`` (Cityscapes' ``val`` split serves as its test set);
    ``n`` caps the number of items (the digits stand-in has 1347 / 450; the scenes are generated: ``n`` defaults to 1000
    for train and 500 for test); ``size`` overrides :func:`default_size`: an int ``s`` (square
    ``s × s`` images; for Cityscapes ``s × 2s``, its aspect ratio) or ``(H, W)`` (square only,
    except for Cityscapes). ``root``: ``~`` is expanded.
    """
    from ..data.standins import digit_classification, digit_scenes, stack_items

    _check(task, source)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    size = default_size(task, source) if size is None else size
    if source != "standin" and root is None:
        raise ValueError(f"source {source!r} needs root= (the folder of a local copy)")
    root = None if root is None else os.path.expanduser(str(root))
    if source != "cityscapes":
        size = _square_side(size, source)
    if source == "standin" and task == "segmentation":
        n = n if n is not None else (1000 if split == "train" else 500)
        return digit_scenes(n, size, split, seed=seed + (0 if split == "train" else 1))
    if source == "standin":
        available = 1347 if split == "train" else 450
        return digit_classification(None if n is None or n >= available else n, size, split, seed=seed)
    if source == "cityscapes":
        from ..data.cityscapes import CityscapesSegmentation
        size = (size, 2 * size) if isinstance(size, int) else tuple(size)
        ds = CityscapesSegmentation(root, "train" if split == "train" else "val", size, max_items=n)
    else:
        from ..data.stanford_dogs import StanfordDogs
        ds = StanfordDogs(root, split, size, max_items=n)
    return stack_items(ds)
