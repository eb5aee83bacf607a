import pytest
import torch
from hypothesis import given, settings, strategies as st

from bilevel.linalg import NonPositiveCurvatureError, batch_norm, batched_cg


def _spd_batch(seed, B, n, cond):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, cond, n, dtype=torch.float64).expand(B, n)
    return Q @ torch.diag_embed(eig) @ Q.transpose(1, 2), torch.randn(B, n, generator=g, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 5), n=st.integers(1, 30), cond=st.floats(0, 3))
def test_cg_solves_random_spd_systems(seed, B, n, cond):
    A, b = _spd_batch(seed, B, n, cond)
    res = batched_cg(lambda v: torch.einsum("bij,bj->bi", A, v), b, tol=1e-10, max_iter=10 * n + 10)
    exact = torch.linalg.solve(A, b)
    assert res.all_converged
    assert torch.allclose(res.x, exact, rtol=1e-7, atol=1e-8)
    resid = batch_norm(torch.einsum("bij,bj->bi", A, res.x) - b)
    assert torch.all(resid <= 1e-10 * 1.0001)


def test_cg_stops_per_sample_and_warm_start():
    A, b = _spd_batch(0, 3, 20, 2)
    b[1] = 0.0  # sample 1 is solved by x = 0 from the start
    mv = lambda v: torch.einsum("bij,bj->bi", A, v)  # noqa: E731
    res = batched_cg(mv, b, tol=1e-9)
    assert res.iterations[1] == 0 and res.iterations[0] > 0
    warm = batched_cg(mv, b, x0=res.x, tol=1e-8)
    assert warm.max_iterations == 0


def test_cg_flags_iteration_cap():
    A, b = _spd_batch(1, 2, 40, 4)
    res = batched_cg(lambda v: torch.einsum("bij,bj->bi", A, v), b, tol=1e-12, max_iter=3)
    assert not res.all_converged and res.max_iterations == 3


def test_cg_raises_on_non_positive_curvature():
    A = -torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    with pytest.raises(NonPositiveCurvatureError, match="non-positive curvature"):
        batched_cg(lambda v: torch.einsum("bij,bj->bi", A, v), torch.ones(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_cg_rejects_bad_tolerance(bad):
    with pytest.raises(ValueError, match="tol"):
        batched_cg(lambda v: v, torch.ones(1, 3), tol=bad)
