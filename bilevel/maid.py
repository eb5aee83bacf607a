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
   tighten ``ε``. Re-solve the inner problem (warm) if ``ε`` changed and recompute.
   Unconstrained, an accepted ``z_k`` is a descent direction:
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

3. **Adapt.** After success: ``θ_{k+1} = θ⁺``, ``ε ← νε``, ``δ ← νδ`` and
   ``β_{k+1} = ⟨s, y⟩/⟨y, y⟩`` (``step_rule="spectral"``, the default: the Barzilai–Borwein
   length with ``s = θ⁺ − θ_k``, ``y = z⁺ − z_k``, kept within ``[10⁻³β, 10³β]``;
   ``β·grow`` where ``⟨s, y⟩ ≤ 0``, e.g. when a loose ``ε`` left ``x̃`` and hence ``z``
   unchanged) or ``β_{k+1} = β·grow`` (``step_rule="adaptive"``, the authors' rule).
   After failure: stay at ``θ_k`` with ``ε ← τε``; unless only the allowances failed, also
   ``δ ← τδ`` and ``β_{k+1} = ρ^{m}β_k`` (``m`` the trials made): the next search goes on from
   the shortest step tried, so a first step far too long for the curvature met later (data in
   other units) is shortened geometrically instead of being retried. A trial whose loss,
   allowance or hypergradient is not finite counts as a failed trial (shorter step).

Hence between consecutive records ``ℓ̃_{k+1} ≤ ℓ̃_k + a_k + a_{k+1}`` (the "tolerance
allowance"; the true loss never increases). Budgets: ``max_iter`` records (hypergradient
evaluations) and ``max_cost`` lower-level + CG iterations; exhausting either ends the run with
``success = False`` and a message saying which.

Differences from the paper's Algorithm: ``ε`` and ``δ`` are tightened separately according to
the term of ``ω`` that dominates; the loss bound is the dual-weighted residual of
:class:`~bilevel.AdaptiveInexact` (a product of the two residuals) instead of the first-order
``‖∇ₓℓ‖ ε``; the early exit of the line search in step 2; box constraints via ``G``; the
spectral first trial step of each search (every trial still passes the certified decrease test
of step 2 before it is accepted, so the true loss still never increases). With the fixed factor
the searches zig-zag across a narrow curved valley (a TV weight against a smoothing the loss
hardly depends on): on the quickstart problem the authors' rule ended 1.9e-2 above the optimum
at 100 iterations, the spectral one reaches it and certifies it.

Scale-free accuracies: ``ε₀ = eps_rel·R`` with ``R = max_b‖∇ₓΦ_b(x⁰)‖`` at the initial point,
``δ₀ = delta_rel·max_b‖(∇ₓℓ)_b‖`` at the first inner solution, and the floor
``ε_min = eps_min·R`` (automatic: ``eps_min = 1e-12`` in float64 and ``1e-5`` in float32,
raised to twice the accuracy reached where the inner solve stalls at round-off above it, so
that no tightening asks for an accuracy the dtype cannot give); every test compares quantities
of the same units (``ω`` with ``‖G‖``, ``a`` with ``β‖G‖²``), so multiplying Φ or ℓ by a constant leaves the iterates unchanged.

Stopping: ``success=True`` when ``‖G(z_k)‖ + ω_k ≤ gtol·‖G(z₀)‖`` (a certified
``‖G(∇ℓ(θ_k))‖ ≤ gtol·‖G(z₀)‖``), or when the accuracy floor is reached (the bound cannot be
tightened further, or no decrease can be certified there) with ``‖G(z_k)‖ + ω_k ≤
floor_gtol·‖G(z₀)‖`` (stationary to what the floor can certify). At the floor with a larger
certificate the run fails with "no certified decrease at the accuracy floor".
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import distributed as dist_
from .adaptive import AdaptiveInexact, NotStronglyConvexError, resolve_strong_convexity
from .hypergrad import outer_gradients
from .linalg import NonPositiveCurvatureError, batch_norm
from .outer import STEP_RULES, LoopState, OuterLoop, accuracy_floor, spectral_step
from .problem import (Bounds, Hypergradient, InnerProblem, OuterLoss, Theta, check_tolerance,
                      gradient_mapping_norm, project, theta_axpy, theta_distance, theta_floats,
                      theta_sub)
from .solvers import METHODS, SolveResult

__all__ = ["MAID", "MAIDState"]

_EPS = 2.220446049250313e-16
#: the automatic accuracy floor relative to ``R`` in float64 (MAID certifies with a-posteriori
#: bounds, so it may ask for more than the other loops' ``accuracy_floor``)
FLOAT64_FLOOR = 1e-12


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


def _roundoff(loss: float) -> float:
    """Floating-point allowance of a computed upper loss (``16 eps_mach |ℓ|``, float64)."""
    return 16 * _EPS * abs(loss) if math.isfinite(loss) else 0.0


def _finite(*values) -> bool:
    return all(math.isfinite(float(v)) for v in values)


@dataclass
class MAIDState(LoopState):
    """MAID's state: accuracies ``eps`` (inner) and ``delta`` (CG), their floor ``eps_floor``,
    the step ``beta``, the first certified-gradient scale ``g0``, the accuracies the cached
    solution / hypergradient were computed at (``sol_eps``, ``hg_delta``) and the work since the
    last record. ``sol`` and ``hg`` are caches (not checkpointed; recomputed after a resume)."""

    eps: float = math.nan
    delta: Optional[float] = None
    eps_floor: float = 0.0
    ref: float = 0.0
    beta: Optional[float] = None
    g0: Optional[float] = None
    sol_eps: float = math.inf
    hg_delta: float = math.inf
    inner_it: int = 0
    cg_it: int = 0
    inner_ok: bool = True
    cg_ok: bool = True
    sol: Optional[SolveResult] = None
    hg: Optional[Hypergradient] = None

    TRANSIENT: ClassVar[Tuple[str, ...]] = ("sol", "hg")


def _moved_norm(z: Theta, trial: Theta, theta: Theta) -> float:
    """``‖z_S‖`` in float64, ``S`` the entries where ``trial`` differs from ``theta``: with
    ``m = θ − θ⁺`` zero off ``S``, ``⟨∇ℓ, m⟩ ≤ ‖(∇ℓ)_S‖‖m‖``."""
    return math.sqrt(sum(float((z[k].detach().double() ** 2)[trial[k] != theta[k]].sum())
                         for k in z))


class MAID(OuterLoop):
    """MAID outer loop (see the module docstring for the algorithm).

    Parameters
    ----------
    inner, outer: the lower-level problem (strongly convex in ``x``) and upper loss.
    estimator: an :class:`~bilevel.AdaptiveInexact` (default: a new one with ``mu``; a given one
        without ``mu`` gets this ``mu``).
    mu: strong-convexity constant ``μ`` (number or ``(θ, batch) ↦ μ``); ``None`` uses
        ``inner.strong_convexity_constant`` and raises ``ValueError`` if that is ``None``.
    eps_rel, delta_rel: the first accuracies relative to ``R`` and ``max_b‖(∇ₓℓ)_b‖``.
    eps0, delta0: absolute first accuracies instead (``None``: relative rule).
    eps_min: the accuracy floor relative to ``R`` (``None``: ``1e-12`` in float64,
        :func:`~bilevel.outer.accuracy_floor` of the dtype otherwise, ``1e-5`` in float32; this
        automatic floor is raised where the inner solve stalls at round-off above it, see
        :meth:`~bilevel.outer.OuterLoop._roundoff_floor`; an ``eps_min`` you pass is never
        changed).
    step_size: initial step ``β₀``; ``None`` uses ``1/‖z₀‖`` (a first move of length 1).
    eta: descent margin ``η ∈ (0, 1)``: ``z`` is accepted when ``ω ≤ (1 − η)‖G(z)‖``.
    c1: sufficient-decrease constant (default ``η/4``; convergence theory needs ``c₁ < η``).
    rho: backtracking factor ``ρ``; tau: tightening factor ``τ``; nu: loosening factor ``ν ≥ 1``;
    grow: step growth ``≥ 1`` after an accepted step (defaults ``ρ = τ = 0.5``, ``ν = 1.05``,
    ``grow = 10/9`` as in the authors' code).
    max_backtracks: trial steps per line search; max_tighten: tightenings per gradient.
    max_iter: budget of outer iterations (hypergradient evaluations, one History record each).
    max_cost: budget of lower-level + CG iterations (``None``: unlimited).
    gtol, floor_gtol: the stopping tolerances (relative to ``‖G(z₀)‖``; module docstring).
    step_rule: ``"spectral"`` (Barzilai–Borwein first trial steps, the default) or
        ``"adaptive"`` (``β·grow`` after every success, as published); module docstring, step 3.
    bounds, inner_method, inner_max_iter, param_optimizer, callback, progress, checkpoint: as
        for :class:`~bilevel.HOAG`.

    History keys: those of :class:`~bilevel.HOAG` plus ``eps`` (``= tol``), ``delta``,
    ``error_bound`` (``ω``), ``error_terms``, ``loss_allowance`` (``a``),
    ``projected_grad_norm`` (``‖G(z)‖``), ``step_accepted`` (did the line search from this point
    succeed; ``None`` when none was run), ``backtracks``, ``line_search_coarse``,
    ``line_search_cost``, ``tightenings`` and ``mu``. Record ``k`` describes ``θ_k``;
    ``inner_iterations``/``cg_iterations`` count the work since the previous record, ``cost``
    is cumulative at the end of the iteration (line search included).

    Examples
    --------
    >>> import torch                                                     # doctest: +SKIP
    >>> from bilevel import MAID, Bounds
    >>> from recon.problems import TVDenoising
    >>> from recon.losses import MSEToTarget
    >>> from recon.data import denoising_batch
    >>> batch = denoising_batch(n=4, size=32, sigma=0.1, dtype=torch.float64)
    >>> theta0 = {"log_weight": torch.tensor(-4.0, dtype=torch.float64),
    ...           "log_smoothing": torch.tensor(-4.0, dtype=torch.float64)}
    >>> res = MAID(TVDenoising(), MSEToTarget(), max_iter=50, bounds=Bounds(lower={"log_smoothing": -12.0})).run(theta0, batch)
    >>> res.success, res.message, res.history.column("upper_loss")[-1]
    """

    name = "MAID"
    State = MAIDState

    def __init__(self, inner: InnerProblem, outer: OuterLoss,
                 estimator: Optional[AdaptiveInexact] = None, mu=None,
                 eps0: Optional[float] = None, delta0: Optional[float] = None,
                 eps_rel: float = 1e-1, delta_rel: float = 1e-1, eps_min: Optional[float] = None,
                 step_size: Optional[float] = None, eta: float = 0.3, c1: Optional[float] = None,
                 rho: float = 0.5, tau: float = 0.5, nu: float = 1.05, grow: float = 10 / 9,
                 max_backtracks: int = 8, max_tighten: int = 30, max_iter: int = 100,
                 max_cost: Optional[int] = None, gtol: float = 1e-6, floor_gtol: float = 1e-3,
                 step_rule: str = "spectral",
                 bounds: Optional[Bounds] = None, inner_method: str = "newton-cg",
                 inner_max_iter: Optional[int] = None,
                 param_optimizer: Optional[torch.optim.Optimizer] = None,
                 callback: Optional[Callable] = None, progress: bool = False,
                 checkpoint: Optional[str] = None):
        if estimator is not None and not isinstance(estimator, AdaptiveInexact):
            raise TypeError(f"estimator must be an AdaptiveInexact (MAID needs its error bounds), "
                            f"got {type(estimator).__name__}")
        if mu is not None and not callable(mu):
            check_tolerance("mu", mu)
        if estimator is not None and mu is not None and estimator.mu is None:
            estimator.mu = mu
        estimator = estimator if estimator is not None else AdaptiveInexact(mu=mu)
        super().__init__(inner, outer, estimator, max_iter=max_iter, bounds=bounds,
                         inner_method=inner_method, inner_max_iter=inner_max_iter,
                         param_optimizer=param_optimizer, callback=callback, progress=progress,
                         checkpoint=checkpoint)
        self.mu = mu if mu is not None else estimator.mu
        self.eps0 = None if eps0 is None else check_tolerance("eps0", eps0)
        self.delta0 = None if delta0 is None else check_tolerance("delta0", delta0)
        self.eps_rel = _unit_interval("eps_rel", eps_rel)
        self.delta_rel = _unit_interval("delta_rel", delta_rel)
        self.eps_min = None if eps_min is None else check_tolerance("eps_min", eps_min)
        self.step_size = None if step_size is None else check_tolerance("step_size", step_size)
        self.eta = _unit_interval("eta", eta)
        self.c1 = self.eta / 4 if c1 is None else check_tolerance("c1", c1)
        if self.c1 >= 1:
            raise ValueError(f"c1 must be < 1, got {c1!r}")
        self.rho = _unit_interval("rho", rho)
        self.tau = _unit_interval("tau", tau)
        self.nu = check_tolerance("nu", nu)
        self.grow = check_tolerance("grow", grow)
        if self.nu < 1 or self.grow < 1:
            raise ValueError(f"nu and grow must be ≥ 1, got nu={nu!r}, grow={grow!r}")
        for name, v in (("max_backtracks", max_backtracks), ("max_tighten", max_tighten)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if max_cost is not None and (not isinstance(max_cost, int) or max_cost < 1):
            raise ValueError(f"max_cost must be a positive int or None, got {max_cost!r}")
        self.max_backtracks, self.max_tighten, self.max_cost = max_backtracks, max_tighten, max_cost
        self.gtol = check_tolerance("gtol", gtol, allow_zero=True)
        self.floor_gtol = check_tolerance("floor_gtol", floor_gtol, allow_zero=True)
        if step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {STEP_RULES}, got {step_rule!r}")
        self.step_rule = step_rule

    # ----- start ------------------------------------------------------------------------------
    def _start(self, theta: Theta, batch: Any, x0: Optional[Tensor]) -> MAIDState:
        resolve_strong_convexity(self.inner, theta, batch, self.mu, who="MAID")  # fail early
        x = self.inner.init(theta, batch) if x0 is None else x0.detach().clone()
        ref = float(batch_norm(self.inner.grad(self.inner.init(theta, batch), theta, batch)).max())
        ref = dist_.all_reduce(ref, "max")
        if not (math.isfinite(ref) and ref > 0):
            ref = dist_.all_reduce(float(batch_norm(x).max()), "max") or 1.0
        eps = self.eps0 if self.eps0 is not None else self.eps_rel * ref
        floor = self._floor_rel(x.dtype) * ref
        return MAIDState(theta=theta, x=x, eps=max(eps, floor), eps_floor=floor, ref=ref,
                         delta=self.delta0, beta=self.step_size)

    def _floor_rel(self, dtype: torch.dtype) -> float:
        """The accuracy floor relative to ``R``: ``eps_min``, or ``1e-12`` in float64 and
        :func:`~bilevel.outer.accuracy_floor` of ``dtype`` otherwise."""
        if self.eps_min is not None:
            return self.eps_min
        return FLOAT64_FLOOR if dtype == torch.float64 else accuracy_floor(dtype)

    def _raise_floor(self, st: MAIDState, sol: SolveResult, reason: Optional[str]) -> bool:
        """Where the inner solve stalls at round-off above the automatic floor, raise
        ``eps_floor`` to ``2·max_b‖∇ₓΦ_b‖`` (:meth:`~bilevel.outer.OuterLoop._roundoff_floor`)
        and ``eps`` to at least it, so that no more solves ask for an accuracy the dtype
        cannot give. Never with a user's ``eps_min``."""
        if self.eps_min is not None or not st.ref > 0:
            return False
        if not self._roundoff_floor(st, sol, reason, st.eps_floor / st.ref, st.ref):
            return False
        st.eps_floor = st.raised_floor * st.ref
        st.eps = max(st.eps, st.eps_floor)
        return True

    # ----- budget-aware pieces ----------------------------------------------------------------
    def _budget_left(self, st: MAIDState) -> bool:
        return self.max_cost is None or st.cost < self.max_cost

    def _maid_solve(self, st: MAIDState, theta: Theta, batch: Any, tol: float, start: Tensor,
                    trial: bool = False) -> Optional[SolveResult]:
        """Inner solve charged to the budget; ``None`` for a trial point where it fails hard
        (non-positive curvature, non-finite values); at an accepted point that is an error."""
        cap = self.inner_max_iter
        if self.max_cost is not None:  # never let one solve overrun the budget by much
            default_cap = _default_max_iter(self.inner_method)
            remaining = max(self.max_cost - st.cost, 1)
            known = cap if cap is not None else default_cap
            cap = remaining if known is None else min(known, remaining)
        cost0 = st.cost
        sol, reason = self._solve(st, theta, batch, tol, start, max_iter=cap)
        if sol is None or reason == "inner solve produced non-finite values":
            if trial:
                return None
            raise ValueError(f"MAID: {reason} at the accepted θ = {theta_floats(theta)}")
        st.inner_it += st.cost - cost0
        if reason is not None:
            st.inner_ok = False
        if reason is not None and not self._raise_floor(st, sol, reason):
            self._warn_once(st, "inner", f"{reason}; the bounds use the residual reached; flagged "
                                         f"in History as inner_converged=False")
        return sol

    def _maid_evaluate(self, st: MAIDState, theta: Theta, batch: Any, sol: SolveResult,
                       full: bool) -> Hypergradient:
        hg = self.estimator(self.inner, self.outer, theta, batch, sol.x, st.delta, error_bound=full)
        st.cost += hg.cg_iterations
        st.cg_it += hg.cg_iterations
        if not hg.cg_converged:
            st.cg_ok = False
            self._warn_once(st, "cg", f"CG hit its iteration cap before tolerance {st.delta:.2e}; "
                                      f"the bounds use the residual reached; flagged in History "
                                      f"as cg_converged=False")
        return hg

    def _gradient_mapping_norm(self, theta: Theta, z: Theta, beta: float) -> float:
        """``‖G_β(z)‖ = ‖θ − Π(θ − βz)‖/β`` (``= ‖z‖`` without bounds). ``Π`` is nonexpansive, so
        ``|‖G_β(z)‖ − ‖G_β(∇ℓ)‖| ≤ ‖z − ∇ℓ‖ ≤ ω``."""
        return gradient_mapping_norm(theta, z, self.bounds, beta)

    # ----- one iteration ----------------------------------------------------------------------
    def _iterate(self, st: MAIDState, batch: Any) -> Dict[str, Any]:
        if st.hg is None:  # first iteration or after a resume
            self._initial_evaluation(st, batch)
        tightenings, floor_hit, pnorm = self._certify(st, batch)
        hg = st.hg
        if st.g0 is None and _finite(pnorm):
            st.g0 = pnorm
        self._note_accepted(st, hg.loss)
        record = self._record(st, hg, pnorm, tightenings)
        st.inner_it = st.cg_it = 0
        st.inner_ok = st.cg_ok = True
        if not self._stop(st, hg, pnorm, floor_hit, tightenings):
            self._line_search(st, batch, hg, pnorm, record)
        return record

    def _initial_evaluation(self, st: MAIDState, batch: Any) -> None:
        st.sol = self._maid_solve(st, st.theta, batch, st.eps, st.x)
        st.x, st.sol_eps = st.sol.x, st.eps
        _, gx0, _, _ = outer_gradients(self.outer, st.x, st.theta, batch)
        gmax = dist_.all_reduce(float(batch_norm(gx0).max()), "max")
        if st.delta is None:
            st.delta = max(self.delta_rel * gmax, 1e-300)
        elif st.delta >= gmax > 0:  # CG would stop at q = 0 and certify nothing
            self._warn_once(st, "delta0", f"delta0 = {st.delta:.3e} ≥ max‖∇ₓℓ‖ = {gmax:.3e} lets CG "
                                          f"stop at q = 0; using delta_rel·max‖∇ₓℓ‖ instead")
            st.delta = max(self.delta_rel * gmax, 1e-300)
        st.hg, st.hg_delta = self._maid_evaluate(st, st.theta, batch, st.sol, True), st.delta

    def _certify(self, st: MAIDState, batch: Any) -> Tuple[int, bool, float]:
        """Step 1: tighten ``ε``/``δ`` until ``ω ≤ (1 − η)‖G(z)‖`` and ``a ≤ c₁β‖G(z)‖²``.
        Returns ``(tightenings, floor_hit, ‖G(z)‖)``."""
        tightenings, pnorm = 0, math.nan
        while True:
            if st.sol_eps > st.eps:  # x is coarser than the current ε: re-solve (warm)
                st.sol = self._maid_solve(st, st.theta, batch, st.eps, st.sol.x)
                st.x, st.sol_eps, st.hg = st.sol.x, st.eps, None
            if st.hg is None or st.hg_delta > st.delta:
                st.hg, st.hg_delta = self._maid_evaluate(st, st.theta, batch, st.sol, True), st.delta
            if st.hg.error_bound is None:  # a trial point of the line search: add ω
                before = st.hg.cg_iterations
                self.estimator.complete(self.inner, st.theta, batch, st.sol.x, st.hg)
                st.cost += st.hg.cg_iterations - before
                st.cg_it += st.hg.cg_iterations - before
            hg = st.hg
            gnorm, omega = hg.norm(), float(hg.error_bound)
            if not _finite(hg.loss, gnorm, omega):
                return tightenings, False, math.nan
            if st.beta is None:
                st.beta = 1.0 / max(gnorm, 1e-300)
            pnorm = self._gradient_mapping_norm(st.theta, hg.theta_grad, st.beta)
            target = (1 - self.eta) * pnorm
            loss_ok = hg.bound.loss <= self.c1 * st.beta * pnorm ** 2
            if (omega <= target and loss_ok) or pnorm + omega == 0.0 or (
                    st.g0 is not None and pnorm + omega <= self.gtol * st.g0):
                return tightenings, False, pnorm
            if st.eps <= st.eps_floor or tightenings >= self.max_tighten:
                return tightenings, True, pnorm
            if not self._budget_left(st):
                return tightenings, False, pnorm
            cg_part = float(hg.bound.terms.get("cg", 0.0))  # tighten what takes > half of ω
            if omega - cg_part > 0.5 * target or not loss_ok:
                st.eps = max(st.eps * self.tau, st.eps_floor)
            if cg_part > 0.5 * target:
                st.delta *= self.tau
            tightenings += 1

    def _record(self, st: MAIDState, hg: Hypergradient, pnorm: float, tightenings: int) -> Dict[str, Any]:
        b = hg.bound
        return dict(upper_loss=hg.loss, grad_norm=hg.norm(), projected_grad_norm=pnorm,
                    tol=st.eps, eps=st.eps, delta=st.hg_delta, error_bound=hg.error_bound,
                    loss_allowance=b.loss, inner_iterations=st.inner_it, cg_iterations=st.cg_it,
                    step_size=None, accepted=True, step_accepted=None, backtracks=0,
                    line_search_coarse=None, line_search_cost=0, tightenings=tightenings,
                    inner_converged=st.inner_ok, cg_converged=st.cg_ok, mu=b.mu,
                    error_terms=dict(b.terms), theta=theta_floats(st.theta))

    def _stop(self, st: MAIDState, hg: Hypergradient, pnorm: float, floor_hit: bool,
              tightenings: int) -> bool:
        """The stopping tests at a record; sets ``st.message``/``st.success``; True to stop."""
        omega = float(hg.error_bound) if hg.error_bound is not None else math.nan
        cert = pnorm + omega
        if not _finite(hg.loss, pnorm, omega):
            st.message = (f"non-finite upper loss {hg.loss}, projected hypergradient norm {pnorm} "
                          f"or error bound {omega} at iteration {st.k}")
        elif cert == 0.0 or (st.g0 > 0 and cert <= self.gtol * st.g0):
            st.success = True
            st.message = (f"certified stationarity: ‖G(∇ℓ)‖ ≤ ‖G(z)‖ + ω = {cert:.3e} ≤ "
                          f"gtol·‖G(z₀)‖ = {self.gtol * st.g0:.3e}")
        elif floor_hit:
            self._floor_verdict(st, cert, f"the error bound could not be tightened further "
                                          f"({tightenings} tightenings)")
        elif not self._budget_left(st):
            st.message = (f"budget of {self.max_cost} lower-level + CG iterations exhausted "
                          f"(used {st.cost})")
        return st.message is not None

    def _floor_verdict(self, st: MAIDState, cert: float, why: str) -> None:
        st.success = cert == 0.0 or (st.g0 > 0 and cert <= self.floor_gtol * st.g0)
        verdict = ("certified stationarity at the accuracy floor" if st.success
                   else "no certified decrease at the accuracy floor")
        st.message = (f"{verdict} (eps = {st.eps:.2e}, delta = {st.delta:.2e}): {why}; "
                      f"‖G(∇ℓ)‖ ≤ {cert:.3e}, floor_gtol·‖G(z₀)‖ = {self.floor_gtol * st.g0:.3e}")
        if st.raised_floor is not None and self.eps_min is None:
            st.message += (f"; accuracy floor raised to {st.raised_floor:.1e} of R, where the "
                           f"inner solve stalls at round-off in {self._working_dtype(st)}")

    def _line_search(self, st: MAIDState, batch: Any, hg: Hypergradient, pnorm: float,
                     record: Dict[str, Any]) -> None:
        """Steps 2 and 3: inexact backtracking from ``θ_k`` along ``z_k``, then adapt."""
        z, omega, allowance = hg.theta_grad, float(hg.error_bound), hg.bound.loss
        lower = hg.loss - allowance - _roundoff(hg.loss)  # ≤ the true loss at θ_k
        b, accepted, coarse, backtracks, cost0 = st.beta, False, False, 0, st.cost
        spectral = None
        for _ in range(self.max_backtracks):
            trial = project(theta_axpy(-b, z, st.theta), self.bounds)
            move = theta_distance(trial, st.theta)
            if move == 0.0:
                break
            st.last_theta = trial
            sol_t = self._maid_solve(st, trial, batch, st.eps, st.sol.x, trial=True)
            if sol_t is None:  # the inner problem fails there: a shorter step
                backtracks += 1
                b *= self.rho
                continue
            try:
                hg_t = self._maid_evaluate(st, trial, batch, sol_t, False)
            except (NotStronglyConvexError, NonPositiveCurvatureError, FloatingPointError):
                backtracks += 1  # the trial left the region where the problem is well posed
                b *= self.rho
                continue
            loss_t, a_t = hg_t.loss, hg_t.bound.loss + _roundoff(hg_t.loss)
            if not _finite(loss_t, a_t, hg_t.norm()):  # overflow there: a shorter step
                backtracks += 1
                b *= self.rho
                continue
            if loss_t + a_t <= lower - self.c1 * move ** 2 / b:
                accepted = True
                if self.step_rule == "spectral":
                    spectral = spectral_step(theta_sub(trial, st.theta),
                                             theta_sub(hg_t.theta_grad, z), b, b * self.grow)
                st.theta, st.sol, st.x, st.sol_eps = trial, sol_t, sol_t.x, st.eps
                st.hg, st.hg_delta = hg_t, st.delta
                break
            backtracks += 1
            # no step along z decreases ℓ by more than (‖z_S‖ + ω)‖θ⁺ − θ_k‖ (S: the entries the
            # projected step moves; a bound holds the others); if the computed loss decreased
            # enough and only the allowances spoil the certificate, a shorter step cannot help,
            # a tighter ε can: end the line search as failed ("coarse")
            if allowance + a_t >= (_moved_norm(z, trial, st.theta) + omega) * move or (
                    _finite(loss_t) and loss_t <= hg.loss - self.c1 * move ** 2 / b):
                coarse = True
                break
            b *= self.rho
            if not self._budget_left(st):
                break
        record.update(step_size=b, step_accepted=accepted, backtracks=backtracks,
                      line_search_coarse=coarse, line_search_cost=st.cost - cost0)
        self._adapt(st, accepted, coarse, b, pnorm + omega, spectral)

    def _adapt(self, st: MAIDState, accepted: bool, coarse: bool, b: float, cert: float,
               spectral: Optional[float] = None) -> None:
        """Step 3: after success ``β ← grow·b`` (or the spectral length), ``ε, δ ← ν·(ε, δ)``;
        after a failure ``ε ← τε`` (and ``δ ← τδ``, ``β ← b`` when the search ran out of steps)."""
        if accepted:
            if self._step_params(st.hg.param_grads):  # φ moved: the cached values are stale
                st.hg = None
                st.sol_eps = st.eps
            st.beta = b * self.grow if spectral is None else spectral
            st.eps, st.delta = st.eps * self.nu, st.delta * self.nu
        elif st.eps <= st.eps_floor:
            self._floor_verdict(st, cert, "the loss allowances and round-off exceed the decrease "
                                          "a step can show")
            return
        else:
            st.eps = max(st.eps * self.tau, st.eps_floor)
            if not coarse:  # a line search that ran out of trial steps: maybe a poor direction,
                st.delta *= self.tau  # or a step far too long for the curvature met here:
                st.beta = b  # the next search goes on from the shortest step tried (× ρ)
        if not self._budget_left(st):
            st.message = (f"budget of {self.max_cost} lower-level + CG iterations exhausted "
                          f"(used {st.cost})")
