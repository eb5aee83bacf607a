"""Batched linear algebra for hypergradients: conjugate gradient and Hessian-vector products.

All routines treat the leading dimension as the batch: sample ``b`` of a system
``A_b z_b = r_b`` never mixes with another sample, and CG stops per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .problem import InnerProblem, Theta, check_tolerance

__all__ = ["CGResult", "NonPositiveCurvatureError", "batched_cg", "batch_dot", "batch_norm",
           "HessianOperator", "cg_iteration_cap"]


class NonPositiveCurvatureError(ValueError):
    """CG met a direction ``p`` with ``pᵀ A p ≤ 0``: the operator is not positive definite."""


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product ``⟨a_b, b_b⟩``, shape ``(B,)``."""
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1))


def batch_norm(a: Tensor) -> Tensor:
    """Per-sample Euclidean norm ``‖a_b‖₂``, shape ``(B,)``."""
    return a.flatten(1).norm(dim=1)


def cg_iteration_cap(max_iter: Optional[int], x: Tensor, minimum: int) -> int:
    """CG iteration cap for the per-sample systems of ``x`` (``(B, ...)``).

    ``max_iter`` when given; otherwise ``max(minimum, n)`` with ``n = x[0].numel()``, the
    dimension of one sample's system. In exact arithmetic CG solves an ``n × n`` SPD system in at
    most ``n`` steps, so this default grows with the problem where a fixed cap would cut short
    the solves of large, ill-conditioned problems (a sparse-view CT Hessian at 64² needs over a
    thousand steps for a relative residual of 0.1); the tolerance, not the cap, then ends CG.
    ``minimum`` leaves room on small systems. Round-off can make a very ill-conditioned system
    need more than ``n`` steps (condition 10⁴, ``n = 400``: about 900 to 10⁻¹⁰): pass
    ``max_iter`` there; a solve that hits the cap is reported as not converged.
    """
    if max_iter is not None:
        return max_iter
    n = int(x[0].numel()) if x.dim() > 0 and x.shape[0] > 0 else 0
    return max(int(minimum), n)


def check_cg_cap(max_iter: Optional[int]) -> Optional[int]:
    """``max_iter`` if it is ``None`` or a positive int, else ``ValueError`` naming it."""
    if max_iter is not None and (not isinstance(max_iter, int) or isinstance(max_iter, bool)
                                 or max_iter < 1):
        raise ValueError(f"max_iter must be a positive int or None, got {max_iter!r}")
    return max_iter


class PerSampleCounts:
    """Mixin for results holding per-sample ``iterations`` and ``converged`` tensors."""

    iterations: Tensor
    converged: Tensor

    @property
    def max_iterations(self) -> int:
        """Largest iteration count over the samples (0 for an empty batch)."""
        return int(self.iterations.max()) if self.iterations.numel() else 0

    @property
    def all_converged(self) -> bool:
        """Whether every sample met its tolerance."""
        return bool(self.converged.all())


@dataclass
class CGResult(PerSampleCounts):
    """Outcome of :func:`batched_cg`.

    ``x`` the solution, ``iterations`` CG steps per sample (``(B,)`` long), ``residual`` final
    ``‖A x − b‖`` per sample, ``converged`` per-sample flag (``residual ≤ tol``).
    """

    x: Tensor
    iterations: Tensor
    residual: Tensor
    converged: Tensor


