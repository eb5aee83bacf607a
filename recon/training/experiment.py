r"""Experiment set-up of the unrolled-reconstruction runs: settings, operator and data.

An experiment is a dict of plain values (:func:`default_setup`): the acquisition (parallel
beam, ``n_angles`` equispaced angles in ``[0, π)`` on an ``image_size²`` grid, optional noise)
and the simulated data (ellipse phantoms or digits, split sizes, data seed).
:func:`build_setup` turns it into the operator and the stacked tensors of one split, which is
all :func:`recon.training.fit` and the evaluation need; checkpoints store the dict so that a
run can be rebuilt exactly.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

__all__ = ["TensorData", "stack_dataset", "check_data_matches_operator", "default_setup",
           "make_operator", "build_setup"]

TensorData = Mapping[str, torch.Tensor]


def stack_dataset(dataset: Sequence[Mapping[str, torch.Tensor]],
                  keys: Sequence[str] = ("sinogram", "image", "fbp")) -> dict[str, torch.Tensor]:
    """Stack the items ``{"sinogram": (C, n_a, n_d), "image": (C, H, W), ...}`` of a data set.

    Returns ``{key: (N, C, ...)}`` for the ``keys`` present in the first item (``sinogram`` and
    ``image`` are required).  Small CT data sets fit in memory, which makes batches free.
    """
    if len(dataset) == 0:
        raise ValueError("`dataset` is empty; give at least one item")
    first = dataset[0]
    for key in ("sinogram", "image"):
        if key not in first:
            raise ValueError(f"dataset items need a {key!r} entry, got keys {sorted(first)}")
    present = [k for k in keys if k in first]
    items = [dataset[i] for i in range(len(dataset))]
    return {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in present}


def check_data_matches_operator(data: TensorData, operator: Any) -> None:
    """Raise ``ValueError`` if the data's sinogram / image shapes do not match the geometry."""
    sino = tuple(data["sinogram"].shape[-2:])
    image = tuple(data["image"].shape[-2:])
    if sino != tuple(operator.range_shape):
        raise ValueError(
            f"sinogram shape {sino} (n_angles, n_detectors) of the data does not match the "
            f"geometry's range_shape {tuple(operator.range_shape)}")
    if image != tuple(operator.domain_shape):
        raise ValueError(
            f"image shape {image} of the data does not match the geometry's image_shape "
            f"{tuple(operator.domain_shape)}")


def default_setup(**overrides: Any) -> dict[str, Any]:
    """The acquisition and data settings of an experiment, as plain values.

    Keys: ``dataset`` (``"anatomy"``, the default: :func:`recon.data.anatomy_phantom`, whose
    networks transfer to real slices; ``"ellipses"``; or ``"digits"``), ``image_size``, ``n_angles`` (parallel
    beam, equispaced in ``[0, π)``; sparse view = few angles), ``n_detectors`` (``None``: the
    geometry's default), ``noise`` (``"none"``, ``"poisson"``: ``b ~ Poisson(I₀ e^{-μ y})``
    with ``photons = I₀`` and ``mu_scale = μ`` (``None``: ``4 / image_size``, i.e. optical depth
    4 across a unit-valued image), or ``"gaussian"`` with relative ``noise_level``),
    ``n_ellipses`` (mean number of random ellipses per phantom), ``fbp_filter``,
    ``data_seed`` (train / val / test use seeds ``data_seed + 0, 1, 2``),
    ``n_train``, ``n_val``, ``n_test``.
    """
    setup = dict(dataset="anatomy", image_size=64, n_angles=30, n_detectors=None, noise="none",
                 photons=7e4, mu_scale=None, noise_level=0.05, n_ellipses=50.0, fbp_filter="hann",
                 data_seed=0, n_train=512, n_val=32, n_test=64)
    unknown = set(overrides) - set(setup)
    if unknown:
        raise ValueError(f"unknown setup keys {sorted(unknown)}; known: {sorted(setup)}")
    setup.update(overrides)
    _check_setup_values(setup)
    if setup["dataset"] not in ("ellipses", "anatomy", "digits"):
        raise ValueError(f"dataset must be 'ellipses', 'anatomy' or 'digits', got "
                         f"{setup['dataset']!r}")
    if setup["noise"] not in ("none", "poisson", "gaussian"):
        raise ValueError(f"noise must be 'none', 'poisson' or 'gaussian', got {setup['noise']!r}")
    return setup


