"""Hypergradients against closed forms and finite differences (float64)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bilevel import AdaptiveInexact, ImplicitCG, Unrolled, solve_inner
from bilevel.linalg import HessianOperator
from recon.losses import MSEToTarget
from recon.problems import TVDenoising

from bilevel_problems import QuadraticInner, QuadraticOuter, random_quadratic

DT = torch.float64


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 100_000), n=st.integers(2, 10), K=st.integers(1, 4), B=st.integers(1, 4))
def test_implicit_cg_matches_analytic_hypergradient_on_quadratics(seed, n, K, B):
    inner, outer, theta, batch = random_quadratic(seed, n, K, B)
    # analytic: differentiate ℓ(x̂(θ), θ) through the closed form
    t = theta["t"].clone().requires_grad_(True)
    loss = outer(inner.closed_form(t, batch), {"t": t}, batch)
    (exact,) = torch.autograd.grad(loss, t)
    x_hat = inner.closed_form(theta["t"], batch)
    hg = ImplicitCG(max_iter=200)(inner, outer, theta, batch, x_hat, tol=1e-13)
    assert hg.cg_converged
    assert _rel(hg.theta_grad["t"], exact) <= 1e-8


def _tv_instance(seed, B=2, H=8, W=8, sigma=0.1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(B, 1, H, W, generator=g, dtype=DT)
    noisy = clean + sigma * torch.randn(B, 1, H, W, generator=g, dtype=DT)
    return {"y": noisy, "image": clean}


def _upper(inner, outer, theta, batch, tol=1e-12):
    sol = solve_inner(inner, theta, batch, tol, method="newton-cg", max_iter=100)
    assert sol.all_converged
    return float(outer(sol.x, theta, batch)), sol.x


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 100_000), lw=st.floats(-4.0, -1.0), ls=st.floats(-6.0, -2.0),
       sigma=st.floats(0.05, 0.3))
def test_implicit_cg_matches_finite_differences_on_tv_denoising(seed, lw, ls, sigma):
    inner, outer = TVDenoising(), MSEToTarget()
    batch = _tv_instance(seed, sigma=sigma)
    theta = {"log_weight": torch.tensor(lw, dtype=DT), "log_smoothing": torch.tensor(ls, dtype=DT)}
    _, x_hat = _upper(inner, outer, theta, batch)
    hg = ImplicitCG()(inner, outer, theta, batch, x_hat, tol=1e-14)
    h = 1e-4
    for name in theta:
        plus = dict(theta, **{name: theta[name] + h})
        minus = dict(theta, **{name: theta[name] - h})
        fd = (_upper(inner, outer, plus, batch)[0] - _upper(inner, outer, minus, batch)[0]) / (2 * h)
        g = float(hg.theta_grad[name])
        assert abs(g - fd) <= 1e-6 * max(abs(fd), 1e-3 * hg.norm()), (name, g, fd)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 100_000), lw=st.floats(-4.0, 0.0), ls=st.floats(-8.0, -1.0))
def test_tv_closed_form_products_match_autograd(seed, lw, ls):
    inner = TVDenoising()
    batch = _tv_instance(seed, B=3, H=7, W=9)
    theta = {"log_weight": torch.tensor(lw, dtype=DT), "log_smoothing": torch.tensor(ls, dtype=DT)}
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch["y"].shape, generator=g, dtype=DT)
    v = torch.randn(x.shape, generator=g, dtype=DT)
    auto = HessianOperator(inner, x, theta, batch, mode="autograd")
    closed = HessianOperator(inner, x, theta, batch, mode="closed")
    assert _rel(closed.hvp(v), auto.hvp(v)) <= 1e-12
    ma, mc = auto.mixed_vjp(v), closed.mixed_vjp(v)
    for k in theta:
        assert abs(float(ma[k] - mc[k])) <= 1e-12 * max(abs(float(ma[k])), 1e-300)
    from bilevel.problem import InnerProblem
    assert _rel(inner.grad(x, theta, batch), InnerProblem.grad(inner, x, theta, batch)) <= 1e-12


def test_autograd_and_closed_form_hypergradients_agree():
    inner, outer = TVDenoising(), MSEToTarget()
    batch = _tv_instance(3, B=4, H=12, W=12)
    theta = {"log_weight": torch.tensor(-2.5, dtype=DT), "log_smoothing": torch.tensor(-5.0, dtype=DT)}
    _, x_hat = _upper(inner, outer, theta, batch)
    a = ImplicitCG(hessian="autograd")(inner, outer, theta, batch, x_hat, tol=1e-14)
    c = ImplicitCG(hessian="closed")(inner, outer, theta, batch, x_hat, tol=1e-14)
    for k in theta:
        assert math.isclose(float(a.theta_grad[k]), float(c.theta_grad[k]), rel_tol=1e-9)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 100_000), K=st.integers(1, 6), lw=st.floats(-4.0, -1.0), ls=st.floats(-5.0, -2.0))
def test_unrolled_matches_finite_differences_of_k_step_map(seed, K, lw, ls):
    inner, outer = TVDenoising(), MSEToTarget()
    batch = _tv_instance(seed)
    theta = {"log_weight": torch.tensor(lw, dtype=DT), "log_smoothing": torch.tensor(ls, dtype=DT)}
    est = Unrolled(n_steps=K, step_size=20.0, start="init")
    hg = est(inner, outer, theta, batch, inner.init(theta, batch))

    def kstep(th):
        with torch.no_grad():
            x = est.unroll(inner, th, batch, inner.init(th, batch), create_graph=False)
        return float(outer(x.detach(), th, batch))

    h = 1e-5
    for name in theta:
        fd = (kstep(dict(theta, **{name: theta[name] + h})) - kstep(dict(theta, **{name: theta[name] - h}))) / (2 * h)
        g = float(hg.theta_grad[name])
        assert abs(g - fd) <= 1e-6 * max(abs(fd), 1e-3 * hg.norm()), (name, g, fd)


def test_unrolled_converges_to_implicit_gradient_with_many_steps():
    inner, outer = TVDenoising(), MSEToTarget()
    batch = _tv_instance(7)
    theta = {"log_weight": torch.tensor(-3.0, dtype=DT), "log_smoothing": torch.tensor(-3.0, dtype=DT)}
    _, x_hat = _upper(inner, outer, theta, batch)
    ift = ImplicitCG()(inner, outer, theta, batch, x_hat, tol=1e-14)
    unr = Unrolled(n_steps=300, start="init")(inner, outer, theta, batch, x_hat)
    for k in theta:
        assert math.isclose(float(unr.theta_grad[k]), float(ift.theta_grad[k]), rel_tol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_implicit_cg_agrees_with_torchopt_custom_root():
    torchopt = pytest.importorskip("torchopt")
    inner, outer = TVDenoising(), MSEToTarget()
    batch = _tv_instance(11, B=2, H=10, W=10)
    theta = {"log_weight": torch.tensor(-2.0, dtype=DT), "log_smoothing": torch.tensor(-4.0, dtype=DT)}
    _, x_hat = _upper(inner, outer, theta, batch)
    ours = ImplicitCG()(inner, outer, theta, batch, x_hat, tol=1e-14)

    def phi(x, lw, ls):
        return inner.objective(x, {"log_weight": lw, "log_smoothing": ls}, batch).sum()

    def optimality(x, lw, ls):  # torchopt differentiates this with torch.func transforms
        return torch.func.grad(phi)(x, lw, ls)

    @torchopt.diff.implicit.custom_root(optimality, argnums=(1, 2),
                                        solve=torchopt.linear_solve.solve_cg(maxiter=500, rtol=1e-14, atol=0.0))
    def solver(x0, lw, ls):
        return x_hat.clone()

    lw = theta["log_weight"].clone().requires_grad_(True)
    ls = theta["log_smoothing"].clone().requires_grad_(True)
    x = solver(x_hat.clone(), lw, ls)
    loss = outer(x, {}, batch)
    g_lw, g_ls = torch.autograd.grad(loss, (lw, ls))
    assert math.isclose(float(g_lw), float(ours.theta_grad["log_weight"]), rel_tol=1e-7)
    assert math.isclose(float(g_ls), float(ours.theta_grad["log_smoothing"]), rel_tol=1e-7)


def _ill_conditioned_quadratic(n=400, condition=1e3, seed=0):
    """A quadratic inner problem whose CG needs more than 200 but fewer than ``n`` steps."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    M0 = (Q * torch.logspace(0, math.log10(condition), n, dtype=DT)) @ Q.T
    inner = QuadraticInner(M0, 0.01 * torch.eye(n, dtype=DT).expand(2, n, n).clone(),
                           torch.randn(n, 2, generator=g, dtype=DT))
    batch = {"c": torch.randn(2, n, generator=g, dtype=DT),
             "target": torch.randn(2, n, generator=g, dtype=DT)}
    return inner, QuadraticOuter(torch.zeros(2, dtype=DT)), {"t": torch.zeros(2, dtype=DT)}, batch


