"""The outer-loop base shared by :class:`~bilevel.HOAG` and :class:`~bilevel.MAID`.

An outer loop minimises ``ℓ(θ) = ℓ(x̂(θ), θ)`` over θ. The base class does everything that is
not the algorithm itself: input validation (θ names, bounds, the inner objective's shape and
differentiability), projection onto the bounds, the progress bar, warn-once messages, the
History, the best iterate, steps of the outer loss' trainable parameters (``param_optimizer``),
atomic checkpoints and resume. A subclass supplies an explicit state dataclass and two hooks:

* ``_start(theta, batch, x0) -> state`` -- the state before the first iteration;
* ``_iterate(state, batch) -> record`` -- one outer iteration; it returns the History record
  (a dict) and sets ``state.message`` (and ``state.success``) when the run should stop.
"""
from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import distributed as dist_
from .history import History, Result, check_writable
from .linalg import NonPositiveCurvatureError, batch_norm
from .problem import (Bounds, HypergradientEstimator, InnerProblem, OuterLoss, Theta, check_theta,
                      project, theta_dot, theta_floats, validate_inner)
from .solvers import SolveResult, solve_inner

__all__ = ["LoopState", "OuterLoop", "batch_fingerprint", "implicit_estimator", "UNCONFIRMED"]

#: why a stop could not be claimed although the gradient test passed
UNCONFIRMED = ("cannot confirm stationarity: the inner solve or CG did not reach the confirmation "
               "accuracy (raise inner_max_iter / the estimator's max_iter)")


def accuracy_floor(dtype: torch.dtype) -> float:
    """The relative accuracy an inner solve and CG can reach in ``dtype``, the default floor
    ``ε_min`` of the outer loops: ``1e-10`` in float64, ``1e-5`` otherwise."""
    return 1e-10 if dtype == torch.float64 else 1e-5


#: how :meth:`OuterLoop._solve` begins the reason of an inner solve stopped by its iteration cap
INNER_CAP = "inner solve hit its iteration cap"
#: an inner solve that stalls within this factor of the dtype's floor is taken as round-off
ROUNDOFF_FACTOR = 100.0


#: the step-length rules of :class:`~bilevel.HOAG` and :class:`~bilevel.MAID`
STEP_RULES = ("spectral", "adaptive")


def spectral_step(s: Theta, y: Theta, alpha: float, fallback: float) -> float:
    """The Barzilai–Borwein step length ``⟨s, y⟩/⟨y, y⟩`` after a move ``s = θ⁺ − θ`` with
    gradient change ``y = g⁺ − g``, kept within ``[10⁻³α, 10³α]`` of the last length ``α``;
    ``fallback`` where ``⟨s, y⟩ ≤ 0`` (no positive curvature seen along ``s``) or not finite.
    Entries the move left unchanged (held by a bound) are left out of ``y``: their gradient
    says nothing about the curvature along ``s``, and would shorten every later step."""
    y = {k: torch.where(s[k] != 0, y[k], torch.zeros_like(y[k])) for k in y}
    sy, yy = theta_dot(s, y), theta_dot(y, y)
    if not (sy > 0 and math.isfinite(sy) and math.isfinite(yy) and yy > 0):
        return fallback
    return min(max(sy / yy, 1e-3 * alpha), 1e3 * alpha)


def implicit_estimator(estimator: Optional[HypergradientEstimator]) -> HypergradientEstimator:
    """``estimator``, or a new :class:`~bilevel.ImplicitCG` when ``None``; ``TypeError`` for
    anything that is not a :class:`~bilevel.HypergradientEstimator`."""
    from .hypergrad import ImplicitCG

    estimator = estimator if estimator is not None else ImplicitCG()
    if not isinstance(estimator, HypergradientEstimator):
        raise TypeError(f"estimator must be a HypergradientEstimator, got {type(estimator).__name__}")
    return estimator


