import pytest
import torch

from bilevel import solve_inner
from bilevel.solvers import METHODS
from recon.problems import TVDenoising

DT = torch.float64


def _batch(seed=0, B=3, H=16, W=16):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(B, 1, H, W, generator=g, dtype=DT)
    return {"y": clean + 0.1 * torch.randn(clean.shape, generator=g, dtype=DT), "image": clean}


THETA = {"log_weight": torch.tensor(-2.0, dtype=DT), "log_smoothing": torch.tensor(-5.0, dtype=DT)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_solvers_reach_tolerance_per_sample(method):
    inner, batch = TVDenoising(), _batch()
    res = solve_inner(inner, THETA, batch, tol=1e-10, method=method, max_iter=2000)
    assert res.all_converged and torch.all(res.grad_norm <= 1e-10)
    g = inner.grad(res.x, THETA, batch)
    assert torch.all(g.flatten(1).norm(dim=1) <= 1e-10)
    assert res.iterations.shape == (3,)


def test_all_solvers_find_the_same_minimiser():
    inner, batch = TVDenoising(), _batch(1)
    xs = [solve_inner(inner, THETA, batch, tol=1e-11, method=m, max_iter=3000).x for m in METHODS]
    for x in xs[1:]:
        # ‖x − x̂‖ ≤ ‖∇Φ‖/μ with μ = 2/n
        assert (x - xs[0]).abs().max() < 1e-7


def test_newton_cg_reaches_1e12_in_a_dozen_steps():
    inner, batch = TVDenoising(), _batch(2, B=4, H=32, W=32)
    res = solve_inner(inner, THETA, batch, tol=1e-12, method="newton-cg")
    assert res.all_converged and res.max_iterations <= 15


@pytest.mark.parametrize("method", sorted(METHODS))
def test_warm_start_at_solution_takes_no_iterations(method):
    inner, batch = TVDenoising(), _batch(3)
    res = solve_inner(inner, THETA, batch, tol=1e-9, method=method, max_iter=2000)
    again = solve_inner(inner, THETA, batch, tol=1e-9, x0=res.x, method=method)
    assert again.max_iterations == 0


@pytest.mark.parametrize("log_smoothing", [-7.0, -5.0])
def test_accelerated_gradient_keeps_its_rate_at_tight_tolerances(log_smoothing):
    """Restarting on objective increases fires at random once Φ changes below its round-off:
    that rule needed 333 (log ε = −7) and 1854 (−5) iterations here; the gradient restart
    test needs under 200."""
    from bilevel.linalg import batch_norm
    from recon.data.natural_images import denoising_batch

    inner, batch = TVDenoising(), denoising_batch(4, 32, 0.1, seed=0, dtype=DT)
    theta = {"log_weight": torch.tensor(-2.0, dtype=DT),
             "log_smoothing": torch.tensor(log_smoothing, dtype=DT)}
    ref = float(batch_norm(inner.grad(inner.init(theta, batch), theta, batch)).max())
    res = solve_inner(inner, theta, batch, tol=1e-10 * ref, method="accelerated-gradient",
                      max_iter=20000)
    assert res.all_converged and res.max_iterations <= 300


def test_iteration_cap_is_reported():
    inner, batch = TVDenoising(), _batch(4)
    res = solve_inner(inner, THETA, batch, tol=1e-14, method="accelerated-gradient", max_iter=3)
    assert not res.all_converged and res.max_iterations == 3


def test_samples_stop_independently():
    inner, batch = TVDenoising(), _batch(5, B=2)
    batch["y"][1] = 0.0  # a constant image is its own TV-denoised solution
    res = solve_inner(inner, THETA, batch, tol=1e-10, method="lbfgs")
    assert res.iterations[1] == 0 and res.iterations[0] > 0


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="method"):
        solve_inner(TVDenoising(), THETA, _batch(), tol=1e-6, method="adam")
