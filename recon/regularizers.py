"""Regularizers. :class:`SmoothedTV` is the smoothed total variation of the reference (§2.5).

Forward differences with a zero difference past the last column / row:

.. math::

    (D_h x)_{ij} = x_{i,j+1} - x_{ij}\\ (j < W),\\ 0\\ (j = W);\\qquad
    (D_v x)_{ij} = x_{i+1,j} - x_{ij}\\ (i < H),\\ 0\\ (i = H),

and, with ``s_{ij} = \\sqrt{(D_h x)_{ij}^2 + (D_v x)_{ij}^2 + e^{θ_1}}``,

.. math::

    \\mathrm{SmoothedTV}(x; θ) = e^{θ_0}\\,\\operatorname{mean}_{c,i,j} s_{ij}
    \\quad\\text{per sample (``reduction="none"``) or over the whole batch (``"mean"``).}
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["forward_differences", "forward_differences_adjoint", "SmoothedTV", "smoothed_tv"]


def forward_differences(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(D_h x, D_v x)`` for ``x`` of shape ``(..., H, W)``; zero in the last column / row."""
    dh = F.pad(torch.diff(x, dim=-1), (0, 1))
    dv = F.pad(torch.diff(x, dim=-2), (0, 0, 0, 1))
    return dh, dv


def forward_differences_adjoint(ph: Tensor, pv: Tensor, last_is_zero: bool = False) -> Tensor:
    """``D_hᵀ p_h + D_vᵀ p_v`` (the negative discrete divergence); entries of ``p`` in the last
    column (for ``p_h``) / row (for ``p_v``) are ignored, matching :func:`forward_differences`.

    ``last_is_zero=True`` promises those entries are already zero (true for ``p = f(Dx)·Dv``)
    and takes a shorter path: ``(Dᵀp)_j = p_{j−1} − p_j``.
    """
    if last_is_zero:
        return (F.pad(ph[..., :, :-1], (1, 0)) - ph) + (F.pad(pv[..., :-1, :], (0, 0, 1, 0)) - pv)
    a = ph[..., :, :-1]
    b = pv[..., :-1, :]
    return (F.pad(a, (1, 0)) - F.pad(a, (0, 1))) + (F.pad(b, (0, 0, 1, 0)) - F.pad(b, (0, 0, 0, 1)))


def smoothed_tv(x: Tensor, log_weight: Tensor, log_smoothing: Tensor,
                reduction: str = "none") -> Tensor:
    """Smoothed TV ``e^{θ₀} mean sqrt(D_h x² + D_v x² + e^{θ₁})``; ``x`` is ``(B, C, H, W)``.

    ``reduction="none"`` returns one value per sample (mean over C, H, W), ``"mean"`` the mean
    over the whole batch (the reference's definition), ``"sum"`` the sum of the per-sample values.
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    dh, dv = forward_differences(x)
    s = torch.sqrt(dh ** 2 + dv ** 2 + torch.exp(log_smoothing))
    per_sample = torch.exp(log_weight) * s.flatten(1).mean(1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


class SmoothedTV(nn.Module):
    """Module form of :func:`smoothed_tv` with θ = ``{"log_weight": θ₀, "log_smoothing": θ₁}``.

    ``SmoothedTV()(x, theta)`` returns per-sample values of shape ``(B,)``.
    """

    def __init__(self, reduction: str = "none"):
        super().__init__()
        self.reduction = reduction

    def forward(self, x: Tensor, theta) -> Tensor:
        return smoothed_tv(x, theta["log_weight"], theta["log_smoothing"], self.reduction)
