"""Pretraining of the task network ``T*`` on clean data, with atomic checkpoints and resume.

``pretrain`` minimises ``(1/N) Σ_n L(T(x_n), s_n)`` (the task loss, e.g.
:class:`~recon.tasks.SegmentationLoss` or :class:`~recon.tasks.ClassificationLoss`) with Adam
over ``epochs`` passes; the order of the samples in epoch ``e`` is a fixed function of
``(seed, e)``, so a resumed run repeats the uninterrupted one. After every epoch the whole state
(network ``config`` and weights, optimiser, epoch, per-epoch mean loss) is written atomically
to ``checkpoint`` (:func:`recon.checkpoint.save_checkpoint`); ``resume=True`` continues from it.
:func:`load_task_network` rebuilds the network from such a file with
``torch.load(..., weights_only=True)`` — no user object is ever unpickled.

Network configs are plain dicts: ``{"kind": "unet", "in_channels", "num_classes",
"base_channels", "depth"}`` or ``{"kind": "resnet18" | "resnet50", "in_channels",
"num_classes", "small_input"}`` or ``{"kind": "small_cnn", "in_channels", "num_classes", "width"}``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..checkpoint import load_checkpoint, save_checkpoint

__all__ = ["build_task_network", "pretrain", "load_task_network", "predict"]


def build_task_network(config: Mapping[str, Any]) -> nn.Module:
    """Build a task network from a plain config dict (module docstring)."""
    from ..models import UNet, resnet_classifier
    from ..models.classifiers import SmallCNN

    if not isinstance(config, Mapping) or "kind" not in config:
        raise ValueError(f"config must be a dict with a 'kind' entry, got {config!r}")
    cfg = dict(config)
    kind = cfg.pop("kind")
    if kind == "unet":
        return UNet(**cfg)
    if kind in ("resnet18", "resnet50"):
        return resnet_classifier(kind, **cfg)
    if kind == "small_cnn":
        return SmallCNN(**cfg)
    raise ValueError(f"config['kind'] must be 'unet', 'resnet18', 'resnet50' or 'small_cnn', got {kind!r}")


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def _check_data(data: Mapping[str, Tensor]) -> int:
    if not isinstance(data, Mapping) or "image" not in data or "label" not in data:
        raise ValueError(f"data must be a dict with 'image' and 'label' tensors, got "
                         f"{sorted(data) if isinstance(data, Mapping) else type(data).__name__}")
    n = len(data["image"])
    if len(data["label"]) != n or n == 0:
        raise ValueError(f"data['image'] ({n}) and data['label'] ({len(data['label'])}) must hold "
                         "the same positive number of samples")
    return n


def pretrain(network: nn.Module, data: Mapping[str, Tensor], loss: Callable[[Tensor, Tensor], Tensor],
             *, epochs: int = 10, batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.0,
             seed: int = 0, checkpoint: Optional[str | Path] = None, resume: bool = True,
             config: Optional[Mapping[str, Any]] = None, progress: bool = True) -> Dict[str, Any]:
    """Train ``network`` on ``data = {"image": (N, C, H, W), "label": ...}`` (module docstring).

    Returns ``{"loss": [mean loss per epoch], "epochs": epochs done, "seconds": wall time of
    this call}``. With ``checkpoint`` and ``resume=True`` an existing file is loaded first
    (its ``config`` must equal ``config``) and training continues after its last epoch.
    """
    from tqdm.auto import tqdm

    n = _check_data(data)
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    opt = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=weight_decay)
    history, start = [], 0
    if checkpoint is not None and resume and Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint)
        if config is not None and dict(state.get("config") or {}) != dict(config):
            raise ValueError(f"checkpoint {str(checkpoint)!r} holds config {state.get('config')}, "
                             f"not {dict(config)}; delete it or pass resume=False")
        network.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start = list(state["history"]), int(state["epoch"])
    t0 = time.perf_counter()
    bar = tqdm(range(start, epochs), desc="pretrain", disable=not progress, leave=False)
    for epoch in bar:
        network.train()
        order, total = _epoch_order(n, seed, epoch), 0.0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            value = loss(network(data["image"][idx]), data["label"][idx])
            value.backward()
            opt.step()
            total += float(value.detach()) * len(idx)
        history.append(total / n)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if checkpoint is not None:
            save_checkpoint({"config": dict(config or {}), "model": network.state_dict(),
                             "optimizer": opt.state_dict(), "epoch": epoch + 1, "history": history},
                            checkpoint)
    network.eval()
    return {"loss": history, "epochs": max(start, epochs), "seconds": time.perf_counter() - t0}


def load_task_network(path: str | Path) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(network in eval mode, checkpoint dict)`` from a :func:`pretrain` checkpoint."""
    state = load_checkpoint(path)
    for key in ("config", "model"):
        if key not in state:
            raise ValueError(f"{str(path)!r} is not a task-network checkpoint (no {key!r} entry)")
    net = build_task_network(state["config"])
    net.load_state_dict(state["model"])
    return net.eval(), state


@torch.no_grad()
def predict(network: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """``network(images)`` in chunks of ``batch_size``, without gradients."""
    return torch.cat([network(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
