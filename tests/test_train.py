"""Tests of training, checkpoints, resume and the command line of ``recon.train``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _dense_operator import DenseRayTransform, parallel_angles
from recon.checkpoint import load_checkpoint, save_checkpoint
from recon.models import LSPD, LearnedPrimalDual, SketchedLSPD
from recon.train import TrainConfig, check_data_matches_operator, fit, main, stack_dataset


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def op():
    return DenseRayTransform((16, 16), parallel_angles(8))


def _disks(n, shape=(16, 16), seed=0):
    """Images of 1-2 random disks with values in (0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, shape[0]), torch.linspace(-1, 1, shape[1]),
                            indexing="ij")
    images = torch.zeros(n, 1, *shape)
    for i in range(n):
        for _ in range(2):
            c = torch.rand(2, generator=g) - 0.5
            r = 0.2 + 0.3 * torch.rand(1, generator=g)
            images[i, 0] += ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 < r ** 2) * 0.5
    return images


@pytest.fixture(scope="module")
def data(op):
    images = _disks(12)
    return {"sinogram": op(images), "image": images}


def _model(op, cls=LearnedPrimalDual, seed=0, **kw):
    torch.manual_seed(seed)
    params = dict(n_iterations=3, hidden_channels=8, n_primal=3, n_dual=3, init="zero")
    return cls(op, **{**params, **kw})


def _split(data, n_train=8):
    train = {k: v[:n_train] for k, v in data.items()}
    val = {k: v[n_train:] for k, v in data.items()}
    return train, val


# ----------------------------------------------------------------------------- training
def test_training_reduces_the_loss(op, data):
    model = _model(op, LSPD, n_subsets=2)
    train, val = _split(data)
    loss = lambda: float(torch.nn.functional.mse_loss(model(train["sinogram"]), train["image"]))
    with torch.no_grad():
        before = loss()
    config = TrainConfig(epochs=6, batch_size=4, lr=3e-3, progress=False)
    result = fit(model, train, val, config)
    with torch.no_grad():
        after = loss()
    assert after < 0.8 * before
    assert result.step == 12 and result.epoch == 6 and len(result.history) == 6
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert math.isfinite(result.best_val_psnr) and 1 <= result.best_epoch <= 6


def test_validation_psnr_and_best_checkpoint(op, data, tmp_path):
    model = _model(op)
    train, val = _split(data)
    records = []
    result = fit(model, train, val, TrainConfig(epochs=2, batch_size=4, lr=1e-3, progress=False),
                 tmp_path, metadata={"model_name": "lpd"}, callback=records.append)
    assert [r["epoch"] for r in records] == [1.0, 2.0]
    best = load_checkpoint(result.best_path)
    assert best["metadata"] == {"model_name": "lpd"}
    assert best["val_psnr"] == pytest.approx(result.best_val_psnr)
    assert best["epoch"] == result.best_epoch
    last = load_checkpoint(result.last_path)
    assert last["step"] == 4 and last["epoch"] == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_roundtrip_gives_identical_outputs(op, data, tmp_path):
    model = _model(op, SketchedLSPD, n_unsketched=1, n_subsets=2, subset_order="random")
    train, _ = _split(data)
    fit(model, train, None, TrainConfig(epochs=1, batch_size=4, lr=1e-3, progress=False))
    save_checkpoint({"model": model.state_dict(), "config": model.get_config()},
                    tmp_path / "m.pt")
    state = load_checkpoint(tmp_path / "m.pt")
    clone = SketchedLSPD(op, **state["config"])
    clone.load_state_dict(state["model"])
    model.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(model(data["sinogram"]), clone(data["sinogram"]))


def test_resume_continues_from_the_saved_step(op, data, tmp_path):
    train, val = _split(data)
    config = TrainConfig(epochs=3, batch_size=3, lr=1e-3, progress=False, seed=5)
    kw = dict(cls=LSPD, n_subsets=2, subset_order="random")  # consumes the global RNG
    straight = _model(op, **kw)
    full = fit(straight, train, val, config, tmp_path / "straight")

    interrupted = _model(op, **kw)
    first = fit(interrupted, train, val, config, tmp_path / "split", max_steps=4)  # mid-epoch 2
    assert first.step == 4 and first.epoch == 1
    torch.manual_seed(123)  # a fresh process: unrelated random state
    resumed = _model(op, seed=99, **kw)
    second = fit(resumed, train, val, config, tmp_path / "split", resume=True)
    assert second.step == full.step == 9 and second.epoch == 3
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert [r["val_psnr"] for r in second.history] == [r["val_psnr"] for r in full.history]
    assert second.history[-1]["train_loss"] == full.history[-1]["train_loss"]


def test_resume_with_other_schedule_is_an_error(op, data, tmp_path):
    train, _ = _split(data)
    fit(_model(op), train, None, TrainConfig(epochs=1, batch_size=4, progress=False), tmp_path)
    with pytest.raises(ValueError, match="total_steps"):
        fit(_model(op), train, None, TrainConfig(epochs=2, batch_size=4, progress=False),
            tmp_path, resume=True)


def test_non_finite_loss_is_reported(op, data):
    train, _ = _split(data)
    bad = {"sinogram": train["sinogram"], "image": train["image"] * float("nan")}
    with pytest.raises(ValueError, match=r"train_data\['image'\].*NaN"):  # refused up front
        fit(_model(op), bad, None, TrainConfig(epochs=1, batch_size=4, progress=False))

    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, y):
            return torch.full((len(y), 1, 16, 16), float("inf")) * self.w

    with pytest.raises(FloatingPointError, match="loss"):
        fit(Exploding(), train, None, TrainConfig(epochs=1, batch_size=4, progress=False))


