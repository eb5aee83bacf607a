"""Reading CT slices from DICOM (pydicom) and converting Hounsfield units to attenuation.

Hounsfield units are defined by ``HU = 1000 (mu - mu_water) / (mu_water - mu_air)``, so ::

    mu = mu_water + HU / 1000 * (mu_water - mu_air),

clipped at 0. The default ``mu_water = 0.0192 / mm`` is water's linear attenuation
near the 70 keV effective energy of a 120 kVp spectrum; ``mu_air = 0``.
``pydicom`` is imported only when a file is read.

Reading is strict about what a file is: only CT is read by default (``modalities=None`` or
e.g. ``("CT", "PT")`` opts in to others, whose values are not Hounsfield units), a
``DICOMDIR`` index is skipped when a folder is searched and refused as an image, an Enhanced
CT's rescale and pixel spacing come from its functional groups, and Pixel Padding Value /
Pixel Padding Range Limit pixels become air. Every error is a ``ValueError`` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["DicomSlice", "read_dicom_slice", "check_dicom_file", "find_dicom_files",
           "hu_to_attenuation", "attenuation_to_hu", "example_ct_path", "MU_WATER"]

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
        Hounsfield units (rescale slope/intercept applied; padding pixels set to -1000); for a
        modality other than CT read on request, the rescaled values in that modality's units.
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


#: SOP class of a ``DICOMDIR`` (the index file of a DICOM CD or folder), never an image.
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"


def _where(path) -> str:
    return f"`path` {str(path)!r}"


def _modalities(modalities) -> tuple[str, ...] | None:
    if modalities is None:
        return None
    if isinstance(modalities, str):
        modalities = (modalities,)
    try:
        codes = tuple(modalities)
    except TypeError:
        codes = None
    if not codes or not all(isinstance(m, str) and m for m in codes):
        raise TypeError(f"`modalities` must be None (any) or modality codes such as ('CT',), "
                        f"got {modalities!r}")
    return tuple(m.upper() for m in codes)


def _read_dataset(path, stop_before_pixels: bool):
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels)
    except Exception as exc:
        raise ValueError(f"{_where(path)} is not a readable DICOM file: {exc}") from exc


def _check_kind(ds, path, modalities) -> None:
    """DICOMDIR index files and modalities outside ``modalities`` are refused, naming the file."""
    sop = str(getattr(ds, "SOPClassUID", "") or getattr(getattr(ds, "file_meta", None),
                                                        "MediaStorageSOPClassUID", "") or "")
    if sop == _DICOMDIR_SOP or Path(path).name.upper() == "DICOMDIR":
        raise ValueError(f"{_where(path)} is a DICOMDIR (the index of a DICOM folder), not an "
                         f"image; give the folder or the image files it lists")
    codes = _modalities(modalities)
    modality = str(getattr(ds, "Modality", "") or "").strip().upper()
    if codes is not None and modality not in codes:
        kind = getattr(getattr(ds, "SOPClassUID", None), "name", "") or "unknown SOP class"
        got = f"modality {modality!r}" if modality else "no Modality tag"
        raise ValueError(f"{_where(path)} has {got} ({kind}), not one of {list(codes)}: its "
                         f"values are not Hounsfield units. Pass modalities=None (any) or "
                         f"modalities={tuple(codes) + ((modality,) if modality else ())!r} to "
                         f"read it anyway")


def check_dicom_file(path: str | os.PathLike, modalities=("CT",)) -> None:
    """Read the header of ``path`` (not its pixels) and raise ``ValueError`` naming the file
    when it is unreadable, a ``DICOMDIR``, or its modality is not in ``modalities`` (``None``:
    any). Cheap: a data set checks every file this way before reading any pixels."""
    ds = _read_dataset(path, stop_before_pixels=True)
    _check_kind(ds, path, modalities)


def _functional_group(ds, sequence: str):
    """The first item of ``sequence`` in the per-frame, else the shared functional groups."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        for item in getattr(ds, groups, None) or []:
            inner = getattr(item, sequence, None)
            if inner:
                return inner[0]
    return None


def _number(ds, name: str, default: float, path) -> float:
    if name not in ds:
        return default
    value = ds[name].value
    if value is None or value == "":
        raise ValueError(f"{_where(path)}: {name} is present but empty")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{_where(path)}: {name} must be one number, got {value!r}") from None
    if not np.isfinite(v):
        raise ValueError(f"{_where(path)}: {name} is not finite ({value!r})")
    return v