@pytest.mark.parametrize("estimator", [ImplicitCG, AdaptiveInexact])
def test_default_cg_cap_grows_with_the_problem(estimator):
    """The default cap is max(minimum, n): a 400-dimensional system that needs ~330 CG steps
    converges to the exact hypergradient, where a fixed cap of 200 stops short."""
    inner, outer, theta, batch = _ill_conditioned_quadratic()
    x = inner.closed_form(theta["t"], batch)
    t = theta["t"].clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(outer(inner.closed_form(t, batch), {"t": t}, batch), t)
    kwargs = {"mu": 1.0} if estimator is AdaptiveInexact else {}
    capped = ImplicitCG(max_iter=200)(inner, outer, theta, batch, x, tol=1e-10, relative=True)
    assert not capped.cg_converged and capped.cg_iterations == 200
    hg = estimator(**kwargs)(inner, outer, theta, batch, x, tol=1e-10, relative=True)
    assert hg.cg_converged and 200 < hg.cg_iterations <= 400 + 10
    assert _rel(hg.theta_grad["t"], exact) <= 1e-7


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_cg_cap_is_checked(bad):
    for estimator in (ImplicitCG, AdaptiveInexact):
        with pytest.raises(ValueError, match=r"max_iter must be a positive int or None, got"):
            estimator(max_iter=bad)
