"""Pretraining of the task network ``T*`` on clean data, with atomic checkpoints and resume.

``pretrain`` minimises ``(1/N) Σ_n L(T(x_n), s_n)`` (the task loss, e.g.
:class:`~recon.tasks.SegmentationLoss` or :class:`~recon.tasks.ClassificationLoss`) with Adam
over ``epochs`` passes; the order of the samples in epoch ``e`` is a fixed function of
``(seed, e)``, so a resumed run repeats the uninterrupted one. After every epoch the whole state
(network ``config`` and weights, optimiser, epoch, per-epoch mean loss, the settings) is
written atomically to ``checkpoint`` (:func:`recon.checkpoint.save_checkpoint`);
``resume=True`` continues from it when the settings agree (the resume rule of
:func:`recon.checkpoint.check_resume`). A loss or a weight that is not finite stops the run
with ``FloatingPointError`` before anything is saved. At the end the batch-norm running
statistics are recomputed over the training images at the final weights
(:func:`~recon.models.recompute_batchnorm`; the momentum-0.1 averages lag the weights,
and the segmentation U-Net of the examples lost 0.05 clean Dice to that lag) and the checkpoint
is written once more, marked ``batchnorm_recomputed``.
:func:`load_task_network` rebuilds the network from such a file with
``torch.load(..., weights_only=True)`` — no user object is ever unpickled.

Network configs are plain dicts: ``{"kind": "unet", "in_channels", "num_classes",
"base_channels", "depth"}`` or ``{"kind": "resnet18" | "resnet50", "in_channels",
"num_classes", "small_input"}`` or ``{"kind": "small_cnn", "in_channels", "num_classes", "width"}``.
"""
from __future__ import annotations

import math
import numbers
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from bilevel.history import check_writable

from ..models.batchnorm import recompute_batchnorm
from ..checkpoint import check_finite_state, check_resume, load_checkpoint, plain_state, save_checkpoint

__all__ = ["build_task_network", "pretrain", "load_task_network", "predict",
           "pretraining_settings", "check_pretraining_resume"]


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
    if not bool(torch.isfinite(data["image"]).all()):
        bad = (~torch.isfinite(data["image"])).flatten(1).any(1).nonzero().reshape(-1)
        raise ValueError(f"data['image'] holds NaN or infinite pixels (images {bad[:10].tolist()})")
    return n


def _check_settings(epochs, batch_size, lr, weight_decay, seed) -> None:
    """``ValueError`` naming the argument for a count < its minimum or a rate that is not a
    finite number in range."""
    for name, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
    for name, value, zero_ok in (("lr", lr, False), ("weight_decay", weight_decay, True)):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (value == 0 and not zero_ok):
            raise ValueError(f"`{name}` must be a finite number {'>= 0' if zero_ok else '> 0'}, "
                             f"got {value!r}")


def pretraining_settings(config, lr, batch_size, weight_decay, seed, n_samples, metadata) -> dict:
    """The settings a :func:`pretrain` checkpoint records and a resume compares."""
    return plain_state({"config": dict(config or {}), "lr": float(lr),
                        "batch_size": int(batch_size), "weight_decay": float(weight_decay),
                        "seed": int(seed), "n_samples": n_samples, "metadata": dict(metadata or {})})


def check_pretraining_resume(checkpoint, settings: Mapping[str, Any], accept_changes: bool = False,
                             ignore=()) -> Dict[str, Any]:
    """The resume rule (:func:`recon.checkpoint.check_resume`) for the :func:`pretrain`
    checkpoint at ``checkpoint`` and ``settings`` (:func:`pretraining_settings`; ``ignore``:
    keys not known yet, e.g. ``n_samples`` before the data are read). Returns the checkpoint."""
    state = load_checkpoint(checkpoint)
    saved = {"config": state.get("config"), **(state.get("settings") or {"settings": "<not recorded>"})}
    check_resume(checkpoint, saved, settings, accept_changes=accept_changes, ignore=ignore,
                 hint="use the saved settings, another checkpoint path, or start over "
                      "(resume=False; on the command line --restart)")
    return state


def _resume(checkpoint, network, opt, settings, accept_changes) -> Tuple[list, int, bool]:
    """``(history, epochs done, batch-norm statistics recomputed)`` of the checkpoint, loaded
    into ``network`` and ``opt`` after the resume rule (``epochs`` may grow)."""
    state = check_pretraining_resume(checkpoint, settings, accept_changes)
    check_finite_state(state["model"], f"checkpoint {str(checkpoint)!r}")
    network.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return list(state["history"]), int(state["epoch"]), bool(state.get("batchnorm_recomputed"))