def make_operator(setup: Mapping[str, Any]):
    """Parallel-beam ``RayTransform`` (torch backend) of ``setup``."""
    from recon.operators import ParallelBeamGeometry, RayTransform

    size = int(setup["image_size"])
    geometry = ParallelBeamGeometry((size, size), n_angles=int(setup["n_angles"]),
                                    n_detectors=setup.get("n_detectors"))
    return RayTransform(geometry, backend="torch", check_finite=False)


def _noise_model(setup: Mapping[str, Any]):
    from recon.data import GaussianNoise, PoissonNoise

    if setup["noise"] == "poisson":
        mu = setup.get("mu_scale") or 4.0 / int(setup["image_size"])
        return PoissonNoise(float(setup["photons"]), mu_scale=float(mu))
    if setup["noise"] == "gaussian":
        return GaussianNoise(float(setup["noise_level"]))
    return None


def build_setup(setup: Mapping[str, Any], split: str = "train", n: int | None = None,
                operator: Any = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(operator, data)`` of one split (``"train"``, ``"val"``, ``"test"``) of ``setup``.

    ``data`` is :func:`stack_dataset` of the simulated items (``sinogram``, ``image``, ``fbp``);
    ``n`` overrides the split size ``setup["n_<split>"]``.
    """
    from recon.data import AnatomyPhantomDataset, DigitsDataset, EllipsePhantomDataset

    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    operator = operator if operator is not None else make_operator(setup)
    n = int(setup[f"n_{split}"] if n is None else n)
    seed = int(setup["data_seed"]) + {"train": 0, "val": 1, "test": 2}[split]
    kwargs = dict(noise=_noise_model(setup), fbp_filter=setup["fbp_filter"])
    if setup["dataset"] == "ellipses":
        dataset = EllipsePhantomDataset(n, int(setup["image_size"]), operator, seed=seed,
                                        n_ellipses=float(setup.get("n_ellipses", 50.0)), **kwargs)
    elif setup["dataset"] == "anatomy":
        dataset = AnatomyPhantomDataset(n, int(setup["image_size"]), operator, seed=seed, **kwargs)
    else:  # digits: validation is the tail of the training split, test the held-out split
        n_train = int(setup["n_train"])
        if split == "test":
            dataset = DigitsDataset(int(setup["image_size"]), operator, split="test",
                                    n_samples=n, seed=seed, **kwargs)
        else:
            full = DigitsDataset(int(setup["image_size"]), operator, split="train",
                                 n_samples=n_train + int(setup["n_val"]), seed=seed, **kwargs)
            offset = 0 if split == "train" else n_train
            dataset = [full[offset + i] for i in range(n)]
    data = stack_dataset(dataset)
    check_data_matches_operator(data, operator)
    return operator, data


_POSITIVE_INTS = ("image_size", "n_angles", "n_train", "n_val", "n_test")


def _check_setup_values(setup: Mapping[str, Any]) -> None:
    """``ValueError`` naming the key for sizes < 1, a negative seed or non-positive noise values."""
    import numbers

    for key in _POSITIVE_INTS + ("n_detectors",):
        value = setup[key]
        if value is None and key == "n_detectors":
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"setup `{key}` must be an int >= 1, got {value!r}")
    seed = setup["data_seed"]
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"setup `data_seed` must be an int >= 0, got {seed!r}")
    for key in ("photons", "noise_level", "mu_scale"):
        value = setup[key]
        if value is None and key == "mu_scale":
            continue
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value
        if not ok or value < 0 or (key != "noise_level" and value == 0) or value == float("inf"):
            raise ValueError(f"setup `{key}` must be a finite number "
                             f"{'>= 0' if key == 'noise_level' else '> 0'}, got {value!r}")
