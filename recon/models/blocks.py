"""Convolutional building blocks shared by the unrolled networks.

A *residual block* updates a memory tensor ``u`` (the first ``out_channels`` channels of its
input) by a small CNN of the whole input ``z = [u, extra]``:

.. math::

    u^{+} = u + W_3 * \\phi(W_2 * \\phi(W_1 * z + b_1) + b_2) + b_3,

with PReLU activations ``φ`` (one learned slope per channel) and "same" padding, so spatial
shapes are preserved.  The dual block ``D_k`` and the primal block ``P_k`` of the learned
primal-dual family are both instances.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResidualConvBlock"]


class ResidualConvBlock(nn.Module):
    """Three convolutions with PReLU and a residual connection on the memory channels.

    ``forward(memory, *extra)`` returns ``memory + CNN(cat([memory, *extra], dim=1))``, where the
    CNN is ``conv(in→hidden) → PReLU → conv(hidden→hidden) → PReLU → conv(hidden→out)`` with
    ``in = out_channels + extra_channels`` and ``out = out_channels``.

    Args:
        out_channels: channels of the memory tensor (also the output channels).
        extra_channels: total channels of the extra inputs concatenated after the memory.
        hidden_channels: width of the two hidden layers.
        kernel_size: odd convolution kernel size.
        zero_last: initialise the last convolution to zero, so the block starts as the
            identity ``u^{+} = u`` (the unrolled network then starts at its initial guess).
    """

    def __init__(self, out_channels: int, extra_channels: int, hidden_channels: int = 32,
                 kernel_size: int = 3, zero_last: bool = False):
        super().__init__()
        if kernel_size % 2 != 1 or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        for name, value in (("out_channels", out_channels), ("extra_channels", extra_channels),
                            ("hidden_channels", hidden_channels)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        pad = kernel_size // 2
        in_channels = out_channels + extra_channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=pad),
            nn.PReLU(hidden_channels),
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size, padding=pad),
            nn.PReLU(hidden_channels),
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad),
        )
        if zero_last:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, memory: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """``memory + CNN([memory, *extra])``; all inputs share batch and spatial shape."""
        return memory + self.net(torch.cat((memory, *extra), dim=1))
