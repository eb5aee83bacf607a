"""Stanford Dogs (Khosla et al. 2011) read from its own on-disk layout.

::

    root/Images/<wnid>-<breed>/<wnid>_<n>.jpg      20 580 JPEG images of 120 breeds
    root/train_list.mat, root/test_list.mat        the lists (lists.tar unpacks them here,
                                                   beside file_list.mat), or in root/lists/

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

from .cityscapes import check_max_items, read_image

__all__ = ["StanfordDogs", "N_DOG_CLASSES", "read_split_list", "find_split_list"]

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
    try:
        mat = loadmat(str(path))
    except Exception as err:  # scipy raises ValueError, TypeError, OSError... for a bad file
        raise ValueError(f"unreadable Stanford Dogs list file {str(path)!r} "
                         f"({type(err).__name__}: {err})") from None
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


def find_split_list(root: str | os.PathLike, split: str) -> Path:
    """``root/<split>_list.mat`` as ``lists.tar`` unpacks it, else ``root/lists/<split>_list.mat``
    (``split`` is ``"train"``, ``"test"`` or ``"file"``, the list of all images)."""
    root = Path(root)
    candidates = [root / f"{split}_list.mat", root / "lists" / f"{split}_list.mat"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"Stanford Dogs split file {split}_list.mat not found: looked for "
                            f"{[str(p) for p in candidates]} (unpack lists.tar into root={str(root)!r})")


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
        max_items = check_max_items(max_items)
        self.root, self.split, self.size = Path(root), split, size
        self.list_file = find_split_list(self.root, split)
        files, labels = read_split_list(self.list_file)
        idx = np.arange(len(files))
        if max_items is not None and max_items < len(files):
            idx = np.linspace(0, len(files) - 1, max_items).round().astype(int)
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
            raise FileNotFoundError(f"image file {str(path)!r} listed in {str(self.list_file)!r} "
                                    f"is missing")
        img = read_image(path, "RGB")
        image = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)
        return {"image": _square(image, self.size), "label": self.labels[i].clone()}
