r"""The fit loop of the unrolled reconstruction networks.

The networks ``R_θ`` (LPD, LSPD, sketched LSPD) are trained on pairs ``(y_n, x_n)`` of
sinograms and ground-truth images by minimising the mean squared error

.. math::

    L(θ) = \frac{1}{N} \sum_n \frac{1}{|Ω|}\, \| R_θ(y_n) - x_n \|_2^2

with Adam (the reference: lr ``5e-5``, betas ``(0.5, 0.99)``), an optional cosine learning-rate
schedule ``lr_t = lr · (1 + cos(π t / T)) / 2`` over the ``T`` training steps, and optional
gradient-norm clipping.  After every epoch the mean validation PSNR is computed; the best model
so far is written to ``best.pt`` and the full training state (model, optimizer, scheduler, step,
random state, history, settings) to ``last.pt``, both atomically (:mod:`recon.io`).
``resume=True`` continues from ``last.pt`` at the saved step and reproduces the uninterrupted
run exactly (the order of the training samples in epoch ``e`` is a fixed function of
``(seed, e)``); it refuses to continue with settings other than the saved ones
(:class:`ResumeMismatchError` lists the differences).

Under ``torchrun`` the loop is data parallel (:mod:`recon.training.parallel`): the same global
batches split over the ranks, DistributedDataParallel gradients of the global mean, metrics
all-reduced, rank 0 writing the checkpoints and showing the progress bar; a run resumes with
any world size.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import check_finite_state, save_checkpoint
from . import parallel
from .experiment import TensorData
from .state import ResumeMismatchError, restore, settings_differences, training_state

__all__ = ["TrainConfig", "TrainResult", "ResumeMismatchError", "fit", "validate",
           "settings_differences"]

# ---------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Optimisation settings of :func:`fit`.

    Attributes:
        epochs: passes over the training set.
        batch_size: samples per step (the last batch of an epoch may be smaller).
        lr: Adam learning rate (reference: ``5e-5``).
        betas: Adam ``(β₁, β₂)`` (reference: ``(0.5, 0.99)``).
        weight_decay: Adam L2 weight decay.
        schedule: ``"cosine"`` (annealed to 0 over all steps) or ``"constant"``.
        warmup_steps: linear learning-rate warm-up ``lr · min(1, (t + 1) / warmup_steps)``
            over the first steps (stabilises Adam's first, noisy steps at large ``lr``).
        clip_grad_norm: clip the global gradient norm to this value (``None``: no clipping).
        seed: seed of the parameter initialisation-independent randomness (sample order,
            random subset draws).
        device: torch device of the model and the batches.
        save_every: also write ``last.pt`` every this many steps (``0``: only per epoch).
        progress: show a tqdm progress bar with the running loss.
        x0_key: entry of the data passed to the model as its initial guess ``x0`` (e.g.
            ``"fbp"``, computed once by the data set instead of on every forward pass);
            ``None``: the model computes its own.
    """

    epochs: int = 10
    batch_size: int = 8
    lr: float = 5e-5
    betas: tuple[float, float] = (0.5, 0.99)
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    clip_grad_norm: float | None = 1.0
    seed: int = 0
    device: str = "cpu"
    save_every: int = 0
    progress: bool = True
    x0_key: str | None = None

    def __post_init__(self):
        for name, low in (("epochs", 1), ("batch_size", 1), ("warmup_steps", 0),
                          ("seed", 0), ("save_every", 0)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
            setattr(self, name, int(value))
        for name in ("lr", "weight_decay", "clip_grad_norm"):
            value = getattr(self, name)
            if value is None and name == "clip_grad_norm":
                continue
            if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                    and math.isfinite(value) and (value > 0 or (name == "weight_decay" and value == 0))):
                raise ValueError(f"`{name}` must be a finite number "
                                 f"{'>= 0' if name == 'weight_decay' else '> 0'}, got {value!r}")
            setattr(self, name, float(value))
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"`schedule` must be 'cosine' or 'constant', got {self.schedule!r}")
        try:
            betas = tuple(float(b) for b in self.betas)
        except (TypeError, ValueError):
            betas = ()
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = betas


