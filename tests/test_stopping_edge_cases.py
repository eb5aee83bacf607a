"""Stopping rules on a user-style problem with two hyperparameters of different shapes.

Inner (per sample ``b``, ``x_b ∈ R^d``): ``Φ_b(x; a, v) = mean_d[½(x − y_b)² + ½e^a x² − v x]``,
so ``x̂_b = (y_b + v)/(1 + e^a)``; upper loss ``½ mean (x̂ − t)²``. With ``s = 1/(1 + e^a)`` and
``u = s v`` the upper loss is a least-squares fit ``t ≈ s y + u``: the optimum has a closed form.

The cases: a bound that is active at the optimum (MAID's line search once never ended such a run
with success, and in float32 certified a point 16 % above the optimum); bounds in float32 with a
small upper loss (the projected gradient was formed in θ's dtype and read 0 at the start); and
QuasiNewton in float32 (its ``gtol`` sat below the gradient's own accuracy, so it spun to
``max_iter`` at the optimum), and QuasiNewton where the inner solve stalls at round-off above the
floor (it rejected every step and ended with "cannot recover").
"""
from __future__ import annotations

import math

import pytest
import torch

from bilevel import HOAG, MAID, Bounds, InnerProblem, OuterLoss, QuasiNewton
from bilevel.problem import gradient_mapping_norm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ShiftShrink(InnerProblem):
    """``mean_d[½(x − y)² + ½e^a x² − v x]`` per sample (module docstring)."""

    theta_names = ("a", "v")

    def __init__(self, agg: str = "mean"):
        self.agg = agg

    def objective(self, x, theta, batch):
        phi = 0.5 * (x - batch["y"]) ** 2 + 0.5 * torch.exp(theta["a"]) * x ** 2 - theta["v"] * x
        return phi.mean(-1) if self.agg == "mean" else phi.sum(-1)

    def init(self, theta, batch):
        return torch.zeros_like(batch["y"])

    def strong_convexity_constant(self, theta, batch):
        return (1 + float(torch.exp(theta["a"]))) / (batch["y"].shape[-1] if self.agg == "mean" else 1)


class Fit(OuterLoss):
    def __init__(self, scale: float = 1.0, agg: str = "mean"):
        super().__init__()
        self.scale, self.agg = scale, agg

    def forward(self, x, theta, batch):
        r = 0.5 * (x - batch["t"]) ** 2
        return self.scale * (r.mean() if self.agg == "mean" else r.sum())


def _data(dtype, n=50, d=5):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = 0.6 * y + torch.randn(d, generator=g, dtype=torch.float64) \
        + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return {"y": y.to(dtype), "t": t.to(dtype)}


def _loss(theta, batch, scale=1.0):
    """The exact upper loss at θ (closed-form x̂, float64)."""
    b = {k: v.double() for k, v in batch.items()}
    a, v = theta["a"].double(), theta["v"].double()
    return float(Fit(scale)((b["y"] + v) / (1 + torch.exp(a)), theta, b))


def _optimum(batch, a_min=-math.inf):
    """``(θ*, ℓ*)``: the least-squares fit; with ``a ≥ a_min`` active, ``s = 1/(1 + e^{a_min})``
    is fixed and only ``u`` is fitted."""
    y, t = batch["y"].double(), batch["t"].double()
    yc, tc = y - y.mean(0), t - t.mean(0)
    s = float((yc * tc).sum() / (yc * yc).sum())
    if math.log(1 / s - 1) < a_min:
        s = 1 / (1 + math.exp(a_min))
    u = t.mean(0) - s * y.mean(0)
    theta = {"a": torch.tensor(math.log(1 / s - 1), dtype=torch.float64), "v": u / s}
    return theta, _loss(theta, batch)


