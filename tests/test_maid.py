"""AdaptiveInexact (a-posteriori hypergradient error bounds) and the MAID outer loop (float64)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from bilevel import HOAG, AdaptiveInexact, Bounds, ImplicitCG, MAID, solve_inner
from bilevel.linalg import batch_norm
from recon.losses import MSEToTarget
from recon.problems import TVDenoising

from bilevel_problems import QuadraticInner, QuadraticOuter, ScaledTargetOuter, ShrinkageInner

DT = torch.float64


# ---------------------------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------------------------
def _affine_quadratic(seed, n=6, K=2, B=3):
    """``Φ_b = ½xᵀM₀x − (c_b + Bt)ᵀx`` (M independent of t): ``x̂(t) = M₀⁻¹(c_b + Bt)`` is affine
    in t, so ``ℓ(t) = ½ mean_b ‖x̂_b(t) − target_b‖² + r·t`` is a convex quadratic with Hessian
    ``GᵀG`` and the closed-form minimiser ``t* = −(GᵀG)⁻¹(Gᵀ mean_b d_b + r)``, ``G = M₀⁻¹B``,
    ``d_b = M₀⁻¹c_b − target_b``. Returns ``(inner, outer, batch, t*, μ = λ_min(M₀), λ_min(GᵀG))``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=DT)
    M0 = A @ A.T / n + torch.eye(n, dtype=DT)
    Bmat = torch.linalg.qr(torch.randn(n, K, generator=g, dtype=DT))[0]
    inner = QuadraticInner(M0, torch.zeros(K, n, n, dtype=DT), Bmat)
    batch = {"c": torch.randn(B, n, generator=g, dtype=DT),
             "target": torch.randn(B, n, generator=g, dtype=DT)}
    r = 0.1 * torch.randn(K, generator=g, dtype=DT)
    G = torch.linalg.solve(M0, Bmat)
    d = torch.linalg.solve(M0, batch["c"].T).T - batch["target"]
    t_star = -torch.linalg.solve(G.T @ G, G.T @ d.mean(0) + r)
    mu = float(torch.linalg.eigvalsh(M0).min())
    return inner, QuadraticOuter(r), batch, t_star, mu, float(torch.linalg.eigvalsh(G.T @ G).min())


def _tv_batch(seed, B=2, H=8, W=8, sigma=0.1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(B, 1, H, W, generator=g, dtype=DT)
    return {"y": clean + sigma * torch.randn(B, 1, H, W, generator=g, dtype=DT), "image": clean}


def _theta(lw, ls):
    return {"log_weight": torch.tensor(float(lw), dtype=DT), "log_smoothing": torch.tensor(float(ls), dtype=DT)}


def _exact(inner, outer, theta, batch):
    """Loss and hypergradient at (near) machine precision."""
    sol = solve_inner(inner, theta, batch, 1e-13, method="newton-cg", max_iter=100)
    hg = ImplicitCG(max_iter=2000)(inner, outer, theta, batch, sol.x, tol=1e-15)
    return hg, sol.x


def _true_loss(inner, outer, theta, batch):
    """``(ℓ(x̂), uncertainty)``: the reference is exact up to its own loss bound and round-off."""
    hg, x = _exact(inner, outer, theta, batch)
    unc = AdaptiveInexact().loss_error_bound(inner, outer, theta, batch, x)[1]
    return hg.loss, unc + 8 * torch.finfo(DT).eps * abs(hg.loss)


def _dist(a, b):
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


# ---------------------------------------------------------------------------------------------
# MAID converges
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 2])
def test_maid_converges_to_closed_form_optimum_of_quadratic_bilevel_problem(seed):
    inner, outer, batch, t_star, mu, curvature = _affine_quadratic(seed)
    gtol = 1e-6
    res = MAID(inner, outer, mu=mu, max_iter=100, gtol=gtol).run({"t": torch.zeros_like(t_star)}, batch)
    assert res.success and "certified" in res.message, res.message
    last, g0 = res.history[-1], res.history[0]["projected_grad_norm"]
    assert last["projected_grad_norm"] + last["error_bound"] <= gtol * g0  # gtol is relative
    # ℓ is μ_ℓ-strongly convex in t: ‖t − t*‖ ≤ ‖∇ℓ(t)‖/μ_ℓ ≤ (‖z‖ + ω)/μ_ℓ
    assert float((res.theta["t"] - t_star).norm()) <= gtol * g0 / curvature
    assert len(res.history) < 40


