r"""Supervised training of the unrolled reconstruction networks, and the command line.

The networks ``R_θ`` (LPD, LSPD, sketched LSPD) are trained on pairs ``(y_n, x_n)`` of
sinograms and ground-truth images by minimising the mean squared error

.. math::

    L(θ) = \frac{1}{N} \sum_n \frac{1}{|Ω|}\, \| R_θ(y_n) - x_n \|_2^2

with Adam (the reference: lr ``5e-5``, betas ``(0.5, 0.99)``), an optional cosine learning-rate
schedule ``lr_t = lr · (1 + cos(π t / T)) / 2`` over the ``T`` training steps, and optional
gradient-norm clipping.  After every epoch the mean validation PSNR is computed; the best model
so far is written to ``best.pt`` and the full training state (model, optimizer, scheduler, step,
random state, history) to ``last.pt``, both atomically.  ``resume=True`` continues from
``last.pt`` at the saved step and reproduces the uninterrupted run exactly: the order of the
training samples in epoch ``e`` is a fixed function of ``(seed, e)``.

Command line (``python -m recon.train --help``)::

    python -m recon.train train --model lpd --image-size 64 --n-angles 30 --out runs/lpd
    python -m recon.train evaluate runs/lpd/best.pt runs/lspd/best.pt --out runs/table

``train`` builds the geometry, the ellipse-phantom data (sparse view, optional Poisson noise)
and the model; ``evaluate`` is :func:`recon.evaluate.main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint

__all__ = ["TrainConfig", "TrainResult", "fit", "validate", "stack_dataset",
           "check_data_matches_operator", "default_setup", "make_operator", "build_setup", "main"]

TensorData = Mapping[str, torch.Tensor]


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

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, "
                             f"{self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        self.betas = tuple(float(b) for b in self.betas)


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


# ---------------------------------------------------------------------------- data helpers
def stack_dataset(dataset: Sequence[Mapping[str, torch.Tensor]],
                  keys: Sequence[str] = ("sinogram", "image", "fbp")) -> dict[str, torch.Tensor]:
    """Stack the items ``{"sinogram": (C, n_a, n_d), "image": (C, H, W), ...}`` of a data set.

    Returns ``{key: (N, C, ...)}`` for the ``keys`` present in the first item (``sinogram`` and
    ``image`` are required).  Small CT data sets fit in memory, which makes batches free.
    """
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    first = dataset[0]
    for key in ("sinogram", "image"):
        if key not in first:
            raise ValueError(f"dataset items need a {key!r} entry, got keys {sorted(first)}")
    present = [k for k in keys if k in first]
    items = [dataset[i] for i in range(len(dataset))]
    return {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in present}


def check_data_matches_operator(data: TensorData, operator: Any) -> None:
    """Raise ``ValueError`` if the data's sinogram / image shapes do not match the geometry."""
    sino = tuple(data["sinogram"].shape[-2:])
    image = tuple(data["image"].shape[-2:])
    if sino != tuple(operator.range_shape):
        raise ValueError(
            f"sinogram shape {sino} (n_angles, n_detectors) of the data does not match the "
            f"geometry's range_shape {tuple(operator.range_shape)}")
    if image != tuple(operator.domain_shape):
        raise ValueError(
            f"image shape {image} of the data does not match the geometry's image_shape "
            f"{tuple(operator.domain_shape)}")


# ---------------------------------------------------------------------------- training
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Sample order of ``epoch``: a permutation that depends only on ``(seed, epoch)``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


@torch.no_grad()
def validate(model: nn.Module, data: TensorData, batch_size: int = 16,
             device: str | torch.device = "cpu") -> float:
    """Mean PSNR (dB, per-image data range) of ``model(sinogram)`` against ``image``."""
    from recon.metrics import psnr

    was_training = model.training
    model.eval()
    values = []
    for start in range(0, len(data["sinogram"]), batch_size):
        sino = data["sinogram"][start:start + batch_size].to(device)
        image = data["image"][start:start + batch_size].to(device)
        values.append(psnr(model(sino), image).cpu())
    model.train(was_training)
    return float(torch.cat(values).mean())