def _start(dtype, a=0.0, v=0.0):
    return {"a": torch.tensor(a, dtype=dtype), "v": torch.full((5,), v, dtype=dtype)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maid_with_a_bound_active_at_the_optimum_reaches_it(dtype):
    batch = _data(dtype)
    bounds = Bounds(lower={"a": 0.0})  # the free optimum has a ≈ −0.4
    _, f_star = _optimum(batch, a_min=0.0)
    res = MAID(ShiftShrink(), Fit(), bounds=bounds).run(_start(dtype, a=1.0), batch)
    gap = (_loss(res.theta, batch) - f_star) / f_star
    assert res.success, res.message
    assert float(res.theta["a"]) == pytest.approx(0.0, abs=1e-6)
    assert gap < (1e-8 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("loop", [HOAG, MAID])
def test_float32_bounds_and_a_small_upper_loss_claim_no_false_success(loop):
    batch = _data(torch.float32)
    scale = 1e-8  # a loss in small units: a gradient below half an ulp of θ
    bounds = Bounds(lower={"a": -5.0}, upper={"a": 5.0})  # not active at the optimum
    _, f_star = _optimum(batch)
    res = loop(ShiftShrink(), Fit(scale), bounds=bounds).run(_start(torch.float32, 2.0, 3.0), batch)
    gap = (_loss(res.theta, batch) - f_star) / f_star
    assert res.n_iter > 1
    assert not res.success or gap < 1e-3, (res.message, gap)


@pytest.mark.parametrize("agg", ["mean", "sum"])
def test_quasi_newton_in_float32_stops_at_the_optimum(agg):
    batch = _data(torch.float32)
    _, f_star = _optimum(batch)
    res = QuasiNewton(ShiftShrink(agg), Fit(agg=agg)).run(_start(torch.float32), batch)
    assert res.success and res.n_iter < 50, res.message
    assert (_loss(res.theta, batch) - f_star) / f_star < 1e-6


class Float32Fit(Fit):
    """:class:`Fit` computed in float32 on float64 iterates (a float32 task network's loss)."""

    def forward(self, x, theta, batch):
        return super().forward(x.float(), theta, {k: v.float() for k, v in batch.items()})


def test_quasi_newton_with_a_float32_upper_loss_stops_at_float32_accuracy():
    """θ and x in float64, ℓ in float32: gtol is raised to float32's floor (1e-5), the loop stops
    by itself there and says why, instead of spinning at the optimum to max_iter."""
    batch = _data(torch.float64)
    _, f_star = _optimum(batch)
    res = QuasiNewton(ShiftShrink(), Float32Fit()).run(_start(torch.float64), batch)
    assert res.success and res.n_iter < 60, res.message
    assert "gtol raised to 1e-05" in res.message
    assert (_loss(res.theta, batch) - f_star) / f_star < 1e-5
    float64 = QuasiNewton(ShiftShrink(), Fit()).run(_start(torch.float64), batch)
    assert float64.success and "gtol raised" not in float64.message


def test_gradient_mapping_norm_is_exact_for_steps_below_round_off():
    theta = {"a": torch.tensor(1.0, dtype=torch.float32), "b": torch.tensor([0.0, 2.0])}
    grad = {"a": torch.tensor(1e-9, dtype=torch.float32), "b": torch.tensor([3.0, -4.0])}
    bounds = Bounds(lower={"b": 0.0}, upper={"a": 5.0})
    # b[0] sits on its lower bound with g > 0: that entry is held; a and b[1] are free
    expected = math.sqrt(1e-18 + 16.0)
    for step in (1.0, 1e-3, 1e-12):
        assert gradient_mapping_norm(theta, grad, bounds, step) == pytest.approx(expected, rel=1e-6)
    assert gradient_mapping_norm(theta, grad, None) == pytest.approx(math.sqrt(1e-18 + 25.0))
    # a step that reaches a bound is cut there: ‖θ − Π(θ − t g)‖/t
    assert gradient_mapping_norm({"a": torch.tensor(4.5), "b": torch.tensor([1.0, 1.0])},
                                 {"a": torch.tensor(-2.0), "b": torch.tensor([3.0, 0.0])},
                                 Bounds(lower={"b": 0.0}, upper={"a": 5.0}), 1.0) == \
        pytest.approx(math.sqrt(0.5 ** 2 + 1.0 ** 2))


@pytest.mark.parametrize("loop", [QuasiNewton, HOAG, MAID])
def test_loops_hand_theta_back_in_the_callers_order(loop):
    batch = _data(torch.float64)
    theta0 = {"v": torch.zeros(5, dtype=torch.float64), "a": torch.tensor(0.0, dtype=torch.float64)}
    res = loop(ShiftShrink(), Fit(), max_iter=3).run(theta0, batch)
    assert list(res.theta) == ["v", "a"]
    assert list(res.history[-1]["theta"]) == ["v", "a"]


class RoundOffShiftShrink(ShiftShrink):
    """:class:`ShiftShrink` whose gradient carries a fresh error of size ``delta`` per entry on
    every evaluation (seeded): a stand-in for the round-off of a large float32 sum, below which
    no inner solver can go."""

    def __init__(self, delta: float):
        super().__init__()
        self.delta, self.gen = delta, torch.Generator().manual_seed(0)

    def grad(self, x, theta, batch):
        noise = torch.randn(x.shape, generator=self.gen, dtype=torch.float64).to(x.dtype)
        return super().grad(x, theta, batch) + self.delta * noise


def test_quasi_newton_raises_its_floor_where_the_inner_solve_stalls_at_round_off():
    batch = _data(torch.float32)
    _, f_star = _optimum(batch)
    with pytest.warns(RuntimeWarning, match="stalls in torch.float32"):
        res = QuasiNewton(RoundOffShiftShrink(3e-5), Fit()).run(_start(torch.float32), batch)
    assert res.success, res.message  # without the raised floor: "cannot recover" after 68 it
    assert "accuracy floor raised" in res.message
    assert (_loss(res.theta, batch) - f_star) / f_star < 1e-5
    tol = min(r["tol"] for r in res.history if r.get("accepted"))
    assert 1e-5 < tol <= 200 * 1e-5  # raised above the dtype's floor, by a bounded factor


class _Stalled:
    """A solve result stopped at its cap with ``max_b‖∇Φ_b‖ = value``."""

    def __init__(self, value):
        self.grad_norm = torch.tensor([0.5 * value, value])
        self.x = torch.zeros(2, 5)  # float32


def test_raise_floor_only_for_round_off_and_never_over_a_users_tol_min():
    from bilevel.outer import INNER_CAP
    from bilevel.quasi_newton import QuasiNewtonState

    theta = _start(torch.float32)
    cap = INNER_CAP + " before tolerance 1e-05"
    loop = QuasiNewton(ShiftShrink(), Fit())
    st = QuasiNewtonState(theta=theta, inner_ref=2.0, eps=1e-5)
    with pytest.warns(RuntimeWarning, match="raised to 6.0e-05"):
        assert loop._raise_floor(st, _Stalled(2.0 * 3e-5), cap)  # 3·floor: round-off
    assert st.raised_floor == pytest.approx(6e-5) and st.eps == pytest.approx(6e-5)
    assert loop._floor(st) == pytest.approx(6e-5) and loop._gtol(st) == pytest.approx(6e-5)
    assert not loop._raise_floor(st, _Stalled(2.0 * 2e-5), cap)  # below the raised floor
    st = QuasiNewtonState(theta=theta, inner_ref=2.0, eps=1e-5)
    assert not loop._raise_floor(st, _Stalled(2.0 * 200e-5), cap)  # 200·floor: not round-off
    assert not loop._raise_floor(st, _Stalled(2.0 * 3e-5), "inner solve failed: curvature")
    assert st.raised_floor is None
    user = QuasiNewton(ShiftShrink(), Fit(), tol_min=1e-5)
    st = QuasiNewtonState(theta=theta, inner_ref=2.0, eps=1e-5)
    assert not user._raise_floor(st, _Stalled(2.0 * 3e-5), cap)
    assert user._floor(st) == 1e-5


def test_hoag_raises_its_floor_where_the_inner_solve_stalls_at_round_off():
    batch = _data(torch.float32)
    with pytest.warns(RuntimeWarning, match="stalls in torch.float32"):
        res = HOAG(RoundOffShiftShrink(3e-5), Fit(), max_iter=60).run(_start(torch.float32), batch)
    assert "cannot recover" not in res.message, res.message
    assert min(r["tol"] for r in res.history[1:]) > 1e-5


@pytest.mark.parametrize("step_rule", ["adaptive", "spectral"])
def test_maid_floor_follows_the_dtype_and_a_users_eps_min_is_kept(step_rule):
    loop = MAID(ShiftShrink(), Fit(), step_rule=step_rule)
    assert loop._floor_rel(torch.float64) == 1e-12 and loop._floor_rel(torch.float32) == 1e-5
    assert MAID(ShiftShrink(), Fit(), eps_min=1e-9)._floor_rel(torch.float32) == 1e-9
    batch = _data(torch.float32)
    _, f_star = _optimum(batch)
    res = loop.run(_start(torch.float32), batch)  # float32 without extra noise: 1e-5 is reachable
    ref = float(torch.linalg.vector_norm(ShiftShrink().grad(torch.zeros_like(batch["y"]),
                                                            _start(torch.float32), batch), dim=-1).max())
    assert min(r["eps"] for r in res.history) >= 1e-5 * ref * (1 - 1e-6)
    gap = (_loss(res.theta, batch) - f_star) / f_star
    if step_rule == "adaptive":  # with a 1e-12 floor it also succeeded, at 2.2x the cost
        assert res.success and gap < 1e-5, res.message
    else:  # the spectral steps end at a point the float32 floor cannot certify (gap 2.3e-4
        # here): no false claim, and the message says why
        assert res.success == (gap < 1e-5), (res.message, gap)
        assert res.success or "no certified decrease at the accuracy floor" in res.message


def test_maid_raises_its_floor_where_the_inner_solve_stalls_at_round_off():
    batch = _data(torch.float32)
    _, f_star = _optimum(batch)
    with pytest.warns(RuntimeWarning, match="stalls in torch.float32"):
        res = MAID(RoundOffShiftShrink(3e-5), Fit()).run(_start(torch.float32), batch)
    # it cannot certify a decrease below the round-off: an honest failure that says why, reached
    # without asking the solver for accuracies it cannot give (a 1e-12 floor: cost 2196)
    assert "accuracy floor raised" in res.message
    assert res.history[-1]["cost"] < 1000
    assert (_loss(res.theta, batch) - f_star) / f_star < 3e-3
    if not res.success:
        assert "no certified decrease" in res.message
    with pytest.warns(RuntimeWarning) as caught:  # a user's eps_min is never raised
        MAID(RoundOffShiftShrink(3e-5), Fit(), eps_min=1e-6, max_iter=40).run(_start(torch.float32), batch)
    assert not any("stalls in" in str(w.message) for w in caught)
