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
(``e_b ē L_ℓ``), each scaled by ``1/μ`` or ``1/μ²``.

The upper loss is bounded by a dual-weighted residual: with ``Ā = ∫₀¹A(x̂ + t(x̃ − x̂))dt``
(``x̃ − x̂ = Ā⁻¹∇ₓΦ(x̃)`` exactly, ``‖Ā_b − A_b‖ ≤ L_A e_b/2``) and the CG adjoint ``q̃``,

.. math::

    |\\ell(\\tilde x) - \\ell(\\hat x)| \\le a =
      |\\langle \\tilde q, \\nabla_x\\Phi(\\tilde x)\\rangle|
      + \\sum_b r_b\\Big(\\frac{\\rho_b}{\\mu} + \\frac{L_A e_b}{2\\mu}\\big(\\|\\tilde q_b\\|
      + \\frac{\\rho_b}{\\mu}\\big)\\Big) + \\tfrac12 L_\\ell\\,\\bar e^2 ,

a product of the two residuals to leading order (much smaller than the first-order
``a₁ = Σ_b ‖g_b‖ e_b + L_ℓ ē²/2`` of :meth:`AdaptiveInexact.loss_error_bound`, which needs no
adjoint).

``‖B‖`` is computed exactly (largest eigenvalue of the ``d×d`` Gram matrix ``BᵀB``, ``d`` double
backward passes) when ``d ≤ max_exact_dim``; the Lipschitz constants are either given or
estimated on the fly by secants between ``x̃`` and a probe point ``x̃_b − ∇ₓΦ_b(x̃_b)/μ`` (at
distance ``r_b/μ``, i.e. the radius of the ball known to hold ``x̂_b``; refreshed at every
``probe_every``-th bound), kept as running maxima and multiplied by ``safety``. With given
constants (and exact arithmetic) ``ω`` and ``a`` are rigorous bounds; with estimated ones they
are as good as the estimates -- on random smoothed-TV instances (``tests/test_maid.py``, 400
hypothesis examples in a stress run) ``ω`` was 2--200× and ``a`` 1.00003--1.2× the true error,
never below it. Use float64: the bounds read residuals that float32 cannot resolve.

``μ`` follows the problem's own normalisation: an objective written as a mean over ``n``
entries has a ``μ`` that is ``n`` times smaller than the same objective written as a sum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from . import distributed as dist_
from .hypergrad import outer_gradients
from .implicit import implicit_vjp, relative_cg_tolerance
from .linalg import HessianOperator, batch_norm, cg_iteration_cap, check_cg_cap
from .problem import (ErrorBound, Hypergradient, HypergradientEstimator, InnerProblem, OuterLoss,
                      Theta, check_tolerance)

__all__ = ["AdaptiveInexact", "LIPSCHITZ_KEYS", "NotStronglyConvexError", "resolve_strong_convexity"]


class NotStronglyConvexError(ValueError):
    """The inner problem reports no strong-convexity constant ``μ > 0`` at this ``(θ, batch)``."""

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
        raise NotStronglyConvexError(f"{source} must be a finite positive number (strong "
                                     f"convexity), got {value!r}")
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
            gram = dist_.all_reduce(C.T @ C)  # BᵀB = Σ_r B_rᵀB_r over the ranks' shards
            lam = float(torch.linalg.eigvalsh(gram).max().clamp_min(0))
            return math.sqrt(lam), d
        # power iteration on BᵀB: Bv = ∇_u ⟨s(u), v⟩, Bᵀw = s(w) (the mixed VJP at w)
        H = HessianOperator(inner, x, theta, batch, mode="auto" if closed else "autograd")
        v = torch.ones(d, dtype=s.dtype, device=s.device) / math.sqrt(d)
        lam = 0.0
        for _ in range(power_steps):
            (bv,) = torch.autograd.grad(s, u, v, retain_graph=True)
            w = dist_.all_reduce(_flat(H.mixed_vjp(bv.detach()), names))
            nw = float(w.norm())
            if nw == 0:
                return 0.0, 2 * power_steps
            lam = float((v * w).sum())
            v = w / nw
        return 1.05 * math.sqrt(max(lam, 0.0)), 2 * power_steps



