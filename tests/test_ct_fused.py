"""The ``fused`` ray transform (per-ray tables, Triton kernels / torch reference) against the
sparse matrix: values, adjointness, autograd, subsets, coarse grids, Triton's interpreter."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from recon.operators import (FanBeamGeometry, ParallelBeamGeometry, RayTransform, adjointness_test,
                             subset_data)
from recon.operators._fused_backend import FusedProjector, ray_tables, triton_available

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RECON_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ray_cache"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


GEOMETRIES = {
    "parallel": ParallelBeamGeometry((12, 10), 7),
    "parallel-uneven": ParallelBeamGeometry((9, 13), angles=np.array([0.1, 1.0, 2.5, 0.7, np.pi / 4]),
                                            extent=(1.0, 1.7), detector_offset=0.05, n_detectors=15),
    "fan": FanBeamGeometry((11, 12), 9, detector_offset=0.3),
}


def _pair(geom, gen, batch=3, dtype=torch.float64):
    x = torch.randn((batch, 1) + geom.image_shape, generator=gen, dtype=torch.float64)
    y = torch.randn((batch, 1) + geom.range_shape, generator=gen, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_torch_reference_equals_sparse_matrix(name):
    geom = GEOMETRIES[name]
    S, F = RayTransform(geom), RayTransform(geom, method="fused", kernel="torch")
    x, y = _pair(geom, torch.Generator().manual_seed(0))
    torch.testing.assert_close(F(x), S(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.T(y), S.T(y), rtol=1e-12, atol=1e-12)
    # float32: the same matrix up to the rounding of c0 + s c1 (and of the products)
    assert _rel(F(x.float()), S(x)) < 1e-5 and _rel(F.T(y.float()), S.T(y)) < 1e-5


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_fused_adjointness_subsets_and_coarse_grid(name):
    A = RayTransform(GEOMETRIES[name], method="fused")
    assert adjointness_test(A) < 1e-13
    assert adjointness_test(A, dtype=torch.float32) < 1e-6
    for i in range(3):
        assert adjointness_test(A.subset(i, 3)) < 1e-13


def test_fused_subset_slices_tables_and_matches_data_and_sparse():
    geom = ParallelBeamGeometry((10, 10), 10)
    A, S = RayTransform(geom, method="fused"), RayTransform(geom)
    x = torch.rand(2, 1, 10, 10, dtype=torch.float64)
    full = A(x)
    for i in range(4):
        sub = A.subset(i, 4)
        assert sub.method == "fused" and sub.geometry == geom.subset(i, 4)
        torch.testing.assert_close(sub(x), subset_data(full, i, 4), rtol=0, atol=1e-13)
        torch.testing.assert_close(sub(x), S.subset(i, 4)(x), rtol=1e-12, atol=1e-12)
    fresh = ray_tables(geom.subset(1, 4))
    for key, value in A.subset(1, 4)._impl._tables.items():
        torch.testing.assert_close(value, fresh[key], rtol=0, atol=0)


def test_fused_coarse_grid_equals_sparse_coarse_grid():
    geom = ParallelBeamGeometry((16, 16), 6)
    A, S = RayTransform(geom, method="fused").coarsen(2), RayTransform(geom).coarsen(2)
    assert A.method == "fused" and A.domain_shape == (8, 8)
    x, y = _pair(A.geometry, torch.Generator().manual_seed(2))
    torch.testing.assert_close(A(x), S(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A.T(y), S.T(y), rtol=1e-12, atol=1e-12)


def test_fused_gradcheck_backward_is_adjoint():
    A = RayTransform(ParallelBeamGeometry((5, 6), 3), method="fused")
    x = torch.randn(2, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn((2, 1) + A.range_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(A, (x,))
    assert torch.autograd.gradcheck(A.adjoint, (y,))
    assert torch.autograd.gradgradcheck(lambda t: A.T(A(t)) ** 2, (x,))
    g = torch.randn((2, 1) + A.range_shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad((A(x) * g).sum(), x)
    torch.testing.assert_close(grad, A.T(g), rtol=1e-12, atol=1e-12)


def test_step_range_covers_every_sample():
    """Rays that miss the image get an empty range; the rest keep all their non-zero weights."""
    geom = ParallelBeamGeometry((8, 8), angles=np.array([0.0, 0.4, np.pi / 2, 2.9]),
                                n_detectors=30, detector_spacing=0.7)
    tab = ray_tables(geom)
    assert (tab["lo"] <= tab["hi"]).all() and (tab["hi"] <= 8).all() and (tab["lo"] >= 0).all()
    assert (tab["lo"] == tab["hi"]).any()  # the outermost bins miss the 8 x 8 image
    torch.testing.assert_close(RayTransform(geom, method="fused")(torch.ones(8, 8, dtype=torch.float64)),
                               RayTransform(geom, cache=False)(torch.ones(8, 8, dtype=torch.float64)),
                               rtol=1e-12, atol=1e-12)


def test_fused_options_errors_and_pickle():
    geom = ParallelBeamGeometry((8, 8), 4)
    with pytest.raises(ValueError, match="`kernel` must be one of"):
        RayTransform(geom, method="fused", kernel="cuda")
    with pytest.raises(ValueError, match="`kernel`='torch' needs method='fused'"):
        RayTransform(geom, kernel="torch")
    with pytest.raises(ValueError, match="`method`='fused' needs backend='torch'"):
        RayTransform(geom, backend="astra", method="fused")
    A = RayTransform(geom, method="fused", kernel="torch")
    B = pickle.loads(pickle.dumps(A))
    assert B.method == "fused" and B.kernel == "torch" and "kernel='torch'" in repr(B)
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(B(x), A(x), rtol=0, atol=0)
    assert not FusedProjector(geom).uses_triton(x)  # auto: CPU tensors use the reference
    if triton_available():
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            RayTransform(geom, method="fused", kernel="triton")(x)


# ------------------------------------------------------------- Triton's interpreter
@pytest.mark.skipif(not triton_available(), reason="triton not importable")
def test_triton_kernels_in_interpreter_match_sparse_matrix(monkeypatch):
    """The kernels themselves, run on CPU tensors by Triton's interpreter (16², 8 angles)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    geom = ParallelBeamGeometry((16, 16), 8)
    S = RayTransform(geom)
    A = RayTransform(geom, method="fused", kernel="triton")
    assert A._impl.uses_triton(torch.zeros(1))
    gen = torch.Generator().manual_seed(3)
    x, y = _pair(geom, gen, batch=9)  # 9 slices: two batch blocks of 8
    assert _rel(A(x.float()), S(x)) < 1e-5 and _rel(A.T(y.float()), S.T(y)) < 1e-5
    torch.testing.assert_close(A(x), S(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A.T(y), S.T(y), rtol=1e-12, atol=1e-12)
    assert adjointness_test(A, batch=1) < 1e-13
    A._impl.adjoint_kernel = "scatter"
    assert _rel(A.T(y.float()), S.T(y)) < 1e-5
    torch.testing.assert_close(A.T(y), S.T(y), rtol=1e-12, atol=1e-12)
    A._impl.adjoint_kernel = "auto"
    sub = A.subset(1, 3)
    torch.testing.assert_close(sub(x[:2]), S.subset(1, 3)(x[:2]), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not triton_available(), reason="triton not importable")
@pytest.mark.parametrize("seed", range(4))
def test_triton_gather_and_scatter_adjoints_on_random_parallel_geometries(monkeypatch, seed):
    """The gather adjoint's candidate bins never miss a ray (any spacing, offset, extent)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(5, 14, 2))
    geom = ParallelBeamGeometry((h, w), angles=rng.uniform(0, np.pi, 5),
                                detector_spacing=float(rng.uniform(0.3, 2.0)),
                                n_detectors=int(rng.integers(3, 30)),
                                detector_offset=float(rng.normal()),
                                extent=(float(rng.uniform(0.5, 2)) * h, float(rng.uniform(0.5, 2)) * w))
    S = RayTransform(geom, cache=False)
    A = RayTransform(geom, method="fused", kernel="triton")
    assert A._impl._plan is not None
    _, y = _pair(geom, torch.Generator().manual_seed(seed), batch=2)
    torch.testing.assert_close(A.T(y), S.T(y), rtol=1e-12, atol=1e-12)
    A._impl.adjoint_kernel = "scatter"
    torch.testing.assert_close(A.T(y), S.T(y), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not triton_available(), reason="triton not importable")
def test_triton_kernels_in_interpreter_fan_beam(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    geom = GEOMETRIES["fan"]
    x, y = _pair(geom, torch.Generator().manual_seed(4), batch=2)
    A, S = RayTransform(geom, method="fused", kernel="triton"), RayTransform(geom)
    assert A._impl._plan is None  # rays of one fan angle are not parallel: scatter adjoint
    torch.testing.assert_close(A(x), S(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A.T(y), S.T(y), rtol=1e-12, atol=1e-12)
    A._impl.adjoint_kernel = "gather"
    with pytest.raises(ValueError, match="`adjoint_kernel`='gather' needs parallel rays"):
        A.T(y)


# ------------------------------------------------------------------------- CUDA only
@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and triton_available()), reason="needs CUDA and triton")
@pytest.mark.parametrize("batch", [1, 8, 11])
def test_cuda_kernels_match_sparse_matrix(batch):
    geom = ParallelBeamGeometry((64, 64), 30)
    S = RayTransform(geom)
    A = RayTransform(geom, method="fused")
    x, y = _pair(geom, torch.Generator().manual_seed(5), batch=batch)
    assert A._impl.uses_triton(x.cuda())
    assert _rel(A(x.float().cuda()).cpu(), S(x)) < 1e-5
    assert _rel(A.T(y.float().cuda()).cpu(), S.T(y)) < 1e-5
    torch.testing.assert_close(A(x.cuda()).cpu(), S(x), rtol=1e-11, atol=1e-11)
    assert adjointness_test(A, device="cuda", dtype=torch.float32) < 1e-6
    gather = A.T(y.cuda())
    torch.testing.assert_close(gather.cpu(), S.T(y), rtol=1e-11, atol=1e-11)
    assert torch.equal(A.T(y.cuda()), gather)  # the gather adjoint is deterministic
    A._impl.adjoint_kernel = "scatter"
    torch.testing.assert_close(A.T(y.cuda()).cpu(), S.T(y), rtol=1e-11, atol=1e-11)


def test_float32_agreement_at_128_squared():
    """Sample positions in float64: float32 results as close to the matrix as its own rounding."""
    geom = ParallelBeamGeometry((128, 128), 60)
    S, A = RayTransform(geom), RayTransform(geom, method="fused", kernel="torch")
    x, y = _pair(geom, torch.Generator().manual_seed(6), batch=2)
    x, y = x.abs(), y.abs()
    exact_fwd, exact_adj = S(x), S.T(y)
    fused_err = max(_rel(A(x.float()), exact_fwd), _rel(A.T(y.float()), exact_adj))
    sparse_err = max(_rel(S(x.float()), exact_fwd), _rel(S.T(y.float()), exact_adj))
    assert fused_err < 1e-6 and fused_err < 2 * sparse_err
    assert _rel(A(x.float()), S(x.float())) < 1e-5 and _rel(A.T(y.float()), S.T(y.float())) < 1e-5


def _sm90_compile(fn, signature: dict, constexprs: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=triton.jit(fn), signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32))


@pytest.mark.skipif(not triton_available(), reason="triton not importable")
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_triton_kernels_compile_to_sm90_cubin_without_a_gpu(dtype):
    """Ahead-of-time compilation for an H100/H200 (sm_90): catches what the interpreter lets
    through (types, loop-carried values, constexpr use)."""
    pytest.importorskip("triton.backends.nvidia")
    from recon.operators import _fused_triton as K

    rays = {"c0_ptr": "*fp64", "c1_ptr": "*fp64", "len_ptr": f"*{dtype}"}
    march = {**rays, "col_ptr": "*i32", "blo_ptr": "*i32", "bhi_ptr": "*i32", "N": "i32",
             "n_det": "i32", "H": "i32", "W": "i32", "BLOCK_B": "constexpr",
             "BLOCK_D": "constexpr"}
    for fn, io in ((K._project, ("src", "out")), (K._backproject, ("y", "dst"))):
        for block_b in (1, 8):
            sig = {io[0]: f"*{dtype}", io[1]: f"*{dtype}", **march}
            assert "cubin" in _sm90_compile(fn, sig, {"BLOCK_B": block_b, "BLOCK_D": 64}).asm
    sig = {"y": f"*{dtype}", "out": f"*{dtype}", **rays, "alpha_ptr": "*fp64",
           "beta_ptr": "*fp64", "slope_ptr": "*fp64", "col_ptr": "*i32", "N": "i32",
           "n_angles": "i32", "n_det": "i32", "H": "i32", "W": "i32", "BLOCK_B": "constexpr",
           "BLOCK_P": "constexpr", "NCAND": "constexpr"}
    kernel = _sm90_compile(K._backproject_gather, sig, {"BLOCK_B": 8, "BLOCK_P": 128, "NCAND": 6})
    assert "cubin" in kernel.asm


@pytest.mark.skipif(not triton_available(), reason="triton not importable")
def test_sketched_lspd_through_interpreted_kernels_equals_torch_reference(monkeypatch):
    """Subsets and the coarse grid of a sketched LSPD through the kernels themselves."""
    from recon.models import SketchedLSPD

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    geom = ParallelBeamGeometry((16, 16), 8)
    y = RayTransform(geom)(torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(7)))
    outs = []
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        op = RayTransform(geom, method="fused", kernel=kernel)
        net = SketchedLSPD(op, 3, n_subsets=2, n_unsketched=1, hidden_channels=4, n_primal=2,
                           n_dual=2, operator_norm=1.0).eval()
        with torch.no_grad():
            outs.append(net(y))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not triton_available(), reason="triton not importable")
def test_custom_ops_pass_opcheck(monkeypatch):
    """Schema, fake (meta) implementations and AOT dispatch of the three custom operators."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from recon.operators import _fused_triton as K
    from recon.operators._fused_backend import _two_layers

    geom = ParallelBeamGeometry((8, 8), 4)
    proj = FusedProjector(geom, kernel="triton")
    x, y = _pair(geom, torch.Generator().manual_seed(8), batch=2)
    x, y = x[:, 0], y[:, 0]
    args = proj._kernel_args(x)
    n_det = geom.n_detectors
    cases = [(K.project_op, (_two_layers(x), *args, 8, 8, 4, n_det, 64)),
             (K.backproject_op, (y, *args, 8, 8, 64)),
             (K.backproject_gather_op, (y, *args[:3], *proj._device_plan("cpu"), 8, 8,
                                        proj._plan[1], 128))]
    for op, op_args in cases:
        result = torch.library.opcheck(op, op_args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)
