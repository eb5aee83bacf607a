r"""Exact batch-norm statistics at the final weights.

During training a BatchNorm layer keeps running estimates of its input's per-channel mean and
variance, exponential averages ``r ← (1 − m)·r + m·b`` (momentum ``m = 0.1``) of the batch
statistics ``b`` seen while the weights move. With small batches and a large learning rate they
lag the final weights, and the network in evaluation mode (which normalises with them) scores
below the network it was trained as. :func:`recompute_batchnorm` replaces them by the plain
means over one pass of the data at the final weights,
``μ_c = (1/B) Σ_b mean_b(x_c)`` and ``σ²_c = (1/B) Σ_b var_b(x_c)`` over the ``B`` batches
(``var_b`` unbiased, as PyTorch's running variance is).
"""
from __future__ import annotations

from typing import Mapping, Union

import torch
from torch import Tensor, nn

__all__ = ["batchnorm_layers", "recompute_batchnorm"]

Inputs = Union[Tensor, Mapping[str, Tensor]]


def batchnorm_layers(net: nn.Module) -> list:
    """The batch-norm layers of ``net`` that keep running statistics."""
    return [m for m in net.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _count(inputs: Inputs) -> int:
    if isinstance(inputs, Tensor):
        return len(inputs)
    return len(next(iter(inputs.values())))


def _batch(inputs: Inputs, start: int, stop: int) -> Inputs:
    if isinstance(inputs, Tensor):
        return inputs[start:stop]
    return {k: v[start:stop] for k, v in inputs.items()}


def recompute_batchnorm(net: nn.Module, inputs: Inputs, batch_size: int) -> bool:
    """Set the running statistics of every BatchNorm layer of ``net`` to their means over
    ``inputs``: ``μ_c = (1/B) Σ_b mean_b(x_c)``, ``σ²_c = (1/B) Σ_b var_b(x_c)`` over the ``B``
    batches of ``batch_size`` samples (``var_b`` unbiased, as PyTorch's running variance), at
    the current weights. The running averages of training (``r ← 0.9·r + 0.1·b``) lag moving
    weights; call this once training ends.

    ``inputs`` is a tensor ``(N, ...)`` or a mapping of tensors sharing ``N`` (``net`` is called
    on slices of it, in training mode and without gradients). The layers' momenta and the
    network's mode are restored. Returns whether ``net`` has such layers (nothing is run
    otherwise); a ``batch_size`` below 1 is a ``ValueError``."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    layers = batchnorm_layers(net)
    if not layers:
        return False
    momenta, was_training = [m.momentum for m in layers], net.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts the same
    net.train()
    n = _count(inputs)
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                net(_batch(inputs, i, i + batch_size))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        net.train(was_training)
    return True
