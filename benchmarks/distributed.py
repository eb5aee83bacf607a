"""Data-parallel HOAG / MAID and DDP training: 1 against N processes (gloo, CPU), one run.

    python benchmarks/distributed.py [--processes 1 2] [--batch 16] [--size 48] [--quick]

Setup: ``TVDenoising`` + ``MSEToTarget`` in float64 on ``batch`` noisy squares of ``size²``,
HOAG (10 outer iterations) and MAID (8), ``gtol = 0`` so every world size does the same
iterations; samples sharded by :func:`bilevel.distributed.shard_batch`. DDP training: the LPD of
``recon.train`` (3 iterations, 16 channels) on 32² disks, 16 training samples, batch 8, 2
epochs. Each world size runs in fresh (forked) processes with one torch thread each; the clock
starts after the process group is up and stops at the end of the run (rank 0).

Reported per row: wall seconds, speed-up over 1 process (same run), the θ trajectory's largest
difference from the 1-process one, and the communication of rank 0 per outer iteration
(collectives issued by :mod:`bilevel.distributed` and their payload bytes; for DDP training the
gradient bytes all-reduced per step = 4 · number of parameters). Writes
``benchmarks/results/distributed.json`` (``--out``).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bilevel import HOAG, MAID  # noqa: E402
from bilevel import distributed as bdist  # noqa: E402
from recon.io import atomic_write  # noqa: E402
from recon.scripts import SMOKE_RUN, apply_quick, help_parser  # noqa: E402
from recon.losses import MSEToTarget  # noqa: E402
from recon.problems import TVDenoising  # noqa: E402


def tv_batch(n: int, size: int):
    g = torch.Generator().manual_seed(0)
    clean = torch.zeros(n, 1, size, size, dtype=torch.float64)
    q = size // 4
    clean[:, :, q:size - q, q:size - q] = 1.0
    clean = clean * torch.linspace(0.5, 1.5, n, dtype=torch.float64).view(-1, 1, 1, 1)
    y = clean + 0.2 * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    theta0 = {"log_weight": torch.tensor(-4.0, dtype=torch.float64),
              "log_smoothing": torch.tensor(-3.0, dtype=torch.float64)}
    return {"y": y, "image": clean}, theta0


def bilevel_job(method: str, n: int, size: int) -> dict:
    batch, theta0 = tv_batch(n, size)
    local = bdist.shard_batch(batch) if bdist.group_ready() else batch
    solver = (HOAG(TVDenoising(), MSEToTarget(), max_iter=10, gtol=0, xtol=0) if method == "HOAG"
              else MAID(TVDenoising(), MSEToTarget(), max_iter=8, gtol=0))
    bdist.reset_comm_stats()
    t0 = time.perf_counter()
    res = solver.run(theta0, local)
    seconds = time.perf_counter() - t0
    stats = bdist.comm_stats()
    iters = len(res.history)
    return {"seconds": seconds, "iterations": iters,
            "collectives_per_iteration": stats["calls"] / iters,
            "bytes_per_iteration": stats["bytes"] / iters,
            "trajectory": [list(r["theta"].values()) for r in res.history.records]}


def train_job(n_train: int = 16) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from _dense_operator import DenseRayTransform, parallel_angles
    from recon.models import LearnedPrimalDual
    from recon.train import TrainConfig, fit
    op = DenseRayTransform((32, 32), parallel_angles(16))
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    images = torch.zeros(n_train + 4, 1, 32, 32)
    for i in range(len(images)):
        c = torch.rand(2, generator=g) - 0.5
        images[i, 0] = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 < 0.3 ** 2) * 0.5 + 0.02 * i
    data = {"sinogram": op(images), "image": images}
    train = {k: v[:n_train] for k, v in data.items()}
    val = {k: v[n_train:] for k, v in data.items()}
    torch.manual_seed(0)
    model = LearnedPrimalDual(op, n_iterations=3, hidden_channels=16, init="zero", zero_last=False)
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-3, progress=False)
    t0 = time.perf_counter()
    result = fit(model, train, val, config)
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    return {"seconds": seconds, "iterations": result.step, "collectives_per_iteration": 2,
            "bytes_per_iteration": 4 * n_params + 8,
            "trajectory": [[r["train_loss"], r["val_psnr"]] for r in result.history]}


def worker(rank, world, store, out, jobs, n, size):
    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                             world_size=world)
    rows = {}
    for job in jobs:
        if world > 1:
            torch.distributed.barrier()
        rows[job] = train_job() if job == "DDP training" else bilevel_job(job, n, size)
    if world > 1:
        rows["_latency"] = {str(b): allreduce_seconds(b) for b in (8, 64, 4096, 1 << 20)}
        torch.distributed.destroy_process_group()
    if rank == 0:
        torch.save(rows, os.path.join(out, f"world{world}.pt"))


def allreduce_seconds(nbytes: int, repeats: int = 200) -> float:
    """Median wall seconds of one all-reduce of ``nbytes`` (float64) on the default group."""
    t = torch.zeros(max(nbytes // 8, 1), dtype=torch.float64)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.distributed.all_reduce(t)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> dict:
    p = help_parser(__doc__)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 4 of 16², written to runs/quick/ (numbers not meaningful)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "distributed.json"))
    args = p.parse_args(argv)
    if args.quick:
        for line in apply_quick(p, args, argv, {"batch": 4, "size": 16},
                                out=os.path.join("runs", "quick", "distributed.json")):
            print(line)
    n, size = args.batch, args.size
    jobs = ["HOAG", "MAID", "DDP training"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.processes:
            mp.start_processes(worker, args=(world, os.path.join(tmp, f"store{world}"), tmp,
                                             jobs, n, size),
                               nprocs=world, join=True, start_method="fork")
            results[world] = torch.load(os.path.join(tmp, f"world{world}.pt"), weights_only=True)
    base = results[args.processes[0]]
    rows = []
    header = (f"{'job':<13} {'procs':>5} {'seconds':>8} {'speed-up':>8} {'max|Δθ|':>9} "
              f"{'coll/it':>8} {'bytes/it':>9}")
    lines = [header, "-" * len(header)]
    for job in jobs:
        ref = torch.tensor(base[job]["trajectory"], dtype=torch.float64)
        for world in args.processes:
            r = results[world][job]
            diff = float((torch.tensor(r["trajectory"], dtype=torch.float64) - ref).abs().max())
            row = {"job": job, "processes": world, "seconds": r["seconds"],
                   "speedup": base[job]["seconds"] / r["seconds"], "max_trajectory_diff": diff,
                   "iterations": r["iterations"],
                   "collectives_per_iteration": r["collectives_per_iteration"] if world > 1 else 0,
                   "bytes_per_iteration": r["bytes_per_iteration"] if world > 1 else 0}
            rows.append(row)
            lines.append(f"{job:<13} {world:>5} {row['seconds']:>8.2f} {row['speedup']:>8.2f} "
                         f"{diff:>9.1e} {row['collectives_per_iteration']:>8.1f} "
                         f"{row['bytes_per_iteration']:>9.0f}")
    latency = {k: v for w in args.processes if w > 1 for k, v in results[w]["_latency"].items()}
    lines.append("gloo all-reduce (median, " + ", ".join(
        f"{int(b)} B: {1e6 * t:.0f} µs" for b, t in latency.items()) + ")")
    print("\n".join(lines))
    report = {"rows": rows, "allreduce_seconds_by_bytes": latency, "batch": n, "size": size, "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "backend": "gloo", "threads_per_process": 1}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with atomic_write(args.out, "w") as fh:
        fh.write(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    if args.quick:
        print(SMOKE_RUN)
    return report


if __name__ == "__main__":
    main()
