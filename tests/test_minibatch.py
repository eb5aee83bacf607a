"""MinibatchBilevel: the whole-set case equals full-batch gradient steps, the warm-start cache is
used and bounded, resume mid-epoch is bit-exact (also after kill -9), 2 processes equal 1,
success only after a full-data check, and bad inputs give clear errors."""
from __future__ import annotations

import multiprocessing
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from bilevel import Bounds, ImplicitCG, MinibatchBilevel, Result, solve_inner
from bilevel.linalg import batch_norm
from bilevel.minibatch import IndexedDataset, WarmStartCache
from bilevel.problem import project
from recon.losses import MSEToTarget
from recon.problems import TVDenoising

import _minibatch_worker as W


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_whole_set_minibatch_sgd_equals_full_batch_gradient_steps():
    """batch_size = N, SGD with a constant step α, accuracy 1e-10: every step is
    θ ← Π(θ − α∇ℓ(θ)) with ∇ℓ the full-batch hypergradient (up to round-off of the sums)."""
    data, theta0 = W.tv_data(6)
    alpha, tol = 20.0, 1e-10
    loop = W.make_loop(optimizer="sgd", schedule="constant", lr=alpha, epochs=4, batch_size=6,
                       tol0=tol, tol_rate=1.0, tol_min=tol)
    res = loop.run(theta0, data)
    inner, outer, bounds = TVDenoising(), MSEToTarget(), loop.bounds
    ref = float(batch_norm(inner.grad(inner.init(theta0, data), theta0, data)).max())
    theta, expected = dict(theta0), []
    for _ in range(4):
        expected.append([float(theta[k]) for k in sorted(theta)])
        x = solve_inner(inner, theta, data, tol * ref).x
        g = ImplicitCG()(inner, outer, theta, data, x, tol, relative=True).theta_grad
        theta = project({k: theta[k] - alpha * g[k] for k in theta}, bounds)
    got = [row[:2] for row in W.trajectory(res)]
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-8), (got, expected)
    assert abs(got[-1][1] - got[0][1]) > 0.1  # θ really moved


def _mean_inner(res, epoch):
    its = [r["inner_iterations"] + r["cg_iterations"] for r in res.history if r["epoch"] == epoch]
    return sum(its) / len(its)


def test_warm_start_cache_cuts_inner_work_after_the_first_epoch_and_is_bounded():
    data, theta0 = W.tv_data(16)
    kw = dict(epochs=3, batch_size=4, tol_rate=1.0, tol0=1e-7, lr=0.01)  # same accuracy throughout
    warm = W.make_loop(**kw).run(theta0, data)
    cold = W.make_loop(cache_items=0, **kw).run(theta0, data)
    hits = [r["cache_hits"] for r in warm.history]
    assert hits[:4] == [0] * 4 and all(h == 4 for h in hits[4:])
    assert all(r["cache_hits"] == 0 for r in cold.history)
    assert _mean_inner(warm, 2) < 0.85 * _mean_inner(warm, 0)  # inner + CG iterations per step
    assert _mean_inner(warm, 1) + _mean_inner(warm, 2) < 0.85 * (_mean_inner(cold, 1) + _mean_inner(cold, 2))
    small = W.make_loop(cache_items=6, **kw).run(theta0, data).state["cache"]
    assert len(small["keys"]) == 6 and small["counts"][2] > 0  # evictions happened
    entry = 2 * 8 * 8 * 8  # x and q of one 8×8 float64 sample
    capped = W.make_loop(cache_bytes=5 * entry, **kw).run(theta0, data).state["cache"]
    assert len(capped["keys"]) == 5


def test_cache_is_lru_and_round_trips():
    c = WarmStartCache(max_items=2)
    x = torch.arange(6.0).view(3, 2)
    c.put([0, 1], x[:2], None)
    got, n = c.gather([1, 0], torch.zeros(2, 2))
    assert n == 2 and torch.equal(got, x[[1, 0]])  # 0 is now the most recent
    c.put([2], x[2:], x[2:])
    assert sorted(c.state_dict()["keys"]) == [0, 2] and c.evictions == 1
    d = WarmStartCache(max_items=2)
    d.load_state_dict(c.state_dict())
    assert torch.equal(d.gather([2], torch.zeros(1, 2), which=1)[0], x[2:]) and d.nbytes == c.nbytes


@pytest.mark.parametrize("optimizer", ["adam", "sag"])
def test_resume_mid_epoch_is_bit_exact(tmp_path, optimizer):
    data, theta0 = W.tv_data(12)
    full = W.make_loop(optimizer=optimizer, epochs=3).run(theta0, data)
    path = str(tmp_path / "ckpt.pt")
    stop = lambda rec, theta: rec["iteration"] == 4  # noqa: E731  (epoch 1, second step)
    part = W.make_loop(optimizer=optimizer, epochs=3, checkpoint=path, checkpoint_every=1,
                       callback=stop).run(theta0, data)
    assert part.message == "stopped by callback" and not part.success and part.n_iter == 5
    resumed = W.make_loop(optimizer=optimizer, epochs=3).run(theta0, data, resume=Result.load(path))
    assert W.trajectory(resumed) == W.trajectory(full)
    assert all(torch.equal(resumed.theta[k], full.theta[k]) for k in full.theta)


