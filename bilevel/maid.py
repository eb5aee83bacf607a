"""MAID: method of adaptive inexact descent (Salehi, Mukherjee, Roberts & Ehrhardt, 2024).

An outer loop that chooses the inner accuracy ``ε`` (per-sample ``‖∇ₓΦ_b‖ ≤ ε``) and the CG
accuracy ``δ`` itself, from the a-posteriori bounds of :class:`~bilevel.AdaptiveInexact`:

* ``ω_k ≥ ‖z_k − ∇ℓ(θ_k)‖`` on the hypergradient ``z_k``, and
* ``a_k ≥ |ℓ̃_k − ℓ(θ_k)|`` on the upper loss (``ℓ̃_k = ℓ(x̃_k, θ_k)`` the computed value).

Iteration ``k`` (``Π`` the projection onto the bounds, ``G(z) = (θ_k − Π(θ_k − β_k z))/β_k`` the
gradient mapping, ``= z`` without bounds):

1. **Gradient.** Compute ``z_k``, ``ω_k`` and ``a_k`` at ``(ε, δ)``. While
   ``ω_k > (1 − η)‖G(z_k)‖``, tighten by ``τ`` the accuracies whose terms of ``ω`` take more
   than half of that allowance (``δ`` for the CG term, ``ε`` for the others); while
   ``a_k > c₁β_k‖G(z_k)‖²`` (the allowance must fit in the decrease the step is to certify),
   tighten ``ε``. Re-solve the inner problem (warm) if ``ε`` changed and recompute. Unconstrained, an accepted ``z_k`` is a descent direction:
   ``⟨∇ℓ(θ_k), z_k⟩ ≥ ‖z_k‖(‖z_k‖ − ω_k) ≥ η‖z_k‖²``.
2. **Inexact backtracking.** For ``β = β_k, ρβ_k, ρ²β_k, …`` (at most ``max_backtracks``):
   ``θ⁺ = Π(θ_k − βz_k)``, solve the inner problem at ``θ⁺`` to ``ε``, run CG there (its adjoint
   gives the dual-weighted loss bound ``a⁺``, and it is the next hypergradient if ``θ⁺`` is
   accepted) and accept when

   .. math::

       \\tilde\\ell(\\theta^+) + a^+ \\le \\tilde\\ell_k - a_k - \\frac{c_1}{\\beta}\\|\\theta^+ - \\theta_k\\|^2 ,

   which certifies ``ℓ(θ⁺) ≤ ℓ(θ_k) − (c₁/β)‖θ⁺ − θ_k‖²`` for the *true* upper loss (``a``
   includes a round-off allowance ``16 eps_mach |ℓ̃|``). If the computed losses alone pass the
   test (``ℓ̃(θ⁺) ≤ ℓ̃_k − (c₁/β)‖θ⁺ − θ_k‖²``) but the allowances spoil it, or the allowances
   exceed the first-order decrease bound ``(‖z_k‖ + ω_k)‖θ⁺ − θ_k‖``, a shorter step cannot
   help, and the line search ends as failed at once ("coarse").
3. **Adapt.** After success: ``θ_{k+1} = θ⁺``, ``ε ← νε``, ``δ ← νδ``, ``β_{k+1} = β·grow``.
   After failure: stay at ``θ_k`` with ``ε ← τε`` (and ``δ ← τδ`` unless only the allowances
   failed), keep ``β_k``.

Hence between consecutive records ``ℓ̃_{k+1} ≤ ℓ̃_k + a_k + a_{k+1}`` (the "tolerance
allowance"; the true loss never increases). Budgets: ``max_iter`` records (hypergradient
evaluations) and ``max_cost`` lower-level + CG iterations; exhausting either ends the run with
``success = False`` and a message saying which.

Differences from the paper's Algorithm: ``ε`` and ``δ`` are tightened separately according to
the term of ``ω`` that dominates; the loss bound is the dual-weighted residual of
:class:`~bilevel.AdaptiveInexact` (a product of the two residuals) instead of the first-order
``‖∇ₓℓ‖ ε``; the early exit of the line search in step 2; box constraints via ``G``.
"""
from __future__ import annotations

