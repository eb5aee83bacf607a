"""Reading CT slices from DICOM (pydicom) and converting Hounsfield units to attenuation.

Hounsfield units are defined by ``HU = 1000 (mu - mu_water) / (mu_water - mu_air)``, so ::

    mu = mu_water + HU / 1000 * (mu_water - mu_air),

clipped at 0. The default ``mu_water = 0.0192 / mm`` is water's linear attenuation
near the 70 keV effective energy of a 120 kVp spectrum; ``mu_air = 0``.
``pydicom`` is imported only when a file is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["DicomSlice", "read_dicom_slice", "find_dicom_files", "hu_to_attenuation",
           "attenuation_to_hu", "example_ct_path", "MU_WATER"]

#: Linear attenuation of water at ~70 keV, in 1/mm.
MU_WATER = 0.0192


def _pydicom():
    try:
        import pydicom
    except Exception as exc:
        raise ImportError(f"reading DICOM needs pydicom (pip install pydicom): {exc}") from exc
    return pydicom


@dataclass
class DicomSlice:
    """One CT slice: Hounsfield units and where it came from.

    Attributes
    ----------
    hu : numpy.ndarray (H, W) float32
        Hounsfield units (rescale slope/intercept applied; padding pixels set to -1000).
    pixel_spacing : (float, float)
        Row and column spacing in mm (1.0 if the file has none).
    path : str
    meta : dict
        A few identifying tags (``InstanceNumber``, ``SliceLocation``, ``Modality``).
    """

    hu: np.ndarray
    pixel_spacing: tuple[float, float]
    path: str
    meta: dict = field(default_factory=dict)

    def attenuation(self, mu_water: float = MU_WATER, mu_air: float = 0.0) -> np.ndarray:
        """Linear attenuation in 1/mm, see :func:`hu_to_attenuation`."""
        return hu_to_attenuation(self.hu, mu_water, mu_air)


def hu_to_attenuation(hu, mu_water: float = MU_WATER, mu_air: float = 0.0):
    """``mu = max(mu_water + HU/1000 (mu_water - mu_air), 0)`` for numpy arrays or tensors (1/mm)."""
    if not mu_water > mu_air >= 0:
        raise ValueError(f"need mu_water > mu_air >= 0, got mu_water={mu_water!r}, mu_air={mu_air!r}")
    mu = mu_water + hu / 1000.0 * (mu_water - mu_air)
    return mu.clamp_min(0.0) if isinstance(mu, torch.Tensor) else np.maximum(mu, 0.0)


def attenuation_to_hu(mu, mu_water: float = MU_WATER, mu_air: float = 0.0):
    """Inverse of :func:`hu_to_attenuation` (without the clipping)."""
    if not mu_water > mu_air >= 0:
        raise ValueError(f"need mu_water > mu_air >= 0, got mu_water={mu_water!r}, mu_air={mu_air!r}")
    return 1000.0 * (mu - mu_water) / (mu_water - mu_air)


def read_dicom_slice(path: str | os.PathLike) -> DicomSlice:
    """Read a single-frame CT image from ``path`` into Hounsfield units."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:
        raise ValueError(f"`path` {str(path)!r} is not a readable DICOM file: {exc}") from exc
    if "PixelData" not in ds:
        raise ValueError(f"`path` {str(path)!r} has no pixel data")
    raw = ds.pixel_array
    if raw.ndim != 2:
        raise ValueError(f"`path` {str(path)!r} holds an image of shape {raw.shape}; expected one 2-D slice")
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    hu = raw.astype(np.float64) * slope + intercept
    pad = getattr(ds, "PixelPaddingValue", None)
    if pad is not None:
        hu[raw == pad] = -1000.0
    spacing = getattr(ds, "PixelSpacing", None)
    spacing = (float(spacing[0]), float(spacing[1])) if spacing is not None else (1.0, 1.0)
    meta = {k: getattr(ds, k, None) for k in ("InstanceNumber", "SliceLocation", "Modality")}
    return DicomSlice(hu.astype(np.float32), spacing, str(path), meta)


def find_dicom_files(root: str | os.PathLike) -> list[Path]:
    """DICOM files under ``root`` (recursive; ``*.dcm`` or files with the ``DICM`` preamble).

    Sorted by path, which keeps series in acquisition order when the files are
    numbered; read the ``InstanceNumber`` from :class:`DicomSlice` to re-sort otherwise.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"`root` {str(root)!r} is not a directory")
    found = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix.lower() == ".dcm":
            found.append(p)
            continue
        try:
            with open(p, "rb") as fh:
                head = fh.read(132)
        except OSError:
            continue
        if len(head) == 132 and head[128:] == b"DICM":
            found.append(p)
    return found


def example_ct_path() -> str:
    """Path of the example CT slice shipped with pydicom (``CT_small.dcm``, 128x128)."""
    pydicom = _pydicom()
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:  # pragma: no cover - pydicom always ships it
        raise FileNotFoundError(f"pydicom {pydicom.__version__} does not ship CT_small.dcm")
    return str(path)
