r"""Adaptive TV: smoothed TV with spatially varying weights predicted from the observation.

Per sample ``b`` (``n = C·H·W``, ``D`` the forward differences of :func:`recon.regularizers.
forward_differences`, ``ε = e^{θ_s}``):

.. math::

    Φ_b(x; θ) = \frac1n\Big(\|x − y_b\|^2 + \sum_{c,i} λ_i(θ, y_b)\, s_{ci}\Big),\qquad
    s_{ci} = \sqrt{|(Dx)_{ci}|^2 + ε},

.. math::

    λ(θ, y) = \exp\big(θ_w + ρ \tanh(g_θ(\hat y)/ρ)\big),\qquad
    \hat y = (y − \bar y)/\mathrm{sd}(y),

with ``g_θ`` a two-layer convolutional network on the standardised observation (``ȳ``,
``sd(y)`` the mean and standard deviation of each image over C, H, W; zero-padded "same"
convolutions, ``h = tanh(W₁ * ŷ/√(C k²) + b₁)``, ``g = W₂ * h/√(m k₂²)``, ``m`` hidden channels
of ``k×k`` kernels and an output layer of ``k₂×k₂`` kernels; one weight map ``λ`` shared by the
channels of ``x``). θ = ``{"log_weight": θ_w, "log_smoothing": θ_s, "conv1.weight": (m, C, k, k),
"conv1.bias": (m,), "conv2.weight": (1, m, k₂, k₂)}``: ``2 + m·C·k² + m + m·k₂²``
hyperparameters (410 for the defaults ``C = 1``, ``m = 8``, ``k = 7``, ``k₂ = 1``: a 7×7
receptive field; in float64 on the CPU a 1×1 output layer costs little, where a 5×5 one on 8
channels took 0.7 s per evaluation on 100 images of 64²). The fan-in factors ``1/√(C k²)``,
``1/√(m k₂²)`` make a unit change of any entry a change of comparable size in ``log λ``, so one
step size suits every entry. ``ρ`` bounds
``log λ − θ_w`` to ``(−ρ, ρ)``: the weights stay within a factor ``e^{±ρ}`` of ``e^{θ_w}``
whatever the network does, so ``∂λ/∂θ`` stays bounded and the inner conditioning is that of TV
with weights in ``[e^{θ_w−ρ}, e^{θ_w+ρ}]``.

``λ`` depends on ``y`` and θ only, not on ``x``: ``Φ_b`` is smoothed TV with fixed positive
pixel weights, strongly convex (``μ = 2/n`` from the data term) whatever θ is, so implicit
differentiation is valid. With ``conv2.weight = 0`` (the start of :func:`initial_theta`)
``λ ≡ e^{θ_w}`` and ``Φ_b`` is :class:`recon.problems.TVDenoising` at the same θ_w, θ_s.
Because ``ŷ`` is invariant to ``y ↦ a + c·y`` (``c > 0``), the solution is equivariant:
``x̂(a + c·y; θ_w + log c, θ_s + 2 log c) = a + c·x̂(y; θ)``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.problem import InnerProblem, Theta, check_finite, check_theta

from .problems import _differences_zero_padded, observation
from .regularizers import forward_differences, forward_differences_adjoint

__all__ = ["AdaptiveTVDenoising", "initial_theta", "adaptive_tv_size"]

#: the entries of θ that are the network's (the rest are the two TV scalars)
NETWORK_NAMES = ("conv1.weight", "conv1.bias", "conv2.weight")


def initial_theta(channels: int = 1, hidden: int = 8, kernel_size: int = 7,
                  out_kernel_size: int = 1, log_weight: float = -4.0, log_smoothing: float = -4.0,
                  seed: int = 0, dtype: torch.dtype = torch.float64) -> Theta:
    """θ₀ that reproduces plain TV at ``(log_weight, log_smoothing)``: ``conv1.weight`` drawn
    from ``N(0, 1)`` (a seeded generator; the fan-in factor of the module docstring scales it),
    ``conv1.bias = 0`` and ``conv2.weight = 0`` (so ``λ ≡ e^{log_weight}``)."""
    g = torch.Generator().manual_seed(int(seed))
    k, k2 = int(kernel_size), int(out_kernel_size)
    return {"log_weight": torch.tensor(float(log_weight), dtype=dtype),
            "log_smoothing": torch.tensor(float(log_smoothing), dtype=dtype),
            "conv1.weight": torch.randn(hidden, channels, k, k, generator=g, dtype=torch.float64).to(dtype),
            "conv1.bias": torch.zeros(hidden, dtype=dtype),
            "conv2.weight": torch.zeros(1, hidden, k2, k2, dtype=dtype)}


def adaptive_tv_size(inner: "AdaptiveTVDenoising") -> int:
    """``2 + m·C·k² + m + m·k₂²``: the number of hyperparameters of ``inner``."""
    m, c, k, k2 = inner.hidden, inner.channels, inner.kernel_size, inner.out_kernel_size
    return 2 + m * c * k * k + m + m * k2 * k2


def _standardised(y: Tensor) -> Tensor:
    """``(y − ȳ)/sd(y)`` per image over C, H, W (a constant image gives zeros)."""
    flat = y.flatten(1)
    mean = flat.mean(1).view(-1, 1, 1, 1)
    sd = flat.std(1, unbiased=False).view(-1, 1, 1, 1)
    return (y - mean) / sd.clamp_min(torch.finfo(y.dtype).tiny)


class AdaptiveTVDenoising(InnerProblem):
    """``x̂_b(θ) = argmin_x Φ_b(x; θ)`` of the module docstring, with closed-form products.

    With ``u = Dx``, ``s = √(|u|² + ε)`` (per channel and pixel), ``λ`` the weight map:

    * ``∇ₓΦ = (2(x − y) + Dᵀ(λ u/s))/n``
    * ``∇²ₓₓΦ v = (2v + Dᵀ(λ(Dv/s − u⟨u, Dv⟩/s³)))/n``
    * ``⟨∂_θ ∇ₓΦ, q⟩ = (1/n) Σ_i (∂λ_i/∂θ) r_i`` with ``r_i = Σ_c ⟨u_{ci}/s_{ci}, (Dq)_{ci}⟩``
      for ``θ_w`` and the network (one autograd vector-Jacobian product through ``g_θ``), and
      ``⟨∂_{θ_s}∇ₓΦ, q⟩ = −(ε/2n) Σ_{c,i} λ_i ⟨u_{ci}/s_{ci}³, (Dq)_{ci}⟩``

    ``μ = 2/n``; ``L = (2 + 8 max_i λ_i/√ε)/n`` (``‖D‖² ≤ 8``). ``batch[observation_key]``
    holds the noisy images ``(B, C, H, W)``; ``channels``, ``hidden`` (``m``), ``kernel_size``
    (``k``, odd) and ``out_kernel_size`` (``k₂``, odd) fix the shapes θ must have,
    ``log_range`` is ``ρ``.
    """

    theta_names = ("log_weight", "log_smoothing") + NETWORK_NAMES

    def __init__(self, channels: int = 1, hidden: int = 8, kernel_size: int = 7,
                 out_kernel_size: int = 1, log_range: float = 2.0, observation_key: str = "y"):
        for name, value in (("channels", channels), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name, value in (("kernel_size", kernel_size), ("out_kernel_size", out_kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
                raise ValueError(f"{name} must be an odd int >= 1, got {value!r}")
        if (isinstance(log_range, bool) or not isinstance(log_range, (int, float))
                or not math.isfinite(log_range) or log_range <= 0):
            raise ValueError(f"log_range must be a finite number > 0, got {log_range!r}")
        self.channels, self.hidden, self.kernel_size = channels, hidden, kernel_size
        self.out_kernel_size = out_kernel_size
        self.log_range = float(log_range)
        self.observation_key = observation_key
        self._cache: Optional[tuple] = None

    # ----- helpers ----------------------------------------------------------------------------
    def _y(self, batch: Mapping[str, Tensor]) -> Tensor:
        return observation(batch, self.observation_key, images=True)

    def shapes(self) -> Dict[str, tuple]:
        """The shape of every θ entry (``()`` for the two scalars)."""
        m, c, k, k2 = self.hidden, self.channels, self.kernel_size, self.out_kernel_size
        return {"log_weight": (), "log_smoothing": (), "conv1.weight": (m, c, k, k),
                "conv1.bias": (m,), "conv2.weight": (1, m, k2, k2)}

    def check(self, x: Tensor, theta: Theta, batch: Any) -> None:
        check_theta(theta, self.theta_names)
        for name, shape in self.shapes().items():
            got = tuple(theta[name].shape)
            if got != shape and not (shape == () and theta[name].numel() == 1):
                raise ValueError(f"theta[{name!r}] must have shape {shape}, got {got}")
        y = self._y(batch)
        check_finite(f"batch[{self.observation_key!r}]", y)
        check_finite("x", x)
        if y.shape[1] != self.channels:
            raise ValueError(f"batch[{self.observation_key!r}] has {y.shape[1]} channel(s), the "
                             f"problem was built with channels={self.channels}")
        if x.shape != y.shape:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected the (B, C, H, W) shape of "
                             f"batch[{self.observation_key!r}] {tuple(y.shape)}")

    def log_weights(self, theta: Theta, y: Tensor) -> Tensor:
        """``log λ = θ_w + ρ tanh(g_θ(ŷ)/ρ)``, shape ``(B, 1, H, W)``; differentiable in θ."""
        dt, k, k2 = y.dtype, self.kernel_size, self.out_kernel_size
        w1 = theta["conv1.weight"].to(dt) / math.sqrt(self.channels * k * k)
        w2 = theta["conv2.weight"].to(dt) / math.sqrt(self.hidden * k2 * k2)
        h = torch.tanh(F.conv2d(_standardised(y), w1, theta["conv1.bias"].to(dt), padding=k // 2))
        g = F.conv2d(h, w2, padding=k2 // 2)
        rho = self.log_range
        return theta["log_weight"].to(dt).reshape(()) + rho * torch.tanh(g / rho)

    def weights(self, theta: Theta, y: Tensor) -> Tensor:
        """``λ(θ, y)`` (module docstring), shape ``(B, 1, H, W)``, without a graph; the last map
        is kept and reused while θ and ``y`` are unchanged (the inner solver's many gradients)."""
        theta = {k: v.detach() for k, v in theta.items()}
        c = self._cache
        if (c is not None and c[0] is y and c[1] == y._version and c[2] == y.dtype
                and all(torch.equal(c[3][k], v) for k, v in theta.items())):
            return c[4]
        with torch.no_grad():
            lam = torch.exp(self.log_weights(theta, y))
        self._remember(theta, y, lam)
        return lam

    def _remember(self, theta: Theta, y: Tensor, lam: Tensor) -> None:
        self._cache = (y, y._version, y.dtype, {k: v.detach().clone() for k, v in theta.items()},
                       lam.detach())

    def _parts(self, x: Tensor, theta: Theta, y: Tensor):
        eps = torch.exp(theta["log_smoothing"].detach()).to(x.dtype).reshape(())
        uh, uv = forward_differences(x)
        s = torch.sqrt(uh ** 2 + uv ** 2 + eps)
        return self.weights(theta, y), eps, uh, uv, s

    # ----- InnerProblem -----------------------------------------------------------------------
    def objective(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        y = self._y(batch)
        if any(v.requires_grad for v in theta.values()):
            lam = torch.exp(self.log_weights(theta, y))   # differentiable in θ
        else:
            lam = self.weights(theta, y)                  # the solver's line searches: cached
        uh, uv = forward_differences(x)
        s = torch.sqrt(uh ** 2 + uv ** 2 + torch.exp(theta["log_smoothing"]).to(x.dtype))
        return (((x - y) ** 2).flatten(1).sum(1) + (lam * s).flatten(1).sum(1)) / x[0].numel()

    def init(self, theta: Theta, batch: Any) -> Tensor:
        return self._y(batch).detach().clone()

    def strong_convexity_constant(self, theta: Theta, batch: Any) -> float:
        return 2.0 / self._y(batch)[0].numel()

    def lipschitz(self, theta: Theta, batch: Any) -> float:
        """``L = (2 + 8 max_i λ_i/√ε)/n``, a bound on the Lipschitz constant of ``∇ₓΦ_b``."""
        y = self._y(batch)
        lam_max = float(self.weights(theta, y).max())
        eps = float(torch.exp(theta["log_smoothing"]))
        return (2.0 + 8.0 * lam_max / math.sqrt(eps)) / y[0].numel()

    def grad(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        y, x = self._y(batch), x.detach()
        lam, _, uh, uv, s = self._parts(x, theta, y)
        return (2 * (x - y) + forward_differences_adjoint(lam * uh / s, lam * uv / s)) / x[0].numel()

    def linearize(self, x: Tensor, theta: Theta, batch: Any):
        """``(v ↦ ∇²ₓₓΦ v, q ↦ (∇²_{xθ}Φ)ᵀq)`` at ``(x, θ)``: ``λ/s`` and ``λu/s^{3/2}``
        computed once; the network's part of the mixed product is one autograd
        vector-Jacobian product through a graph of ``log λ`` built at the first mixed product
        (the inner solver's Newton steps need only the Hessian products)."""
        y, x = self._y(batch), x.detach()
        n = x[0].numel()
        names = ("log_weight",) + NETWORK_NAMES
        graph: Dict[str, Any] = {}
        lam, eps, uh, uv, s = self._parts(x, theta, y)
        inv_s = 1.0 / s
        lam_s = lam * inv_s                         # λ/s
        r = inv_s.sqrt() * inv_s
        ah, av = uh * r, uv * r                     # u/s^{3/2}
        lah, lav = lam * ah, lam * av               # λu/s^{3/2}
        ch, cv = uh * inv_s, uv * inv_s             # u/s
        dh, dv = ch * inv_s * inv_s, cv * inv_s * inv_s   # u/s³

        def hvp(v: Tensor) -> Tensor:
            # p = λ(Dv/s − a⟨a, Dv⟩), a = u/s^{3/2}; then (2v + Dᵀp)/n
            vh, vv = _differences_zero_padded(v)
            c = ah * vh
            c.addcmul_(av, vv)
            ph = vh.mul_(lam_s).addcmul_(lah, c, value=-1.0)  # zero in the last column
            pv = vv.mul_(lam_s).addcmul_(lav, c, value=-1.0)  # zero in the last row
            return (2 * v + forward_differences_adjoint(ph, pv, last_is_zero=True)) / n

        def mixed(q: Tensor) -> Dict[str, Tensor]:
            qh, qv = forward_differences(q.detach())
            r_pix = (ch * qh + cv * qv).sum(1, keepdim=True) / n   # r_i/n, (B, 1, H, W)
            if not graph:
                graph["leaves"] = {k: theta[k].detach().clone().requires_grad_(True) for k in names}
                with torch.enable_grad():
                    graph["lam"] = torch.exp(self.log_weights(
                        {**graph["leaves"], "log_smoothing": theta["log_smoothing"].detach()}, y))
            with torch.enable_grad():
                grads = torch.autograd.grad((graph["lam"] * r_pix).sum(),
                                            [graph["leaves"][k] for k in names], retain_graph=True)
            out = {k: gk.reshape(theta[k].shape).to(theta[k].dtype) for k, gk in zip(names, grads)}
            g_s = -(eps / (2 * n)) * (lam * (dh * qh + dv * qv)).sum()
            out["log_smoothing"] = g_s.reshape(theta["log_smoothing"].shape).to(theta["log_smoothing"].dtype)
            return {k: out[k] for k in self.theta_names}

        return hvp, mixed

    def hvp(self, x: Tensor, theta: Theta, batch: Any, v: Tensor) -> Tensor:
        """``∇²ₓₓΦ v = (2v + Dᵀ(λ(Dv/s − u⟨u,Dv⟩/s³)))/n`` (class docstring)."""
        return self.linearize(x, theta, batch)[0](v)

    def mixed_vjp(self, x: Tensor, theta: Theta, batch: Any, q: Tensor) -> Dict[str, Tensor]:
        """``(∇²_{xθ}Φ)ᵀ q`` (class docstring)."""
        return self.linearize(x, theta, batch)[1](q)
