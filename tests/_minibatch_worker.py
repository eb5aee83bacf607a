"""Helpers and worker processes for tests/test_minibatch.py: a tiny smoothed-TV data set and
one data-parallel :class:`bilevel.MinibatchBilevel` run per rank on a gloo group."""
from __future__ import annotations

import os
import traceback

import torch


def tv_data(n: int = 8, size: int = 8, seed: int = 0):
    """``n`` noisy squares of varying contrast (float64), ``{"y", "image"}``, and θ0."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.zeros(n, 1, size, size, dtype=torch.float64)
    clean[:, :, 2:size - 2, 2:size - 2] = 1.0
    clean = clean * torch.linspace(0.5, 1.5, n, dtype=torch.float64).view(-1, 1, 1, 1)
    y = clean + 0.2 * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    theta0 = {"log_weight": torch.tensor(-4.0, dtype=torch.float64),
              "log_smoothing": torch.tensor(-3.0, dtype=torch.float64)}
    return {"y": y, "image": clean}, theta0


def make_loop(**kw):
    from bilevel import Bounds, MinibatchBilevel
    from recon.losses import MSEToTarget
    from recon.problems import TVDenoising
    kw = {"epochs": 2, "batch_size": 4, "lr": 0.3, "gtol": 0.0,
          "bounds": Bounds(lower={"log_smoothing": -8.0}, upper={"log_smoothing": 1.0}), **kw}
    return MinibatchBilevel(TVDenoising(), MSEToTarget(), **kw)


def trajectory(result) -> list:
    return [[float(v) for _, v in sorted(rec["theta"].items())] + [float(rec["upper_loss"])]
            for rec in result.history.records]


def worker(rank: int, world: int, store: str, out: str, optimizer: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world)
    try:
        data, theta0 = tv_data()
        val, _ = tv_data(4, seed=1)
        result = make_loop(optimizer=optimizer, shuffle=False).run(theta0, data, val)
        payload = {"trajectory": trajectory(result), "message": result.message,
                   "val": [e["val_loss"] for e in result.state["epochs"]]}
    except Exception as exc:  # reported to the test, which asserts on it
        payload = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    finally:
        torch.distributed.destroy_process_group()
    torch.save(payload, os.path.join(out, f"rank{rank}.pt"))


def killed_run(path: str, stop_at: int, optimizer: str) -> None:
    """A checkpointed run that kills its own process (SIGKILL) after step ``stop_at``."""
    import signal
    torch.set_num_threads(1)
    data, theta0 = tv_data(12)

    def die(rec, theta):
        if rec["iteration"] + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGKILL)

    make_loop(optimizer=optimizer, epochs=3, checkpoint=path, checkpoint_every=1,
              callback=die).run(theta0, data)
