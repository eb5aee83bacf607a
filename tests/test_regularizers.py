import math

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from recon.regularizers import SmoothedTV, forward_differences, forward_differences_adjoint, smoothed_tv
from recon.problems import TVDenoising


def _reference_tv(x: np.ndarray, t0: float, t1: float) -> float:
    """Section 2.5 of the reference, written out with loops over (b, c, i, j)."""
    B, C, H, W = x.shape
    total = 0.0
    for b in range(B):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    dx = x[b, c, i, j + 1] - x[b, c, i, j] if j + 1 < W else 0.0
                    dy = x[b, c, i + 1, j] - x[b, c, i, j] if i + 1 < H else 0.0
                    total += math.sqrt(dx * dx + dy * dy + math.exp(t1))
    return math.exp(t0) * total / (B * C * H * W)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), t0=st.floats(-5, 2), t1=st.floats(-10, 0),
       shape=st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 6), st.integers(1, 6)))
def test_smoothed_tv_matches_reference_formula(seed, t0, t1, shape):
    x = np.random.default_rng(seed).random(shape)
    got = SmoothedTV(reduction="mean")(torch.from_numpy(x), {"log_weight": torch.tensor(t0, dtype=torch.float64),
                                                            "log_smoothing": torch.tensor(t1, dtype=torch.float64)})
    assert math.isclose(float(got), _reference_tv(x, t0, t1), rel_tol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), H=st.integers(1, 9), W=st.integers(1, 9))
def test_difference_adjoint(seed, H, W):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, H, W, generator=g, dtype=torch.float64)
    ph, pv = torch.randn(2, 2, 1, H, W, generator=g, dtype=torch.float64)
    ph[..., :, -1] = 0  # D has zero output there
    pv[..., -1, :] = 0
    dh, dv = forward_differences(x)
    lhs = (dh * ph).sum() + (dv * pv).sum()
    rhs = (x * forward_differences_adjoint(ph, pv)).sum()
    assert math.isclose(float(lhs), float(rhs), rel_tol=1e-12, abs_tol=1e-12)


def test_tv_denoising_objective_is_per_sample_and_batch_size_invariant():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    th = {"log_weight": torch.tensor(-1.0, dtype=torch.float64), "log_smoothing": torch.tensor(-3.0, dtype=torch.float64)}
    p = TVDenoising()
    full = p.objective(x, th, {"y": y})
    assert full.shape == (3,)
    one = p.objective(x[1:2], th, {"y": y[1:2]})
    assert torch.allclose(full[1:2], one)
    expected = ((x[1] - y[1]) ** 2).mean() + smoothed_tv(x[1:2], th["log_weight"], th["log_smoothing"], "mean")
    assert torch.allclose(full[1], expected)
    assert p.strong_convexity_constant(th, {"y": y}) == 2.0 / 64
