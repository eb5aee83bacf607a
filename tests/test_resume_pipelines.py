"""kill -9 at chosen points of the multi-stage pipelines, then resume: the resumed run must equal
an uninterrupted one (bit-exact: the trainers are deterministic on one CPU thread).

Kill points (each a forked child process that ``SIGKILL``\\ s itself at the point; the
fresh-interpreter variant of the fit loop's kill test is in ``test_recon_reliability.py``):

* ``recon.training.fit``: after the ``save_every`` save at an epoch's last step, before that
  epoch's validation (the resume once merged two epochs and lost ``best.pt``);
* ``python -m recon.tasks pretrain``: inside the second epoch (the checkpoint holds epoch 1);
* the task example (``run_example``): after the first pretraining epoch, and, in the rerun,
  after the MSE-learned route's row (the task routes start from its θ).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from recon.checkpoint import ResumeMismatchError, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


def _forked_killed(body, timeout: float = 240.0) -> None:
    """Run ``body(die)`` in a forked child (no interpreter start-up: the imports are done); the
    child must end by SIGKILL from ``die()``, its kill point."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            body(lambda *_: os.kill(os.getpid(), signal.SIGKILL))
        finally:
            os._exit(3)
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked run made no progress")
        time.sleep(0.05)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


# ------------------------------------------------------------------ recon.training.fit
_FIT = """
import torch
from recon.operators import ParallelBeamGeometry, RayTransform
from recon.models import LearnedPrimalDual
from recon.training import TrainConfig, fit


def run(out, resume=False):
    A = RayTransform(ParallelBeamGeometry((8, 8), 4), cache=False)
    g = torch.Generator().manual_seed(0)
    img, val = torch.rand(8, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    torch.manual_seed(0)
    model = LearnedPrimalDual(A, n_iterations=2, hidden_channels=4, n_primal=2, n_dual=2,
                              init="zero")
    config = TrainConfig(epochs=3, batch_size=2, lr=1e-3, save_every=4, progress=False)
    result = fit(model, {"sinogram": A(img), "image": img}, {"sinogram": A(val), "image": val},
                 config, out, resume=resume)
    return model, result
"""


def _fit_module():
    namespace: dict = {}
    exec(compile(_FIT, "fit_run", "exec"), namespace)
    return namespace["run"]


def test_fit_killed_between_an_epochs_last_save_and_its_validation(tmp_path):
    out = tmp_path / "run"
    run = _fit_module()

    def body(die):
        import recon.training.loop as loop

        real, calls = loop._end_of_epoch, [0]

        def end_of_epoch(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 2:  # epoch 2's last step was saved (save_every=4 = steps per epoch)
                die()
            return real(*args, **kwargs)

        loop._end_of_epoch = end_of_epoch
        run(out)

    _forked_killed(body)
    state = load_checkpoint(out / "last.pt")
    assert (state["step"], state["epoch"], len(state["history"])) == (8, 1, 1)
    model, result = run(out, resume=True)
    ref_model, ref = run(tmp_path / "ref")
    assert [r["epoch"] for r in result.history] == [1.0, 2.0, 3.0]
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(result.history) == strip(ref.history)
    assert (result.best_epoch, result.best_val_psnr) == (ref.best_epoch, ref.best_val_psnr)
    for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), name
    best, ref_best = load_checkpoint(out / "best.pt"), load_checkpoint(tmp_path / "ref" / "best.pt")
    assert best["epoch"] == ref_best["epoch"] == ref.best_epoch
    assert all(torch.equal(best["model"][k], v) for k, v in ref_best["model"].items())


# ------------------------------------------------------------------ python -m recon.tasks pretrain
def _pretrain_argv(out, *extra):
    return ["pretrain", "--task", "segmentation", "--size", "32", "--base-channels", "2",
            "--n-train", "16", "--n-test", "4", "--batch-size", "8", "--epochs", "2",
            "--no-progress", "--out", str(out), *extra]


