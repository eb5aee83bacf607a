"""Joint task-adapted CT: trainer gradients = bilevel hypergradients, losses, routes, resume."""
import math

import pytest
import torch

from bilevel import Unrolled
from recon.joint import (ExplicitBackprop, ExplicitReconstruction, JointConfig, JointLoss,
                         JointNet, build_joint_data, build_reconstructor, build_segmenter,
                         check_joint_data, default_joint_setup, default_model_options, fit_joint,
                         joint_gradients, network_theta, run_route)

DT = torch.float64
OPTS = default_model_options(recon_channels=4, recon_iterations=2, unet_channels=4, unet_depth=2)


@pytest.fixture(scope="module")
def tiny():
    setup = default_joint_setup(image_size=16, n_angles=8, n_train=6, n_test=4)
    op, train = build_joint_data(setup, "train")
    _, test = build_joint_data(setup, "test", operator=op)
    return op, train, test


def _nets(op, name, seed=0):
    torch.manual_seed(seed)
    rec = build_reconstructor(name, op, OPTS).to(DT)
    seg = build_segmenter(OPTS).to(DT)
    return rec, seg


@pytest.mark.parametrize("name, C", [("lpd", 0.3), ("lspd", 0.0), ("lspd", 0.3), ("lspd", 1.0),
                                     ("sklspd", 0.3)])
def test_trainer_gradients_equal_bilevel_hypergradients(tiny, name, C):
    op, train, _ = tiny
    rec, seg = _nets(op, name)
    batch = {k: v[:3].to(DT) for k, v in train.items()}
    net, loss_fn = JointNet(rec, seg), JointLoss(seg, C)
    net.train()
    loss, grads = joint_gradients(net, loss_fn, batch)
    inner = ExplicitReconstruction(rec)
    hg = ExplicitBackprop()(inner, loss_fn, network_theta(rec), batch)
    assert math.isclose(hg.loss, float(loss), rel_tol=1e-12)
    n_checked = 0
    for k, g in hg.theta_grad.items():
        ref = grads[f"reconstructor.{k}"]
        assert float((g - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max())), k
        n_checked += 1
    for k, g in hg.param_grads.items():
        ref = grads[k]  # the loss owns the segmenter: names "segmenter.…" in both
        assert float((g - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max())), k
        n_checked += 1
    assert n_checked == len(grads)
    # bilevel's own estimator: one unrolled step of length 1/L = 1 lands on R_φ(y) exactly
    un = Unrolled(n_steps=1)(inner, loss_fn, network_theta(rec), batch, torch.zeros_like(batch["image"]))
    for k, g in un.theta_grad.items():
        ref = grads[f"reconstructor.{k}"]
        assert float((g - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max())), k
    nonzero = sum(float(g.abs().max()) > 0 for g in hg.theta_grad.values())
    assert nonzero > len(hg.theta_grad) // 2  # the path φ → R_φ(y) is really differentiated
    if C == 0.0:
        assert all(float(g.abs().max()) == 0 for g in hg.param_grads.values())


def test_explicit_solution_map_is_the_inner_minimiser_and_unrolled_zero_backpropagates(tiny):
    op, train, _ = tiny
    rec, seg = _nets(op, "lspd")
    batch = {k: v[:2].to(DT) for k, v in train.items()}
    inner, theta = ExplicitReconstruction(rec), network_theta(rec)
    sol = inner.solve(theta, batch, 1e-12)
    assert sol.all_converged and float(inner.grad(sol.x, theta, batch).abs().max()) == 0.0
    assert torch.allclose(sol.x, rec(batch["sinogram"], x0=batch["fbp"]), rtol=0, atol=1e-14)
    # bilevel.Unrolled(n_steps=0, start="init") is plain backprop through φ → x₀ = R_φ(y)
    hg0 = Unrolled(n_steps=0, start="init")(inner, JointLoss(seg, 0.5), theta, batch, sol.x)
    hg1 = Unrolled(n_steps=1)(inner, JointLoss(seg, 0.5), theta, batch, torch.zeros_like(sol.x))
    assert any(float(g.abs().max()) > 0 for g in hg0.theta_grad.values())
    for k in hg0.theta_grad:
        assert torch.allclose(hg0.theta_grad[k], hg1.theta_grad[k], rtol=1e-9, atol=1e-14), k