@dataclass
class TrainResult:
    """Outcome of :func:`fit`.

    Attributes:
        step: global optimisation steps done.
        epoch: completed epochs.
        best_val_psnr: best mean validation PSNR (dB) seen, ``-inf`` before any validation.
        best_epoch: epoch (1-based) of the best validation PSNR, ``0`` if none.
        history: one record per completed epoch: ``epoch``, ``step``, ``train_loss``,
            ``val_psnr``, ``lr``, ``seconds``.
        best_path, last_path: checkpoint files (``None`` without ``out_dir``).
    """

    step: int
    epoch: int
    best_val_psnr: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    best_path: Path | None = None
    last_path: Path | None = None


# ---------------------------------------------------------------------------- training
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Sample order of ``epoch``: a permutation that depends only on ``(seed, epoch)``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


@torch.no_grad()
def validate(model: nn.Module, data: TensorData, batch_size: int = 16,
             device: str | torch.device = "cpu", x0_key: str | None = None) -> float:
    """Mean PSNR (dB, per-image data range) of ``model(sinogram)`` against ``image``.

    ``x0_key``: entry of ``data`` passed to the model as its initial guess (see
    :class:`TrainConfig`).
    """
    from recon.metrics import psnr

    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
    _check_data(data, "data", x0_key)
    _check_image_shape(model, data, "data")
    was_training = model.training
    model.eval()
    values = []
    mine = torch.arange(len(data["sinogram"]))  # under DDP: every world-th sample from rank
    if parallel.bdist.group_ready():
        mine = mine[parallel.bdist.rank()::parallel.bdist.world_size()]
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        image = data["image"][idx].to(device)
        values.append(psnr(_forward(model, data, idx, device, x0_key), image).cpu())
    model.train(was_training)
    local = torch.cat(values) if values else torch.zeros(0)
    if not parallel.bdist.group_ready():
        return float(local.mean())
    with parallel.bdist.data_parallel():
        total, count = parallel.bdist.all_reduce_floats([float(local.sum()), len(local)])
    return total / count


def _check_data(data: Any, name: str, x0_key: str | None, validation: bool = False) -> None:
    """``ValueError`` naming ``name`` unless ``data`` holds finite, matching, non-empty tensors."""
    if not isinstance(data, Mapping):
        raise TypeError(f"`{name}` must be a mapping {{'sinogram': ..., 'image': ...}}, got "
                        f"{type(data).__name__}")
    keys = ("sinogram", "image") + ((x0_key,) if x0_key else ())
    for key in keys:
        if key not in data or not isinstance(data[key], torch.Tensor):
            raise ValueError(f"`{name}` needs a tensor entry {key!r}, got keys {sorted(data)}")
    sizes = {key: len(data[key]) for key in keys}
    if len(set(sizes.values())) != 1 or sizes["sinogram"] == 0:
        raise ValueError(f"`{name}` entries must hold the same number >= 1 of samples, got {sizes}")
    for key in keys:
        if not bool(torch.isfinite(data[key]).all()):
            raise ValueError(f"`{name}[{key!r}]` contains NaN or infinite values")
    if validation:
        flat = data["image"].reshape(len(data["image"]), -1)
        const = torch.nonzero(flat.amax(1) == flat.amin(1)).reshape(-1).tolist()
        if const:
            raise ValueError(f"`{name}['image']` has constant images {const[:10]}: their "
                             f"PSNR (data range of each image) is undefined; remove them")


def _check_image_shape(model: nn.Module, data: Any, name: str) -> None:
    """``ValueError`` unless ``data["image"]`` is ``(N, 1, H, W)`` with the model's
    ``image_shape`` (a model without that attribute is only checked for 4 dimensions): the loss
    would otherwise broadcast an ``(N, H, W)`` target against ``(N, 1, H, W)`` outputs."""
    image = data["image"]
    spatial = getattr(model, "image_shape", None)
    want = "(N, 1, " + (", ".join(str(v) for v in spatial) if spatial is not None else "H, W") + ")"
    ok = image.dim() == 4 and (spatial is None or (image.shape[1] == 1 and
                                                   tuple(image.shape[2:]) == tuple(spatial)))
    if not ok:
        raise ValueError(f"`{name}['image']` has shape {tuple(image.shape)}; the model "
                         f"reconstructs {want} (add the channel axis with .unsqueeze(1))")


def _prepare_out_dir(out_dir: str | Path | None) -> Path | None:
    """Create ``out_dir`` now, so that a bad path fails before training, not after an epoch."""
    if out_dir is None:
        return None
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"`out_dir` {str(out_dir)!r} is a file; checkpoints need a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"`out_dir` {str(out_dir)!r} cannot be created: {exc}") from exc
    return out_dir