def test_resume_after_kill_minus_9_mid_epoch_is_bit_exact(tmp_path):
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    data, theta0 = W.tv_data(12)
    path = str(tmp_path / "ckpt.pt")
    child = multiprocessing.get_context("fork").Process(target=W.killed_run, args=(path, 5, "adam"))
    child.start()
    child.join(60)
    assert child.exitcode == -9  # killed by SIGKILL after step 5, before its checkpoint
    saved = Result.load(path)
    assert saved.n_iter == 4 and saved.state["loop"]["epoch"] == 1 and saved.state["loop"]["step"] == 1
    resumed = W.make_loop(epochs=3).run(theta0, data, resume=saved)
    full = W.make_loop(epochs=3).run(theta0, data)
    assert W.trajectory(resumed) == W.trajectory(full)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is needed")
@pytest.mark.parametrize("optimizer", ["adam", "sag"])
def test_two_processes_follow_the_one_process_trajectory(tmp_path, optimizer):
    data, theta0 = W.tv_data()
    val, _ = W.tv_data(4, seed=1)
    one = W.make_loop(optimizer=optimizer, shuffle=False).run(theta0, data, val)  # a fixed order
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(W.worker, args=(2, str(tmp_path / "store"), str(tmp_path), optimizer),
                       nprocs=2, join=True, start_method=method)
    ref = torch.tensor(W.trajectory(one), dtype=torch.float64)
    for r in range(2):
        out = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert "error" not in out, out.get("trace")
        two = torch.tensor(out["trajectory"], dtype=torch.float64)
        assert two.shape == ref.shape and torch.allclose(two, ref, rtol=1e-6, atol=1e-6), \
            (r, (two - ref).abs().max())
        assert out["val"] == pytest.approx([e["val_loss"] for e in one.state["epochs"]], rel=1e-6)
    assert abs(ref[-1, 1] - ref[0, 1]) > 0.05  # θ really moved


def test_success_only_after_the_full_data_check():
    data, theta0 = W.tv_data(8)
    strict = W.make_loop(gtol=1e-12).run(theta0, data)
    assert not strict.success and strict.message.startswith("maximum number of epochs (2) reached")
    assert "full-data check did not pass" in strict.message
    last = strict.state["epochs"][-1]
    assert last["check_converged"] and not last["check_passed"] and last["check_cost"] > 0
    loose = W.make_loop(optimizer="sag", gtol=0.8, epochs=8, check_every=1).run(theta0, data)
    assert loose.success and "full-data check after epoch" in loose.message
    ep = loose.state["epochs"]
    assert len(ep) < 8 and ep[-1]["check_passed"] and all(not e["check_passed"] for e in ep[:-1])
    g0 = max(r["grad_norm"] for r in loose.history if r["epoch"] == 0)
    assert ep[-1]["check_grad_norm"] <= 0.8 * g0 < min(e["check_grad_norm"] for e in ep[:-1])


def test_validation_keeps_the_best_epoch_theta():
    data, theta0 = W.tv_data(8)
    val, _ = W.tv_data(4, seed=3)
    res = W.make_loop(epochs=3).run(theta0, data, val)
    losses = [e["val_loss"] for e in res.state["epochs"]]
    best = min(range(3), key=losses.__getitem__)
    assert res.best_loss == losses[best]
    assert res.best_theta["log_weight"].item() == pytest.approx(res.state["epochs"][best]["theta"]["log_weight"])


def test_indexed_dataset_and_dataloader_inputs():
    data, theta0 = W.tv_data(8)
    ds = IndexedDataset(data)
    assert len(ds) == 8 and ds[3]["index"] == 3 and torch.equal(ds[3]["y"], data["y"][3])
    a = W.make_loop(epochs=1).run(theta0, ds)
    b = W.make_loop(epochs=1, batch_size=None).run(theta0, torch.utils.data.DataLoader(ds, batch_size=4))
    assert W.trajectory(a) == W.trajectory(b)


def test_bad_inputs_give_clear_errors():
    data, theta0 = W.tv_data(4)
    with pytest.raises(ValueError, match="'index'"):
        W.make_loop().run(theta0, torch.utils.data.TensorDataset(data["y"]))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        W.make_loop(optimizer="lbfgs")
    with pytest.raises(ValueError, match="tol0"):
        W.make_loop(tol0=1.5)
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        W.make_loop(epochs=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        W.make_loop(batch_size=2.5)
    with pytest.raises(ValueError, match="train is empty"):
        W.make_loop().run(theta0, IndexedDataset({k: v[:0] for k, v in data.items()}))
    with pytest.raises(TypeError, match="train must be a torch Dataset"):
        W.make_loop().run(theta0, 3)
    with pytest.raises(ValueError, match="already has a key 'index'"):
        IndexedDataset({**data, "index": torch.arange(4)})
    with pytest.raises(ValueError, match="max_items must be a non-negative int"):
        W.make_loop(cache_items=-1)
    from bilevel import HOAG
    hoag = HOAG(TVDenoising(), MSEToTarget(), max_iter=1).run(theta0, data)
    with pytest.raises(ValueError, match="resume must be the Result of a MinibatchBilevel run"):
        W.make_loop().run(theta0, data, resume=hoag)
    res = W.make_loop(epochs=1).run(theta0, data)
    with pytest.raises(ValueError, match="config"):
        W.make_loop(batch_size=2).run(theta0, data, resume=res)


def test_failed_steps_end_the_run_with_a_reason():
    data, theta0 = W.tv_data(8)

    class Broken(MSEToTarget):
        def forward(self, x, theta, batch):
            return super().forward(x, theta, batch) * float("nan")

    loop = MinibatchBilevel(TVDenoising(), Broken(), epochs=2, batch_size=2)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        res = loop.run(theta0, data)
    assert not res.success and res.message.startswith("3 consecutive minibatch steps failed")
    assert res.n_iter == 3 and all(not r["accepted"] for r in res.history)
    assert all(torch.equal(res.theta[k], theta0[k]) for k in theta0)
