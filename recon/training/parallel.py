r"""Data-parallel training with ``torch.distributed`` (DistributedDataParallel) for :func:`fit`.

Launched under ``torchrun`` (one process per GPU, or CPU processes with gloo), :func:`fit`
trains the same model as a single process would:

* **The global batch is world-size independent.** ``TrainConfig.batch_size`` is the number of
  samples per optimisation step over all ranks; the epoch order is the fixed permutation of
  ``(seed, epoch)`` (as in one process) and each step's batch is split into contiguous rank
  shards (:func:`bilevel.distributed.shard_range`: ranks take ``⌈B/W⌉`` or ``⌊B/W⌋`` samples).
  Steps per epoch, learning-rate schedule and checkpoints are therefore the same for every
  world size, which is what makes a resume with any world size exact (``last.pt`` is the same
  file). (A ``DistributedSampler`` would tie the step count to the world size; the data are
  in-memory tensors, so no ``DataLoader``/sampler is involved.)
* **Gradients are those of the global mean.** Rank ``r`` holds ``n_r`` of the ``B`` samples of a
  step and the mean-squared error ``L_r`` over them; it back-propagates ``(n_r W / B) L_r``, and
  DDP's gradient average gives ``(1/W) Σ_r (n_r W/B) ∇L_r = Σ_r (n_r/B) ∇L_r = ∇L`` with ``L`` the
  mean over the ``B`` samples. A rank without samples in a short last batch runs one sample
  with weight 0 (DDP needs every rank in every backward).
* **Metrics are all-reduced**: the step loss ``L = Σ_r (n_r/B) L_r`` (so a non-finite loss stops
  every rank at once) and the validation PSNR (sum and count over rank shards).
* **Rank 0 writes** ``best.pt`` and ``last.pt`` (atomically, weights without DDP's ``module.``
  prefix) and shows the one progress bar.

With no process group (or one rank) every helper is the identity and nothing changes.

Other training loops (task pretraining, the joint task-adapted trainer) plug in the same way,
five lines in their step and epoch code: ``net = wrap_model(model, device)`` after restoring a
checkpoint; in the step ``idx, w = local_batch(idx)``, ``value = global_loss(float(loss), w)``
(check it for finiteness), ``(loss * backward_scale(w)).backward()``; metrics as sums and counts
through :func:`bilevel.distributed.all_reduce_floats` inside ``data_parallel()``; files and
progress bars only ``if is_main()``; ``barrier()`` before returning.
"""

from __future__ import annotations

import os
from typing import Tuple

import torch
from torch import nn

from bilevel import distributed as bdist

__all__ = ["local_batch", "global_loss", "backward_scale", "wrap_model", "is_main", "barrier",
           "init_from_env", "shutdown"]


def _ddp_on() -> bool:
    return bdist.group_ready()


def is_main() -> bool:
    """Whether this process writes files and shows progress (rank 0, or no process group)."""
    return bdist.rank() == 0


def local_batch(idx: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """This rank's part of the step's global sample indices ``idx`` and its weight ``n_r/B``.

    A rank with no sample gets ``idx[:1]`` and weight ``0``. Without DDP: ``(idx, 1.0)``."""
    if not _ddp_on():
        return idx, 1.0
    n, world = len(idx), bdist.world_size()
    if n >= world:
        part = bdist.shard_range(n, bdist.rank(), world)
        return idx[part.start:part.stop], (part.stop - part.start) / n
    r = bdist.rank()
    return (idx[r:r + 1], 1.0 / n) if r < n else (idx[:1], 0.0)


def global_loss(local: float, weight: float) -> float:
    """``Σ_r w_r L_r`` over the ranks (one all-reduce of a float); ``local`` without DDP."""
    if not _ddp_on():
        return local
    with bdist.data_parallel():
        # a NaN/inf on any rank must reach all of them: 0·inf would hide it
        value = local * weight if weight > 0 else 0.0
        return bdist.all_reduce(value, "sum")


def backward_scale(weight: float) -> float:
    """Factor on the local loss before ``backward`` so DDP's average is the global mean's
    gradient: ``w_r · W`` (``1`` without DDP)."""
    return weight * bdist.world_size() if _ddp_on() else 1.0


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` under a process group with > 1 rank, else ``model``.
    Rank 0's parameters are broadcast to the others when wrapping."""
    if not _ddp_on():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if _ddp_on():
        torch.distributed.barrier()


def init_from_env(device: str) -> str:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` >
    1): backend ``nccl`` for CUDA devices, ``gloo`` otherwise; each rank uses the GPU
    ``LOCAL_RANK``. Returns the device this rank should use (``device`` when not launched by
    torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return device


def shutdown() -> None:
    """Leave the process group if this process joined one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
