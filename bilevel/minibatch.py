"""Minibatch bilevel learning over a whole data set, with per-sample warm starts.

The problem is ``min_θ ℓ(θ) = (1/N) Σ_i ℓ_i(x̂_i(θ), θ)`` over a data set of ``N`` samples, too
many for one batch. Every step takes a minibatch ``S`` (``batch_size`` samples, a fixed seeded
order per epoch), and

1. solves its inner problems from the cached ``x_i`` of the last visit (else the problem's
   initial point) to ``max_{i∈S}‖∇ₓΦ_i‖ ≤ ε_e·R`` (``R = max_i ‖∇ₓΦ_i(x⁰_i; θ₀)‖`` over the first
   minibatch);
2. computes the minibatch hypergradient ``g_S = ∇_θℓ_S − (∇²_{xθ}Φ)ᵀq`` by the estimator
   (:class:`~bilevel.ImplicitCG`, relative CG tolerance ``ε_e`` as in HOAG), CG warm-started
   from the cached adjoints ``q_i`` (given as the estimator's warm state);
3. stores ``x_i, q_i`` in a bounded LRU :class:`~bilevel.warmcache.WarmStartCache` and takes
   an outer step (:mod:`bilevel.stochastic`: Adam with a cosine schedule by default, SGD, or the
   variance-reduced SAG with per-coordinate RMS scaling), projected onto the bounds.

The relative accuracy tightens per epoch, ``ε_e = max(tol0·tol_rate^e, tol_min)`` (the
increasing-accuracy rule of inexact stochastic methods). After every epoch the loss on the
validation set (inner problems solved to ``check_tol·R``) is recorded, and the epoch-end θ with
the lowest validation loss is kept (``Result.best_theta``).

**No false success.** ``success=True`` only after a *full-data check*: the hypergradient over
the whole training set, streamed at the tight accuracy ``check_tol``, has a projected norm
``‖θ − Π(θ − g)‖ ≤ gtol·G₀`` (``G₀`` the largest projected minibatch hypergradient norm of the
first epoch: the gradient's scale along the start of the path), with every inner
solve and CG converged. It runs every ``check_every`` epochs (``0``: after the last epoch only)
and its cost counts. Ended by the epoch budget without passing it: ``success=False`` and a
message with the numbers. Three failed steps in a row (non-positive curvature, non-finite values)
end the run with ``success=False``; a single one is skipped and flagged.

**Data.** ``train``/``val`` are a ``torch.utils.data.Dataset`` of dict samples with an integer
``"index"`` (see :class:`~bilevel.warmcache.IndexedDataset`), a ``DataLoader`` over one (its data
set, ``batch_size``, ``collate_fn`` and ``num_workers`` are used), or a dict of tensors (wrapped
in an ``IndexedDataset``). The order is the loop's own: ``DistributedSampler(seed=seed)`` with
``set_epoch(e)`` (``"sag"`` keeps epoch 0's order: fixed minibatches). Batch tensors are moved
to θ's device.

**Data parallel** (``torchrun``, a default process group with more than one rank): every rank
takes ``batch_size/world`` samples of each minibatch from the same ``DistributedSampler``
permutation, so the global minibatches are those of one process; losses are shard-weighted and
the hypergradient all-reduced (:mod:`bilevel.distributed`). Each rank caches the warm starts of
its own samples: with a fixed order (``shuffle=False``, or ``"sag"``) every sample stays on its
rank and the θ trajectory equals the one-process run (up to round-off of the sums) when ``N`` is
a multiple of the world size (else the sampler pads); reshuffled, a sample that moves to another
rank restarts from its initial point there, and the runs agree to the inner accuracy only.

**Checkpoint / resume** (``checkpoint=path``, every ``checkpoint_every`` steps and after every
epoch; ``<path>.rank<r>`` per rank): θ, the optimiser (and schedule) state, the epoch and the
position in it, the warm-start caches, the torch RNG state and the History. ``run(...,
resume=Result.load(path))`` continues bit-exactly: the order is a function of ``(seed, epoch)``,
the skipped samples are not loaded.

**Cost** (History ``cost``/``work``): ``cost`` adds, per step, the inner iterations (max over the
minibatch) and CG iterations, as the one-batch loops count; ``work`` multiplies each by the
number of samples of the batch it ran on (the batched solvers iterate the whole batch), a
measure of compute that compares minibatch and full-batch runs.
"""
from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Sampler, default_collate

