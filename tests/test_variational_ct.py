"""VariationalCT: closed-form derivatives against autograd / finite differences, solves, HOAG."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bilevel import ImplicitCG, solve_inner
from bilevel.linalg import HessianOperator
from bilevel.problem import InnerProblem
from recon.losses import MSEToTarget
from recon.operators import ParallelBeamGeometry, RayTransform
from recon.problems import VariationalCT

DT = torch.float64


@pytest.fixture(scope="module")
def op():
    return RayTransform(ParallelBeamGeometry((12, 12), n_angles=8), cache=False)


def _instance(op, seed, B=2, noise=0.02):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 12, dtype=DT), torch.linspace(-1, 1, 12, dtype=DT),
                            indexing="ij")
    imgs = []
    for b in range(B):
        c = 0.3 * torch.rand(2, generator=g, dtype=DT) - 0.15
        imgs.append(((xx - c[0]) ** 2 + (yy - c[1]) ** 2 < 0.4).to(DT) * (0.5 + 0.5 * b / B))
    image = torch.stack(imgs)[:, None]
    y = op(image)
    y = y + noise * float(y.abs().max()) * torch.randn(y.shape, generator=g, dtype=DT)
    return {"sinogram": y, "image": image}


def _theta(lw, ls):
    return {"log_weight": torch.tensor(lw, dtype=DT), "log_smoothing": torch.tensor(ls, dtype=DT)}


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), lw=st.floats(-5.0, 0.0), ls=st.floats(-7.0, -1.0))
def test_closed_form_products_match_autograd(op, seed, lw, ls):
    inner, batch, theta = VariationalCT(op), _instance(op, seed), _theta(lw, ls)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch["image"].shape, generator=g, dtype=DT)
    v = torch.randn(x.shape, generator=g, dtype=DT)
    auto = HessianOperator(inner, x, theta, batch, mode="autograd")
    closed = HessianOperator(inner, x, theta, batch, mode="closed")
    assert float((closed.hvp(v) - auto.hvp(v)).norm() / auto.hvp(v).norm()) <= 1e-12
    ma, mc = auto.mixed_vjp(v), closed.mixed_vjp(v)
    for k in theta:
        assert abs(float(ma[k] - mc[k])) <= 1e-12 * max(abs(float(ma[k])), 1e-300)
    ga, gc = InnerProblem.grad(inner, x, theta, batch), inner.grad(x, theta, batch)
    assert float((ga - gc).norm() / ga.norm()) <= 1e-12


def test_objective_is_per_sample_and_lipschitz_bounds_the_hessian(op):
    inner, batch, theta = VariationalCT(op), _instance(op, 1, B=3), _theta(-2.0, -3.0)
    x = inner.init(theta, batch)
    full = inner.objective(x, theta, batch)
    one = inner.objective(x[1:2], theta, {"sinogram": batch["sinogram"][1:2]})
    assert full.shape == (3,) and math.isclose(float(full[1]), float(one[0]), rel_tol=1e-13)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=DT)
    for _ in range(30):  # power iteration on the per-sample Hessian
        v = inner.hvp(x, theta, batch, v)
        v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    lam = inner.hvp(x, theta, batch, v).flatten(1).norm(dim=1).max()
    assert float(lam) <= inner.lipschitz(theta, batch) * (1 + 1e-9)


def test_hypergradient_matches_finite_differences(op):
    inner, outer, batch = VariationalCT(op), MSEToTarget(), _instance(op, 7)
    theta = _theta(-3.0, -4.0)

    def upper(th):
        sol = solve_inner(inner, th, batch, 1e-12, method="newton-cg", max_iter=100)
        assert sol.all_converged
        return float(outer(sol.x, th, batch)), sol.x

    _, x_hat = upper(theta)
    hg = ImplicitCG()(inner, outer, theta, batch, x_hat, tol=1e-14)
    h = 1e-4
    for name in theta:
        fd = (upper(dict(theta, **{name: theta[name] + h}))[0]
              - upper(dict(theta, **{name: theta[name] - h}))[0]) / (2 * h)
        assert abs(float(hg.theta_grad[name]) - fd) <= 1e-6 * max(abs(fd), 1e-3 * hg.norm())


def test_warm_start_and_bad_input(op):
    inner, batch, theta = VariationalCT(op), _instance(op, 2), _theta(-2.0, -3.0)
    fbp = torch.zeros_like(batch["image"]) + 0.1
    assert torch.equal(inner.init(theta, dict(batch, fbp=fbp)), fbp)
    with pytest.raises(ValueError, match="sinogram"):
        inner.objective(batch["image"], theta, {"sinogram": torch.zeros(2, 1, 5, 5, dtype=DT)})
    with pytest.raises(ValueError, match="fbp"):
        inner.init(theta, dict(batch, fbp=torch.zeros(2, 1, 4, 4, dtype=DT)))
    with pytest.raises(ValueError, match="x has shape"):
        inner.check(torch.zeros(2, 1, 4, 4, dtype=DT), theta, batch)
    with pytest.raises(TypeError, match="operator"):
        VariationalCT("not an operator")
