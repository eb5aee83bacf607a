r"""Field of experts with learned filters: a lower level with hundreds of hyperparameters.

Per sample ``b`` (``n = C·H·W``, ``*`` a zero-padded "same" convolution on every channel,
``w_k = e^{θ_{w,k}}``, ``ε = e^{θ_s}``):

.. math::

    Φ_b(x; θ) = \frac1n\|x − y_b\|^2
                + \frac1n \sum_{k=1}^{K} w_k \sum_{c,i,j} \sqrt{(\hat f_k * x)_{cij}^2 + ε},
                \qquad \hat f_k = f_k / \|f_k\|_2,

with θ = ``{"filters": (K, 1, s, s), "log_weights": (K,), "log_smoothing": scalar}``: the
filters ``f_k`` themselves are hyperparameters (``K·s² + K + 1`` in all; 625 for the default
``K = 24``, ``s = 5``); each enters through its direction ``f̂_k`` only, so a filter's strength
lives in its weight ``w_k`` alone (no redundant scale between ``f_k`` and ``w_k``, and steps on
the filters and on the log-weights are of comparable size). The regularizer the regularizer can shape its filters to what the upper loss rewards
(edges of a mask, textures a classifier needs), not only reweight a fixed basis as
:class:`recon.experts.FieldOfExpertsDenoising` does. The penalty ``z ↦ √(z² + ε)`` is a
smoothed absolute value, convex for every filter, so ``Φ_b`` stays strongly convex
(``μ = 2/n`` from the data term) whatever θ is and implicit differentiation is valid.
:func:`initial_theta` starts from the DCT basis of :func:`recon.experts.dct_filters`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_weight

from bilevel.problem import InnerProblem, Theta, check_finite, check_theta

from .experts import dct_filters
from .problems import observation

__all__ = ["LearnedFieldOfExperts", "initial_theta"]


def initial_theta(size: int = 5, log_weight: float = -3.0, log_smoothing: float = -4.0,
                  dtype: torch.dtype = torch.float64) -> Theta:
    """θ₀ with the ``size² − 1`` unit-norm DCT atoms as filters, every ``log w_k = log_weight``."""
    filters = dct_filters(size, dtype=dtype)
    return {"filters": filters.clone(),
            "log_weights": torch.full((filters.shape[0],), float(log_weight), dtype=dtype),
            "log_smoothing": torch.tensor(float(log_smoothing), dtype=dtype)}


def _unit(f: Tensor) -> Tensor:
    """``f̂_k = f_k/‖f_k‖₂`` per filter."""
    return f / f.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def _conv(x: Tensor, f: Tensor) -> Tensor:
    """``F x``: every filter on every channel, ``(B, C·K, H, W)`` (channel-major)."""
    B, C, H, W = x.shape
    pad = (f.shape[2] // 2, f.shape[3] // 2)
    return F.conv2d(x.reshape(B * C, 1, H, W), f, padding=pad).reshape(B, C * f.shape[0], H, W)


def _conv_t(u: Tensor, f: Tensor, like: Tensor) -> Tensor:
    """``Fᵀ u``, the adjoint of :func:`_conv` (a transposed convolution)."""
    B, C, H, W = like.shape
    pad = (f.shape[2] // 2, f.shape[3] // 2)
    return F.conv_transpose2d(u.reshape(B * C, f.shape[0], H, W), f, padding=pad).reshape(B, C, H, W)


def _filter_grad(x: Tensor, g: Tensor, f: Tensor) -> Tensor:
    """``∂/∂f ⟨g, F x⟩`` summed over the batch and channels (the weight gradient of conv2d)."""
    B, C, H, W = x.shape
    pad = (f.shape[2] // 2, f.shape[3] // 2)
    return conv2d_weight(x.reshape(B * C, 1, H, W), tuple(f.shape),
                         g.reshape(B * C, f.shape[0], H, W), padding=pad)


class LearnedFieldOfExperts(InnerProblem):
    """``x̂_b(θ) = argmin_x Φ_b(x; θ)`` of the module docstring, with closed-form products.

    With ``U = F x`` (all responses), ``S = √(U² + ε)``, ``ψ = U/S``, ``ψ' = ε/S³``:

    * ``∇ₓΦ = (2(x − y) + Fᵀ(w ⊙ ψ))/n``,  ``∇²ₓₓΦ v = (2v + Fᵀ(w ⊙ ψ' ⊙ Fv))/n``
    * ``g_k = ⟨∂_{f̂_k}∇ₓΦ, q⟩ = (w_k/n)·[x ⋆ (ψ'_k ⊙ (Fq)_k) + q ⋆ ψ_k]`` (``⋆``: the
      correlation that is conv2d's weight gradient; ``F`` uses the unit filters ``f̂``), and
      ``⟨∂_{f_k}∇ₓΦ, q⟩ = (g_k − f̂_k⟨f̂_k, g_k⟩)/‖f_k‖``
    * ``⟨∂_{θ_{w,k}}∇ₓΦ, q⟩ = (w_k/n) Σ ψ_k (Fq)_k``,
      ``⟨∂_{θ_s}∇ₓΦ, q⟩ = −(ε/2n) Σ_k w_k Σ (U/S³)_k (Fq)_k``

    ``μ = 2/n``; ``L = (2 + Σ_k w_k‖f̂_k‖₁²/√ε)/n``. ``batch[observation_key]`` holds the noisy
    images ``(B, C, H, W)``; ``n_filters`` and ``filter_size`` fix the shape θ must have.
    """

    theta_names = ("filters", "log_weights", "log_smoothing")

    def __init__(self, n_filters: int = 24, filter_size: int = 5, observation_key: str = "y"):
        if isinstance(n_filters, bool) or not isinstance(n_filters, int) or n_filters < 1:
            raise ValueError(f"n_filters must be an int >= 1, got {n_filters!r}")
        if (isinstance(filter_size, bool) or not isinstance(filter_size, int)
                or filter_size < 1 or filter_size % 2 == 0):
            raise ValueError(f"filter_size must be an odd int >= 1, got {filter_size!r}")
        self.n_filters, self.filter_size = n_filters, filter_size
        self.observation_key = observation_key

    def _y(self, batch: Mapping[str, Tensor]) -> Tensor:
        return observation(batch, self.observation_key)

    def check(self, x: Tensor, theta: Theta, batch: Any) -> None:
        check_theta(theta, self.theta_names)
        K, s = self.n_filters, self.filter_size
        for name, shape in (("filters", (K, 1, s, s)), ("log_weights", (K,)), ("log_smoothing", ())):
            if tuple(theta[name].shape) != shape and not (name == "log_smoothing"
                                                          and theta[name].numel() == 1):
                raise ValueError(f"theta[{name!r}] must have shape {shape}, got "
                                 f"{tuple(theta[name].shape)}")
        zero = (theta["filters"].flatten(1).norm(dim=1) == 0).nonzero().flatten().tolist()
        if zero:
            raise ValueError(f"theta['filters'] has all-zero filter(s) {zero[:5]}; each filter "
                             "enters through its direction f/‖f‖ and needs a nonzero norm")
        y = self._y(batch)
        check_finite(f"batch[{self.observation_key!r}]", y)
        check_finite("x", x)
        if x.shape != y.shape or x.dim() != 4:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected the (B, C, H, W) shape of "
                             f"batch[{self.observation_key!r}] {tuple(y.shape)}")

    def _parts(self, x: Tensor, theta: Theta):
        f = _unit(theta["filters"].to(x.dtype))
        u = _conv(x, f)
        eps = torch.exp(theta["log_smoothing"]).to(x.dtype).reshape(())
        s = torch.sqrt(u ** 2 + eps)
        w = torch.exp(theta["log_weights"]).to(x.dtype).repeat(x.shape[1]).view(1, -1, 1, 1)
        return f, u, s, eps, w

    def objective(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        _, _, s, _, w = self._parts(x, theta)
        data = ((x - self._y(batch)) ** 2).flatten(1).sum(1)
        return (data + (w * s).flatten(1).sum(1)) / x[0].numel()

    def init(self, theta: Theta, batch: Any) -> Tensor:
        return self._y(batch).detach().clone()

    def strong_convexity_constant(self, theta: Theta, batch: Any) -> float:
        return 2.0 / self._y(batch)[0].numel()

    def lipschitz(self, theta: Theta, batch: Any) -> float:
        eps = float(torch.exp(theta["log_smoothing"]))
        l1 = _unit(theta["filters"].detach()).flatten(1).abs().sum(1) ** 2
        spread = float((torch.exp(theta["log_weights"].detach()).to(l1.dtype) * l1).sum())
        return (2.0 + spread / math.sqrt(eps)) / self._y(batch)[0].numel()

    def grad(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        x = x.detach()
        f, u, s, _, w = self._parts(x, {k: v.detach() for k, v in theta.items()})
        return (2 * (x - self._y(batch)) + _conv_t(w * u / s, f, x)) / x[0].numel()

    def linearize(self, x: Tensor, theta: Theta, batch: Any):
        """``(v ↦ ∇²ₓₓΦ v, q ↦ (∇²_{xθ}Φ)ᵀq)`` with ``ψ``, ``ψ'`` computed once at ``(x, θ)``."""
        x = x.detach()
        f, u, s, eps, w = self._parts(x, {k: v.detach() for k, v in theta.items()})
        n, K = x[0].numel(), self.n_filters
        norms = theta["filters"].detach().to(x.dtype).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        psi, dpsi = u / s, eps / s ** 3
        curv = w * dpsi

        def hvp(v: Tensor) -> Tensor:
            return (2 * v + _conv_t(curv * _conv(v, f), f, x)) / n

        def mixed(q: Tensor) -> Dict[str, Tensor]:
            fq = _conv(q, f)
            per_k = lambda t: t.reshape(t.shape[0], -1, K, *t.shape[2:]).sum((0, 1, 3, 4))  # noqa: E731
            g = (_filter_grad(x, curv * fq, f) + _filter_grad(q, w * psi, f)) / n  # ∂/∂f̂
            d_f = (g - f * (g * f).sum((1, 2, 3), keepdim=True)) / norms  # chain rule of f/‖f‖
            d_w = per_k(w * psi * fq) / n
            d_s = -0.5 * (w * dpsi * u * fq).sum() / n
            return {"filters": d_f.to(theta["filters"].dtype),
                    "log_weights": d_w.to(theta["log_weights"].dtype),
                    "log_smoothing": d_s.reshape(theta["log_smoothing"].shape)
                    .to(theta["log_smoothing"].dtype)}

        return hvp, mixed

    def hvp(self, x: Tensor, theta: Theta, batch: Any, v: Tensor) -> Tensor:
        """``∇²ₓₓΦ v`` (class docstring)."""
        return self.linearize(x, theta, batch)[0](v)

    def mixed_vjp(self, x: Tensor, theta: Theta, batch: Any, q: Tensor) -> Dict[str, Tensor]:
        """``(∇²_{xθ}Φ)ᵀ q`` (class docstring)."""
        return self.linearize(x, theta, batch)[1](q)
