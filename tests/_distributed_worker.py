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


class SumSquaredError(torch.nn.Module):
    """``ℓ = Σ_b ‖x_b − image_b‖²`` declared ``reduction = "sum"`` (combined by a plain sum)."""

    reduction = "sum"

    def forward(self, x, theta, batch):
        return ((x - batch["image"]) ** 2).sum()

    def trainable_parameters(self):
        return {}


def make_solver(method: str, loss: str = "mean", **kw):
    from bilevel import HOAG, MAID, QuasiNewton
    from recon.losses import MSEToTarget
    from recon.problems import TVDenoising
    outer = MSEToTarget() if loss == "mean" else SumSquaredError()
    if method == "HOAG":
        kw = {"max_iter": 8, **kw}
        return HOAG(TVDenoising(), outer, gtol=0, xtol=0, **kw)
    if method == "QuasiNewton":
        kw = {"max_iter": 8, **kw}
        return QuasiNewton(TVDenoising(), outer, gtol=0, **kw)
    kw = {"max_iter": 6, **kw}
    return MAID(TVDenoising(), outer, gtol=0, **kw)


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
        loss = "sum" if mode == "sum" else "mean"
        if mode == "resume":  # 4 iterations with per-rank checkpoints, then resume to the end
            from bilevel import Result
            path = os.path.join(out, "ckpt.pt")
            make_solver(method, max_iter=4, checkpoint=path).run(theta0, local)
            result = make_solver(method).run(theta0, local,
                                             resume=Result.load(f"{path}.rank{rank}"))
        else:
            result = make_solver(method, loss).run(theta0, local)
        payload = {"trajectory": trajectory(result), "message": result.message}
    except Exception as exc:  # reported to the test, which asserts on it
        payload = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    finally:
        torch.distributed.destroy_process_group()
    torch.save(payload, os.path.join(out, f"rank{rank}.pt"))


# ----------------------------------------------------------------------- recon.train fit (DDP)
def fit_setup(n_train: int = 7, n_val: int = 3):
    """A tiny LPD on 16² disks (float32) and its train / validation data."""
    from _dense_operator import DenseRayTransform, parallel_angles
    from recon.models import LearnedPrimalDual
    op = DenseRayTransform((16, 16), parallel_angles(8))
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    images = torch.zeros(n_train + n_val, 1, 16, 16)
    for i in range(len(images)):
        c = torch.rand(2, generator=g) - 0.5
        images[i, 0] = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 < 0.3 ** 2) * 0.5 + 0.1 * i / len(images)
    data = {"sinogram": op(images), "image": images}
    train = {k: v[:n_train] for k, v in data.items()}
    val = {k: v[n_train:] for k, v in data.items()}
    torch.manual_seed(0)
    model = LearnedPrimalDual(op, n_iterations=2, hidden_channels=4, n_primal=2, n_dual=2,
                              init="zero")
    return model, train, val


def fit_run(out_dir: str, max_steps=None, resume: bool = False):
    """``fit`` of :func:`fit_setup` (3 epochs of batch 3: batches of 3, 3 and 1 samples)."""
    from recon.train import TrainConfig, fit
    model, train, val = fit_setup()
    config = TrainConfig(epochs=3, batch_size=3, lr=1e-3, progress=False, seed=1)
    result = fit(model, train, val, config, out_dir, max_steps=max_steps, resume=resume)
    return {"history": [dict(r, seconds=0.0) for r in result.history], "step": result.step,
            "model": {k: v.clone() for k, v in model.state_dict().items()}}


def fit_worker(rank: int, world: int, store: str, out: str, out_dir: str, max_steps,
               resume: bool) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world)
    try:
        payload = fit_run(out_dir, max_steps, resume)
    except Exception as exc:
        payload = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    finally:
        torch.distributed.destroy_process_group()
    torch.save(payload, os.path.join(out, f"fit_rank{rank}.pt"))
