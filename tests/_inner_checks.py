"""Checks shared by the tests of many-parameter inner problems (importable helpers, not tests)."""
import pytest

from bilevel import ImplicitCG, solve_inner
from recon.losses import MSEToTarget


def perturbed(theta, name, idx, h):
    """A copy of ``theta`` with entry ``idx`` of ``theta[name]`` (flattened) moved by ``h``."""
    out = {n: v.clone() for n, v in theta.items()}
    out[name].view(-1)[idx] += h
    return out


def assert_hypergradient_matches_central_difference(inner, batch, theta, name, idx, h=1e-5):
    """The implicit hypergradient of the MSE to ``batch["image"]`` in entry ``idx`` of
    ``theta[name]`` equals ``(ℓ(θ + h e) − ℓ(θ − h e))/2h`` (inner solves and CG to 1e-13)."""
    outer = MSEToTarget()
    x = solve_inner(inner, theta, batch, tol=1e-13).x
    hg = ImplicitCG()(inner, outer, theta, batch, x, tol=1e-13)
    f = [float(outer(solve_inner(inner, t, batch, tol=1e-13).x, t, batch))
         for t in (perturbed(theta, name, idx, h), perturbed(theta, name, idx, -h))]
    fd = (f[0] - f[1]) / (2 * h)
    got = float(hg.theta_grad[name].reshape(-1)[idx])
    assert got == pytest.approx(fd, rel=1e-5, abs=1e-11), (name, idx)
