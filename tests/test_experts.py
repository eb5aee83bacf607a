"""Field-of-experts denoising: closed-form products against autograd, hypergradient against
finite differences, and bad input."""
import pytest
import torch

from bilevel import HOAG, ImplicitCG, solve_inner
from recon.experts import FieldOfExpertsDenoising, dct_filters
from recon.losses import MSEToTarget

from _inner_checks import assert_closed_forms_match_autograd

DT = torch.float64


def _setup(seed=0, B=2, H=8):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(B, 1, H, H, generator=g, dtype=DT)
    batch = {"y": clean + 0.1 * torch.randn(clean.shape, generator=g, dtype=DT), "image": clean}
    theta = {"log_weights": -3.0 + 0.5 * torch.randn(24, generator=g, dtype=DT),
             "log_smoothing": torch.tensor(-4.0, dtype=DT)}
    return FieldOfExpertsDenoising(), batch, theta, g


def test_dct_filters_are_orthonormal_and_zero_mean():
    f = dct_filters(5).flatten(1)
    assert f.shape == (24, 25)
    assert torch.allclose(f @ f.T, torch.eye(24, dtype=DT), atol=1e-12)
    assert torch.allclose(f.sum(1), torch.zeros(24, dtype=DT), atol=1e-12)


def test_closed_form_gradient_and_products_match_autograd():
    inner, batch, theta, g = _setup()
    assert_closed_forms_match_autograd(inner, batch, theta, g, atol=1e-14)


def test_hypergradient_matches_central_differences():
    inner, batch, theta, _ = _setup(1)
    outer = MSEToTarget()
    x = solve_inner(inner, theta, batch, tol=1e-13).x
    hg = ImplicitCG()(inner, outer, theta, batch, x, tol=1e-13)
    h = 1e-5
    for k, idx in (("log_weights", 3), ("log_weights", 17), ("log_smoothing", None)):
        plus = {n: v.clone() for n, v in theta.items()}
        minus = {n: v.clone() for n, v in theta.items()}
        if idx is None:
            plus[k] += h
            minus[k] -= h
        else:
            plus[k][idx] += h
            minus[k][idx] -= h
        f = [float(outer(solve_inner(inner, t, batch, tol=1e-13).x, t, batch)) for t in (plus, minus)]
        fd = (f[0] - f[1]) / (2 * h)
        got = float(hg.theta_grad[k] if idx is None else hg.theta_grad[k][idx])
        assert got == pytest.approx(fd, rel=1e-5, abs=1e-12), (k, idx)


def test_hoag_lowers_the_upper_loss_with_25_hyperparameters():
    inner, batch, theta, _ = _setup(2, B=2, H=12)
    res = HOAG(inner, MSEToTarget(), max_iter=8).run(theta, batch)
    assert res.best_loss < 0.8 * res.history[0]["upper_loss"]


def test_bad_filters_and_theta_are_named():
    with pytest.raises(ValueError, match="filters must be a"):
        FieldOfExpertsDenoising(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="odd sizes"):
        FieldOfExpertsDenoising(torch.zeros(2, 1, 4, 4))
    inner, batch, theta, _ = _setup()
    with pytest.raises(ValueError, match=r"log_weights'\] must have shape \(24,\)"):
        inner.check(batch["y"], {**theta, "log_weights": torch.zeros(3, dtype=DT)}, batch)
