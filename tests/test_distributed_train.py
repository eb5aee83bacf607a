"""Data-parallel ``recon.train`` (DistributedDataParallel over 2 gloo processes on the CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from recon.checkpoint import load_checkpoint

import _distributed_worker as W

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not torch.distributed.is_available() or
                                 not torch.distributed.is_gloo_available(),
                                 reason="torch.distributed with gloo is needed")]

ROOT = Path(__file__).resolve().parents[1]


def _two_processes(tmp_path, out_dir, max_steps=None, resume=False, tag="a") -> dict:
    work = tmp_path / f"work-{tag}"
    work.mkdir()
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(W.fit_worker, args=(2, str(work / "store"), str(work), str(out_dir),
                                           max_steps, resume),
                       nprocs=2, join=True, start_method=method)
    outs = [torch.load(work / f"fit_rank{r}.pt", weights_only=True) for r in range(2)]
    for out in outs:
        assert "error" not in out, out.get("trace")
    return outs


def _same_run(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a["step"] == b["step"]
    assert len(a["history"]) == len(b["history"])
    for ra, rb in zip(a["history"], b["history"]):
        for key in ("train_loss", "val_psnr", "lr", "step"):
            assert ra[key] == pytest.approx(rb[key], rel=tol, abs=tol), (key, ra, rb)
    for name, value in a["model"].items():
        assert torch.allclose(value, b["model"][name], rtol=tol, atol=tol), name


def test_two_process_ddp_training_equals_one_process_and_rank0_writes(tmp_path):
    one = W.fit_run(str(tmp_path / "one"))
    outs = _two_processes(tmp_path, tmp_path / "two")
    _same_run(outs[0], outs[1], tol=0.0)  # identical parameters on both ranks
    _same_run(one, outs[0])
    assert sorted(os.listdir(tmp_path / "two")) == ["best.pt", "last.pt"]  # no temporaries
    saved = load_checkpoint(tmp_path / "two" / "last.pt")
    assert not any(k.startswith("module.") for k in saved["model"])  # DDP's prefix stripped


def test_resume_with_another_world_size_continues_the_same_run(tmp_path):
    full = W.fit_run(str(tmp_path / "ref"))
    _two_processes(tmp_path, tmp_path / "run", max_steps=4, tag="first")  # 2 processes ...
    resumed = W.fit_run(str(tmp_path / "run"), resume=True)  # ... then 1 process
    _same_run(full, resumed)
    W.fit_run(str(tmp_path / "run2"), max_steps=2)  # 1 process, then 2 processes
    outs = _two_processes(tmp_path, tmp_path / "run2", resume=True, tag="second")
    _same_run(full, outs[0])


def test_torchrun_cli_trains_with_two_gloo_processes(tmp_path):
    out = tmp_path / "lpd"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "recon.train", "train",
           "--model", "lpd", "--image-size", "16", "--n-angles", "8", "--n-train", "6",
           "--n-val", "2", "--epochs", "1", "--batch-size", "3", "--iterations", "2",
           "--channels", "4", "--device", "cpu", "--threads", "1", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best val PSNR") == 1  # rank 0 reports, once
    assert proc.stderr.count("0/2 [") == 1  # one progress bar (rank 0's), drawn from 0 once
    assert load_checkpoint(out / "last.pt")["step"] == 2
