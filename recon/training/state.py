"""Training state on disk: what ``last.pt`` holds and how a resume checks and restores it.

``last.pt`` stores the model, optimizer, scheduler, step / epoch counters, best validation
PSNR, history, the running epoch's losses, the random state, the :class:`TrainConfig` and the
caller's metadata (model name and configuration, experiment set-up).  :func:`restore` refuses
a resume whose settings differ from the saved ones, listing every difference (the one
resume rule, :func:`recon.checkpoint.check_resume`); only
``device``, ``progress`` and ``save_every`` may change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from ..checkpoint import ResumeMismatchError, check_resume, load_checkpoint
from ..checkpoint import settings_differences as _differences

__all__ = ["ResumeMismatchError", "settings_differences", "training_state", "restore"]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def training_state(model, optimizer, scheduler, result, total_steps, config, meta,
                   epoch_losses) -> dict:
    """The content of ``last.pt`` (plain values and tensors only, loadable weights-only)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": result.step, "epoch": result.epoch,
            "best_val_psnr": result.best_val_psnr, "best_epoch": result.best_epoch,
            "history": [dict(r) for r in result.history], "total_steps": total_steps,
            "epoch_losses": list(epoch_losses),
            "rng": _rng_state(), "train_config": _plain(dataclasses.asdict(config)),
            "metadata": meta}


#: Settings that may change on resume: where it runs and how it reports.
_RESUMABLE = ("device", "progress", "save_every")


def restore(path, model, optimizer, scheduler, result, total_steps, config, meta) -> list[float]:
    """Load ``last.pt`` at ``path`` into the objects; refuse it if the run's settings differ.

    Returns the losses of the unfinished epoch.  Settings missing from an older ``last.pt``
    count as the defaults of ``type(config)``.
    """

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {str(path)!r} does not exist (no earlier run "
                                f"in this folder); train without resume")
    state = load_checkpoint(path)
    saved_config = {**_plain(dataclasses.asdict(type(config)())), **(state.get("train_config") or {})}
    check_resume(path, {"train_config": saved_config, "metadata": state.get("metadata"),
                        "total_steps": state.get("total_steps")},
                 {"train_config": _plain(dataclasses.asdict(config)), "metadata": _plain(meta),
                  "total_steps": total_steps},
                 ignore=[f"train_config.{key}" for key in _RESUMABLE],
                 hint="(total_steps follows from epochs, batch_size and the data size)\n"
                      "use the saved settings, or a new output folder")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    result.step, result.epoch = int(state["step"]), int(state["epoch"])
    result.best_val_psnr, result.best_epoch = float(state["best_val_psnr"]), int(state["best_epoch"])
    result.history = [dict(r) for r in state["history"]]
    return [float(v) for v in state.get("epoch_losses", [])]


def settings_differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Lines ``key: saved (saved) != now (now)`` for every leaf that differs (nested dicts;
    :func:`recon.checkpoint.settings_differences`).

    Keys in :data:`_RESUMABLE` of a ``train_config`` are ignored.
    """
    return _differences(saved, now, prefix, ignore=[f"train_config.{k}" for k in _RESUMABLE])


def _plain(value: Any) -> Any:
    """Convert tuples to lists recursively (plain checkpoint values)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


