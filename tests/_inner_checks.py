"""Checks shared by the tests of many-parameter inner problems (importable helpers, not tests)."""
import pytest
import torch

from bilevel import ImplicitCG, solve_inner
from bilevel.linalg import HessianOperator
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


def assert_closed_forms_match_autograd(inner, batch, theta, generator, atol):
    """At ``x = y + 0.05·noise``: the closed-form gradient, Hessian-vector product and mixed
    product of ``inner`` equal autograd's (rtol 1e-10 / 1e-9, absolute ``atol``), and the mixed
    product has every θ entry in its shape."""
    dt = batch["y"].dtype
    x = batch["y"] + 0.05 * torch.randn(batch["y"].shape, generator=generator, dtype=dt)
    v = torch.randn(x.shape, generator=generator, dtype=dt)
    auto = HessianOperator(inner, x, theta, batch, mode="autograd")
    closed = HessianOperator(inner, x, theta, batch, mode="closed")
    xg = x.clone().requires_grad_(True)
    (g_auto,) = torch.autograd.grad(inner.objective(xg, theta, batch).sum(), xg)
    assert torch.allclose(inner.grad(x, theta, batch), g_auto, rtol=1e-10, atol=atol)
    assert torch.allclose(closed.hvp(v), auto.hvp(v), rtol=1e-9, atol=atol)
    m_auto, m_closed = auto.mixed_vjp(v), closed.mixed_vjp(v)
    assert set(m_closed) == set(theta)
    for k in theta:
        assert m_closed[k].shape == theta[k].shape, k
        assert torch.allclose(m_closed[k], m_auto[k], rtol=1e-9, atol=atol), k