@dataclass
class _PendingProbe:
    """Quantities at ``(θ, x̃)`` kept by a call with ``error_bound=False`` so that
    :meth:`AdaptiveInexact.complete` can refresh the Lipschitz estimates without recomputing."""

    outer: Any
    residual_vector: Tensor
    gx: Tensor
    gtheta: Theta
    q: Tensor
    hessian: HessianOperator
    mixed: Theta


class AdaptiveInexact(HypergradientEstimator):
    """The :class:`~bilevel.ImplicitCG` hypergradient at inner accuracy ``ε`` and CG accuracy ``δ``,
    with the a-posteriori error bounds ``ω ≥ ‖z − ∇ℓ(θ)‖`` and ``a ≥ |ℓ(x̃) − ℓ(x̂)|`` of the
    module docstring.

    ``estimator(inner, outer, θ, batch, x, tol)`` solves ``∇²ₓₓΦ(x) q = ∇ₓℓ(x)`` by batched CG to
    the per-sample residual ``tol`` (= ``δ``; warm-started from the previous ``q``), returns
    ``z = ∇_θℓ − (∇²_{xθ}Φ)ᵀq`` and sets :attr:`Hypergradient.error_bound` to ``ω``. The inner
    accuracy is read a posteriori from ``x`` itself (``r_b = ‖∇ₓΦ_b(x_b)‖``), so ``x`` may come from
    any solver and any tolerance. :attr:`Hypergradient.bound` is the typed
    :class:`~bilevel.problem.ErrorBound` record: ``loss`` (``a``), ``grad`` (``ω``), ``mu``,
    ``x_error`` (``ē``), ``mixed_norm`` (``‖B‖``), ``terms`` (each summand of ``ω``),
    ``lipschitz`` (the constants used), per-sample residuals and ``products`` (gradient, Hessian
    and mixed products spent on the bounds; they are included in ``cg_iterations`` so that cost
    counts stay honest).

    With ``error_bound=False`` only ``z``, ``ℓ`` and ``a`` are computed (no ``‖B‖``, no new
    Lipschitz probe; ``error_bound`` is ``None``); :meth:`complete` adds ``ω`` later. MAID uses
    this for trial points of its line search.

    Parameters
    ----------
    mu: strong-convexity constant ``μ`` (number or ``(θ, batch) ↦ μ``); ``None`` asks
        :meth:`InnerProblem.strong_convexity_constant` and raises ``ValueError`` if that is ``None``.
    lipschitz: fixed constants by name (``"outer_x"`` = ``L_ℓ``, ``"outer_theta"`` = ``L_{ℓθ}``,
        ``"hessian"`` = ``L_A``, ``"mixed"`` = ``L_B``); the others are estimated.
    safety: factor ``≥ 1`` applied to estimated constants.
    max_iter, rtol, warm_start, hessian: as for :class:`~bilevel.ImplicitCG` (``max_iter=None``:
        ``max(500, n)``).
    max_exact_dim: largest ``d = Σ numel(θ_k)`` for which ``‖B‖`` is computed exactly.
    probe_every: refresh the Lipschitz estimates at every ``probe_every``-th bound (always at
        the first); larger values save three products per skipped probe.
    """

    def __init__(self, mu: MuSpec = None, lipschitz: Optional[Mapping[str, float]] = None,
                 safety: float = 2.0, max_iter: Optional[int] = None, rtol: float = 0.0,
                 warm_start: bool = True, hessian: str = "auto", max_exact_dim: int = 64,
                 probe_every: int = 5):
        if mu is not None and not callable(mu):
            check_tolerance("mu", mu)
        self.mu = mu
        if lipschitz is not None and not isinstance(lipschitz, Mapping):
            raise TypeError(f"lipschitz must be a dict of constants by name, got {type(lipschitz).__name__}")
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
        check_cg_cap(max_iter)
        if hessian not in ("auto", "autograd", "closed"):
            raise ValueError(f"hessian must be 'auto', 'autograd' or 'closed', got {hessian!r}")
        if not isinstance(max_exact_dim, int) or max_exact_dim < 1:
            raise ValueError(f"max_exact_dim must be a positive int, got {max_exact_dim!r}")
        if not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"probe_every must be a positive int, got {probe_every!r}")
        self.probe_every = probe_every
        self._since_probe = 0
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
        self._since_probe = 0

    def warm_state(self) -> Dict[str, Any]:
        """CG's last ``q`` and the running Lipschitz estimates (checkpointed by the outer loops)."""
        return {"q": self._q, "lipschitz": dict(self._est), "since_probe": self._since_probe}

    def load_warm_state(self, state: Mapping[str, Any]) -> None:
        self._q = state.get("q")
        self._est = {k: float(v) for k, v in dict(state.get("lipschitz") or {}).items()}
        self._since_probe = int(state.get("since_probe", 0))

    @property
    def lipschitz_estimates(self) -> Dict[str, float]:
        """Running maxima of the secant estimates (before ``safety``), by name."""
        return dict(self._est)

    def lipschitz(self, key: str) -> float:
        """Constant used in the bounds: the fixed one, else ``safety ×`` the running estimate."""
        if key not in LIPSCHITZ_KEYS:
            raise ValueError(f"key must be one of {LIPSCHITZ_KEYS}, got {key!r}")
        if key in self.fixed:
            return self.fixed[key]
        return self.safety * self._est.get(key, 0.0)

    def _update(self, key: str, value: float) -> None:
        if key in self.fixed or not math.isfinite(value):
            return
        self._est[key] = max(self._est.get(key, 0.0), value)

    def _needs_probe(self) -> bool:
        return any(k not in self.fixed and k not in self._est for k in LIPSCHITZ_KEYS)

    def _mu(self, inner, theta, batch) -> float:
        mu = resolve_strong_convexity(inner, theta, batch, self.mu, who=type(self).__name__)
        return dist_.all_reduce(mu, "min")  # valid for every shard

    # ------------------------------------------------------------------------------------------
    def loss_error_bound(self, inner: InnerProblem, outer: OuterLoss, theta: Theta, batch: Any,
                         x: Tensor) -> Tuple[float, float]:
        """``(ℓ(x̃, θ), a₁)`` with the first-order bound ``a₁ = Σ_b ‖(∇ₓℓ)_b‖ r_b/μ + L_ℓ ē²/2``.

        ``a₁ ≥ |ℓ(x̃) − ℓ(x̂)|`` needs no adjoint solve (but is much looser than the
        dual-weighted ``a`` that a hypergradient call reports). ``L_ℓ`` is the fixed constant or
        the running estimate (probed here once if there is none yet).
        """
        mu = self._mu(inner, theta, batch)
        x = x.detach()
        rv = inner.grad(x, theta, batch)
        r = batch_norm(rv).double()
        loss, gx, _, _ = outer_gradients(outer, x, theta, batch)
        loss, r_sq, first = dist_.all_reduce_floats(
            [float(loss), float(r.pow(2).sum()), float((batch_norm(gx).double() * r).sum()) / mu])
        e_bar = math.sqrt(r_sq) / mu
        if "outer_x" not in self.fixed and "outer_x" not in self._est:
            step = self._probe_step(x, rv, r, mu)
            _, gxp, _, _ = outer_gradients(outer, x - step, theta, batch)
            num, den = dist_.all_reduce_floats([float((gxp - gx).double().pow(2).sum()),
                                                float(step.double().pow(2).sum())])
            self._update("outer_x", math.sqrt(num) / max(math.sqrt(den), 1e-300))
        return loss, first + 0.5 * self.lipschitz("outer_x") * e_bar ** 2

    @staticmethod
    def _probe_step(x: Tensor, rv: Tensor, r: Tensor, mu: float) -> Tensor:
        """Per-sample displacement of length ``h_b = max(r_b/μ, √eps_mach (1 + ‖x̃_b‖))`` along
        ``∇ₓΦ_b(x̃_b)`` (a unit vector when that is zero): the probe ``x̃ − step`` lies at the
        radius of the ball known to contain ``x̂``."""
        view = (-1,) + (1,) * (x.dim() - 1)
        finfo = torch.finfo(x.dtype)
        h = torch.maximum(r.to(x.dtype) / mu, math.sqrt(finfo.eps) * (1.0 + batch_norm(x)))
        rn = batch_norm(rv)
        direction = torch.where(rn.view(view) > 0, rv / rn.clamp_min(finfo.tiny).view(view),
                                torch.ones_like(rv) / math.sqrt(rv[0].numel()))
        return h.view(view) * direction

    def _probe(self, inner, theta, batch, x, r, mu, p: _PendingProbe) -> int:
        """Secant estimates of the Lipschitz constants between ``x̃`` and the probe point;
        returns the number of Hessian / mixed products used."""
        outer, rv, gx, gth, q, H, mixed = (p.outer, p.residual_vector, p.gx, p.gtheta, p.q,
                                           p.hessian, p.mixed)
        names = list(gth)
        step = self._probe_step(x, rv, r, mu)
        xp = x - step
        dxn = batch_norm(step).double()
        _, gxp, gthp, _ = outer_gradients(outer, xp, theta, batch)
        qn = batch_norm(q).double()
        ok = qn > 0
        # θ-gradients and mixed products are sums over the ranks' shards: reduce the differences
        dgth, (dx_sq, dgx_sq, any_q) = dist_.all_reduce_dict(
            {k: gthp[k] - gth[k] for k in names}, "sum",
            extra=[float(dxn.pow(2).sum()), float((gxp - gx).double().pow(2).sum()), float(ok.any())])
        dx_all = max(math.sqrt(dx_sq), 1e-300)
        self._update("outer_x", math.sqrt(dgx_sq) / dx_all)
        dth = math.sqrt(sum(float(dgth[k].double().pow(2).sum()) for k in names))
        self._update("outer_theta", dth / dx_all)
        if not any_q:
            return 0
        Hp = HessianOperator(inner, xp, theta, batch, mode=self.hessian)
        dA = batch_norm(Hp.hvp(q) - H.hvp(q)).double()
        ratio = float((dA[ok] / (dxn[ok] * qn[ok])).max()) if bool(ok.any()) else 0.0
        self._update("hessian", dist_.all_reduce(ratio, "max"))
        mixed_p = Hp.mixed_vjp(q)
        dmix, (den,) = dist_.all_reduce_dict({k: mixed_p[k] - mixed[k] for k in names}, "sum",
                                             extra=[float((dxn * qn).sum())])
        dB = math.sqrt(sum(float(dmix[k].double().pow(2).sum()) for k in names))
        self._update("mixed", dB / max(den, 1e-300))
        return 3

    def _dwr_bound(self, r: Tensor, rv: Tensor, q: Tensor, rho: Tensor, mu: float) -> float:
        e = r / mu
        L_A, L_l = self.lipschitz("hessian"), self.lipschitz("outer_x")
        qn = batch_norm(q).double()
        e_sq, lead, rest = dist_.all_reduce_floats([
            float(e.pow(2).sum()), float((q.double() * rv.double()).sum()),
            float((r * (rho / mu + L_A * e / (2 * mu) * (qn + rho / mu))).sum())])
        return abs(lead) + rest + 0.5 * L_l * e_sq

    def __call__(self, inner: InnerProblem, outer: OuterLoss, theta: Theta, batch: Any,
                 x: Tensor, tol: float, relative: bool = False,
                 error_bound: bool = True) -> Hypergradient:
        tol = check_tolerance("tol", tol, allow_zero=True)
        inner.check(x, theta, batch)
        mu = self._mu(inner, theta, batch)
        x = x.detach()
        theta = {k: v.detach() for k, v in theta.items()}
        rv = inner.grad(x, theta, batch).detach()
        r = batch_norm(rv).double()
        loss, gx, gth, gp = outer_gradients(outer, x, theta, batch)
        H = HessianOperator(inner, x, theta, batch, mode=self.hessian)
        abs_tol = relative_cg_tolerance(gx, tol) if relative else tol
        res = implicit_vjp(H.hvp, H.mixed_vjp, gx, gth, abs_tol, q0=self._warm(gx),
                           max_iter=cg_iteration_cap(self.max_iter, gx, 500), rtol=self.rtol)
        q, cg = res.q, res.cg
        self._q = q
        mixed = res.mixed
        products = 1  # the inner gradient at x̃ (the residual vector)
        pending = _PendingProbe(outer, rv, gx, gth, q, H, mixed)
        if self._needs_probe():  # first call: the loss bound below needs L_A and L_ℓ already
            products += self._probe(inner, theta, batch, x, r, mu, pending)
            pending = None
        rho = cg.residual.detach().double()
        bound = ErrorBound(loss=self._dwr_bound(r, rv, q, rho, mu), mu=mu,
                           x_error=dist_.global_norm(float((r / mu).pow(2).sum())),
                           inner_residual=r, cg_residual=rho,
                           outer_x_grad_norm=batch_norm(gx).double(), products=products,
                           hessian_closed=H.closed, pending=pending)
        hg = Hypergradient(loss=float(loss), theta_grad=res.grad, param_grads=gp,
                           cg_iterations=cg.max_iterations + products, cg_converged=cg.all_converged,
                           error_bound=None, bound=bound, adjoint=q,
                           info={"cg_iterations_per_sample": cg.iterations, "hvp_count": H.n_hvp})
        dist_.reduce_hypergradient(hg)
        if error_bound:
            self.complete(inner, theta, batch, x, hg)
        return hg

    def complete(self, inner: InnerProblem, theta: Theta, batch: Any, x: Tensor,
                 hg: Hypergradient) -> Hypergradient:
        """Fill ``hg.error_bound`` (``ω``) and ``hg.bound`` for a hypergradient computed by this
        estimator with ``error_bound=False`` at the same ``(θ, x)``: refresh the running
        Lipschitz estimates by a probe at ``x`` (every ``probe_every``-th bound, unless the call
        already probed), compute ``‖B‖`` and ``ω``. Adds the products used to
        ``hg.cg_iterations`` (and to ``bound.products``). Returns ``hg``."""
        if hg.error_bound is not None:
            return hg
        if hg.bound is None:
            raise ValueError("complete() needs a Hypergradient computed by AdaptiveInexact "
                             "(its bound record is None)")
        b = hg.bound
        x = x.detach()
        theta = {k: v.detach() for k, v in theta.items()}
        pending, b.pending = b.pending, None
        nprobe = 0
        self._since_probe += 1
        if pending is not None and self._since_probe >= self.probe_every:
            self._since_probe = 0
            nprobe = self._probe(inner, theta, batch, x, b.inner_residual, b.mu, pending)
        B_norm, nprod = _mixed_gram_norm(inner, x, theta, batch, closed=b.hessian_closed,
                                         max_exact_dim=self.max_exact_dim)
        b.terms = self._omega_terms(b, B_norm)
        b.grad = float(sum(b.terms.values()))
        b.mixed_norm = B_norm
        b.lipschitz = {k: self.lipschitz(k) for k in LIPSCHITZ_KEYS}
        b.products += nprod + nprobe
        hg.error_bound = b.grad
        hg.cg_iterations += nprod + nprobe
        return hg

    def _omega_terms(self, b: ErrorBound, B_norm: float) -> Dict[str, float]:
        """The summands of ``ω`` (module docstring) from the record ``b`` and ``‖B‖``."""
        mu = b.mu
        e = b.inner_residual / mu
        e_bar = b.x_error  # ‖(r_b/μ)_b‖ over all samples (all ranks)
        L_l, L_lt = self.lipschitz("outer_x"), self.lipschitz("outer_theta")
        L_A, L_B = self.lipschitz("hessian"), self.lipschitz("mixed")
        Q = (b.outer_x_grad_norm + L_l * e_bar) / mu
        rho_sq, eq_sq, eq_sum = dist_.all_reduce_floats(
            [float(b.cg_residual.pow(2).sum()), float((e * Q).pow(2).sum()), float((e * Q).sum())])
        return {
            "outer_theta": L_lt * e_bar,
            "cg": B_norm * math.sqrt(rho_sq) / mu,
            "outer_x": B_norm * L_l * e_bar / mu,
            "hessian": B_norm * L_A * math.sqrt(eq_sq) / mu,
            "mixed": L_B * eq_sum,
        }