import inspect
import math
import time
import warnings
from typing import Any, Callable, Optional

from torch import Tensor

from .adaptive import AdaptiveInexact, resolve_strong_convexity
from .history import History, Result
from .hypergrad import outer_gradients
from .linalg import batch_norm
from .problem import (Bounds, InnerProblem, OuterLoss, Theta, check_theta, check_tolerance,
                      project, theta_floats, theta_norm)
from .solvers import METHODS, solve_inner

__all__ = ["MAID"]


def _default_max_iter(method: str) -> Optional[int]:
    """The ``max_iter`` default of the generic inner solver ``method`` (``None`` if unknown)."""
    fn = METHODS.get(method)
    if fn is None:
        return None
    default = inspect.signature(fn).parameters["max_iter"].default
    return default if isinstance(default, int) else None


def _unit_interval(name: str, value: float, closed_right: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    ok = 0 < v <= 1 if closed_right else 0 < v < 1
    if not ok:
        raise ValueError(f"{name} must lie in (0, 1{']' if closed_right else ')'}, got {value!r}")
    return v


class MAID:
    """MAID outer loop (see the module docstring for the algorithm).

    Parameters
    ----------
    inner, outer: the lower-level problem (strongly convex in ``x``) and upper loss.
    estimator: an :class:`~bilevel.AdaptiveInexact` (default: a new one with ``mu``; a given one
        without ``mu`` gets this ``mu``).
    mu: strong-convexity constant ``μ`` (number or ``(θ, batch) ↦ μ``); ``None`` uses
        ``inner.strong_convexity_constant`` and raises ``ValueError`` if that is ``None``.
    eps0: initial inner accuracy (per-sample ``‖∇ₓΦ_b‖``); ``None``: ``eps_rel ×`` the largest
        ``‖∇ₓΦ_b‖`` at the initial point.
    delta0: initial CG accuracy (per-sample residual); ``None``: ``delta_rel ×`` the largest
        ``‖(∇ₓℓ)_b‖`` at the first inner solution.
    eps_min: accuracy floor; if the bound test still fails there the run stops (no success).
    step_size: initial step ``β₀``; ``None`` uses ``1/‖z₀‖`` (a first move of length 1).
    eta: descent margin ``η ∈ (0, 1)``: ``z`` is accepted when ``ω ≤ (1 − η)‖G(z)‖``.
    c1: sufficient-decrease constant (default ``η/4``; convergence theory needs ``c₁ < η``).
    rho: backtracking factor ``ρ``; tau: tightening factor ``τ``; nu: loosening factor ``ν ≥ 1``;
    grow: step growth ``≥ 1`` after an accepted step (defaults ``ρ = τ = 0.5``, ``ν = 1.05``,
    ``grow = 10/9`` as in the authors' code).
    max_backtracks: trial steps per line search; max_tighten: tightenings per gradient.
    max_iter: budget of outer iterations (hypergradient evaluations, one History record each).
    max_cost: budget of lower-level + CG iterations (``None``: unlimited); each inner solve is
        capped at the budget left (a capped solve is flagged; the bounds use its residual).
    bounds: :class:`~bilevel.Bounds` on θ.
    inner_method, inner_max_iter: generic inner solver and its cap (a solve that stops early is
        flagged and warned about; the bounds use the residual it reached).
    gtol: stop with success when ``‖G(z)‖ + ω ≤ gtol`` (a certified ``‖G(∇ℓ(θ))‖ ≤ gtol``).
    callback: ``callback(record, theta)`` after every record; returning ``True`` stops.
    progress: show a tqdm bar.

    History keys: those of :class:`~bilevel.HOAG` (``iteration, upper_loss, grad_norm, tol,
    inner_iterations, cg_iterations, seconds, elapsed, cost, step_size, accepted,
    inner_converged, cg_converged, theta``) plus ``eps`` (``= tol``), ``delta``,
    ``error_bound`` (``ω``), ``error_terms`` (its summands), ``loss_allowance`` (``a``),
    ``projected_grad_norm`` (``‖G(z)‖``), ``step_accepted`` (did the line search from this point
    succeed; ``None`` when none was run), ``backtracks``, ``line_search_coarse``,
    ``line_search_cost`` (lower-level + CG iterations of the line search from this point; for
    the last record, work done after it), ``tightenings`` and ``mu``. Record ``k`` describes ``θ_k``; its ``cost``/``seconds`` include
    everything spent since record ``k−1`` (the line search that found ``θ_k``, re-solves, the
    hypergradient and its bounds). ``upper_loss`` is the computed ``ℓ̃_k``; ``step_size`` the
    step taken from ``θ_k`` (the last one tried when the line search failed). Every record is
    an iterate (``accepted`` is always ``True``); after a failed line search the next record is
    the same θ at a tighter accuracy. ``Result.theta``/``Result.x`` are those of the last record.
    """

    def __init__(self, inner: InnerProblem, outer: OuterLoss,
                 estimator: Optional[AdaptiveInexact] = None, mu=None,
                 eps0: Optional[float] = None, delta0: Optional[float] = None,
                 eps_rel: float = 1e-1, delta_rel: float = 1e-1, eps_min: float = 1e-13,
                 step_size: Optional[float] = None, eta: float = 0.3, c1: Optional[float] = None,
                 rho: float = 0.5, tau: float = 0.5, nu: float = 1.05, grow: float = 10 / 9,
                 max_backtracks: int = 8, max_tighten: int = 30, max_iter: int = 50,
                 max_cost: Optional[int] = None, bounds: Optional[Bounds] = None,
                 inner_method: str = "newton-cg", inner_max_iter: Optional[int] = None,
                 gtol: float = 0.0, callback: Optional[Callable] = None, progress: bool = False):
        if not isinstance(inner, InnerProblem):
            raise TypeError(f"inner must be an InnerProblem, got {type(inner).__name__}")
        if not callable(outer):
            raise TypeError(f"outer must be callable (an OuterLoss), got {type(outer).__name__}")
        if estimator is not None and not isinstance(estimator, AdaptiveInexact):
            raise TypeError(f"estimator must be an AdaptiveInexact (MAID needs its error bounds), "
                            f"got {type(estimator).__name__}")
        if mu is not None and not callable(mu):
            check_tolerance("mu", mu)
        if estimator is not None and mu is not None and estimator.mu is None:
            estimator.mu = mu
        self.inner, self.outer = inner, outer
        self.estimator = estimator if estimator is not None else AdaptiveInexact(mu=mu)
        self.mu = mu if mu is not None else self.estimator.mu
        self.eps0 = None if eps0 is None else check_tolerance("eps0", eps0)
        self.delta0 = None if delta0 is None else check_tolerance("delta0", delta0)
        self.eps_rel = check_tolerance("eps_rel", eps_rel)
        self.delta_rel = check_tolerance("delta_rel", delta_rel)
        self.eps_min = check_tolerance("eps_min", eps_min)
        self.step_size = None if step_size is None else check_tolerance("step_size", step_size)
        self.eta = _unit_interval("eta", eta)
        self.c1 = self.eta / 4 if c1 is None else check_tolerance("c1", c1)
        if self.c1 >= 1:
            raise ValueError(f"c1 must be < 1, got {c1!r}")
        self.rho = _unit_interval("rho", rho)
        self.tau = _unit_interval("tau", tau)
        self.nu = check_tolerance("nu", nu)
        if self.nu < 1:
            raise ValueError(f"nu must be ≥ 1 (it loosens the accuracy), got {nu!r}")
        self.grow = check_tolerance("grow", grow)
        if self.grow < 1:
            raise ValueError(f"grow must be ≥ 1, got {grow!r}")
        for name, v in (("max_backtracks", max_backtracks), ("max_tighten", max_tighten),
                        ("max_iter", max_iter)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if max_cost is not None and (not isinstance(max_cost, int) or max_cost < 1):
            raise ValueError(f"max_cost must be a positive int or None, got {max_cost!r}")
        self.max_backtracks, self.max_tighten, self.max_iter = max_backtracks, max_tighten, max_iter
        self.max_cost, self.bounds = max_cost, bounds
        self.inner_method, self.inner_max_iter = inner_method, inner_max_iter
        self.gtol = check_tolerance("gtol", gtol, allow_zero=True)
        self.callback, self.progress = callback, progress

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _roundoff(loss: float) -> float:
        """Floating-point allowance of a computed upper loss (``16 eps_mach |ℓ|``, float64)."""
        return 16 * 2.220446049250313e-16 * abs(loss) if math.isfinite(loss) else 0.0

    def _gradient_mapping_norm(self, theta: Theta, z: Theta, beta: float) -> float:
        """``‖G_β(z)‖ = ‖θ − Π(θ − βz)‖/β`` (``= ‖z‖`` without bounds). ``Π`` is nonexpansive, so
        ``|‖G_β(z)‖ − ‖G_β(∇ℓ)‖| ≤ ‖z − ∇ℓ‖ ≤ ω``."""
        if self.bounds is None:
            return theta_norm(z)
        trial = project({n: theta[n] - beta * z[n] for n in theta}, self.bounds)
        return theta_norm({n: trial[n] - theta[n] for n in theta}) / beta

    def run(self, theta0: Theta, batch: Any, x0: Optional[Tensor] = None) -> Result:
        """Run MAID from ``theta0`` on ``batch`` (``x0``: optional warm start of the inner solve)."""
        theta = check_theta(theta0, self.inner.theta_names)
        if self.bounds is not None:
            self.bounds.check_names(theta)
        theta = project(theta, self.bounds)
        resolve_strong_convexity(self.inner, theta, batch, self.mu, who="MAID")  # fail early
        est = self.estimator
        est.reset()
        history = History()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.max_iter, desc="MAID", unit="it")

        x = self.inner.init(theta, batch) if x0 is None else x0.detach().clone()
        if self.eps0 is not None:
            eps = self.eps0
        else:
            r0 = float(batch_norm(self.inner.grad(x, theta, batch)).max())
            eps = max(self.eps_rel * r0, self.eps_min)
        delta = self.delta0  # set after the first solve when None
        beta = self.step_size
        state = {"cost": 0, "inner_it": 0, "cg_it": 0, "inner_ok": True, "cg_ok": True}
        last_ok = None  # (theta, x) of the last record
        warned = {"inner": False, "cg": False}
        elapsed = 0.0
        t_mark = time.perf_counter()

        default_cap = _default_max_iter(self.inner_method)

        def budget_left() -> bool:
            return self.max_cost is None or state["cost"] < self.max_cost

        def solve(th, tol, start):
            cap = self.inner_max_iter
            if self.max_cost is not None:  # never let one solve overrun the budget by much
                remaining = max(self.max_cost - state["cost"], 1)
                cap = remaining if cap is None and default_cap is None else min(
                    cap if cap is not None else default_cap, remaining)
            sol = solve_inner(self.inner, th, batch, tol, x0=start, method=self.inner_method,
                              max_iter=cap)
            state["cost"] += sol.max_iterations
            state["inner_it"] += sol.max_iterations
            if not sol.all_converged:
                state["inner_ok"] = False
                if not warned["inner"]:
                    warnings.warn(f"MAID: inner solve hit its iteration cap before tolerance "
                                  f"{tol:.2e} (max ‖∇Φ‖ = {float(sol.grad_norm.max()):.2e}); the "
                                  f"bounds use the residual reached; flagged in History as "
                                  f"inner_converged=False", RuntimeWarning)
                    warned["inner"] = True
            return sol

        def evaluate(th, sol, full):
            hg = est(self.inner, self.outer, th, batch, sol.x, delta, error_bound=full)
            charge_cg(hg.cg_iterations)
            if not hg.cg_converged:
                state["cg_ok"] = False
                if not warned["cg"]:
                    warnings.warn(f"MAID: CG hit its iteration cap before tolerance {delta:.2e}; "
                                  f"the bounds use the residual reached; flagged in History as "
                                  f"cg_converged=False", RuntimeWarning)
                    warned["cg"] = True
            return hg

        def charge_cg(n):
            state["cost"] += n
            state["cg_it"] += n

        def finite(*v):
            return all(math.isfinite(float(t)) for t in v)

        success, message = False, "maximum number of outer iterations reached"
        sol = solve(theta, eps, x)
        sol_eps = eps
        if delta is None:
            _, gx0, _, _ = outer_gradients(self.outer, sol.x, theta, batch)
            delta = max(self.delta_rel * float(batch_norm(gx0).max()), 1e-300)
        hg = evaluate(theta, sol, True)
        hg_delta = delta
        for k in range(self.max_iter):
            # ---- 1. hypergradient with adaptive accuracy ------------------------------------
            tightenings = 0
            floor_hit = False
            pnorm = math.nan
            while True:
                if sol_eps > eps:  # x is coarser than the current ε: re-solve (warm)
                    sol = solve(theta, eps, sol.x)
                    sol_eps = eps
                    hg = None
                if hg is None or hg_delta > delta:
                    hg = evaluate(theta, sol, True)
                    hg_delta = delta
                if hg.error_bound is None:  # a trial point of the line search: add ω
                    before = hg.cg_iterations
                    est.complete(self.inner, theta, batch, sol.x, hg)
                    charge_cg(hg.cg_iterations - before)
                gnorm, omega = hg.norm(), float(hg.error_bound)
                if not finite(hg.loss, gnorm, omega):
                    break
                if beta is None:
                    beta = 1.0 / max(gnorm, 1e-300)
                pnorm = self._gradient_mapping_norm(theta, hg.theta_grad, beta)
                target = (1 - self.eta) * pnorm
                allowance = float(hg.info["loss_error_bound"])
                loss_ok = allowance <= self.c1 * beta * pnorm ** 2
                if (omega <= target and loss_ok) or pnorm + omega <= self.gtol or pnorm == 0.0:
                    break
                if eps <= self.eps_min or tightenings >= self.max_tighten:
                    floor_hit = True
                    break
                if not budget_left():
                    break
                # tighten the accuracies whose terms take more than half of the allowed ω
                cg_part = float(hg.info["terms"].get("cg", 0.0))
                if omega - cg_part > 0.5 * target or not loss_ok:
                    eps = max(eps * self.tau, self.eps_min)
                if cg_part > 0.5 * target:
                    delta *= self.tau
                tightenings += 1
            allowance = float(hg.info["loss_error_bound"])
            now = time.perf_counter()
            seconds, t_mark = now - t_mark, now
            elapsed += seconds
            history.append(iteration=k, upper_loss=hg.loss, grad_norm=gnorm,
                           projected_grad_norm=pnorm, tol=eps, eps=eps,
                           delta=hg_delta, error_bound=omega, loss_allowance=allowance,
                           inner_iterations=state["inner_it"], cg_iterations=state["cg_it"],
                           seconds=seconds, elapsed=elapsed, cost=state["cost"], step_size=None,
                           accepted=True, step_accepted=None, backtracks=0,
                           line_search_coarse=None, line_search_cost=0,
                           tightenings=tightenings, inner_converged=state["inner_ok"],
                           cg_converged=state["cg_ok"], mu=hg.info["mu"],
                           error_terms=dict(hg.info["terms"]), theta=theta_floats(theta))
            record = history[-1]
            state.update(inner_it=0, cg_it=0, inner_ok=True, cg_ok=True)
            last_ok = (theta, sol.x)
            if bar is not None:
                bar.set_postfix(loss=f"{hg.loss:.4g}", eps=f"{eps:.1e}", step=f"{beta:.2g}")
                bar.update(1)

            # ---- stopping tests -------------------------------------------------------------
            stop = True
            if not finite(hg.loss, gnorm, omega):
                message = (f"non-finite upper loss {hg.loss}, hypergradient norm {gnorm} or error "
                           f"bound {omega} at iteration {k}")
            elif pnorm + omega <= self.gtol:
                success = True
                message = (f"certified stationarity: ‖G(∇ℓ)‖ ≤ ‖G(z)‖ + ω = {pnorm + omega:.3e} ≤ "
                           f"gtol {self.gtol:.1e}")
            elif pnorm == 0.0:
                message = (f"the projected step is zero at iteration {k} (θ is stationary on the "
                           f"bounds up to the error bound ω = {omega:.3e})")
            elif floor_hit:
                message = (f"the error bound ω = {omega:.3e} stayed above (1 − η)‖G(z)‖ = "
                           f"{(1 - self.eta) * pnorm:.3e} at eps = {eps:.2e}, delta = {delta:.2e} "
                           f"({tightenings} tightenings, eps_min = {self.eps_min:.1e}): stationary "
                           f"to within ‖G(∇ℓ)‖ ≤ {pnorm + omega:.3e}")
            elif not budget_left():
                message = (f"budget of {self.max_cost} lower-level + CG iterations exhausted "
                           f"(used {state['cost']})")
            elif self.callback is not None and self.callback(record, theta):
                message = "stopped by callback"
            else:
                stop = False
            if stop or k == self.max_iter - 1:
                break

            # ---- 2. inexact backtracking line search ----------------------------------------
            z = hg.theta_grad
            lower = hg.loss - allowance - self._roundoff(hg.loss)  # ≤ the true loss at θ_k
            b = beta
            accepted_step = coarse = False
            backtracks = 0
            move_sq = 0.0
            cost_before = state["cost"]
            for _ in range(self.max_backtracks):
                trial = project({n: theta[n] - b * z[n] for n in theta}, self.bounds)
                move_sq = sum(float(((trial[n] - theta[n]).double() ** 2).sum()) for n in theta)
                if move_sq == 0.0:
                    break
                sol_t = solve(trial, eps, sol.x)
                hg_t = evaluate(trial, sol_t, False)
                loss_t, a_t = hg_t.loss, float(hg_t.info["loss_error_bound"])
                a_t += self._roundoff(loss_t)
                if finite(loss_t, a_t) and loss_t + a_t <= lower - self.c1 * move_sq / b:
                    accepted_step = True
                    theta, sol, sol_eps, hg, hg_delta = trial, sol_t, eps, hg_t, delta
                    break
                backtracks += 1
                # first-order model: no step along z can decrease ℓ by more than ‖∇ℓ‖‖θ⁺ − θ_k‖
                max_decrease = (gnorm + omega) * math.sqrt(move_sq)
                if allowance + a_t >= max_decrease or (
                        finite(loss_t) and loss_t <= hg.loss - self.c1 * move_sq / b):
                    # the computed loss decreased enough and only the allowances a_k + a⁺ spoil
                    # the certificate: a shorter step cannot help (it shrinks the margin), a
                    # tighter ε can -- end the line search as failed
                    coarse = True
                    break
                b *= self.rho
                if not budget_left():
                    break
            record.update(step_size=b, step_accepted=accepted_step, backtracks=backtracks,
                          line_search_coarse=coarse, line_search_cost=state["cost"] - cost_before)
            if accepted_step:
                beta = b * self.grow
                eps, delta = eps * self.nu, delta * self.nu
            else:
                if eps <= self.eps_min:
                    message = (f"no certified decrease at the accuracy floor eps_min = "
                               f"{self.eps_min:.1e} (iteration {k}: the loss allowances and "
                               f"round-off exceed the decrease a step can show; ‖G(z)‖ + ω = "
                               f"{pnorm + omega:.3e})")
                    break
                # the allowances a depend on ε only; a line search that ran out of trial steps
                # may also have had a poor direction, so then δ is tightened as well
                eps = max(eps * self.tau, self.eps_min)
                if not coarse:
                    delta *= self.tau
            if not budget_left():
                message = (f"budget of {self.max_cost} lower-level + CG iterations exhausted "
                           f"(used {state['cost']})")
                break
        if bar is not None:
            bar.close()
        final_theta, final_x = last_ok if last_ok is not None else (theta, x)
        params = (self.outer.trainable_parameters().items()
                  if hasattr(self.outer, "trainable_parameters") else [])
        return Result(theta={n: v.detach().clone() for n, v in final_theta.items()}, x=final_x,
                      history=history, success=success, message=message, n_iter=len(history),
                      params={n: p.detach().clone() for n, p in params})

