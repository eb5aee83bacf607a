"""Ray transform: adjointness, autograd, analytic projections, subsets, coarse grids, caching,
backend agreement and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from recon.operators import (FanBeamGeometry, ParallelBeamGeometry, RayTransform, available_backends,
                             subset_data)
from recon.operators import _torch_backend

HAS_ASTRA = "astra" in available_backends()
HAS_ODL = "odl" in available_backends()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RECON_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ray_cache"))


def _geometries():
    return [
        ParallelBeamGeometry((12, 10), 7),
        ParallelBeamGeometry((9, 13), angles=np.array([0.1, 1.0, 2.5, 0.7]), extent=(1.0, 1.7),
                             detector_offset=0.05, n_detectors=15),
        FanBeamGeometry((11, 12), 9, detector_offset=0.3),
    ]


def _inner_error(A, gen, batch=(2, 3)):
    x = torch.randn(batch + A.domain_shape, generator=gen, dtype=torch.float64)
    y = torch.randn(batch + A.range_shape, generator=gen, dtype=torch.float64)
    lhs = float((A(x) * y).sum())
    rhs = float((x * A.T(y)).sum())
    return abs(lhs - rhs) / abs(lhs)


# ------------------------------------------------------------------------ adjointness
@pytest.mark.parametrize("method", ["sparse", "matrix_free"])
@pytest.mark.parametrize("geom", _geometries(), ids=["parallel", "parallel-uneven", "fan"])
def test_adjoint_is_exact_in_float64(geom, method):
    gen = torch.Generator().manual_seed(0)
    A = RayTransform(geom, method=method)
    assert _inner_error(A, gen) < 1e-10
    for i in range(3):
        assert _inner_error(A.subset(i, 3), gen) < 1e-10


@settings(max_examples=15, deadline=None)
@given(h=st.integers(3, 16), w=st.integers(3, 16), n_angles=st.integers(1, 9),
       n_det=st.integers(1, 25), fan=st.booleans(), seed=st.integers(0, 2**16))
def test_adjoint_is_exact_for_random_geometries(h, w, n_angles, n_det, fan, seed):
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0, 2 * np.pi, n_angles)
    if fan:
        geom = FanBeamGeometry((h, w), angles=angles, n_detectors=n_det, detector_offset=rng.normal())
    else:
        geom = ParallelBeamGeometry((h, w), angles=angles, n_detectors=n_det,
                                    detector_spacing=rng.uniform(0.3, 2.0))
    A = RayTransform(geom, cache=False)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((2,) + A.domain_shape, generator=gen, dtype=torch.float64)
    y = torch.randn((2,) + A.range_shape, generator=gen, dtype=torch.float64)
    lhs, rhs = float((A(x) * y).sum()), float((x * A.T(y)).sum())
    assert abs(lhs - rhs) <= 1e-10 * max(abs(lhs), float(A(x).abs().sum() * y.abs().max()), 1e-300)


@pytest.mark.parametrize("geom", _geometries(), ids=["parallel", "parallel-uneven", "fan"])
def test_matrix_free_equals_sparse(geom):
    gen = torch.Generator().manual_seed(1)
    S, M = RayTransform(geom), RayTransform(geom, method="matrix_free")
    x = torch.randn((2, 1) + geom.image_shape, generator=gen, dtype=torch.float64)
    y = torch.randn((2, 1) + geom.range_shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(M(x), S(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(M.T(y), S.T(y), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("method", ["sparse", "matrix_free"])
def test_gradcheck_forward_and_adjoint(method):
    A = RayTransform(ParallelBeamGeometry((5, 6), 3), method=method)
    x = torch.randn(2, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn((2, 1) + A.range_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(A, (x,))
    assert torch.autograd.gradcheck(A.adjoint, (y,))
    assert torch.autograd.gradgradcheck(lambda t: A.T(A(t)) ** 2, (x,))


def test_gradient_of_forward_is_adjoint_and_double_backward_works():
    A = RayTransform(FanBeamGeometry((8, 8), 6))
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn((3, 2) + A.range_shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad((A(x) * g).sum(), x, create_graph=True)
    torch.testing.assert_close(grad, A.T(g), rtol=1e-12, atol=1e-12)
    # Hessian-vector product of ||A^T A x||^2 / 2, i.e. (A^T A)^2 v, by double backward
    v = torch.randn_like(x)
    loss = 0.5 * (A.T(A(x)) ** 2).sum()
    (g1,) = torch.autograd.grad(loss, x, create_graph=True)
    (g2,) = torch.autograd.grad((g1 * v).sum(), x)
    torch.testing.assert_close(g2, A.T(A(A.T(A(v)))), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------- analytic checks
def _disk(n: int, r: float, supersample: int = 4) -> torch.Tensor:
    """Area fraction of each pixel inside the centred disk of radius r; image is [-1, 1]^2."""
    m = n * supersample
    c = -1 + (torch.arange(m, dtype=torch.float64) + 0.5) * 2 / m
    inside = (c[None, :] ** 2 + c[:, None] ** 2 <= r * r).to(torch.float64)
    return F.avg_pool2d(inside[None, None], supersample)[0, 0]


def test_disk_projection_matches_chord_length_and_improves_with_resolution():
    r = 0.6
    errors = []
    for n in (16, 32, 64):
        geom = ParallelBeamGeometry((n, n), angles=np.array([0.0, 0.3, np.pi / 4, 2.0]), extent=2.0,
                                    detector_spacing=0.05, n_detectors=57)
        sino = RayTransform(geom, cache=False)(_disk(n, r))
        s = torch.as_tensor(geom.detector_positions())
        chord = 2 * torch.sqrt((r * r - s**2).clamp_min(0))
        inner = s.abs() < 0.95 * r
        errors.append(float((sino[:, inner] - chord[inner]).abs().mean()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[-1] < 0.005 * 2 * r


def test_fan_beam_projection_of_disk_matches_chord_length():
    r, n = 0.5, 64
    geom = FanBeamGeometry((n, n), 8, extent=2.0, source_radius=3.0, detector_radius=2.0)
    sino = RayTransform(geom, cache=False)(_disk(n, r))
    p, d = geom.rays()
    dist = (p[..., 0] * d[..., 1] - p[..., 1] * d[..., 0]).abs()  # distance of ray to the centre
    chord = 2 * torch.sqrt((r * r - dist**2).clamp_min(0))
    inner = dist < 0.95 * r
    assert float((sino[inner] - chord[inner]).abs().mean()) < 0.01 * 2 * r


# -------------------------------------------------------------------------- API shapes
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["sparse", "matrix_free"])
def test_shapes_dtype_device(device, dtype, method):
    geom = ParallelBeamGeometry(image_shape=(16, 16), n_angles=10)
    A = RayTransform(geom, method=method)
    assert geom.n_detectors == math.ceil(math.sqrt(2) * 16)
    assert A.domain_shape == (16, 16) and A.range_shape == (10, geom.n_detectors)
    assert A.geometry is geom and A.T.T is A and A.T is A.T
    x = torch.rand(3, 2, 16, 16, dtype=dtype, device=device)
    y = A(x)
    assert y.shape == (3, 2, 10, geom.n_detectors) and y.dtype == dtype and y.device == x.device
    assert torch.equal(A.forward(x), y) and torch.equal(A.T(y), A.adjoint(y))
    assert A.T(y).shape == x.shape and A.T(y).dtype == dtype
    cpu = RayTransform(geom)(x.cpu().double())
    torch.testing.assert_close(y.cpu().double(), cpu, rtol=1e-5, atol=1e-4)
    assert A(x[0, 0]).shape == (10, geom.n_detectors)  # leading dims are optional


def test_defaults_and_angles():
    geom = ParallelBeamGeometry((8, 8), 4)
    np.testing.assert_allclose(geom.angles, np.arange(4) * np.pi / 4)
    np.testing.assert_allclose(geom.angle_weights(), np.full(4, np.pi / 4))
    fan = FanBeamGeometry((8, 8), 4)
    np.testing.assert_allclose(fan.angles, np.arange(4) * np.pi / 2)
    assert fan.source_radius > 0.5 * math.hypot(8, 8)
    assert geom == ParallelBeamGeometry((8, 8), angles=np.arange(4) * np.pi / 4)
    assert geom != ParallelBeamGeometry((8, 8), 5) and geom.cache_key() != fan.cache_key()


def test_subset_matches_subset_data():
    geom = ParallelBeamGeometry((10, 10), 10)
    x = torch.rand(2, 1, 10, 10, dtype=torch.float64)
    fresh = RayTransform(geom, cache=False).subset(1, 4)  # built from its own geometry
    A = RayTransform(geom)
    full = A(x)
    for i in range(4):
        sub = A.subset(i, 4)  # sliced from A's matrix
        np.testing.assert_allclose(sub.geometry.angles, geom.angles[i::4])
        torch.testing.assert_close(sub(x), subset_data(full, i, 4), rtol=0, atol=1e-13)
    torch.testing.assert_close(fresh(x), full[..., 1::4, :], rtol=0, atol=1e-13)
    assert subset_data(full, 1, 4).shape[-2] == 3


def test_coarsened_operator_approximates_fine_one():
    geom = ParallelBeamGeometry((64, 64), 12)
    A = RayTransform(geom)
    Ac = A.coarsen(2)
    assert Ac.domain_shape == (32, 32) and Ac.range_shape == A.range_shape
    assert Ac.geometry.extent == geom.extent
    c = -1 + (torch.arange(64, dtype=torch.float64) + 0.5) / 32
    x = torch.exp(-((c[None, :] - 0.2) ** 2 + c[:, None] ** 2) / 0.1)[None, None]
    fine, coarse = A(x), Ac(F.avg_pool2d(x, 2))
    assert float((coarse - fine).norm() / fine.norm()) < 0.02


def test_norm_is_largest_singular_value_and_cached():
    geom = ParallelBeamGeometry((8, 7), 5)
    A = RayTransform(geom)
    eye = torch.eye(56, dtype=torch.float64).reshape(56, 8, 7)
    dense = A(eye).reshape(56, -1).T
    expect = float(torch.linalg.matrix_norm(dense, ord=2))
    assert abs(A.norm() - expect) < 1e-5 * expect
    assert A._norm == A.norm() and A.T.norm() == A.norm()  # cached


def test_pickle_and_deepcopy():
    import copy
    import pickle

    A = RayTransform(ParallelBeamGeometry((8, 8), 4))
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    B = pickle.loads(pickle.dumps(A))
    assert B.geometry == A.geometry and B.method == A.method
    torch.testing.assert_close(B(x), A(x))
    assert copy.deepcopy(A) is A


# ---------------------------------------------------------------------------- caching
def test_disk_cache_roundtrip_and_corrupt_file(tmp_path, caplog):
    geom = ParallelBeamGeometry((9, 9), 5)
    x = torch.rand(1, 1, 9, 9, dtype=torch.float64)
    ref = RayTransform(geom, cache=tmp_path)(x)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    _torch_backend._MEMORY_CACHE.clear()
    torch.testing.assert_close(RayTransform(geom, cache=tmp_path)(x), ref, rtol=0, atol=0)
    files[0].write_bytes(b"not a zip file")
    _torch_backend._MEMORY_CACHE.clear()
    torch.testing.assert_close(RayTransform(geom, cache=tmp_path)(x), ref, rtol=0, atol=0)
    assert "is invalid" in caplog.text


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_value_errors_naming_the_argument():
    A = RayTransform(ParallelBeamGeometry((8, 8), 4))
    with pytest.raises(ValueError, match=r"`x` has shape \(2, 1, 8, 9\).*\(\.\.\., 8, 8\)"):
        A(torch.zeros(2, 1, 8, 9))
    with pytest.raises(ValueError, match=r"`y` has shape"):
        A.adjoint(torch.zeros(2, 1, 8, 8))
    bad = torch.zeros(1, 1, 8, 8)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="`x` contains 1 NaN"):
        A(bad)
    with pytest.raises(ValueError, match="`x` must be float32 or float64.*int64"):
        A(torch.zeros(1, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="`backend`.*'cuda'"):
        RayTransform(A.geometry, backend="cuda")
    with pytest.raises(ValueError, match="`method`"):
        RayTransform(A.geometry, method="dense")
    with pytest.raises(ValueError, match="`i` must be an int in"):
        A.subset(4, 3)
    with pytest.raises(ValueError, match="`m` must be a positive int"):
        subset_data(torch.zeros(4, 5), 0, 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_shape=(8, 0), n_angles=3), "image_shape"),
    (dict(image_shape=(8, 8), n_angles=0), "n_angles"),
    (dict(image_shape=(8, 8)), "n_angles"),
    (dict(image_shape=(8, 8), angles=[0.0, float("nan")]), "angles"),
    (dict(image_shape=(8, 8), n_angles=3, extent=-1.0), "extent"),
    (dict(image_shape=(8, 8), n_angles=3, detector_spacing=0.0), "detector_spacing"),
    (dict(image_shape=(8, 8), n_angles=3, n_detectors=0), "n_detectors"),
])
def test_bad_geometry_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelBeamGeometry(**kwargs)


def test_fan_source_inside_image_is_rejected():
    with pytest.raises(ValueError, match="source_radius"):
        FanBeamGeometry((8, 8), 4, source_radius=3.0)
    with pytest.raises(ValueError, match="factor"):
        ParallelBeamGeometry((8, 8), 4).coarsen(16)


# --------------------------------------------------------------------- other backends
@pytest.mark.skipif(not HAS_ASTRA, reason="astra-toolbox not importable")
@pytest.mark.parametrize("geom", [ParallelBeamGeometry((20, 24), 7, extent=(1.0, 1.2), detector_offset=0.03),
                                  ParallelBeamGeometry((16, 16), angles=np.array([2.0, 0.1, 1.0]))])
def test_astra_parallel_equals_torch_joseph(geom):
    x = torch.rand(2, 1, *geom.image_shape, generator=torch.Generator().manual_seed(0))
    T, S = RayTransform(geom), RayTransform(geom, backend="astra")
    torch.testing.assert_close(S(x), T(x), rtol=1e-4, atol=1e-4 * float(T(x).abs().max()))
    y = T(x)
    torch.testing.assert_close(S.T(y), T.T(y), rtol=1e-4, atol=1e-4 * float(T.T(y).abs().max()))
    xg = x.clone().requires_grad_(True)
    S(xg).sum().backward()
    torch.testing.assert_close(xg.grad, S.T(torch.ones_like(y)))


@pytest.mark.skipif(not HAS_ODL, reason="ODL not importable")
def test_odl_rejects_parallel_detector_offset():
    with pytest.raises(ValueError, match="detector_offset=0.03"):
        RayTransform(ParallelBeamGeometry((8, 8), 4, detector_offset=0.03), backend="odl")


@pytest.mark.skipif(not HAS_ODL, reason="ODL not importable")
@pytest.mark.parametrize("geom", [ParallelBeamGeometry((20, 24), 7, extent=(1.0, 1.2)),
                                  FanBeamGeometry((16, 16), 9, detector_offset=0.5)])
def test_odl_matches_astra_and_torch(geom):
    x = torch.rand(2, 1, *geom.image_shape, generator=torch.Generator().manual_seed(0))
    O = RayTransform(geom, backend="odl")
    T = RayTransform(geom)
    y = T(x)
    if HAS_ASTRA:  # same ASTRA projector underneath, so equal to float32 precision
        S = RayTransform(geom, backend="astra")
        torch.testing.assert_close(O(x), S(x), rtol=1e-4, atol=1e-4 * float(y.abs().max()))
        torch.testing.assert_close(O.T(y), S.T(y), rtol=1e-4, atol=1e-4 * float(S.T(y).abs().max()))
    # Euclidean adjoint on the ODL backend (weights rescaled)
    yr = torch.rand(y.shape, generator=torch.Generator().manual_seed(1))
    lhs, rhs = float((O(x).double() * yr).sum()), float((x.double() * O.T(yr).double()).sum())
    assert abs(lhs - rhs) < 1e-4 * abs(lhs)
    if isinstance(geom, ParallelBeamGeometry):
        torch.testing.assert_close(O(x), y, rtol=1e-4, atol=1e-4 * float(y.abs().max()))
    else:  # ASTRA's fan projector is the line model, not Joseph: a few % apart on noise images
        assert float((O(x) - y).norm() / y.norm()) < 0.05
