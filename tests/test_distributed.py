"""Data-parallel HOAG / MAID on torch.distributed (2 gloo processes on the CPU)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from bilevel.distributed import (ShardWeightedLoss, all_reduce, all_reduce_dict, data_parallel,
                                 is_active, shard_batch, shard_range, shard_weight)

import _distributed_worker as W

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def _spawn(tmp_path, method: str, mode: str = "ok", world: int = 2) -> list:
    store = tmp_path / "store"
    # fork (Linux) reuses the imported torch: ~0.5 s instead of ~5 s of imports per process
    method_ = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(W.worker, args=(world, str(store), method, str(tmp_path), mode),
                       nprocs=world, join=True, start_method=method_)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("method,mode", [("HOAG", "ok"), ("MAID", "ok"), ("HOAG", "sum"),
                                         ("MAID", "resume"), ("QuasiNewton", "ok"),
                                         ("QuasiNewton", "resume")])
def test_two_processes_follow_the_one_process_trajectory(tmp_path, method, mode):
    torch.set_num_threads(1)
    batch, theta0 = W.tv_problem()
    loss = "sum" if mode == "sum" else "mean"
    one = W.trajectory(W.make_solver(method, loss).run(theta0, batch))
    outs = _spawn(tmp_path, method, mode)
    for r, out in enumerate(outs):
        assert "error" not in out, out.get("trace")
        two = torch.tensor(out["trajectory"], dtype=torch.float64)
        ref = torch.tensor(one, dtype=torch.float64)
        assert two.shape == ref.shape, (r, two.shape, ref.shape)
        assert torch.allclose(two, ref, rtol=1e-6, atol=1e-6), (r, (two - ref).abs().max())
    assert len(one) >= 4 and abs(one[-1][0] - one[0][0]) > 1e-2  # θ really moved


def test_a_per_rank_checkpoint_refuses_another_world_size(tmp_path):
    from bilevel import Result
    _spawn(tmp_path, "HOAG", mode="resume")
    assert sorted(p.name for p in tmp_path.glob("ckpt.pt*")) == ["ckpt.pt.rank0", "ckpt.pt.rank1"]
    batch, theta0 = W.tv_problem()
    saved = Result.load(str(tmp_path / "ckpt.pt.rank0"))
    with pytest.raises(ValueError, match="world size 2, this run has 1"):
        W.make_solver("HOAG").run(theta0, batch, resume=saved)


def test_ranks_with_different_theta_names_raise(tmp_path):
    outs = _spawn(tmp_path, "HOAG", mode="names")
    assert all("theta0's names differs between ranks" in o.get("error", "") for o in outs), outs


def test_world_size_larger_than_the_batch_raises(tmp_path):
    outs = _spawn(tmp_path, "HOAG", mode="too_many")
    assert all("world size 2 is larger than the number of samples 1" in o.get("error", "")
               or "a rank holds no samples" in o.get("error", "") for o in outs), outs


def test_helpers_are_identities_without_a_process_group():
    d = {"a": torch.ones(3)}
    with data_parallel() as on:
        assert not on and not is_active()
        assert all_reduce(2.5, "max") == 2.5 and all_reduce(True) is True
        red, extra = all_reduce_dict(d, extra=[1.0])
        assert torch.equal(red["a"], d["a"]) and extra == [1.0]
        assert shard_weight(7) == 1.0 / 1.0 * 7 / 7


def test_shards_cover_the_batch_in_order_and_bad_sizes_raise():
    n, world = 7, 3
    ranges = [shard_range(n, r, world) for r in range(world)]
    assert [len(r) for r in ranges] == [3, 2, 2]
    assert [i for r in ranges for i in r] == list(range(n))
    batch = {"y": torch.arange(7.0), "meta": "kept"}
    parts = [shard_batch(batch, r, world) for r in range(world)]
    assert torch.equal(torch.cat([p["y"] for p in parts]), batch["y"]) and parts[1]["meta"] == "kept"
    with pytest.raises(ValueError, match="world size 8 is larger than the number of samples 7"):
        shard_range(7, 0, 8)
    with pytest.raises(ValueError, match="share one batch length"):
        shard_batch({"a": torch.zeros(3), "b": torch.zeros(4)}, 0, 2)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        shard_weight(3, "median")


def test_shard_weighted_loss_scales_and_forwards_parameters():
    from recon.losses import MSEToTarget
    base = MSEToTarget()
    base.scale = torch.nn.Parameter(torch.ones(()))
    wrapped = ShardWeightedLoss(base, 0.25)
    x = torch.ones(2, 1, 2, 2)
    batch = {"image": torch.zeros(2, 1, 2, 2)}
    assert float(wrapped(x, {}, batch)) == pytest.approx(0.25 * float(base(x, {}, batch)))
    assert list(wrapped.trainable_parameters()) == ["scale"]
