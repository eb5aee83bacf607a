"""Hypergradient estimators.

For ``ℓ(θ) = ℓ(x̂(θ), θ)`` with ``∇ₓΦ(x̂(θ); θ) = 0`` the implicit function theorem gives

.. math::

    \\nabla\\ell(\\theta) = \\nabla_\\theta\\ell - (\\nabla^2_{x\\theta}\\Phi)^\\top q,\\qquad
    \\nabla^2_{xx}\\Phi\\, q = \\nabla_x\\ell ,

(:class:`ImplicitCG`), while :class:`Unrolled` differentiates ``K`` explicit gradient steps
``x_{k+1} = x_k − α∇ₓΦ(x_k; θ)`` by backpropagation.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import distributed as dist_
from .implicit import implicit_vjp, relative_cg_tolerance
from .linalg import HessianOperator, cg_iteration_cap, check_cg_cap
from .problem import (Hypergradient, HypergradientEstimator, InnerProblem, OuterLoss, Theta,
                      check_tolerance)

__all__ = ["ImplicitCG", "Unrolled", "outer_gradients"]


def outer_gradients(outer: OuterLoss, x: Tensor, theta: Theta, batch: Any,
                    create_graph: bool = False) -> Tuple[Tensor, Tensor, Theta, Dict[str, Tensor]]:
    """Partial derivatives of the upper loss at ``(x, θ)``.

    Returns ``(ℓ, ∇ₓℓ, ∇_θℓ, ∇_φℓ)`` where ``φ`` are the outer loss' trainable parameters.
    Names of θ that ``ℓ`` does not use get zero gradients.
    """
    params = outer.trainable_parameters() if hasattr(outer, "trainable_parameters") else {}
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        th = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        loss = outer(xr, th, batch)
        if not isinstance(loss, Tensor):
            raise TypeError(f"outer loss must return a scalar torch.Tensor (differentiable in x "
                            f"and θ), got {type(loss).__name__} {loss!r}")
        if loss.dim() != 0:
            raise ValueError(f"outer loss must return a scalar, got shape {tuple(loss.shape)}")
        names = list(th)
        inputs = [xr] + [th[k] for k in names] + list(params.values())
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, create_graph=create_graph)
    gx = torch.zeros_like(xr) if grads[0] is None else grads[0]
    gth = {k: (torch.zeros_like(th[k]) if g is None else g)
           for k, g in zip(names, grads[1:1 + len(names)])}
    gp = {n: (torch.zeros_like(p) if g is None else g)
          for (n, p), g in zip(params.items(), grads[1 + len(names):])}
    return loss.detach(), gx, gth, gp


class ImplicitCG(HypergradientEstimator):
    """Implicit-differentiation hypergradient with batched conjugate gradient (HOAG's step).

    Solves ``∇²ₓₓΦ q = ∇ₓℓ`` per sample until ``‖∇²ₓₓΦ_b q_b − (∇ₓℓ)_b‖₂ ≤ max(tol, rtol‖(∇ₓℓ)_b‖)``
    (``tol`` is the per-sample absolute residual; for a batch-level residual ``ε`` pass
    ``ε/√B``), then returns ``∇_θℓ − (∇²_{xθ}Φ)ᵀq`` (see :func:`bilevel.implicit.implicit_vjp`).
    Called with ``relative=True`` (as :class:`~bilevel.HOAG` does), ``tol`` is relative: the
    per-sample tolerance is ``tol·max(‖(∇ₓℓ)_b‖, 10⁻³ max_b'‖(∇ₓℓ)_b'‖)``, so CG always iterates
    from ``q = 0`` unless ``∇ₓℓ = 0`` (never a zero hypergradient from a CG that did nothing).

    Parameters
    ----------
    max_iter: CG iteration cap (hitting it is reported as ``cg_converged=False``); ``None``
        (default): ``max(200, n)``, ``n`` the per-sample dimension of ``x``
        (:func:`bilevel.linalg.cg_iteration_cap`).
    rtol: relative residual tolerance (0: absolute only).
    warm_start: start CG from the previous call's ``q`` (when the shapes match).
    hessian: ``"auto"`` (closed-form products of the problem when it has them, else autograd
        double backward on a gradient graph built once), ``"autograd"`` or ``"closed"``.

    Non-positive curvature met by CG raises :class:`bilevel.linalg.NonPositiveCurvatureError`.

    Examples
    --------
    >>> from bilevel import ImplicitCG, solve_inner                     # doctest: +SKIP
    >>> sol = solve_inner(inner, theta, batch, tol=1e-10)
    >>> hg = ImplicitCG()(inner, outer, theta, batch, sol.x, tol=1e-10)
    >>> hg.loss, hg.theta_grad, hg.cg_iterations, hg.cg_converged
    """

    def __init__(self, max_iter: Optional[int] = None, rtol: float = 0.0, warm_start: bool = True,
                 hessian: str = "auto"):
        self.max_iter = check_cg_cap(max_iter)
        self.rtol = check_tolerance("rtol", rtol, allow_zero=True)
        self.warm_start = warm_start
        self.hessian = hessian
        self._q: Optional[Tensor] = None

    def reset(self) -> None:
        self._q = None

    def __call__(self, inner: InnerProblem, outer: OuterLoss, theta: Theta, batch: Any,
                 x: Tensor, tol: float, relative: bool = False) -> Hypergradient:
        tol = check_tolerance("tol", tol)
        inner.check(x, theta, batch)
        loss, gx, gth, gp = outer_gradients(outer, x, theta, batch)
        H = HessianOperator(inner, x, theta, batch, mode=self.hessian)
        abs_tol = relative_cg_tolerance(gx, tol) if relative else tol
        res = implicit_vjp(H.hvp, H.mixed_vjp, gx, gth, abs_tol, q0=self._warm(gx),
                           max_iter=cg_iteration_cap(self.max_iter, gx, 200), rtol=self.rtol)
        self._q = res.q
        cg = res.cg
        hg = Hypergradient(loss=float(loss), theta_grad=res.grad, param_grads=gp,
                           cg_iterations=cg.max_iterations, cg_converged=cg.all_converged,
                           adjoint=res.q,
                           info={"cg_residual": cg.residual.detach(), "hvp_count": H.n_hvp,
                                 "cg_iterations_per_sample": cg.iterations})
        return dist_.reduce_hypergradient(hg)


class Unrolled(HypergradientEstimator):
    """Backpropagation through ``K`` differentiable gradient steps of the inner problem.

    ``x_{k+1} = x_k − α ∇ₓΦ(x_k; θ)``, ``k = 0..K−1``, from ``x_0`` = the given point
    (``start="warm"``, detached) or the problem's initial point (``start="init"``); the
    hypergradient is the exact gradient of ``θ ↦ ℓ(x_K(θ), θ)``. ``α`` is ``step_size`` or
    ``1/L`` with ``L = inner.lipschitz(θ, batch)`` (treated as a constant, not differentiated).

    Memory grows linearly with ``K``: every step keeps its double-backward graph (for a
    ``B×C×H×W`` batch about ``K`` times a few copies of the image batch).
    With ``K = 0`` it is plain backprop of ``ℓ(x_0(θ), θ)`` -- the joint-loss case where
    ``x_0`` is an explicit network of θ.
    """

    def __init__(self, n_steps: int = 20, step_size: Optional[float] = None, start: str = "warm"):
        if not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        if start not in ("warm", "init"):
            raise ValueError(f"start must be 'warm' or 'init', got {start!r}")
        if step_size is not None:
            check_tolerance("step_size", step_size)
        self.n_steps, self.step_size, self.start = n_steps, step_size, start

    def _alpha(self, inner: InnerProblem, theta: Theta, batch: Any) -> float:
        if self.step_size is not None:
            return float(self.step_size)
        with torch.no_grad():
            L = inner.lipschitz({k: v.detach() for k, v in theta.items()}, batch)
        if L is None:
            raise ValueError(f"Unrolled needs step_size, or an inner problem whose lipschitz(θ, "
                             f"batch) returns a number; {type(inner).__name__}.lipschitz "
                             f"returned None")
        return 1.0 / dist_.all_reduce(float(torch.as_tensor(L).max()), "max")

    def unroll(self, inner: InnerProblem, theta: Theta, batch: Any, x0: Tensor,
               create_graph: bool = True) -> Tensor:
        """The ``K``-step map ``x_K(θ)`` (differentiable in θ when θ requires grad)."""
        alpha = self._alpha(inner, theta, batch) if self.n_steps else 0.0
        with torch.enable_grad():
            # an x₀ that depends on θ (start="init" with an explicit map) keeps its graph
            xk = x0 if x0.requires_grad else x0.detach().clone().requires_grad_(True)
            for _ in range(self.n_steps):
                (g,) = torch.autograd.grad(inner.objective(xk, theta, batch).sum(), xk,
                                           create_graph=create_graph)
                xk = xk - alpha * g
        return xk

    def __call__(self, inner: InnerProblem, outer: OuterLoss, theta: Theta, batch: Any,
                 x: Tensor, tol: float = 0.0, relative: bool = False) -> Hypergradient:
        """``tol`` and ``relative`` are accepted for a uniform interface and ignored."""
        inner.check(x, theta, batch)
        params = outer.trainable_parameters() if hasattr(outer, "trainable_parameters") else {}
        th = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        with torch.enable_grad():
            x0 = x.detach() if self.start == "warm" else inner.init(th, batch)
            xk = self.unroll(inner, th, batch, x0)
            loss = outer(xk, th, batch)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"outer loss must return a scalar tensor, got {shape}")
            names = list(th)
            grads = torch.autograd.grad(loss, [th[k] for k in names] + list(params.values()),
                                        allow_unused=True)
        gth = {k: (torch.zeros_like(th[k]) if g is None else g) for k, g in zip(names, grads)}
        gp = {n: (torch.zeros_like(p) if g is None else g)
              for (n, p), g in zip(params.items(), grads[len(names):])}
        return dist_.reduce_hypergradient(Hypergradient(
            loss=float(loss.detach()), theta_grad=gth, param_grads=gp,
            extra_inner_steps=self.n_steps, info={"x": xk.detach()}))