def _rescale(ds, path) -> tuple[float, float]:
    """``(slope, intercept)`` of ``value = slope · stored + intercept``: the image's own tags, else
    the Pixel Value Transformation functional group of an Enhanced CT."""
    src = ds if "RescaleSlope" in ds or "RescaleIntercept" in ds else (
        _functional_group(ds, "PixelValueTransformationSequence") or ds)
    slope = _number(src, "RescaleSlope", 1.0, path)
    intercept = _number(src, "RescaleIntercept", 0.0, path)
    if slope == 0:
        raise ValueError(f"{_where(path)}: RescaleSlope is 0, which would map every pixel to "
                         f"the intercept {intercept}")
    return slope, intercept


def _pixel_spacing(ds, path) -> tuple[float, float]:
    src = ds if "PixelSpacing" in ds else (_functional_group(ds, "PixelMeasuresSequence") or ds)
    spacing = getattr(src, "PixelSpacing", None)
    if spacing is None:
        return (1.0, 1.0)
    single = isinstance(spacing, (str, bytes)) or not hasattr(spacing, "__len__")
    values = [spacing] if single else list(spacing)
    try:
        pair = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not all(np.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"{_where(path)}: PixelSpacing must hold two positive numbers (row and "
                         f"column spacing in mm), got {values!r}")
    return pair


def _as_stored(value: int, ds) -> int:
    """A padding value in the pixels' own signedness (writers store signed values as US)."""
    bits = int(getattr(ds, "BitsStored", 16) or 16)
    allocated = int(getattr(ds, "BitsAllocated", bits) or bits)
    if int(getattr(ds, "PixelRepresentation", 0) or 0) == 1:
        if value >= 2 ** (bits - 1):
            value -= 2 ** bits if value < 2 ** bits else 2 ** allocated
    elif value < 0:
        value += 2 ** allocated
    return value


def _padding_mask(ds, raw: np.ndarray) -> np.ndarray | None:
    """Pixels equal to Pixel Padding Value, or between it and Pixel Padding Range Limit."""
    pad = getattr(ds, "PixelPaddingValue", None)
    if pad is None or pad == "":
        return None
    lo = hi = _as_stored(int(pad), ds)
    limit = getattr(ds, "PixelPaddingRangeLimit", None)
    if limit is not None and limit != "":
        lim = _as_stored(int(limit), ds)
        lo, hi = min(lo, lim), max(lo, lim)
    return (raw >= lo) & (raw <= hi)


def _pixels(ds, path) -> np.ndarray:
    if "PixelData" not in ds:
        raise ValueError(f"{_where(path)} has no pixel data")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        raw = ds.pixel_array
    except (RuntimeError, NotImplementedError) as exc:
        name = getattr(syntax, "name", syntax)
        raise ValueError(f"{_where(path)}: no installed decoder reads its compressed pixel data "
                         f"({name}); install one of the plugins pydicom names: {exc}") from exc
    except Exception as exc:
        raise ValueError(f"{_where(path)}: its pixel data cannot be read (truncated or "
                         f"inconsistent with its image tags?): {exc}") from exc
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if raw.ndim != 2:
        what = f"{frames} frames" if frames > 1 else f"an image of shape {raw.shape}"
        raise ValueError(f"{_where(path)} holds {what}; expected one 2-D grey-value slice")
    return raw


def read_dicom_slice(path: str | os.PathLike, modalities=("CT",)) -> DicomSlice:
    """Read a single-frame CT image (classic or Enhanced CT) from ``path`` into Hounsfield units.

    ``HU = RescaleSlope · stored + RescaleIntercept`` (for an Enhanced CT the rescale is read
    from its Pixel Value Transformation functional group); pixels equal to Pixel Padding Value,
    or between it and Pixel Padding Range Limit, are set to air (−1000 HU). Only the
    ``modalities`` given are read (default CT; ``None`` reads any modality, whose rescaled
    values are then in that modality's own units). Every error is a ``ValueError`` naming the
    file.
    """
    ds = _read_dataset(path, stop_before_pixels=False)
    _check_kind(ds, path, modalities)
    raw = _pixels(ds, path)
    slope, intercept = _rescale(ds, path)
    hu = raw.astype(np.float64) * slope + intercept
    pad = _padding_mask(ds, raw)
    if pad is not None:
        hu[pad] = -1000.0
    spacing = _pixel_spacing(ds, path)
    meta = {k: getattr(ds, k, None) for k in ("InstanceNumber", "SliceLocation", "Modality")}
    return DicomSlice(hu.astype(np.float32), spacing, str(path), meta)


def find_dicom_files(root: str | os.PathLike) -> list[Path]:
    """DICOM files under ``root`` (recursive; ``*.dcm`` or files with the ``DICM`` preamble).

    ``DICOMDIR`` index files (as on a DICOM CD) are skipped. Sorted by path, which keeps series
    in acquisition order when the files are numbered; read the ``InstanceNumber`` from
    :class:`DicomSlice` to re-sort otherwise.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"`root` {str(root)!r} is not a directory")
    found = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.upper() == "DICOMDIR":
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