def test_pretrain_command_killed_in_epoch_2_resumes_to_the_uninterrupted_run(tmp_path, capsys):
    from recon.tasks.cli import main

    ck = tmp_path / "net.pt"

    def body(die):
        import importlib

        module = importlib.import_module("recon.tasks.pretrain")
        real, calls = module._epoch, [0]

        def epoch(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 2:
                die()
            return real(*args, **kwargs)

        module._epoch = epoch
        main(_pretrain_argv(ck))

    _forked_killed(body)
    assert load_checkpoint(ck)["epoch"] == 1
    resumed = main(_pretrain_argv(ck))
    ref = main(_pretrain_argv(tmp_path / "ref.pt"))
    assert resumed["loss"] == ref["loss"] and resumed["clean_test"] == ref["clean_test"]
    a, b = load_checkpoint(ck)["model"], load_checkpoint(tmp_path / "ref.pt")["model"]
    assert all(torch.equal(a[k], v) for k, v in b.items())
    capsys.readouterr()


def test_pretrain_rerun_with_other_settings_is_refused_with_the_differences(tmp_path, capsys):
    from recon.tasks.cli import main

    ck = tmp_path / "net.pt"
    main(_pretrain_argv(ck))
    before = ck.read_bytes()
    for change, listed in ((["--lr", "1e-2"], "lr: 0.002 (saved) != 0.01 (now)"),
                           (["--seed", "1"], "seed: 0 (saved) != 1 (now)"),
                           (["--batch-size", "4"], "batch_size: 8 (saved) != 4 (now)")):
        with pytest.raises(ResumeMismatchError, match="cannot resume") as info:
            main(_pretrain_argv(ck, *change))
        assert listed in str(info.value) and "--restart" in str(info.value)
        assert ck.read_bytes() == before
    argv = _pretrain_argv(ck)
    argv[argv.index("--n-train") + 1] = "12"
    with pytest.raises(ResumeMismatchError, match=r"metadata.n_train: 16 \(saved\) != 12"):
        main(argv)
    assert len(main(argv + ["--restart"])["loss"]) == 2  # the explicit way to start over
    capsys.readouterr()


# ------------------------------------------------------------------ the task example
_EXAMPLE = ["--quick", "--no-progress", "--threads", "1", "--n-pretrain", "16", "--epochs", "2",
            "--n-train", "4", "--n-test", "8", "--iters", "1", "--tolerances", "1e-3"]


def _example(out, on_stage=None):
    from recon.tasks.example import run_example

    return run_example("segmentation", "cityscapes", _EXAMPLE + ["--out", str(out)],
                       on_stage=on_stage)


def test_example_killed_in_pretraining_and_then_in_the_routes_resumes_to_the_same_table(tmp_path):
    out = tmp_path / "run"
    for point in ("pretrain epoch 1", "sigma 0.3: TV, MSE-learned θ"):
        _forked_killed(lambda die: _example(out, lambda name: die() if name == point else None))
    assert load_checkpoint(out / "task_net.pt")["epoch"] == 2
    assert sorted(load_checkpoint(out / "stages.pt")["done"]) == [
        "sigma 0.3: T* on clean", "sigma 0.3: T* on noisy", "sigma 0.3: TV, MSE-learned θ"]
    seen = []
    resumed = _example(out, seen.append)
    ref = _example(tmp_path / "ref")
    assert resumed["stages_reused"] == 3 and seen == [
        "sigma 0.3: TV, task-learned θ (tol 0.001)",
        "sigma 0.3: TV, task-learned θ + fine-tuned T (tol 0.001)"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed["results"]["0.3"]) == strip(ref["results"]["0.3"])
    assert resumed["pretrain"]["loss"] == ref["pretrain"]["loss"]
    saved = json.loads((out / "table.json").read_text())
    assert saved["stages_reused"] == 3 and not math.isnan(saved["results"]["0.3"][0]["dice"])


def test_example_rerun_with_other_settings_is_refused(tmp_path):
    from recon.tasks.example import run_example

    out = tmp_path / "run"
    _example(out)
    argv = _EXAMPLE + ["--out", str(out)]
    argv[argv.index("--iters") + 1] = "2"
    with pytest.raises(ResumeMismatchError, match=r"iters: 1 \(saved\) != 2 \(now\)"):
        run_example("segmentation", "cityscapes", argv)
    argv[argv.index("--n-pretrain") + 1] = "12"  # T* itself: refused before any route
    with pytest.raises(ResumeMismatchError, match=r"metadata.n_train: 16 \(saved\) != 12"):
        run_example("segmentation", "cityscapes", argv)


def test_example_rerun_with_adaptive_adds_only_its_rows_and_old_stage_files_resume(tmp_path):
    from recon.checkpoint import save_checkpoint

    out = tmp_path / "run"
    first = _example(out)
    state = load_checkpoint(out / "stages.pt")  # a file from before --adaptive-iters existed
    del state["settings"]["adaptive_iters"]
    save_checkpoint(state, out / "stages.pt")
    seen = []
    from recon.tasks.example import run_example
    res = run_example("segmentation", "cityscapes", _EXAMPLE + ["--out", str(out), "--adaptive",
                                                                "--adaptive-images", "0",
                                                                "--adaptive-iters", "2"],
                      on_stage=seen.append)
    assert res["stages_reused"] == len(first["results"]["0.3"])
    assert seen == ["sigma 0.3: Adaptive TV (410 θ), MSE-learned θ",
                    "sigma 0.3: Adaptive TV (410 θ), task-learned θ (tol 0.001)"]
    rows = {r["route"]: r for r in res["results"]["0.3"]}
    assert rows["Adaptive TV (410 θ), MSE-learned θ"]["hoag_iterations"] <= 2
    assert len(rows["Adaptive TV (410 θ), MSE-learned θ"]["theta"]["conv1.weight"]) == 8
    diffs = res["intervals"]["0.3"]["differences"]
    assert {"Adaptive TV (410 θ), task-learned θ (tol 0.001) − Adaptive TV (410 θ), MSE-learned θ",
            "Adaptive TV (410 θ), task-learned θ (tol 0.001) − TV, MSE-learned θ"} <= set(diffs)
    # now the file has adaptive rows: another cap is refused
    with pytest.raises(ResumeMismatchError, match=r"adaptive_iters: 2 \(saved\) != 3 \(now\)"):
        run_example("segmentation", "cityscapes", _EXAMPLE + ["--out", str(out), "--adaptive",
                                                            "--adaptive-images", "0",
                                                            "--adaptive-iters", "3"])


def test_example_adaptive_rows_learned_in_minibatches_over_more_images_resume(tmp_path):
    from recon.tasks.example import run_example

    out = tmp_path / "run"
    argv = _EXAMPLE + ["--out", str(out), "--adaptive", "--adaptive-images", "10",
                       "--adaptive-epochs", "2"]
    seen = []
    res = run_example("segmentation", "cityscapes", argv, on_stage=seen.append)
    name = "Adaptive TV (410 θ) on 10 images"
    assert seen[-2:] == [f"sigma 0.3: {name}, MSE-learned θ", f"sigma 0.3: {name}, task-learned θ"]
    rows = {r["route"]: r for r in res["results"]["0.3"]}
    mse, task = rows[f"{name}, MSE-learned θ"], rows[f"{name}, task-learned θ"]
    # 10 images and 1 held out (10 %), minibatches of 50: one step per epoch, two epochs
    assert mse["hoag_iterations"] == task["hoag_iterations"] == 2
    assert not mse["converged"] and "maximum number of epochs (2)" in mse["hoag_message"]
    assert len(task["theta"]["conv1.weight"]) == 8 and task["theta"] != mse["theta"]
    assert f"{name}, task-learned θ − {name}, MSE-learned θ" in res["intervals"]["0.3"]["differences"]
    again = run_example("segmentation", "cityscapes", argv)
    assert again["stages_reused"] == len(res["results"]["0.3"])
    assert again["results"]["0.3"] == res["results"]["0.3"]
    argv[argv.index("--adaptive-epochs") + 1] = "3"
    with pytest.raises(ResumeMismatchError, match=r"adaptive_epochs: 2 \(saved\) != 3 \(now\)"):
        run_example("segmentation", "cityscapes", argv)


def test_example_adaptive_split_too_small_is_refused_before_pretraining(tmp_path, monkeypatch):
    import recon.tasks.example as example

    real = example.load_task_data

    def one_image_for_adaptive(task, source, split, n, **kw):  # a data set with 1 spare image
        return real(task, source, split, 1 if kw.get("seed", 0) >= 5000 else n, **kw)

    def no_pretraining(*a, **k):
        raise AssertionError("pretraining started before the data were checked")

    monkeypatch.setattr(example, "load_task_data", one_image_for_adaptive)
    monkeypatch.setattr(example, "_pretrained", no_pretraining)
    argv = _EXAMPLE + ["--out", str(tmp_path / "run"), "--adaptive", "--adaptive-images", "10"]
    with pytest.raises(ValueError, match="--adaptive-images: the training split has 1 images"):
        example.run_example("segmentation", "cityscapes", argv)


def test_example_refuses_a_finished_pretraining_of_other_epochs_and_keeps_the_file(tmp_path):
    from recon.tasks.example import run_example

    out = tmp_path / "run"
    _example(out)  # T* pretrained for 2 epochs, finished
    before = (out / "task_net.pt").read_bytes()
    for epochs in ("3", "1"):
        argv = _EXAMPLE + ["--out", str(tmp_path / "other"), "--checkpoint",
                           str(out / "task_net.pt")]
        argv[argv.index("--epochs") + 1] = epochs
        with pytest.raises(ResumeMismatchError, match=r"pretraining of 2 epochs \(finished\); "
                                                      rf"this run asks for --epochs {epochs}"):
            run_example("segmentation", "cityscapes", argv)
    assert (out / "task_net.pt").read_bytes() == before