# ----------------------------------------------------------------------------- checkpoints
def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="mapping"):
        save_checkpoint([1, 2], tmp_path / "x.pt")


# ----------------------------------------------------------------------------- data helpers
def test_geometry_not_matching_data_is_a_clear_error(op, data):
    other = DenseRayTransform((16, 16), parallel_angles(10))
    with pytest.raises(ValueError, match=r"sinogram shape \(8, 23\).*range_shape \(10, 23\)"):
        check_data_matches_operator(data, other)
    small = DenseRayTransform((8, 8), parallel_angles(8), n_det=23)
    with pytest.raises(ValueError, match=r"image shape \(16, 16\).*image_shape \(8, 8\)"):
        check_data_matches_operator(data, small)
    check_data_matches_operator(data, op)


def test_stack_dataset():
    items = [{"sinogram": torch.ones(1, 3, 4), "image": torch.full((1, 2, 2), float(i)),
              "label": i} for i in range(3)]
    stacked = stack_dataset(items)
    assert set(stacked) == {"sinogram", "image"}
    assert stacked["image"].shape == (3, 1, 2, 2)
    with pytest.raises(ValueError, match="image"):
        stack_dataset([{"sinogram": torch.ones(1, 3, 4)}])


# ----------------------------------------------------------------------------- command line
_TINY = ["--image-size", "16", "--n-angles", "8", "--n-train", "8", "--n-val", "4",
         "--epochs", "2", "--batch-size", "4", "--iterations", "2", "--channels", "4",
         "--lr", "1e-3", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Train LPD, LSPD and Sk-LSPD for 2 epochs on 16² phantoms through the CLI."""
    pytest.importorskip("recon.data")
    root = tmp_path_factory.mktemp("runs")
    extra = {"lpd": [], "lspd": ["--subsets", "2"],
             "sklspd": ["--subsets", "2", "--unsketched", "1", "--iterations", "3"]}
    results = {name: main(["train", "--model", name, "--out", str(root / name), *_TINY, *args])
               for name, args in extra.items()}
    return root, results


def test_cli_train_writes_checkpoints_with_metadata(cli_runs):
    root, results = cli_runs
    for name, result in results.items():
        assert result.step == 4 and len(result.history) == 2
        best = load_checkpoint(root / name / "best.pt")
        meta = best["metadata"]
        assert meta["model_name"] == name
        assert meta["setup"]["image_size"] == 16 and meta["setup"]["n_angles"] == 8
    assert load_checkpoint(root / "sklspd" / "best.pt")["metadata"]["model_config"][
        "n_unsketched"] == 1


def test_cli_resume_of_a_finished_run_trains_no_further(cli_runs):
    root, results = cli_runs
    before = load_checkpoint(root / "lpd" / "last.pt")
    again = main(["train", "--model", "lpd", "--out", str(root / "lpd"), "--resume", *_TINY])
    assert again.step == 4 and again.history == results["lpd"].history
    after = load_checkpoint(root / "lpd" / "last.pt")
    for key, value in before["model"].items():
        assert torch.equal(value, after["model"][key])


def test_cli_evaluate_prints_table_and_writes_json_and_png(cli_runs, tmp_path, capsys):
    root, _ = cli_runs
    out = tmp_path / "table"
    report = main(["evaluate", *(str(root / n / "best.pt") for n in ("lpd", "lspd", "sklspd")),
                   "--n-test", "4", "--repeats", "2", "--out", str(out), "--threads", "1"])
    methods = [row["method"] for row in report["rows"]]
    assert methods == ["FBP", "LPD", "LSPD", "Sk-LSPD"]
    for row in report["rows"]:
        assert math.isfinite(row["psnr"]) and -1 <= row["ssim"] <= 1 and row["ms_per_sample"] > 0
    saved = json.loads((out / "table.json").read_text())
    assert [r["method"] for r in saved["rows"]] == methods
    assert (out / "samples.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "Sk-LSPD" in printed and "PSNR" in printed


def test_cli_evaluate_rejects_checkpoints_of_other_geometries(cli_runs, tmp_path):
    root, _ = cli_runs
    other = tmp_path / "other"
    main(["train", "--model", "lpd", "--out", str(other), *_TINY, "--n-angles", "6",
          "--epochs", "1"])
    with pytest.raises(ValueError, match="n_angles"):
        main(["evaluate", str(root / "lpd" / "best.pt"), str(other / "best.pt"),
              "--n-test", "2", "--out", str(tmp_path / "t")])


def test_cli_evaluate_rejects_checkpoints_without_metadata(op, tmp_path):
    save_checkpoint({"model": _model(op).state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="metadata"):
        main(["evaluate", str(tmp_path / "bare.pt"), "--out", str(tmp_path / "t")])


def test_warmup_and_schedule(op, data):
    train, _ = _split(data)
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-3, schedule="constant", warmup_steps=4,
                         progress=False)
    result = fit(_model(op), train, None, config)
    assert result.history[0]["lr"] == pytest.approx(1e-3 * 3 / 4)  # after 2 steps
    cosine = fit(_model(op), train, None, TrainConfig(epochs=1, batch_size=4, lr=1e-3,
                                                       progress=False))
    assert cosine.history[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # annealed to zero
