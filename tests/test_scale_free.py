"""HOAG and MAID defaults on problems of any scale (means or sums, any n, any constant factor)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bilevel import HOAG, MAID, InnerProblem
from recon.losses import MSEToTarget
from recon.problems import TVDenoising

from bilevel_problems import RidgeInner, RidgeOuter, ridge_optimum, ridge_problem

DT = torch.float64
METHODS = {"HOAG": HOAG, "MAID": MAID}


def _lam(theta_floats, inner):
    v = theta_floats["lam"]
    return math.exp(v) if inner.param == "log" else v


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(50, 1000), convention=st.sampled_from(["mean", "sum"]),
       method=st.sampled_from(["HOAG", "MAID"]), seed=st.integers(0, 1000))
def test_defaults_reach_the_ridge_hyper_optimum_stay_there_and_stop(n, convention, method, seed):
    inner, outer = RidgeInner(convention), RidgeOuter(convention)
    batch = ridge_problem(n, seed=seed)
    lam_star = ridge_optimum(inner, outer, batch)
    res = METHODS[method](inner, outer).run({"lam": torch.tensor(0.0, dtype=DT)}, batch)
    assert res.success, res.message
    lam = math.exp(float(res.theta["lam"]))
    assert abs(lam / lam_star - 1) <= 1e-3, (lam, lam_star)
    accepted = [_lam(r["theta"], inner) for r in res.history if r["accepted"]]
    first = next(i for i, v in enumerate(accepted) if abs(v / lam_star - 1) <= 1e-3)
    assert all(abs(v / lam_star - 1) <= 1e-3 for v in accepted[first:]), accepted[first:]
    assert res.best_theta is not None and res.best_loss <= min(
        r["upper_loss"] for r in res.history if r["accepted"]) + 1e-12


class _Scaled(InnerProblem):
    """``c·Φ`` of another inner problem (autograd products)."""

    def __init__(self, base, c):
        self.base, self.c = base, c
        self.theta_names = base.theta_names

    def objective(self, x, theta, batch):
        return self.c * self.base.objective(x, theta, batch)

    def init(self, theta, batch):
        return self.base.init(theta, batch)

    def strong_convexity_constant(self, theta, batch):
        return self.c * self.base.strong_convexity_constant(theta, batch)


class _ScaledOuter(MSEToTarget):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, theta, batch):
        return self.c * super().forward(x, theta, batch)


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(log_c=st.floats(-3.0, 3.0), method=st.sampled_from(["HOAG", "MAID"]),
       convention=st.sampled_from(["mean", "sum"]))
def test_scaling_both_losses_leaves_ridge_theta_unchanged(log_c, method, convention):
    c = 10.0 ** log_c
    batch = ridge_problem(120, seed=7)
    theta0 = {"lam": torch.tensor(0.0, dtype=DT)}
    ref = METHODS[method](RidgeInner(convention), RidgeOuter(convention)).run(theta0, batch)
    scaled = METHODS[method](RidgeInner(convention, c), RidgeOuter(convention, c)).run(theta0, batch)
    assert float(scaled.theta["lam"]) == pytest.approx(float(ref.theta["lam"]), abs=1e-4)


@pytest.mark.parametrize("method", ["HOAG", "MAID"])
@pytest.mark.parametrize("c", [1e-3, 1e3])
def test_scaling_both_losses_leaves_tv_theta_unchanged(method, c):
    g = torch.Generator().manual_seed(0)
    clean = torch.zeros(2, 1, 10, 10, dtype=DT)
    clean[:, :, 3:7, 3:7] = 1.0
    batch = {"y": clean + 0.2 * torch.randn(clean.shape, generator=g, dtype=DT), "image": clean}
    theta0 = {"log_weight": torch.tensor(-4.0, dtype=DT), "log_smoothing": torch.tensor(-4.0, dtype=DT)}
    runs = [METHODS[method](_Scaled(TVDenoising(), s), _ScaledOuter(s), max_iter=12).run(theta0, batch)
            for s in (1.0, c)]
    for k in theta0:
        assert float(runs[1].theta[k]) == pytest.approx(float(runs[0].theta[k]), abs=1e-4), k


@pytest.mark.parametrize("method", ["HOAG", "MAID"])
def test_steps_into_an_ill_posed_region_are_rejected_not_taken(method):
    # λ = θ itself with n < d: for λ < 0 the inner problem is unbounded below (no minimiser),
    # and the first unit step from λ = 2 lands there
    inner, outer = RidgeInner("mean", param="raw"), RidgeOuter("mean")
    batch = ridge_problem(12, seed=0, d=20, noise=0.3)
    lam_star = ridge_optimum(inner, outer, batch)
    res = METHODS[method](inner, outer, max_iter=200).run({"lam": torch.tensor(2.0, dtype=DT)}, batch)
    assert res.success, res.message
    assert float(res.theta["lam"]) == pytest.approx(lam_star, rel=1e-3)
    lams = [r["theta"]["lam"] for r in res.history]
    assert max(abs(v) for v in lams) < 10, lams  # never a silent θ of 1e11
    assert all(r["theta"]["lam"] > 0 for r in res.history if r["accepted"])
    if method == "HOAG":
        bad = [r for r in res.history if r["theta"]["lam"] < 0]
        assert bad and all(not r["accepted"] for r in bad)
        assert any("inner" in (r["reason"] or "") for r in bad)