from . import distributed as dist_
from .history import History, Result, check_writable
from .hypergrad import ImplicitCG
from .linalg import NonPositiveCurvatureError, batch_norm
from .problem import (Bounds, HypergradientEstimator, InnerProblem, OuterLoss, Theta, check_theta,
                      check_tolerance, gradient_mapping_norm, project, theta_floats, theta_norm,
                      validate_inner)
from .solvers import solve_inner
from .stochastic import OPTIMIZERS, SCHEDULES, make_optimizer
from .warmcache import INDEX_KEY, IndexedDataset, WarmStartCache, batch_indices

__all__ = ["MinibatchBilevel", "MinibatchState", "IndexedDataset", "WarmStartCache"]


@dataclass
class MinibatchState:
    """The loop's state (checkpointed): θ, ``epoch`` and ``step`` (steps done in it), ``k``
    steps in all, ``cost``/``work`` (module docstring), ``inner_ref`` ``R``, ``g_ref`` ``G₀``,
    the running sums of the epoch's minibatch losses, consecutive ``failures``, per-epoch
    records ``epochs`` and the best epoch-end θ."""

    theta: Theta
    epoch: int = 0
    step: int = 0
    k: int = 0
    cost: int = 0
    work: int = 0
    elapsed: float = 0.0
    inner_ref: Optional[float] = None
    g_ref: Optional[float] = None
    loss_sum: float = 0.0
    loss_n: int = 0
    failures: int = 0
    epochs: List[Dict[str, Any]] = field(default_factory=list)
    best_theta: Optional[Theta] = None
    best_loss: float = math.inf
    best_iteration: Optional[int] = None
    success: bool = False
    message: Optional[str] = None
    warned: List[str] = field(default_factory=list)


class _Skip(Sampler):
    """``sampler``'s order from position ``start`` on (a resumed epoch loads no skipped sample)."""

    def __init__(self, sampler: Sampler, start: int):
        self.sampler, self.start = sampler, start

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.start, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)


def _bounds_dict(bounds: Optional[Bounds]) -> Dict[str, Dict[str, float]]:
    if bounds is None:
        return {"lower": {}, "upper": {}}
    return {"lower": {k: float(v) for k, v in bounds.lower.items()},
            "upper": {k: float(v) for k, v in bounds.upper.items()}}


def _positive_int(name: str, v: Any, allow_zero: bool = False) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int, "
                         f"got {v!r}")
    return v


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


