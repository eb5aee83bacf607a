"""Tests of the learned primal-dual family (LPD, LSPD, sketched LSPD)."""

from __future__ import annotations

import pytest
import torch

from _dense_operator import DenseRayTransform, dense_fbp, parallel_angles
from recon.models import (LSPD, MODELS, LearnedPrimalDual, ResidualConvBlock, SketchedLSPD,
                          UnrolledPrimalDual, build_model)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def op():
    return DenseRayTransform((16, 16), parallel_angles(12))


def _small(cls, op, **kw):
    # random last layers: from a zero start every block would then return its input
    params = dict(n_iterations=4, hidden_channels=8, n_primal=3, n_dual=3, init="zero",
                  zero_last=False)
    if cls is SketchedLSPD:
        params["n_unsketched"] = 2
    return cls(op, **{**params, **kw})


def _data(op, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 1, *op.domain_shape, generator=g)
    return op(image), image


class CountingOperator(DenseRayTransform):
    """Dense operator that counts forward/adjoint calls per grid size (shared counter)."""

    def __init__(self, *args, counts=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts = counts if counts is not None else {}

    def _count(self, kind):
        key = (kind, self.image_shape, self.range_shape[0])
        self.counts[key] = self.counts.get(key, 0) + 1

    def forward(self, x):
        self._count("fwd")
        return super().forward(x)

    __call__ = forward

    def adjoint(self, y):
        self._count("adj")
        return super().adjoint(y)

    def subset(self, i, m):
        return CountingOperator(self.image_shape, self.angles[i::m], self.n_det,
                                self.det_spacing, counts=self.counts)

    def coarsen(self, factor):
        h, w = self.image_shape
        return CountingOperator((h // factor, w // factor), self.angles, self.n_det,
                                self.det_spacing, counts=self.counts)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", [LearnedPrimalDual, LSPD, SketchedLSPD])
def test_shapes_and_dtypes(op, cls, dtype, device):
    model = _small(cls, op).to(device=device, dtype=dtype)
    y, _ = _data(op)
    out = model(y.to(device=device, dtype=dtype))
    assert out.shape == (2, 1, 16, 16)
    assert out.dtype == dtype and out.device.type == device
    assert torch.isfinite(out).all()


def test_block_is_residual():
    block = ResidualConvBlock(3, 2, hidden_channels=4, kernel_size=5, zero_last=True)
    u, e = torch.randn(2, 3, 7, 9), torch.randn(2, 2, 7, 9)
    assert torch.equal(block(u, e), u)
    with pytest.raises(ValueError, match="kernel_size"):
        ResidualConvBlock(3, 2, kernel_size=4)


def test_zero_last_starts_at_initial_guess(op):
    model = _small(LSPD, op, zero_last=True)
    y, image = _data(op)
    x0 = dense_fbp(y, op)
    assert torch.allclose(model(y, x0=x0), x0)


def test_sketch_residual_keeps_fine_detail(op):
    """Identity blocks: the residual exit returns x0, the literal option 2 returns U(S(x0))."""
    y, _ = _data(op)
    x0 = dense_fbp(y, op)
    residual = _small(SketchedLSPD, op, zero_last=True)
    literal = _small(SketchedLSPD, op, zero_last=True, sketch_residual=False)
    assert torch.allclose(residual(y, x0=x0), x0, atol=1e-6)
    blurred = torch.nn.functional.interpolate(
        torch.nn.functional.interpolate(x0, size=(8, 8), mode="bilinear"), size=(16, 16),
        mode="bilinear")
    assert torch.allclose(literal(y, x0=x0), blurred, atol=1e-6)


# ----------------------------------------------------------------------------- equivalences
def test_lspd_with_one_subset_is_lpd(op):
    torch.manual_seed(0)
    lpd = _small(LearnedPrimalDual, op)
    lspd = _small(LSPD, op, n_subsets=1)
    lspd.load_state_dict(lpd.state_dict())
    y, image = _data(op)
    x0 = dense_fbp(y, op)
    out_lpd, out_lspd = lpd(y, x0=x0), lspd(y, x0=x0)
    assert torch.equal(out_lpd, out_lspd)
    # same gradients too
    out_lpd.square().mean().backward()
    out_lspd.square().mean().backward()
    for (name, a), (_, b) in zip(lpd.named_parameters(), lspd.named_parameters()):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("order", ["cyclic", "random"])
def test_sketched_without_sketched_layers_is_lspd(op, order):
    torch.manual_seed(1)
    lspd = _small(LSPD, op, n_subsets=3, subset_order=order)
    sk = _small(SketchedLSPD, op, n_subsets=3, subset_order=order, n_unsketched=4)
    sk.load_state_dict(lspd.state_dict())
    y, _ = _data(op)
    lspd.eval(), sk.eval()
    assert torch.equal(lspd(y), sk(y))


def test_sketch_hidden_channels_narrows_only_the_sketched_layers(op):
    sk = _small(SketchedLSPD, op, n_subsets=3, sketch_hidden_channels=4)
    widths = [block.net[0].out_channels for block in sk.primal_blocks]
    assert widths == [4, 4, 8, 8]
    assert [block.net[0].out_channels for block in sk.dual_blocks] == widths
    y, _ = _data(op)
    assert sk(y).shape == (2, 1, *op.domain_shape)
    with pytest.raises(ValueError, match="sketch_hidden_channels"):
        LSPD(op, sketch_hidden_channels=4)
    # with no sketched layer the width option has nothing to act on: still exactly LSPD
    torch.manual_seed(1)
    lspd = _small(LSPD, op, n_subsets=3)
    full = _small(SketchedLSPD, op, n_subsets=3, n_unsketched=4, sketch_hidden_channels=4)
    full.load_state_dict(lspd.state_dict())
    lspd.eval(), full.eval()
    assert torch.equal(lspd(y), full(y))


def test_lspd_uses_one_subset_per_layer_in_cyclic_order():
    counts = {}
    op = CountingOperator((16, 16), parallel_angles(12), counts=counts)
    model = _small(LSPD, op, n_subsets=4, n_iterations=6)
    y = _data(op)[0]
    counts.clear()
    model(y)
    # 6 layers, 4 subsets of 3 angles each: one forward and one adjoint per layer
    assert counts == {("fwd", (16, 16), 3): 6, ("adj", (16, 16), 3): 6}
    assert model.subset_schedule == [0, 1, 2, 3, 0, 1]


def test_sketched_layers_use_coarse_operator():
    counts = {}
    op = CountingOperator((16, 16), parallel_angles(12), counts=counts)
    model = _small(SketchedLSPD, op, n_subsets=2, n_iterations=5, n_unsketched=2)
    y = _data(op)[0]
    counts.clear()
    model(y)
    assert counts == {("fwd", (8, 8), 6): 3, ("adj", (8, 8), 6): 3,
                      ("fwd", (16, 16), 6): 2, ("adj", (16, 16), 6): 2}
    assert model.coarse_shape == (8, 8)


def test_all_layers_sketched_returns_fine_image(op):
    model = _small(SketchedLSPD, op, n_unsketched=0)
    assert model(_data(op)[0]).shape == (2, 1, 16, 16)


def test_coarse_backprojection_scale_matches_fine(op):
    """``ρ A_sᵀ h`` approximates ``S(Aᵀ h)`` for smooth ``h`` (ρ = 1/4 for factor 2)."""
    model = _small(SketchedLSPD, op, n_subsets=1)
    coarse = model._coarse_ops[0]
    h = torch.ones(1, 1, *op.range_shape)
    fine = torch.nn.functional.avg_pool2d(op.adjoint(h), 2)
    approx = coarse.adjoint(h) * model._coarse_scale
    center = (slice(None), slice(None), slice(2, 6), slice(2, 6))
    assert torch.allclose(approx[center], fine[center], rtol=0.1)


def test_uneven_subsets_are_padded():
    op = DenseRayTransform((16, 16), parallel_angles(10))
    model = _small(LSPD, op, n_subsets=4)  # subsets of 3, 3, 2, 2 angles
    y, image = _data(op)
    out = model(y)
    out.mean().backward()
    assert out.shape == image.shape
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_random_order_is_random_in_training_and_fixed_in_eval(op):
    model = _small(LSPD, op, n_subsets=4, subset_order="random", n_iterations=8, seed=3)
    y, _ = _data(op)
    model.eval()
    assert torch.equal(model(y), model(y))
    model.train()
    torch.manual_seed(0)
    a = model(y)
    torch.manual_seed(1)
    b = model(y)
    assert not torch.equal(a, b)


def test_every_parameter_gets_a_gradient(op):
    model = _small(SketchedLSPD, op)
    y, image = _data(op)
    torch.nn.functional.mse_loss(model(y), image).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.sigma.shape == model.tau.shape == (4,)


# ----------------------------------------------------------------------------- configuration
def test_presets():
    assert LearnedPrimalDual.default_parameters("digits") == dict(
        n_iterations=5, kernel_size=3, hidden_channels=32)
    assert LearnedPrimalDual.default_parameters("clinical")["n_iterations"] == 12
    assert LearnedPrimalDual.default_parameters("clinical")["kernel_size"] == 5
    assert LSPD.default_parameters("clinical")["n_subsets"] == 4
    sk = SketchedLSPD.default_parameters("clinical")
    assert (sk["n_iterations"], sk["n_unsketched"], sk["sketch_factor"]) == (12, 4, 2)
    with pytest.raises(ValueError, match="preset"):
        LSPD.default_parameters("mayo")


def test_from_preset_and_build_model(op):
    model = SketchedLSPD.from_preset(op, "digits", init="zero")
    assert model.config["n_iterations"] == 5 and model.config["n_sketched"] == 3
    assert model.dual_blocks[0].net[0].kernel_size == (3, 3)
    assert isinstance(build_model("lpd", op, "clinical", init="zero"), LearnedPrimalDual)
    assert set(MODELS) == {"lpd", "lspd", "sklspd"}
    with pytest.raises(ValueError, match="model name"):
        build_model("unet", op)


@pytest.mark.parametrize("cls", [LearnedPrimalDual, LSPD, SketchedLSPD])
def test_config_rebuilds_the_same_model(op, cls):
    kw = {} if cls is LearnedPrimalDual else {"subset_order": "random"}
    if cls is SketchedLSPD:
        kw.update(sketch_residual=False, sketch_hidden_channels=4)
    model = _small(cls, op, **kw)
    clone = cls(op, **model.get_config())
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    y, _ = _data(op)
    assert torch.equal(model(y), clone(y))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_subsets=13), "n_subsets"),
    (dict(init="adjoint"), "init"),
    (dict(subset_order="shuffled"), "subset_order"),
    (dict(n_sketched=2), "sketch_factor"),
    (dict(n_iterations=0), "n_iterations"),
    (dict(operator_norm=-1.0), "operator_norm"),
    (dict(sketch_hidden_channels=0), "sketch_hidden_channels"),
])
def test_bad_arguments(op, kwargs, match):
    with pytest.raises(ValueError, match=match):
        UnrolledPrimalDual(op, **{"n_iterations": 2, **kwargs})