def fit(model: nn.Module, train_data: TensorData, val_data: TensorData | None = None,
        config: TrainConfig | None = None, out_dir: str | Path | None = None, *,
        resume: bool = False, max_steps: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        callback: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    r"""Train ``model`` to minimise ``mean((model(y) - x)²)`` over ``train_data``.

    Args:
        model: maps ``(B, 1, n_a, n_d)`` sinograms to ``(B, 1, H, W)`` images.
        train_data, val_data: ``{"sinogram": (N, 1, n_a, n_d), "image": (N, 1, H, W)}``
            (see :func:`stack_dataset`).  Without ``val_data`` no validation is done and
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
    from tqdm.auto import tqdm  # only the training loop needs it

    config = config or TrainConfig()
    device = torch.device(config.device)
    model.to(device)
    n = len(train_data["sinogram"])
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas,
                                 weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(config.schedule, config.warmup_steps, total_steps))
    out_dir = Path(out_dir) if out_dir is not None else None
    best_path = out_dir / "best.pt" if out_dir else None
    last_path = out_dir / "last.pt" if out_dir else None
    result = TrainResult(step=0, epoch=0, best_val_psnr=-math.inf, best_epoch=0,
                         best_path=best_path, last_path=last_path)
    torch.manual_seed(config.seed)
    epoch_losses: list[float] = []
    if resume:
        if last_path is None:
            raise ValueError("resume=True needs out_dir")
        epoch_losses = _restore(last_path, model, optimizer, scheduler, result, total_steps)
    meta = dict(metadata or {})

    def save_last() -> None:
        if last_path is not None:
            save_checkpoint(_training_state(model, optimizer, scheduler, result, total_steps,
                                            config, meta, epoch_losses), last_path)

    stop = total_steps if max_steps is None else min(total_steps, max_steps)
    bar = tqdm(total=stop, initial=result.step, disable=not config.progress, unit="step",
               dynamic_ncols=True, desc="train")
    model.train()
    running, epoch_start = None, time.perf_counter()
    while result.step < stop:
        epoch, offset = divmod(result.step, steps_per_epoch)
        order = _epoch_order(n, config.seed, epoch)
        for b in range(offset, steps_per_epoch):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            loss = _train_step(model, optimizer, train_data, idx, device, config.clip_grad_norm)
            scheduler.step()
            result.step += 1
            epoch_losses.append(loss)
            running = loss if running is None else 0.9 * running + 0.1 * loss
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running:.3e}")
            if config.save_every and result.step % config.save_every == 0:
                save_last()
            if result.step >= stop:
                break
        if result.step % steps_per_epoch == 0 and result.step // steps_per_epoch > result.epoch:
            result.epoch = result.step // steps_per_epoch
            record = _end_of_epoch(model, val_data, config, result, epoch_losses, optimizer,
                                   time.perf_counter() - epoch_start)
            if record["val_psnr"] >= result.best_val_psnr or val_data is None:
                result.best_val_psnr, result.best_epoch = record["val_psnr"], result.epoch
                if best_path is not None:
                    save_checkpoint({"model": model.state_dict(), "epoch": result.epoch,
                                     "step": result.step, "val_psnr": record["val_psnr"],
                                     "metadata": meta}, best_path)
            bar.set_postfix(epoch=result.epoch, loss=f"{running:.3e}",
                            val_psnr=f"{record['val_psnr']:.2f}")
            if callback is not None:
                callback(record)
            epoch_losses, epoch_start = [], time.perf_counter()
        save_last()
    bar.close()
    return result


def _lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """``t ↦ min(1, (t+1)/warmup) · (1 + cos(π t / T)) / 2`` (cosine) or without the cosine."""
    def factor(t: int) -> float:
        ramp = min(1.0, (t + 1) / warmup) if warmup > 0 else 1.0
        decay = 0.5 * (1 + math.cos(math.pi * min(t, total) / total)) if schedule == "cosine" else 1.0
        return ramp * decay
    return factor


def _train_step(model, optimizer, data, idx, device, clip) -> float:
    sino = data["sinogram"][idx].to(device, non_blocking=True)
    image = data["image"][idx].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(sino), image)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()} (lr too large?)")
    loss.backward()
    if clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return float(loss.detach())


def _end_of_epoch(model, val_data, config, result, losses, optimizer, seconds) -> dict:
    val = (validate(model, val_data, config.batch_size, config.device)
           if val_data is not None else float("nan"))
    record = {"epoch": float(result.epoch), "step": float(result.step),
              "train_loss": float(sum(losses) / max(len(losses), 1)), "val_psnr": val,
              "lr": float(optimizer.param_groups[0]["lr"]), "seconds": seconds}
    result.history.append(record)
    return record


def _training_state(model, optimizer, scheduler, result, total_steps, config, meta,
                    epoch_losses) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": result.step, "epoch": result.epoch,
            "best_val_psnr": result.best_val_psnr, "best_epoch": result.best_epoch,
            "history": [dict(r) for r in result.history], "total_steps": total_steps,
            "epoch_losses": list(epoch_losses),
            "rng": _rng_state(), "train_config": _plain(dataclasses.asdict(config)),
            "metadata": meta}


def _restore(path, model, optimizer, scheduler, result, total_steps) -> list[float]:
    state = load_checkpoint(path)
    if state.get("total_steps") != total_steps:
        raise ValueError(f"cannot resume {str(path)!r}: it was trained for "
                         f"total_steps={state.get('total_steps')}, this run has {total_steps} "
                         f"(epochs, batch_size and data size must match)")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    result.step, result.epoch = int(state["step"]), int(state["epoch"])
    result.best_val_psnr, result.best_epoch = float(state["best_val_psnr"]), int(state["best_epoch"])
    result.history = [dict(r) for r in state["history"]]
    return [float(v) for v in state.get("epoch_losses", [])]


def _plain(value: Any) -> Any:
    """Convert tuples to lists recursively (plain checkpoint values)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------- experiment setup
def default_setup(**overrides: Any) -> dict[str, Any]:
    """The acquisition and data settings of an experiment, as plain values.

    Keys: ``dataset`` (``"ellipses"`` or ``"digits"``), ``image_size``, ``n_angles`` (parallel
    beam, equispaced in ``[0, π)``; sparse view = few angles), ``n_detectors`` (``None``: the
    geometry's default), ``noise`` (``"none"``, ``"poisson"``: ``b ~ Poisson(I₀ e^{-μ y})``
    with ``photons = I₀`` and ``mu_scale = μ`` (``None``: ``4 / image_size``, i.e. optical depth
    4 across a unit-valued image), or ``"gaussian"`` with relative ``noise_level``),
    ``n_ellipses`` (mean number of random ellipses per phantom), ``fbp_filter``,
    ``data_seed`` (train / val / test use seeds ``data_seed + 0, 1, 2``),
    ``n_train``, ``n_val``, ``n_test``.
    """
    setup = dict(dataset="ellipses", image_size=64, n_angles=30, n_detectors=None, noise="none",
                 photons=7e4, mu_scale=None, noise_level=0.05, n_ellipses=50.0, fbp_filter="hann",
                 data_seed=0, n_train=512, n_val=32, n_test=64)
    unknown = set(overrides) - set(setup)
    if unknown:
        raise ValueError(f"unknown setup keys {sorted(unknown)}; known: {sorted(setup)}")
    setup.update(overrides)
    if setup["dataset"] not in ("ellipses", "digits"):
        raise ValueError(f"dataset must be 'ellipses' or 'digits', got {setup['dataset']!r}")
    if setup["noise"] not in ("none", "poisson", "gaussian"):
        raise ValueError(f"noise must be 'none', 'poisson' or 'gaussian', got {setup['noise']!r}")
    return setup


def make_operator(setup: Mapping[str, Any]):
    """Parallel-beam ``RayTransform`` (torch backend) of ``setup``."""
    from recon.operators import ParallelBeamGeometry, RayTransform

    size = int(setup["image_size"])
    geometry = ParallelBeamGeometry((size, size), n_angles=int(setup["n_angles"]),
                                    n_detectors=setup.get("n_detectors"))
    return RayTransform(geometry, backend="torch", check_finite=False)


def _noise_model(setup: Mapping[str, Any]):
    from recon.data import GaussianNoise, PoissonNoise

    if setup["noise"] == "poisson":
        mu = setup.get("mu_scale") or 4.0 / int(setup["image_size"])
        return PoissonNoise(float(setup["photons"]), mu_scale=float(mu))
    if setup["noise"] == "gaussian":
        return GaussianNoise(float(setup["noise_level"]))
    return None


def build_setup(setup: Mapping[str, Any], split: str = "train", n: int | None = None,
                operator: Any = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(operator, data)`` of one split (``"train"``, ``"val"``, ``"test"``) of ``setup``.

    ``data`` is :func:`stack_dataset` of the simulated items (``sinogram``, ``image``, ``fbp``);
    ``n`` overrides the split size ``setup["n_<split>"]``.
    """
    from recon.data import DigitsDataset, EllipsePhantomDataset

    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    operator = operator if operator is not None else make_operator(setup)
    n = int(setup[f"n_{split}"] if n is None else n)
    seed = int(setup["data_seed"]) + {"train": 0, "val": 1, "test": 2}[split]
    kwargs = dict(noise=_noise_model(setup), fbp_filter=setup["fbp_filter"])
    if setup["dataset"] == "ellipses":
        dataset = EllipsePhantomDataset(n, int(setup["image_size"]), operator, seed=seed,
                                        n_ellipses=float(setup.get("n_ellipses", 50.0)), **kwargs)
    else:  # digits: validation is the tail of the training split, test the held-out split
        n_train = int(setup["n_train"])
        if split == "test":
            dataset = DigitsDataset(int(setup["image_size"]), operator, split="test",
                                    n_samples=n, seed=seed, **kwargs)
        else:
            full = DigitsDataset(int(setup["image_size"]), operator, split="train",
                                 n_samples=n_train + int(setup["n_val"]), seed=seed, **kwargs)
            offset = 0 if split == "train" else n_train
            dataset = [full[offset + i] for i in range(n)]
    data = stack_dataset(dataset)
    check_data_matches_operator(data, operator)
    return operator, data


# ---------------------------------------------------------------------------- command line
def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = default_setup()
    g = parser.add_argument_group("data and geometry")
    g.add_argument("--dataset", choices=("ellipses", "digits"), default=d["dataset"])
    g.add_argument("--image-size", type=int, default=d["image_size"])
    g.add_argument("--n-angles", type=int, default=d["n_angles"],
                   help="parallel-beam angles in [0, pi) (sparse view: few)")
    g.add_argument("--n-detectors", type=int, default=None)
    g.add_argument("--noise", choices=("none", "poisson", "gaussian"), default=d["noise"])
    g.add_argument("--photons", type=float, default=d["photons"], help="Poisson I0 (7e4)")
    g.add_argument("--mu-scale", type=float, default=None,
                   help="Poisson optical depth per sinogram unit (default 4/image_size)")
    g.add_argument("--noise-level", type=float, default=d["noise_level"])
    g.add_argument("--n-ellipses", type=float, default=d["n_ellipses"],
                   help="mean number of random ellipses per phantom")
    g.add_argument("--fbp-filter", default=d["fbp_filter"])
    g.add_argument("--data-seed", type=int, default=d["data_seed"])
    g.add_argument("--n-train", type=int, default=d["n_train"])
    g.add_argument("--n-val", type=int, default=d["n_val"])
    m = parser.add_argument_group("model")
    m.add_argument("--model", choices=("lpd", "lspd", "sklspd"), default="lpd")
    m.add_argument("--preset", choices=("digits", "clinical"), default="digits")
    m.add_argument("--iterations", type=int, help="unrolled iterations K")
    m.add_argument("--channels", type=int, help="hidden channels of every block")
    m.add_argument("--kernel-size", type=int)
    m.add_argument("--subsets", type=int, help="LSPD / Sk-LSPD angle subsets m")
    m.add_argument("--subset-order", choices=("cyclic", "random"))
    m.add_argument("--sketch-factor", type=int, help="Sk-LSPD grid coarsening")
    m.add_argument("--unsketched", type=int, help="Sk-LSPD: last layers on the full grid")
    m.add_argument("--step-init", type=float, help="initial sigma_k, tau_k (normalised A)")
    m.add_argument("--init", choices=("fbp", "zero"))
    o = parser.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--lr", type=float, default=5e-5, help="Adam learning rate (5e-5)")
    o.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.99))
    o.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    o.add_argument("--warmup", type=int, default=0, help="linear lr warm-up steps")
    o.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (<=0: none)")
    o.add_argument("--seed", type=int, default=0, help="weights, sample order, random subsets")
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    o.add_argument("--out", default=None, help="checkpoint folder (default runs/<model>)")
    o.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    o.add_argument("--save-every", type=int, default=0, help="also save last.pt every N steps")
    o.add_argument("--no-progress", action="store_true")


_MODEL_ARGS = {"iterations": "n_iterations", "channels": "hidden_channels",
               "kernel_size": "kernel_size", "subsets": "n_subsets",
               "subset_order": "subset_order", "sketch_factor": "sketch_factor",
               "unsketched": "n_unsketched", "step_init": "step_init", "init": "init"}


def train_from_args(args: argparse.Namespace) -> TrainResult:
    """Run ``python -m recon.train train`` with parsed ``args``; returns the :class:`TrainResult`."""
    from .models import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    setup = default_setup(dataset=args.dataset, image_size=args.image_size,
                          n_angles=args.n_angles, n_detectors=args.n_detectors, noise=args.noise,
                          photons=args.photons, mu_scale=args.mu_scale,
                          noise_level=args.noise_level, n_ellipses=args.n_ellipses,
                          fbp_filter=args.fbp_filter, data_seed=args.data_seed, n_train=args.n_train, n_val=args.n_val)
    operator, train_data = build_setup(setup, "train")
    _, val_data = build_setup(setup, "val", operator=operator)
    overrides = {key: getattr(args, arg) for arg, key in _MODEL_ARGS.items()
                 if getattr(args, arg) is not None}
    torch.manual_seed(args.seed)
    model = build_model(args.model, operator, args.preset,
                        fbp_filter=setup["fbp_filter"], **overrides)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         betas=tuple(args.betas), schedule=args.schedule,
                         warmup_steps=args.warmup,
                         clip_grad_norm=args.clip if args.clip > 0 else None, seed=args.seed,
                         device=args.device, save_every=args.save_every,
                         progress=not args.no_progress)
    metadata = {"model_name": args.model, "model_config": model.get_config(), "setup": setup}
    out = Path(args.out or f"runs/{args.model}")
    return fit(model, train_data, val_data, config, out, resume=args.resume, metadata=metadata)


def main(argv: Sequence[str] | None = None) -> Any:
    """``python -m recon.train {train,evaluate} ...``."""
    from . import evaluate

    parser = argparse.ArgumentParser(prog="python -m recon.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_arguments(sub.add_parser("train", help="train LPD / LSPD / Sk-LSPD"))
    evaluate.add_arguments(sub.add_parser("evaluate", help="Table 3.1 analog of checkpoints"))
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        return evaluate.run(args)
    result = train_from_args(args)
    for record in result.history:
        print(f"epoch {int(record['epoch']):3d}  step {int(record['step']):6d}  "
              f"train loss {record['train_loss']:.3e}  val PSNR {record['val_psnr']:.2f} dB  "
              f"({record['seconds']:.1f} s)")
    print(f"best val PSNR {result.best_val_psnr:.2f} dB (epoch {result.best_epoch}); "
          f"checkpoints {result.best_path}, {result.last_path}")
    return result


if __name__ == "__main__":
    main()
