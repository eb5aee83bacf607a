"""Upper-level (task) losses.

:class:`MSEToTarget` -- ``ℓ(x) = mean_{b,c,i,j} (x − x*)²`` with ``x* = batch[target_key]``.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from bilevel.problem import OuterLoss, Theta

__all__ = ["MSEToTarget"]


class MSEToTarget(OuterLoss):
    """Mean squared error to the clean images, ``ℓ(x, θ) = mean((x − batch[target_key])²)``."""

    def __init__(self, target_key: str = "image"):
        super().__init__()
        self.target_key = target_key

    def forward(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        if not isinstance(batch, Mapping) or self.target_key not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"batch must be a mapping with key {self.target_key!r}; got {keys}")
        target = batch[self.target_key]
        if target.shape != x.shape:
            raise ValueError(f"x has shape {tuple(x.shape)} but batch[{self.target_key!r}] has "
                             f"shape {tuple(target.shape)}")
        return ((x - target) ** 2).mean()