def _layout(model: nn.Module, train_data: TensorData, config: TrainConfig):
    """``(device, N, steps per epoch, total steps)``; the model is moved to the device."""
    device = torch.device(config.device)
    model.to(device)
    n = len(train_data["sinogram"])
    steps_per_epoch = math.ceil(n / config.batch_size)
    return device, n, steps_per_epoch, config.epochs * steps_per_epoch


def _counted_step(net, optimizer, scheduler, train_data, idx, device, config, result,
                  epoch_losses, running):
    """One optimisation step on the samples ``idx``, the schedule stepped and counted; returns
    the running loss ``0.9·running + 0.1·loss``."""
    loss = _train_step(net, optimizer, train_data, idx, device, config)
    scheduler.step()
    result.step += 1
    epoch_losses.append(loss)
    return loss if running is None else 0.9 * running + 0.1 * loss


def fit(model: nn.Module, train_data: TensorData, val_data: TensorData | None = None,
        config: TrainConfig | None = None, out_dir: str | Path | None = None, *,
        resume: bool = False, max_steps: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        callback: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    r"""Train ``model`` to minimise ``mean((model(y) - x)²)`` over ``train_data``.

    Args:
        model: maps ``(B, 1, n_a, n_d)`` sinograms to ``(B, 1, H, W)`` images.
        train_data: ``{"sinogram": (N, 1, n_a, n_d), "image": (N, 1, H, W)}`` (see
            :func:`stack_dataset`).
        val_data: the same layout.  Without ``val_data`` no validation is done and
            ``best.pt`` is the last epoch's model.
        config: optimisation settings.
        out_dir: folder of ``best.pt`` (model weights + ``metadata``) and ``last.pt`` (full
            training state); ``None`` writes nothing.
        resume: continue from ``out_dir/last.pt`` at its saved step (model, optimizer,
            scheduler, random state and history restored).
        max_steps: stop after this global step (``last.pt`` is written), e.g. to split a run.
        metadata: plain values stored in both checkpoints (model name / config, geometry,
            data settings) so that evaluation can rebuild everything.
        callback: called with each epoch's history record.

    Returns:
        :class:`TrainResult`.
    """
    config = config or TrainConfig()
    _check_fit_inputs(model, config, train_data, val_data, max_steps)
    out_dir = _prepare_out_dir(out_dir)
    device, n, steps_per_epoch, total_steps = _layout(model, train_data, config)
    optimizer, scheduler, result, epoch_losses, meta = _start_training(
        model, config, total_steps, out_dir, resume, metadata)
    net = parallel.wrap_model(model, device)  # DDP under torchrun, else the model itself

    def save_last() -> None:
        if result.last_path is not None and parallel.is_main():
            save_checkpoint(training_state(model, optimizer, scheduler, result, total_steps,
                                           config, meta, epoch_losses), result.last_path)

    stop = total_steps if max_steps is None else min(total_steps, max_steps)
    bar = tqdm(total=stop, initial=result.step, unit="step", desc="train", dynamic_ncols=True,
               disable=not (config.progress and parallel.is_main()))
    model.train()
    running, epoch_start = None, time.perf_counter()

    def end_epoch_if_due() -> bool:
        """Validate and record the epoch that ``result.step`` completes, once (also when a
        ``last.pt`` saved at an epoch's last step, before its validation, was resumed)."""
        nonlocal epoch_losses, epoch_start
        if result.step % steps_per_epoch or result.step // steps_per_epoch <= result.epoch:
            return False
        result.epoch = result.step // steps_per_epoch
        record = _end_of_epoch(model, val_data, config, result, epoch_losses, optimizer,
                               time.perf_counter() - epoch_start, meta)
        bar.set_postfix(epoch=result.epoch, val_psnr=f"{record['val_psnr']:.2f}")
        if callback is not None:
            callback(record)
        epoch_losses, epoch_start = [], time.perf_counter()
        return True

    if end_epoch_if_due():  # resumed between an epoch's last step and its validation
        save_last()
    while result.step < stop:
        epoch, offset = divmod(result.step, steps_per_epoch)
        order = _epoch_order(n, config.seed, epoch)
        for b in range(offset, steps_per_epoch):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            running = _counted_step(net, optimizer, scheduler, train_data, idx, device, config,
                                    result, epoch_losses, running)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running:.3e}")
            if config.save_every and result.step % config.save_every == 0:
                save_last()
            if result.step >= stop:
                break
        end_epoch_if_due()
        save_last()
    bar.close()
    parallel.barrier()  # every rank returns once rank 0's checkpoints are on disk
    return result