def test_maid_reaches_known_optimum_of_nonlinear_shrinkage_problem():
    c = 0.6
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4, 1, 8, 8, generator=g, dtype=DT)
    res = MAID(ShrinkageInner(), ScaledTargetOuter(), mu=2 / 64, max_iter=80, gtol=1e-10).run(
        {"log_reg": torch.tensor(2.0, dtype=DT)}, {"y": y, "target": c * y})
    assert abs(float(res.theta["log_reg"]) - math.log(1 / c - 1)) < 1e-4, res.message


def test_maid_learns_tv_parameters_and_never_increases_the_loss_beyond_its_allowance():
    inner, outer = TVDenoising(), MSEToTarget()
    batch = _tv_batch(3, B=3, H=12, W=12, sigma=0.15)
    maid = MAID(inner, outer, max_iter=12, inner_method="accelerated-gradient",
                inner_max_iter=5000, bounds=Bounds(lower={"log_smoothing": -7.0}))
    res = maid.run(_theta(-5.0, -4.0), batch)
    h = res.history
    assert len(h) == 12 and not res.success and "maximum number of outer iterations" in res.message
    for key in ("eps", "delta", "step_size", "error_bound", "loss_allowance", "upper_loss", "cost",
                "inner_iterations", "cg_iterations", "seconds", "elapsed", "accepted", "theta"):
        assert key in h[0], key
    # between consecutive records: ℓ̃_{k+1} ≤ ℓ̃_k + a_k + a_{k+1}
    for prev, cur in zip(h.records, h.records[1:]):
        allowance = prev["loss_allowance"] + cur["loss_allowance"]
        assert cur["upper_loss"] <= prev["upper_loss"] + allowance + 1e-15, (prev, cur)
    # and the true loss (solved to machine precision) never increases
    ref = [_true_loss(inner, outer, {k: torch.tensor(v, dtype=DT) for k, v in r["theta"].items()}, batch)
           for r in h]
    true = [t for t, _ in ref]
    assert all(b <= a + ua + ub for (a, ua), (b, ub) in zip(ref, ref[1:])), true
    assert true[-1] < 0.9 * true[0]
    # the reported losses are within their allowances of the truth
    for r, (t, unc) in zip(h, ref):
        assert abs(r["upper_loss"] - t) <= r["loss_allowance"] + unc
    assert any(r["step_accepted"] for r in h)
    costs = h.column("cost")
    assert costs == sorted(costs) and costs[-1] > 0


def test_maid_cost_budget_is_reported():
    inner, outer = TVDenoising(), MSEToTarget()
    batch = _tv_batch(1, B=2, H=8, W=8)
    res = MAID(inner, outer, max_iter=100, max_cost=40).run(_theta(-4.0, -4.0), batch)
    assert not res.success
    assert "budget of 40 lower-level + CG iterations exhausted" in res.message
    assert res.history[-1]["cost"] >= 40 or len(res.history) < 100
    assert res.n_iter == len(res.history) >= 1


def test_maid_on_the_bound_stops_with_a_projected_gradient_certificate():
    # the optimum log(2/3) of the shrinkage problem lies below the lower bound 0.5
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 1, 6, 6, generator=g, dtype=DT)
    res = MAID(ShrinkageInner(), ScaledTargetOuter(), mu=2 / 36, max_iter=60, gtol=1e-8,
               bounds=Bounds(lower={"log_reg": 0.5})).run({"log_reg": torch.tensor(2.0, dtype=DT)},
                                                          {"y": y, "target": 0.6 * y})
    assert float(res.theta["log_reg"]) == pytest.approx(0.5)
    assert all(t["log_reg"] >= 0.5 - 1e-12 for t in res.history.column("theta"))
    assert res.history[-1]["projected_grad_norm"] < 1e-6


