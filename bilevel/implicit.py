"""One pure implicit-gradient function (in the style of jaxopt's ``root_vjp``).

At a root ``x̂`` of ``F(x, θ) = ∇ₓΦ(x; θ) = 0`` the implicit function theorem gives, for any
upper loss ``ℓ(x, θ)``,

.. math::

    \\nabla\\ell(\\theta) = \\nabla_\\theta\\ell - (\\nabla^2_{x\\theta}\\Phi)^\\top q,\\qquad
    \\nabla^2_{xx}\\Phi\\; q = \\nabla_x\\ell .

:func:`implicit_vjp` solves the adjoint system per sample by batched CG and applies the mixed
product once. Both :class:`~bilevel.ImplicitCG` and :class:`~bilevel.AdaptiveInexact` call it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
from torch import Tensor

from . import distributed as dist_
from .linalg import CGResult, batch_norm, batched_cg
from .problem import Theta

__all__ = ["ImplicitVJP", "implicit_vjp", "relative_cg_tolerance"]


@dataclass
class ImplicitVJP:
    """Result of :func:`implicit_vjp`: the hypergradient ``grad`` per name, the adjoint ``q``
    (``∇²ₓₓΦ q ≈ ∇ₓℓ``), the mixed product ``mixed = (∇²_{xθ}Φ)ᵀq`` and the CG record ``cg``
    (iterations, residuals, flags)."""

    grad: Theta
    q: Tensor
    mixed: Theta
    cg: CGResult


def relative_cg_tolerance(gx: Tensor, rtol: float, floor: float = 1e-3) -> Tensor:
    """Per-sample CG tolerance ``rtol · max(‖g_b‖, floor · max_b'‖g_b'‖)`` for ``g = ∇ₓℓ``.

    Scale-free: multiplying ``ℓ`` by ``c`` multiplies the tolerance by ``c``. The floor keeps a
    sample whose ``‖g_b‖`` is (nearly) zero from asking CG for an exact zero residual.
    """
    gn = batch_norm(gx)
    top = gn.max() if gn.numel() else gn.new_zeros(())
    top = dist_.all_reduce(top, "max")  # over all samples of a data-parallel run
    return rtol * gn.clamp_min(floor * top)


def implicit_vjp(hvp: Callable[[Tensor], Tensor], mixed_vjp: Callable[[Tensor], Mapping[str, Tensor]],
                 gx: Tensor, gtheta: Mapping[str, Tensor], tol: Union[float, Tensor],
                 q0: Optional[Tensor] = None, max_iter: int = 200, rtol: float = 0.0) -> ImplicitVJP:
    """Hypergradient ``∇_θℓ − (∇²_{xθ}Φ)ᵀq`` with ``q`` from batched CG on ``∇²ₓₓΦ q = ∇ₓℓ``.

    Parameters
    ----------
    hvp: ``v ↦ ∇²ₓₓΦ v`` (block diagonal over the batch, SPD).
    mixed_vjp: ``q ↦ (∇²_{xθ}Φ)ᵀ q`` per name.
    gx, gtheta: the partial gradients ``∇ₓℓ`` and ``∇_θℓ`` at the point.
    tol, rtol: CG stops sample ``b`` once ``‖(∇²Φ q − ∇ₓℓ)_b‖ ≤ max(tol_b, rtol‖(∇ₓℓ)_b‖)``.
    q0: warm start of CG (``None``: zero).
    """
    if not bool(torch.isfinite(gx).all()):
        raise FloatingPointError("the outer gradient ∇ₓℓ holds non-finite values")
    cg = batched_cg(hvp, gx, x0=q0, tol=tol, rtol=rtol, max_iter=max_iter)
    q = cg.x.detach()
    mixed = mixed_vjp(q)
    grad = {k: gtheta[k] - mixed[k] for k in gtheta}
    return ImplicitVJP(grad=grad, q=q, mixed=mixed, cg=cg)