class MinibatchBilevel:
    """Minibatch bilevel learning over a data set (see the module docstring for the rules).

    Parameters
    ----------
    inner, outer: the lower-level problem and the upper loss (a mean over its batch).
    estimator: hypergradient estimator (default :class:`~bilevel.ImplicitCG`), called with a
        relative CG tolerance and warm-started through ``load_warm_state({"q": q0})``.
    optimizer: ``"adam"`` (default), ``"sgd"`` or ``"sag"`` (:mod:`bilevel.stochastic`).
    lr: learning rate (Adam and SAG: the largest move of a coordinate per step).
    schedule, lr_min: ``"cosine"`` (default; floored at ``lr_min·lr``), ``"constant"`` or
        ``"step"`` (Adam and SGD).
    optimizer_options: extra keyword arguments of ``torch.optim.Adam`` / ``SGD``.
    epochs, batch_size, seed, shuffle: passes over the data, samples per minibatch (over all
        ranks), seed of the order, reshuffle every epoch.
    tol0, tol_rate, tol_min: the relative accuracy ``ε_e`` per epoch (``tol_min`` ``None``:
        ``1e-8`` in float64, ``1e-4`` otherwise); ``check_tol`` that of validation and the
        full-data check (``None``: ``10⁻³·gtol``, at least ``tol_min``).
    gtol, check_every: the full-data check (module docstring).
    bounds, inner_method, inner_max_iter: as in :class:`~bilevel.HOAG`.
    cache_bytes, cache_items, cache_device: bounds and device of each warm-start cache
        (training set and validation set: one each).
    callback: ``callback(record, theta)`` after every step; returning ``True`` stops.
    progress: tqdm progress bar (rank 0).
    checkpoint, checkpoint_every: checkpoint path and period in steps.

    Examples
    --------
    >>> from bilevel import MinibatchBilevel                             # doctest: +SKIP
    >>> from recon.data import denoising_batch
    >>> train = denoising_batch(n=256, size=32, sigma=0.1, dtype=torch.float64)   # dict of tensors
    >>> val = denoising_batch(n=32, size=32, sigma=0.1, seed=7, dtype=torch.float64)
    >>> loop = MinibatchBilevel(TVDenoising(), MSEToTarget(), batch_size=32, epochs=3)
    >>> res = loop.run(theta0, train, val=val)
    >>> res.best_theta, res.success, res.message
    """

    name = "MinibatchBilevel"

    def __init__(self, inner: InnerProblem, outer: OuterLoss,
                 estimator: Optional[HypergradientEstimator] = None, *, optimizer: str = "adam",
                 lr: float = 0.05, schedule: str = "cosine", lr_min: float = 0.0,
                 optimizer_options: Optional[Mapping[str, Any]] = None, epochs: int = 5,
                 batch_size: Optional[int] = 32, seed: int = 0, shuffle: bool = True,
                 tol0: float = 1e-2, tol_rate: float = 0.3, tol_min: Optional[float] = None,
                 check_tol: Optional[float] = None, gtol: float = 1e-3, check_every: int = 0,
                 bounds: Optional[Bounds] = None, inner_method: str = "newton-cg",
                 inner_max_iter: Optional[int] = None, cache_bytes: Optional[int] = 2 ** 30,
                 cache_items: Optional[int] = None, cache_device: Any = "cpu",
                 callback: Optional[Callable] = None, progress: bool = False,
                 checkpoint: Optional[str] = None, checkpoint_every: int = 10):
        if not isinstance(inner, InnerProblem):
            raise TypeError(f"inner must be an InnerProblem, got {type(inner).__name__}")
        if not callable(outer):
            raise TypeError(f"outer must be callable (an OuterLoss), got {type(outer).__name__}")
        estimator = estimator if estimator is not None else ImplicitCG()
        if not isinstance(estimator, HypergradientEstimator):
            raise TypeError(f"estimator must be a HypergradientEstimator, got {type(estimator).__name__}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if bounds is not None and not isinstance(bounds, Bounds):
            raise TypeError(f"bounds must be a bilevel.Bounds, got {type(bounds).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        if checkpoint is not None:
            check_writable(checkpoint, "checkpoint")
        self.inner, self.outer, self.estimator = inner, outer, estimator
        self.optimizer, self.schedule = optimizer, schedule
        self.lr, self.lr_min = check_tolerance("lr", lr), check_tolerance("lr_min", lr_min, True)
        self.optimizer_options = dict(optimizer_options or {})
        self.epochs = _positive_int("epochs", epochs)
        self.batch_size = None if batch_size is None else _positive_int("batch_size", batch_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.tol0, self.tol_rate = check_tolerance("tol0", tol0), check_tolerance("tol_rate", tol_rate)
        if not (self.tol0 < 1 and self.tol_rate <= 1):
            raise ValueError(f"need 0 < tol0 < 1 and 0 < tol_rate ≤ 1 (relative accuracies), got "
                             f"tol0={tol0!r}, tol_rate={tol_rate!r}")
        self.tol_min = None if tol_min is None else check_tolerance("tol_min", tol_min)
        self.check_tol = None if check_tol is None else check_tolerance("check_tol", check_tol)
        for name, v in (("tol_min", self.tol_min), ("check_tol", self.check_tol)):
            if v is not None and not v < 1:
                raise ValueError(f"{name} must lie in (0, 1) (a relative accuracy), got {v!r}")
        self.gtol = check_tolerance("gtol", gtol, allow_zero=True)
        self.check_every = _positive_int("check_every", check_every, allow_zero=True)
        self.bounds, self.inner_method, self.inner_max_iter = bounds, inner_method, inner_max_iter
        self.cache_args = dict(max_bytes=cache_bytes, max_items=cache_items, device=cache_device)
        WarmStartCache(**self.cache_args)  # validates the bounds now
        self.callback, self.progress = callback, progress
        self.checkpoint = checkpoint
        self.checkpoint_every = _positive_int("checkpoint_every", checkpoint_every)

    # ----- public entry -----------------------------------------------------------------------
    def run(self, theta0: Theta, train: Any, val: Any = None,
            resume: Optional[Result] = None) -> Result:
        """Learn θ from ``theta0`` over the data set ``train`` (validated on ``val`` after every
        epoch); ``resume`` the :class:`~bilevel.Result` of an interrupted run
        (``Result.load(checkpoint)``). ``Result.theta`` is the last θ, ``best_theta`` the best
        epoch-end θ by validation loss (by the epoch's mean minibatch loss without ``val``),
        ``x`` is ``None`` (the solutions of a whole data set are not kept) and
        ``state["epochs"]`` holds the per-epoch records."""
        with dist_.data_parallel():
            if dist_.is_active() and isinstance(theta0, Mapping):
                dist_.check_same(sorted(theta0), "theta0's names")
                dist_.check_same({k: torch.as_tensor(v).detach().cpu().double().reshape(-1).tolist()
                                  for k, v in theta0.items()}, "theta0's values")
            return self._run(theta0, train, val, resume)

    def _run(self, theta0, train, val, resume) -> Result:
        ctx = self._context(theta0, train, val)
        if resume is not None:
            st, history = self._restore(resume, ctx), History(list(resume.history.records))
        else:
            st, history = MinibatchState(theta=ctx.theta0), History()
        ctx.opt = self._optimizer(st.theta, ctx)
        if resume is not None:
            ctx.opt.load_state_dict(resume.state["optimizer"])
        bar = self._progress_bar(st.k, ctx)
        try:
            while st.message is None and st.epoch < self.epochs:
                self._train_epoch(st, ctx, history, bar)
                if st.message is None:
                    self._end_epoch(st, ctx, history)
        finally:
            if bar is not None:
                bar.close()
        if st.message is None:
            st.message = self._budget_message(st)
        result = self._result(st, history, ctx)
        if self.checkpoint is not None:
            result.save(self._checkpoint_path())
        if not st.success and not st.message.startswith(("maximum number", "stopped by callback")):
            warnings.warn(f"{self.name} did not succeed: {st.message}", RuntimeWarning)
        return result

    # ----- set-up -----------------------------------------------------------------------------
    def _dataset(self, data: Any, name: str):
        if isinstance(data, DataLoader):
            if data.batch_size is None:
                raise ValueError(f"{name}: a DataLoader with batch_size=None (a batch sampler) is "
                                 f"not supported; give the Dataset and batch_size")
            ds, collate, workers, bs = data.dataset, data.collate_fn, data.num_workers, data.batch_size
        elif isinstance(data, Mapping):
            ds, collate, workers, bs = IndexedDataset(data), default_collate, 0, None
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            ds, collate, workers, bs = data, default_collate, 0, None
        else:
            raise TypeError(f"{name} must be a torch Dataset of dict samples, a DataLoader or a "
                            f"dict of tensors, got {type(data).__name__}")
        if len(ds) == 0:
            raise ValueError(f"{name} is empty (len 0)")
        first = ds[0]
        if not isinstance(first, Mapping) or INDEX_KEY not in first:
            keys = sorted(first) if isinstance(first, Mapping) else type(first).__name__
            raise ValueError(f"{name}[0] must be a dict sample with an integer {INDEX_KEY!r} "
                             f"(wrap the data set in bilevel.minibatch.IndexedDataset); got {keys}")
        return SimpleNamespace(ds=ds, collate=collate, workers=workers, batch_size=bs)

    def _context(self, theta0: Theta, train: Any, val: Any) -> SimpleNamespace:
        theta = check_theta(theta0, self.inner.theta_names)
        if not theta:
            raise ValueError("theta0 is empty: give at least one named hyperparameter")
        if self.bounds is not None:
            self.bounds.check_names(theta)
        theta = project(theta, self.bounds)
        tr = self._dataset(train, "train")
        va = None if val is None else self._dataset(val, "val")
        bs = self.batch_size or tr.batch_size or 32
        world = dist_.world_size() if dist_.is_active() else 1
        if bs % world:
            raise ValueError(f"batch_size {bs} is not a multiple of the world size {world}: every "
                             f"rank takes batch_size/world samples of each minibatch")
        device = next(iter(theta.values())).device
        ctx = SimpleNamespace(theta0=theta, train=tr, val=va, local_bs=bs // world, world=world,
                              device=device, cache=WarmStartCache(**self.cache_args),
                              val_cache=WarmStartCache(**self.cache_args), opt=None)
        ctx.n_batches = len(self._loader(ctx, tr, 0, 0, False))
        probe = _to(tr.collate([tr.ds[0]]), device)
        batch_indices(probe)
        validate_inner(self.inner, theta, probe, self.inner.init(theta, probe))
        return ctx

    def _optimizer(self, theta: Theta, ctx):
        return make_optimizer(self.optimizer, theta, lr=self.lr, schedule=self.schedule,
                              total_steps=self.epochs * ctx.n_batches, lr_min=self.lr_min,
                              n_batches=ctx.n_batches, bounds=self.bounds,
                              options=self.optimizer_options)

    def _loader(self, ctx, data, epoch: int, start_step: int, shuffle: bool) -> DataLoader:
        rank = dist_.rank() if ctx.world > 1 else 0
        sampler = DistributedSampler(data.ds, num_replicas=ctx.world, rank=rank, shuffle=shuffle,
                                     seed=self.seed, drop_last=False)
        sampler.set_epoch(epoch)
        if start_step:
            sampler = _Skip(sampler, start_step * ctx.local_bs)
        return DataLoader(data.ds, batch_size=ctx.local_bs, sampler=sampler,
                          collate_fn=data.collate, num_workers=data.workers)

    def _progress_bar(self, start: int, ctx):
        if not self.progress or dist_.rank() != 0:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.epochs * ctx.n_batches, initial=start, desc=self.name, unit="step")

    # ----- accuracies -------------------------------------------------------------------------
    def _floor(self, dtype: torch.dtype) -> float:
        return self.tol_min if self.tol_min is not None else (1e-8 if dtype == torch.float64 else 1e-4)

    def _eps(self, epoch: int, dtype: torch.dtype) -> float:
        return max(self.tol0 * self.tol_rate ** epoch, self._floor(dtype))

    def _check_eps(self, dtype: torch.dtype) -> float:
        """``check_tol``, or ``10⁻³·gtol`` (an error well below the threshold it must support),
        floored at ``tol_min``."""
        if self.check_tol is not None:
            return self.check_tol
        return max(1e-3 * self.gtol, self._floor(dtype)) if self.gtol > 0 else self._floor(dtype)

    # ----- one minibatch ----------------------------------------------------------------------
    def _weighted(self, n_local: int, n_global: int):
        """The upper loss of this rank's shard of a minibatch, weighted ``n_r/N_S``."""
        if not dist_.is_active():
            return self.outer
        w = 1.0 if getattr(self.outer, "reduction", "mean") == "sum" else n_local / n_global
        return dist_.ShardWeightedLoss(self.outer, w)

    def _solve(self, theta: Theta, batch: Any, tol: float, x0: Tensor):
        """Inner solve with one verdict for all ranks: ``(sol, iterations, converged, failure)``."""
        try:
            sol = solve_inner(self.inner, theta, batch, tol, x0=x0, method=self.inner_method,
                              max_iter=self.inner_max_iter)
            failure = None
        except (NonPositiveCurvatureError, FloatingPointError) as exc:
            sol, failure = None, f"inner solve failed: {exc}"
        if sol is None:
            local = [1.0, 0.0, 0.0, 1.0]
        else:
            finite = bool(torch.isfinite(sol.x).all())
            local = [0.0, 0.0 if finite else 1.0, float(sol.max_iterations),
                     0.0 if sol.all_converged else 1.0]
        failed, nonfinite, its, unconverged = dist_.all_reduce_floats(local, "max")
        if failed or nonfinite:
            return None, int(its), False, failure or ("inner solve produced non-finite values"
                                                      if nonfinite else "inner solve failed on another rank")
        return sol, int(its), unconverged == 0.0, None

    def _hypergradient(self, theta, batch, x, eps, idx, cache, outer):
        q0, _ = cache.gather(idx, torch.zeros_like(x), which=1)
        self.estimator.load_warm_state({"q": q0})
        try:
            hg = self.estimator(self.inner, outer, theta, batch, x, eps, relative=True)
        except (NonPositiveCurvatureError, FloatingPointError) as exc:
            return None, f"hypergradient failed: {str(exc)[:120]}"
        gn = theta_norm(hg.theta_grad)
        if not (math.isfinite(gn) and math.isfinite(hg.loss)):
            return None, f"non-finite hypergradient (norm {gn}) or upper loss {hg.loss}"
        return hg, None

    def _evaluate(self, st: MinibatchState, ctx, batch: Any, eps: float, cache: WarmStartCache,
                  weight: float = 1.0) -> Dict[str, Any]:
        """Solve + hypergradient on one minibatch at ``st.theta``; updates the cache and the
        cost. Returns a dict with ``hg`` (``None`` on failure), ``reason`` and the counts."""
        batch = _to(batch, ctx.device)
        idx = batch_indices(batch)
        n = int(dist_.all_reduce(float(len(idx)), "sum"))
        theta = st.theta
        x_init = self.inner.init(theta, batch)
        if st.inner_ref is None:
            ref = float(batch_norm(self.inner.grad(x_init, theta, batch)).max())
            ref = dist_.all_reduce(ref, "max")
            st.inner_ref = ref if math.isfinite(ref) and ref > 0 else 1.0
        x0, hits = cache.gather(idx, x_init, which=0)
        out = dict(hg=None, n=n, cache_hits=int(dist_.all_reduce(float(hits), "sum")),
                   inner_iterations=0, cg_iterations=0, inner_converged=False, cg_converged=False,
                   inner_tol=eps * st.inner_ref, reason=None)
        sol, its, ok, why = self._solve(theta, batch, eps * st.inner_ref, x0)
        out.update(inner_iterations=its, inner_converged=ok)
        st.cost, st.work = st.cost + its, st.work + its * n
        if sol is None:
            out["reason"] = why
            return out
        hg, why = self._hypergradient(theta, batch, sol.x, eps, idx, cache, self._weighted(len(idx), n))
        if hg is not None:
            st.cost, st.work = st.cost + hg.cg_iterations, st.work + hg.cg_iterations * n
            out.update(cg_iterations=hg.cg_iterations, cg_converged=hg.cg_converged)
            cache.put(idx, sol.x, hg.adjoint)
        out.update(hg=hg, reason=why)
        return out

    def _step(self, st: MinibatchState, ctx, batch: Any) -> Dict[str, Any]:
        dtype = next(iter(st.theta.values())).dtype
        eps = self._eps(st.epoch, dtype)
        theta = st.theta
        ev = self._evaluate(st, ctx, batch, eps, ctx.cache)
        hg = ev.pop("hg")
        rec = dict(upper_loss=math.nan, grad_norm=math.nan, tol=eps, **ev,
                   step_size=ctx.opt.step_size, accepted=False, theta=theta_floats(theta))
        rec["batch_size"] = rec.pop("n")
        if hg is None:
            return self._failed(st, rec, rec["reason"])
        gnorm = self._mapping_norm(theta, hg.theta_grad)
        if st.epoch == 0:  # G₀: the largest projected minibatch hypergradient of the first epoch
            st.g_ref = gnorm if st.g_ref is None else max(st.g_ref, gnorm)
        new = ctx.opt.step(theta, hg.theta_grad, st.step)
        if not all(bool(torch.isfinite(v).all()) for v in new.values()):
            return self._failed(st, rec, "the outer step made θ non-finite")
        st.theta, st.failures = new, 0
        st.loss_sum, st.loss_n = st.loss_sum + hg.loss * rec["batch_size"], st.loss_n + rec["batch_size"]
        for flag, what in (("inner_converged", "inner solve"), ("cg_converged", "CG")):
            if not rec[flag]:
                self._warn_once(st, flag, f"{what} hit its iteration cap; flagged in History as {flag}=False")
        rec.update(upper_loss=hg.loss, grad_norm=gnorm, accepted=True)
        return rec

    def _failed(self, st: MinibatchState, rec: Dict[str, Any], why: str) -> Dict[str, Any]:
        st.failures += 1
        self._warn_once(st, "failed-step", f"a minibatch step failed and was skipped: {why}")
        if st.failures >= 3:
            st.message = f"{st.failures} consecutive minibatch steps failed; last: {why}"
        return rec

    def _warn_once(self, st: MinibatchState, key: str, message: str) -> None:
        if key not in st.warned:
            st.warned.append(key)
            warnings.warn(f"{self.name} step {st.k}: {message}", RuntimeWarning)

    def _mapping_norm(self, theta: Theta, grad: Theta) -> float:
        """``‖θ − Π(θ − g)‖`` (``‖g‖`` without bounds)."""
        return gradient_mapping_norm(theta, grad, self.bounds)

    # ----- epochs -----------------------------------------------------------------------------
    def _train_epoch(self, st: MinibatchState, ctx, history: History, bar) -> None:
        order_epoch = 0 if self.optimizer == "sag" else st.epoch
        loader = self._loader(ctx, ctx.train, order_epoch, st.step, self.shuffle)
        for batch in loader:
            t0 = time.perf_counter()
            rec = self._step(st, ctx, batch)
            seconds = time.perf_counter() - t0
            st.elapsed += seconds
            rec = dict(iteration=st.k, epoch=st.epoch, step=st.step, **rec, seconds=seconds,
                       elapsed=st.elapsed, cost=st.cost, work=st.work)
            history.append(**rec)
            st.k, st.step = st.k + 1, st.step + 1
            if bar is not None:
                bar.set_postfix(epoch=st.epoch, loss=f"{rec['upper_loss']:.4g}")
                bar.update(1)
            if st.message is None and self.callback is not None and self.callback(rec, st.theta):
                st.message = "stopped by callback"
            if self.checkpoint is not None and (st.k % self.checkpoint_every == 0 or st.message):
                self._result(st, history, ctx).save(self._checkpoint_path())
            if st.message is not None:
                return

    def _end_epoch(self, st: MinibatchState, ctx, history: History) -> None:
        t0 = time.perf_counter()
        train_loss = st.loss_sum / st.loss_n if st.loss_n else math.nan
        ep = dict(epoch=st.epoch, train_loss=train_loss, steps=st.step, theta=theta_floats(st.theta))
        score = train_loss
        if ctx.val is not None:
            ep.update(self._validate(st, ctx))
            score = ep["val_loss"]
        if math.isfinite(score) and score < st.best_loss:
            st.best_loss, st.best_iteration = score, st.k
            st.best_theta = {n: v.detach().clone() for n, v in st.theta.items()}
        ctx.opt.end_epoch(st.theta, train_loss)
        last = st.epoch + 1 == self.epochs
        if last or (self.check_every and (st.epoch + 1) % self.check_every == 0):
            ep.update(self._full_check(st, ctx))
            if ep["check_passed"]:
                st.success = True
                st.message = (f"converged: full-data check after epoch {st.epoch}: projected "
                              f"hypergradient norm {ep['check_grad_norm']:.3e} ≤ gtol·G₀ = "
                              f"{self.gtol * st.g_ref:.3e} (relative accuracy {ep['check_tol']:.1e})")
        st.elapsed += time.perf_counter() - t0
        ep.update(cost=st.cost, work=st.work, elapsed=st.elapsed)
        st.epochs.append(ep)
        st.epoch, st.step, st.loss_sum, st.loss_n = st.epoch + 1, 0, 0.0, 0
        if self.checkpoint is not None:
            self._result(st, history, ctx).save(self._checkpoint_path())

    def _validate(self, st: MinibatchState, ctx) -> Dict[str, Any]:
        """Mean upper loss over the validation set at ``st.theta`` (inner to ``check_tol·R``)."""
        dtype = next(iter(st.theta.values())).dtype
        tol = self._check_eps(dtype) * (st.inner_ref or 1.0)
        total = count = its_sum = work = 0.0
        for batch in self._loader(ctx, ctx.val, 0, 0, False):
            batch = _to(batch, ctx.device)
            idx = batch_indices(batch)
            x0, _ = ctx.val_cache.gather(idx, self.inner.init(st.theta, batch), which=0)
            sol, its, ok, why = self._solve(st.theta, batch, tol, x0)
            if sol is None:
                return dict(val_loss=math.nan, val_reason=why)
            with torch.no_grad():
                loss = float(self.outer(sol.x, st.theta, batch))
            ctx.val_cache.put(idx, sol.x, None)
            total += loss * (1 if getattr(self.outer, "reduction", "mean") == "sum" else len(idx))
            count += len(idx)
            its_sum, work = its_sum + its, work + its * len(idx)
        total, count, work = dist_.all_reduce_floats([total, count, work], "sum")
        loss = total / count if getattr(self.outer, "reduction", "mean") != "sum" else total
        return dict(val_loss=loss, val_cost=int(its_sum), val_work=int(work))

    def _full_check(self, st: MinibatchState, ctx) -> Dict[str, Any]:
        """The full-data hypergradient at ``st.theta`` at accuracy ``check_tol`` (module docstring)."""
        dtype = next(iter(st.theta.values())).dtype
        eps = self._check_eps(dtype)
        loader = self._loader(ctx, ctx.train, 0, 0, False)
        n_total = dist_.all_reduce(float(len(loader.sampler)), "sum")
        grad = {n: torch.zeros_like(v) for n, v in st.theta.items()}
        loss, converged, cost0, why = 0.0, True, st.cost, None
        for batch in loader:
            ev = self._evaluate(st, ctx, batch, eps, ctx.cache)
            if ev["hg"] is None:
                why, converged = ev["reason"], False
                break
            w = ev["n"] / n_total
            grad = {n: grad[n] + w * ev["hg"].theta_grad[n].to(grad[n]) for n in grad}
            loss += w * ev["hg"].loss
            converged = converged and ev["inner_converged"] and ev["cg_converged"]
        gnorm = self._mapping_norm(st.theta, grad) if why is None else math.nan
        passed = (why is None and converged and st.g_ref is not None
                  and gnorm <= self.gtol * st.g_ref)
        return dict(check_loss=loss if why is None else math.nan, check_grad_norm=gnorm,
                    check_tol=eps, check_converged=converged, check_passed=passed,
                    check_cost=st.cost - cost0, check_reason=why)

    def _budget_message(self, st: MinibatchState) -> str:
        msg = f"maximum number of epochs ({self.epochs}) reached"
        last = st.epochs[-1] if st.epochs else {}
        if "check_grad_norm" in last and st.g_ref is not None:
            msg += (f"; the full-data check did not pass: projected hypergradient norm "
                    f"{last['check_grad_norm']:.3e} vs gtol·G₀ = {self.gtol * st.g_ref:.3e}"
                    + ("" if last.get("check_converged") else " (an inner solve or CG did not converge)"))
        return msg

    # ----- checkpoint / resume ----------------------------------------------------------------
    def _checkpoint_path(self) -> str:
        return f"{self.checkpoint}.rank{dist_.rank()}" if dist_.is_active() else self.checkpoint

    def _config(self, ctx) -> Dict[str, Any]:
        return {"optimizer": self.optimizer, "batch_size": ctx.local_bs * ctx.world,
                "seed": self.seed, "shuffle": self.shuffle, "n_train": len(ctx.train.ds),
                "n_val": None if ctx.val is None else len(ctx.val.ds)}

    def _result(self, st: MinibatchState, history: History, ctx) -> Result:
        loop = {f.name: getattr(st, f.name) for f in fields(st)}
        state = {"method": self.name, "loop": loop, "optimizer": ctx.opt.state_dict(),
                 "cache": ctx.cache.state_dict(), "val_cache": ctx.val_cache.state_dict(),
                 "rng": torch.get_rng_state(), "world_size": ctx.world,
                 "theta_names": sorted(st.theta), "bounds": _bounds_dict(self.bounds),
                 "config": self._config(ctx), "epochs": list(st.epochs)}
        clone = lambda d: None if d is None else {n: v.detach().clone() for n, v in d.items()}  # noqa: E731
        return Result(theta=clone(st.theta), x=None, history=history, success=st.success,
                      message=st.message or "", n_iter=len(history), state=state,
                      best_theta=clone(st.best_theta), best_loss=st.best_loss,
                      best_iteration=st.best_iteration, last_theta=clone(st.theta))

    def _restore(self, resume: Result, ctx) -> MinibatchState:
        saved = resume.state if isinstance(resume, Result) else None
        if not saved or saved.get("method") != self.name:
            found = saved.get("method") if saved else None
            raise ValueError(f"resume must be the Result of a {self.name} run, got one of {found!r}")
        if saved["world_size"] != ctx.world:
            raise ValueError(f"resume: the checkpoint was written with world size "
                             f"{saved['world_size']}, this run has {ctx.world}")
        for key, mine in (("theta_names", sorted(ctx.theta0)), ("bounds", _bounds_dict(self.bounds)),
                          ("config", self._config(ctx))):
            if saved[key] != mine:
                raise ValueError(f"resume: the checkpoint's {key} {saved[key]} differ from this "
                                 f"run's {mine}")
        st = MinibatchState(**saved["loop"])
        st.message, st.success = None, False
        ctx.cache.load_state_dict(saved["cache"])
        ctx.val_cache.load_state_dict(saved["val_cache"])
        torch.set_rng_state(saved["rng"])
        return st
