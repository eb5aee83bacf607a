r"""Joint learning as a special case of the bilevel API.

The reconstructor ``R_φ`` is an *explicit* solution map: the inner problem

.. math::

    Φ_b(x; φ) = \tfrac12 \|x − R_φ(y_b)\|^2 \qquad\Rightarrow\qquad \hat x_b(φ) = R_φ(y_b)

needs no solve (:meth:`ExplicitReconstruction.solve` returns ``R_φ(y)`` with zero iterations),
and the hypergradient of ``ℓ(φ) = L(\hat x(φ); ψ)`` is plain backpropagation through ``R_φ``
(:class:`ExplicitBackprop`). ``φ`` is the dict of the network's named parameters, applied with
:func:`torch.func.functional_call`, so ``θ`` is "a dict of named tensors" as everywhere in
:mod:`bilevel`.

Why not ``bilevel.Unrolled(n_steps=0, start="init")``: its ``unroll`` detaches ``x_0``, so the
path ``φ → x_0 = R_φ(y)`` is cut and the hypergradient comes out zero. :class:`ExplicitBackprop`
is the estimator that keeps it (a proposed change to ``bilevel`` is not to detach when
``start="init"``). ``bilevel.Unrolled(n_steps=1)`` from any ``x₀`` is exact too: with
``∇ₓΦ = x − R_φ(y)`` and step ``1/L = 1`` its single step gives ``x₁ = R_φ(y)``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel.problem import (Hypergradient, HypergradientEstimator, InnerProblem, OuterLoss,
                             Theta, check_finite)
from bilevel.solvers import SolveResult

__all__ = ["ExplicitReconstruction", "ExplicitBackprop", "network_theta"]


def network_theta(network: nn.Module) -> Theta:
    """``φ`` of a network: its trainable parameters by name (detached copies)."""
    return {n: p.detach().clone() for n, p in network.named_parameters() if p.requires_grad}


class ExplicitReconstruction(InnerProblem):
    """Inner problem ``Φ_b(x; φ) = ½‖x − R_φ(y_b)‖²`` with explicit solution ``x̂(φ) = R_φ(y)``.

    ``network`` is ``R_φ`` (``(B, 1, n_a, n_d)`` sinograms → ``(B, 1, H, W)`` images, with an
    optional initial guess ``x0``); ``batch`` holds the sinograms under ``observation_key`` and,
    optionally, the initial guesses (e.g. FBPs) under ``init_key``. ``θ`` names the network's
    trainable parameters; a missing name keeps the module's own value.
    """

    strong_convexity = 1.0

    def __init__(self, network: nn.Module, observation_key: str = "sinogram",
                 init_key: Optional[str] = "fbp"):
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
        self.network = network
        self.observation_key, self.init_key = observation_key, init_key
        self.theta_names = tuple(network_theta(network))

    def reconstruct(self, theta: Theta, batch: Mapping[str, Tensor]) -> Tensor:
        """``R_θ(y)``, differentiable in ``θ``."""
        if not isinstance(batch, Mapping) or self.observation_key not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"batch must be a mapping with key {self.observation_key!r}; got {keys}")
        kwargs = {}
        if self.init_key is not None and self.init_key in batch:
            kwargs["x0"] = batch[self.init_key]
        return functional_call(self.network, dict(theta), (batch[self.observation_key],), kwargs)

    def objective(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        return 0.5 * ((x - self.reconstruct(theta, batch)) ** 2).flatten(1).sum(1)

    def init(self, theta: Theta, batch: Any) -> Tensor:
        """The solution itself, ``R_θ(y)`` (with a graph when ``θ`` requires grad)."""
        return self.reconstruct(theta, batch)

    def grad(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        with torch.no_grad():
            return x.detach() - self.reconstruct(theta, batch)

    def hvp(self, x: Tensor, theta: Theta, batch: Any, v: Tensor) -> Tensor:
        """``∇²ₓₓΦ v = v``."""
        return v

    def lipschitz(self, theta: Theta, batch: Any) -> float:
        """``L = 1`` (``∇²ₓₓΦ = I``): one gradient step of length 1 lands on ``R_θ(y)``."""
        return 1.0

    def solve(self, theta: Theta, batch: Any, tol: float, x0: Optional[Tensor] = None,
              max_iter: int = 100) -> SolveResult:
        """No iterations: ``x̂ = R_θ(y)`` exactly (gradient norm 0)."""
        with torch.no_grad():
            x = self.reconstruct(theta, batch)
        zeros = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return SolveResult(x=x, iterations=zeros, grad_norm=zeros.to(x.dtype),
                           converged=torch.ones_like(zeros, dtype=torch.bool), method="explicit")

    def check(self, x: Tensor, theta: Theta, batch: Any) -> None:
        unknown = sorted(set(theta) - set(self.theta_names))
        if unknown:
            raise ValueError(f"theta has name(s) {unknown[:5]} that are not trainable parameters "
                             f"of {type(self.network).__name__}")
        check_finite("x", x)


class ExplicitBackprop(HypergradientEstimator):
    """Hypergradient of ``ℓ(θ) = L(x̂(θ), θ)`` for an explicit solution map ``x̂(θ) = inner.init(θ, batch)``.

    ``∇ℓ(θ) = (∂x̂/∂θ)ᵀ ∇ₓL + ∇_θL`` by one backward pass, and ``∇_ψL`` for the outer loss'
    trainable parameters ``ψ`` in the same pass. The ``x`` passed in is ignored (the map is
    evaluated afresh so the graph exists); ``tol`` is unused.
    """

    def __call__(self, inner: InnerProblem, outer: OuterLoss, theta: Theta, batch: Any,
                 x: Optional[Tensor] = None, tol: float = 0.0) -> Hypergradient:
        params = outer.trainable_parameters() if hasattr(outer, "trainable_parameters") else {}
        names = list(theta)
        with torch.enable_grad():
            th = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
            x_hat = inner.init(th, batch)
            loss = outer(x_hat, th, batch)
            if loss.dim() != 0:
                raise ValueError(f"outer loss must return a scalar, got shape {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, [th[k] for k in names] + list(params.values()),
                                        allow_unused=True)
        gth: Dict[str, Tensor] = {k: (torch.zeros_like(th[k]) if g is None else g)
                                  for k, g in zip(names, grads)}
        gp = {n: (torch.zeros_like(p) if g is None else g)
              for (n, p), g in zip(params.items(), grads[len(names):])}
        return Hypergradient(loss=float(loss.detach()), theta_grad=gth, param_grads=gp,
                             info={"x": x_hat.detach()})