@dataclass
class LoopState:
    """What every outer loop carries between iterations (checkpointed, except ``TRANSIENT``).

    ``theta``/``x``: the current accepted iterate and its inner solution; ``k`` iterations done;
    ``elapsed`` seconds; ``cost`` inner + CG iterations so far; ``best_*`` the accepted iterate
    with the lowest upper loss; ``last_theta`` the last point tried; ``raised_floor`` the
    automatic accuracy floor where the inner solve stalls at round-off
    (:meth:`OuterLoop._roundoff_floor`; ``None`` while the dtype's floor holds).
    """

    theta: Theta
    x: Optional[Tensor] = None
    k: int = 0
    elapsed: float = 0.0
    cost: int = 0
    success: bool = False
    message: Optional[str] = None
    best_theta: Optional[Theta] = None
    best_x: Optional[Tensor] = None
    best_loss: float = math.inf
    best_iteration: Optional[int] = None
    last_theta: Optional[Theta] = None
    warned: List[str] = field(default_factory=list)
    raised_floor: Optional[float] = None

    #: field names that are not written to checkpoints (recomputed after a resume)
    TRANSIENT: ClassVar[Tuple[str, ...]] = ()

    def to_dict(self) -> Dict[str, Any]:
        """The checkpointable fields (tensors, numbers, strings, lists, dicts only)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.TRANSIENT}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LoopState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def batch_fingerprint(batch: Any) -> str:
    """A short digest of the tensors in ``batch`` (shapes, dtypes, sums) to notice a resume on
    other data."""
    h = hashlib.sha1()

    def walk(obj):
        if isinstance(obj, Tensor):
            t = obj.detach()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            if t.numel() and (t.is_floating_point() or not t.is_complex()):
                td = t.double()
                h.update(f"{float(td.sum()):.12e}{float(td.abs().sum()):.12e}".encode())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(str(k).encode())
                walk(obj[k])
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        else:
            h.update(repr(obj).encode()[:200])

    walk(batch)
    return h.hexdigest()[:16]


def _bounds_dict(bounds: Optional[Bounds]) -> Dict[str, Dict[str, float]]:
    if bounds is None:
        return {"lower": {}, "upper": {}}
    return {"lower": {k: float(v) for k, v in bounds.lower.items()},
            "upper": {k: float(v) for k, v in bounds.upper.items()}}


class _GlobalSolve:
    """A :class:`SolveResult` seen through the ranks: its own ``x`` (this rank's shard) with the
    global ``max_iterations`` and ``all_converged``."""

    def __init__(self, sol: SolveResult, max_iterations: int, all_converged: bool):
        self._sol, self.max_iterations, self.all_converged = sol, max_iterations, all_converged

    def __getattr__(self, name: str):
        return getattr(self._sol, name)


class OuterLoop:
    """Base of the outer loops (see the module docstring). Not used directly."""

    name = "outer"
    State = LoopState
    #: the machine epsilon of the upper loss as last computed (:meth:`_upper_loss`)
    _loss_eps: float = 2.220446049250313e-16

    def __init__(self, inner: InnerProblem, outer: OuterLoss, estimator: HypergradientEstimator,
                 *, max_iter: int, bounds: Optional[Bounds], inner_method: str,
                 inner_max_iter: Optional[int], param_optimizer: Optional[torch.optim.Optimizer],
                 callback: Optional[Callable], progress: bool, checkpoint: Optional[str]):
        if not isinstance(inner, InnerProblem):
            raise TypeError(f"inner must be an InnerProblem, got {type(inner).__name__}")
        if not callable(outer):
            raise TypeError(f"outer must be callable (an OuterLoss), got {type(outer).__name__}")
        if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        if bounds is not None and not isinstance(bounds, Bounds):
            raise TypeError(f"bounds must be a bilevel.Bounds, got {type(bounds).__name__}")
        if inner_max_iter is not None and (not isinstance(inner_max_iter, int) or inner_max_iter < 1):
            raise ValueError(f"inner_max_iter must be a positive int or None, got {inner_max_iter!r}")
        if param_optimizer is not None and not isinstance(param_optimizer, torch.optim.Optimizer):
            raise TypeError(f"param_optimizer must be a torch.optim.Optimizer, got "
                            f"{type(param_optimizer).__name__}")
        if param_optimizer is not None:
            own = {id(p) for p in (outer.trainable_parameters().values()
                                   if hasattr(outer, "trainable_parameters") else ())}
            foreign = sum(1 for g in param_optimizer.param_groups for p in g["params"]
                          if id(p) not in own)
            if foreign:
                raise ValueError(f"param_optimizer holds {foreign} parameter(s) that are not among "
                                 f"outer.trainable_parameters() ({len(own)} there): they would "
                                 f"never get a gradient; build it over "
                                 f"outer.trainable_parameters().values()")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        if checkpoint is not None:
            check_writable(checkpoint, "checkpoint")
        self.inner, self.outer, self.estimator = inner, outer, estimator
        self.max_iter, self.bounds = max_iter, bounds
        self.inner_method, self.inner_max_iter = inner_method, inner_max_iter
        self.param_optimizer, self.callback = param_optimizer, callback
        self.progress, self.checkpoint = progress, checkpoint

    # ----- hooks ------------------------------------------------------------------------------
    def _start(self, theta: Theta, batch: Any, x0: Optional[Tensor]) -> LoopState:
        raise NotImplementedError

    def _iterate(self, st: LoopState, batch: Any) -> Dict[str, Any]:
        raise NotImplementedError

    # ----- the loop ---------------------------------------------------------------------------
    def run(self, theta0: Theta, batch: Any, x0: Optional[Tensor] = None,
            resume: Optional[Result] = None) -> Result:
        """Run from ``theta0`` on ``batch`` (``x0``: optional warm start of the inner solve).

        ``resume``: the :class:`~bilevel.Result` of an earlier, interrupted run of the same
        problem (``Result.load(checkpoint)``); the run continues where it stopped, up to
        ``max_iter`` iterations in all, with its state, History, the outer loss' trainable
        parameters and the optimizer's state.

        Data parallel: when a ``torch.distributed`` default group with more than one rank is
        initialised, ``batch`` is this rank's shard and the run is data parallel
        (:mod:`bilevel.distributed`: the loss is ``Σ_r w_r ℓ_r``, ``w_r = n_r/N`` unless
        ``outer.reduction == "sum"``); θ0 must be the same on every rank, the checkpoint is
        one file per rank (``<checkpoint>.rank<r>``) and resumes with the same world size, and
        ``Result.x`` holds this rank's shard of the inner solutions.
        """
        if not dist_.group_ready() or not isinstance(theta0, dict):  # (a non-dict: TypeError)
            return self._run(theta0, batch, x0, resume)
        with dist_.data_parallel():
            dist_.check_same(sorted(theta0), "theta0's names")
            dist_.check_same({k: torch.as_tensor(v).detach().cpu().double().reshape(-1).tolist()
                              for k, v in theta0.items()}, "theta0's values")
            theta = check_theta(theta0, self.inner.theta_names)
            n_local = (self.inner.init(theta, batch) if x0 is None else x0).shape[0]
            weight = dist_.shard_weight(n_local, getattr(self.outer, "reduction", "mean"))
            user_outer, self.outer = self.outer, dist_.ShardWeightedLoss(self.outer, weight)
            try:
                return self._run(theta0, batch, x0, resume)
            finally:
                self.outer = user_outer

    def _run(self, theta0: Theta, batch: Any, x0: Optional[Tensor],
             resume: Optional[Result]) -> Result:
        theta = self._check_start(theta0, batch, x0)
        if resume is not None:
            st = self._restore(resume, theta, batch)
            history = History(list(resume.history.records))
        else:
            self.estimator.reset()
            st = self._start(theta, batch, x0)
            history = History()
        bar = self._progress_bar(st.k)
        try:
            while st.message is None and st.k < self.max_iter:
                t0 = time.perf_counter()
                record = self._iterate(st, batch)
                seconds = time.perf_counter() - t0
                st.elapsed += seconds
                record = dict(iteration=st.k, **record, seconds=seconds, elapsed=st.elapsed,
                              cost=st.cost)
                history.append(**record)
                st.k += 1
                if bar is not None:
                    bar.set_postfix(loss=f"{record['upper_loss']:.4g}", tol=f"{record['tol']:.1e}")
                    bar.update(1)
                if st.message is None and self.callback is not None and self.callback(record, st.theta):
                    st.message = "stopped by callback"
                if self.checkpoint is not None:
                    self._result(st, history, batch).save(self._checkpoint_path())
        finally:
            if bar is not None:
                bar.close()
        if st.message is None:
            st.message = f"maximum number of outer iterations ({self.max_iter}) reached"
        result = self._result(st, history, batch)
        if self.checkpoint is not None:
            result.save(self._checkpoint_path())
        if not st.success and not st.message.startswith(("maximum number", "stopped by callback")):
            warnings.warn(f"{self.name} did not succeed: {st.message}", RuntimeWarning)
        return result

    # ----- pieces shared by the subclasses ----------------------------------------------------
    def _check_start(self, theta0: Theta, batch: Any, x0: Optional[Tensor]) -> Theta:
        theta = check_theta(theta0, self.inner.theta_names)
        if not theta:
            raise ValueError("theta0 is empty: give at least one named hyperparameter")
        if self.bounds is not None:
            self.bounds.check_names(theta)
        projected = project(theta, self.bounds)
        moved = [k for k in theta if not torch.equal(projected[k], theta[k].detach())]
        if moved:
            warnings.warn(f"theta0 lies outside the bounds in {moved}; starting from its "
                          f"projection {theta_floats({k: projected[k] for k in moved})}",
                          RuntimeWarning)
        theta = projected
        x = self.inner.init(theta, batch) if x0 is None else x0
        validate_inner(self.inner, theta, batch, x)
        return theta

    def _inner_reference(self, theta: Theta, batch: Any) -> float:
        """The scale ``R = max_b‖∇ₓΦ_b(x⁰; θ₀)‖`` of the relative inner accuracies (``max_b‖x⁰_b‖``
        when ``x⁰`` is already optimal, ``1`` when both vanish), over all ranks."""
        x_init = self.inner.init(theta, batch)
        ref = dist_.all_reduce(float(batch_norm(self.inner.grad(x_init, theta, batch)).max()), "max")
        if not (math.isfinite(ref) and ref > 0):
            ref = dist_.all_reduce(float(batch_norm(x_init).max()), "max") or 1.0
        return ref

    def _checkpoint_path(self) -> str:
        """``checkpoint``, or ``<checkpoint>.rank<r>`` in a data-parallel run (one per rank)."""
        if not dist_.is_active():
            return self.checkpoint
        return f"{self.checkpoint}.rank{dist_.rank()}"

    def _warn_once(self, st: LoopState, key: str, message: str) -> None:
        if key not in st.warned:
            st.warned.append(key)
            warnings.warn(f"{self.name} iteration {st.k}: {message}", RuntimeWarning)

    def _solve(self, st: LoopState, theta: Theta, batch: Any, tol: float, x_start: Optional[Tensor],
               max_iter: Optional[int] = None) -> Tuple[Optional[SolveResult], Optional[str]]:
        """Inner solve at ``theta``; returns ``(solution, None)`` or ``(solution or None, why it
        failed)``: non-positive curvature, a non-finite point or gradient, or the iteration cap."""
        cap = self.inner_max_iter if max_iter is None else max_iter
        sol, failure = None, self._convexity_failure(theta, batch)
        if failure is None:
            try:
                sol = solve_inner(self.inner, theta, batch, tol, x0=x_start,
                                  method=self.inner_method, max_iter=cap)
            except (NonPositiveCurvatureError, FloatingPointError) as exc:
                failure = f"inner solve failed: {exc}"
        if dist_.is_active():  # one verdict for all ranks (sol is then global in its counts)
            return self._solve_global(st, sol, failure, tol)
        if sol is None:
            return None, failure
        st.cost += sol.max_iterations
        if not (bool(torch.isfinite(sol.x).all()) and bool(torch.isfinite(sol.grad_norm).all())):
            return sol, "inner solve produced non-finite values"
        if not sol.all_converged:
            return sol, (f"{INNER_CAP} before tolerance {tol:.2e} "
                         f"(max ‖∇Φ‖ = {float(sol.grad_norm.max()):.2e})")
        return sol, None

    @staticmethod
    def _working_dtype(st: LoopState) -> torch.dtype:
        """The dtype the loop works in: the inner iterate's, or θ's before the first solve."""
        return st.x.dtype if st.x is not None else next(iter(st.theta.values())).dtype

    @staticmethod
    def _automatic_floor(st: LoopState, dtype: torch.dtype) -> float:
        """The floor used when no ``tol_min`` is given: :func:`accuracy_floor` of ``dtype``,
        or ``st.raised_floor`` where the inner solve stalled at round-off above it."""
        return max(accuracy_floor(dtype), st.raised_floor or 0.0)

    def _roundoff_floor(self, st: LoopState, sol: Optional[SolveResult], reason: Optional[str],
                        floor: float, ref: float) -> bool:
        """Raise the automatic accuracy floor where the inner solve stalls at round-off.

        When the solve stopped at its iteration cap (``reason`` starts with :data:`INNER_CAP`)
        with relative accuracy ``a = max_b‖∇ₓΦ_b‖/ref ≤ 100·accuracy_floor(dtype)`` and
        ``2a > floor`` (the floor in force), ``st.raised_floor = 2a``, a warning says so once,
        and ``True`` is returned. For the automatic floor only: a loop whose user gave a floor
        (``tol_min``, MAID's ``eps_min``) does not call it."""
        if sol is None:
            return False
        if not (reason or "").startswith(INNER_CAP):
            return False
        local = float(sol.grad_norm.max()) if sol.grad_norm.numel() else 0.0
        attained = dist_.all_reduce(local, "max") / ref
        base = accuracy_floor(sol.x.dtype)
        if not (math.isfinite(attained) and attained <= ROUNDOFF_FACTOR * base):
            return False
        new = 2.0 * attained
        if new <= floor:
            return False
        st.raised_floor = new
        self._warn_once(st, "roundoff", (
            f"the inner solve stalls in {sol.x.dtype} at relative accuracy {attained:.1e}, above "
            f"the floor {base:.0e}; the accuracy floor is raised to {new:.1e} (pass tol_min to "
            f"fix it)"))
        return True

    def _convexity_failure(self, theta: Theta, batch: Any) -> Optional[str]:
        """Why the inner problem has no unique minimiser at ``theta`` by its own account
        (``strong_convexity_constant`` given and not > 0: a singular or indefinite Hessian, where
        the implicit hypergradient does not exist), or ``None``."""
        mu = self.inner.strong_convexity_constant(theta, batch)
        if mu is None:
            return None
        mu = float(mu)
        if math.isfinite(mu) and mu > 0:
            return None
        return (f"the inner problem is not strongly convex at θ = {theta_floats(theta)} "
                f"({type(self.inner).__name__}.strong_convexity_constant = {mu!r})")

    def _solve_global(self, st: LoopState, sol: Optional[SolveResult], failure: Optional[str],
                      tol: float) -> Tuple[Optional[SolveResult], Optional[str]]:
        """``_solve``'s verdict agreed over the ranks (one all-reduce): any rank failing fails
        all; ``sol`` gets the global ``max_iterations``/``all_converged`` (as a shallow copy)."""
        if sol is None:
            local = [1.0, 0.0, 0.0, 0.0, 1.0]
        else:
            finite = bool(torch.isfinite(sol.x).all()) and bool(torch.isfinite(sol.grad_norm).all())
            gmax = float(sol.grad_norm.max()) if sol.grad_norm.numel() else 0.0
            local = [0.0, 0.0 if finite else 1.0, float(sol.max_iterations),
                     gmax if math.isfinite(gmax) else math.inf, 0.0 if sol.all_converged else 1.0]
        failed, nonfinite, its, gmax, unconverged = dist_.all_reduce_floats(local, "max")
        if failed:
            return None, failure or "inner solve failed on another rank"
        sol = _GlobalSolve(sol, int(its), unconverged == 0.0)
        st.cost += sol.max_iterations
        if nonfinite:
            return sol, "inner solve produced non-finite values"
        if not sol.all_converged:
            return sol, (f"{INNER_CAP} before tolerance {tol:.2e} "
                         f"(max ‖∇Φ‖ = {gmax:.2e})")
        return sol, None

    def _upper_loss(self, x: Tensor, theta: Theta, batch: Any) -> float:
        """``ℓ(x, θ)`` as a float (forward only)."""
        with torch.no_grad():
            loss = self.outer(x, theta, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"outer loss must return a scalar tensor, got {shape}")
        # the loss's own precision (a float32 task network on float64 images: float32)
        self._loss_eps = torch.finfo(loss.dtype).eps if loss.is_floating_point() else 2.2e-16
        return dist_.all_reduce(float(loss), "sum")

    def _corrected(self, x: Tensor, theta: Theta, batch: Any, loss: float,
                   q: Optional[Tensor]) -> tuple:
        """``(ℓ(x̃) − ⟨q, ∇ₓΦ(x̃; θ)⟩, |⟨q, ∇ₓΦ(x̃; θ)⟩|)``: the dual-weighted value of ``ℓ(x̂)``
        and the size of the correction (``(ℓ, 0)`` for estimators without an adjoint)."""
        if dist_.all_reduce(q is None or q.shape != x.shape, "max"):
            return loss, 0.0
        corr = dist_.all_reduce(float((q.double() * self.inner.grad(x, theta, batch).double()).sum()))
        return loss - corr, abs(corr)

    def _hypergradient(self, st: LoopState, theta: Theta, x: Tensor, batch: Any, eps: float):
        hg = self.estimator(self.inner, self.outer, theta, batch, x, eps, relative=True)
        st.cost += hg.cg_iterations + hg.extra_inner_steps
        if not hg.cg_converged:
            self._warn_once(st, "cg", f"CG hit its iteration cap before tolerance {eps:.2e} "
                                      f"(relative); flagged in History as cg_converged=False")
        return hg

    def _trial_hypergradient(self, st: LoopState, theta: Theta, x: Tensor, batch: Any, eps: float):
        """The hypergradient at a trial point, or ``(None, reason)`` where the inner Hessian is
        not positive definite there (the trial left the region where the problem is well posed)."""
        try:
            return self._hypergradient(st, theta, x, batch, eps), None
        except (NonPositiveCurvatureError, FloatingPointError) as exc:
            return None, f"inner problem ill-posed at the trial ({str(exc)[:80]})"

    def _note_accepted(self, st: LoopState, loss: float) -> None:
        """Keep ``st.theta`` as the best iterate when its upper loss is the lowest so far."""
        if math.isfinite(loss) and loss < st.best_loss:
            st.best_loss, st.best_iteration = loss, st.k
            st.best_theta = {n: v.detach().clone() for n, v in st.theta.items()}
            st.best_x = st.x

    def _step_params(self, grads: Dict[str, Tensor]) -> bool:
        """One ``param_optimizer`` step of the outer loss' trainable parameters with ``∇_φℓ``."""
        if self.param_optimizer is None or not grads:
            return False
        params = self.outer.trainable_parameters()
        for name, g in grads.items():
            params[name].grad = g.detach().clone()
        self.param_optimizer.step()
        self.param_optimizer.zero_grad(set_to_none=True)
        return True

    def _progress_bar(self, start: int):
        if not self.progress or dist_.rank() != 0:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.max_iter, initial=start, desc=self.name, unit="it")

    def _trainable(self) -> Dict[str, Tensor]:
        get = getattr(self.outer, "trainable_parameters", None)
        return dict(get()) if get is not None else {}

    # ----- checkpoint / resume ----------------------------------------------------------------
    def _result(self, st: LoopState, history: History, batch: Any) -> Result:
        state = {"method": self.name, "loop": st.to_dict(),
                 "estimator": self.estimator.warm_state(),
                 "optimizer": None if self.param_optimizer is None else self.param_optimizer.state_dict(),
                 "fingerprint": batch_fingerprint(batch), "theta_names": sorted(st.theta),
                 "world_size": dist_.world_size() if dist_.is_active() else 1,
                 "bounds": _bounds_dict(self.bounds)}
        clone = lambda d: None if d is None else {n: v.detach().clone() for n, v in d.items()}  # noqa: E731
        return Result(theta=clone(st.theta), x=st.x, history=history, success=st.success,
                      message=st.message or "", n_iter=len(history),
                      params={n: p.detach().clone() for n, p in self._trainable().items()},
                      state=state, best_theta=clone(st.best_theta), best_x=st.best_x,
                      best_loss=st.best_loss, best_iteration=st.best_iteration,
                      last_theta=clone(st.last_theta))

    def _restore(self, resume: Result, theta: Theta, batch: Any) -> LoopState:
        saved = resume.state if isinstance(resume, Result) else None
        if not saved or saved.get("method") != self.name:
            found = saved.get("method") if saved else None
            raise ValueError(f"resume must be the Result of a {self.name} run, got one of {found!r}")
        world = dist_.world_size() if dist_.is_active() else 1
        if saved.get("world_size", 1) != world:
            raise ValueError(f"resume: the checkpoint was written by a data-parallel run with world "
                             f"size {saved.get('world_size', 1)}, this run has {world}; resume "
                             f"with {saved.get('world_size', 1)} processes (the inner solutions "
                             f"and CG warm starts are per-rank shards)")
        if saved["theta_names"] != sorted(theta):
            raise ValueError(f"resume: the checkpoint's theta names {saved['theta_names']} differ "
                             f"from theta0's {sorted(theta)}")
        if saved["bounds"] != _bounds_dict(self.bounds):
            raise ValueError(f"resume: the checkpoint was made with bounds {saved['bounds']}, this "
                             f"run has {_bounds_dict(self.bounds)}")
        if saved["fingerprint"] != batch_fingerprint(batch):
            warnings.warn("resume: the batch differs from the checkpointed one (fingerprint "
                          "mismatch); continuing on the new batch", RuntimeWarning)
        self._restore_params(resume, saved)
        self.estimator.load_warm_state(saved.get("estimator") or {})
        st = self.State.from_dict(saved["loop"])
        st.message, st.success = None, False
        return st

    def _restore_params(self, resume: Result, saved: Dict[str, Any]) -> None:
        params = self._trainable()
        if sorted(params) != sorted(resume.params):
            raise ValueError(f"resume: the outer loss' trainable parameters {sorted(params)} differ "
                             f"from the checkpoint's {sorted(resume.params)}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(resume.params[n])
        opt_state = saved.get("optimizer")
        if self.param_optimizer is not None and opt_state is not None:
            self.param_optimizer.load_state_dict(opt_state)
        elif self.param_optimizer is not None and params:
            warnings.warn("resume: the checkpoint has no optimizer state; param_optimizer starts "
                          "fresh", RuntimeWarning)