def _state(network, opt, settings, history, epochs, exact_stats: bool) -> Dict[str, Any]:
    """The checkpoint after ``len(history)`` epochs (``exact_stats``: the batch-norm statistics
    are those of the final weights, :func:`~recon.models.recompute_batchnorm`)."""
    return {"config": settings["config"], "model": network.state_dict(),
            "optimizer": opt.state_dict(), "epoch": len(history), "history": history,
            "target_epochs": int(epochs), "batchnorm_recomputed": bool(exact_stats),
            "settings": {k: v for k, v in settings.items() if k != "config"}}


def _epoch(network, opt, data, loss, order, batch_size, epoch, lr) -> float:
    """One pass in ``order``; returns the mean loss (``FloatingPointError`` if not finite)."""
    network.train()
    total, n = 0.0, len(order)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        opt.zero_grad(set_to_none=True)
        value = loss(network(data["image"][idx]), data["label"][idx])
        v = float(value.detach())
        if not math.isfinite(v):
            raise FloatingPointError(f"pretraining loss is {v} at epoch {epoch + 1}, batch "
                                     f"{i // batch_size + 1} (lr {lr:g} too large?); the "
                                     f"checkpoint keeps the last finite epoch")
        value.backward()
        opt.step()
        total += v * len(idx)
    check_finite_state(network.state_dict(), f"the network after pretraining epoch {epoch + 1}")
    return total / n


def pretrain(network: nn.Module, data: Mapping[str, Tensor], loss: Callable[[Tensor, Tensor], Tensor],
             *, epochs: int = 10, batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.0,
             seed: int = 0, checkpoint: Optional[str | Path] = None, resume: bool = True,
             config: Optional[Mapping[str, Any]] = None, progress: bool = True,
             metadata: Optional[Mapping[str, Any]] = None, accept_changes: bool = False,
             callback: Optional[Callable[[int, float], None]] = None) -> Dict[str, Any]:
    """Train ``network`` on ``data = {"image": (N, C, H, W), "label": ...}`` (module docstring).

    Returns ``{"loss": [mean loss per epoch], "epochs": epochs done, "seconds": wall time of
    this call}``. With ``checkpoint`` and ``resume=True`` an existing file is continued after
    its last epoch, but only if it was made with the same ``config``, ``lr``,
    ``batch_size``, ``weight_decay``, ``seed``, number of samples and ``metadata`` (the data
    settings, plain values); otherwise :class:`~recon.checkpoint.ResumeMismatchError` lists
    the differences (``accept_changes=True``: warn and continue).  ``epochs`` may grow.
    A non-finite loss or weight raises ``FloatingPointError`` (no such checkpoint is written).
    ``callback(epoch, mean_loss)`` runs after each epoch's checkpoint is written.
    """
    from tqdm.auto import tqdm

    n = _check_data(data)
    _check_settings(epochs, batch_size, lr, weight_decay, seed)
    if checkpoint is not None:
        check_writable(checkpoint, "checkpoint")
    settings = pretraining_settings(config, lr, batch_size, weight_decay, seed, n, metadata)
    opt = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=weight_decay)
    history, start, exact_stats = [], 0, False
    if checkpoint is not None and resume and Path(checkpoint).is_file():
        history, start, exact_stats = _resume(checkpoint, network, opt, settings, accept_changes)
    t0 = time.perf_counter()
    bar = tqdm(range(start, epochs), desc="pretrain", disable=not progress, leave=False)
    for epoch in bar:
        history.append(_epoch(network, opt, data, loss, _epoch_order(n, seed, epoch), batch_size,
                              epoch, lr))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if checkpoint is not None:
            save_checkpoint(_state(network, opt, settings, history, epochs, False), checkpoint)
        if callback is not None:
            callback(epoch + 1, history[-1])
    if (start < epochs or not exact_stats) and recompute_batchnorm(network, data["image"], batch_size):
        if checkpoint is not None:  # the end: statistics of the final weights
            save_checkpoint(_state(network, opt, settings, history, epochs, True), checkpoint)
    network.eval()
    return {"loss": history, "epochs": max(start, epochs), "seconds": time.perf_counter() - t0}


def load_task_network(path: str | Path) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(network in eval mode, checkpoint dict)`` from a :func:`pretrain` checkpoint."""
    state = load_checkpoint(path)
    for key in ("config", "model"):
        if key not in state:
            raise ValueError(f"{str(path)!r} is not a task-network checkpoint (no {key!r} entry)")
    check_finite_state(state["model"], f"checkpoint {str(path)!r}")
    net = build_task_network(state["config"])
    net.load_state_dict(state["model"])
    return net.eval(), state


@torch.no_grad()
def predict(network: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """``network(images)`` in chunks of ``batch_size``, without gradients."""
    return torch.cat([network(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
