"""Filtered back projection: accuracy, filters, subsets, fan beam, and agreement with ODL/ASTRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.data.phantoms import ellipse_phantom, shepp_logan
from recon.metrics import psnr
from recon.operators import (FILTERS, FanBeamGeometry, ParallelBeamGeometry, RayTransform,
                             available_backends, fbp, subset_data)
from recon.operators.fbp import filter_response

HAS_ASTRA = "astra" in available_backends()
HAS_ODL = "odl" in available_backends()


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RECON_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ray_cache"))


def _phantoms(n, size, seed=0):
    return torch.stack([ellipse_phantom((size, size), np.random.default_rng([seed, i]), 30, interior=True)
                        for i in range(n)])[:, None]


def test_filter_response_approximates_ramp_and_windows():
    n, ds = 256, 0.5
    nu = np.fft.rfftfreq(n, d=ds)
    ramp = filter_response(n, ds)
    assert 0 < ramp[0] < nu[1]  # small DC gain (Kak-Slaney), close to |nu| elsewhere
    np.testing.assert_allclose(ramp[8:100], nu[8:100], rtol=0.03)
    for name in FILTERS:
        r = filter_response(n, ds, name, 0.5)
        assert np.all(r[nu > 0.5 * nu.max() + 1e-12] == 0) and np.all(r <= ramp + 1e-12)


def test_parallel_fbp_reconstructs_phantom_without_bias():
    A = RayTransform(ParallelBeamGeometry((64, 64), 180))
    x = shepp_logan((64, 64))[None, None]
    rec = fbp(A(x), A, "ram-lak")
    assert rec.shape == x.shape
    assert float(psnr(rec, x, data_range=1.0)) > 21
    assert abs(float(rec.mean() - x.mean())) < 0.01 * float(x.mean())
    # a smoother filter trades resolution for noise: lower high-frequency energy
    hann = fbp(A(x), A, "hann", 0.8)
    hf = lambda t: float(torch.fft.rfft2(t)[..., 16:, 16:].abs().sum())  # noqa: E731
    assert hf(hann) < hf(rec)


def test_fbp_of_angle_subset_uses_subset_weights():
    A = RayTransform(ParallelBeamGeometry((48, 48), 120))
    x = shepp_logan((48, 48))[None, None]
    y = A(x)
    full = fbp(y, A)
    sub = fbp(subset_data(y, 0, 2), A.subset(0, 2))
    assert abs(float(sub.mean() - full.mean())) < 0.01 * float(full.mean())
    assert float(psnr(sub, x, 1.0)) > float(psnr(full, x, 1.0)) - 1.5


def test_fan_beam_fbp_reconstructs_phantom():
    A = RayTransform(FanBeamGeometry((64, 64), 240))
    x = shepp_logan((64, 64))[None, None]
    rec = fbp(A(x), A, "hann", 0.9)
    assert float(psnr(rec, x, data_range=1.0)) > 17
    assert abs(float(rec.mean() - x.mean())) < 0.02 * float(x.mean())


def test_fbp_accepts_geometry_and_method_and_is_differentiable():
    geom = ParallelBeamGeometry((6, 6), 5)
    A = RayTransform(geom)
    y = torch.rand(1, 1, *geom.range_shape, dtype=torch.float64)
    torch.testing.assert_close(fbp(y, geom), fbp(y, A))
    yr = y.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fbp(t, A, "shepp-logan"), (yr,))


def test_fbp_bad_arguments():
    A = RayTransform(ParallelBeamGeometry((8, 8), 4))
    y = torch.zeros(1, 1, *A.range_shape)
    with pytest.raises(ValueError, match="`filter`.*'butterworth'"):
        fbp(y, A, filter="butterworth")
    with pytest.raises(ValueError, match="`frequency_scaling`.*1.5"):
        fbp(y, A, frequency_scaling=1.5)
    with pytest.raises(ValueError, match=r"`sinogram` has shape \(1, 1, 5, 12\)"):
        fbp(torch.zeros(1, 1, 5, 12), A)


@pytest.mark.skipif(not HAS_ODL, reason="ODL not importable")
@pytest.mark.parametrize("filt, scaling", [("ram-lak", 1.0), ("shepp-logan", 1.0), ("hann", 0.8)])
def test_torch_fbp_within_half_db_of_odl_fbp_op(filt, scaling):
    from odl.applications.tomo import fbp_op

    from recon.operators._odl_backend import from_odl, odl_operator, _values

    names = {"ram-lak": "Ram-Lak", "shepp-logan": "Shepp-Logan", "hann": "Hann"}
    geom = ParallelBeamGeometry((96, 96), 60)
    A = RayTransform(geom)
    odl_op, _ = odl_operator(geom)
    odl_fbp = fbp_op(odl_op, filter_type=names[filt], frequency_scaling=scaling)
    x = _phantoms(3, 96)
    y = A(x)
    ours = fbp(y, A, filt, scaling)
    ref = torch.stack([torch.from_numpy(from_odl(_values(odl_fbp(odl_op.range.element(y[i, 0].numpy())))))
                       for i in range(3)])[:, None]
    gap = (psnr(ours, x, 1.0) - psnr(ref, x, 1.0)).abs()
    assert float(gap.max()) < 0.5, gap


@pytest.mark.skipif(not HAS_ASTRA, reason="astra-toolbox not importable")
def test_fbp_on_astra_backend_within_half_db_of_torch():
    geom = ParallelBeamGeometry((64, 64), 45)
    T, S = RayTransform(geom), RayTransform(geom, backend="astra")
    x = _phantoms(2, 64, seed=3)
    y = T(x)
    gap = (psnr(fbp(y, T, "hann"), x, 1.0) - psnr(fbp(S(x), S, "hann"), x, 1.0)).abs()
    assert float(gap.max()) < 0.5


@pytest.mark.skipif(not HAS_ODL, reason="ODL not importable")
def test_fan_fbp_within_half_db_of_odl():
    from odl.applications.tomo import fbp_op

    from recon.operators._odl_backend import from_odl, odl_operator, _values

    geom = FanBeamGeometry((64, 64), 180)
    A = RayTransform(geom)
    odl_op, _ = odl_operator(geom)
    x = shepp_logan((64, 64))[None, None].float()
    y = A(x)
    ref = torch.from_numpy(from_odl(_values(fbp_op(odl_op, filter_type="Hann", frequency_scaling=0.9)(
        odl_op.range.element(y[0, 0].numpy())))))
    gap = abs(float(psnr(fbp(y, A, "hann", 0.9)[0, 0], x[0, 0], 1.0) - psnr(ref, x[0, 0], 1.0)))
    assert gap < 0.5
