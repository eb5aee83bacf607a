"""QuasiNewton: an inexact, bound-constrained L-BFGS outer loop for bilevel learning.

The upper-level problem ``min_θ ℓ(x̂(θ), θ)`` over a box ``l ≤ θ ≤ u`` is solved by projected
L-BFGS steps on *inexact* hypergradients, with the inner and CG accuracy tied to what the step
test and the stopping test need.

**Direction** (projected quasi-Newton, Bertsekas 1982; the L-BFGS two-loop recursion, Nocedal &
Wright §7.2). With ``g`` the hypergradient at the accepted ``θ_k``, the ε-active set
``A = {i: θ_i ≤ l_i + ε_a, g_i > 0} ∪ {i: θ_i ≥ u_i − ε_a, g_i < 0}``
(``ε_a = min(10⁻³, ‖G(g)‖)``, ``G(g) = θ − Π(θ − g)`` the projected gradient) is held fixed and

.. math::

    d_F = -H_F\\, g_F ,\\qquad d_A = -\\gamma\\, g_A ,

where ``H_F`` is the L-BFGS inverse Hessian built from the last ``memory`` pairs
``(s_j, y_j) = (θ_{j+1} − θ_j, g_{j+1} − g_j)`` restricted to the free coordinates and
``γ = sᵀy / yᵀy`` of the newest pair. Without pairs ``γ = 1/‖g‖_∞``: the first step moves θ by
at most 1 in its own units. Every step is capped coordinate by coordinate,
``|Δθ_i| ≤ max_move·max(1, |θ_i|)`` (the direction is scaled as a whole until every coordinate
fits): one large coordinate does not license large moves of the small ones, which on problems
with flat stretches (sample weights through a sigmoid, penalties through an exponential) would
throw them onto plateaus they cannot leave. A direction that is not a descent direction
(``⟨g, d⟩ ≥ 0``) is replaced by ``−γg`` and the memory is cleared.

**Line search** on the projected path ``θ(α) = Π(θ_k + αd)``, ``α = 1, …``: the inner problem is
solved at ``θ(α)`` (warm start from ``x_k``) and the Armijo test is made on *dual-corrected*
losses ``ℓ̂ = ℓ(x̃) − ⟨q, ∇ₓΦ(x̃)⟩`` (second-order accurate in the inner residual; ``q`` the CG
adjoint at ``θ_k``; as in :class:`~bilevel.HOAG`):

.. math::

    \\hat\\ell(\\theta(\\alpha)) \\le \\hat\\ell_k + c_1 \\langle g, \\theta(\\alpha) - \\theta_k\\rangle .

When the predicted decrease is below the round-off of ``ℓ`` the trapezoid rule
``½⟨g + g⁺, θ⁺ − θ_k⟩ ≤ c₁⟨g, θ⁺ − θ_k⟩`` decides instead. A trial is rejected (and ``α``
shrinks by a safeguarded quadratic interpolation into ``[0.1α, 0.5α]``) when the test fails,
the inner solve fails or does not converge, curvature is not positive, or any value is not
finite. A test whose outcome lies within the size of the dual corrections tightens the accuracy
and re-evaluates ``θ_k``.

**Curvature pairs** are kept only when ``sᵀy > 10⁻⁸‖s‖‖y‖`` (trustworthy positive curvature;
Powell's skipping rule, Nocedal & Wright §7.2 / Byrd-Nocedal-Schnabel); others are skipped.

**Accuracy** (relative, scale-free as in HOAG): the inner problem is solved to
``max_b‖∇ₓΦ_b‖ ≤ ε·R`` (``R = max_b‖∇ₓΦ_b(x⁰; θ₀)‖``) and CG to a residual ``ε`` relative to
``‖(∇ₓℓ)_b‖``, with

.. math::

    \\varepsilon_{k+1} = \\max\\big(\\varepsilon_{\\min},\\ \\min(\\varepsilon_k,\\ \\max(\\varepsilon_c,\\
    \\varepsilon_0 (\\|G(g_{k+1})\\| / \\|G(g_0)\\|)^{p}))\\big),\\qquad p = 1.5\\ (\\texttt{tol\\_power}),

so the hypergradient's error vanishes faster than the gradient, ``o(‖g‖)`` -- the condition
under which inexact quasi-Newton methods keep their superlinear rate (Dennis & Moré; Ehrhardt
& Roberts 2021, 2023: the hypergradient error is linear in the inner and CG residuals;
Pedregosa 2016: summable accuracies). ``p = 2`` buys accuracy sooner than needed (on the
benchmarks it cost 15–50 % more inner + CG iterations); with ``p = 1`` only the relative error
stays bounded, and the loop needs more iterations. The schedule stops at the confirmation
accuracy ``ε_c`` (see Stopping): a stop is claimed there, and below it an inner solver may need
many times the iterations; an exhausted line search and a stale trial still tighten below it.
After a trial that cost no inner or CG iteration (a stale evaluation) ``ε`` is multiplied by
``tol_rate`` as well. Early iterations are cheap; accuracy is bought where the step test needs
it.

**Stopping** (``success=True`` is a checked claim; ``gtol`` is at least the accuracy floor of
the working dtype, and ``1e-5`` when the upper loss is computed in float32, as by a float32 task
network on float64 images, whose gradient is round-off below that): when
``‖G(g_k)‖ ≤ gtol·‖G(g_0)‖``, θ_k is
re-evaluated at the confirmation accuracy ``ε_c = max(ε_min, 10⁻²·gtol)`` (inner and CG
converged, the sign at active bounds included) and the run succeeds only if the test still
holds there and the decrease the quasi-Newton model still expects from a full step,
``−½⟨g, Π(θ_k + d) − θ_k⟩``, is at most ``ftol·(ℓ₀ − ℓ_k)`` (a flat stretch, where ``‖g‖`` is
small but the curvature is smaller still, is not taken for an optimum). When every step down to ``xtol·(1 + ‖θ‖)`` fails at the accuracy floor with the
memory cleared, the run succeeds if ``‖G(g)‖ ≤ floor_gtol·‖G(g_0)‖`` ("no measurable decrease
left") and fails otherwise. Inner failures at every step size, a failure at an accepted point,
and the iteration cap end the run with ``success=False`` and a message naming the cause.

**Round-off** (automatic floor only, ``tol_min=None``): in float32 an inner solver can stall
above the floor ``ε_min`` (sums over many pixels carry round-off of order ``√n·u``), and a trial
it cannot finish would be rejected at every step size. When the inner solve hits its iteration
cap with ``max_b‖∇ₓΦ_b‖ = a·R`` and ``a ≤ 100·ε_min``, the floor is raised to ``2a`` (once per
level; a warning says so; :meth:`~bilevel.outer.OuterLoop._roundoff_floor`, shared with
:class:`~bilevel.HOAG`), the same trial is solved again there, and ``gtol`` and the
confirmation accuracy follow the raised floor. The success message names the raised floor. A
user's ``tol_min`` is never changed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .outer import UNCONFIRMED, LoopState, OuterLoop, accuracy_floor, implicit_estimator
from .problem import (Bounds, HypergradientEstimator, InnerProblem, OuterLoss, Theta,
                      check_tolerance, theta_floats)

__all__ = ["QuasiNewton", "QuasiNewtonState"]


def _unit(name: str, value: float) -> float:
    v = check_tolerance(name, value)
    if not v < 1:
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    return v


@dataclass
class QuasiNewtonState(LoopState):
    """The loop's state at the accepted ``theta``: ``loss``, dual-corrected ``closs`` and the
    size ``unc`` of its correction, ``grad`` (``None`` until evaluated) at relative accuracy
    ``grad_eps``, ``q`` the CG adjoint, ``gnorm = ‖G(g)‖`` and its first value ``g0``; ``eps``
    the current relative accuracy, ``inner_ref`` the scale ``R``; the L-BFGS memory ``s_mem``,
    ``y_mem`` (flat float64 vectors, oldest first); the line search: ``direction``, ``alpha``,
    ``ls_reasons`` (why its trials failed), ``reset_at_floor``; ``skipped`` curvature pairs."""

    loss: float = math.nan
    closs: float = math.nan
    unc: float = 0.0
    grad: Optional[Theta] = None
    grad_eps: float = math.inf
    q: Optional[Tensor] = None
    gnorm: float = math.nan
    g0: Optional[float] = None
    loss0: float = math.nan
    eps: float = math.nan
    inner_ref: float = 1.0
    s_mem: List[Tensor] = field(default_factory=list)
    y_mem: List[Tensor] = field(default_factory=list)
    direction: Optional[Tensor] = None
    alpha: float = 1.0
    ls_reasons: List[str] = field(default_factory=list)
    reset_at_floor: bool = False
    skipped: int = 0
    last_move: float = 0.0
    inner_ok: bool = True
    cg_ok: bool = True


class _Flat:
    """θ-dicts as one float64 vector (names sorted) and the box as two vectors."""

    def __init__(self, theta: Theta, bounds: Optional[Bounds]):
        self.names = sorted(theta)  # the vector's order
        self.order = list(theta)  # the caller's order, kept in every θ handed back
        self.like = {n: theta[n] for n in self.names}
        lo, hi = [], []
        for n in self.names:
            k = theta[n].numel()
            lo.append(torch.full((k,), -math.inf if bounds is None else
                                 float(bounds.lower.get(n, -math.inf)), dtype=torch.float64))
            hi.append(torch.full((k,), math.inf if bounds is None else
                                 float(bounds.upper.get(n, math.inf)), dtype=torch.float64))
        self.lower, self.upper = torch.cat(lo), torch.cat(hi)

    def vec(self, d: Theta) -> Tensor:
        return torch.cat([d[n].detach().double().cpu().reshape(-1) for n in self.names])

    def theta(self, v: Tensor) -> Theta:
        out, i = {}, 0
        for n in self.names:
            t = self.like[n]
            out[n] = v[i:i + t.numel()].reshape(t.shape).to(dtype=t.dtype, device=t.device)
            i += t.numel()
        return {n: out[n] for n in self.order}

    def project(self, v: Tensor) -> Tensor:
        return torch.maximum(torch.minimum(v, self.upper), self.lower)


def lbfgs_two_loop(g: Tensor, s_mem: List[Tensor], y_mem: List[Tensor], gamma: float) -> Tensor:
    """``H g`` for the L-BFGS inverse Hessian ``H`` of the pairs ``(s_j, y_j)`` (oldest first)
    with ``H₀ = γI`` (Nocedal & Wright, Algorithm 7.4). Pairs with ``sᵀy ≤ 0`` are passed over."""
    q = g.clone()
    stack = []
    for s, y in zip(reversed(s_mem), reversed(y_mem)):
        sy = float(s @ y)
        if sy <= 0:
            continue
        a = float(s @ q) / sy
        q -= a * y
        stack.append((s, y, sy, a))
    r = gamma * q
    for s, y, sy, a in reversed(stack):
        r += s * (a - float(y @ r) / sy)
    return r


class QuasiNewton(OuterLoop):
    """Inexact projected L-BFGS outer loop (see the module docstring for the rules in formulas).

    Parameters
    ----------
    inner, outer: the lower-level problem and upper loss.
    estimator: hypergradient estimator (default :class:`~bilevel.ImplicitCG`), called with a
        relative CG tolerance.
    memory: number of L-BFGS pairs kept (default 50: at least the number of hyperparameters of
        most problems, so the model can become the full BFGS one; the two-loop recursion costs
        O(memory·dim θ), nothing next to an inner solve).
    tol0: relative first accuracy ``ε₀`` in (0, 1).
    tol_power: the exponent ``p`` in [1, 4] of the accuracy rule (module docstring).
    tol_rate: factor in (0, 1) applied to ``ε`` after a stale trial.
    tol_min: accuracy floor ``ε_min`` (``None``: ``1e-10`` in float64, ``1e-5`` otherwise,
        raised where the inner solve stalls at round-off above it; module docstring).
    max_iter: outer iterations (every trial point is one, accepted or not).
    max_move: cap of one step, ``|Δθ_i| ≤ max_move·max(1, |θ_i|)`` for every coordinate.
    c1: sufficient-decrease constant in (0, 1).
    gtol: relative stopping tolerance on ``‖G(g)‖`` (``0`` disables it; raised to the accuracy
        floor of the dtype, ``1e-5`` in float32, below which the gradient is noise, and to
        ``1e-5`` when the upper loss is computed in float32, e.g. by a float32 task network on
        float64 images); ftol: a
        stop also needs the decrease the quasi-Newton model still expects, ``−½⟨g, Δθ⟩``, to
        be at most ``ftol·(ℓ₀ − ℓ_k)`` (``0`` disables it); floor_gtol: the looser one
        accepted when no measurable decrease is left at the accuracy floor; xtol: the shortest
        step tried, relative to ``1 + ‖θ‖``.
    bounds, inner_method, inner_max_iter, param_optimizer, callback, progress, checkpoint: as for
        :class:`~bilevel.HOAG`.

    History keys: those of :class:`~bilevel.HOAG` plus ``memory`` (pairs held), ``skipped_pairs``,
    ``direction`` (``"lbfgs"`` or ``"gradient"``) and ``confirmed`` (the point was evaluated at
    the confirmation accuracy).

    Examples
    --------
    >>> from bilevel import QuasiNewton, Bounds                        # doctest: +SKIP
    >>> res = QuasiNewton(inner, outer, bounds=Bounds(lower={"log_smoothing": -12.0})).run(theta0, batch)
    >>> res.success, res.message                                        # doctest: +SKIP
    """

    name = "QuasiNewton"
    State = QuasiNewtonState

    def __init__(self, inner: InnerProblem, outer: OuterLoss,
                 estimator: Optional[HypergradientEstimator] = None, *, memory: int = 50,
                 tol0: float = 0.1, tol_rate: float = 0.1, tol_power: float = 1.5,
                 tol_min: Optional[float] = None, max_iter: int = 100,
                 max_move: float = 2.0, c1: float = 1e-4, gtol: float = 1e-6, ftol: float = 1e-7,
                 floor_gtol: float = 1e-3, xtol: float = 1e-10, bounds: Optional[Bounds] = None,
                 inner_method: str = "newton-cg", inner_max_iter: Optional[int] = None,
                 param_optimizer: Optional[torch.optim.Optimizer] = None,
                 callback: Optional[Callable] = None, progress: bool = False,
                 checkpoint: Optional[str] = None):
        super().__init__(inner, outer, implicit_estimator(estimator), max_iter=max_iter, bounds=bounds,
                         inner_method=inner_method, inner_max_iter=inner_max_iter,
                         param_optimizer=param_optimizer, callback=callback, progress=progress,
                         checkpoint=checkpoint)
        if not isinstance(memory, int) or isinstance(memory, bool) or memory < 1:
            raise ValueError(f"memory must be a positive int, got {memory!r}")
        self.memory = memory
        self.tol0 = _unit("tol0", tol0)
        self.tol_rate = _unit("tol_rate", tol_rate)
        self.tol_power = check_tolerance("tol_power", tol_power)
        if not 1 <= self.tol_power <= 4:
            raise ValueError(f"tol_power must lie in [1, 4], got {tol_power!r}")
        self.tol_min = None if tol_min is None else _unit("tol_min", tol_min)
        self.max_move = check_tolerance("max_move", max_move)
        self.c1 = _unit("c1", c1)
        self.gtol = check_tolerance("gtol", gtol, allow_zero=True)
        self.floor_gtol = check_tolerance("floor_gtol", floor_gtol, allow_zero=True)
        self.ftol = check_tolerance("ftol", ftol, allow_zero=True)
        self.xtol = check_tolerance("xtol", xtol)
        if self.gtol >= 1 or self.floor_gtol >= 1:
            raise ValueError(f"gtol and floor_gtol must be < 1, got gtol={gtol!r}, "
                             f"floor_gtol={floor_gtol!r}")

    # ----- accuracies -------------------------------------------------------------------------
    def _floor(self, st: QuasiNewtonState) -> float:
        """``tol_min``, or the automatic floor: the dtype's, raised where the inner solve stalls
        at round-off (:meth:`_raise_floor`)."""
        return self._auto_floor(st) if self.tol_min is None else self.tol_min

    def _auto_floor(self, st: QuasiNewtonState) -> float:
        return self._automatic_floor(st, self._working_dtype(st))

    @classmethod
    def _dtype_floor(cls, st: QuasiNewtonState) -> float:
        """:func:`bilevel.outer.accuracy_floor` of the working dtype."""
        return accuracy_floor(cls._working_dtype(st))

    def _gtol(self, st: QuasiNewtonState) -> float:
        """``gtol``, raised to the automatic floor (the user's ``tol_min`` aside, at least the
        dtype's): a relative gradient below the relative accuracy of its own evaluation cannot
        be told from noise (in float32 the loop would spin to ``max_iter`` at the optimum)."""
        floor = self._auto_floor(st) if self.tol_min is None else self._dtype_floor(st)
        return max(self.gtol, floor, self._loss_floor()) if self.gtol > 0 else 0.0

    def _loss_floor(self) -> float:
        """:func:`~bilevel.outer.accuracy_floor` of the precision the upper loss is computed in
        (a float32 task network on float64 images: ``1e-5``; ``0`` for a float64 loss)."""
        return accuracy_floor(torch.float32) if self._loss_eps > 1e-15 else 0.0

    def _raise_floor(self, st: QuasiNewtonState, sol, reason: Optional[str]) -> bool:
        """:meth:`~bilevel.outer.OuterLoop._roundoff_floor` with this loop's floor and scale;
        ``ε`` follows a raised floor (never with a user's ``tol_min``)."""
        if self.tol_min is not None:
            return False
        if not self._roundoff_floor(st, sol, reason, self._floor(st), st.inner_ref):
            return False
        st.eps = max(st.eps, st.raised_floor)
        return True

    def _confirm_eps(self, st: QuasiNewtonState) -> float:
        return max(self._floor(st), 1e-2 * self.gtol)

    def _start(self, theta: Theta, batch: Any, x0: Optional[Tensor]) -> QuasiNewtonState:
        ref = self._inner_reference(theta, batch)
        return QuasiNewtonState(theta=theta, x=None if x0 is None else x0.detach().clone(),
                                inner_ref=ref, eps=self.tol0)

    # ----- one iteration ----------------------------------------------------------------------
    def _iterate(self, st: QuasiNewtonState, batch: Any) -> Dict[str, Any]:
        flat = _Flat(st.theta, self.bounds)
        if st.grad is None:  # first iteration, a resume, or a re-evaluation at another accuracy
            rec = self._evaluate(st, batch)
            if st.message is None:
                self._check_stop(st, flat)
            return rec
        kind = "lbfgs"
        if st.direction is None:
            st.direction, kind = self._direction(st, flat)
            st.alpha = 1.0
        theta_v = flat.vec(st.theta)
        trial_v = flat.project(theta_v + st.alpha * st.direction)
        trial = flat.theta(trial_v)
        st.last_theta = trial
        eps = st.eps
        sol, reason = self._solve(st, trial, batch, eps * st.inner_ref, st.x)
        retry = self._raise_floor(st, sol, reason)  # round-off: the same trial, raised floor
        f_trial, unc, hg = math.nan, math.nan, None
        if reason is None:
            f_trial = self._upper_loss(sol.x, trial, batch)
            reason, unc, hg = self._decrease_test(st, flat, sol.x, trial, trial_v - theta_v,
                                                  f_trial, batch)
        rec = dict(upper_loss=f_trial, loss_correction=unc, tol=eps, inner_tol=eps * st.inner_ref,
                   step_size=st.alpha, inner_iterations=0 if sol is None else sol.max_iterations,
                   inner_converged=sol is not None and sol.all_converged, theta=theta_floats(trial),
                   direction=kind, memory=len(st.s_mem), skipped_pairs=st.skipped, confirmed=False)
        if reason is None and hg is None:
            hg, reason = self._trial_hypergradient(st, trial, sol.x, batch, eps)
        if reason is None:
            self._accept(st, flat, trial, sol.x, hg, batch, eps,
                         stale=sol.max_iterations == 0 or hg.cg_iterations == 0)
            rec.update(grad_norm=st.gnorm, cg_iterations=hg.cg_iterations,
                       cg_converged=hg.cg_converged, accepted=True, reason=None)
            if st.message is None:
                self._check_stop(st, flat)
            return rec
        rec.update(grad_norm=st.gnorm, cg_iterations=0 if hg is None else hg.cg_iterations,
                   cg_converged=None, accepted=False, reason=reason)
        if retry:
            pass  # α and the direction are kept; the next iteration solves at the raised floor
        elif reason == "loss not resolved":  # tighter accuracy, then re-evaluate θ_k
            st.grad, st.direction = None, None
        else:
            self._reject(st, flat, reason, trial_v - theta_v, f_trial)
        return rec

    # ----- the direction ----------------------------------------------------------------------
    def _direction(self, st: QuasiNewtonState, flat: _Flat, cap: bool = True) -> Tuple[Tensor, str]:
        """The projected L-BFGS direction at ``θ_k`` (module docstring), capped in length."""
        th, g = flat.vec(st.theta), flat.vec(st.grad)
        eps_a = min(1e-3, st.gnorm)
        active = ((th <= flat.lower + eps_a) & (g > 0)) | ((th >= flat.upper - eps_a) & (g < 0))
        free = (~active).double()
        gmax = float(g.abs().max())
        first = max(1.0, 2.0 * st.last_move)  # no curvature known: double the last move
        if st.s_mem:
            s, y = st.s_mem[-1], st.y_mem[-1]
            gamma = float(s @ y) / float(y @ y)
        else:
            gamma = first / gmax if gmax > 0 else 1.0
        kind = "lbfgs" if st.s_mem else "gradient"
        d = -lbfgs_two_loop(g * free, [s * free for s in st.s_mem],
                            [y * free for y in st.y_mem], gamma) - gamma * g * (1 - free)
        if not (bool(torch.isfinite(d).all()) and float(g @ d) < 0):
            if cap:
                st.s_mem, st.y_mem = [], []
            gamma = first / gmax if gmax > 0 else 1.0
            d, kind = -gamma * g, "gradient"
        # per coordinate: |Δθ_i| ≤ max_move·max(1, |θ_i|), the direction kept (scaled as a whole)
        over = float((d.abs() / (self.max_move * th.abs().clamp_min(1.0))).max())
        if cap and over > 1:
            d = d / over
        return d, kind

    # ----- the step test ----------------------------------------------------------------------
    def _decrease_test(self, st: QuasiNewtonState, flat: _Flat, x: Tensor, trial: Theta,
                       step: Tensor, f_trial: float, batch: Any) -> tuple:
        """Armijo on dual-corrected losses; returns ``(reason or None, |correction|, g⁺)``
        (``g⁺`` when the trapezoid rule of the round-off regime needed it)."""
        if not math.isfinite(f_trial):
            return "non-finite upper loss", math.nan, None
        f_hat, unc = self._corrected(x, trial, batch, f_trial, st.q)
        slope = float(flat.vec(st.grad) @ step)  # ⟨g, θ⁺ − θ_k⟩ < 0
        predicted = -self.c1 * slope
        noise = unc + st.unc
        margin = f_hat - (st.closs - predicted)
        loss_eps = self._loss_eps
        resolved = not (abs(margin) < noise and noise > 0.1 * abs(slope))
        if resolved and abs(slope) > 1.6e3 * loss_eps * abs(st.loss):
            return (None if margin <= 0 else "insufficient decrease"), unc, None
        # the losses cannot tell (inexact or round-off): the gradients decide
        hg, why = self._trial_hypergradient(st, trial, x, batch, st.eps)
        if why is not None:
            return why, unc, None
        change = 0.5 * (slope + float(flat.vec(hg.theta_grad) @ step))
        return (None if change <= -predicted else "insufficient decrease"), unc, hg

    # ----- accepted / rejected trials ---------------------------------------------------------
    def _accept(self, st: QuasiNewtonState, flat: _Flat, trial: Theta, x: Tensor, hg,
                batch: Any, eps: float, stale: bool = False) -> None:
        s = flat.vec(trial) - flat.vec(st.theta)
        y = flat.vec(hg.theta_grad) - flat.vec(st.grad)
        sy, ns, ny = float(s @ y), float(s.norm()), float(y.norm())
        if math.isfinite(sy) and sy > 1e-8 * ns * ny and ny > 0:
            st.s_mem.append(s)
            st.y_mem.append(y)
            del st.s_mem[:-self.memory], st.y_mem[:-self.memory]
        else:
            st.skipped += 1
        st.last_move = float(s.abs().max()) if not st.s_mem else 0.0
        st.theta, st.x = trial, x
        self._install(st, hg, batch, eps, inner_ok=True)
        st.direction, st.ls_reasons, st.reset_at_floor = None, [], False
        if st.message is None and st.g0:
            # a trial that cost no inner or CG iteration told nothing new: tighten anyway
            rate = self.tol_rate if stale else 1.0
            target = self.tol0 * (st.gnorm / st.g0) ** self.tol_power
            # the schedule stops at the confirmation accuracy a stop is claimed at; tighter
            # only where a step test asks for it (or a stale trial, by ``rate``)
            st.eps = max(self._floor(st), min(rate * st.eps, max(target, self._confirm_eps(st))))

    def _reject(self, st: QuasiNewtonState, flat: _Flat, reason: str, step: Tensor,
                f_trial: float) -> None:
        """Shorten the step (safeguarded quadratic interpolation); when the step is below
        ``xtol``: tighten the accuracy, clear the memory, or end the run."""
        st.ls_reasons.append(reason)
        if (reason == "insufficient decrease" and len(st.ls_reasons) >= 2
                and st.eps < 0.5 * st.grad_eps):
            # trials at a tighter accuracy than θ_k's values keep failing: ℓ_k may be
            # underestimated; re-evaluate θ_k at the trials' accuracy before shortening further
            st.grad, st.direction, st.ls_reasons = None, None, []
            return
        shrink = 0.5
        slope = float(flat.vec(st.grad) @ step)
        if reason == "insufficient decrease" and math.isfinite(f_trial) and slope < 0:
            curv = f_trial - st.loss - slope
            if curv > 0:
                shrink = min(0.5, max(0.1, -slope / (2 * curv)))
        st.alpha *= shrink
        nxt = flat.project(flat.vec(st.theta) + st.alpha * st.direction) - flat.vec(st.theta)
        if float(nxt.norm()) > self.xtol * (1.0 + float(flat.vec(st.theta).norm())):
            return
        self._line_search_exhausted(st)

    def _line_search_exhausted(self, st: QuasiNewtonState) -> None:
        loss_failures = all(r == "insufficient decrease" for r in st.ls_reasons)
        floor = self._floor(st)
        st.direction = None
        if not loss_failures and st.eps <= floor:
            st.message = (f"cannot recover: every step down to the shortest (xtol) was rejected; "
                          f"last reason: {st.ls_reasons[-1]}")
            return
        if st.eps > floor:  # the gradient may be too inexact for this direction: tighten
            st.eps = max(floor, 0.01 * st.eps)
            st.grad, st.s_mem, st.y_mem, st.ls_reasons = None, [], [], []
            return
        if st.s_mem and not st.reset_at_floor:  # one more try along −γg
            st.s_mem, st.y_mem, st.reset_at_floor = [], [], True
            st.ls_reasons = []
            return
        if st.g0 is not None and st.gnorm <= self.floor_gtol * st.g0 and st.cg_ok and st.inner_ok:
            st.success = True
            st.message = (f"converged: no measurable decrease left at the accuracy floor "
                          f"(ε = {floor:.1e}); projected hypergradient norm {st.gnorm:.3e} ≤ "
                          f"floor_gtol·‖G(g₀)‖ = {self.floor_gtol * st.g0:.3e}")
        else:
            st.message = (f"no decrease found at the accuracy floor (ε = {floor:.1e}) with "
                          f"projected hypergradient norm {st.gnorm:.3e} (> floor_gtol·‖G(g₀)‖)")

    # ----- evaluation at the accepted point ---------------------------------------------------
    def _evaluate(self, st: QuasiNewtonState, batch: Any) -> Dict[str, Any]:
        eps = st.eps
        base = dict(tol=eps, inner_tol=eps * st.inner_ref, step_size=None, accepted=True,
                    reason=None, theta=theta_floats(st.theta), direction=None,
                    memory=len(st.s_mem), skipped_pairs=st.skipped,
                    confirmed=eps <= self._confirm_eps(st))
        sol, reason = self._solve(st, st.theta, batch, eps * st.inner_ref, st.x)
        if sol is None or reason == "inner solve produced non-finite values":
            st.message = f"the inner problem fails at the accepted θ = {theta_floats(st.theta)}: {reason}"
            return dict(base, upper_loss=math.nan, grad_norm=math.nan, inner_iterations=0,
                        cg_iterations=0, accepted=False, inner_converged=False, cg_converged=False)
        if self._raise_floor(st, sol, reason):  # round-off: met at the raised floor
            reason = None
        if reason is not None:
            self._warn_once(st, "inner", reason + "; flagged in History as inner_converged=False")
        st.x = sol.x
        hg, why = self._trial_hypergradient(st, st.theta, sol.x, batch, eps)
        if why is not None:
            st.message = f"the hypergradient fails at the accepted θ = {theta_floats(st.theta)}: {why}"
            return dict(base, upper_loss=math.nan, grad_norm=math.nan,
                        inner_iterations=sol.max_iterations, cg_iterations=0, accepted=False,
                        inner_converged=reason is None, cg_converged=False)
        self._install(st, hg, batch, eps, inner_ok=reason is None)
        return dict(base, upper_loss=hg.loss, loss_correction=st.unc, grad_norm=st.gnorm,
                    inner_iterations=sol.max_iterations, cg_iterations=hg.cg_iterations,
                    inner_converged=reason is None, cg_converged=hg.cg_converged)

    def _install(self, st: QuasiNewtonState, hg, batch: Any, eps: float, inner_ok: bool) -> None:
        """Make ``hg`` (computed at ``st.theta``, ``st.x`` at accuracy ``eps``) the accepted
        point's values; step the outer loss' trainable parameters."""
        st.loss, st.grad, st.q, st.grad_eps = hg.loss, hg.theta_grad, hg.adjoint, eps
        st.inner_ok, st.cg_ok = inner_ok, hg.cg_converged
        if self._step_params(hg.param_grads):  # φ moved: ℓ_k is re-measured with the new φ
            st.loss = self._upper_loss(st.x, st.theta, batch)
        st.closs, st.unc = self._corrected(st.x, st.theta, batch, st.loss, st.q)
        flat = _Flat(st.theta, self.bounds)
        th, g = flat.vec(st.theta), flat.vec(st.grad)
        st.gnorm = float((th - flat.project(th - g)).norm())
        if not (math.isfinite(st.loss) and math.isfinite(st.gnorm)):
            st.message = (f"non-finite upper loss {st.loss} or hypergradient norm {st.gnorm} at "
                          f"θ = {theta_floats(st.theta)}")
            return
        self._note_accepted(st, st.loss)
        if not math.isfinite(st.loss0):
            st.loss0 = st.loss
        if st.g0 is None or st.g0 == 0.0:
            st.g0 = st.gnorm

    # ----- stopping ---------------------------------------------------------------------------
    def _check_stop(self, st: QuasiNewtonState, flat: _Flat) -> None:
        """Stop when ``‖G‖ ≤ gtol·‖G₀‖`` and the model decrease is at most ``ftol·(ℓ₀ − ℓ)``,
        claimed only at the confirmation accuracy. (A looser gradient test with the model test
        alone gave false successes: the L-BFGS model underestimates what is left.)"""
        gtol = self._gtol(st)
        if not (gtol > 0 and st.gnorm <= gtol * st.g0):
            return
        model = self._model_decrease(st, flat)
        allowed = self.ftol * max(st.loss0 - st.loss, 0.0)
        if self.ftol > 0 and model > allowed:
            return  # flat but not finished: the curvature model expects more decrease
        confirm = self._confirm_eps(st)
        if st.grad_eps > confirm * (1 + 1e-12) or not (st.inner_ok and st.cg_ok):
            if st.grad_eps <= confirm * (1 + 1e-12):  # already at that accuracy, not converged
                st.message = UNCONFIRMED
                return
            st.eps, st.grad, st.direction = confirm, None, None  # re-evaluate θ_k there
            return
        st.success = True
        st.message = (f"converged: projected hypergradient norm {st.gnorm:.3e} ≤ gtol·‖G(g₀)‖, "
                      f"confirmed at relative accuracy {confirm:.1e}; the quasi-Newton model "
                      f"expects a further decrease of {model:.2e} ≤ ftol·(ℓ₀ − ℓ) = {allowed:.2e}")
        if st.raised_floor is not None and self.tol_min is None:
            st.message += (f"; accuracy floor raised to {st.raised_floor:.1e}, where the inner "
                           f"solve stalls at round-off in {self._working_dtype(st)}")
        if gtol > self.gtol and gtol == self._loss_floor():
            st.message += (f"; gtol raised to {gtol:.0e}: the upper loss is computed in a "
                           f"lower precision than θ")

    def _model_decrease(self, st: QuasiNewtonState, flat: _Flat) -> float:
        """``−½⟨g, Δθ⟩`` for the full quasi-Newton step ``Δθ = Π(θ + d) − θ``: the decrease the
        curvature model still expects (large on a flat stretch where ``‖g‖`` alone is small)."""
        d, _ = self._direction(st, flat, cap=False)
        th = flat.vec(st.theta)
        return max(0.0, -0.5 * float(flat.vec(st.grad) @ (flat.project(th + d) - th)))