# ---------------------------------------------------------------------------------------------
# the error bounds
# ---------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 100_000), B=st.integers(1, 3), H=st.integers(5, 9),
       lw=st.floats(-5.0, -1.0), ls=st.floats(-7.0, -2.0), sigma=st.floats(0.05, 0.3),
       eps_exp=st.floats(-6.0, -1.0), delta_exp=st.floats(-6.0, -1.0),
       solver=st.sampled_from(["accelerated-gradient", "lbfgs"]))
def test_error_bounds_are_never_below_the_true_errors_on_tv_denoising(
        seed, B, H, lw, ls, sigma, eps_exp, delta_exp, solver):
    inner, outer = TVDenoising(), MSEToTarget()
    batch = _tv_batch(seed, B=B, H=H, W=H + 1, sigma=sigma)
    theta = _theta(lw, ls)
    true, x_ref = _exact(inner, outer, theta, batch)
    # the reference is exact only up to its own (tiny) error bounds and round-off
    ref = AdaptiveInexact()(inner, outer, theta, batch, x_ref, tol=1e-15)
    ref_grad_unc = ref.error_bound
    ref_loss_unc = ref.bound.loss + 8 * torch.finfo(DT).eps * abs(true.loss)
    # an inexact inner solution and CG solve, at random accuracies relative to the initial sizes
    x0 = inner.init(theta, batch)
    r0 = float(batch_norm(inner.grad(x0, theta, batch)).max())
    sol = solve_inner(inner, theta, batch, 10 ** eps_exp * r0, method=solver, max_iter=5000)
    g0 = float(batch_norm(2 * (sol.x - batch["image"]) / sol.x.numel()).max())
    est = AdaptiveInexact()
    hg = est(inner, outer, theta, batch, sol.x, tol=10 ** delta_exp * g0)
    err = _dist(hg.theta_grad, true.theta_grad)
    assert hg.error_bound >= err - ref_grad_unc, (hg.error_bound, err, hg.bound.terms)
    assert hg.bound.loss >= abs(hg.loss - true.loss) - ref_loss_unc
    # the first-order loss bound (no adjoint) holds too
    loss1, a1 = est.loss_error_bound(inner, outer, theta, batch, sol.x)
    assert loss1 == pytest.approx(hg.loss, rel=1e-14)
    assert a1 >= abs(hg.loss - true.loss) - ref_loss_unc
    # the same hypergradient as ImplicitCG at the same CG accuracy (both cold-started)
    ref = ImplicitCG(max_iter=500)(inner, outer, theta, batch, sol.x, tol=10 ** delta_exp * g0)
    assert _dist(hg.theta_grad, ref.theta_grad) <= 1e-12 * (1 + ref.norm())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 100_000), eps=st.floats(1e-8, 1e-1), delta=st.floats(1e-8, 1e-1))
def test_bound_with_given_lipschitz_constants_is_rigorous_on_quadratics(seed, eps, delta):
    inner, outer, batch, _, mu, _ = _affine_quadratic(seed % 1000, B=3)
    theta = {"t": 0.3 * torch.ones(2, dtype=DT)}
    x_hat = inner.closed_form(theta["t"], batch)
    true = ImplicitCG(max_iter=200)(inner, outer, theta, batch, x_hat, tol=1e-14)
    # exact constants: Φ is quadratic in x with a constant mixed block, ℓ has ∇ₓℓ = (x − t)/B
    est = AdaptiveInexact(mu=mu, lipschitz={"hessian": 0.0, "mixed": 0.0, "outer_x": 1 / 3,
                                            "outer_theta": 0.0})
    g = torch.Generator().manual_seed(seed)
    x = x_hat + eps * torch.randn(x_hat.shape, generator=g, dtype=DT)
    hg = est(inner, outer, theta, batch, x, tol=delta)
    ref = AdaptiveInexact(mu=mu, lipschitz=est.fixed)(inner, outer, theta, batch, x_hat, tol=1e-14)
    ref_loss_unc = ref.bound.loss + 8 * torch.finfo(DT).eps * abs(true.loss)
    assert hg.error_bound >= _dist(hg.theta_grad, true.theta_grad) - ref.error_bound
    assert hg.bound.loss >= abs(hg.loss - true.loss) - ref_loss_unc
    assert est.lipschitz("hessian") == 0.0 and est.lipschitz_estimates == {}


