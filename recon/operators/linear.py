r"""The linear-operator protocol of ``recon`` and a reusable adjointness check.

Every operator the reconstruction code uses (``RayTransform``, its subsets and coarse grids,
test doubles) follows :class:`LinearOperator`: it maps batches ``(..., *domain_shape)`` to
``(..., *range_shape)`` linearly and has the Euclidean adjoint, i.e. for all ``x``, ``y``

.. math::

    \langle A x, y \rangle = \sum A(x) \cdot y = \sum x \cdot A^T(y) = \langle x, A^T y \rangle.

:func:`adjointness_test` measures how far an operator is from that identity (in the style of
deepinv's ``LinearPhysics.adjointness_test``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["LinearOperator", "adjointness_test"]


@runtime_checkable
class LinearOperator(Protocol):
    """A batched linear map ``A: (..., *domain_shape) -> (..., *range_shape)`` with its adjoint.

    Attributes:
        domain_shape: trailing shape of the inputs, e.g. the image shape ``(H, W)``.
        range_shape: trailing shape of the outputs, e.g. ``(n_angles, n_detectors)``.
    """

    domain_shape: tuple[int, ...]
    range_shape: tuple[int, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``."""

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y``, the Euclidean adjoint: ``sum(A(x) * y) == sum(x * A.adjoint(y))``."""


def adjointness_test(operator: LinearOperator, *, batch: int = 2,
                     dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
                     seed: int = 0) -> float:
    r"""Relative adjointness error of ``operator`` on seeded random inputs.

    Draws ``x ~ N(0, 1)`` of shape ``(batch, 1, *domain_shape)`` and ``y`` of shape
    ``(batch, 1, *range_shape)`` and returns

    .. math::

        e = \frac{|\langle A x, y\rangle - \langle x, A^T y\rangle|}
                 {\|A x\|\, \|y\| + \|x\|\, \|A^T y\|}

    (0 for an exactly matched adjoint; of the order of the dtype's rounding error, e.g.
    ``1e-15`` in float64, for a correct one).  Raises ``TypeError`` if ``operator`` does not
    follow :class:`LinearOperator` and ``ValueError`` for an output of the wrong shape.
    """
    if not isinstance(operator, LinearOperator):
        raise TypeError(f"`operator` must have domain_shape, range_shape, forward and adjoint "
                        f"(recon.operators.LinearOperator), got {type(operator).__name__}")
    if int(batch) != batch or batch < 1:
        raise ValueError(f"`batch` must be an int >= 1, got {batch!r}")
    gen = torch.Generator().manual_seed(int(seed))
    dom, ran = tuple(operator.domain_shape), tuple(operator.range_shape)
    x = torch.randn((int(batch), 1) + dom, generator=gen, dtype=dtype).to(device)
    y = torch.randn((int(batch), 1) + ran, generator=gen, dtype=dtype).to(device)
    ax, aty = operator.forward(x), operator.adjoint(y)
    if tuple(ax.shape) != tuple(y.shape) or tuple(aty.shape) != tuple(x.shape):
        raise ValueError(f"`operator` maps {tuple(x.shape)} to {tuple(ax.shape)} and "
                         f"{tuple(y.shape)} back to {tuple(aty.shape)}; shapes do not match its "
                         f"domain_shape {dom} / range_shape {ran}")
    lhs, rhs = torch.sum(ax * y), torch.sum(x * aty)
    scale = (torch.linalg.vector_norm(ax) * torch.linalg.vector_norm(y)
             + torch.linalg.vector_norm(x) * torch.linalg.vector_norm(aty))
    return float(torch.abs(lhs - rhs) / scale) if float(scale) > 0 else 0.0
