"""Variational reconstruction problems, as :class:`bilevel.InnerProblem` implementations.

:class:`TVDenoising` -- smoothed-TV denoising (reference §2.5 and §3.4), per sample ``b``:

.. math::

    Φ_b(x; θ) = \\frac1n\\|x_b − y_b\\|^2 + e^{θ_0}\\frac1n\\sum_{c,i,j} s_{cij},\\qquad
    s = \\sqrt{(D_h x_b)^2 + (D_v x_b)^2 + e^{θ_1}},\\quad n = C·H·W,

with θ = ``{"log_weight": θ₀, "log_smoothing": θ₁}`` (scalar tensors) and ``y`` the noisy image.
The means over C, H, W make θ mean the same whatever the image and batch size.

:class:`VariationalCT` -- smoothed-TV CT reconstruction (the CT inner problem of task-driven
variational reconstruction), per sample ``b``:

.. math::

    Φ_b(x; θ) = \\frac1m\\|A x_b − y_b\\|^2 + e^{θ_0}\\frac1n\\sum_{c,i,j} s_{cij},\\qquad
    m = C·n_{angles}·n_{det},

with ``A`` a :class:`recon.operators.RayTransform` and ``y`` the (noisy) sinogram.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

from bilevel.problem import InnerProblem, Theta, check_finite, check_theta

from .regularizers import forward_differences, forward_differences_adjoint, smoothed_tv

__all__ = ["TVDenoising", "VariationalCT"]


def _tv_parts(x: Tensor, theta: Theta):
    w = torch.exp(theta["log_weight"]).to(x.dtype)
    eps = torch.exp(theta["log_smoothing"]).to(x.dtype)
    uh, uv = forward_differences(x)
    s = torch.sqrt(uh ** 2 + uv ** 2 + eps)
    return w, eps, uh, uv, s


def _tv_linearization(x: Tensor, theta: Theta, n: int):
    """Closures ``(v ↦ c·v + ∇²ₓₓR v, q ↦ (∇²_{xθ}R)ᵀq)`` of ``R(x; θ) = (e^{θ₀}/n) Σ s`` at
    ``(x, θ)`` (``c = data_coef``, a diagonal data-term curvature, default 0).

    ``∇²ₓₓR v = (w/n) Dᵀ(Dv/s − u⟨u, Dv⟩/s³)``, ``⟨∂_{θ₀}∇ₓR, q⟩ = (w/n) Σ⟨u, Dq⟩/s``,
    ``⟨∂_{θ₁}∇ₓR, q⟩ = −(wε/2n) Σ⟨u, Dq⟩/s³`` (``w = e^{θ₀}``, ``ε = e^{θ₁}``, ``u = Dx``),
    with ``1/s`` and ``a = u/s^{3/2}`` computed once (``Dv/s − u⟨u,Dv⟩/s³ = Dv/s − a⟨a,Dv⟩``).
    """
    w, eps, uh, uv, s = _tv_parts(x.detach(), theta)
    inv_s = 1.0 / s
    r = inv_s.sqrt() * inv_s
    ah, av = uh * r, uv * r
    ch, cv = uh * inv_s, uv * inv_s          # u/s, for the θ₀ term
    dh, dv = uh * r * r, uv * r * r          # u/s³, for the θ₁ term
    shape0, shape1 = theta["log_weight"].shape, theta["log_smoothing"].shape
    dt0, dt1 = theta["log_weight"].dtype, theta["log_smoothing"].dtype

    k_tv = float(w) / n

    def hvp(v: Tensor, data_coef: float = 0.0) -> Tensor:
        # in place, few temporaries: p = Dv/s − a⟨a, Dv⟩, then data_coef·v + (w/n) Dᵀp
        vh, vv = _differences_zero_padded(v)
        c = ah * vh
        c.addcmul_(av, vv)
        ph = vh.mul_(inv_s).addcmul_(ah, c, value=-1.0)  # zero in the last column
        pv = vv.mul_(inv_s).addcmul_(av, c, value=-1.0)  # zero in the last row
        out = v * data_coef
        out.add_(ph, alpha=-k_tv).add_(pv, alpha=-k_tv)
        out[..., :, 1:].add_(ph[..., :, :-1], alpha=k_tv)
        out[..., 1:, :].add_(pv[..., :-1, :], alpha=k_tv)
        return out

    def mixed(q: Tensor) -> Dict[str, Tensor]:
        qh, qv = forward_differences(q)
        g0 = (w / n) * (ch * qh + cv * qv).sum()
        g1 = -(w * eps / (2 * n)) * (dh * qh + dv * qv).sum()
        return {"log_weight": g0.reshape(shape0).to(dt0), "log_smoothing": g1.reshape(shape1).to(dt1)}

    return hvp, mixed


def observation(batch: Any, key: str, images: bool = False) -> Tensor:
    """``batch[key]`` (the observation an inner problem reads), with a ``ValueError`` naming the
    key when ``batch`` is not a mapping that has it, and with ``images`` also when the entry is
    not a ``(B, C, H, W)`` tensor."""
    if not isinstance(batch, Mapping) or key not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"batch must be a mapping with key {key!r}; got {keys}")
    y = batch[key]
    if images and (not isinstance(y, Tensor) or y.dim() != 4):
        raise ValueError(f"batch[{key!r}] must be a (B, C, H, W) tensor, got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
    return y


def _check_scalar_theta_and_data(problem, x: Tensor, theta: Theta, batch: Any) -> Tensor:
    """The checks both problems share: known θ names, scalar θ values, finite data and ``x``.
    Returns the observation ``problem._y(batch)``."""
    check_theta(theta, problem.theta_names)
    for k, v in theta.items():
        if v.numel() != 1:
            raise ValueError(f"theta[{k!r}] must be a scalar tensor, got shape {tuple(v.shape)}")
    y = problem._y(batch)
    check_finite(f"batch[{problem.observation_key!r}]", y)
    check_finite("x", x)
    return y


def _differences_zero_padded(v: Tensor):
    """``(D_h v, D_v v)`` like :func:`forward_differences`, written into two fresh buffers."""
    vh = torch.zeros_like(v)
    vv = torch.zeros_like(v)
    torch.sub(v[..., :, 1:], v[..., :, :-1], out=vh[..., :, :-1])
    torch.sub(v[..., 1:, :], v[..., :-1, :], out=vv[..., :-1, :])
    return vh, vv


class TVDenoising(InnerProblem):
    """Smoothed-TV denoising ``x̂_b(θ) = argmin_x Φ_b(x; θ)`` (see module docstring).

    ``batch`` is a mapping with key ``observation_key`` (default ``"y"``, the noisy images,
    shape ``(B, C, H, W)``); other keys (e.g. ``"image"``, the clean target) are ignored here.

    Closed forms (``w = e^{θ₀}``, ``ε = e^{θ₁}``, ``u = Dx``, per sample, divided by ``n``):

    * ``∇ₓΦ = (2(x − y) + w Dᵀ(u/s))/n``
    * ``∇²ₓₓΦ v = (2v + w Dᵀ(Dv/s − u ⟨u, Dv⟩/s³))/n``  (``⟨u,Dv⟩`` pixelwise over h, v)
    * ``⟨∂_{θ₀}∇ₓΦ, q⟩ = w/n Σ ⟨u, Dq⟩/s``,   ``⟨∂_{θ₁}∇ₓΦ, q⟩ = −wε/(2n) Σ ⟨u, Dq⟩/s³``

    Strong convexity: ``μ = 2/n`` (from the data term; TV is convex). Gradient Lipschitz
    constant: ``L = (2 + 8w/√ε)/n`` (``‖D‖² ≤ 8``).
    """

    theta_names = ("log_weight", "log_smoothing")

    def __init__(self, observation_key: str = "y"):
        self.observation_key = observation_key

    # ----- helpers ----------------------------------------------------------------------------
    def _y(self, batch: Mapping[str, Tensor]) -> Tensor:
        return observation(batch, self.observation_key, images=True)

    @staticmethod
    def _n(x: Tensor) -> int:
        return x[0].numel()

    def check(self, x: Tensor, theta: Theta, batch: Any) -> None:
        y = _check_scalar_theta_and_data(self, x, theta, batch)
        if x.shape != y.shape:
            raise ValueError(f"x has shape {tuple(x.shape)} but batch[{self.observation_key!r}] "
                             f"has shape {tuple(y.shape)}")

    # ----- InnerProblem -----------------------------------------------------------------------
    def objective(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        y = self._y(batch)
        data = ((x - y) ** 2).flatten(1).mean(1)
        return data + smoothed_tv(x, theta["log_weight"], theta["log_smoothing"], "none")

    def init(self, theta: Theta, batch: Any) -> Tensor:
        return self._y(batch).detach().clone()

    def strong_convexity_constant(self, theta: Theta, batch: Any) -> Optional[float]:
        return 2.0 / self._n(self._y(batch))

    def lipschitz(self, theta: Theta, batch: Any) -> float:
        """``L = (2 + 8 e^{θ₀}/√e^{θ₁})/n``, a bound on the Lipschitz constant of ``∇ₓΦ_b``."""
        w = float(torch.exp(theta["log_weight"]))
        eps = float(torch.exp(theta["log_smoothing"]))
        return (2.0 + 8.0 * w / eps ** 0.5) / self._n(self._y(batch))

    def grad(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        y = self._y(batch)
        w, _, uh, uv, s = _tv_parts(x.detach(), theta)
        return (2 * (x.detach() - y) + w * forward_differences_adjoint(uh / s, uv / s)) / self._n(x)

    def linearize(self, x: Tensor, theta: Theta, batch: Any):
        """Products at a fixed ``(x, θ)`` with ``1/s`` and ``u/s^{3/2}`` computed once:
        ``Dv/s − u⟨u,Dv⟩/s³ = Dv·(1/s) − a⟨a, Dv⟩`` with ``a = u/s^{3/2}``."""
        n = self._n(x)
        tv_hvp, mixed = _tv_linearization(x, theta, n)

        def hvp(v: Tensor) -> Tensor:
            return tv_hvp(v, data_coef=2.0 / n)

        return hvp, mixed

    def hvp(self, x: Tensor, theta: Theta, batch: Any, v: Tensor) -> Tensor:
        """``∇²ₓₓΦ v`` (see the class docstring); one product of :meth:`linearize`."""
        return self.linearize(x, theta, batch)[0](v)

    def mixed_vjp(self, x: Tensor, theta: Theta, batch: Any, q: Tensor) -> Dict[str, Tensor]:
        """``(∇²_{xθ}Φ)ᵀ q`` (see the class docstring); one product of :meth:`linearize`."""
        return self.linearize(x, theta, batch)[1](q)


class VariationalCT(InnerProblem):
    """Smoothed-TV CT ``x̂_b(θ) = argmin_x ‖Ax − y_b‖²/m + e^{θ₀}·mean_{c,i,j} s`` (module docstring).

    ``operator`` is a ray transform ``A`` (``(B, C, H, W) → (B, C, n_angles, n_det)``, with
    ``A.adjoint``; the torch backend is exact in float64). ``batch`` is a mapping with the
    sinograms under ``observation_key`` (default ``"sinogram"``) and, for warm starts, an
    initial image under ``init_key`` (default ``"fbp"``; e.g. a learned LSPD output). Without
    that key the start is the scaled backprojection ``Aᵀy/‖A‖²``.

    Closed forms (``w = e^{θ₀}``, ``ε = e^{θ₁}``, ``u = Dx``, per sample; TV part as in
    :class:`TVDenoising`, divided by ``n = C·H·W``):

    * ``∇ₓΦ = 2Aᵀ(Ax − y)/m + (w/n) Dᵀ(u/s)``
    * ``∇²ₓₓΦ v = 2AᵀAv/m + (w/n) Dᵀ(Dv/s − u⟨u, Dv⟩/s³)``
    * mixed products: only the TV term depends on θ (see :class:`TVDenoising`).

    Gradient Lipschitz constant: ``L = 2‖A‖²/m + 8w/(n√ε)``. Sparse-view ``AᵀA`` is singular and
    TV is not strongly convex, so no strong-convexity constant is claimed (``None``).
    """

    theta_names = ("log_weight", "log_smoothing")

    def __init__(self, operator: Any, observation_key: str = "sinogram", init_key: str = "fbp"):
        if not (callable(operator) and hasattr(operator, "adjoint")
                and hasattr(operator, "domain_shape") and hasattr(operator, "range_shape")):
            raise TypeError("operator must be a ray transform with __call__, adjoint, domain_shape "
                            f"and range_shape, got {type(operator).__name__}")
        self.operator = operator
        self.observation_key = observation_key
        self.init_key = init_key

    def _y(self, batch: Mapping[str, Tensor]) -> Tensor:
        y = observation(batch, self.observation_key)
        want = tuple(self.operator.range_shape)
        if not isinstance(y, Tensor) or y.dim() != 4 or tuple(y.shape[-2:]) != want:
            raise ValueError(f"batch[{self.observation_key!r}] must be a (B, C, *{want}) sinogram "
                             "tensor matching the operator's geometry, got "
                             f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
        return y

    def check(self, x: Tensor, theta: Theta, batch: Any) -> None:
        y = _check_scalar_theta_and_data(self, x, theta, batch)
        want = (y.shape[0], y.shape[1], *self.operator.domain_shape)
        if tuple(x.shape) != want:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected {want} (batch and channels of "
                             f"batch[{self.observation_key!r}], the operator's image shape)")

    @staticmethod
    def _n(t: Tensor) -> int:
        return t[0].numel()

    def objective(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        y = self._y(batch)
        data = ((self.operator(x) - y) ** 2).flatten(1).sum(1) / self._n(y)
        return data + smoothed_tv(x, theta["log_weight"], theta["log_smoothing"], "none")

    def init(self, theta: Theta, batch: Any) -> Tensor:
        y = self._y(batch)
        if isinstance(batch, Mapping) and self.init_key in batch:
            x0 = batch[self.init_key]
            want = (y.shape[0], y.shape[1], *self.operator.domain_shape)
            if not isinstance(x0, Tensor) or tuple(x0.shape) != want:
                raise ValueError(f"batch[{self.init_key!r}] must have shape {want}, got "
                                 f"{tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__}")
            return x0.detach().to(y.dtype).clone()
        return (self.operator.adjoint(y) / self._norm_sq()).detach()

    def _norm_sq(self) -> float:
        return float(self.operator.norm()) ** 2

    def lipschitz(self, theta: Theta, batch: Any) -> float:
        """``L = 2‖A‖²/m + 8 e^{θ₀}/(n√e^{θ₁})``, a bound on the Lipschitz constant of ``∇ₓΦ_b``."""
        y = self._y(batch)
        w = float(torch.exp(theta["log_weight"]))
        eps = float(torch.exp(theta["log_smoothing"]))
        n = y.shape[1] * self.operator.domain_shape[0] * self.operator.domain_shape[1]
        return 2.0 * self._norm_sq() / self._n(y) + 8.0 * w / (n * eps ** 0.5)

    def grad(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        y = self._y(batch)
        x = x.detach()
        w, _, uh, uv, s = _tv_parts(x, theta)
        data = 2.0 * self.operator.adjoint(self.operator(x) - y) / self._n(y)
        return data + w * forward_differences_adjoint(uh / s, uv / s) / self._n(x)

    def linearize(self, x: Tensor, theta: Theta, batch: Any):
        """``(v ↦ ∇²ₓₓΦ v, q ↦ (∇²_{xθ}Φ)ᵀq)`` at ``(x, θ)``: ``2AᵀAv/m`` plus the TV products."""
        m = self._n(self._y(batch))
        tv_hvp, mixed = _tv_linearization(x, theta, self._n(x))
        A = self.operator

        def hvp(v: Tensor) -> Tensor:
            return (2.0 / m) * A.adjoint(A(v)) + tv_hvp(v)

        return hvp, mixed

    def hvp(self, x: Tensor, theta: Theta, batch: Any, v: Tensor) -> Tensor:
        """``∇²ₓₓΦ v = 2AᵀAv/m + (w/n)Dᵀ(Dv/s − u⟨u,Dv⟩/s³)``; one product of :meth:`linearize`."""
        return self.linearize(x, theta, batch)[0](v)

    def mixed_vjp(self, x: Tensor, theta: Theta, batch: Any, q: Tensor) -> Dict[str, Tensor]:
        """``(∇²_{xθ}Φ)ᵀ q`` (TV term only); one product of :meth:`linearize`."""
        return self.linearize(x, theta, batch)[1](q)
