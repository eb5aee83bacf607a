"""A compact U-Net (Ronneberger et al. 2015) for semantic segmentation.

``UNet(in_channels, num_classes, base_channels=c, depth=D)`` maps ``(B, in_channels, H, W)``
images to ``(B, num_classes, H, W)`` logits (per-pixel class scores, before softmax). Level
``k = 0..D`` works at ``H/2^k × W/2^k`` with ``c·2^k`` channels:

* ``inc``: two 3×3 convolutions (each conv → norm → ReLU) at full resolution;
* ``down1 … downD``: 2×2 max-pooling, then the two convolutions (channels doubled);
* ``up1 … upD``: 2×2 transposed convolution (channels halved), concatenation with the skip
  connection of the same level, then the two convolutions;
* ``outc``: a 1×1 convolution to ``num_classes`` logits.

The sub-modules are registered in forward order (``inc, down1.., up1.., outc``), so "the last
K blocks" of :class:`recon.tasks.TaskOperator` are the last up-sampling blocks and ``outc``
(``last=3``: ``up{D-1}, upD, outc``, the reference's fine-tuned layers). ``H`` and ``W`` must
be divisible by ``2^D`` (e.g. 64×64, 64×128 and 128×128 with ``D ≤ 6``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["UNet", "DoubleConv"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got {kind!r}")


class DoubleConv(nn.Sequential):
    """``(conv3×3 → norm → ReLU) × 2``, "same" padding, ``in_ch → out_ch`` channels."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch"):
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias), _norm(norm, out_ch), nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias), _norm(norm, out_ch), nn.ReLU(inplace=True))


class _Down(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, norm: str):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch, norm))


class _Up(nn.Module):
    """Transposed 2×2 convolution ``in_ch → in_ch/2``, concatenation with the skip, DoubleConv."""

    def __init__(self, in_ch: int, out_ch: int, norm: str):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, in_ch // 2, 2, stride=2)
        self.conv = DoubleConv(in_ch // 2 + out_ch, out_ch, norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Compact U-Net returning per-pixel logits (see the module docstring).

    Args:
        in_channels: image channels (1 for grey, 3 for RGB).
        num_classes: number of segmentation classes (output channels).
        base_channels: channels ``c`` of the first level (level ``k`` has ``c·2^k``).
        depth: number of down-/up-sampling steps ``D ≥ 1``.
        norm: ``"batch"`` (default), ``"group"`` or ``"none"``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 19, base_channels: int = 16,
                 depth: int = 3, norm: str = "batch"):
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 1),
                                 ("base_channels", base_channels, 1), ("depth", depth, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        _norm(norm, 1)  # validate early
        self.in_channels, self.num_classes, self.depth = in_channels, num_classes, depth
        ch = [base_channels * 2 ** k for k in range(depth + 1)]
        self.inc = DoubleConv(in_channels, ch[0], norm)
        for k in range(1, depth + 1):
            self.add_module(f"down{k}", _Down(ch[k - 1], ch[k], norm))
        for k in range(1, depth + 1):
            self.add_module(f"up{k}", _Up(ch[depth - k + 1], ch[depth - k], norm))
        self.outc = nn.Conv2d(ch[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects (B, {self.in_channels}, H, W) input, got shape {tuple(x.shape)}")
        m = 2 ** self.depth
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"UNet of depth {self.depth} needs H and W divisible by {m}, "
                             f"got {tuple(x.shape[-2:])}")
        skips = [self.inc(x)]
        for k in range(1, self.depth + 1):
            skips.append(getattr(self, f"down{k}")(skips[-1]))
        h = skips.pop()
        for k in range(1, self.depth + 1):
            h = getattr(self, f"up{k}")(h, skips.pop())
        return self.outc(h)