def test_joint_loss_formula_and_bad_input(tiny):
    _, train, _ = tiny
    torch.manual_seed(0)
    seg = build_segmenter(OPTS)
    batch = {k: v[:2] for k, v in train.items()}
    x = batch["image"] + 0.1
    with torch.no_grad():
        lo, hi = JointLoss(seg, 0.0)(x, {}, batch), JointLoss(seg, 1.0)(x, {}, batch)
        mid = JointLoss(seg, 0.25)(x, {}, batch)
    assert math.isclose(float(lo), 0.01, rel_tol=1e-5)
    assert math.isclose(float(mid), 0.75 * float(lo) + 0.25 * float(hi), rel_tol=1e-6)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="C"):
            JointLoss(seg, bad)
    with pytest.raises(TypeError, match="C"):
        JointLoss(seg, "0.5")
    with pytest.raises(ValueError, match="mask"):
        JointLoss(seg, 0.5)(x, {}, dict(batch, mask=batch["mask"][:, :, :8]))
    with pytest.raises(ValueError, match="mask"):
        JointLoss(seg, 0.5)(x, {}, dict(batch, mask=batch["mask"] * 0.5 + 0.25))
    with pytest.raises(ValueError, match="mask"):
        check_joint_data(dict(train, mask=train["mask"][:-1]))


def test_geometry_not_matching_data_is_named(tiny):
    op, train, _ = tiny
    other = build_joint_data(default_joint_setup(image_size=16, n_angles=6, n_train=2), "train")[0]
    with pytest.raises(ValueError, match="geometry"):
        check_joint_data(train, other)


def test_resume_continues_exactly_and_rejects_another_route(tiny, tmp_path):
    op, train, _ = tiny
    cfg = JointConfig(epochs=2, batch_size=3, lr=1e-3, progress=False)

    def make():
        rec, seg = _nets(op, "lspd")
        return JointNet(rec.float(), seg.float()), seg

    net, seg = make()
    full = fit_joint(net, JointLoss(seg, 0.5), train, cfg, "joint_lspd")
    net2, seg2 = make()
    fit_joint(net2, JointLoss(seg2, 0.5), train, cfg, "joint_lspd", tmp_path, max_steps=3)
    net3, seg3 = make()
    part = fit_joint(net3, JointLoss(seg3, 0.5), train, cfg, "joint_lspd", tmp_path, resume=True)
    assert part.step == full.step == 4
    for (n, a), b in zip(net.state_dict().items(), net3.state_dict().values()):
        assert torch.equal(a, b), n
    assert [h["loss"] for h in part.history] == pytest.approx([h["loss"] for h in full.history])
    net4, seg4 = make()
    with pytest.raises(ValueError, match="route 'joint_lspd'"):
        fit_joint(net4, JointLoss(seg4, 0.5), train, cfg, "joint_lpd", tmp_path, resume=True)


def test_unknown_route_is_named(tiny):
    op, train, _ = tiny
    with pytest.raises(ValueError, match="joint_xyz"):
        run_route("joint_xyz", op, train, JointConfig(epochs=1, progress=False), OPTS)


