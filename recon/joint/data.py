"""Data of the joint task-adapted CT experiment: lesion phantoms with masks, sparse view,
Poisson low dose (I₀ = 7·10⁴ photons per detector bin, as in the reference).

Every split is ``{"sinogram": (N, 1, n_angles, n_det), "image": (N, 1, H, W), "fbp": (N, 1, H, W),
"mask": (N, 1, H, W)}`` in float32 (images in [0, 1], masks in {0, 1}).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from recon.train import check_data_matches_operator, make_operator, stack_dataset

from .losses import check_masks

__all__ = ["default_joint_setup", "build_joint_data", "check_joint_data"]

_SPLIT_SEED = {"train": 0, "val": 1, "test": 2}


def default_joint_setup(**overrides: Any) -> dict[str, Any]:
    """Acquisition and data settings (plain values).

    ``image_size`` (64; 128 as an option), ``n_angles`` (30 parallel-beam angles in [0, π):
    sparse view), ``photons`` (Poisson ``I₀``, 7e4), ``mu_scale`` (optical depth per sinogram
    unit; ``None``: ``4/image_size``), ``lesion_rate`` (mean lesions per phantom),
    ``fbp_filter``, ``data_seed`` (train / val / test use ``data_seed + 0, 1, 2``) and the split
    sizes ``n_train``, ``n_val``, ``n_test``.
    """
    setup = dict(image_size=64, n_angles=30, n_detectors=None, photons=7e4, mu_scale=None,
                 lesion_rate=2.0, fbp_filter="hann", data_seed=0,
                 n_train=192, n_val=16, n_test=64)
    unknown = set(overrides) - set(setup)
    if unknown:
        raise ValueError(f"unknown setup keys {sorted(unknown)}; known: {sorted(setup)}")
    setup.update(overrides)
    if int(setup["image_size"]) % 8:
        raise ValueError(f"image_size must be a multiple of 8 (U-Net), got {setup['image_size']!r}")
    if not float(setup["photons"]) > 0:
        raise ValueError(f"photons must be > 0, got {setup['photons']!r}")
    return setup


def check_joint_data(data: Mapping[str, torch.Tensor], operator: Any = None) -> None:
    """Validate a split: required keys, masks matching the images, shapes matching the geometry."""
    missing = [k for k in ("sinogram", "image", "mask") if k not in data]
    if missing:
        raise ValueError(f"joint data needs keys 'sinogram', 'image', 'mask'; missing {missing}")
    check_masks(data["mask"], data["image"], "data['mask']")
    if len(data["sinogram"]) != len(data["image"]):
        raise ValueError(f"data has {len(data['sinogram'])} sinograms but {len(data['image'])} images")
    if operator is not None:
        check_data_matches_operator(data, operator)


def build_joint_data(setup: Mapping[str, Any], split: str = "train", n: int | None = None,
                     operator: Any = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(operator, data)`` of one split of ``setup`` (see the module docstring)."""
    from recon.data import EllipsePhantomDataset, PoissonNoise

    if split not in _SPLIT_SEED:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    size = int(setup["image_size"])
    if operator is None:
        operator = make_operator({"image_size": size, "n_angles": setup["n_angles"],
                                  "n_detectors": setup.get("n_detectors")})
    n = int(setup[f"n_{split}"] if n is None else n)
    mu = setup.get("mu_scale") or 4.0 / size
    dataset = EllipsePhantomDataset(
        n, size, operator, noise=PoissonNoise(float(setup["photons"]), mu_scale=float(mu)),
        seed=int(setup["data_seed"]) + _SPLIT_SEED[split], lesions=True,
        lesion_rate=float(setup["lesion_rate"]), fbp_filter=setup["fbp_filter"])
    data = stack_dataset(dataset, keys=("sinogram", "image", "fbp", "mask"))
    check_joint_data(data, operator)
    return operator, data
