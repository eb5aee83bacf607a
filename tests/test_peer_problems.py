"""The benchmark problems of benchmarks/peer_problems.py have the closed forms they claim, and
benchmarks/outer_loops.py --quick runs."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bilevel import ImplicitCG, solve_inner
from bilevel.linalg import HessianOperator, batch_norm

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import peer_problems as pp  # noqa: E402

DT = torch.float64


def _fd_grad(f, theta, name, h=1e-5):
    """Central finite differences of ``f`` in every entry of ``theta[name]``."""
    base = theta[name]
    g = torch.zeros_like(base)
    for i in range(base.numel()):
        e = torch.zeros_like(base).reshape(-1)
        e[i] = h
        e = e.reshape(base.shape)
        up = f({**theta, name: base + e})
        down = f({**theta, name: base - e})
        g.view(-1)[i] = (up - down) / (2 * h)
    return g


def _ridge(convention, scale, d=5):
    batch = pp.ridge_data(d, 10 * d, seed=3, noise=3.0, scale=scale)
    inner, outer = pp.PerFeatureRidgeInner(convention), pp.PerFeatureRidgeOuter(convention)
    theta = {"log_lam": torch.linspace(-1.5, 1.0, d, dtype=DT) + 2 * math.log(scale)}
    return inner, outer, theta, batch


@pytest.mark.parametrize("convention", ["mean", "sum"])
def test_ridge_solve_is_stationary_and_hypergradient_matches_fd(convention):
    inner, outer, theta, batch = _ridge(convention, 1.0)
    sol = inner.solve(theta, batch, tol=1e-10)
    assert sol.all_converged and float(sol.grad_norm.max()) <= 1e-10
    # the autograd gradient of the objective agrees with the closed-form one at the solution
    auto = type(inner).__mro__[1].grad(inner, sol.x, theta, batch)
    assert float(batch_norm(auto).max()) <= 1e-10
    hg = ImplicitCG()(inner, outer, theta, batch, sol.x, 1e-12)

    def loss(th):
        return float(outer(inner.closed_form(th["log_lam"], batch), th, batch))

    fd = _fd_grad(loss, theta, "log_lam")
    assert torch.allclose(hg.theta_grad["log_lam"], fd, rtol=1e-6, atol=1e-9 * abs(loss(theta)))


def test_ridge_closed_form_products_match_autograd():
    inner, outer, theta, batch = _ridge("mean", 1.0)
    x = torch.randn(1, 5, dtype=DT, generator=torch.Generator().manual_seed(0))
    v = torch.randn(1, 5, dtype=DT, generator=torch.Generator().manual_seed(1))
    Ha = HessianOperator(inner, x, theta, batch, mode="autograd")
    Hc = HessianOperator(inner, x, theta, batch, mode="closed")
    assert torch.allclose(Ha.hvp(v), Hc.hvp(v), atol=1e-12)
    assert torch.allclose(Ha.mixed_vjp(v)["log_lam"], Hc.mixed_vjp(v)["log_lam"], atol=1e-12)


def test_ridge_reference_moves_exactly_with_the_units():
    base = pp.per_feature_ridge(3, convention="mean", scale=1.0, n_starts=2)[5]
    for convention, scale in (("sum", 1e3), ("mean", 1e-3)):
        info = pp.per_feature_ridge(3, convention=convention, scale=scale, n_starts=2)[5]
        assert abs(info["mapped_check"]) < 1e-10
        n = 30
        factor = scale ** 2 * (n if convention == "sum" else 1)
        assert info["best_loss"] == pytest.approx(factor * base["best_loss"], rel=1e-12)
    # the reference is a local minimum: no coordinate perturbation lowers the loss
    inner, outer, theta0, batch, _, info = pp.per_feature_ridge(3, n_starts=2)
    best = torch.tensor(info["best_theta"]["log_lam"], dtype=DT)
    for i in range(3):
        for h in (-1e-3, 1e-3):
            t = best.clone()
            t[i] += h
            assert info["loss_at"]({"log_lam": t}) >= info["best_loss"] * (1 - 1e-13)


def test_quadratic_closed_form_and_exact_optimum():
    inner, outer, theta0, batch, bounds, info = pp.benchopt_quadratic()
    assert bounds is None and theta0["outer_var"].shape == (5,)
    theta = {"outer_var": torch.linspace(-1, 1, 5, dtype=DT)}
    z = inner.closed_form(theta["outer_var"], batch)
    assert float(batch_norm(inner.grad(z, theta, batch)).max()) <= 1e-10
    hg = ImplicitCG()(inner, outer, theta, batch, z, 1e-13)
    fd = _fd_grad(info["loss_at"], theta, "outer_var")
    assert torch.allclose(hg.theta_grad["outer_var"], fd, rtol=1e-6, atol=1e-10)
    # θ* is stationary and a minimum: the exact hypergradient vanishes there
    star = {"outer_var": torch.tensor(info["best_theta"]["outer_var"], dtype=DT)}
    zs = inner.closed_form(star["outer_var"], batch)
    g = ImplicitCG()(inner, outer, star, batch, zs, 1e-14).theta_grad["outer_var"]
    g0 = ImplicitCG()(inner, outer, theta0, batch, inner.closed_form(theta0["outer_var"], batch),
                      1e-14).theta_grad["outer_var"]
    assert float(g.norm()) <= 1e-8 * float(g0.norm())
    assert info["loss_at"](theta0) > info["best_loss"]
    # the generic inner solver finds the closed form
    sol = solve_inner(inner, theta, batch, 1e-12)
    assert torch.allclose(sol.x, z, atol=1e-10)


def test_data_cleaning_products_and_hypergradient():
    batch = pp.digits_data(n_train=24, corrupt=0.5, seed=1)
    assert len(batch["corrupted"]) == 12
    inner, outer = pp.WeightedLogRegInner(1e-2), pp.ValidationCrossEntropy()
    g = torch.Generator().manual_seed(0)
    theta = {"logit_weights": torch.randn(24, dtype=DT, generator=g)}
    x = 0.1 * torch.randn(1, 650, dtype=DT, generator=g)
    v = torch.randn(1, 650, dtype=DT, generator=g)
    auto_grad = type(inner).__mro__[1].grad(inner, x, theta, batch)
    assert torch.allclose(inner.grad(x, theta, batch), auto_grad, atol=1e-13)
    Ha = HessianOperator(inner, x, theta, batch, mode="autograd")
    Hc = HessianOperator(inner, x, theta, batch, mode="closed")
    assert torch.allclose(Ha.hvp(v), Hc.hvp(v), atol=1e-12)
    assert torch.allclose(Ha.mixed_vjp(v)["logit_weights"], Hc.mixed_vjp(v)["logit_weights"], atol=1e-12)
    sol = solve_inner(inner, theta, batch, 1e-12, max_iter=100)
    assert sol.all_converged and float(sol.grad_norm.max()) <= 1e-10
    hg = ImplicitCG(max_iter=1000)(inner, outer, theta, batch, sol.x, 1e-13)

    def loss(th):
        s = solve_inner(inner, th, batch, 1e-13, x0=sol.x, max_iter=100)
        return float(outer(s.x, th, batch))

    idx = [0, 5, 17]
    sub = {"logit_weights": theta["logit_weights"]}
    fd = _fd_grad(loss, sub, "logit_weights")
    assert torch.allclose(hg.theta_grad["logit_weights"][idx], fd[idx], rtol=1e-5, atol=1e-9)


def test_outer_loops_quick_runs():
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "outer_loops.py"), "--quick"],
                         capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    assert "smoke run: numbers are not meaningful" in out.stdout
    for name in ("quickstart", "foe", "ridge20", "units sum x1000", "quadratic", "cleaning"):
        assert name in out.stdout
    for loop in ("QuasiNewton", "HOAG", "MAID", "L-BFGS-B exact"):
        assert loop in out.stdout
    assert "targets of the QuasiNewton loop" in out.stdout
    assert seconds < 180


@pytest.mark.parametrize("convention,scale", [("mean", 1e-3), ("sum", 1e3)])
def test_maid_step_adapts_to_curvature_met_in_other_units(convention, scale):
    """In these units MAID's first step (a move of length 1) is orders of magnitude too long
    for the curvature a few steps later; the step must keep shrinking across failed line
    searches (not restart at the too-long one) so that the loss goes on decreasing, and the run
    must end with a Result (no crash, no false success)."""
    import warnings
    from bilevel import MAID
    inner, outer, th0, batch, bounds, info = pp.per_feature_ridge(20, convention=convention,
                                                                 scale=scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = MAID(inner, outer, max_iter=30).run(th0, batch)
    losses = res.history.column("upper_loss")
    start = info["loss_at"](th0)
    final = info["loss_at"](res.theta)
    assert all(math.isfinite(v) for v in losses)
    assert final < start - 0.05 * (start - info["best_loss"])  # real progress, not a stall
    accepted = [r["step_accepted"] for r in res.history.records[1:]]
    assert sum(bool(a) for a in accepted) >= 10
    assert not (res.success and final > info["best_loss"] * (1 + 1e-6))


def test_a_non_finite_warm_start_is_not_used():
    """A CG that overflowed at a rejected trial point leaves a non-finite ``q``; the next call
    must start from zero instead of propagating NaN into the hypergradient."""
    from bilevel import AdaptiveInexact
    inner, outer, th0, batch, bounds, info = pp.per_feature_ridge(5)
    sol = solve_inner(inner, th0, batch, tol=1e-10)
    for est in (ImplicitCG(), AdaptiveInexact(mu=None)):
        ref = est(inner, outer, th0, batch, sol.x, 1e-10)
        est._q = torch.full_like(ref.adjoint, float("nan"))
        hg = est(inner, outer, th0, batch, sol.x, 1e-10)
        assert math.isfinite(hg.norm())
        assert torch.allclose(hg.theta_grad["log_lam"], ref.theta_grad["log_lam"], rtol=1e-8)


def test_hoag_searches_again_along_a_confirmed_gradient():
    """Ridge in units × 1000 from θ₀ = 0: the search along a loose hypergradient fails at every
    step length. HOAG must re-evaluate it at the confirmation accuracy and search along that one
    (which finds decrease), not end with "no decrease found"."""
    from bilevel import HOAG
    inner, outer, th0, batch, bounds, info = pp.per_feature_ridge(20, convention="mean",
                                                                 scale=1e3)
    res = HOAG(inner, outer, bounds=bounds, max_iter=60).run(th0, batch)
    assert not res.message.startswith("no decrease found"), res.message
    records = res.history.records
    tight = [i for i, r in enumerate(records) if r["tol"] <= 1e-8]
    assert tight, "the exhausted search never led to a confirmed gradient"
    first = tight[0]
    before = min(r["upper_loss"] for r in records[:first + 1] if r.get("accepted"))
    after = [r["upper_loss"] for r in records[first + 1:] if r.get("accepted")]
    assert after and min(after) < before  # the confirmed direction decreased the loss
    assert not res.success