def batched_cg(matvec: Callable[[Tensor], Tensor], b: Tensor, x0: Optional[Tensor] = None,
               tol=1e-6, max_iter: int = 100, rtol: float = 0.0) -> CGResult:
    """Solve ``A_b x_b = b_b`` for every sample ``b`` by conjugate gradient.

    Sample ``b`` stops once ``‖A_b x_b − b_b‖₂ ≤ max(tol, rtol·‖b_b‖₂)``; stopped samples are
    frozen (their ``x`` no longer changes) while the others continue. ``matvec`` must apply the
    block-diagonal SPD operator to a full batch ``(B, ...)``; it is called once per iteration.

    ``tol`` is a float or a per-sample tensor of shape ``(B,)``.

    Raises :class:`NonPositiveCurvatureError` when ``pᵀAp ≤ 0`` for a sample still iterating.
    """
    if isinstance(tol, Tensor):
        if tol.shape != b.shape[:1] or bool((tol < 0).any()):
            raise ValueError(f"tol tensor must be ≥ 0 and of shape {tuple(b.shape[:1])}, "
                             f"got shape {tuple(tol.shape)}")
        if not bool(torch.isfinite(tol).all()):
            raise FloatingPointError(f"CG tolerance is not finite ({int((~torch.isfinite(tol)).sum())} "
                                     f"sample(s)): the right-hand side b holds non-finite values")
    else:
        tol = check_tolerance("tol", tol, allow_zero=True)
    rtol = check_tolerance("rtol", rtol, allow_zero=True)
    if max_iter < 0:
        raise ValueError(f"max_iter must be ≥ 0, got {max_iter}")
    if not bool(torch.isfinite(b).all()):
        raise FloatingPointError(f"CG right-hand side b holds {int((~torch.isfinite(b)).sum())} "
                                 f"non-finite value(s), shape {tuple(b.shape)}")
    bsz = b.shape[0]
    x = torch.zeros_like(b) if x0 is None else x0.detach().clone()
    if x.shape != b.shape:
        raise ValueError(f"x0 has shape {tuple(x.shape)}, expected {tuple(b.shape)} (shape of b)")
    r = b - matvec(x) if x0 is not None else b.clone()
    tol_t = torch.as_tensor(tol, dtype=b.dtype, device=b.device).expand(bsz)
    threshold = torch.maximum(rtol * batch_norm(b), tol_t)
    rs = batch_dot(r, r)
    active = rs.sqrt() > threshold
    iters = torch.zeros(bsz, dtype=torch.long, device=b.device)
    p = r.clone()
    view = (bsz,) + (1,) * (b.dim() - 1)
    one = torch.ones_like(rs)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        ap = matvec(p)
        pap = batch_dot(p, ap)
        bad = active & (pap <= 0)
        if bool(bad.any()):
            idx = torch.nonzero(bad).flatten().tolist()
            raise NonPositiveCurvatureError(
                f"conjugate gradient found non-positive curvature pᵀAp = "
                f"{pap[bad].tolist()} for sample(s) {idx}: the Hessian is not positive definite "
                f"there (is the inner problem strongly convex at this point?)")
        # stopped samples get α = β = 0: x, r stay put and p is zeroed (it is never used again)
        alpha = torch.where(active, rs / torch.where(active, pap, one), torch.zeros_like(rs))
        x.addcmul_(alpha.view(view), p)
        r.addcmul_(alpha.view(view), ap, value=-1.0)
        rs_new = batch_dot(r, r)
        iters += active.long()
        beta = torch.where(active, rs_new / torch.where(active, rs, one), torch.zeros_like(rs))
        p.mul_(beta.view(view)).add_(r)
        rs = torch.where(active, rs_new, rs)
        active = active & (rs.sqrt() > threshold)
    res = rs.clamp_min(0).sqrt()
    return CGResult(x=x, iterations=iters, residual=res, converged=res <= threshold)


class HessianOperator:
    """``v ↦ ∇²ₓₓ Σ_bΦ_b(x; θ) v`` and ``q ↦ (∇²_{xθ} Σ_bΦ_b)ᵀ q`` at a fixed point ``(x, θ)``.

    Uses the problem's closed-form :meth:`~bilevel.InnerProblem.hvp` /
    :meth:`~bilevel.InnerProblem.mixed_vjp` when it supplies them (``mode="auto"``), otherwise
    autograd: the gradient graph ``g = ∇ₓΦ`` is built **once** (``create_graph=True``) and every
    product is a backward pass through it with ``retain_graph=True`` (double backward).
    ``mode="autograd"`` forces autograd even when closed forms exist (used in tests/benchmarks).
    """

    def __init__(self, inner: InnerProblem, x: Tensor, theta: Theta, batch: Any,
                 mode: str = "auto"):
        if mode not in ("auto", "autograd", "closed"):
            raise ValueError(f"mode must be 'auto', 'autograd' or 'closed', got {mode!r}")
        self.inner, self.batch = inner, batch
        self.x = x.detach()
        self.theta = {k: v.detach() for k, v in theta.items()}
        closed = inner.has_closed_form_products()
        if mode == "closed" and not closed:
            raise ValueError(f"{type(inner).__name__} supplies no closed-form hvp/mixed_vjp")
        self.closed = closed and mode != "autograd"
        self.n_hvp = 0
        self._lin = inner.linearize(self.x, self.theta, batch) if self.closed else None
        if not self.closed:
            with torch.enable_grad():
                self._x = self.x.clone().requires_grad_(True)
                self._theta = {k: v.clone().requires_grad_(True) for k, v in self.theta.items()}
                phi = inner.objective(self._x, self._theta, batch).sum()
                (self._g,) = torch.autograd.grad(phi, self._x, create_graph=True)

    def hvp(self, v: Tensor) -> Tensor:
        """``∇²ₓₓΦ · v`` for a full batch ``v`` (same shape as ``x``)."""
        self.n_hvp += 1
        if self._lin is not None:
            return self._lin[0](v)
        if self.closed:
            out = self.inner.hvp(self.x, self.theta, self.batch, v)
            if out is None:
                raise RuntimeError(f"{type(self.inner).__name__}.hvp returned None")
            return out
        (hv,) = torch.autograd.grad(self._g, self._x, v, retain_graph=True)
        return hv

    __call__ = hvp

    def mixed_vjp(self, q: Tensor) -> Theta:
        """``(∇²_{xθ}Φ)ᵀ q = ∇_θ ⟨∇ₓΦ, q⟩`` per hyperparameter name (zeros where unused)."""
        if self._lin is not None:
            return self._lin[1](q)
        if self.closed:
            out = self.inner.mixed_vjp(self.x, self.theta, self.batch, q)
            if out is None:
                raise RuntimeError(f"{type(self.inner).__name__}.mixed_vjp returned None")
            return out
        names = list(self._theta)
        grads = torch.autograd.grad(self._g, [self._theta[k] for k in names], q,
                                    retain_graph=True, allow_unused=True)
        return {k: (torch.zeros_like(self._theta[k]) if g is None else g)
                for k, g in zip(names, grads)}
