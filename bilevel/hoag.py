"""HOAG: hyperparameter optimisation with approximate gradient (Pedregosa, ICML 2016), with a
scale-free accuracy rule and a sufficient-decrease step rule.

Scale-free accuracies (relative, as in the original HOAG's ``ε_k‖∇Φ(x⁰)‖``): at iteration ``k``
with the relative accuracy ``ε_k = max(s·schedule(k), tol_min)`` (``k`` counts every trial,
accepted or not; ``s`` shrinks when a decrease test cannot be resolved),

* the inner problem is solved to ``max_b ‖∇ₓΦ_b‖ ≤ ε_k · R``, ``R = max_b ‖∇ₓΦ_b(x⁰; θ₀)‖`` at
  the problem's initial point;
* CG on ``∇²ₓₓΦ q = ∇ₓℓ`` stops per sample at ``‖r_b‖ ≤ ε_k · max(‖(∇ₓℓ)_b‖, 10⁻³ max‖∇ₓℓ‖)``.

Multiplying Φ by ``a`` and ℓ by ``c`` scales every tolerance with the quantity it bounds, so the
iterates do not change (up to round-off).

Step rule (projected gradient with an Armijo test, no cycling at an optimum): from the accepted
``θ_k`` with upper loss ``ℓ_k`` and hypergradient ``g_k``, try ``θ⁺ = Π(θ_k − α g_k)`` (``Π`` the
projection onto the bounds); solve the inner problem there and accept when

.. math::

    \\ell(\\theta^+) \\le \\ell_k - c_1 \\langle g_k, \\theta_k - \\theta^+\\rangle
    + 16\\,\\epsilon_{\\text{mach}} |\\ell_k| .

Step lengths (``step_rule="spectral"``, the default): after an accepted step
``s = θ⁺ − θ_k`` with ``y = g⁺ − g_k``, the next trial step is the Barzilai–Borwein length

.. math::

    \\alpha = \\frac{\\langle s, y\\rangle}{\\langle y, y\\rangle}
    \\quad\\text{(kept within } [10^{-3}\\alpha_k, 10^{3}\\alpha_k]\\text{)},

the inverse of a curvature of ℓ along the last step (``⟨s, y⟩ ≤ 0``: ``α ← grow·α``; entries
a bound held, ``sᵢ = 0``, are left out of ``y``); a
step that fails the decrease test is shortened to the minimiser of the quadratic through
``ℓ_k``, the slope ``−⟨g_k, s⟩`` and the trial loss, kept within ``[0.1, shrink]·α``. On a
narrow curved valley (a weight against a smoothing that matters little) this follows the valley
instead of zig-zagging across it. ``step_rule="adaptive"`` is the fixed-factor rule of earlier
versions: accepted, ``α ← grow·α`` (not right after a rejection); rejected, ``α ← shrink·α``.
Any other failure of a trial (the inner solve: non-convergence, non-positive curvature,
non-finite values) gives ``α ← shrink·α``. A test whose outcome lies within the size of the
dual corrections ("loss not resolved") tightens ``s`` instead and recomputes ``ℓ_k``, ``g_k`` at
the tighter accuracy, down to the confirmation accuracy (below); there the gradients decide it
by the trapezoid rule ``ℓ(θ⁺) − ℓ(θ_k) ≈ ½⟨g_k + g⁺, θ⁺ − θ_k⟩``, as a tighter accuracy would
only confirm what the stop is claimed at. On a quadratic, ``c₁ = ½`` accepts only
``α ≤ 1/h``: the iterates approach the optimum monotonically and stay there. The first step is ``α₀ = 1/‖g₀‖`` (a move of length 1)
unless ``step_size`` is given.

Stopping (``success=True``, only after ``θ_k`` was re-evaluated at the confirmation accuracy
``max(tol_min, 10⁻²·gtol)``): ``‖G(g_k)‖ ≤ gtol·‖G(g_0)‖`` (``G`` the projected-gradient
mapping; ``= g`` without bounds), or the next proposed move is below
``xtol·(1 + ‖θ_k‖)`` after a failed decrease test and ``‖G(g_k)‖ ≤ floor_gtol·‖G(g_0)‖``
(nothing measurable is left to gain). When that search followed a ``g_k`` computed at a looser
accuracy and ``‖G(g_k)‖`` at the confirmation accuracy is still above ``floor_gtol·‖G(g_0)‖``,
the search starts again along the confirmed ``g_k`` (from the last accepted step length): an
inexact direction may not be a descent direction at all. The run
fails (``success=False``, with a warning) when the inner problem fails at every step down to that
size, when no step along the confirmed ``g_k`` passes the test ("no decrease found"), or when the
inner problem is not finite at an accepted point.

Round-off (automatic floor only): when the inner solve stops at its iteration cap with relative
accuracy ``a ≤ 100·ε_min`` (float32 sums over many pixels), the floor is raised to ``2a`` with a
warning and the same step is tried again there
(:meth:`~bilevel.outer.OuterLoop._roundoff_floor`); a ``tol_min`` you pass is never changed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .history import tolerance_schedule
from .outer import STEP_RULES, UNCONFIRMED, LoopState, OuterLoop, implicit_estimator, spectral_step
from .problem import (Bounds, HypergradientEstimator, InnerProblem, OuterLoss, Theta,
                      check_tolerance, gradient_mapping_norm, project, theta_axpy,
                      theta_distance, theta_dot, theta_floats, theta_norm, theta_sub)

__all__ = ["HOAG", "HOAGState"]


@dataclass
class HOAGState(LoopState):
    """HOAG's state: ``loss``/``grad``/``gnorm`` at the accepted ``theta`` (``grad`` is ``None``
    until evaluated), ``q`` the adjoint there, ``closs`` the dual-corrected loss
    ``ℓ − ⟨q, ∇ₓΦ⟩`` and ``unc`` the size of that correction, ``g0`` the first projected-gradient norm, ``step`` the current ``α``,
    ``tol_scale`` the factor ``s``, ``inner_ref`` the scale ``R``, ``rejected_last`` whether the
    last trial was rejected, ``last_failure`` why it was."""

    loss: float = math.nan
    grad: Optional[Theta] = None
    gnorm: float = math.nan
    g0: Optional[float] = None
    step: Optional[float] = None
    tol_scale: float = 1.0
    inner_ref: float = 1.0
    rejected_last: bool = False
    last_failure: Optional[str] = None
    good_step: Optional[float] = None
    q: Optional[Tensor] = None
    closs: float = math.nan
    unc: float = 0.0
    grad_eps: float = math.inf
    eps_cap: Optional[float] = None
    grad_ok: bool = True
    trial_model: Optional[list] = None

    #: the decrease test's ``[ℓ̂⁺ − ℓ̂_k + ⟨g_k, θ_k − θ⁺⟩, ⟨g_k, θ_k − θ⁺⟩]`` for the trial just made
    TRANSIENT: ClassVar[Tuple[str, ...]] = ("trial_model",)


class HOAG(OuterLoop):
    """HOAG outer loop (see the module docstring for the rules in formulas).

    Parameters
    ----------
    inner, outer: the lower-level problem and upper loss.
    estimator: hypergradient estimator (default :class:`~bilevel.ImplicitCG`); it is called with
        a relative CG tolerance.
    tolerance: ``"geometric"``, ``"quadratic"``, ``"cubic"``, ``"constant"`` or ``k ↦ ε_k``.
    tol0, tol_rate: relative first accuracy ``ε₀`` (default ``0.1``) and geometric rate.
    tol_min: floor of the relative accuracy (``None``: ``1e-10`` in float64, ``1e-5`` in float32,
        raised where the inner solve stalls at round-off above it; module docstring).
    max_iter: outer iterations (trials, accepted or not).
    step_size: initial step ``α₀``; ``None`` uses ``1/‖g₀‖``.
    step_rule: ``"spectral"`` (Barzilai–Borwein lengths, interpolated backtracking) or
        ``"adaptive"`` (``grow``/``shrink`` factors only); module docstring.
    c1, grow, shrink: the sufficient-decrease constant and the step factors (``shrink``: the
        most a rejected step is kept of).
    gtol, xtol: the stopping tolerances (relative; ``0`` disables each). A stop on ``gtol`` is
        claimed only after ``θ_k`` was re-evaluated at the relative accuracy
        ``max(tol_min, 10⁻²·gtol)``; floor_gtol: the looser test a stop on ``xtol`` ("no
        measurable decrease left") must pass there.
    max_move: cap of one step, ``α|g_i| ≤ max_move·max(1, |θ_i|)`` for every coordinate.
    bounds: :class:`~bilevel.Bounds` on θ.
    inner_method, inner_max_iter: generic inner solver and its cap when the problem has no own.
    param_optimizer: a ``torch.optim`` optimiser over ``outer.trainable_parameters()`` (e.g.
        fine-tuned task layers); they take a step with ``∇_φℓ`` after every accepted iterate.
    callback: ``callback(record, theta)`` after every iteration; returning ``True`` stops.
    progress: show a tqdm progress bar.
    checkpoint: path of a :class:`~bilevel.Result` written atomically after every iteration;
        continue an interrupted run with ``run(theta0, batch, resume=Result.load(path))``.

    History keys: ``iteration, upper_loss`` (at the point tried), ``grad_norm`` (at the accepted
    point), ``tol`` (``ε_k``), ``inner_tol``, ``inner_iterations, cg_iterations, seconds,
    elapsed, cost, step_size, accepted, reason`` (why a trial was rejected), ``inner_converged,
    cg_converged, theta`` (the point tried).

    Examples
    --------
    >>> import torch                                                     # doctest: +SKIP
    >>> from bilevel import HOAG, Bounds
    >>> from recon.problems import TVDenoising
    >>> from recon.losses import MSEToTarget
    >>> from recon.data import denoising_batch
    >>> batch = denoising_batch(n=4, size=32, sigma=0.1, dtype=torch.float64)
    >>> theta0 = {"log_weight": torch.tensor(-4.0, dtype=torch.float64),
    ...           "log_smoothing": torch.tensor(-4.0, dtype=torch.float64)}
    >>> res = HOAG(TVDenoising(), MSEToTarget(), max_iter=50, bounds=Bounds(lower={"log_smoothing": -12.0})).run(theta0, batch)
    >>> res.success, res.message, res.history.column("upper_loss")[-1]
    """

    name = "HOAG"
    State = HOAGState

    def __init__(self, inner: InnerProblem, outer: OuterLoss,
                 estimator: Optional[HypergradientEstimator] = None,
                 tolerance: Union[str, Callable[[int], float]] = "geometric", tol0: float = 0.1,
                 tol_rate: float = 0.9, tol_min: Optional[float] = None, max_iter: int = 100,
                 step_size: Optional[float] = None, step_rule: str = "spectral",
                 c1: float = 0.5, grow: float = 1.2,
                 shrink: float = 0.5, gtol: float = 1e-6, xtol: float = 1e-8,
                 floor_gtol: float = 1e-3, max_move: float = 2.0,
                 bounds: Optional[Bounds] = None, inner_method: str = "newton-cg",
                 inner_max_iter: Optional[int] = None,
                 param_optimizer: Optional[torch.optim.Optimizer] = None,
                 callback: Optional[Callable] = None, progress: bool = False,
                 checkpoint: Optional[str] = None):
        super().__init__(inner, outer, implicit_estimator(estimator), max_iter=max_iter, bounds=bounds,
                         inner_method=inner_method, inner_max_iter=inner_max_iter,
                         param_optimizer=param_optimizer, callback=callback, progress=progress,
                         checkpoint=checkpoint)
        tol0 = check_tolerance("tol0", tol0)
        if not tol0 < 1:
            raise ValueError(f"tol0 is a relative accuracy and must lie in (0, 1), got {tol0!r} "
                             f"(≥ 1 lets CG stop at q = 0 and the hypergradient vanish)")
        self.schedule = tolerance_schedule(tolerance, tol0, tol_rate, 0.0)
        self.max_move = check_tolerance("max_move", max_move)
        self.tol_min = None if tol_min is None else check_tolerance("tol_min", tol_min)
        self.step_size = None if step_size is None else check_tolerance("step_size", step_size)
        if step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {STEP_RULES}, got {step_rule!r}")
        self.step_rule = step_rule
        self.c1 = check_tolerance("c1", c1)
        if not self.c1 < 1:
            raise ValueError(f"c1 must lie in (0, 1), got {c1!r}")
        self.grow = check_tolerance("grow", grow)
        self.shrink = check_tolerance("shrink", shrink)
        if self.grow < 1 or not self.shrink < 1:
            raise ValueError(f"need grow ≥ 1 and 0 < shrink < 1, got grow={grow!r}, shrink={shrink!r}")
        self.gtol = check_tolerance("gtol", gtol, allow_zero=True)
        self.xtol = check_tolerance("xtol", xtol, allow_zero=True)
        self.floor_gtol = check_tolerance("floor_gtol", floor_gtol, allow_zero=True)

    # ----- accuracies -------------------------------------------------------------------------
    def _eps_floor(self, st: HOAGState, dtype: torch.dtype) -> float:
        """``tol_min``, or its dtype default (``1e-10`` in float64, ``1e-5`` otherwise), raised
        where the inner solve stalls at round-off above it (``st.raised_floor``)."""
        return self.tol_min if self.tol_min is not None else self._automatic_floor(st, dtype)

    def _eps(self, st: HOAGState, dtype: torch.dtype) -> float:
        floor = self._eps_floor(st, dtype)
        eps = max(self.schedule(st.k) * st.tol_scale, floor)
        return eps if st.eps_cap is None else max(min(eps, st.eps_cap), floor)

    def _confirm_eps(self, st: HOAGState, dtype: torch.dtype) -> float:
        """The accuracy a stop is confirmed at: ``max(ε_min, 10⁻²·gtol)``."""
        return max(self._eps_floor(st, dtype), 1e-2 * self.gtol)

    def _raise_floor(self, st: HOAGState, sol, reason: Optional[str], dtype) -> bool:
        """:meth:`~bilevel.outer.OuterLoop._roundoff_floor` with this loop's floor and scale
        (never with a user's ``tol_min``)."""
        if self.tol_min is not None:
            return False
        return self._roundoff_floor(st, sol, reason, self._eps_floor(st, dtype), st.inner_ref)

    def _start(self, theta: Theta, batch: Any, x0: Optional[Tensor]) -> HOAGState:
        ref = self._inner_reference(theta, batch)
        return HOAGState(theta=theta, x=None if x0 is None else x0.detach().clone(),
                         inner_ref=ref, step=self.step_size)

    # ----- one iteration ----------------------------------------------------------------------
    def _iterate(self, st: HOAGState, batch: Any) -> Dict[str, Any]:
        dtype = self._working_dtype(st)
        eps = self._eps(st, dtype)
        if st.grad is None:  # first iteration (or a resume): evaluate at the accepted point
            rec = self._evaluate(st, batch, eps)
            self._check_stop(st, batch)
            return rec
        alpha = self._capped(st)
        trial = project(theta_axpy(-alpha, st.grad, st.theta), self.bounds)
        st.last_theta = trial
        st.trial_model = None
        sol, reason = self._solve(st, trial, batch, eps * st.inner_ref, st.x)
        retry = self._raise_floor(st, sol, reason, dtype)  # round-off: same step, raised floor
        f_trial = unc = math.nan
        hg = None
        if reason is None:
            f_trial = self._upper_loss(sol.x, trial, batch)
            reason, unc, hg = self._decrease_test(st, sol, trial, batch, f_trial, eps, dtype)
        base = dict(upper_loss=f_trial, loss_correction=unc, tol=eps, inner_tol=eps * st.inner_ref,
                    step_size=alpha, inner_iterations=0 if sol is None else sol.max_iterations,
                    inner_converged=sol is not None and sol.all_converged, theta=theta_floats(trial))
        if reason is None and hg is None:
            hg, reason = self._trial_hypergradient(st, trial, sol.x, batch, eps)
        if reason is None:
            previous = (st.theta, st.grad)
            st.theta, st.x = trial, sol.x
            self._install(st, hg, batch)
            st.grad_eps, st.grad_ok = eps, sol.all_converged and hg.cg_converged
            rec = self._accepted_record(st, hg, eps, 0, True)
            st.step = self._next_step(st, alpha, *previous)
            st.good_step, st.rejected_last, st.last_failure = alpha, False, None
            rec.update(base, upper_loss=rec["upper_loss"], accepted=True, reason=None)
        elif reason == "loss not resolved":  # tighter accuracy, same step: re-evaluate θ_k
            rec = dict(base, grad_norm=st.gnorm, cg_iterations=0, cg_converged=None,
                       accepted=False, reason=reason)
            again = self._evaluate(st, batch, self._eps(st, dtype))
            rec["inner_iterations"] += again["inner_iterations"]
            rec["cg_iterations"] = again["cg_iterations"]
        elif retry:  # α kept; the next iteration solves at the raised floor
            return dict(base, grad_norm=st.gnorm, cg_iterations=0, cg_converged=None,
                        accepted=False, reason=reason)
        else:  # a real step failure: shorter step
            st.step, st.rejected_last, st.last_failure = alpha * self._cut(st, reason), True, reason
            rec = dict(base, grad_norm=st.gnorm, cg_iterations=0, cg_converged=None,
                       accepted=False, reason=reason)
        self._check_stop(st, batch)
        return rec

    def _next_step(self, st: HOAGState, alpha: float, old_theta: Theta, old_grad: Theta) -> float:
        """The step after an accepted trial of length ``alpha`` from ``old_theta``: the
        Barzilai–Borwein ``⟨s, y⟩/⟨y, y⟩`` within ``[10⁻³α, 10³α]`` (``"spectral"``, when
        ``⟨s, y⟩ > 0``), otherwise ``grow·α`` (``α`` right after a rejection)."""
        grown = alpha if st.rejected_last else alpha * self.grow
        if self.step_rule != "spectral":
            return grown
        return spectral_step(theta_sub(st.theta, old_theta), theta_sub(st.grad, old_grad),
                             alpha, grown)

    def _cut(self, st: HOAGState, reason: str) -> float:
        """The factor a rejected step is shortened by: ``shrink``, or (``"spectral"``, after an
        insufficient decrease) the minimiser ``t* = d/(2c)`` of the quadratic
        ``ℓ̂_k − t·d + t²·c`` through the trial (``d = ⟨g_k, θ_k − θ⁺⟩``,
        ``c = ℓ̂⁺ − ℓ̂_k + d``), kept within ``[0.1, shrink]``."""
        model, st.trial_model = st.trial_model, None
        if self.step_rule != "spectral" or reason != "insufficient decrease" or model is None:
            return self.shrink
        c, d = model
        if not (c > 0 and d > 0 and math.isfinite(c)):
            return self.shrink
        return min(self.shrink, max(0.1, d / (2.0 * c)))

    def _capped(self, st: HOAGState) -> float:
        """``α`` such that ``α|g_i| ≤ max_move·max(1, |θ_i|)`` for every coordinate (the step
        size is not changed)."""
        ratio = max(float((st.grad[n].detach().abs() / st.theta[n].detach().abs().clamp_min(1.0))
                          .max()) for n in st.grad)
        return min(st.step, self.max_move / ratio) if ratio > 0 else st.step

    def _decrease_test(self, st: HOAGState, sol, trial: Theta, batch: Any, f_trial: float,
                       eps: float, dtype) -> tuple:
        """Armijo test on dual-corrected losses. Returns ``(reason or None, |correction|, g⁺)``.

        ``"loss not resolved"`` (and a tighter ``tol_scale``) when the outcome is within the size
        of the corrections (``|ℓ̂⁺ − (ℓ̂_k − c₁⟨g, θ_k − θ⁺⟩)| < |⟨q, r⁺⟩| + |⟨q, r_k⟩|``), they are
        not negligible against the predicted decrease, and ``eps`` is above the confirmation
        accuracy. When the outcome is undecided at that accuracy, or the predicted decrease is
        below ``1600·eps·|ℓ|`` (``eps`` of the dtype the loss is computed in), the decrease is
        measured by the trapezoid rule
        ``ℓ(θ⁺) − ℓ(θ_k) ≈ ½⟨g_k + g⁺, θ⁺ − θ_k⟩`` (exact on quadratics) instead; ``g⁺`` is
        returned so an accepted point needs no second evaluation."""
        if not math.isfinite(f_trial):
            return "non-finite upper loss", math.nan, None
        x = sol.x
        f_hat, unc = self._corrected(x, trial, batch, f_trial, st.q)
        step = theta_sub(st.theta, trial)
        predicted = self.c1 * theta_dot(st.grad, step)
        noise = unc + st.unc
        if st.q is None and sol.max_iterations == 0:  # no adjoint, and x did not move at all
            noise = math.inf
        margin = f_hat - (st.closs - predicted)  # ≤ 0: the test passes
        undecided = abs(margin) < noise and noise > 0.1 * predicted
        if undecided and not self._at_confirm_accuracy(st, eps):  # resolve: tighten
            st.tol_scale *= min(0.5, max(0.01, 0.25 * predicted / noise)) if noise < math.inf else 0.1
            return "loss not resolved", unc, None
        loss_eps = self._loss_eps  # precision of ℓ as computed (float32 nets)
        if not undecided and predicted > 1e2 * 16 * loss_eps * abs(st.loss):
            ok = f_hat <= st.closs - predicted
            slope = predicted / self.c1
            st.trial_model = [f_hat - st.closs + slope, slope]
            return (None if ok else "insufficient decrease"), unc, None
        hg, why = self._trial_hypergradient(st, trial, x, batch, eps)  # round-off regime: trapezoid
        if why is not None:
            return why, unc, None
        change = -0.5 * (theta_dot(st.grad, step) + theta_dot(hg.theta_grad, step))
        return (None if change <= -predicted else "insufficient decrease"), unc, hg

    def _evaluate(self, st: HOAGState, batch: Any, eps: float, solved: bool = False) -> Dict[str, Any]:
        """Solve at the accepted ``st.theta`` (unless ``solved``) and compute its hypergradient."""
        n_inner, inner_ok = 0, True
        if not solved:
            sol, reason = self._solve(st, st.theta, batch, eps * st.inner_ref, st.x)
            if sol is None or reason == "inner solve produced non-finite values":
                st.message = f"the inner problem fails at the accepted θ = {theta_floats(st.theta)}: {reason}"
                return dict(upper_loss=math.nan, grad_norm=math.nan, tol=eps, inner_tol=eps * st.inner_ref,
                            inner_iterations=0, cg_iterations=0, step_size=st.step, accepted=False,
                            reason=reason, inner_converged=False, cg_converged=False,
                            theta=theta_floats(st.theta))
            if self._raise_floor(st, sol, reason, sol.x.dtype):  # round-off: met at the new floor
                reason = None
            if reason is not None:
                self._warn_once(st, "inner", reason + "; flagged in History as inner_converged=False")
            st.x, n_inner, inner_ok = sol.x, sol.max_iterations, reason is None
        hg, why = self._trial_hypergradient(st, st.theta, st.x, batch, eps)
        if why is not None:
            st.message = f"the hypergradient fails at the accepted θ = {theta_floats(st.theta)}: {why}"
            return dict(upper_loss=math.nan, grad_norm=math.nan, tol=eps, inner_tol=eps * st.inner_ref,
                        inner_iterations=n_inner, cg_iterations=0, step_size=st.step, accepted=False,
                        reason=why, inner_converged=inner_ok, cg_converged=False,
                        theta=theta_floats(st.theta))
        self._install(st, hg, batch)
        st.grad_eps, st.grad_ok = eps, inner_ok and hg.cg_converged
        return self._accepted_record(st, hg, eps, n_inner, inner_ok)

    def _install(self, st: HOAGState, hg, batch: Any) -> None:
        """Make ``hg`` (computed at ``st.theta``, ``st.x``) the accepted point's values."""
        st.loss, st.grad, st.q = hg.loss, hg.theta_grad, hg.adjoint
        if self._step_params(hg.param_grads):  # φ moved: ℓ_k is re-measured with the new φ
            st.loss = self._upper_loss(st.x, st.theta, batch)
        st.closs, st.unc = self._corrected(st.x, st.theta, batch, st.loss, st.q)
        st.gnorm = self._mapping_norm(st)
        if not (math.isfinite(st.loss) and math.isfinite(st.gnorm)):
            st.message = (f"non-finite upper loss {st.loss} or hypergradient norm {st.gnorm} at "
                          f"θ = {theta_floats(st.theta)}")
        else:
            self._note_accepted(st, st.loss)
            if st.g0 is None or st.g0 == 0.0:
                st.g0 = st.gnorm
            if st.step is None and st.gnorm > 0:
                st.step = 1.0 / theta_norm(st.grad)

    def _accepted_record(self, st: HOAGState, hg, eps: float, n_inner: int, inner_ok: bool):
        return dict(upper_loss=hg.loss, loss_correction=st.unc, grad_norm=st.gnorm, tol=eps,
                    inner_tol=eps * st.inner_ref, inner_iterations=n_inner,
                    cg_iterations=hg.cg_iterations, step_size=st.step, accepted=True, reason=None,
                    inner_converged=inner_ok, cg_converged=hg.cg_converged,
                    theta=theta_floats(st.theta))

    def _mapping_norm(self, st: HOAGState) -> float:
        """``‖G(g)‖ = ‖θ − Π(θ − g)‖`` (the projected gradient; ``‖g‖`` without bounds)."""
        return gradient_mapping_norm(st.theta, st.grad, self.bounds)

    def _check_stop(self, st: HOAGState, batch: Any) -> None:
        if st.message is not None:
            return
        if st.gnorm == 0.0 or (self.gtol > 0 and st.gnorm <= self.gtol * st.g0):
            if self._confirmed(st, batch):
                if st.gnorm == 0.0 or st.gnorm <= self.gtol * st.g0:
                    st.success = True
                    st.message = (f"converged: projected hypergradient norm {st.gnorm:.3e} ≤ "
                                  f"gtol·‖G(g₀)‖ = {self.gtol * st.g0:.3e}, confirmed at relative "
                                  f"accuracy {st.grad_eps:.1e}")
            return
        if not st.rejected_last or self.xtol == 0:
            return
        move = theta_distance(project(theta_axpy(-self._capped(st), st.grad, st.theta), self.bounds),
                              st.theta)
        if move > self.xtol * (1.0 + theta_norm(st.theta)):
            return
        if st.last_failure != "insufficient decrease":
            st.message = (f"cannot recover: every step down to length {move:.2e} was rejected; "
                          f"last reason: {st.last_failure}")
        else:
            self._search_exhausted(st, batch, move)

    def _search_exhausted(self, st: HOAGState, batch: Any, move: float) -> None:
        """Every step down to ``move`` failed the decrease test: confirm ``g_k``; a stop if
        nothing measurable is left, a new search along the confirmed ``g_k`` if the failed one
        followed a looser gradient, a failure otherwise."""
        loose = not self._at_confirm_accuracy(st)
        if self._confirmed(st, batch) and st.message is None:
            if st.gnorm <= self.floor_gtol * st.g0:
                st.success = True
                st.message = (f"converged: no measurable decrease left (next move {move:.2e} ≤ "
                              f"xtol·(1 + ‖θ‖)); projected hypergradient norm {st.gnorm:.3e} ≤ "
                              f"floor_gtol·‖G(g₀)‖, confirmed at relative accuracy {st.grad_eps:.1e}")
            elif loose:  # the direction was inexact: search again along the confirmed one
                st.step = st.good_step or 1.0 / theta_norm(st.grad)
                st.rejected_last, st.last_failure = False, None
            else:
                st.message = (f"no decrease found: every step down to length {move:.2e} failed the "
                              f"decrease test at relative accuracy {st.grad_eps:.1e}, projected "
                              f"hypergradient norm {st.gnorm:.3e} > floor_gtol·‖G(g₀)‖")

    def _confirmed(self, st: HOAGState, batch: Any) -> bool:
        """Whether ``st.grad`` is (now) accurate enough to claim a stop: re-evaluates ``θ_k`` at
        the confirmation accuracy when it was computed at a looser one; ``False`` (and a message
        when nothing more can be done) otherwise."""
        target = self._confirm_eps(st, self._working_dtype(st))
        if self._at_confirm_accuracy(st):
            if not st.grad_ok:
                st.message = UNCONFIRMED
                return False
            return True
        st.eps_cap = target
        self._evaluate(st, batch, target)
        if st.message is None and st.g0 == 0.0:
            st.g0 = st.gnorm
        return st.message is None and self._at_confirm_accuracy(st) and st.grad_ok

    def _at_confirm_accuracy(self, st: HOAGState, eps: Optional[float] = None) -> bool:
        """Whether ``eps`` (default: the accuracy ``g_k`` was computed at) is at or below the
        confirmation accuracy."""
        eps = st.grad_eps if eps is None else eps
        return eps <= self._confirm_eps(st, self._working_dtype(st)) * (1 + 1e-12)
