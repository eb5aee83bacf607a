"""Inexact implicit hypergradients with an a-posteriori error bound (:class:`AdaptiveInexact`).

Setting (per sample ``b``, stacked over the batch): ``x̃`` approximates ``x̂ = argmin Φ(·; θ)``
with inner residual ``r_b = ‖∇ₓΦ_b(x̃_b)‖``, and CG returns ``q̃`` with residual
``ρ_b = ‖A_b q̃_b − g_b‖`` where ``A = ∇²ₓₓΦ(x̃)``, ``B = ∇²_{xθ}Φ(x̃)`` (the ``N×d`` Jacobian of
``θ ↦ ∇ₓΦ``) and ``g = ∇ₓℓ(x̃)``. The computed hypergradient is

.. math::

    z = \\nabla_\\theta\\ell(\\tilde x) - B^\\top\\tilde q ,\\qquad
    \\nabla\\ell(\\theta) = \\nabla_\\theta\\ell(\\hat x) - B(\\hat x)^\\top A(\\hat x)^{-1}\\nabla_x\\ell(\\hat x).

If every ``Φ_b`` is ``μ``-strongly convex in ``x`` then ``e_b = ‖x̃_b − x̂_b‖ ≤ r_b/μ`` and
``‖A⁻¹‖ ≤ 1/μ``. Splitting ``z − ∇ℓ`` into the CG error, the shift of ``∇ₓℓ``, the shift of
``A`` and the shift of ``B`` between ``x̃`` and ``x̂`` (Ehrhardt & Roberts 2023; Salehi et al.
2024, with the a-posteriori residuals in place of the a-priori tolerances) gives

.. math::

    \\|z - \\nabla\\ell(\\theta)\\| \\le \\omega =
      L_{\\ell\\theta}\\,\\bar e
      + \\frac{\\|B\\|}{\\mu}\\Big(\\|\\rho\\| + L_\\ell\\,\\bar e
      + L_A\\,\\big\\|(e_b Q_b)_b\\big\\|_2\\Big)
      + L_B \\sum_b e_b Q_b ,
    \\qquad Q_b = \\frac{\\|g_b\\| + L_\\ell \\bar e}{\\mu},\\quad \\bar e = \\|(e_b)_b\\|_2 ,

with ``Q_b`` a bound on ``‖q̂_b‖``, ``L_ℓ`` / ``L_{ℓθ}`` the Lipschitz constants of ``x ↦ ∇ₓℓ`` /
``x ↦ ∇_θℓ``, ``L_A`` of ``x ↦ ∇²ₓₓΦ_b`` and ``L_B`` of ``x ↦ ∇²_{xθ}Φ_b`` (operator norms).
Expanded, ``ω`` has terms in ``ε`` (``e_b‖g_b‖``, ``ē``), in ``δ`` (``‖ρ‖``) and in ``ε²``
(``e_b ē L_ℓ``), each scaled by ``1/μ`` or ``1/μ²``. The upper loss itself is off by at most

.. math::

    |\\ell(\\tilde x) - \\ell(\\hat x)| \\le a = \\|g\\|\\,\\bar e + \\tfrac12 L_\\ell\\,\\bar e^2 .

``‖B‖`` is computed exactly (largest eigenvalue of the ``d×d`` Gram matrix ``BᵀB``, ``d`` double
backward passes) when ``d ≤ max_exact_dim``; the Lipschitz constants are either given or
estimated on the fly by secants between ``x̃`` and a probe point ``x̃_b − ∇ₓΦ_b(x̃_b)/μ`` (at
distance ``r_b/μ``, i.e. the radius of the ball known to hold ``x̂_b``), kept as running maxima
and multiplied by ``safety``. With given constants ``ω`` is a rigorous bound; with estimated
ones it is as good as the estimates.

For :class:`recon.problems.TVDenoising` the objective is normalised by ``n = C·H·W`` (means
over pixels), so its data term ``mean (x − y)²`` gives ``μ = 2/n`` -- the "``μ = 2`` from the data
term" of an unnormalised ``‖x − y‖²``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from .hypergrad import outer_gradients
from .linalg import HessianOperator, batch_norm, batched_cg
from .problem import (Hypergradient, HypergradientEstimator, InnerProblem, OuterLoss, Theta,
                      check_tolerance)

__all__ = ["AdaptiveInexact", "LIPSCHITZ_KEYS", "resolve_strong_convexity"]

#: names of the Lipschitz constants in the bound (see the module docstring)
LIPSCHITZ_KEYS = ("outer_x", "outer_theta", "hessian", "mixed")

MuSpec = Union[None, float, Callable[[Theta, Any], float]]


def resolve_strong_convexity(inner: InnerProblem, theta: Theta, batch: Any, mu: MuSpec = None,
                             who: str = "AdaptiveInexact") -> float:
    """The strong-convexity constant ``μ > 0`` of the inner problem at ``(θ, batch)``.

    ``mu`` (a number or a callable ``(θ, batch) ↦ μ``) takes precedence over
    :meth:`InnerProblem.strong_convexity_constant`. Raises ``ValueError`` when neither gives a
    finite positive number: the error bounds need ``∇²ₓₓΦ_b ⪰ μI`` with ``μ > 0``.
    """
    source = "mu"
    if mu is None:
        value = inner.strong_convexity_constant(theta, batch)
        source = f"{type(inner).__name__}.strong_convexity_constant(theta, batch)"
    elif callable(mu):
        value = mu(theta, batch)
    else:
        value = mu
    if value is None:
        raise ValueError(
            f"{who} needs the strong-convexity constant μ > 0 of the inner problem (∇²ₓₓΦ_b ⪰ μI) "
            f"for its error bounds, but {type(inner).__name__}.strong_convexity_constant returned "
            f"None and no mu was passed: pass mu=<float> (or a callable (theta, batch) -> float), "
            f"or implement strong_convexity_constant / set strong_convexity on the inner problem. "
            f"A non-convex or merely convex inner problem has no such μ and is not supported.")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{source} must be a real number, got {value!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{source} must be a finite positive number (strong convexity), got {value!r}")
    return value


def _flat(theta_like: Mapping[str, Tensor], names) -> Tensor:
    return torch.cat([theta_like[k].reshape(-1) for k in names]) if names else torch.zeros(0)


def _mixed_gram_norm(inner: InnerProblem, x: Tensor, theta: Theta, batch: Any, closed: bool,
                     max_exact_dim: int, power_steps: int = 20) -> Tuple[float, int]:
    """``‖∇²_{xθ}Φ(x; θ)‖₂`` (the ``N×d`` mixed Jacobian, stacked over the batch) and the number of
    products used.

    With ``s(u) = Bᵀu`` (the mixed VJP, linear in ``u``), column ``j`` of ``B`` is ``∇_u s_j``.
    ``d ≤ max_exact_dim``: all columns, then ``sqrt(λ_max(BᵀB))`` (exact). Larger ``d``: power
    iteration on ``BᵀB`` (a lower estimate, multiplied by ``1.05``).
    """
    names = list(theta)
    with torch.enable_grad():
        u = torch.zeros_like(x).requires_grad_(True)
        s = None
        if closed:
            out = inner.mixed_vjp(x.detach(), {k: v.detach() for k, v in theta.items()}, batch, u)
            if out is not None:
                s_try = _flat(out, names)
                if s_try.requires_grad:
                    s = s_try
        if s is None:  # autograd: s(u) = ∇_θ ⟨∇ₓΦ, u⟩
            xg = x.detach().requires_grad_(True)
            th = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
            (g,) = torch.autograd.grad(inner.objective(xg, th, batch).sum(), xg, create_graph=True)
            gs = torch.autograd.grad(g, [th[k] for k in names], u, create_graph=True, allow_unused=True)
            s = torch.cat([(torch.zeros_like(th[k]) if gi is None else gi).reshape(-1)
                           for k, gi in zip(names, gs)])
        d = s.numel()
        if d == 0 or not s.requires_grad:
            return 0.0, 0
        if d <= max_exact_dim:
            cols = []
            for j in range(d):
                (c,) = torch.autograd.grad(s[j], u, retain_graph=True, allow_unused=True)
                cols.append(torch.zeros_like(x) if c is None else c)
            C = torch.stack([c.reshape(-1) for c in cols], 1).double()
            gram = C.T @ C
            lam = float(torch.linalg.eigvalsh(gram).max().clamp_min(0))
            return math.sqrt(lam), d
        # power iteration on BᵀB: Bv = ∇_u ⟨s(u), v⟩, Bᵀw = s(w) (the mixed VJP at w)
        H = HessianOperator(inner, x, theta, batch, mode="auto" if closed else "autograd")
        v = torch.ones(d, dtype=s.dtype, device=s.device) / math.sqrt(d)
        lam = 0.0
        for _ in range(power_steps):
            (bv,) = torch.autograd.grad(s, u, v, retain_graph=True)
            w = _flat(H.mixed_vjp(bv.detach()), names)
            nw = float(w.norm())
            if nw == 0:
                return 0.0, 2 * power_steps
            lam = float((v * w).sum())
            v = w / nw
        return 1.05 * math.sqrt(max(lam, 0.0)), 2 * power_steps


class AdaptiveInexact(HypergradientEstimator):
    """The :class:`~bilevel.ImplicitCG` hypergradient at inner accuracy ``ε`` and CG accuracy ``δ``,
    with the a-posteriori error bound ``ω ≥ ‖z − ∇ℓ(θ)‖`` of the module docstring.

    ``estimator(inner, outer, θ, batch, x, tol)`` solves ``∇²ₓₓΦ(x) q = ∇ₓℓ(x)`` by batched CG to
    the per-sample residual ``tol`` (= ``δ``; warm-started from the previous ``q``), returns
    ``z = ∇_θℓ − (∇²_{xθ}Φ)ᵀq`` and sets :attr:`Hypergradient.error_bound` to ``ω``. The inner
    accuracy is read a posteriori from ``x`` itself (``r_b = ‖∇ₓΦ_b(x_b)‖``, or the
    ``inner_residual`` keyword when the caller has it). ``info`` holds ``loss_error_bound``
    (``a``, the bound on ``|ℓ(x̃) − ℓ(x̂)|``), ``mu``, ``lipschitz`` (constants used),
    ``terms`` (each summand of ``ω``), ``x_error_bound`` (``ē``), ``cg_residual``,
    ``inner_residual`` and ``bound_products`` (extra Hessian / mixed products spent on the bound,
    included in ``cg_iterations``).

    Parameters
    ----------
    mu: strong-convexity constant ``μ`` (number or ``(θ, batch) ↦ μ``); ``None`` asks
        :meth:`InnerProblem.strong_convexity_constant` and raises ``ValueError`` if that is ``None``.
    lipschitz: fixed constants by name (``"outer_x"`` = ``L_ℓ``, ``"outer_theta"`` = ``L_{ℓθ}``,
        ``"hessian"`` = ``L_A``, ``"mixed"`` = ``L_B``); the others are estimated.
    safety: factor ``≥ 1`` applied to estimated constants.
    max_iter, rtol, warm_start, hessian: as for :class:`~bilevel.ImplicitCG`.
    max_exact_dim: largest ``d = Σ numel(θ_k)`` for which ``‖B‖`` is computed exactly.
    """

    def __init__(self, mu: MuSpec = None, lipschitz: Optional[Mapping[str, float]] = None,
                 safety: float = 2.0, max_iter: int = 500, rtol: float = 0.0,
                 warm_start: bool = True, hessian: str = "auto", max_exact_dim: int = 64):
        if mu is not None and not callable(mu):
            check_tolerance("mu", mu)
        self.mu = mu
        self.fixed: Dict[str, float] = {}
        for k, v in dict(lipschitz or {}).items():
            if k not in LIPSCHITZ_KEYS:
                raise ValueError(f"lipschitz has unknown key {k!r}; expected some of {LIPSCHITZ_KEYS}")
            self.fixed[k] = check_tolerance(f"lipschitz[{k!r}]", v, allow_zero=True)
        try:
            safety_f = float(safety)
        except (TypeError, ValueError):
            raise TypeError(f"safety must be a real number, got {safety!r}") from None
        if not (math.isfinite(safety_f) and safety_f >= 1.0):
            raise ValueError(f"safety must be a finite number ≥ 1, got {safety!r}")
        self.safety = safety_f
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        if hessian not in ("auto", "autograd", "closed"):
            raise ValueError(f"hessian must be 'auto', 'autograd' or 'closed', got {hessian!r}")
        if not isinstance(max_exact_dim, int) or max_exact_dim < 1:
            raise ValueError(f"max_exact_dim must be a positive int, got {max_exact_dim!r}")
        self.max_iter = max_iter
        self.rtol = check_tolerance("rtol", rtol, allow_zero=True)
        self.warm_start, self.hessian, self.max_exact_dim = warm_start, hessian, max_exact_dim
        self._q: Optional[Tensor] = None
        self._est: Dict[str, float] = {}

    # ------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the CG warm start and the running Lipschitz estimates."""
        self._q = None
        self._est = {}

    @property
    def lipschitz_estimates(self) -> Dict[str, float]:
        """Running maxima of the secant estimates (before ``safety``), by name."""
        return dict(self._est)

    def lipschitz(self, key: str) -> float:
        """Constant used in the bound: the fixed one, else ``safety ×`` the running estimate."""
        if key in self.fixed:
            return self.fixed[key]
        return self.safety * self._est.get(key, 0.0)

    def _update(self, key: str, value: float) -> None:
        if key in self.fixed or not math.isfinite(value):
            return
        self._est[key] = max(self._est.get(key, 0.0), value)

    def _mu(self, inner, theta, batch) -> float:
        return resolve_strong_convexity(inner, theta, batch, self.mu, who=type(self).__name__)

    def _residual(self, inner, theta, batch, x, inner_residual) -> Tensor:
        if inner_residual is not None:
            r = torch.as_tensor(inner_residual, dtype=x.dtype, device=x.device).reshape(-1)
            if r.shape[0] != x.shape[0]:
                raise ValueError(f"inner_residual must have one entry per sample ({x.shape[0]}), "
                                 f"got shape {tuple(r.shape)}")
            return r
        return batch_norm(inner.grad(x, theta, batch)).detach()

    # ------------------------------------------------------------------------------------------
    def loss_error_bound(self, inner: InnerProblem, outer: OuterLoss, theta: Theta, batch: Any,
                         x: Tensor, inner_residual: Optional[Tensor] = None) -> Tuple[float, float]:
        """``(ℓ(x̃, θ), a)`` with ``a = ‖∇ₓℓ(x̃)‖ ē + L_ℓ ē²/2 ≥ |ℓ(x̃) − ℓ(x̂)|``, ``ē = ‖(r_b/μ)_b‖``.

        Uses the current ``L_ℓ`` (fixed, or the running estimate, which the hypergradient calls
        update; before the first estimate it is probed here once).
        """
        mu = self._mu(inner, theta, batch)
        r = self._residual(inner, theta, batch, x, inner_residual)
        e_bar = float(r.double().norm()) / mu
        loss, gx, _, _ = outer_gradients(outer, x, theta, batch)
        if "outer_x" not in self.fixed and "outer_x" not in self._est and e_bar > 0:
            xp = x.detach() - self._probe_step(inner, theta, batch, x, r, mu)
            _, gxp, _, _ = outer_gradients(outer, xp, theta, batch)
            self._update("outer_x", float((gxp - gx).double().norm() / (xp - x).double().norm().clamp_min(1e-300)))
        L = self.lipschitz("outer_x")
        return float(loss), float(gx.double().norm()) * e_bar + 0.5 * L * e_bar ** 2

    def _probe_step(self, inner, theta, batch, x, r, mu) -> Tensor:
        """Per-sample displacement of length ``max(r_b/μ, h_min)`` along ``∇ₓΦ_b(x̃_b)``."""
        g = inner.grad(x, theta, batch)
        gn = batch_norm(g)
        finfo = torch.finfo(x.dtype)
        xn = batch_norm(x.detach())
        h = torch.maximum(r.to(x.dtype) / mu, math.sqrt(finfo.eps) * (1.0 + xn))
        direction = torch.where(gn.view((-1,) + (1,) * (x.dim() - 1)) > 0,
                                g / gn.clamp_min(finfo.tiny).view((-1,) + (1,) * (x.dim() - 1)),
                                torch.ones_like(g) / math.sqrt(g[0].numel()))
        return h.view((-1,) + (1,) * (x.dim() - 1)) * direction

    def __call__(self, inner: InnerProblem, outer: OuterLoss, theta: Theta, batch: Any,
                 x: Tensor, tol: float, inner_residual: Optional[Tensor] = None) -> Hypergradient:
        tol = check_tolerance("tol", tol, allow_zero=True)
        inner.check(x, theta, batch)
        mu = self._mu(inner, theta, batch)
        x = x.detach()
        theta = {k: v.detach() for k, v in theta.items()}
        r = self._residual(inner, theta, batch, x, inner_residual)
        loss, gx, gth, gp = outer_gradients(outer, x, theta, batch)
        H = HessianOperator(inner, x, theta, batch, mode=self.hessian)
        q0 = self._q if (self.warm_start and self._q is not None and self._q.shape == gx.shape
                         and self._q.dtype == gx.dtype) else None
        cg = batched_cg(H.hvp, gx, x0=q0, tol=tol, rtol=self.rtol, max_iter=self.max_iter)
        q = cg.x.detach()
        self._q = q
        mixed = H.mixed_vjp(q)
        names = list(gth)
        grad = {k: gth[k] - mixed[k] for k in names}
        products = 0

        # ---- Lipschitz estimates by a secant to the probe point ------------------------------
        view = (-1,) + (1,) * (x.dim() - 1)
        need = [k for k in LIPSCHITZ_KEYS if k not in self.fixed]
        if need:
            step = self._probe_step(inner, theta, batch, x, r, mu)
            xp = x - step
            dxn = batch_norm(step).double()
            dx_all = float(dxn.norm())
            _, gxp, gthp, _ = outer_gradients(outer, xp, theta, batch)
            self._update("outer_x", float((gxp - gx).double().norm()) / dx_all)
            dth = math.sqrt(sum(float((gthp[k] - gth[k]).double().pow(2).sum()) for k in names))
            self._update("outer_theta", dth / dx_all)
            Hp = HessianOperator(inner, xp, theta, batch, mode=self.hessian)
            qn = batch_norm(q).double()
            if bool((qn > 0).any()):
                dA = batch_norm(Hp.hvp(q) - H.hvp(q)).double()
                ok = qn > 0
                self._update("hessian", float((dA[ok] / (dxn[ok] * qn[ok])).max()))
                mixed_p = Hp.mixed_vjp(q)
                dB = math.sqrt(sum(float((mixed_p[k] - mixed[k]).double().pow(2).sum()) for k in names))
                self._update("mixed", dB / max(float((dxn * qn).sum()), 1e-300))
                products += 3

        # ---- the bound -----------------------------------------------------------------------
        B_norm, nprod = _mixed_gram_norm(inner, x, theta, batch, closed=H.closed,
                                         max_exact_dim=self.max_exact_dim)
        products += nprod
        e = r.double() / mu
        e_bar = float(e.norm())
        rho = float(cg.residual.double().norm())
        gn = batch_norm(gx).double()
        L_l, L_lt = self.lipschitz("outer_x"), self.lipschitz("outer_theta")
        L_A, L_B = self.lipschitz("hessian"), self.lipschitz("mixed")
        Q = (gn + L_l * e_bar) / mu
        terms = {
            "outer_theta": L_lt * e_bar,
            "cg": B_norm * rho / mu,
            "outer_x": B_norm * L_l * e_bar / mu,
            "hessian": B_norm * L_A * float((e * Q).norm()) / mu,
            "mixed": L_B * float((e * Q).sum()),
        }
        omega = float(sum(terms.values()))
        loss_bound = float(gn.norm()) * e_bar + 0.5 * L_l * e_bar ** 2
        return Hypergradient(
            loss=float(loss), theta_grad=grad, param_grads=gp,
            cg_iterations=cg.max_iterations + products, cg_converged=cg.all_converged,
            error_bound=omega,
            info={"loss_error_bound": loss_bound, "mu": mu, "x_error_bound": e_bar,
                  "mixed_norm": B_norm, "terms": terms,
                  "lipschitz": {k: self.lipschitz(k) for k in LIPSCHITZ_KEYS},
                  "cg_residual": cg.residual.detach(), "inner_residual": r,
                  "cg_iterations_per_sample": cg.iterations, "bound_products": products,
                  "hvp_count": H.n_hvp})
