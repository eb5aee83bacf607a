"""Cityscapes semantic segmentation read from its on-disk layout (as torchvision expects it).

::

    root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png     RGB images
    root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png      label ids (0..33)

The 34 label ids are mapped to the 19 evaluation classes ("train ids", Cordts et al. 2016:
road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation, terrain,
sky, person, rider, car, truck, bus, train, motorcycle, bicycle); every other id becomes
``ignore_index = 255``. Images are resized to ``size = (H, W)`` with antialiased bilinear
interpolation and scaled to ``[0, 1]``; labels with nearest-neighbour interpolation sampled
at the output pixels' centres (``nearest-exact``), the points the image is resampled at, so
label and image stay aligned (plain ``nearest`` samples each output pixel's top-left input
pixel: half an output pixel up and left). Nothing is downloaded: ``root`` must point at a local
copy.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CityscapesSegmentation", "CITYSCAPES_CLASSES", "LABEL_TO_TRAIN_ID", "IGNORE_INDEX",
           "labels_to_train_ids", "read_image", "check_max_items"]

IGNORE_INDEX = 255
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle")
#: label id -> train id for the 19 evaluated classes (all other ids -> 255)
LABEL_TO_TRAIN_ID: Dict[int, int] = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8,
                                     22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16,
                                     32: 17, 33: 18}
_LUT = np.full(256, IGNORE_INDEX, dtype=np.int64)
for _k, _v in LABEL_TO_TRAIN_ID.items():
    _LUT[_k] = _v


def labels_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map an integer array of Cityscapes label ids (0..255) to train ids (0..18 or 255)."""
    a = np.asarray(label_ids)
    if a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() > 255)):
        raise ValueError(f"label ids must be integers in [0, 255], got dtype {a.dtype}"
                         + (f", range [{a.min()}, {a.max()}]" if a.size else ""))
    return _LUT[a]


def read_image(path: str | os.PathLike, mode: str | None = None) -> np.ndarray:
    """Read an image file with Pillow as an array; ``ValueError`` naming the file if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode) if mode else im)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"unreadable image file {str(path)!r}: {err}") from None


def check_max_items(max_items) -> int | None:
    """``None`` or a positive int (the number of items a loader keeps); ``ValueError`` otherwise."""
    if max_items is None:
        return None
    if isinstance(max_items, bool) or not isinstance(max_items, (int, np.integer)) or max_items < 1:
        raise ValueError(f"max_items must be None (all items) or a positive int, got {max_items!r}")
    return int(max_items)


def _resize(t: torch.Tensor, size: Tuple[int, int], labels: bool) -> torch.Tensor:
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    if labels:   # sampled at the output pixel centres, where the image is resampled too
        return F.interpolate(t[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return F.interpolate(t[None], size=size, mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp(0, 1)


class CityscapesSegmentation(torch.utils.data.Dataset):
    """Cityscapes ``split`` (``"train"``, ``"val"``, ``"test"``) as ``{"image", "label"}`` items.

    ``image``: float32 ``(3, H, W)`` in ``[0, 1]``; ``label``: int64 ``(H, W)`` train ids with 255
    ignored. ``size=(H, W)`` (default 64×128, the aspect ratio of the 1024×2048 originals);
    ``max_items`` keeps the first items in sorted file order.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 size: Sequence[int] = (64, 128), max_items: int | None = None):
        self.root, self.split = Path(root), split
        max_items = check_max_items(max_items)
        self.size = tuple(int(s) for s in size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (H, W) with positive entries, got {size!r}")
        img_dir = self.root / "leftImg8bit" / split
        lab_dir = self.root / "gtFine" / split
        for d in (img_dir, lab_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"Cityscapes split folder {str(d)!r} does not exist "
                                        f"(root={str(root)!r}, split={split!r})")
        self.items: List[Tuple[Path, Path]] = []
        for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            lab = lab_dir / img.parent.name / f"{stem}_gtFine_labelIds.png"
            if not lab.is_file():
                raise FileNotFoundError(f"label file {str(lab)!r} for image {str(img)!r} is missing")
            self.items.append((img, lab))
        if not self.items:
            raise FileNotFoundError(f"no *_leftImg8bit.png images under {str(img_dir)!r}")
        if max_items is not None:
            self.items = self.items[:max_items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        img_path, lab_path = self.items[i]
        img = read_image(img_path, "RGB")
        lab = read_image(lab_path)
        if lab.ndim != 2:
            raise ValueError(f"label file {str(lab_path)!r} must be a single-channel image, "
                             f"got shape {lab.shape}")
        if img.shape[:2] != lab.shape:
            raise ValueError(f"image {str(img_path)!r} of size {img.shape[:2]} and label "
                             f"{str(lab_path)!r} of size {lab.shape} differ")
        image = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)
        try:
            label = torch.from_numpy(labels_to_train_ids(lab))
        except ValueError as err:
            raise ValueError(f"label file {str(lab_path)!r}: {err} (a *_gtFine_labelIds.png "
                             f"holds 8-bit label ids)") from None
        return {"image": _resize(image, self.size, False), "label": _resize(label, self.size, True)}