def test_power_iteration_norm_of_the_mixed_block_for_many_hyperparameters():
    inner, outer, batch, _, mu, _ = _affine_quadratic(4, K=3)
    theta = {"t": 0.2 * torch.ones(3, dtype=DT)}
    x = inner.closed_form(theta["t"], batch) + 1e-3
    exact = AdaptiveInexact(mu=mu)(inner, outer, theta, batch, x, tol=1e-6)
    power = AdaptiveInexact(mu=mu, max_exact_dim=2)(inner, outer, theta, batch, x, tol=1e-6)
    # the mixed block is −Bmat per sample: ‖B‖ = √(batch size)·σ_max(Bmat) = √3 (orthonormal columns)
    assert exact.bound.mixed_norm == pytest.approx(math.sqrt(3), rel=1e-10)
    assert math.sqrt(3) <= power.bound.mixed_norm <= 1.05 * math.sqrt(3) * (1 + 1e-9)


def test_trial_evaluation_then_complete_equals_a_full_call():
    inner, outer = TVDenoising(), MSEToTarget()
    batch = _tv_batch(5)
    theta = _theta(-3.0, -4.0)
    x = solve_inner(inner, theta, batch, 1e-5, method="lbfgs").x
    full = AdaptiveInexact(warm_start=False, probe_every=1)(inner, outer, theta, batch, x, 1e-7)
    est = AdaptiveInexact(warm_start=False, probe_every=1)
    est(inner, outer, theta, batch, x, 1e-7)  # first call probes
    part = est(inner, outer, theta, batch, x, 1e-7, error_bound=False)
    assert part.error_bound is None and part.bound.loss > 0
    est.complete(inner, theta, batch, x, part)
    assert part.error_bound == pytest.approx(full.error_bound, rel=1e-10)
    assert part.cg_iterations > full.cg_iterations - full.bound.products


def test_adaptive_inexact_works_inside_hoag_and_reports_its_bound():
    inner, outer = TVDenoising(), MSEToTarget()
    batch = _tv_batch(2)
    seen = []
    res = HOAG(inner, outer, estimator=AdaptiveInexact(), max_iter=4,
               callback=lambda rec, th: seen.append(rec) and False).run(_theta(-4.0, -4.0), batch)
    assert len(res.history) == 4 and len(seen) == 4


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_missing_strong_convexity_is_a_clear_error():
    inner, outer, batch, t_star, _, _ = _affine_quadratic(0)
    assert inner.strong_convexity_constant({"t": t_star}, batch) is None
    with pytest.raises(ValueError, match=r"strong-convexity constant μ.*QuadraticInner.*mu="):
        MAID(inner, outer).run({"t": torch.zeros_like(t_star)}, batch)
    x = inner.closed_form(t_star, batch)
    with pytest.raises(ValueError, match=r"AdaptiveInexact needs the strong-convexity constant"):
        AdaptiveInexact()(inner, outer, {"t": t_star}, batch, x, tol=1e-6)


class _NonPositiveMu(ShrinkageInner):
    def strong_convexity_constant(self, theta, batch):
        return 0.0


