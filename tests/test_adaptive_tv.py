"""Adaptive TV (pixel weights from a small CNN on the observation): closed-form products against
autograd, hypergradients against central differences (hypothesis, float64), plain TV at θ₀,
intensity equivariance and bad input."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bilevel import ImplicitCG, QuasiNewton, solve_inner
from recon.adaptive_tv import AdaptiveTVDenoising, adaptive_tv_size, initial_theta
from recon.losses import MSEToTarget

from _inner_checks import (assert_closed_forms_match_autograd,
                          assert_hypergradient_matches_central_difference)
from recon.problems import TVDenoising

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _setup(seed=0, B=2, C=1, H=8, m=3, k=3, k2=3):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(B, C, H, H, generator=g, dtype=DT)
    batch = {"y": clean + 0.1 * torch.randn(clean.shape, generator=g, dtype=DT), "image": clean}
    theta = initial_theta(C, m, k, k2, log_weight=-2.0, log_smoothing=-3.0, seed=seed)
    theta["conv1.bias"] = 0.3 * torch.randn(m, generator=g, dtype=DT)
    theta["conv2.weight"] = torch.randn(1, m, k2, k2, generator=g, dtype=DT)
    return AdaptiveTVDenoising(C, m, k, k2), batch, theta, g


def test_initial_theta_has_410_entries_and_gives_constant_weights():
    inner = AdaptiveTVDenoising()
    theta = initial_theta()
    assert sum(v.numel() for v in theta.values()) == adaptive_tv_size(inner) == 410
    y = torch.rand(2, 1, 6, 6, dtype=DT)
    inner.check(y, theta, {"y": y})
    assert torch.allclose(inner.weights(theta, y), torch.full((2, 1, 6, 6), math.exp(-4.0), dtype=DT),
                          rtol=1e-15)


@pytest.mark.parametrize("C, k, k2", [(1, 3, 3), (3, 5, 1)])
def test_closed_form_gradient_and_products_match_autograd(C, k, k2):
    inner, batch, theta, g = _setup(C=C, k=k, k2=k2)
    assert_closed_forms_match_autograd(inner, batch, theta, g, atol=1e-15)


def test_products_match_double_backward_of_the_objective():
    inner, batch, theta, g = _setup(1)
    x = batch["y"].clone()
    q = torch.randn(x.shape, generator=g, dtype=DT)
    leaves = {k: t.clone().requires_grad_(True) for k, t in theta.items()}
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(inner.objective(xg, leaves, batch).sum(), xg, create_graph=True)
    names = list(theta)
    grads = torch.autograd.grad((gx * q).sum(), [xg] + [leaves[k] for k in names])
    hvp, mixed = inner.linearize(x, theta, batch)
    assert torch.allclose(hvp(q), grads[0], rtol=1e-10, atol=1e-15)
    got = mixed(q)
    for k, ref in zip(names, grads[1:]):
        assert torch.allclose(got[k], ref, rtol=1e-10, atol=1e-15), k


def test_theta0_reproduces_tv_denoising():
    _, batch, _, _ = _setup(2, H=10)
    inner, tv = AdaptiveTVDenoising(1, 4, 5, 3), TVDenoising()
    theta = initial_theta(1, 4, 5, 3, log_weight=-3.0, log_smoothing=-5.0, seed=3)
    scalars = {k: theta[k] for k in tv.theta_names}
    x = batch["y"] + 0.01
    assert torch.allclose(inner.objective(x, theta, batch), tv.objective(x, scalars, batch), rtol=1e-13)
    assert torch.allclose(inner.grad(x, theta, batch), tv.grad(x, scalars, batch), rtol=1e-12, atol=1e-17)
    assert torch.allclose(inner.hvp(x, theta, batch, x), tv.hvp(x, scalars, batch, x), rtol=1e-12, atol=1e-17)
    m, m_tv = inner.mixed_vjp(x, theta, batch, x), tv.mixed_vjp(x, scalars, batch, x)
    for k in scalars:
        assert torch.allclose(m[k], m_tv[k], rtol=1e-12), k
    assert float(m["conv1.weight"].abs().max()) == 0.0  # behind a zero last layer
    assert inner.lipschitz(theta, batch) == pytest.approx(tv.lipschitz(scalars, batch), rel=1e-12)
    a = solve_inner(inner, theta, batch, tol=1e-12).x
    b = solve_inner(tv, scalars, batch, tol=1e-12).x
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000),
       name=st.sampled_from(list(AdaptiveTVDenoising.theta_names)), pick=st.integers(0, 80))
def test_hypergradient_matches_central_differences(seed, name, pick):
    inner, batch, theta, _ = _setup(seed)
    idx = pick % theta[name].numel()
    assert_hypergradient_matches_central_difference(inner, batch, theta, name, idx)


def test_hypergradient_along_random_directions():
    inner, batch, theta, g = _setup(5)
    outer = MSEToTarget()
    x = solve_inner(inner, theta, batch, tol=1e-13).x
    hg = ImplicitCG()(inner, outer, theta, batch, x, tol=1e-13).theta_grad
    h = 1e-5
    for _ in range(3):
        d = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in theta.items()}
        f = [float(outer(solve_inner(inner, t, batch, tol=1e-13).x, t, batch))
             for t in ({k: theta[k] + s * h * d[k] for k in theta} for s in (1, -1))]
        got = sum(float((hg[k] * d[k]).sum()) for k in theta)
        assert got == pytest.approx((f[0] - f[1]) / (2 * h), rel=1e-5, abs=1e-11)


@pytest.mark.parametrize("a, c", [(0.0, 1e-2), (0.5, 7.0), (-3.0, 1e3)])
def test_affine_intensity_change_with_adapted_scalars_maps_the_solution(a, c):
    inner, batch, theta, _ = _setup(6)
    x = solve_inner(inner, theta, batch, tol=1e-12).x
    scaled = {**theta, "log_weight": theta["log_weight"] + math.log(c),
              "log_smoothing": theta["log_smoothing"] + 2 * math.log(c)}
    res = solve_inner(inner, scaled, {"y": a + c * batch["y"]}, tol=1e-12 * c)
    assert bool(torch.as_tensor(res.converged).all())
    assert torch.allclose(res.x, a + c * x, rtol=1e-7, atol=1e-8 * c)
    assert torch.allclose(inner.weights(scaled, a + c * batch["y"]), c * inner.weights(theta, batch["y"]),
                          rtol=1e-10)


def test_quasi_newton_improves_on_the_learned_tv_through_the_network():
    _, batch, _, _ = _setup(7, B=2, H=12)
    tv = QuasiNewton(TVDenoising(), MSEToTarget(), max_iter=30).run(
        {"log_weight": torch.tensor(-3.0, dtype=DT), "log_smoothing": torch.tensor(-4.0, dtype=DT)}, batch)
    inner = AdaptiveTVDenoising(1, 3, 5)
    theta = initial_theta(1, 3, 5, log_weight=float(tv.theta["log_weight"]),
                          log_smoothing=float(tv.theta["log_smoothing"]))
    res = QuasiNewton(inner, MSEToTarget(), max_iter=10).run(theta, batch)
    assert res.history[0]["upper_loss"] == pytest.approx(tv.best_loss, rel=1e-2)  # loose tol0
    assert res.best_loss < 0.995 * tv.best_loss  # below the best plain TV
    assert float(res.theta["conv2.weight"].abs().max()) > 0


def test_weights_cache_follows_theta_and_y():
    inner, batch, theta, _ = _setup(8)
    y = batch["y"]
    w0 = inner.weights(theta, y)
    other = {**theta, "log_weight": theta["log_weight"] + 1.0}
    assert torch.allclose(inner.weights(other, y), math.e * w0, rtol=1e-12)
    y2 = y.clone()
    y2[0, 0, 0, 0] += 1.0
    assert not torch.allclose(inner.weights(theta, y2), w0)
    y.mul_(2.0).add_(1.0)  # in place: invariant map, but recomputed (version changed)
    assert torch.allclose(inner.weights(theta, y), w0, rtol=1e-12)


def test_bad_arguments_and_theta_shapes_are_named():
    for kwargs, msg in ((dict(channels=0), "channels must be an int"),
                        (dict(hidden=True), "hidden must be an int"),
                        (dict(kernel_size=4), "kernel_size must be an odd int"),
                        (dict(out_kernel_size=0), "out_kernel_size must be an odd int"),
                        (dict(log_range=0.0), "log_range must be a finite number")):
        with pytest.raises(ValueError, match=msg):
            AdaptiveTVDenoising(**kwargs)
    inner, batch, theta, _ = _setup()
    y = batch["y"]
    with pytest.raises(ValueError, match=r"theta\['conv1.weight'\] must have shape \(3, 1, 3, 3\)"):
        inner.check(y, {**theta, "conv1.weight": torch.zeros(3, 1, 5, 5, dtype=DT)}, batch)
    with pytest.raises(ValueError, match=r"theta\['conv2.weight'\] must have shape \(1, 3, 3, 3\), got \(3,\)"):
        inner.check(y, {**theta, "conv2.weight": torch.zeros(3, dtype=DT)}, batch)
    with pytest.raises(ValueError, match=r"theta\['log_weight'\] must have shape \(\)"):
        inner.check(y, {**theta, "log_weight": torch.zeros(2, dtype=DT)}, batch)
    with pytest.raises(ValueError, match="missing"):
        inner.check(y, {k: v for k, v in theta.items() if k != "conv1.bias"}, batch)
    with pytest.raises(ValueError, match="3 channel"):
        y3 = y.repeat(1, 3, 1, 1)
        inner.check(y3, theta, {"y": y3})
    with pytest.raises(ValueError, match="not finite|non-finite|NaN|nan"):
        inner.check(y, {**theta, "conv1.bias": torch.full((3,), float("nan"), dtype=DT)}, batch)
    with pytest.raises(ValueError, match="key 'y'"):
        inner.check(y, theta, {"image": y})