def _start_training(model: nn.Module, config: TrainConfig, total_steps: int,
                    out_dir: Path | None, resume: bool, metadata: Mapping[str, Any] | None):
    """Adam, the learning-rate schedule, an empty :class:`TrainResult` and the epoch's losses,
    restored from ``out_dir/last.pt`` when ``resume``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas,
                                 weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(config.schedule, config.warmup_steps, total_steps))
    best_path = out_dir / "best.pt" if out_dir else None
    last_path = out_dir / "last.pt" if out_dir else None
    result = TrainResult(step=0, epoch=0, best_val_psnr=-math.inf, best_epoch=0,
                         best_path=best_path, last_path=last_path)
    torch.manual_seed(config.seed)
    epoch_losses: list[float] = []
    meta = dict(metadata or {})
    if resume:
        if last_path is None:
            raise ValueError("`resume`=True needs `out_dir` (the folder of last.pt)")
        epoch_losses = restore(last_path, model, optimizer, scheduler, result, total_steps,
                                config, meta)
    return optimizer, scheduler, result, epoch_losses, meta


def _lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """``t ↦ min(1, (t+1)/warmup) · (1 + cos(π t / T)) / 2`` (cosine) or without the cosine."""
    def factor(t: int) -> float:
        ramp = min(1.0, (t + 1) / warmup) if warmup > 0 else 1.0
        decay = 0.5 * (1 + math.cos(math.pi * min(t, total) / total)) if schedule == "cosine" else 1.0
        return ramp * decay
    return factor


def _forward(model, data, idx, device, x0_key):
    """``model(sinogram[idx])``, with ``x0 = data[x0_key][idx]`` when ``x0_key`` is set."""
    sino = data["sinogram"][idx].to(device, non_blocking=True)
    if x0_key is None:
        return model(sino)
    return model(sino, data[x0_key][idx].to(device, non_blocking=True))


def _train_step(model, optimizer, data, idx, device, config) -> float:
    """One step on the global batch ``idx``; returns its mean loss (all-reduced under DDP)."""
    idx, weight = parallel.local_batch(idx)
    image = data["image"][idx].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    loss = F.mse_loss(_forward(model, data, idx, device, config.x0_key), image)
    value = parallel.global_loss(float(loss.detach()), weight)
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss is {value} (lr too large?)")
    scale = parallel.backward_scale(weight)
    (loss if scale == 1.0 else loss * scale).backward()
    if config.clip_grad_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
    optimizer.step()
    return value


def _check_fit_inputs(model, config, train_data, val_data, max_steps) -> None:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"`config` must be a TrainConfig, got {type(config).__name__}")
    _check_data(train_data, "train_data", config.x0_key)
    _check_image_shape(model, train_data, "train_data")
    if val_data is not None:
        _check_data(val_data, "val_data", config.x0_key, validation=True)
        _check_image_shape(model, val_data, "val_data")
    if max_steps is not None and (not isinstance(max_steps, numbers.Integral) or max_steps < 0):
        raise ValueError(f"`max_steps` must be None or an int >= 0, got {max_steps!r}")


def _end_of_epoch(model, val_data, config, result, losses, optimizer, seconds, meta) -> dict:
    """Validate, append the epoch's history record, write ``best.pt`` if it is the best
    (``FloatingPointError`` if the weights hold NaN / inf: never saved)."""
    check_finite_state(model.state_dict(), f"the model after epoch {result.epoch}")
    val = (validate(model, val_data, config.batch_size, config.device, config.x0_key)
           if val_data is not None else float("nan"))
    record = {"epoch": float(result.epoch), "step": float(result.step),
              "train_loss": float(sum(losses) / max(len(losses), 1)), "val_psnr": val,
              "lr": float(optimizer.param_groups[0]["lr"]), "seconds": seconds}
    result.history.append(record)
    if record["val_psnr"] >= result.best_val_psnr or val_data is None:
        result.best_val_psnr, result.best_epoch = record["val_psnr"], result.epoch
        if result.best_path is not None and parallel.is_main():
            save_checkpoint({"model": model.state_dict(), "epoch": result.epoch,
                             "step": result.step, "val_psnr": record["val_psnr"],
                             "metadata": meta}, result.best_path)
    return record
