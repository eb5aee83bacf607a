"""Field of experts with learned filters: closed-form products against autograd, hypergradients
against central differences (hypothesis, float64), scale behaviour and bad input."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bilevel import HOAG, ImplicitCG, InnerProblem, solve_inner
from recon.learned_experts import LearnedFieldOfExperts, initial_theta
from recon.losses import MSEToTarget

from _inner_checks import (assert_closed_forms_match_autograd,
                          assert_hypergradient_matches_central_difference)

DT = torch.float64


def _setup(seed=0, B=2, H=8, K=4, s=3):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(B, 1, H, H, generator=g, dtype=DT)
    batch = {"y": clean + 0.1 * torch.randn(clean.shape, generator=g, dtype=DT), "image": clean}
    theta = {"filters": torch.randn(K, 1, s, s, generator=g, dtype=DT) / s,
             "log_weights": -2.0 + 0.5 * torch.randn(K, generator=g, dtype=DT),
             "log_smoothing": torch.tensor(-3.0, dtype=DT)}
    return LearnedFieldOfExperts(K, s), batch, theta, g


def test_initial_theta_has_the_dct_filters_and_625_entries():
    theta = initial_theta()
    assert theta["filters"].shape == (24, 1, 5, 5)
    assert sum(v.numel() for v in theta.values()) == 625
    inner = LearnedFieldOfExperts()
    y = torch.rand(1, 1, 6, 6, dtype=DT)
    inner.check(y, theta, {"y": y})


def test_closed_form_gradient_and_products_match_autograd():
    inner, batch, theta, g = _setup()
    assert_closed_forms_match_autograd(inner, batch, theta, g, atol=1e-14)


@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), name=st.sampled_from(["filters", "log_weights", "log_smoothing"]),
       pick=st.integers(0, 35))
def test_hypergradient_matches_central_differences(seed, name, pick):
    inner, batch, theta, _ = _setup(seed)
    idx = pick % theta[name].numel()
    assert_hypergradient_matches_central_difference(inner, batch, theta, name, idx)


class _ScaledInner(InnerProblem):
    """``c·Φ`` with the closed forms of the base scaled by ``c``."""

    def __init__(self, base, c):
        self.base, self.c, self.theta_names = base, c, base.theta_names

    def objective(self, x, theta, batch):
        return self.c * self.base.objective(x, theta, batch)

    def init(self, theta, batch):
        return self.base.init(theta, batch)

    def grad(self, x, theta, batch):
        return self.c * self.base.grad(x, theta, batch)

    def hvp(self, x, theta, batch, v):
        return self.c * self.base.hvp(x, theta, batch, v)

    def mixed_vjp(self, x, theta, batch, q):
        return {k: self.c * t for k, t in self.base.mixed_vjp(x, theta, batch, q).items()}


class _ScaledOuter(MSEToTarget):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, theta, batch):
        return self.c * super().forward(x, theta, batch)


@pytest.mark.parametrize("c", [1e-3, 7.0, 1e3])
def test_scaling_phi_leaves_the_hypergradient_and_scaling_ell_scales_it(c):
    inner, batch, theta, _ = _setup(3)
    x = solve_inner(inner, theta, batch, tol=1e-13).x
    ref = ImplicitCG()(inner, MSEToTarget(), theta, batch, x, tol=1e-13).theta_grad
    phi_c = ImplicitCG()(_ScaledInner(inner, c), MSEToTarget(), theta, batch, x, tol=1e-13).theta_grad
    ell_c = ImplicitCG()(inner, _ScaledOuter(c), theta, batch, x, tol=1e-13).theta_grad
    for k in theta:
        assert torch.allclose(phi_c[k], ref[k], rtol=1e-7, atol=1e-13), k
        assert torch.allclose(ell_c[k], c * ref[k], rtol=1e-7, atol=1e-13 * c), k


def test_a_filter_acts_through_its_direction_only():
    inner, batch, theta, g = _setup(4)
    x = batch["y"] + 0.05 * torch.randn(batch["y"].shape, generator=g, dtype=DT)
    scaled = {**theta, "filters": theta["filters"] * torch.tensor([0.5, 2.0, 3.0, 10.0], dtype=DT).view(-1, 1, 1, 1)}
    assert torch.allclose(inner.objective(x, scaled, batch), inner.objective(x, theta, batch), rtol=1e-12)
    q = torch.randn(x.shape, generator=g, dtype=DT)
    d_f = inner.mixed_vjp(x, theta, batch, q)["filters"]
    assert torch.allclose((d_f * theta["filters"]).sum((1, 2, 3)), torch.zeros(4, dtype=DT), atol=1e-14)


def test_hoag_lowers_the_upper_loss_over_learned_filters():
    inner, batch, _, _ = _setup(2, B=2, H=12, K=8, s=3)
    theta = initial_theta(3, log_weight=-3.0)
    res = HOAG(inner, MSEToTarget(), max_iter=6).run(theta, batch)
    assert res.best_loss < 0.8 * res.history[0]["upper_loss"]
    assert not torch.allclose(res.theta["filters"], theta["filters"])


def test_bad_arguments_and_theta_shapes_are_named():
    with pytest.raises(ValueError, match="n_filters must be an int"):
        LearnedFieldOfExperts(0)
    with pytest.raises(ValueError, match="filter_size must be an odd int"):
        LearnedFieldOfExperts(4, 4)
    inner, batch, theta, _ = _setup()
    with pytest.raises(ValueError, match=r"theta\['filters'\] must have shape \(4, 1, 3, 3\)"):
        inner.check(batch["y"], {**theta, "filters": torch.zeros(4, 1, 5, 5, dtype=DT)}, batch)
    with pytest.raises(ValueError, match=r"theta\['log_weights'\] must have shape \(4,\)"):
        inner.check(batch["y"], {**theta, "log_weights": torch.zeros(3, dtype=DT)}, batch)
    with pytest.raises(ValueError, match=r"all-zero filter\(s\) \[1\]"):
        bad = theta["filters"].clone()
        bad[1] = 0
        inner.check(batch["y"], {**theta, "filters": bad}, batch)
    with pytest.raises(ValueError, match="missing"):
        inner.check(batch["y"], {k: v for k, v in theta.items() if k != "filters"}, batch)
