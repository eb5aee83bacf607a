r"""Field-of-experts denoising: a smoothed ℓ¹ penalty on the responses of ``K`` fixed filters, each
with its own learned weight -- a bilevel problem with many hyperparameters (``K + 1``).

Per sample ``b`` (``n = C·H·W``, ``*`` a zero-padded "same" convolution, ``w_k = e^{θ_k}``,
``ε = e^{θ_s}``):

.. math::

    Φ_b(x; θ) = \frac1n\|x − y_b\|^2 + \frac1n \sum_{k=1}^{K} w_k \sum_{c,i,j}
                \sqrt{(f_k * x)_{cij}^2 + ε},

θ = ``{"log_weights": (K,) tensor, "log_smoothing": scalar}``. The default filters are the
``5×5`` DCT-II basis without its constant atom (``K = 24``, unit ℓ² norm), a fixed stand-in for
the learned filters of Roth & Black's field of experts; the weights are what bilevel learning
tunes, as in the experiments of the MAID paper (Salehi et al. 2024).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.problem import InnerProblem, Theta, check_finite, check_theta

from .problems import observation

__all__ = ["dct_filters", "FieldOfExpertsDenoising"]


def dct_filters(size: int = 5, dtype: torch.dtype = torch.float64) -> Tensor:
    """The ``size² − 1`` non-constant 2-D DCT-II atoms ``cos(π(2i+1)u/2s)·cos(π(2j+1)v/2s)``
    of a ``size×size`` patch, each of unit ℓ² norm; shape ``(size² − 1, 1, size, size)``."""
    if not isinstance(size, int) or size < 2:
        raise ValueError(f"size must be an int ≥ 2, got {size!r}")
    i = torch.arange(size, dtype=dtype)
    basis = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * size))  # (u, i)
    atoms = torch.einsum("ui,vj->uvij", basis, basis).reshape(size * size, size, size)[1:]
    atoms = atoms / atoms.flatten(1).norm(dim=1)[:, None, None]
    return atoms[:, None]


class FieldOfExpertsDenoising(InnerProblem):
    """``x̂_b(θ) = argmin_x Φ_b(x; θ)`` of the module docstring, with closed-form products.

    With ``U = F x`` (all filter responses, ``(B, K·C, H, W)``), ``S = sqrt(U² + ε)`` and ``Fᵀ`` the
    transposed convolution:

    * ``∇ₓΦ = (2(x − y) + Fᵀ(w ⊙ U/S))/n``
    * ``∇²ₓₓΦ v = (2v + Fᵀ(w ⊙ ε/S³ ⊙ Fv))/n``
    * ``⟨∂_{θ_k}∇ₓΦ, q⟩ = w_k/n Σ (U/S)_k (Fq)_k``,   ``⟨∂_{θ_s}∇ₓΦ, q⟩ = −ε/(2n) Σ_k w_k Σ (U/S³)_k (Fq)_k``

    Strong convexity ``μ = 2/n``; gradient Lipschitz constant ``L = (2 + Σ_k w_k‖f_k‖₁²/√ε)/n``.
    ``batch[observation_key]`` holds the noisy images ``(B, C, H, W)``.
    """

    theta_names = ("log_weights", "log_smoothing")

    def __init__(self, filters: Optional[Tensor] = None, observation_key: str = "y"):
        filters = dct_filters() if filters is None else filters
        if not isinstance(filters, Tensor) or filters.dim() != 4 or filters.shape[1] != 1:
            raise ValueError(f"filters must be a (K, 1, h, w) tensor, got "
                             f"{tuple(filters.shape) if isinstance(filters, Tensor) else type(filters).__name__}")
        if filters.shape[2] % 2 == 0 or filters.shape[3] % 2 == 0:
            raise ValueError(f"filters must have odd sizes (a centred 'same' convolution), got "
                             f"{tuple(filters.shape[2:])}")
        self.filters = filters
        self.observation_key = observation_key

    @property
    def n_filters(self) -> int:
        return self.filters.shape[0]

    # ----- helpers ----------------------------------------------------------------------------
    def _y(self, batch: Mapping[str, Tensor]) -> Tensor:
        return observation(batch, self.observation_key)

    def _conv(self, x: Tensor) -> Tensor:
        """``F x``: every filter on every channel, ``(B, C·K, H, W)`` (channel-major)."""
        B, C, H, W = x.shape
        f = self.filters.to(dtype=x.dtype, device=x.device)
        pad = (f.shape[2] // 2, f.shape[3] // 2)
        return F.conv2d(x.reshape(B * C, 1, H, W), f, padding=pad).reshape(B, C * self.n_filters, H, W)

    def _conv_t(self, u: Tensor, like: Tensor) -> Tensor:
        """``Fᵀ u`` (the adjoint of :meth:`_conv`)."""
        B, C, H, W = like.shape
        f = self.filters.to(dtype=like.dtype, device=like.device)
        pad = (f.shape[2] // 2, f.shape[3] // 2)
        out = F.conv_transpose2d(u.reshape(B * C, self.n_filters, H, W), f, padding=pad)
        return out.reshape(B, C, H, W)

    def _weights(self, theta: Theta, like: Tensor) -> Tensor:
        w = torch.exp(theta["log_weights"]).to(like.dtype)
        return w.repeat(like.shape[1] // self.n_filters).view(1, -1, 1, 1)

    def check(self, x: Tensor, theta: Theta, batch: Any) -> None:
        check_theta(theta, self.theta_names)
        if theta["log_weights"].shape != (self.n_filters,):
            raise ValueError(f"theta['log_weights'] must have shape ({self.n_filters},), got "
                             f"{tuple(theta['log_weights'].shape)}")
        y = self._y(batch)
        check_finite("x", x)
        if x.shape != y.shape or x.dim() != 4:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected the (B, C, H, W) shape of "
                             f"batch[{self.observation_key!r}] {tuple(y.shape)}")

    # ----- the problem ------------------------------------------------------------------------
    def objective(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        y = self._y(batch)
        u = self._conv(x)
        s = torch.sqrt(u ** 2 + torch.exp(theta["log_smoothing"]))
        reg = (self._weights(theta, u) * s).flatten(1).sum(1)
        return (((x - y) ** 2).flatten(1).sum(1) + reg) / x[0].numel()

    def init(self, theta: Theta, batch: Any) -> Tensor:
        return self._y(batch).detach().clone()

    def strong_convexity_constant(self, theta: Theta, batch: Any) -> float:
        return 2.0 / self._y(batch)[0].numel()

    def lipschitz(self, theta: Theta, batch: Any) -> float:
        eps = float(torch.exp(theta["log_smoothing"]))
        l1 = self.filters.flatten(1).abs().sum(1) ** 2
        spread = float((torch.exp(theta["log_weights"]).to(l1.dtype) * l1).sum())
        return (2.0 + spread / math.sqrt(eps)) / self._y(batch)[0].numel()

    def _parts(self, x: Tensor, theta: Theta):
        u = self._conv(x)
        eps = torch.exp(theta["log_smoothing"]).to(x.dtype)
        s = torch.sqrt(u ** 2 + eps)
        return u, s, eps, self._weights(theta, u)

    def grad(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        u, s, _, w = self._parts(x, theta)
        return (2 * (x - self._y(batch)) + self._conv_t(w * u / s, x)) / x[0].numel()

    def linearize(self, x: Tensor, theta: Theta, batch: Any):
        """Products at a fixed ``(x, θ)`` with ``U/S`` and ``ε/S³`` computed once."""
        u, s, eps, w = self._parts(x, theta)
        n = x[0].numel()
        curv = w * eps / s ** 3
        ratio, ratio3 = u / s, u / s ** 3
        K = self.n_filters

        def hvp(v: Tensor) -> Tensor:
            return (2 * v + self._conv_t(curv * self._conv(v), x)) / n

        def mixed(q: Tensor) -> Dict[str, Tensor]:
            fq = self._conv(q)
            per = lambda t: t.reshape(t.shape[0], -1, K, *t.shape[2:]).sum((0, 1, 3, 4))  # noqa: E731
            w_k = torch.exp(theta["log_weights"]).to(x.dtype)
            d_w = w_k * per(ratio * fq) / n
            d_s = -0.5 * eps * (w * ratio3 * fq).sum() / n
            return {"log_weights": d_w.to(theta["log_weights"].dtype),
                    "log_smoothing": d_s.reshape(theta["log_smoothing"].shape).to(theta["log_smoothing"].dtype)}

        return hvp, mixed

    def hvp(self, x: Tensor, theta: Theta, batch: Any, v: Tensor) -> Tensor:
        """``∇²ₓₓΦ v`` (class docstring)."""
        return self.linearize(x, theta, batch)[0](v)

    def mixed_vjp(self, x: Tensor, theta: Theta, batch: Any, q: Tensor) -> Dict[str, Tensor]:
        """``(∇²_{xθ}Φ)ᵀ q`` (class docstring)."""
        return self.linearize(x, theta, batch)[1](q)
