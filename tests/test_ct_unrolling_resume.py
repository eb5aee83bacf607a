"""``examples/ct_unrolling.py --resume`` after a kill while LPD trains: LPD continues where it
stopped, LSPD and Sk-LSPD (never started) train afresh, and the weights equal an uninterrupted
run's."""
import importlib.util
from pathlib import Path

import pytest
import torch

from recon.checkpoint import load_checkpoint

ARGS = ["--image-size", "16", "--n-angles", "8", "--n-train", "8", "--n-val", "2", "--n-test",
        "2", "--epochs", "2", "--batch-size", "2", "--warmup", "2", "--repeats", "1", "--no-real",
        "--train", "lpd", "lspd"]


def _module():
    path = Path(__file__).resolve().parents[1] / "examples" / "ct_unrolling.py"
    spec = importlib.util.spec_from_file_location("ct_unrolling_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Killed(Exception):
    pass


def test_resume_after_a_kill_while_lpd_trains_equals_the_uninterrupted_run(tmp_path, monkeypatch,
                                                                            one_torch_thread):
    mod = _module()
    setup = mod.default_setup(dataset="anatomy", image_size=16, n_angles=8, noise="none",
                              n_train=8, n_val=2, n_test=2)
    setup["fbp_filter"] = "hann"
    args = mod.parse_args([*ARGS, "--out", str(tmp_path / "full")])
    mod.train_all(args, setup, tmp_path / "full")
    real_fit = mod.fit

    def killed_fit(model, train, val, config, out, **kw):
        real_fit(model, train, val, config, out, max_steps=5, **kw)  # epoch 1 saved, then killed
        raise _Killed(str(out))

    monkeypatch.setattr(mod, "fit", killed_fit)
    cut = mod.parse_args([*ARGS, "--out", str(tmp_path / "cut")])
    with pytest.raises(_Killed, match="lpd"):
        mod.train_all(cut, setup, tmp_path / "cut")
    assert not (tmp_path / "cut" / "lspd").exists()
    monkeypatch.setattr(mod, "fit", real_fit)
    resumed = mod.parse_args([*ARGS, "--out", str(tmp_path / "cut"), "--resume"])
    mod.train_all(resumed, setup, tmp_path / "cut")
    for name in ("lpd", "lspd"):
        a = load_checkpoint(tmp_path / "full" / name / "last.pt")["model"]
        b = load_checkpoint(tmp_path / "cut" / name / "last.pt")["model"]
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