def test_bad_arguments_name_themselves():
    inner, outer = ShrinkageInner(), ScaledTargetOuter()
    theta = {"log_reg": torch.tensor(1.0, dtype=DT)}
    y = torch.ones(2, 1, 4, 4, dtype=DT)
    batch = {"y": y, "target": 0.5 * y}
    with pytest.raises(ValueError, match=r"strong_convexity_constant.*finite positive.*0\.0"):
        MAID(_NonPositiveMu(), outer).run(theta, batch)
    with pytest.raises(ValueError, match=r"mu must be a finite positive number, got -1"):
        MAID(inner, outer, mu=-1.0)
    with pytest.raises(TypeError, match="estimator must be an AdaptiveInexact.*ImplicitCG"):
        MAID(inner, outer, mu=1.0, estimator=ImplicitCG())
    with pytest.raises(ValueError, match=r"eta must lie in \(0, 1\), got 1\.5"):
        MAID(inner, outer, mu=1.0, eta=1.5)
    with pytest.raises(ValueError, match=r"nu and grow must be ≥ 1.*nu=0\.5"):
        MAID(inner, outer, mu=1.0, nu=0.5)
    with pytest.raises(ValueError, match=r"max_cost must be a positive int or None, got 0"):
        MAID(inner, outer, mu=1.0, max_cost=0)
    with pytest.raises(ValueError, match=r"max_iter must be a positive int, got 0"):
        MAID(inner, outer, mu=1.0, max_iter=0)
    with pytest.raises(ValueError, match=r"lipschitz has unknown key 'hessain'"):
        AdaptiveInexact(lipschitz={"hessain": 1.0})
    with pytest.raises(ValueError, match=r"safety must be a finite number ≥ 1, got 0\.5"):
        AdaptiveInexact(safety=0.5)
    with pytest.raises(ValueError, match=r"probe_every must be a positive int, got 0"):
        AdaptiveInexact(probe_every=0)
    with pytest.raises(ValueError, match=r"unknown name.*'lam'"):
        MAID(inner, outer, mu=1.0).run(dict(theta, lam=torch.tensor(1.0)), batch)
    with pytest.raises(ValueError, match=r"tol must be a finite positive number, got -1"):
        AdaptiveInexact(mu=1.0)(inner, outer, theta, batch, y.clone(), tol=-1)


def test_interrupted_maid_run_resumes_from_its_checkpoint(tmp_path):
    from bilevel import Result

    c = 0.6
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 1, 6, 6, generator=g, dtype=DT)
    batch = {"y": y, "target": c * y}
    theta0 = {"log_reg": torch.tensor(2.0, dtype=DT)}
    full = MAID(ShrinkageInner(), ScaledTargetOuter(), mu=2 / 36).run(theta0, batch)
    path = str(tmp_path / "maid.pt")
    first = MAID(ShrinkageInner(), ScaledTargetOuter(), mu=2 / 36, checkpoint=path,
                 callback=lambda rec, th: rec["iteration"] == 2).run(theta0, batch)
    assert first.message == "stopped by callback" and len(first.history) == 3
    resumed = MAID(ShrinkageInner(), ScaledTargetOuter(), mu=2 / 36).run(theta0, batch,
                                                                         resume=Result.load(path))
    assert resumed.success and resumed.history.column("iteration")[:3] == [0, 1, 2]
    assert float(resumed.theta["log_reg"]) == pytest.approx(float(full.theta["log_reg"]), abs=1e-6)
    assert float(resumed.theta["log_reg"]) == pytest.approx(math.log(1 / c - 1), abs=1e-5)


def test_spectral_steps_certify_the_quickstart_optimum_that_fixed_factors_crawl_towards():
    """TV weight against a smoothing the loss hardly depends on (a narrow curved valley): with
    Barzilai–Borwein lengths MAID certifies stationarity within 30 iterations, 1e-10 from the
    quasi-Newton optimum; the authors' grow/shrink factors are still ~3e-2 away after 60."""
    from bilevel import QuasiNewton
    from bilevel_problems import small_quickstart

    inner, outer, theta0, batch, bounds = small_quickstart()
    best = QuasiNewton(inner, outer, bounds=bounds).run(theta0, batch).upper_loss
    runs = {rule: MAID(inner, outer, bounds=bounds, step_rule=rule,
                       max_iter=max_iter).run(dict(theta0), batch)
            for rule, max_iter in (("spectral", 30), ("adaptive", 60))}
    fast, slow = runs["spectral"], runs["adaptive"]
    assert fast.success, fast.message
    assert (fast.upper_loss - best) / best < 1e-10
    assert not slow.success and (slow.upper_loss - best) / best > 1e-3


def test_step_rule_is_checked():
    with pytest.raises(ValueError, match="step_rule.*'bb'"):
        MAID(ShrinkageInner(), ScaledTargetOuter(), mu=1.0, step_rule="bb")
