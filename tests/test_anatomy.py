"""Anatomy-like phantoms: determinism, value range, layouts, details, data set, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.data import LAYOUTS, AnatomyPhantomDataset, anatomy_phantom
from recon.operators import ParallelBeamGeometry, RayTransform


def _draw(seed, shape=32, **kw):
    return anatomy_phantom(shape, np.random.default_rng(seed), **kw)


def test_same_seed_same_image_other_seed_other_image():
    a, b, c = _draw(3), _draw(3), _draw(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_is_in_range_and_not_empty(layout):
    for seed in range(3):
        img = _draw(seed, (24, 40), layouts=(layout,))
        assert img.shape == (24, 40) and img.dtype == torch.float64
        assert float(img.min()) >= 0.0 and 0.6 <= float(img.max()) <= 1.0
        assert float((img > 0).double().mean()) > 0.02


def test_family_is_richer_than_smooth_ellipses():
    """Texture and thin curves: more distinct values and more edges than the no-detail draw."""
    rich = torch.stack([_draw(s, 48) for s in range(6)])
    plain = torch.stack([_draw(s, 48, texture=0.0, n_lesions=0.0, n_vessels=0.0)
                         for s in range(6)])
    assert len(torch.unique(rich)) > 5 * len(torch.unique(plain))
    grad = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert grad(rich) > grad(plain)


def test_zoomed_crops_reach_the_border_whole_bodies_do_not():
    border = lambda t: float(torch.cat([t[0], t[-1], t[:, 0], t[:, -1]]).max())  # noqa: E731
    whole = [_draw(s, 32, layouts=("abdomen",), zoom=0.0, n_vessels=0.0) for s in range(4)]
    crops = [_draw(s, 32, layouts=("abdomen",), zoom=1.0) for s in range(4)]
    assert all(border(t) == 0.0 for t in whole)
    assert sum(border(t) > 0.0 for t in crops) >= 3


def test_layouts_differ_on_average():
    means = {name: float(torch.stack([_draw(s, 32, layouts=(name,)) for s in range(4)]).mean())
             for name in ("thorax", "head")}
    assert means["thorax"] != pytest.approx(means["head"], rel=0.05)


@pytest.mark.parametrize("kwargs, match", [
    (dict(layouts=("knee",)), "layouts"), (dict(layouts=()), "layouts"),
    (dict(texture=-1.0), "texture"), (dict(n_lesions=float("inf")), "n_lesions"),
    (dict(n_vessels="many"), "n_vessels"), (dict(zoom=1.5), "zoom"),
])
def test_bad_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _draw(0, **kwargs)
    with pytest.raises(ValueError, match=match):
        AnatomyPhantomDataset(2, 16, ParallelBeamGeometry((16, 16), n_angles=6), **kwargs)


def test_dataset_items_are_deterministic_and_consistent():
    op = RayTransform(ParallelBeamGeometry((16, 16), n_angles=6))
    ds = AnatomyPhantomDataset(3, 16, op, seed=5)
    again = AnatomyPhantomDataset(3, 16, op, seed=5)
    item = ds[1]
    assert set(item) >= {"image", "sinogram", "fbp"}
    assert torch.equal(item["image"], again[1]["image"])
    assert torch.allclose(item["sinogram"], op(item["image"][None].float())[0], atol=1e-5)
    assert not torch.equal(ds[0]["image"], ds[1]["image"])


def test_experiment_setup_builds_anatomy_data():
    from recon.training import build_setup, default_setup

    setup = default_setup(dataset="anatomy", image_size=16, n_angles=6, n_train=2)
    op, data = build_setup(setup, "train")
    assert data["image"].shape == (2, 1, 16, 16) and data["sinogram"].shape[-2] == 6
    with pytest.raises(ValueError, match="dataset"):
        default_setup(dataset="knees")