def test_subclasses_reject_foreign_options(op):
    with pytest.raises(ValueError, match="n_subsets"):
        LearnedPrimalDual(op, n_subsets=4)
    with pytest.raises(ValueError, match="n_sketched"):
        LSPD(op, n_sketched=2)
    with pytest.raises(ValueError, match="n_unsketched"):
        SketchedLSPD(op, n_iterations=3, n_unsketched=4)


def test_sinogram_not_matching_geometry_is_a_clear_error(op):
    model = _small(LearnedPrimalDual, op)
    with pytest.raises(ValueError, match=r"sinogram must have shape \(B, 1, 12, 23\).*\(2, 1, 10, 23\)"):
        model(torch.zeros(2, 1, 10, 23))
    with pytest.raises(ValueError, match="x0"):
        model(torch.zeros(2, 1, 12, 23), x0=torch.zeros(2, 1, 8, 8))


# ----------------------------------------------------------------------------- real projector
def test_with_ray_transform_and_fbp_initialisation():
    ops = pytest.importorskip("recon.operators")
    if not hasattr(ops, "RayTransform"):
        pytest.skip("recon.operators.RayTransform not available")
    geom = ops.ParallelBeamGeometry(image_shape=(16, 16), n_angles=8)
    A = ops.RayTransform(geom, backend="torch")
    torch.manual_seed(0)
    lpd = LearnedPrimalDual(A, n_iterations=2, hidden_channels=4, zero_last=True)
    sk = SketchedLSPD(A, n_iterations=3, n_unsketched=1, n_subsets=2, hidden_channels=4)
    image = torch.rand(2, 1, 16, 16)
    y = A(image)
    # zero-initialised last layers: LPD returns its FBP initial guess
    assert torch.allclose(lpd(y), ops.fbp(y, A), atol=1e-6)
    out = sk(y)
    out.mean().backward()
    assert out.shape == image.shape and torch.isfinite(out).all()


def test_by_default_an_untrained_network_returns_its_fbp_start():
    from recon.operators import ParallelBeamGeometry, RayTransform, fbp
    op = RayTransform(ParallelBeamGeometry((16, 16), n_angles=8), cache=False)
    y, _ = _data(op)
    for cls in (LearnedPrimalDual, LSPD):
        model = cls(op, n_iterations=3, hidden_channels=4)
        torch.testing.assert_close(model(y), fbp(y, op))
