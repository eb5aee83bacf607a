"""Bad inputs to ``recon``: each raises the named error type with a message that names the
argument (or, where a value is well defined, gives the correct value).

``CASES`` is a table ``(id, call, error type, regex the message must match)``; the correct-value
cases and the property-based cases (hypothesis) follow it.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from recon.checkpoint import CorruptCheckpointError, load_checkpoint, save_checkpoint
from recon.data import DigitsDataset, EllipsePhantomDataset, GaussianNoise, PoissonNoise
from recon.data.ct_datasets import DicomSliceDataset
from recon.data.dicom import read_dicom_slice
from recon.data.noise import as_noise_model, select_views
from recon.io import atomic_write
from recon.metrics import accuracy, psnr, ssim
from recon.models import LearnedPrimalDual, build_model
from recon.operators import (ParallelBeamGeometry, RayTransform, adjointness_test, fbp,
                             subset_data)
from recon.training import (TrainConfig, build_setup, default_setup, evaluate_methods, fit, main,
                            stack_dataset, time_methods, validate)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GEOM = ParallelBeamGeometry((16, 16), n_angles=8)
A = RayTransform(GEOM, cache=False)
NA, ND = A.range_shape
X = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
Y = A(X)


def _model():
    torch.manual_seed(0)
    return LearnedPrimalDual(A, n_iterations=2, hidden_channels=4, n_primal=2, n_dual=2,
                             init="zero")


def _data(n=4):
    img = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    return {"sinogram": A(img), "image": img}


_CFG = dict(epochs=1, batch_size=2, progress=False)


def _fit(**kw):
    args = dict(model=_model(), train_data=_data(), val_data=None, config=TrainConfig(**_CFG))
    args.update(kw)
    return fit(**args)


def _task_data(**kw):
    from recon.tasks.data import load_task_data
    return load_task_data("segmentation", "standin", "train", n=2, **kw)


def _setup(**kw):
    return default_setup(**kw)


CASES = [
    # ---------------------------------------------------------------- operators
    ("op-geometry-type", lambda: RayTransform("geom"), TypeError, "`geometry`"),
    ("op-backend", lambda: RayTransform(GEOM, backend="cuda"), ValueError, "`backend`"),
    ("op-method", lambda: RayTransform(GEOM, method="dense"), ValueError, "`method`"),
    ("op-cache", lambda: RayTransform(GEOM, cache=3), ValueError, "`cache`"),
    ("op-x-numpy", lambda: A(X.numpy()), TypeError, "`x`"),
    ("op-x-int", lambda: A(X.long()), ValueError, "`x`.*dtype"),
    ("op-x-shape", lambda: A(X[..., :8]), ValueError, "`x`.*shape"),
    ("op-x-nan", lambda: RayTransform(GEOM, cache=False)(X * math.nan), ValueError, "`x`.*NaN"),
    ("op-y-shape", lambda: A.adjoint(X), ValueError, "`y`.*shape"),
    ("op-subset-i", lambda: A.subset(5, 4), ValueError, "`i`"),
    ("op-subset-m", lambda: A.subset(0, 0), ValueError, "`m`"),
    ("op-coarsen-nondividing", lambda: RayTransform(ParallelBeamGeometry((32, 32), 4),
                                                    cache=False).coarsen(3),
     ValueError, "`factor`=3 does not divide"),
    ("op-coarsen-zero", lambda: A.coarsen(0), ValueError, "`factor`"),
    ("op-coarsen-too-large", lambda: A.coarsen(32), ValueError, "`factor`"),
    ("geom-shape", lambda: ParallelBeamGeometry((0, 8), 4), ValueError, "`image_shape`"),
    ("geom-angles", lambda: ParallelBeamGeometry((8, 8), 0), ValueError, "`n_angles`"),
    ("fbp-filter", lambda: fbp(Y, A, filter="box"), ValueError, "`filter`"),
    ("fbp-scaling", lambda: fbp(Y, A, frequency_scaling=0.0), ValueError, "`frequency_scaling`"),
    ("fbp-shape", lambda: fbp(X, A), ValueError, "`sinogram`"),
    ("fbp-operator", lambda: fbp(Y, "A"), TypeError, "`operator`"),
    ("subset-data-type", lambda: subset_data([1, 2], 0, 2), ValueError, "`sinogram`"),
    ("adjointness-operator", lambda: adjointness_test(object()), TypeError, "`operator`"),
    ("adjointness-batch", lambda: adjointness_test(A, batch=0), ValueError, "`batch`"),
    # ---------------------------------------------------------------- noise
    ("gauss-level-negative", lambda: GaussianNoise(-1.0), ValueError, "`level`"),
    ("gauss-level-nan", lambda: GaussianNoise(math.nan), ValueError, "`level`"),
    ("gauss-nan-data", lambda: GaussianNoise(0.1)(Y.clone().fill_(math.nan)), ValueError,
     "`sinogram`.*NaN"),
    ("gauss-int-data", lambda: GaussianNoise(0.1)(Y.long()), TypeError, "`sinogram`"),
    ("poisson-I0", lambda: PoissonNoise(I0=0), ValueError, "`I0`"),
    ("poisson-mu-inf", lambda: PoissonNoise(mu_scale=math.inf), ValueError, "`mu_scale`"),
    ("poisson-min-count", lambda: PoissonNoise(I0=10, min_count=100), ValueError, "`min_count`"),
    ("poisson-nan-data", lambda: PoissonNoise()(Y * math.nan), ValueError, "`sinogram`.*NaN"),
    ("poisson-rate-overflow", lambda: PoissonNoise(7e4, mu_scale=3.0)(Y * 0 - 40), ValueError,
     "`sinogram`.*-40"),
    ("noise-model", lambda: as_noise_model("loud"), ValueError, "`noise`"),
    ("views-two", lambda: select_views(Y, GEOM, step=2, n_views=2), ValueError, "`step`"),
    ("views-step", lambda: select_views(Y, GEOM, step=0), ValueError, "`step`"),
    ("views-index", lambda: select_views(Y, GEOM, index=[99]), ValueError, "`index`"),
    # ---------------------------------------------------------------- metrics
    ("psnr-constant-ref", lambda: psnr(X, torch.ones_like(X)), ValueError, "`data_range`"),
    ("ssim-constant-ref", lambda: ssim(X, torch.zeros_like(X)), ValueError, "`data_range`"),
    ("psnr-range-negative", lambda: psnr(X, X, data_range=-1.0), ValueError, "`data_range`"),
    ("psnr-range-tensor-zero", lambda: psnr(X, X, data_range=torch.tensor([0.0, 1.0])),
     ValueError, "`data_range`"),
    ("psnr-shape", lambda: psnr(X, X[:1]), ValueError, "`x` and `ref`"),
    ("psnr-type", lambda: psnr([1.0], X), TypeError, "`x`"),
    ("ssim-window-even", lambda: ssim(X, X, 1.0, win_size=4), ValueError, "`win_size`"),
    ("ssim-window-large", lambda: ssim(X[..., :5, :5], X[..., :5, :5], 1.0), ValueError,
     "`win_size`"),
    ("accuracy-shape", lambda: accuracy(torch.zeros(3), torch.zeros(4)), ValueError, "`pred`"),
    # ---------------------------------------------------------------- data sets
    ("ellipses-n", lambda: EllipsePhantomDataset(-1, 16, A), ValueError, "`n_samples`"),
    ("ellipses-size", lambda: EllipsePhantomDataset(4, 0), ValueError, "`image_size`"),
    ("ellipses-count", lambda: EllipsePhantomDataset(4, 16, A, n_ellipses=-1), ValueError,
     "`n_ellipses`"),
    ("ellipses-filter", lambda: EllipsePhantomDataset(4, 16, A, fbp_filter="box"), ValueError,
     "`filter`"),
    ("ellipses-operator-size", lambda: EllipsePhantomDataset(4, 8, A), ValueError,
     "`image_size`"),
    ("dataset-index-range", lambda: EllipsePhantomDataset(2, 16, A)[5], IndexError, "`index`"),
    ("dataset-index-type", lambda: EllipsePhantomDataset(2, 16, A)["a"], TypeError, "`index`"),
    ("digits-split", lambda: DigitsDataset(16, A, split="dev"), ValueError, "`split`"),
    ("digits-n", lambda: DigitsDataset(16, A, n_samples=10**6), ValueError, "`n_samples`"),
    # ---------------------------------------------------------------- training
    ("config-epochs", lambda: TrainConfig(epochs=0), ValueError, "`epochs`"),
    ("config-batch-float", lambda: TrainConfig(batch_size=1.5), ValueError, "`batch_size`"),
    ("config-lr-nan", lambda: TrainConfig(lr=math.nan), ValueError, "`lr`"),
    ("config-betas", lambda: TrainConfig(betas=(0.5,)), ValueError, "`betas`"),
    ("config-schedule", lambda: TrainConfig(schedule="step"), ValueError, "`schedule`"),
    ("config-clip", lambda: TrainConfig(clip_grad_norm=0.0), ValueError, "`clip_grad_norm`"),
    ("config-seed", lambda: TrainConfig(seed=-1), ValueError, "`seed`"),
    ("config-warmup", lambda: TrainConfig(warmup_steps=-2), ValueError, "`warmup_steps`"),
    ("fit-config-type", lambda: _fit(config={"epochs": 1}), TypeError, "`config`"),
    ("fit-resume-no-dir", lambda: _fit(resume=True), ValueError, "`resume`.*`out_dir`"),
    ("fit-missing-key", lambda: _fit(train_data={"sinogram": Y}), ValueError, "`train_data`"),
    ("fit-sizes", lambda: _fit(train_data={"sinogram": Y, "image": X[:1]}), ValueError,
     "`train_data`.*same number"),
    ("fit-empty", lambda: _fit(train_data={"sinogram": Y[:0], "image": X[:0]}), ValueError,
     "`train_data`"),
    ("fit-nan-data", lambda: _fit(train_data={"sinogram": Y * math.nan, "image": X}),
     ValueError, r"`train_data\['sinogram'\]`"),
    ("fit-val-constant", lambda: _fit(val_data={"sinogram": Y, "image": torch.ones_like(X)}),
     ValueError, r"`val_data\[.image.\]`.*constant"),
    ("fit-max-steps", lambda: _fit(max_steps=-1), ValueError, "`max_steps`"),
    ("fit-x0-key-missing", lambda: _fit(config=TrainConfig(**_CFG, x0_key="fbp")), ValueError,
     "`train_data`.*'fbp'"),
    ("validate-batch", lambda: validate(_model(), _data(), batch_size=0), ValueError,
     "`batch_size`"),
    ("setup-unknown", lambda: _setup(bogus=1), ValueError, "unknown setup keys.*bogus"),
    ("setup-size", lambda: _setup(image_size=0), ValueError, "`image_size`"),
    ("setup-noise", lambda: _setup(noise="salt"), ValueError, "noise"),
    ("setup-photons", lambda: _setup(photons=-1.0), ValueError, "`photons`"),
    ("setup-seed", lambda: _setup(data_seed=-3), ValueError, "`data_seed`"),
    ("setup-split", lambda: build_setup(_setup(image_size=16, n_angles=4), "dev"), ValueError,
     "split"),
    ("stack-empty", lambda: stack_dataset([]), ValueError, "`dataset`"),
    ("time-repeats", lambda: time_methods({"id": lambda y: y}, Y, repeats=0), ValueError,
     "`repeats`"),
    ("time-empty", lambda: time_methods({"id": lambda y: y}, Y[:0]), ValueError, "`sinogram`"),
    ("evaluate-batch", lambda: evaluate_methods({"id": lambda y: y}, _data(), batch_size=0),
     ValueError, "`batch_size`"),
    ("evaluate-empty", lambda: evaluate_methods({"id": lambda y: y}, _data(0)), ValueError,
     "`data`"),
    ("validate-empty", lambda: validate(_model(), _data(0)), ValueError, "`data`"),
    # ---------------------------------------------------------------- models
    ("model-name", lambda: build_model("unet", A), ValueError, "model name"),
    ("model-input-shape", lambda: _model()(X), ValueError, "sinogram"),
    ("model-x0-batch", lambda: _model()(Y, X[:1]), ValueError, "x0"),
    ("model-float64-data", lambda: _model()(Y.double()), TypeError,
     r"sinogram is torch.float64 but the network's weights are torch.float32"),
    ("fit-image-without-channel", lambda: _fit(train_data={"sinogram": Y, "image": X[:, 0]}),
     ValueError, r"`train_data\['image'\]` has shape \(2, 16, 16\).*\(N, 1, 16, 16\)"),
    ("fit-image-wrong-size", lambda: _fit(train_data={"sinogram": Y, "image": X[..., :8]}),
     ValueError, r"`train_data\['image'\]` has shape"),
    ("validate-image-shape", lambda: validate(_model(), {"sinogram": Y, "image": X[:, 0]}),
     ValueError, r"`data\['image'\]`"),
    ("task-data-non-square", lambda: _task_data(size=(48, 80)), ValueError,
     r"size must be .* square .*\(48, 80\)"),
    # ---------------------------------------------------------------- files
    ("save-state-type", lambda: save_checkpoint([1], "unused.pt"), TypeError, "`state`"),
    ("atomic-mode", lambda: atomic_write("unused.txt", "a").__enter__(), ValueError, "`mode`"),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_cases_are_distinct_and_many():
    ids = [c[0] for c in CASES]
    assert len(set(ids)) == len(ids) >= 60


# ------------------------------------------------------------------ cases that need files
def test_file_inputs_are_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        (lambda: DicomSliceDataset(tmp_path / "missing", A), FileNotFoundError, "`paths`"),
        (lambda: DicomSliceDataset([tmp_path / "nope.dcm"], A), FileNotFoundError, "`paths`"),
        (lambda: DicomSliceDataset(tmp_path / "empty", A), ValueError, "`paths`"),
        (lambda: read_dicom_slice(tmp_path / "afile"), ValueError, "`path`"),
        (lambda: _fit(out_dir=tmp_path / "afile"), ValueError, "`out_dir`.*is a file"),
        (lambda: _fit(out_dir=tmp_path / "fresh", resume=True), FileNotFoundError,
         "cannot resume"),
        (lambda: save_checkpoint({"a": 1}, tmp_path / "empty"), IsADirectoryError, "`path`"),
        (lambda: load_checkpoint(tmp_path / "missing.pt"), FileNotFoundError, "missing.pt"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()


def test_corrupt_checkpoints_name_the_file(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"w": torch.arange(1000.0)}, good)
    raw = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 64)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Evil(), protocol=2))
    torch.save([1, 2], tmp_path / "list.pt")
    for name in ("truncated.pt", "garbage.pt", "evil.pt", "list.pt"):
        with pytest.raises(CorruptCheckpointError, match=name):
            load_checkpoint(tmp_path / name)
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __reduce__(self):
        return (open, ("pwned", "w"))


@pytest.mark.parametrize("argv, option", [
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--photons", "inf"], "--photons"),
    (["train", "--image-size", "-4"], "--image-size"),
    (["train", "--n-angles", "many"], "--n-angles"),
    (["train", "--save-every", "-1"], "--save-every"),
    (["evaluate", "x.pt", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "x.pt", "--repeats", "0"], "--repeats"),
])
def test_cli_numbers_are_checked_when_parsed(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_cli_out_naming_a_file_fails_before_training(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--out .* is a file"):
        main(["train", "--out", str(tmp_path / "f"), "--no-progress"])


# ------------------------------------------------------------------ correct values at the edges
def test_huge_photon_counts_give_nearly_clean_data():
    y = torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for I0, mu in ((1e25, 1.0), (7e4, 1.0)):
        noisy = PoissonNoise(I0, mu_scale=mu)(y if I0 > 1e20 else y - 33.0,
                                              torch.Generator().manual_seed(1))
        target = y if I0 > 1e20 else y - 33.0
        # the relative count noise is 1/sqrt(rate): 3e-13 at 1e25, 2e-10 at 7e4 * e^33
        assert float((noisy - target).abs().max()) < 1e-8


def test_numpy_scalars_are_accepted():
    assert GaussianNoise(np.float32(0.5)).level == 0.5
    assert PoissonNoise(np.float32(7e4), mu_scale=np.float64(0.1), min_count=np.int64(1)).I0 == 7e4
    assert float(psnr(X, X + 0.1, data_range=np.float32(1.0)).mean()) == pytest.approx(20.0)
    fbp(Y, A, frequency_scaling=np.float32(0.5))
    assert TrainConfig(epochs=np.int64(2), lr=np.float32(1e-3)).epochs == 2


def test_empty_batches_reconstruct_to_empty_batches():
    assert _model()(Y[:0]).shape == (0, 1, 16, 16)
    assert fbp(Y[:0], A).shape == (0, 1, 16, 16)
    assert A(X[:0]).shape == (0, 1, NA, ND)
    assert psnr(X[:0], X[:0]).shape == (0,) and psnr(X[:0], X[:0], 1.0).shape == (0,)
    assert ssim(X[:0], X[:0]).shape == (0,)


def test_ssim_and_psnr_at_the_edges_agree_with_skimage():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g = torch.Generator().manual_seed(3)
    const = torch.full((16, 16), 0.3, dtype=torch.float64)
    rand = torch.rand(16, 16, generator=g, dtype=torch.float64)
    for x, ref in ((rand, const), (const, const), (const + 0.1, const), (rand, rand),
                   (const, rand), (-rand, rand)):
        s = float(ssim(x, ref, 1.0))
        assert -1 <= s <= 1
        assert s == pytest.approx(structural_similarity(ref.numpy(), x.numpy(), data_range=1.0),
                                  abs=1e-10)
        with np.errstate(divide="ignore"):
            expect = peak_signal_noise_ratio(ref.numpy(), x.numpy(), data_range=1.0)
        assert float(psnr(x, ref, 1.0)) == pytest.approx(expect)


# ------------------------------------------------------------------ property-based
_bad_ints = st.one_of(st.integers(max_value=0), st.floats(0.1, 10).filter(lambda v: v != int(v)),
                      st.just(True), st.text(max_size=2))
_bad_reals = st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf),
                       st.text(max_size=2), st.none())


@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(["epochs", "batch_size"]), value=_bad_ints)
def test_train_config_refuses_bad_counts(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        TrainConfig(**{field: value})


@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(["I0", "mu_scale", "min_count"]), value=_bad_reals)
def test_poisson_noise_refuses_bad_parameters(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        PoissonNoise(**{field: value})


@settings(max_examples=30, deadline=None)
@given(value=st.floats(-50, 50), scale=st.floats(0.0, 1e3))
@example(value=50.0, scale=1e-9).via("rounding once gave 1 + 2e-12")
@example(value=-37.5, scale=3e-7)
def test_ssim_stays_in_range_and_psnr_is_not_nan_with_a_fixed_range(value, scale):
    ref = torch.full((1, 1, 8, 8), value, dtype=torch.float64)
    x = ref + scale * torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64)
    s = float(ssim(x, ref, 1.0))
    assert -1 <= s <= 1 + 1e-12
    assert not math.isnan(float(psnr(x, ref, 1.0)))


def test_the_program_reports_bad_settings_without_a_traceback(tmp_path, capsys):
    from recon.training.cli import console_main

    (tmp_path / "f").write_text("x")
    assert console_main(["train", "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    assert console_main(["evaluate", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert "python -m recon.train: error: --out" in err and "missing.pt" in err
    assert "Traceback" not in err


def test_sketched_lspd_default_leaves_a_third_of_the_layers_unsketched():
    from recon.models import SketchedLSPD
    op = RayTransform(ParallelBeamGeometry((16, 16), n_angles=8), cache=False)
    got = {k: SketchedLSPD(op, k, hidden_channels=4).get_config()["n_unsketched"]
           for k in (1, 3, 5, 12)}
    assert got == {1: 1, 3: 1, 5: 2, 12: 4}


def test_task_data_square_sizes_as_a_pair_and_the_home_folder():
    pair = _task_data(size=(32, 32))
    assert pair["image"].shape[-2:] == (32, 32)
    import os
    import re
    from recon.tasks.data import load_task_data
    expanded = re.escape(os.path.expanduser("~/nowhere-here"))
    with pytest.raises((FileNotFoundError, ValueError), match=expanded):
        load_task_data("classification", "stanford-dogs", "test", root="~/nowhere-here")


def test_fan_beam_fbp_of_a_short_scan_warns():
    from recon.operators import FanBeamGeometry
    short = FanBeamGeometry((16, 16), angles=np.linspace(0, 1.3 * math.pi, 40, endpoint=False))
    full = FanBeamGeometry((16, 16), n_angles=40)
    with pytest.warns(RuntimeWarning, match="less than a full turn"):
        fbp(torch.zeros(1, 1, *short.range_shape), RayTransform(short, cache=False))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fbp(torch.zeros(1, 1, *full.range_shape), RayTransform(full, cache=False))


def test_astra_refuses_non_square_pixels():
    pytest.importorskip("astra")
    geom = ParallelBeamGeometry((8, 16), n_angles=4, extent=(8.0, 8.0))
    with pytest.raises(ValueError, match="square pixels"):
        RayTransform(geom, backend="astra")(torch.zeros(1, 1, 8, 16))
