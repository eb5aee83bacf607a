"""Worker processes for tests/test_distributed.py (importable, so torch.multiprocessing.spawn
can start them): one data-parallel HOAG / MAID run per rank on a gloo group over a file store."""
from __future__ import annotations

import os
import traceback

import torch


def tv_problem(n: int = 5, size: int = 8, seed: int = 0):
    """A float64 smoothed-TV denoising batch of ``n`` noisy squares and θ0."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.zeros(n, 1, size, size, dtype=torch.float64)
    clean[:, :, 2:size - 2, 2:size - 2] = 1.0
    clean = clean * torch.linspace(0.5, 1.5, n, dtype=torch.float64).view(-1, 1, 1, 1)
    y = clean + 0.2 * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    theta0 = {"log_weight": torch.tensor(-4.0, dtype=torch.float64),
              "log_smoothing": torch.tensor(-3.0, dtype=torch.float64)}
    return {"y": y, "image": clean}, theta0


def make_solver(method: str, **kw):
    from bilevel import HOAG, MAID
    from recon.losses import MSEToTarget
    from recon.problems import TVDenoising
    if method == "HOAG":
        return HOAG(TVDenoising(), MSEToTarget(), max_iter=8, gtol=0, xtol=0, **kw)
    return MAID(TVDenoising(), MSEToTarget(), max_iter=6, gtol=0, **kw)


def trajectory(result) -> list:
    return [[float(v) for v in rec["theta"].values()] + [float(rec["upper_loss"])]
            for rec in result.history.records]


def worker(rank: int, world: int, store: str, method: str, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world)
    try:
        from bilevel.distributed import shard_batch
        batch, theta0 = tv_problem()
        if mode == "names" and rank == 1:
            theta0 = {"log_weight": theta0["log_weight"], "other": theta0["log_smoothing"]}
        if mode == "too_many":
            batch = {k: v[:1] for k, v in batch.items()}
            local = {k: v[:1] if rank == 0 else v[:0] for k, v in batch.items()}
        else:
            local = shard_batch(batch)
        result = make_solver(method).run(theta0, local)
        payload = {"trajectory": trajectory(result), "message": result.message}
    except Exception as exc:  # reported to the test, which asserts on it
        payload = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    finally:
        torch.distributed.destroy_process_group()
    torch.save(payload, os.path.join(out, f"rank{rank}.pt"))
