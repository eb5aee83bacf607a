"""CT data: phantoms, noise models, sparse views, data sets (ellipses, digits, DICOM)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from recon.data import (DicomSliceDataset, DigitsDataset, EllipsePhantomDataset, GaussianNoise, PoissonNoise,
                        ellipse_phantom, example_ct_path, find_dicom_files, hu_to_attenuation,
                        attenuation_to_hu, lesion_phantom, read_dicom_slice, render_ellipses, select_views,
                        shepp_logan)
from recon.operators import ParallelBeamGeometry, RayTransform, fbp



@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RECON_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ray_cache"))


# ----------------------------------------------------------------------------- phantoms
def test_render_ellipses_area_and_modes():
    img = render_ellipses([(1.0, 0.5, 0.25, 0.1, -0.2, 0.7)], (200, 200))
    area = float(img.sum()) * (2 / 200) ** 2
    assert abs(area - math.pi * 0.5 * 0.25) < 0.01
    both = [(1.0, 0.5, 0.5, 0, 0, 0), (2.0, 0.2, 0.2, 0, 0, 0)]
    assert float(render_ellipses(both, (32, 32)).max()) == 3.0
    assert float(render_ellipses(both, (32, 32), mode="set").max()) == 2.0
    with pytest.raises(ValueError, match="semi-axes"):
        render_ellipses([(1.0, 0.0, 0.2, 0, 0, 0)], (8, 8))


def test_phantoms_are_in_unit_range_and_lesions_inside_body():
    for seed in range(5):
        img = ellipse_phantom((64, 64), np.random.default_rng(seed))
        assert img.min() >= 0 and img.max() <= 1
        les, mask = lesion_phantom((64, 64), np.random.default_rng(seed))
        assert les.min() >= 0 and les.max() <= 1
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
        assert torch.all(les[mask > 0] > 0)  # lesions lie inside the body
    sl = shepp_logan((64, 64))
    assert float(sl.max()) == 1.0 and float(sl.min()) == 0.0


# -------------------------------------------------------------------------------- noise
def test_poisson_noise_statistics_and_zero_counts():
    y = torch.full((100, 200), 2.0, dtype=torch.float64)
    noise = PoissonNoise(I0=1e4, mu_scale=0.5)
    gen = torch.Generator().manual_seed(0)
    out = noise(y, gen)
    rate = 1e4 * math.exp(-1.0)
    assert abs(float(out.mean()) - 2.0) < 0.01
    # delta method: var(-log(b/I0)/mu) = 1 / (rate mu^2)
    assert abs(float(out.var()) / (1 / (rate * 0.25)) - 1) < 0.06
    huge = noise(torch.full((10,), 1e3, dtype=torch.float64), gen)
    assert torch.all(torch.isfinite(huge))
    torch.testing.assert_close(huge, torch.full_like(huge, math.log(1e4) / 0.5))  # clipped to 1 count
    torch.testing.assert_close(noise(y, torch.Generator().manual_seed(0)), out)  # reproducible


@pytest.mark.parametrize("I0", [0, -5.0, float("nan"), float("inf")])
def test_poisson_bad_I0(I0):
    with pytest.raises(ValueError, match=r"`I0` must be a finite number > 0"):
        PoissonNoise(I0=I0)
    with pytest.raises(ValueError, match="mu_scale"):
        PoissonNoise(I0=10.0, mu_scale=0.0)


def test_gaussian_noise_is_relative_per_sample():
    y = torch.ones(2, 1, 50, 60, dtype=torch.float64)
    y[1] *= 10
    out = GaussianNoise(0.05)(y, torch.Generator().manual_seed(0))
    std = (out - y).reshape(2, -1).std(1)
    torch.testing.assert_close(std, torch.tensor([0.05, 0.5], dtype=torch.float64), rtol=0.05, atol=0)
    with pytest.raises(ValueError, match="level"):
        GaussianNoise(-0.1)


def test_select_views_matches_subset_geometry():
    geom = ParallelBeamGeometry((16, 16), 12)
    A = RayTransform(geom)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    y = A(x)
    ys, gs = select_views(y, geom, step=3)
    assert gs == geom.subset(0, 3)
    torch.testing.assert_close(ys, RayTransform(gs)(x))
    yn, gn = select_views(y, geom, n_views=5)
    assert gn.n_angles == 5 and yn.shape[-2] == 5
    with pytest.raises(ValueError, match="exactly one"):
        select_views(y, geom, step=2, n_views=3)
    with pytest.raises(ValueError, match="`n_views`"):
        select_views(y, geom, n_views=13)


# ---------------------------------------------------------------------------- data sets
def test_ellipse_dataset_deterministic_and_chunking_independent():
    geom = ParallelBeamGeometry((32, 32), 20)
    noise = PoissonNoise(7e4, mu_scale=4 / 32)
    a = EllipsePhantomDataset(10, 32, geom, noise=noise, seed=5, chunk_size=4)
    b = EllipsePhantomDataset(10, 32, RayTransform(geom), noise=noise, seed=5, chunk_size=10, keep=False)
    c = EllipsePhantomDataset(10, 32, geom, noise=noise, seed=6)
    for i in (0, 7, 9, -1):
        for key in ("image", "sinogram", "fbp"):
            torch.testing.assert_close(a[i][key], b[i][key], rtol=1e-5, atol=1e-5)
    assert not torch.equal(a[0]["image"], c[0]["image"])
    item = a[3]
    assert set(item) == {"image", "sinogram", "fbp"}
    assert item["image"].shape == (1, 32, 32) and item["sinogram"].shape == (1, 20, geom.n_detectors)
    assert item["image"].dtype == torch.float32 and 0 <= item["image"].min() and item["image"].max() <= 1
    with pytest.raises(IndexError):
        a[10]


def test_clean_ellipse_dataset_is_exact_and_lesion_masks_present():
    geom = ParallelBeamGeometry((32, 32), 16)
    ds = EllipsePhantomDataset(5, 32, geom, seed=0, lesions=True, dtype=torch.float64)
    A = RayTransform(geom)
    item = ds[2]
    assert set(item) == {"image", "sinogram", "fbp", "mask"}
    torch.testing.assert_close(item["sinogram"], A(item["image"]))
    torch.testing.assert_close(item["fbp"], fbp(item["sinogram"], A, "hann"))
    assert item["mask"].shape == (1, 32, 32) and item["mask"].sum() > 0
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["mask"].shape == (4, 1, 32, 32)


def test_dataset_argument_errors():
    geom = ParallelBeamGeometry((16, 16), 8)
    with pytest.raises(ValueError, match=r"`image_size` \(32, 32\) does not match"):
        EllipsePhantomDataset(2, 32, geom)
    with pytest.raises(ValueError, match="`noise`"):
        EllipsePhantomDataset(2, 16, geom, noise="lots")
    with pytest.raises(ValueError, match="`n_samples`"):
        EllipsePhantomDataset(-1, 16, geom)
    with pytest.raises(ValueError, match="`filter`"):
        EllipsePhantomDataset(2, 16, geom, fbp_filter="box")


def test_digits_dataset_splits_labels_and_masks():
    train = DigitsDataset(16, n_samples=20, noise=0.02)
    test = DigitsDataset(16, split="test")
    full = DigitsDataset(16, split="all", n_samples=3)
    assert len(test) == round(0.2 * 1797) and len(full) == 3
    item = train[0]
    assert item["image"].shape == (1, 16, 16) and item["sinogram"].shape[-2] == 24
    assert item["label"].dtype == torch.int64 and 0 <= int(item["label"]) <= 9
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    with pytest.raises(ValueError, match="`split`"):
        DigitsDataset(16, split="val")


# -------------------------------------------------------------------------------- DICOM
def test_hu_conversion():
    hu = np.array([-1000.0, 0.0, 1000.0, -2000.0])
    mu = hu_to_attenuation(hu, mu_water=0.02)
    np.testing.assert_allclose(mu, [0.0, 0.02, 0.04, 0.0])
    np.testing.assert_allclose(attenuation_to_hu(mu[:3], mu_water=0.02), hu[:3])
    torch.testing.assert_close(hu_to_attenuation(torch.tensor([0.0]), 0.02), torch.tensor([0.02]))
    with pytest.raises(ValueError, match="mu_water"):
        hu_to_attenuation(hu, mu_water=0.0)


def test_dicom_tree_reader_and_dataset(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    src = example_ct_path()
    (tmp_path / "series" / "a").mkdir(parents=True)
    shutil.copy(src, tmp_path / "series" / "a" / "slice_001.dcm")
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array.copy()
    arr[:10] = ds.PixelPaddingValue if "PixelPaddingValue" in ds else arr[:10]
    ds.PixelData = arr.tobytes()
    ds.InstanceNumber = 2
    ds.save_as(tmp_path / "series" / "a" / "IM0002")  # no extension: found by its DICM preamble
    (tmp_path / "series" / "notes.txt").write_text("not dicom")

    files = find_dicom_files(tmp_path)
    assert [f.name for f in files] == ["IM0002", "slice_001.dcm"]
    sl = read_dicom_slice(files[1])
    ref = pydicom.dcmread(src)
    expect = ref.pixel_array * float(ref.RescaleSlope) + float(ref.RescaleIntercept)
    keep = ref.pixel_array != getattr(ref, "PixelPaddingValue", None)
    np.testing.assert_allclose(sl.hu[keep], expect[keep])
    assert sl.pixel_spacing == (float(ref.PixelSpacing[0]), float(ref.PixelSpacing[1]))
    assert np.all(read_dicom_slice(files[0]).hu[:10] == -1000.0)

    geom = ParallelBeamGeometry((32, 32), 12)
    data = DicomSliceDataset(tmp_path, geom)
    item = data[1]
    assert len(data) == 2 and item["image"].shape == (1, 32, 32)
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) < 4  # units of water
    with pytest.raises(ValueError, match="not a readable DICOM"):
        read_dicom_slice(tmp_path / "series" / "notes.txt")


def test_ellipse_phantoms_are_never_empty():
    import numpy as np

    from recon.data.phantoms import ellipse_phantom

    rng = np.random.default_rng(0)
    # with a mean of 0.7 ellipses about half of the raw draws hold no ellipse at all
    for _ in range(40):
        img = ellipse_phantom((16, 16), rng, n_mean=0.7)
        assert float((img > 0).double().mean()) >= 0.01 and float(img.max()) == 1.0


def test_dicom_dataset_warns_when_the_geometry_does_not_match_the_slice(tmp_path):
    import warnings

    pydicom = pytest.importorskip("pydicom")
    src = example_ct_path()
    ref = pydicom.dcmread(src)
    fov = tuple(float(s) * n for s, n in zip(ref.PixelSpacing, ref.pixel_array.shape))
    with pytest.warns(RuntimeWarning, match="physical units"):
        DicomSliceDataset(src, ParallelBeamGeometry((32, 32), 12), unit="1/mm")[0]
    with pytest.warns(RuntimeWarning, match="aspect ratio"):
        DicomSliceDataset(src, ParallelBeamGeometry((32, 32), 12, extent=(fov[0], 2 * fov[1])))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DicomSliceDataset(src, ParallelBeamGeometry((32, 32), 12, extent=fov), unit="1/mm")[0]
