"""Task-adapted TV denoising, the experiment of the reference's §3.4 (Tables 3.3 and 3.4).

For a pretrained task network ``T*`` and noisy images ``y = x + σn`` the rows are

* ``T* on clean`` / ``T* on noisy``: ``T*(x)`` and ``T*(y)``;
* ``TV, MSE-learned θ``: ``T*(x̂(θ_mse))`` with ``θ_mse = argmin_θ mean‖x̂(θ) − x‖²`` (QuasiNewton), the
  sequential route (denoise for the pixels, then apply the task);
* ``TV, task-learned θ (tol τ)``: ``θ_task = argmin_θ L(T*(x̂(θ)), s)`` (QuasiNewton, task loss
  ``L``), the inner problem and CG solved to the relative tolerance ``τ``;
* ``TV, task-learned θ + fine-tuned T``: the same with the selected layers ``φ`` of ``T``
  stepped by Adam in the same loop, scored with ``T_φ(x̂(θ))``;
* optionally ``FoE (N θ), MSE-learned θ`` and ``FoE (N θ), task-learned θ``: the same two
  upper losses with the many-parameter lower level
  :class:`recon.learned_experts.LearnedFieldOfExperts` (``K`` learned ``s×s`` filters, one
  weight each, and the smoothing: ``N = K·s² + K + 1`` hyperparameters, 81 for the examples'
  8 filters of 3×3) in place of TV;
* optionally ``Adaptive TV (N θ), MSE-learned θ`` and ``Adaptive TV (N θ), task-learned θ``:
  the same two upper losses with :class:`recon.adaptive_tv.AdaptiveTVDenoising`, smoothed TV
  whose pixel weights ``λ(θ, y)`` a small convolutional network predicts from the noisy image
  (``N = 410`` hyperparameters for the examples' 8 hidden channels of 7×7 kernels and a 1×1
  output layer). The MSE route starts at the MSE-learned TV θ with the network's last layer
  zero (plain TV), the task route where the MSE route ended, as for the other regularizers (so
  that task − MSE of the same regularizer measures what the upper loss adds; a start at the
  task-learned TV θ was not tried). Measured on the digit scenes (σ = 0.3, 3 seeds) neither
  route converged within 100 iterations; the MSE route gained +0.030 Dice over MSE-learned TV,
  the task route lost 0.011 against it on the held-out scenes: its 410 θ fit the training
  scenes' noise draw (:class:`ManyImages`);
* optionally ``Adaptive TV (N θ) on M images, MSE-learned θ`` / ``…, task-learned θ``: the same
  two routes learned in minibatches over ``M`` other training images (:class:`ManyImages`,
  :class:`bilevel.MinibatchBilevel`), each kept at its best epoch on held-out training images.

The task routes start where the MSE route ended (the loop then descends the task loss from
``θ_mse``): started at :data:`THETA0` instead, the task loss's slope toward *less* smoothing at
tiny TV weights led the loop to the weight's lower bound on the digit scenes at σ = 0.1 (no
denoising at all). ``x̂(θ)`` is :class:`recon.problems.TVDenoising`. θ is learned on a small training set and every
row is scored on a held-out test set. "Relative tolerance τ" means the absolute tolerance
``τ · max_b‖∇ₓΦ_b(y_b; θ₀)‖`` (the inner gradient norm at the start, in the problem's units) on
the inner gradient and the CG residual, held constant (``QuasiNewton(tol0=τ, tol_min=τ)``).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from bilevel import Bounds, InnerProblem, MinibatchBilevel, QuasiNewton, solve_inner

from ..adaptive_tv import AdaptiveTVDenoising, adaptive_tv_size
from ..adaptive_tv import initial_theta as adaptive_initial_theta
from ..learned_experts import LearnedFieldOfExperts, initial_theta
from ..losses import MSEToTarget
from ..problems import TVDenoising
from .losses import TaskLoss
from .operator import TaskOperator
from .pretrain import predict

__all__ = ["THETA0", "BOUNDS", "GTOL", "FTOL", "EXPERTS_BOUNDS", "ADAPTIVE_BOUNDS", "relative_tolerance",
           "denoise", "learn_theta", "experts_theta0", "experts_size", "adaptive_theta0",
           "ManyImages", "run_noise_level"]

#: initial θ of every route: weight e^{-4} ≈ 0.018, smoothing e^{-4} ≈ 0.018
THETA0 = {"log_weight": -4.0, "log_smoothing": -4.0}
BOUNDS = Bounds(lower={"log_weight": -12.0, "log_smoothing": -12.0},
                upper={"log_weight": 4.0, "log_smoothing": 2.0})
#: the examples' stopping test: ``‖G(g)‖ ≤ GTOL·‖G(g₀)‖`` and a model decrease ≤ ``FTOL·(ℓ₀ − ℓ)``
#: (:class:`bilevel.QuasiNewton`'s ``gtol``/``ftol``). Measured on the digit scenes at σ = 0.3,
#: the task loss' projected hypergradient stalls near 10⁻³‖G(g₀)‖ at both inner tolerances (its
#: value is flat to 10⁻⁶ there), so the library's default ``gtol = 10⁻⁶`` is never reached.
GTOL, FTOL = 1e-3, 1e-4
#: the box of the field-of-experts routes (the filters are free)
EXPERTS_BOUNDS = Bounds(lower={"log_weights": -12.0, "log_smoothing": -12.0},
                        upper={"log_weights": 4.0, "log_smoothing": 2.0})
#: the box of the adaptive-TV routes: that of TV on the two scalars (the network is free)
ADAPTIVE_BOUNDS = Bounds(lower=dict(BOUNDS.lower), upper=dict(BOUNDS.upper))


@dataclass
class ManyImages:
    """A many-parameter lower level learned over a large training set in minibatches.

    ``train`` and ``val`` hold ``"image"``, ``"label"`` and the noisy ``"y"`` (float64). Both
    routes (MSE, then task) run :class:`bilevel.MinibatchBilevel` (Adam, cosine schedule,
    ``lr``; ``epochs`` passes of minibatches of ``batch_size`` images) and keep the epoch-end
    θ with the lowest upper loss on ``val`` (``Result.best_theta``). Learned in one batch on a
    hundred images the 410 θ of adaptive TV fit that draw: measured on the digit scenes at
    σ = 0.3, the task-learned θ segments its own training scenes at Dice 0.72, the same scenes
    with a fresh noise draw at 0.67 and new scenes at 0.64.
    """

    inner: InnerProblem
    train: Mapping[str, Tensor]
    val: Mapping[str, Tensor]
    epochs: int = 10
    batch_size: int = 50
    lr: float = 0.1

    def learn(self, outer: nn.Module, start: Mapping[str, Tensor], bounds: Optional[Bounds],
              progress: bool = False):
        """``(Result, best θ, seconds)`` of one route with the upper loss ``outer`` from ``start``."""
        loop = MinibatchBilevel(self.inner, outer, optimizer="adam", lr=self.lr, epochs=self.epochs,
                                batch_size=self.batch_size, bounds=bounds, progress=progress)
        t0 = time.perf_counter()
        res = loop.run({k: v.detach().clone() for k, v in start.items()}, dict(self.train),
                       val=dict(self.val))
        return res, res.best_theta or res.theta, time.perf_counter() - t0


def theta0(dtype=torch.float64) -> Dict[str, Tensor]:
    """A fresh copy of :data:`THETA0` as scalar tensors."""
    return {k: torch.tensor(v, dtype=dtype) for k, v in THETA0.items()}


def relative_tolerance(rel: float, theta: Mapping[str, Tensor], y: Tensor,
                       inner: Optional[InnerProblem] = None) -> float:
    """``rel · max_b ‖∇ₓΦ_b(y_b; θ)‖``: an absolute inner tolerance from a relative one
    (``inner`` defaults to :class:`recon.problems.TVDenoising`)."""
    g = (inner or TVDenoising()).grad(y, dict(theta), {"y": y})
    return float(rel * g.flatten(1).norm(dim=1).max())


def denoise(theta: Mapping[str, Tensor], y: Tensor, rel_tol: float = 1e-5, chunk: int = 100,
            inner: Optional[InnerProblem] = None) -> Tensor:
    """``x̂(θ)`` for every image of ``y`` (``inner``, default TV denoising, solved to the
    relative ``rel_tol``)."""
    inner, out = inner or TVDenoising(), []
    for i in range(0, len(y), chunk):
        yc = y[i:i + chunk]
        tol = relative_tolerance(rel_tol, theta, yc, inner)
        out.append(solve_inner(inner, dict(theta), {"y": yc}, tol=tol).x)
    return torch.cat(out)


def learn_theta(outer: nn.Module, train: Mapping[str, Tensor], rel_tol: float, max_iter: int,
                param_optimizer: Optional[torch.optim.Optimizer] = None, progress: bool = False,
                start: Optional[Mapping[str, Tensor]] = None, inner: Optional[InnerProblem] = None,
                bounds: Optional[Bounds] = BOUNDS, gtol: float = GTOL, ftol: float = FTOL):
    """:class:`bilevel.QuasiNewton` on ``inner`` (default ``TVDenoising`` in the box
    :data:`BOUNDS`) with the upper loss ``outer`` from ``start`` (default :func:`theta0`), the
    inner and CG accuracy fixed at the relative ``rel_tol`` (as the reference fixes its inner
    tolerance); returns ``(Result, seconds)``. The loop runs to its own stop (``success``:
    ``‖G(g)‖ ≤ gtol·‖G(g₀)‖``, :data:`GTOL`) or to ``max_iter``. ``train`` holds ``"y"``
    (noisy), ``"image"`` and ``"label"``."""
    th0 = theta0(train["y"].dtype) if start is None else {k: v.detach().clone() for k, v in start.items()}
    # relative accuracies (inner: to max_b‖∇ₓΦ_b(x⁰)‖, CG: to ‖(∇ₓℓ)_b‖), held at rel_tol
    loop = QuasiNewton(inner or TVDenoising(), outer, tol0=rel_tol, tol_min=rel_tol,
                       max_iter=max_iter, bounds=bounds, param_optimizer=param_optimizer,
                       progress=progress, gtol=gtol, ftol=ftol)
    t0 = time.perf_counter()
    res = loop.run(th0, dict(train))
    return res, time.perf_counter() - t0


def _row(name: str, scores: Mapping[str, float], theta=None, res=None, seconds=None) -> Dict[str, Any]:
    row = {"route": name, **scores}
    if theta is not None:
        row["theta"] = {k: float(v) if v.numel() == 1 else v.detach().tolist()
                        for k, v in theta.items()}
    if res is not None:
        row.update(hoag_iterations=res.n_iter, hoag_message=res.message, converged=res.success,
                   seconds=round(seconds, 2))
    return row


def experts_theta0(theta_tv: Mapping[str, Any], inner: LearnedFieldOfExperts,
                   dtype=torch.float64) -> Dict[str, Tensor]:
    """θ₀ of the field-of-experts routes: the unit DCT atoms of :func:`recon.learned_experts.
    initial_theta`, every ``log w_k = log w_TV − 2`` (``w_TV`` the MSE-learned TV weight: the
    K atoms together respond several times more strongly to an edge than ``|∇x|``) and
    ``log ε = −4``."""
    th = initial_theta(inner.filter_size, log_weight=float(theta_tv["log_weight"]) - 2.0,
                       log_smoothing=-4.0, dtype=dtype)
    th["filters"] = th["filters"][:inner.n_filters]
    th["log_weights"] = th["log_weights"][:inner.n_filters]
    return th


def run_noise_level(network: nn.Module, train: Mapping[str, Tensor], test: Mapping[str, Tensor],
                    loss: Callable, score: Callable[[Tensor, Tensor], Dict[str, float]], *,
                    finetune: Sequence[str] = (), tolerances: Sequence[float] = (1e-3, 1e-5),
                    max_iter: int = 20, finetune_lr: float = 1e-3, progress: bool = False,
                    done: Optional[Mapping[str, Mapping[str, Any]]] = None,
                    on_stage: Optional[Callable[[str, Dict[str, Any]], None]] = None,
                    experts: Optional[LearnedFieldOfExperts] = None,
                    experts_max_iter: Optional[int] = None,
                    adaptive: Optional[AdaptiveTVDenoising] = None,
                    adaptive_max_iter: Optional[int] = None,
                    adaptive_many: Optional[ManyImages] = None):
    """All rows (module docstring) for one noise level; ``train``/``test`` hold ``"image"``,
    ``"label"`` and the noisy ``"y"`` (float64). Returns ``(rows, images)`` where ``images``
    maps a route to the test images its task network saw and that network's logits.

    Every row is a stage: ``on_stage(route, stage)`` is called once it is finished, with
    ``stage = {"row": row, "x": 4 test images, "logits": their logits}``, and a route found in
    ``done`` (such stages of an earlier, interrupted run) is taken from there instead of being
    computed again; the task routes then start from the finished MSE route's θ, so a resumed
    noise level gives the rows of an uninterrupted one. With ``experts`` (a
    :class:`recon.learned_experts.LearnedFieldOfExperts`) two more rows: that regularizer's θ
    learned for the MSE (from :func:`experts_theta0`) and then for the task (from the MSE θ),
    at the tightest tolerance, each capped at ``experts_max_iter`` (default ``max_iter``)
    outer iterations. With ``adaptive`` (a :class:`recon.adaptive_tv.AdaptiveTVDenoising`) two
    more rows the same way: its θ learned for the MSE (from :func:`adaptive_theta0`: plain TV
    at the MSE-learned TV θ) and then for the task (from the adaptive MSE θ), each capped at
    ``adaptive_max_iter`` (default ``max_iter``). With ``adaptive_many`` (:class:`ManyImages`)
    they are learned in minibatches over its images instead (``"… on M images, …"``)."""
    network.eval()
    f32 = lambda t: t.to(next(network.parameters()).dtype)  # noqa: E731
    rows, images, done = [], {}, dict(done or {})
    tol = min(tolerances)

    def add(name, compute):
        stage = done.get(name)
        if stage is None:
            x, net, extra = compute()
            logits = predict(net, f32(x))
            # copies, not views: a saved view would hold the whole test batch
            stage = {"row": _row(name, score(logits, test["label"]), **extra),
                     "x": x[:4].float().clone(), "logits": logits[:4].clone()}
            if on_stage is not None:
                on_stage(name, stage)
        rows.append(stage["row"])
        images[name] = (stage["x"], stage["logits"])
        return stage["row"]

    def route(outer, tol, start=None, param_optimizer=None, net=network, inner=None, bounds=BOUNDS,
              cap=max_iter):
        res, sec = learn_theta(outer, train, tol, cap, param_optimizer=param_optimizer,
                               progress=progress, start=start, inner=inner, bounds=bounds)
        x = denoise(res.theta, test["y"], tol, inner=inner)
        return x, net, dict(theta=res.theta, res=res, seconds=sec)

    task_outer = lambda: TaskLoss(TaskOperator(network), loss)  # noqa: E731
    add("T* on clean", lambda: (test["image"], network, {}))
    add("T* on noisy", lambda: (test["y"], network, {}))
    theta_mse = _theta(add("TV, MSE-learned θ", lambda: route(MSEToTarget(), tol)), train["y"].dtype)
    for t in tolerances:
        add(f"TV, task-learned θ (tol {t:g})", lambda: route(task_outer(), t, theta_mse))
    if finetune:
        def tuned_route():
            tuned = TaskOperator(copy.deepcopy(network), finetune=list(finetune))
            outer = TaskLoss(tuned, loss)
            opt = torch.optim.Adam(outer.trainable_parameters().values(), lr=finetune_lr)
            x, _, extra = route(outer, tol, theta_mse, opt)
            return x, tuned.eval(), extra
        add(f"TV, task-learned θ + fine-tuned T (tol {tol:g})", tuned_route)
    dtype = theta_mse["log_weight"].dtype
    if experts is not None:
        _regularizer_rows(add, route, task_outer, f"FoE ({experts_size(experts)} θ)", experts,
                          experts_theta0(theta_mse, experts, dtype), EXPERTS_BOUNDS, tol,
                          experts_max_iter or max_iter)
    if adaptive_many is not None:
        _many_rows(add, task_outer, network, adaptive_many, theta_mse, test["y"], tol, progress)
    elif adaptive is not None:
        _regularizer_rows(add, route, task_outer, f"Adaptive TV ({adaptive_tv_size(adaptive)} θ)",
                          adaptive, adaptive_theta0(theta_mse, adaptive, dtype), ADAPTIVE_BOUNDS,
                          tol, adaptive_max_iter or max_iter)
    return rows, images


def adaptive_theta0(theta_tv: Mapping[str, Any], inner: AdaptiveTVDenoising,
                    dtype=torch.float64) -> Dict[str, Tensor]:
    """θ₀ of the adaptive-TV routes: plain TV at ``theta_tv`` (the MSE-learned TV θ): the
    network of :func:`recon.adaptive_tv.initial_theta` (seed 0) with its last layer zero."""
    return adaptive_initial_theta(inner.channels, inner.hidden, inner.kernel_size,
                                  inner.out_kernel_size, log_weight=float(theta_tv["log_weight"]),
                                  log_smoothing=float(theta_tv["log_smoothing"]), dtype=dtype)


def _regularizer_rows(add, route, task_outer, name, inner, start, bounds, tol, cap) -> None:
    """The two rows of a many-parameter regularizer ``inner`` in :func:`run_noise_level`: θ
    learned for the MSE from ``start``, then for the task from that θ (box ``bounds``, at most
    ``cap`` outer iterations each)."""
    mse = _theta(add(f"{name}, MSE-learned θ", lambda: route(
        MSEToTarget(), tol, start, inner=inner, bounds=bounds, cap=cap)),
        start["log_smoothing"].dtype)
    add(f"{name}, task-learned θ (tol {tol:g})", lambda: route(
        task_outer(), tol, mse, inner=inner, bounds=bounds, cap=cap))


def _many_rows(add, task_outer, network, many: ManyImages, theta_mse, test_y, tol, progress) -> None:
    """The two adaptive-TV rows of :class:`ManyImages` in :func:`run_noise_level`: θ learned
    for the MSE from :func:`adaptive_theta0` at the MSE-learned TV θ ``theta_mse``, then for
    the task from that route's best θ (box :data:`ADAPTIVE_BOUNDS`); each scored with its best θ."""
    inner = many.inner
    name = f"Adaptive TV ({adaptive_tv_size(inner)} θ) on {len(many.train['y'])} images"
    start = adaptive_theta0(theta_mse, inner, theta_mse["log_weight"].dtype)

    def route(outer, th0):
        res, theta, sec = many.learn(outer, th0, ADAPTIVE_BOUNDS, progress)
        x = denoise(theta, test_y, tol, inner=many.inner)
        return x, network, dict(theta=theta, res=res, seconds=sec)

    mse = _theta(add(f"{name}, MSE-learned θ", lambda: route(MSEToTarget(), start)),
                 start["log_smoothing"].dtype)
    add(f"{name}, task-learned θ", lambda: route(task_outer(), mse))


def experts_size(inner: LearnedFieldOfExperts) -> int:
    """``K·s² + K + 1``: the number of hyperparameters of a learned field of experts."""
    return inner.n_filters * inner.filter_size ** 2 + inner.n_filters + 1


def _theta(row: Mapping[str, Any], dtype) -> Dict[str, Tensor]:
    """A row's θ as tensors (the start of the routes that follow it)."""
    return {k: torch.tensor(v, dtype=dtype) for k, v in row["theta"].items()}
