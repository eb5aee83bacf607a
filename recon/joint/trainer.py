r"""The joint trainer: ``R_φ`` and ``S_ψ`` trained together on the joint loss.

One step on a batch minimises :class:`~recon.joint.losses.JointLoss`
``L = (1 − C)·MSE(R_φ(y), x) + C·(CE + Dice)(S_ψ(R_φ(y)), s)`` over ``(φ, ψ)`` with Adam;
:func:`joint_gradients` is that step's gradient, equal to the bilevel API's hypergradient
(:class:`~recon.joint.problem.ExplicitBackprop` on
:class:`~recon.joint.problem.ExplicitReconstruction`; see the tests). The sample order of
epoch ``e`` is a fixed function of ``(seed, e)`` and the full state (networks, optimizer, step,
random state, history) is written atomically to ``last.pt`` after every epoch, so ``resume``
continues an interrupted run exactly.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from recon.checkpoint import load_checkpoint, save_checkpoint

from ..models.batchnorm import recompute_batchnorm
from .losses import JointLoss

__all__ = ["JointConfig", "JointNet", "JointTrainResult", "joint_gradients", "fit_joint"]

TensorData = Mapping[str, Tensor]


@dataclass
class JointConfig:
    """Optimisation settings of :func:`fit_joint`.

    Attributes:
        epochs: passes over the training set.
        batch_size: samples per step.
        lr: Adam learning rate of every trained network.
        clip_grad_norm: global gradient-norm clip (``None``: none; else a finite number > 0).
        seed: seed of the weights (set by the caller before building them) and sample order.
        progress: tqdm progress bar.
        pretrain_epochs: joint routes only: epochs of the two pretraining stages (``R_φ`` on the
            MSE, ``S_ψ`` on the clean images) before the joint stage; ``0`` trains the joint
            stage from scratch.
        joint_lr: Adam learning rate of the joint stage after pretraining (``None``:
            ``lr / 10``: the joint stage fine-tunes two pretrained networks; at ``lr`` it
            undoes much of the pretrained reconstruction, PSNR −2 to −4 dB, and the Dice
            varies far more between seeds).

    Every value is checked on construction (``TypeError`` / ``ValueError`` naming it).
    """

    epochs: int = 7
    batch_size: int = 4
    lr: float = 3e-3
    clip_grad_norm: Optional[float] = 1.0
    seed: int = 0
    progress: bool = True
    pretrain_epochs: int = 0
    joint_lr: Optional[float] = None

    def __post_init__(self):
        for name, low in (("epochs", 1), ("batch_size", 1), ("seed", 0), ("pretrain_epochs", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"JointConfig.{name} must be an int, got {type(value).__name__} {value!r}")
            if value < low:
                raise ValueError(f"JointConfig.{name} must be >= {low}, got {value!r}")
        for name, optional in (("lr", False), ("clip_grad_norm", True), ("joint_lr", True)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"JointConfig.{name} must be a number, got {type(value).__name__} {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"JointConfig.{name} must be a finite number > 0"
                                 + (" (or None)" if optional else "") + f", got {value!r}")
        if not isinstance(self.progress, bool):
            raise TypeError(f"JointConfig.progress must be a bool, got {self.progress!r}")


class JointNet(nn.Module):
    """``x̂ = R_φ(y; x₀)`` (or ``batch[input_key]`` without a reconstructor) and ``S_ψ(x̂)``.

    Args:
        reconstructor: ``R_φ`` (LPD / LSPD / sketched LSPD), ``None`` for the clean and the
            second sequential stage, where ``x̂ = batch[input_key]``.
        segmenter: ``S_ψ`` returning ``(B, 2, H, W)`` logits, or ``None`` (MSE-only training).
        input_key: key of the given images when there is no reconstructor.
    """

    def __init__(self, reconstructor: Optional[nn.Module], segmenter: Optional[nn.Module],
                 input_key: str = "image"):
        super().__init__()
        if reconstructor is None and segmenter is None:
            raise ValueError("JointNet needs a reconstructor, a segmenter or both; got neither")
        self.reconstructor, self.segmenter, self.input_key = reconstructor, segmenter, input_key

    def reconstruct(self, batch: TensorData) -> Tensor:
        """``x̂`` of a batch: ``R_φ(batch["sinogram"], x0=batch["fbp"])`` or ``batch[input_key]``."""
        if self.reconstructor is None:
            return batch[self.input_key]
        return self.reconstructor(batch["sinogram"], x0=batch.get("fbp"))

    def forward(self, batch: TensorData) -> tuple[Tensor, Optional[Tensor]]:
        x = self.reconstruct(batch)
        return x, (self.segmenter(x) if self.segmenter is not None else None)


@dataclass
class JointTrainResult:
    """Outcome of :func:`fit_joint`: steps, epochs, per-epoch ``history`` records (``epoch``,
    ``step``, ``loss`` (the mean combined loss of the epoch), ``seconds``) and total training
    ``seconds``."""

    step: int
    epoch: int
    seconds: float
    history: list = field(default_factory=list)
    last_path: Optional[Path] = None


def joint_gradients(net: JointNet, loss_fn: JointLoss, batch: TensorData) -> tuple[Tensor, dict]:
    """``(L, {name: ∂L/∂p})`` for the trainable parameters ``p`` of ``net`` on one batch."""
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    with torch.enable_grad():
        loss = loss_fn(net.reconstruct(batch), {}, batch)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.detach(), {n: (torch.zeros_like(p) if g is None else g)
                           for (n, p), g in zip(params.items(), grads)}


def _order(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _step(net, loss_fn, optimizer, batch, clip) -> dict:
    loss, grads = joint_gradients(net, loss_fn, batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"joint loss is {float(loss)} (lr too large?)")
    params = dict(net.named_parameters())
    for name, g in grads.items():
        params[name].grad = g
    if clip is not None:
        nn.utils.clip_grad_norm_([params[n] for n in grads], clip)
    optimizer.step()
    return {"loss": float(loss)}


def _state(route, net, optimizer, result, config, meta, losses, total) -> dict:
    return {"route": route, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
            "total_steps": total,
            "epoch_losses": list(losses), "step": result.step, "epoch": result.epoch,
            "seconds": result.seconds,
            "history": [dict(r) for r in result.history], "rng": torch.get_rng_state(),
            "config": asdict(config), "metadata": dict(meta)}


#: settings that may change on resume (how a run reports, not what it computes)
_RESUMABLE = ("progress",)


def _restore(path: Path, route: str, net, optimizer, result, config, meta, total) -> list:
    """Load ``last.pt`` into the objects; refuse another route or other settings (with the diff)."""
    from recon.training.state import ResumeMismatchError, settings_differences

    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {str(path)!r} does not exist (no earlier run "
                                f"in this folder); train without resume")
    state = load_checkpoint(path)
    if state.get("route") != route:
        raise ValueError(f"cannot resume {str(path)!r}: it is a checkpoint of route "
                         f"{state.get('route')!r}, this run is route {route!r}")
    saved_cfg = {**asdict(JointConfig()), **(state.get("config") or {})}
    now_cfg = asdict(config)
    for key in _RESUMABLE:
        saved_cfg.pop(key, None), now_cfg.pop(key, None)
    diffs = settings_differences({"config": saved_cfg, "metadata": state.get("metadata") or {}},
                                 {"config": now_cfg, "metadata": dict(meta)})
    if state.get("total_steps", total) != total:
        diffs.append(f"total_steps: {state.get('total_steps')} (saved) != {total} (now; epochs, "
                     "batch_size and the number of training samples decide it)")
    if diffs:
        raise ResumeMismatchError(
            f"cannot resume {str(path)!r} with other settings than it was trained with:\n  "
            + "\n  ".join(diffs) + "\nuse the saved settings, or a new output folder")
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    result.step, result.epoch = int(state["step"]), int(state["epoch"])
    result.seconds, result.history = float(state["seconds"]), [dict(r) for r in state["history"]]
    return [float(v) for v in state.get("epoch_losses", [])]


def fit_joint(net: JointNet, loss_fn: JointLoss, train_data: TensorData, config: JointConfig,
              route: str, out_dir: Optional[str | Path] = None, *, resume: bool = False,
              max_steps: Optional[int] = None, metadata: Optional[Mapping[str, Any]] = None,
              lr: Optional[float] = None, epochs: Optional[int] = None) -> JointTrainResult:
    """Train the trainable parameters of ``net`` on ``loss_fn`` (module docstring).

    ``route`` names the run in its checkpoint; ``resume=True`` continues ``out_dir/last.pt`` and
    raises ``ValueError`` if that file belongs to another route, and
    :class:`recon.training.ResumeMismatchError` (listing every difference) if it was trained with
    other settings (``config`` except ``progress``, ``metadata``, number of steps). ``lr`` and
    ``epochs`` override ``config.lr`` / ``config.epochs`` (a stage of a multi-stage route).
    ``max_steps`` stops early (``last.pt`` written), e.g. to split a run.
    """
    from tqdm.auto import tqdm

    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                  or max_steps < 1):
        raise ValueError(f"max_steps must be None or an int >= 1, got {max_steps!r}")
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"route {route!r}: net has no trainable parameters")
    if lr is not None or epochs is not None:
        from dataclasses import replace

        config = replace(config, lr=config.lr if lr is None else lr,
                         epochs=config.epochs if epochs is None else epochs)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    n = len(train_data["sinogram"])
    per_epoch = math.ceil(n / config.batch_size)
    last = Path(out_dir) / "last.pt" if out_dir is not None else None
    result = JointTrainResult(step=0, epoch=0, seconds=0.0, last_path=last)
    losses: list = []
    if resume:
        if last is None:
            raise ValueError("resume=True needs out_dir")
        losses = _restore(last, route, net, optimizer, result, config, metadata or {},
                          config.epochs * per_epoch)
    stop = config.epochs * per_epoch if max_steps is None else min(max_steps, config.epochs * per_epoch)
    bar = tqdm(total=stop, initial=result.step, disable=not config.progress, unit="step",
               desc=route, dynamic_ncols=True, leave=False)
    net.train()
    while result.step < stop:
        epoch, offset = divmod(result.step, per_epoch)
        order, t0 = _order(n, config.seed, epoch), time.perf_counter()
        for b in range(offset, per_epoch):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            batch = {k: v[idx] for k, v in train_data.items()}
            losses.append(_step(net, loss_fn, optimizer, batch, config.clip_grad_norm)["loss"])
            result.step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3e}")
            if result.step >= stop:
                break
        result.seconds += time.perf_counter() - t0
        if result.step % per_epoch == 0:
            result.epoch = result.step // per_epoch
            result.history.append({"epoch": result.epoch, "step": result.step,
                                   "loss": sum(losses) / max(len(losses), 1),
                                   "seconds": result.seconds})
            losses = []
        if result.step == config.epochs * per_epoch:  # the end: statistics of the final weights
            recompute_batchnorm(net, train_data, config.batch_size)
        if last is not None:
            save_checkpoint(_state(route, net, optimizer, result, config, metadata or {}, losses,
                                   config.epochs * per_epoch), last)
    bar.close()
    return result
