"""Stanford Dogs (Khosla et al. 2011) read from its own on-disk layout.

::

    root/Images/<wnid>-<breed>/<wnid>_<n>.jpg      20 580 JPEG images of 120 breeds
    root/lists/train_list.mat, root/lists/test_list.mat

Each list (MATLAB, read with :func:`scipy.io.loadmat`) holds ``file_list`` (paths relative to
``Images/``) and ``labels`` (1-based class numbers 1..120). Items are ``{"image", "label"}``:
the image resized so its shorter side is ``size``, centre-cropped to ``size × size``, RGB
float32 ``(3, size, size)`` in ``[0, 1]``; the label 0-based (0..119). Class names are the
folder names' breed parts, in class order. Nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from .cityscapes import read_image

__all__ = ["StanfordDogs", "N_DOG_CLASSES", "read_split_list"]

N_DOG_CLASSES = 120


def _as_str(entry) -> str:
    a = np.asarray(entry)
    while a.dtype == object or (a.ndim > 0 and a.dtype.kind in "U"):
        if a.dtype.kind == "U":
            return str(a.reshape(-1)[0])
        a = np.asarray(a.reshape(-1)[0])
    return str(a)


def read_split_list(path: str | os.PathLike, num_classes: int = N_DOG_CLASSES):
    """``(files, labels)`` of a Stanford Dogs list file: relative paths and 0-based labels."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Stanford Dogs split file {str(path)!r} does not exist")
    mat = loadmat(str(path))
    for key in ("file_list", "labels"):
        if key not in mat:
            raise ValueError(f"split file {str(path)!r} has no {key!r} entry "
                             f"(keys: {sorted(k for k in mat if not k.startswith('__'))})")
    files = [_as_str(e) for e in np.asarray(mat["file_list"], dtype=object).reshape(-1)]
    labels = np.asarray(mat["labels"]).reshape(-1)
    if len(files) != len(labels):
        raise ValueError(f"split file {str(path)!r}: {len(files)} files but {len(labels)} labels")
    if labels.size and (labels.min() < 1 or labels.max() > num_classes or np.any(labels != np.round(labels))):
        raise ValueError(f"labels out of range in {str(path)!r}: expected integers 1..{num_classes}, "
                         f"got range [{labels.min()}, {labels.max()}]")
    return files, labels.astype(np.int64) - 1


def _square(image: torch.Tensor, size: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False,
                        antialias=scale < 1)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[:, top:top + size, left:left + size].clamp(0, 1)


class StanfordDogs(torch.utils.data.Dataset):
    """The ``split`` (``"train"`` or ``"test"``) of Stanford Dogs at ``size × size`` pixels.

    ``max_items`` keeps that many items spread evenly over the list (every k-th), so a small
    subset still covers all breeds.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", size: int = 64,
                 max_items: int | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.root, self.split, self.size = Path(root), split, size
        files, labels = read_split_list(self.root / "lists" / f"{split}_list.mat")
        idx = np.arange(len(files))
        if max_items is not None and max_items < len(files):
            idx = np.linspace(0, len(files) - 1, int(max_items)).round().astype(int)
        self.files: List[str] = [files[i] for i in idx]
        self.labels = torch.as_tensor(labels[idx])
        folders = {}
        for f, s in zip(files, labels):
            folders.setdefault(int(s), f.split("/")[0])
        self.classes = [folders.get(k, str(k)).split("-", 1)[-1] for k in range(N_DOG_CLASSES)]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        path = self.root / "Images" / self.files[i]
        if not path.is_file():
            raise FileNotFoundError(f"image file {str(path)!r} listed in {self.split}_list.mat is missing")
        img = read_image(path, "RGB")
        image = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)
        return {"image": _square(image, self.size), "label": self.labels[i].clone()}