def test_ct_joint_quick_example_runs(tmp_path, one_torch_thread):
    """Smoke test of ``examples/ct_joint.py --quick``: every route, the C sweep, the TV rows."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "ct_joint.py"
    spec = importlib.util.spec_from_file_location("ct_joint_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "table.json").read_text())
    assert (tmp_path / "samples.png").stat().st_size > 1000
    routes = ["clean", "sequential", "joint_lpd", "joint_lspd", "joint_sklspd", "tv_mse", "tv_task"]
    assert list(saved["rows"]) == routes
    for route in routes:
        assert len(saved["rows"][route]) == 2
        assert all(0.0 <= r["dice"] <= 1.0 for r in saved["rows"][route])
    assert sorted(float(c) for c in saved["sweep"]) == [0.0, 0.1, 0.5, 0.9, 1.0]
    assert saved["step_time"]["ratio"] > 0
    assert set(saved["paired_vs_sequential"]) == set(routes) - {"clean", "sequential"}
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    assert all(r["history"] for r in saved["rows"]["joint_lpd"])

    # the paired differences and their interval on known numbers
    rows = {"sequential": [{"dice": 0.5}, {"dice": 0.6}, {"dice": 0.7}],
            "joint_lpd": [{"dice": 0.6}, {"dice": 0.8}, {"dice": 1.0}],
            "short": [{"dice": 0.9}]}
    d = module.paired(rows)
    assert set(d) == {"joint_lpd"}  # "short" has another number of seeds: not paired
    assert d["joint_lpd"]["diffs"] == pytest.approx([0.1, 0.2, 0.3])
    assert d["joint_lpd"]["mean"] == pytest.approx(0.2)
    assert d["joint_lpd"]["ci95"] == pytest.approx(4.302652729911275 * 0.1 / 3 ** 0.5)
    assert "includes 0" in module.format_paired(d)  # t(0.975, 2) = 4.30: wide with 3 seeds
    rows["joint_lpd"] = [{"dice": 0.69}, {"dice": 0.8}, {"dice": 0.91}]
    assert "> 0" in module.format_paired(module.paired(rows))


@pytest.mark.parametrize("field, value, error", [
    ("clip_grad_norm", -1.0, ValueError), ("clip_grad_norm", 0.0, ValueError),
    ("clip_grad_norm", float("nan"), ValueError), ("clip_grad_norm", "1", TypeError),
    ("lr", 0.0, ValueError), ("lr", float("inf"), ValueError), ("lr", -1e-3, ValueError),
    ("epochs", 0, ValueError), ("epochs", 1.5, TypeError), ("epochs", True, TypeError),
    ("batch_size", 0, ValueError), ("seed", -1, ValueError), ("pretrain_epochs", -1, ValueError),
    ("joint_lr", 0.0, ValueError), ("joint_lr", float("nan"), ValueError),
    ("progress", "yes", TypeError)])
def test_joint_config_refuses_bad_values_by_name(field, value, error):
    with pytest.raises(error, match=f"JointConfig.{field}"):
        JointConfig(**{field: value})


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, n_steps):
    """Make the trainer raise (like a kill) when it starts step ``n_steps + 1`` overall."""
    import recon.joint.trainer as trainer

    real, count = trainer._step, {"n": 0}

    def step(*args, **kwargs):
        if count["n"] >= n_steps:
            raise _Killed(f"killed after {n_steps} steps")
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "_step", step)
    return count


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# (route, pretrain_epochs, kill point in steps overall): 2 steps per epoch on the 6 tiny images
@pytest.mark.parametrize("route, pretrain, kill", [
    ("sequential", 0, 3),        # during stage 1 (reconstruct), after its first epoch
    ("sequential", 0, 1),        # during stage 1, before any last.pt was written
    ("sequential", 0, 5),        # during stage 2 (segment)
    ("joint_lspd", 2, 3),        # during pretrain_reconstruct, after its first epoch
    ("joint_lspd", 2, 4),        # between pretrain_reconstruct and pretrain_segment
    ("joint_lspd", 2, 7),        # during pretrain_segment
    ("joint_lspd", 2, 10),       # during the joint stage
])
def test_multi_stage_route_killed_in_any_stage_resumes_to_the_uninterrupted_result(
        tiny, tmp_path, monkeypatch, route, pretrain, kill):
    op, train, _ = tiny
    cfg = JointConfig(epochs=2, batch_size=3, lr=1e-3, progress=False, pretrain_epochs=pretrain)
    full, _ = run_route(route, op, train, cfg, OPTS, C=0.5, out_dir=tmp_path / "full")
    with monkeypatch.context() as m:
        _kill_after(m, kill)
        with pytest.raises(_Killed):
            run_route(route, op, train, cfg, OPTS, C=0.5, out_dir=tmp_path / "cut")
    if kill == 1 and route == "sequential":  # killed before the first save: nothing to resume
        with pytest.raises(FileNotFoundError, match="train without resume"):
            run_route(route, op, train, cfg, OPTS, C=0.5, out_dir=tmp_path / "cut", resume=True)
        return
    resumed, info = run_route(route, op, train, cfg, OPTS, C=0.5, out_dir=tmp_path / "cut",
                              resume=True)
    _same_weights(full, resumed)


def test_resume_with_other_settings_is_refused_with_the_differences(tiny, tmp_path):
    from recon.training import ResumeMismatchError

    op, train, _ = tiny
    cfg = JointConfig(epochs=2, batch_size=3, lr=1e-3, progress=False)
    rec, seg = _nets(op, "lspd")
    fit_joint(JointNet(rec.float(), seg.float()), JointLoss(seg, 0.5), train, cfg, "joint_lspd",
              tmp_path, max_steps=2, metadata={"C": 0.5})
    rec, seg = _nets(op, "lspd")
    other = JointConfig(epochs=3, batch_size=3, lr=2e-3, progress=True)
    with pytest.raises(ResumeMismatchError) as info:
        fit_joint(JointNet(rec.float(), seg.float()), JointLoss(seg, 0.9), train, other,
                  "joint_lspd", tmp_path, resume=True, metadata={"C": 0.9})
    text = str(info.value)
    for line in ("config.lr: 0.001 (saved) != 0.002 (now)", "config.epochs: 2 (saved) != 3 (now)",
                 "metadata.C: 0.5 (saved) != 0.9 (now)", "total_steps: 4 (saved) != 6 (now"):
        assert line in text, text
    assert "progress" not in text  # how a run reports may change on resume
    # the same settings (progress aside) resume
    rec, seg = _nets(op, "lspd")
    res = fit_joint(JointNet(rec.float(), seg.float()), JointLoss(seg, 0.5), train,
                    JointConfig(epochs=2, batch_size=3, lr=1e-3, progress=False), "joint_lspd",
                    tmp_path, resume=True, metadata={"C": 0.5})
    assert res.step == 4


def test_cli_resume_with_another_lr_or_data_seed_exits_2_with_the_diff(tmp_path, capsys,
                                                                       one_torch_thread):
    from recon.joint.cli import main
    from recon.training.cli import console_main

    base = ["train", "--route", "clean", "--image-size", "16", "--n-angles", "8", "--n-train",
            "4", "--n-test", "2", "--unet-channels", "4", "--unet-depth", "2", "--epochs", "1",
            "--batch-size", "2", "--no-progress", "--out", str(tmp_path / "run")]
    main(base)
    code = console_main([*base, "--resume", "--lr", "1e-2", "--data-seed", "3"],
                        prog="python -m recon.joint", entry=main)
    err = capsys.readouterr().err
    assert code == 2
    assert "config.lr: 0.003 (saved) != 0.01 (now)" in err, err
    assert "metadata.setup.data_seed: 0 (saved) != 3 (now)" in err, err
    assert console_main([*base, "--resume"], prog="python -m recon.joint", entry=main) == 0
    assert console_main([*base[:-1], str(tmp_path / "nowhere"), "--resume"],
                        prog="python -m recon.joint", entry=main) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # refused when parsed, before any work
        console_main([*base, "--clip-grad-norm", "-1"], prog="python -m recon.joint", entry=main)
    assert exit_info.value.code == 2
    assert "argument --clip-grad-norm: must be a finite number >= 0" in capsys.readouterr().err


def test_segmenter_starts_at_the_lesion_prior(tiny):
    _, train, _ = tiny
    pi = 0.01
    torch.manual_seed(0)
    seg = build_segmenter(OPTS, pi).eval()
    with torch.no_grad():
        p = torch.softmax(seg(train["image"]), 1)[:, 1]
    # the last layer's bias sets the start; the features add a spread around it
    assert float(p.median()) < 0.1
    torch.manual_seed(0)
    with torch.no_grad():
        p0 = torch.softmax(build_segmenter(OPTS).eval()(train["image"]), 1)[:, 1]
    assert float(p0.median()) > 0.2


def test_tiny_c_sweep_shares_the_pretrained_start_and_stays_finite(tiny):
    """The joint stage of every C starts from the same pretrained networks (the C = 0 and
    C = 1 ends included) and every run ends finite with scores in range."""
    from recon.joint import evaluate_net

    op, train, test = tiny
    cfg = JointConfig(epochs=1, batch_size=3, lr=1e-3, progress=False, pretrain_epochs=1)
    stages = []
    for C in (0.0, 0.5, 0.9, 1.0):
        net, info = run_route("joint_lspd", op, train, cfg, OPTS, C=C)
        stages.append(info["stages"])
        res = evaluate_net(net, test)
        assert 0.0 <= float(res["dice"].mean()) <= 1.0
        assert bool(torch.isfinite(res["psnr"]).all())
        assert all(math.isfinite(h["loss"]) for h in info["history"])
    losses = lambda s, k: [h["loss"] for h in s[k]]  # noqa: E731
    for s in stages[1:]:
        for k in ("pretrain_reconstruct", "pretrain_segment"):
            assert losses(s, k) == losses(stages[0], k), k


def test_job_pool_gives_the_same_rows_in_workers_as_in_this_process():
    """A job seeds itself: two worker processes give the numbers of the in-process run."""
    from recon.joint.jobs import JobPool, routes_job, sweep_job

    setup = default_joint_setup(image_size=16, n_angles=8, n_train=6, n_test=4)
    configs = {r: JointConfig(epochs=1, batch_size=3, seed=1, pretrain_epochs=1, progress=False)
               for r in ("clean", "joint_lspd")}
    results = []
    for workers in (1, 2):
        with JobPool(setup, workers=workers) as pool:
            futures = [pool.submit(routes_job, 1, configs, OPTS, 0.5),
                       pool.submit(sweep_job, 0.9, configs["joint_lspd"], OPTS)]
            first = pool.next_done(list(futures))
            assert first and all(f in futures for f in first)
            results.append([f.result() for f in futures])
    (routes_1, sweep_1), (routes_2, sweep_2) = results
    assert set(routes_1["rows"]) == {"clean", "joint_lspd"}
    for route, row in routes_1["rows"].items():
        scores = {k for k in row if k not in ("train_s", "infer_ms", "history")}
        assert "dice" in scores
        assert {k: routes_2["rows"][route][k] for k in scores} == {k: row[k] for k in scores}
    assert sweep_2["row"]["psnr"] == sweep_1["row"]["psnr"]
    assert set(routes_1["clean_state"]) == set(build_segmenter(OPTS).state_dict())


@pytest.mark.parametrize("field, value", [("workers", 0), ("workers", 1.5), ("threads", 0)])
def test_job_pool_refuses_bad_counts_by_name(field, value):
    from recon.joint.jobs import JobPool

    with pytest.raises(ValueError, match=field):
        JobPool(default_joint_setup(image_size=16, n_angles=8, n_train=2, n_test=2),
                **{field: value})


def test_batchnorm_statistics_are_recomputed_exactly_at_the_end_of_training():
    from recon.joint import JointNet
    from recon.joint.trainer import recompute_batchnorm

    g = torch.Generator().manual_seed(0)
    data = {"image": 3.0 + 2.0 * torch.randn(8, 1, 4, 4, generator=g),
            "sinogram": torch.zeros(8, 1, 2, 2)}
    bn = torch.nn.BatchNorm2d(1)
    net = JointNet(None, torch.nn.Sequential(bn), input_key="image").eval()
    recompute_batchnorm(net, data, batch_size=4)
    batches = data["image"].split(4)
    assert float(bn.running_mean) == pytest.approx(float(data["image"].mean()), rel=1e-6)
    assert float(bn.running_var) == pytest.approx(
        sum(float(b.var()) for b in batches) / len(batches), rel=1e-6)
    assert bn.momentum == 0.1 and not net.training  # restored
