"""Device check of the data-parallel code on CUDA tensors: 2 processes sharing one GPU (gloo
moves the reductions through host memory) against 1 process, for HOAG, MAID and DDP training.

    python benchmarks/distributed_cuda_check.py      # prints one line per job, writes JSON
    python benchmarks/distributed_cuda_check.py --out runs/cuda_check.json

Needs a CUDA GPU (on a machine without one it says so and exits with status 2).

One GPU cannot host two NCCL ranks (NCCL refuses two ranks on one device), so by default the
two processes talk through gloo and this checks the device handling (tensors on CUDA, DDP
with ``device_ids``), not NCCL speed. ``--backend nccl`` runs the same jobs over NCCL with one
GPU per process (rank r on cuda:r) and needs at least two GPUs.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import _distributed_worker as W  # noqa: E402
from bilevel.distributed import shard_batch  # noqa: E402
from recon.scripts import help_parser  # noqa: E402


def cuda_problem():
    batch, theta0 = W.tv_problem(n=6, size=32)
    return ({k: v.cuda() for k, v in batch.items()}, {k: v.cuda() for k, v in theta0.items()})


def bilevel(method: str) -> list:
    batch, theta0 = cuda_problem()
    if torch.distributed.is_initialized():
        batch = shard_batch(batch)
    return W.trajectory(W.make_solver(method).run(theta0, batch))


def training() -> list:
    from recon.train import TrainConfig, fit
    model, train, val = W.fit_setup()
    config = TrainConfig(epochs=2, batch_size=3, lr=1e-3, progress=False, seed=1, device="cuda")
    result = fit(model, train, val, config)
    return [[r["train_loss"], r["val_psnr"]] for r in result.history]


def guarded(fn, *args):
    """``fn(*args)``, or the error as a string (so one failing job does not hide the others)."""
    try:
        return fn(*args)
    except Exception as exc:  # reported in the table
        return f"{type(exc).__name__}: {exc}"[:300]


def worker(rank, world, store, out, backend="gloo"):
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                                         world_size=world)
    rows = {m: guarded(bilevel, m) for m in ("HOAG", "MAID")}
    rows["DDP training"] = guarded(training)
    torch.distributed.destroy_process_group()
    if rank == 0:
        torch.save(rows, os.path.join(out, "two.pt"))


def parse_args(argv=None):
    """``--out`` (default: ``$OUT/distributed_cuda_check.json`` or ``benchmarks/results/``)."""
    p = help_parser(__doc__)
    default = os.path.join(os.environ.get("OUT", os.path.join(ROOT, "benchmarks", "results")),
                           "distributed_cuda_check.json")
    p.add_argument("--out", default=default, help="where the JSON report goes")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                   help="process-group backend of the 2-process run (nccl: one GPU per process)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    if args.backend == "nccl" and torch.cuda.device_count() < 2:
        p.error(f"--backend nccl needs 2 GPUs (NCCL refuses two ranks on one device); this "
                f"machine has {torch.cuda.device_count()}; use --backend gloo")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    one = {m: guarded(bilevel, m) for m in ("HOAG", "MAID")}
    one["DDP training"] = guarded(training)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(2, os.path.join(tmp, "store"), tmp, args.backend),
                           nprocs=2, start_method="spawn")
        two = torch.load(os.path.join(tmp, "two.pt"), weights_only=True)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "backend": args.backend, "seconds": time.perf_counter() - t0}
    for job in one:
        if isinstance(one[job], str) or isinstance(two[job], str):
            report[job] = {"error_1_process": one[job] if isinstance(one[job], str) else None,
                           "error_2_processes": two[job] if isinstance(two[job], str) else None}
            print(job, report[job])
            continue
        a = torch.tensor(one[job], dtype=torch.float64)
        b = torch.tensor(two[job], dtype=torch.float64)
        diff = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
        report[job] = {"records": len(one[job]), "max_diff_2_vs_1_process": diff}
        print(f"{job:<13} records {len(one[job]):3d}  max |2 procs - 1 proc| = {diff:.2e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
