"""Image classifiers: torchvision's ResNet-18 / ResNet-50 with a new head, never downloaded.

``resnet_classifier("resnet50", num_classes=120)`` builds ``torchvision.models.resnet50(weights=None)``
(random initialisation: nothing is fetched, ever) and replaces the final fully connected layer
by ``fc: R^{features} → R^{num_classes}`` (logits). Optional changes for small inputs:

* ``in_channels != 3`` replaces the stem convolution ``conv1`` by one with that many inputs;
* ``small_input=True`` uses a 3×3 stride-1 ``conv1`` and no max-pooling (CIFAR-style), for
  images of about 32×32 pixels.

Pretrained weights, when wanted, come from a *local* file (``weights_path``, a state dict saved
with ``torch.save``), loaded with ``torch.load(..., weights_only=True)`` before the head is
replaced. Parameter names stay torchvision's (``conv1, bn1, layer1 … layer4, fc``), so
:class:`recon.tasks.TaskOperator` can fine-tune e.g. ``["layer4", "fc"]`` or ``last=2``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

__all__ = ["resnet_classifier", "SmallCNN", "ARCHITECTURES"]

ARCHITECTURES = ("resnet18", "resnet50")


def resnet_classifier(arch: str = "resnet18", num_classes: int = 120, in_channels: int = 3,
                      small_input: bool = False, weights_path: Optional[str] = None) -> nn.Module:
    """A torchvision ResNet (``weights=None``) with a ``num_classes``-way ``fc`` head.

    Returns an ``nn.Module`` mapping ``(B, in_channels, H, W)`` to logits ``(B, num_classes)``.
    ``weights_path``: optional local state dict of the *original* network (1000 ImageNet
    classes, 3 input channels), loaded before the stem / head are replaced.
    """
    from torchvision import models

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    net = getattr(models, arch)(weights=None)
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"weights_path {weights_path!r} does not exist")
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    if small_input:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


class SmallCNN(nn.Sequential):
    """A small classifier for quick runs: ``[conv3×3 → BN → ReLU → maxpool2] × 2`` with
    ``width`` and ``2·width`` channels, average pooling to 4×4, and ``fc`` to ``num_classes``
    logits. Children ``block1, block2, pool, fc`` (so ``TaskOperator(last=1)`` tunes ``fc``)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        super().__init__()
        self.add_module("block1", block(in_channels, width))
        self.add_module("block2", block(width, 2 * width))
        self.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten()))
        self.add_module("fc", nn.Linear(32 * width, num_classes))
