"""HOAG: hyperparameter optimisation with approximate gradient (Pedregosa, ICML 2016).

Outer iteration ``k`` (Figure 2.1 of the reference):

1. solve the inner problem to ``‖∇ₓΦ_b‖ ≤ ε_k`` per sample, warm-started from the last ``x``;
2. compute the hypergradient ``g_k`` with CG to residual ``ε_k``, warm-started from the last ``q``;
3. adaptive step ``θ_{k+1} = Π(θ_k − g_k / L_k)`` (``Π`` the projection onto the bounds), where
   the Lipschitz estimate ``L_k`` is adapted from the observed upper loss:

   * **accept, grow the step** if ``ℓ_k ≤ ℓ_{k−1} + C ε_k + ε_{k−1}(C + 1/L)‖g_{k−1}‖ − ‖g_{k−1}‖²/(2L)``
     (an inexact sufficient-decrease test; ``L ← L / grow``);
   * **reject** if ``ℓ_k > ℓ_{k−1} + reject_ratio·|ℓ_{k−1}|``: return to ``θ_{k−1}``,
     ``L ← 2L`` and halve all later tolerances;
   * otherwise **accept, shrink the step** (``L ← shrink·L``).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import Tensor

from .history import History, Result, tolerance_schedule
from .hypergrad import ImplicitCG, outer_gradients
from .linalg import batch_norm
from .problem import (Bounds, HypergradientEstimator, InnerProblem, OuterLoss, Theta,
                      check_theta, check_tolerance, project, theta_floats, theta_norm)
from .solvers import solve_inner

__all__ = ["HOAG"]


class HOAG:
    """HOAG outer loop.

    Parameters
    ----------
    inner, outer: the lower-level problem and upper loss.
    estimator: hypergradient estimator (default :class:`~bilevel.ImplicitCG`).
    tolerance: ``"geometric"``, ``"quadratic"``, ``"cubic"``, ``"constant"`` or ``k ↦ ε_k``.
    tol0, tol_rate, tol_min: schedule parameters (see :func:`bilevel.history.tolerance_schedule`).
        ``tol0=None`` (default) scales ε₀ to the problem: ``0.1·min(max_b‖∇ₓΦ_b(x⁰)‖,
        max_b‖(∇ₓℓ(x⁰))_b‖)`` at the initial point, so that neither the inner solve nor CG is
        satisfied before it starts (an absolute ε₀ above ‖∇ₓℓ‖ would make CG return q = 0).
    max_iter: number of outer iterations.
    step_size: initial step ``1/L₀``; ``None`` uses ``1/‖g₀‖`` (first move of length 1).
    bounds: :class:`~bilevel.Bounds` on θ (projected after each step).
    inner_method, inner_max_iter: generic inner solver and its cap when the problem has no own.
    param_optimizer: a ``torch.optim`` optimiser over ``outer.trainable_parameters()``; when
        given, those parameters (fine-tuned task layers) take a step with ``∇_φℓ`` after every
        accepted outer iteration.
    slack: the constant ``C`` of the acceptance test.
    gtol: stop with success when ``‖g_k‖ ≤ gtol`` (``0``: never stop early).
    callback: called as ``callback(record, theta)`` after every iteration; returning ``True`` stops.
    progress: show a tqdm progress bar with the upper loss.
    checkpoint: path of a :class:`~bilevel.Result` written atomically after every iteration;
        an interrupted run continues with ``run(theta0, batch, resume=Result.load(path))``.
    """

    def __init__(self, inner: InnerProblem, outer: OuterLoss,
                 estimator: Optional[HypergradientEstimator] = None,
                 tolerance: Union[str, Callable[[int], float]] = "geometric", tol0: Optional[float] = None,
                 tol_rate: float = 0.9, tol_min: float = 1e-12, max_iter: int = 30,
                 step_size: Optional[float] = None, bounds: Optional[Bounds] = None,
                 inner_method: str = "newton-cg", inner_max_iter: Optional[int] = None,
                 param_optimizer: Optional[torch.optim.Optimizer] = None, slack: float = 1.0,
                 grow: float = 1.1, shrink: float = 1.5, reject_ratio: float = 0.2,
                 gtol: float = 0.0, callback: Optional[Callable] = None, progress: bool = False,
                 checkpoint: Optional[str] = None):
        if not isinstance(inner, InnerProblem):
            raise TypeError(f"inner must be an InnerProblem, got {type(inner).__name__}")
        if not callable(outer):
            raise TypeError(f"outer must be callable (an OuterLoss), got {type(outer).__name__}")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        if step_size is not None:
            check_tolerance("step_size", step_size)
        self.inner, self.outer = inner, outer
        self.estimator = estimator if estimator is not None else ImplicitCG()
        self.tolerance, self.tol0, self.tol_rate, self.tol_min = tolerance, tol0, tol_rate, tol_min
        tolerance_schedule(tolerance, 1.0 if tol0 is None else tol0, tol_rate, tol_min)  # validate
        self.max_iter, self.step_size, self.bounds = max_iter, step_size, bounds
        self.inner_method, self.inner_max_iter = inner_method, inner_max_iter
        self.param_optimizer = param_optimizer
        self.slack = check_tolerance("slack", slack, allow_zero=True)
        self.grow, self.shrink, self.reject_ratio = grow, shrink, reject_ratio
        self.gtol = check_tolerance("gtol", gtol, allow_zero=True)
        self.callback, self.progress = callback, progress
        self.checkpoint = checkpoint

    # ------------------------------------------------------------------------------------------
    def _apply_param_grads(self, grads: Dict[str, Tensor]) -> None:
        if self.param_optimizer is None or not grads:
            return
        params = self.outer.trainable_parameters()
        for name, g in grads.items():
            params[name].grad = g.detach().clone()
        self.param_optimizer.step()
        self.param_optimizer.zero_grad(set_to_none=True)

    def _scaled_tol0(self, theta: Theta, batch: Any, x0: Optional[Tensor]) -> float:
        x = self.inner.init(theta, batch) if x0 is None else x0
        g_inner = batch_norm(self.inner.grad(x, theta, batch)).max()
        _, gx, _, _ = outer_gradients(self.outer, x, theta, batch)
        g_outer = batch_norm(gx).max()
        scales = [float(v) for v in (g_inner, g_outer) if float(v) > 0 and math.isfinite(float(v))]
        return 0.1 * min(scales) if scales else 1e-8

    def run(self, theta0: Theta, batch: Any, x0: Optional[Tensor] = None,
            resume: Optional[Result] = None) -> Result:
        """Run HOAG from ``theta0`` on ``batch`` (``x0``: optional warm start of the inner solve).

        ``resume``: a :class:`~bilevel.Result` of an earlier (interrupted) run of the same problem;
        the run continues where it stopped, up to ``max_iter`` iterations in all, with its step
        size, tolerance scale, last accepted iterate and History.
        """
        theta = check_theta(theta0, self.inner.theta_names)
        if self.bounds is not None:
            self.bounds.check_names(theta)
        theta = project(theta, self.bounds)
        self.estimator.reset()
        history = History()
        x = x0
        L = None if self.step_size is None else 1.0 / self.step_size
        tol_scale = 1.0
        prev = None  # (theta, loss, grad, eps) of the last accepted iterate
        x_accepted = None
        elapsed, cost = 0.0, 0
        start = 0
        if resume is not None:
            st = resume.state
            if not st or st.get("method") != "HOAG":
                raise ValueError(f"resume must be a Result of a HOAG run, got state keys {sorted(st)}")
            history = History(list(resume.history.records))
            theta = check_theta(st["next_theta"], self.inner.theta_names)
            x, L, tol_scale = st["x"], st["L"], st["tol_scale"]
            elapsed, cost, start = st["elapsed"], st["cost"], len(history)
            if st["prev_theta"] is not None:
                prev = (st["prev_theta"], st["prev_loss"], st["prev_grad"], st["prev_eps"])
                x_accepted = resume.x
            self.estimator.load_warm_state(st["estimator"])
            tol0 = st["tol0"]
        else:
            tol0 = self.tol0 if self.tol0 is not None else self._scaled_tol0(theta, batch, x0)
        self.schedule = tolerance_schedule(self.tolerance, tol0, self.tol_rate, self.tol_min)
        self._tol0_used = tol0
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.max_iter, initial=start, desc="HOAG", unit="it")
        warned_inner = warned_cg = False
        success, message = False, "maximum number of outer iterations reached"
        k = start
        for k in range(start, self.max_iter):
            t0 = time.perf_counter()
            eps = max(self.schedule(k) * tol_scale, 1e-300)
            sol = solve_inner(self.inner, theta, batch, eps, x0=x, method=self.inner_method,
                              max_iter=self.inner_max_iter)
            x = sol.x
            hg = self.estimator(self.inner, self.outer, theta, batch, x, eps)
            gnorm = hg.norm()
            if not math.isfinite(hg.loss) or not math.isfinite(gnorm):
                message = f"non-finite upper loss {hg.loss} or hypergradient norm {gnorm} at iteration {k}"
                break
            if not sol.all_converged and not warned_inner:
                warnings.warn(f"HOAG iteration {k}: inner solve hit its iteration cap before "
                              f"tolerance {eps:.2e} (max ‖∇Φ‖ = {float(sol.grad_norm.max()):.2e}); "
                              f"flagged in History as inner_converged=False", RuntimeWarning)
                warned_inner = True
            if not hg.cg_converged and not warned_cg:
                warnings.warn(f"HOAG iteration {k}: CG hit its iteration cap before tolerance "
                              f"{eps:.2e}; flagged in History as cg_converged=False", RuntimeWarning)
                warned_cg = True
            if L is None:
                L = max(gnorm, 1e-12)
            accepted = True
            if prev is not None:
                th_old, f_old, g_old, eps_old = prev
                gn_old = theta_norm(g_old)
                bound = (f_old + self.slack * eps + eps_old * (self.slack + 1.0 / L) * gn_old
                         - gn_old ** 2 / (2 * L))
                if hg.loss <= bound:
                    L /= self.grow
                elif hg.loss > f_old + self.reject_ratio * abs(f_old):
                    accepted = False
                    L *= 2.0
                    tol_scale *= 0.5
                else:
                    L *= self.shrink
            step = 1.0 / L
            iter_cost = sol.max_iterations + hg.cg_iterations + hg.extra_inner_steps
            cost += iter_cost
            elapsed += time.perf_counter() - t0
            record = dict(iteration=k, upper_loss=hg.loss, grad_norm=gnorm, tol=eps,
                          inner_iterations=sol.max_iterations, cg_iterations=hg.cg_iterations,
                          seconds=time.perf_counter() - t0, elapsed=elapsed, cost=cost,
                          step_size=step, accepted=accepted, inner_converged=sol.all_converged,
                          cg_converged=hg.cg_converged, theta=theta_floats(theta))
            history.append(**record)
            if bar is not None:
                bar.set_postfix(loss=f"{hg.loss:.4g}", tol=f"{eps:.1e}", step=f"{step:.2g}")
                bar.update(1)
            if accepted:
                self._apply_param_grads(hg.param_grads)
                prev = (theta, hg.loss, hg.theta_grad, eps)
                x_accepted = x
                if self.gtol > 0 and gnorm <= self.gtol:
                    success, message = True, f"hypergradient norm {gnorm:.3e} ≤ gtol {self.gtol:.1e}"
                    break
            th_base, g_base = prev[0], prev[2]
            current = theta
            theta = project({n: th_base[n] - step * g_base[n] for n in th_base}, self.bounds)
            if self.checkpoint is not None:
                self._result(prev, x_accepted, theta, x, L, tol_scale, elapsed, cost, history,
                             success, message).save(self.checkpoint)
            if self.callback is not None and self.callback(record, current):
                message = "stopped by callback"
                break
        if bar is not None:
            bar.close()
        result = self._result(prev, x_accepted, theta, x, L, tol_scale, elapsed, cost, history,
                              success, message)
        if self.checkpoint is not None:
            result.save(self.checkpoint)
        return result

    def _result(self, prev, x_accepted, theta, x, L, tol_scale, elapsed, cost, history, success,
                message) -> Result:
        final_theta, final_x = (prev[0], x_accepted) if prev is not None else (theta, x)
        prev_theta, prev_loss, prev_grad, prev_eps = prev if prev is not None else (None,) * 4
        state = dict(method="HOAG", next_theta=theta, x=x, L=L, tol_scale=tol_scale,
                     tol0=self._tol0_used, estimator=self.estimator.warm_state(),
                     elapsed=elapsed, cost=cost, prev_theta=prev_theta, prev_loss=prev_loss,
                     prev_grad=prev_grad, prev_eps=prev_eps)
        params = (self.outer.trainable_parameters().items()
                  if hasattr(self.outer, "trainable_parameters") else [])
        return Result(theta={k_: v.detach().clone() for k_, v in final_theta.items()}, x=final_x,
                      history=history, success=success, message=message, n_iter=len(history),
                      params={n: p.detach().clone() for n, p in params}, state=state)
