"""Simulated CT data sets: ground truth -> sinogram (+ noise) -> FBP, deterministic by seed.

Every item is a dict of tensors::

    {"image": (C, H, W), "sinogram": (C, n_angles, n_det), "fbp": (C, H, W),
     "mask": (C, H, W) float {0, 1}  # where the data set has segmentations
     "label": ()  int64              # digits only}

Samples are simulated in chunks of ``chunk_size`` consecutive indices: one batched
ray transform and one batched FBP per chunk (never one transform per item), and
kept in memory when ``keep=True``. Randomness is per sample — the phantom of index
``i`` comes from ``numpy.random.default_rng([seed, i])`` and its noise from a torch
generator seeded from ``(seed, i)`` — so an item does not depend on chunk size,
access order or worker process.

Sparse-view data: give a geometry with few angles (or use
:func:`recon.data.noise.select_views`). Low-dose data: ``noise=PoissonNoise(I0, mu_scale)``.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..operators import ParallelBeamGeometry, RayTransform, fbp
from ..operators.geometry import Geometry
from .noise import as_noise_model
from .anatomy import LAYOUTS, anatomy_phantom
from .phantoms import ellipse_phantom, lesion_phantom

__all__ = ["SimulatedCTDataset", "EllipsePhantomDataset", "AnatomyPhantomDataset",
           "DigitsDataset", "DicomSliceDataset"]


def _size_pair(image_size, name="image_size") -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        pair = (int(image_size), int(image_size))
    else:
        try:
            pair = tuple(int(s) for s in image_size)
        except TypeError as exc:
            raise ValueError(f"`{name}` must be an int or a pair of ints, got {image_size!r}") from exc
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"`{name}` must be a positive int or a pair of positive ints, got {image_size!r}")
    return pair


def _as_operator(operator, image_size, default_angles: int = 60) -> RayTransform:
    if operator is None:
        return RayTransform(ParallelBeamGeometry(image_size, n_angles=default_angles))
    if isinstance(operator, Geometry):
        operator = RayTransform(operator)
    if not isinstance(operator, RayTransform):
        raise TypeError(f"`operator` must be a RayTransform, a Geometry or None, got {type(operator).__name__}")
    if tuple(operator.domain_shape) != tuple(image_size):
        raise ValueError(f"`image_size` {tuple(image_size)} does not match the operator's image shape "
                         f"{operator.domain_shape}")
    return operator


def _noise_generator(seed: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), int(index), 1]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class SimulatedCTDataset(Dataset):
    """Base class: subclasses provide ground truth via :meth:`make_samples`.

    Parameters
    ----------
    n_samples : int
        Length of the data set.
    operator : RayTransform
        Acquisition operator (any backend; its geometry fixes angles and detector).
    noise : None, float or callable
        ``None``: clean data; a float: :class:`~recon.data.noise.GaussianNoise` level;
        or a noise model such as :class:`~recon.data.noise.PoissonNoise`.
    seed : int
        Seed of phantoms and noise.
    fbp_filter, frequency_scaling
        FBP settings for the ``"fbp"`` entry (:func:`recon.operators.fbp`).
    chunk_size : int
        Samples simulated per batched ray transform.
    keep : bool
        Keep simulated chunks in memory (default); otherwise only the last chunk.
    dtype : torch.dtype
        dtype of the returned tensors (simulation runs in it too).
    """

    def __init__(self, n_samples: int, operator: RayTransform, *, noise=None, seed: int = 0,
                 fbp_filter: str = "hann", frequency_scaling: float = 1.0, chunk_size: int = 64,
                 keep: bool = True, dtype: torch.dtype = torch.float32):
        if int(n_samples) != n_samples or n_samples < 0:
            raise ValueError(f"`n_samples` must be an int >= 0, got {n_samples!r}")
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype!r}")
        from ..operators.fbp import _check_filter

        _check_filter(fbp_filter, frequency_scaling)
        self.n_samples = int(n_samples)
        self.operator = operator
        self.noise = as_noise_model(noise)
        self.seed = int(seed)
        self.fbp_filter = fbp_filter
        self.frequency_scaling = frequency_scaling
        self.chunk_size = int(chunk_size)
        self.keep = keep
        self.dtype = dtype
        self._chunks: dict[int, dict[str, torch.Tensor]] = {}

    # --------------------------------------------------------------- subclass API
    def make_samples(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Ground truth of ``indices``: ``{"image": (n, C, H, W), ...}`` (+ "mask", "label")."""
        raise NotImplementedError

    # ------------------------------------------------------------------- machinery
    def __len__(self) -> int:
        return self.n_samples

    def simulate(self, images: torch.Tensor, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Sinograms (one batched transform), per-sample noise, and FBPs of ``images``."""
        sino = self.operator(images)
        if self.noise is not None:
            sino = torch.stack([self.noise(sino[k], _noise_generator(self.seed, i))
                                for k, i in enumerate(indices)])
        recon = fbp(sino, self.operator, self.fbp_filter, self.frequency_scaling)
        return {"sinogram": sino, "fbp": recon}

    def _chunk(self, c: int) -> dict[str, torch.Tensor]:
        if c not in self._chunks:
            start = c * self.chunk_size
            indices = range(start, min(start + self.chunk_size, self.n_samples))
            data = {k: v if v.dtype == torch.int64 else v.to(self.dtype)
                    for k, v in self.make_samples(indices).items()}
            data.update(self.simulate(data["image"], indices))
            if not self.keep:
                self._chunks.clear()
            self._chunks[c] = data
        return self._chunks[c]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"`index` must be an int, got {type(index).__name__}")
        if index < 0:
            index += self.n_samples
        if not 0 <= index < self.n_samples:
            raise IndexError(f"`index` {index} out of range for {self.n_samples} samples")
        data = self._chunk(int(index) // self.chunk_size)
        k = int(index) % self.chunk_size
        return {name: value[k] for name, value in data.items()}

    def precompute(self) -> "SimulatedCTDataset":
        """Simulate every chunk now (returns ``self``)."""
        for c in range((self.n_samples + self.chunk_size - 1) // self.chunk_size):
            self._chunk(c)
        return self


class EllipsePhantomDataset(SimulatedCTDataset):
    """Random-ellipse phantoms (Adler & Öktem 2018 style), optionally with lesion masks.

    Parameters
    ----------
    n_samples : int
    image_size : int or (H, W)
    operator : RayTransform, Geometry or None
        ``None``: parallel beam with 60 angles on the image grid.
    noise, seed, **kwargs
        See :class:`SimulatedCTDataset`.
    lesions : bool
        ``False``: :func:`~recon.data.phantoms.ellipse_phantom` (``Poisson(n_ellipses)``
        ellipses, values in ``[0, 1]``). ``True``: :func:`~recon.data.phantoms.lesion_phantom`
        (body, organ, small lesions) and a ``"mask"`` of the lesions.
    n_ellipses : float
        Mean number of random ellipses (``lesions=False``).
    lesion_rate : float
        Mean number of lesions per image (``lesions=True``; at least one).
    """

    def __init__(self, n_samples: int, image_size=128, operator=None, *, noise=None, seed: int = 0,
                 lesions: bool = False, n_ellipses: float = 50.0, lesion_rate: float = 1.5, **kwargs):
        size = _size_pair(image_size)
        if not n_ellipses >= 0:
            raise ValueError(f"`n_ellipses` must be >= 0, got {n_ellipses!r}")
        if lesions and not lesion_rate >= 1:
            raise ValueError(f"`lesion_rate` must be >= 1, got {lesion_rate!r}")
        super().__init__(n_samples, _as_operator(operator, size), noise=noise, seed=seed, **kwargs)
        self.image_size = size
        self.lesions = bool(lesions)
        self.n_ellipses = float(n_ellipses)
        self.lesion_rate = float(lesion_rate)

    def make_samples(self, indices):
        """Phantoms (and lesion masks) of ``indices`` from ``default_rng([seed, i])``."""
        images, masks = [], []
        for i in indices:
            rng = np.random.default_rng([self.seed, int(i)])
            if self.lesions:
                img, mask = lesion_phantom(self.image_size, rng, lesion_rate=self.lesion_rate)
                masks.append(mask)
            else:
                img = ellipse_phantom(self.image_size, rng, self.n_ellipses)
            images.append(img)
        out = {"image": torch.stack(images)[:, None]}
        if self.lesions:
            out["mask"] = torch.stack(masks)[:, None]
        return out


class AnatomyPhantomDataset(SimulatedCTDataset):
    """Anatomy-like phantoms (:func:`~recon.data.anatomy.anatomy_phantom`) with CT data.

    Sample ``i`` is drawn from ``default_rng([seed, i])``: the same seed gives the same data.
    ``layouts``, ``texture``, ``n_lesions``, ``n_vessels`` and ``zoom`` are passed to
    :func:`~recon.data.anatomy.anatomy_phantom`; ``operator`` ``None`` means parallel beam with
    60 angles; ``noise``, ``seed`` and ``**kwargs`` as in :class:`SimulatedCTDataset`.
    """

    def __init__(self, n_samples: int, image_size=128, operator=None, *, noise=None, seed: int = 0,
                 layouts=LAYOUTS, texture: float = 0.15, n_lesions: float = 2.0,
                 n_vessels: float = 4.0, zoom: float = 0.4, **kwargs):
        size = _size_pair(image_size)
        self.options = dict(layouts=tuple(layouts), texture=texture, n_lesions=n_lesions,
                            n_vessels=n_vessels, zoom=zoom)
        anatomy_phantom((4, 4), np.random.default_rng(0), **self.options)  # validates options
        super().__init__(n_samples, _as_operator(operator, size), noise=noise, seed=seed, **kwargs)
        self.image_size = size

    def make_samples(self, indices):
        """Phantoms of ``indices`` from ``default_rng([seed, i])``."""
        images = [anatomy_phantom(self.image_size, np.random.default_rng([self.seed, int(i)]),
                                  **self.options) for i in indices]
        return {"image": torch.stack(images)[:, None]}


class DigitsDataset(SimulatedCTDataset):
    """scikit-learn's 8x8 digits upsampled (MNIST stand-in), with CT data, labels and masks.

    Parameters
    ----------
    image_size : int or (H, W)
        Default 28 (MNIST size).
    operator : RayTransform, Geometry or None
        ``None``: parallel beam with 24 angles (section 3.1.1 of the reference text).
    split : {"train", "test", "all"}
        A fixed random split (``split_seed``) with ``test_fraction`` of the 1797 images in "test".
    n_samples : int, optional
        Use only the first ``n_samples`` images of the split.
    mask_threshold : float
        ``"mask"`` is ``image > mask_threshold`` (a segmentation target).
    pad : int
        Border in original 8x8 pixels, see :func:`~recon.data.digits.load_digits_images`.
    noise, seed, **kwargs
        See :class:`SimulatedCTDataset`.
    """

    def __init__(self, image_size=28, operator=None, *, split: str = "train", test_fraction: float = 0.2,
                 n_samples: int | None = None, noise=None, seed: int = 0, split_seed: int = 0,
                 mask_threshold: float = 0.5, pad: int = 1, **kwargs):
        from .digits import load_digits_images

        size = _size_pair(image_size)
        if split not in ("train", "test", "all"):
            raise ValueError(f"`split` must be 'train', 'test' or 'all', got {split!r}")
        if not 0 < test_fraction < 1:
            raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}")
        images, labels = load_digits_images(size, pad=pad)
        perm = np.random.default_rng(split_seed).permutation(len(labels))
        n_test = int(round(test_fraction * len(labels)))
        sel = {"train": perm[n_test:], "test": perm[:n_test], "all": np.arange(len(labels))}[split]
        if n_samples is not None:
            if int(n_samples) != n_samples or not 0 <= n_samples <= len(sel):
                raise ValueError(f"`n_samples` must be an int in [0, {len(sel)}] for split {split!r}, "
                                 f"got {n_samples!r}")
            sel = sel[: int(n_samples)]
        self._images = images[torch.as_tensor(sel)]
        self._labels = labels[torch.as_tensor(sel)]
        op = _as_operator(operator if operator is not None else ParallelBeamGeometry(size, n_angles=24), size)
        super().__init__(len(sel), op, noise=noise, seed=seed, **kwargs)
        self.mask_threshold = float(mask_threshold)

    def make_samples(self, indices):
        """Digit images, thresholded masks and class labels of ``indices``."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        img = self._images[idx]
        return {"image": img, "mask": (img > self.mask_threshold).to(img.dtype), "label": self._labels[idx]}


class DicomSliceDataset(SimulatedCTDataset):
    """CT slices from DICOM files, converted to attenuation, resized, and re-projected.

    Parameters
    ----------
    paths : directory, file, or sequence of files
        A directory is searched recursively (:func:`~recon.data.dicom.find_dicom_files`).
    operator : RayTransform or Geometry
        Its image shape is the size slices are resized to (bilinear, antialiased).
    unit : {"water", "1/mm"}
        ``"water"``: attenuation relative to water (water 1, air 0); ``"1/mm"``: linear
        attenuation in 1/mm (see :func:`~recon.data.dicom.hu_to_attenuation`).
    mu_water : float
        Water attenuation in 1/mm used for the conversion.
    modalities : sequence of str or None
        Modalities read (default CT only; ``None``: any). Every file's header is checked when
        the data set is made, so a wrong file is named before any pixels are read.
    noise, seed, **kwargs
        See :class:`SimulatedCTDataset`.
    """

    def __init__(self, paths, operator, *, unit: str = "water", mu_water: float | None = None,
                 modalities=("CT",), noise=None, seed: int = 0, **kwargs):
        from .dicom import MU_WATER, check_dicom_file, find_dicom_files

        if unit not in ("water", "1/mm"):
            raise ValueError(f"`unit` must be 'water' or '1/mm', got {unit!r}")
        if isinstance(paths, (str, os.PathLike)):
            if not os.path.exists(paths):
                raise FileNotFoundError(f"`paths` {str(paths)!r} does not exist; give a folder "
                                        f"of DICOM files, one file, or a list of files")
            files = find_dicom_files(paths) if os.path.isdir(paths) else [paths]
        else:
            files = list(paths)
            missing = [str(f) for f in files if not os.path.isfile(f)]
            if missing:
                raise FileNotFoundError(f"`paths` names {len(missing)} missing file(s), e.g. "
                                        f"{missing[0]!r}")
        if not files:
            raise ValueError(f"`paths` {paths!r} contains no DICOM files")
        if operator is None or not isinstance(operator, (RayTransform, Geometry)):
            raise TypeError(f"`operator` must be a RayTransform or Geometry, got {type(operator).__name__}")
        for f in files:
            check_dicom_file(f, modalities)
        op = operator if isinstance(operator, RayTransform) else RayTransform(operator)
        super().__init__(len(files), op, noise=noise, seed=seed, **kwargs)
        self.files = [str(f) for f in files]
        self.modalities = modalities
        self.unit = unit
        self.mu_water = MU_WATER if mu_water is None else float(mu_water)

    def _warn_geometry(self, i: int, sl, shape: tuple) -> None:
        """``RuntimeWarning`` (once per data set) when slice ``i``'s field of view (pixel
        spacing × shape, mm) has another aspect ratio than the operator's extent (the resize
        stretches it), or, with ``unit="1/mm"``, another size (the sinogram's line integrals are
        then not in physical units: the geometry's length unit must be the mm)."""
        if getattr(self, "_warned", False):
            return
        fov = (sl.pixel_spacing[0] * shape[0], sl.pixel_spacing[1] * shape[1])
        ext = tuple(float(v) for v in self.operator.geometry.extent)
        why = None
        if not math.isclose(fov[0] / fov[1], ext[0] / ext[1], rel_tol=1e-3):
            why = (f"its field of view {fov[0]:g} × {fov[1]:g} mm has another aspect ratio than "
                   f"the operator's extent {ext[0]:g} × {ext[1]:g}: the resize stretches it")
        elif self.unit == "1/mm" and not all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(fov, ext)):
            why = (f"unit='1/mm' with a field of view of {fov[0]:g} × {fov[1]:g} mm but an "
                   f"operator extent of {ext[0]:g} × {ext[1]:g}: the sinogram is in physical "
                   f"units only if the extent is the field of view in mm")
        if why is not None:
            self._warned = True
            warnings.warn(f"DicomSliceDataset, {self.files[i]!r}: {why}", RuntimeWarning, stacklevel=3)

    def make_samples(self, indices):
        """Attenuation images of the DICOM files ``indices``, resized to the operator's grid."""
        from .dicom import read_dicom_slice

        images = []
        for i in indices:
            sl = read_dicom_slice(self.files[i], self.modalities)
            mu = torch.as_tensor(sl.attenuation(self.mu_water), dtype=torch.float64)
            if self.unit == "water":
                mu = mu / self.mu_water
            size = self.operator.domain_shape
            self._warn_geometry(i, sl, tuple(mu.shape))
            if tuple(mu.shape) != tuple(size):
                shrink = size[0] < mu.shape[0] or size[1] < mu.shape[1]
                mu = F.interpolate(mu[None, None], size=size, mode="bilinear", align_corners=False,
                                   antialias=shrink)[0, 0].clamp_min(0.0)
            images.append(mu)
        return {"image": torch.stack(images)[:, None]}
