"""Bad inputs of the training, task and checkpoint surfaces: named errors before any work,
never a silent acceptance; non-finite losses, weights and logits never become plausible
results; damaged checkpoints are detected; metadata that ``load`` would refuse is converted or
refused by ``save``; a resume with other settings is refused with the list of differences.

``CASES`` is a table ``(id, call, error type, regex the message must match)``; ``ARGV`` one of
command lines that must exit with status 2 naming the option at parse time.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bilevel import Result
from bilevel.history import CorruptCheckpointError as BilevelCorrupt
from recon.checkpoint import (CorruptCheckpointError, ResumeMismatchError, check_resume,
                              load_checkpoint, plain_state, save_checkpoint,
                              settings_differences)
from recon.metrics import accuracy, dice, iou
from recon.tasks import SegmentationLoss, confusion_matrix, mean_dice, mean_iou, top_k_accuracy
from recon.tasks.cli import task_scores
from recon.tasks.pretrain import build_task_network, load_task_network, pretrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAN, INF = math.nan, math.inf
CFG = {"kind": "unet", "in_channels": 1, "num_classes": 3, "base_channels": 2, "depth": 1}
LABELS = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(0))
LOGITS = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def _with(t, value, index=(0, 0, 0, 0)):
    t = t.clone()
    t[index] = value
    return t


def _data(n=4):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 1, 8, 8, generator=g),
            "label": torch.randint(0, 3, (n, 8, 8), generator=g)}


def _pretrain(**kw):
    torch.manual_seed(0)
    args = dict(network=build_task_network(CFG), data=_data(), loss=SegmentationLoss(), epochs=1,
                batch_size=2, progress=False)
    args.update(kw)
    return pretrain(**args)


class _Opaque:
    pass


CASES = [
    # ---------------------------------------------------------------- metrics of NaN logits
    ("cm-nan-logits", lambda: confusion_matrix(_with(LOGITS, NAN), LABELS, 3), ValueError,
     "`pred` holds 1 NaN"),
    ("cm-inf-logits", lambda: confusion_matrix(_with(LOGITS, INF), LABELS, 3), ValueError,
     "`pred`.*infinite"),
    ("cm-all-nan-logits", lambda: confusion_matrix(LOGITS * NAN, LABELS, 3), ValueError,
     "`pred` holds 96 NaN"),
    ("cm-nan-float-labels", lambda: confusion_matrix(_with(LABELS.double(), NAN, (0, 0, 0)),
                                                     LABELS, 3), ValueError, "`pred`"),
    ("mean-dice-nan-logits", lambda: mean_dice(_with(LOGITS, NAN), LABELS, 3), ValueError,
     "`pred`"),
    ("mean-iou-nan-logits", lambda: mean_iou(_with(LOGITS, -INF), LABELS, 3), ValueError,
     "`pred`"),
    ("topk-nan-logits", lambda: top_k_accuracy(_with(torch.randn(4, 10), NAN, (1, 2)),
                                               torch.zeros(4, dtype=torch.long), 5),
     ValueError, "`logits`"),
    ("top1-inf-logits", lambda: top_k_accuracy(_with(torch.randn(4, 10), INF, (0, 0)),
                                               torch.zeros(4, dtype=torch.long), 1),
     ValueError, "`logits`"),
    # ---------------------------------------------------------------- pretraining settings
    ("pretrain-lr-zero", lambda: _pretrain(lr=0.0), ValueError, "`lr`.*got 0.0"),
    ("pretrain-lr-nan", lambda: _pretrain(lr=NAN), ValueError, "`lr`"),
    ("pretrain-lr-inf", lambda: _pretrain(lr=INF), ValueError, "`lr`"),
    ("pretrain-lr-negative", lambda: _pretrain(lr=-1e-3), ValueError, "`lr`"),
    ("pretrain-lr-string", lambda: _pretrain(lr="1e-3"), ValueError, "`lr`"),
    ("pretrain-wd-negative", lambda: _pretrain(weight_decay=-1.0), ValueError, "`weight_decay`"),
    ("pretrain-wd-nan", lambda: _pretrain(weight_decay=NAN), ValueError, "`weight_decay`"),
    ("pretrain-epochs-negative", lambda: _pretrain(epochs=-1), ValueError, "`epochs`"),
    ("pretrain-epochs-float", lambda: _pretrain(epochs=1.5), ValueError, "`epochs`"),
    ("pretrain-batch-zero", lambda: _pretrain(batch_size=0), ValueError, "`batch_size`"),
    ("pretrain-batch-bool", lambda: _pretrain(batch_size=True), ValueError, "`batch_size`"),
    ("pretrain-seed-negative", lambda: _pretrain(seed=-1), ValueError, "`seed`"),
    ("pretrain-nan-pixel", lambda: _pretrain(data={**_data(), "image": _with(_data()["image"], NAN,
                                                                           (2, 0, 3, 3))}),
     ValueError, r"data\['image'\] holds NaN.*images \[2\]"),
    ("pretrain-inf-pixel", lambda: _pretrain(data={**_data(), "image": _data()["image"] * INF}),
     ValueError, r"data\['image'\]"),
    ("pretrain-label-count", lambda: _pretrain(data={**_data(), "label": _data()["label"][:2]}),
     ValueError, "same positive number"),
    ("pretrain-nan-loss", lambda: _pretrain(loss=lambda z, s: z.sum() * NAN), FloatingPointError,
     "pretraining loss is nan at epoch 1, batch 1"),
    ("pretrain-inf-loss", lambda: _pretrain(loss=lambda z, s: z.sum() * INF + 1), FloatingPointError,
     "pretraining loss is"),
    ("pretrain-checkpoint-is-dir", lambda: _pretrain(checkpoint=os.getcwd()), ValueError,
     "checkpoint .* is a directory"),
    # ---------------------------------------------------------------- what save would store
    ("save-opaque-object", lambda: save_checkpoint({"a": _Opaque()}, "unused.pt"), TypeError,
     r"`state\['a'\]` is a .*_Opaque"),
    ("save-function", lambda: save_checkpoint({"f": len}, "unused.pt"), TypeError,
     r"`state\['f'\]`"),
    ("save-nested-object", lambda: save_checkpoint({"meta": {"x": [1, _Opaque()]}}, "unused.pt"),
     TypeError, r"`state\['meta'\]\['x'\]\[1\]`"),
    ("save-set", lambda: save_checkpoint({"s": {1, 2}}, "unused.pt"), TypeError, r"`state\['s'\]`"),
    ("save-module", lambda: save_checkpoint({"net": torch.nn.Linear(1, 1)}, "unused.pt"),
     TypeError, r"`state\['net'\]`.*Linear"),
    ("save-object-key", lambda: save_checkpoint({_Opaque(): 1}, "unused.pt"), TypeError,
     "key of state"),
    # ---------------------------------------------------------------- the resume rule
    ("resume-rule-lists-diffs", lambda: check_resume("run/last.pt", {"lr": 1e-3, "n": 4},
                                                     {"lr": 2e-3, "n": 4}),
     ResumeMismatchError, r"lr: 0.001 \(saved\) != 0.002 \(now\)"),
    ("resume-rule-missing-key", lambda: check_resume("p", {"a": 1}, {"a": 1, "b": 2}),
     ResumeMismatchError, r"b: '<missing>' \(saved\) != 2 \(now\)"),
    ("resume-rule-nested", lambda: check_resume("p", {"setup": {"noise": "none"}},
                                                {"setup": {"noise": "poisson"}}),
     ResumeMismatchError, r"setup.noise: 'none' \(saved\) != 'poisson'"),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named(call, error, pattern, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a refused save must not leave "unused.pt" anywhere
    with pytest.raises(error, match=pattern):
        call()
    assert not Path("unused.pt").exists()


def test_cases_are_distinct():
    ids = [c[0] for c in CASES]
    assert len(set(ids)) == len(ids) >= 30


# ------------------------------------------------------------------ command lines (status 2)
def _recon_train(argv):
    from recon.training import main
    return main(argv)


def _recon_tasks(argv):
    from recon.tasks.cli import main
    return main(argv)


def _example(argv):
    from recon.tasks.example import parse_args
    return parse_args("cityscapes", argv, "doc")


_PT = ["pretrain", "--task", "segmentation", "--out", "x.pt"]
ARGV = [
    ("train-clip-nan", _recon_train, ["train", "--clip", "nan"], "--clip"),
    ("train-clip-inf", _recon_train, ["train", "--clip", "inf"], "--clip"),
    ("train-betas-one", _recon_train, ["train", "--betas", "1.0", "0.99"], "--betas"),
    ("train-betas-nan", _recon_train, ["train", "--betas", "nan", "0.99"], "--betas"),
    ("train-warmup-negative", _recon_train, ["train", "--warmup", "-1"], "--warmup"),
    ("train-noise-level-nan", _recon_train, ["train", "--noise-level", "nan"], "--noise-level"),
    ("train-step-init-zero", _recon_train, ["train", "--step-init", "0"], "--step-init"),
    ("tasks-lr-zero", _recon_tasks, _PT + ["--lr", "0"], "--lr"),
    ("tasks-lr-nan", _recon_tasks, _PT + ["--lr", "nan"], "--lr"),
    ("tasks-base-channels-zero", _recon_tasks, _PT + ["--base-channels", "0"], "--base-channels"),
    ("tasks-epochs-negative", _recon_tasks, _PT + ["--epochs", "-1"], "--epochs"),
    ("tasks-batch-zero", _recon_tasks, _PT + ["--batch-size", "0"], "--batch-size"),
    ("tasks-size-zero", _recon_tasks, _PT + ["--size", "0"], "--size"),
    ("tasks-n-train-zero", _recon_tasks, _PT + ["--n-train", "0"], "--n-train"),
    ("tasks-n-test-text", _recon_tasks, _PT + ["--n-test", "all"], "--n-test"),
    ("tasks-seed-negative", _recon_tasks, _PT + ["--seed", "-1"], "--seed"),
    ("tasks-threads-zero", _recon_tasks, _PT + ["--threads", "0"], "--threads"),
    ("tasks-base-channels-classifier", _recon_tasks,
     ["pretrain", "--task", "classification", "--out", "x.pt", "--base-channels", "4"],
     "--base-channels"),
    ("tasks-arch-segmentation", _recon_tasks, _PT + ["--arch", "resnet18"], "--arch"),
    ("tasks-out-directory", _recon_tasks, ["pretrain", "--task", "segmentation", "--out", "."],
     "--out"),
    ("example-sigma-negative", _example, ["--sigmas", "-0.1"], "--sigmas"),
    ("example-sigma-nan", _example, ["--sigmas", "0.1", "nan"], "--sigmas"),
    ("example-tolerance-zero", _example, ["--tolerances", "0"], "--tolerances"),
    ("example-tolerance-above-one", _example, ["--tolerances", "2"], "--tolerances"),
    ("example-iters-zero", _example, ["--iters", "0"], "--iters"),
    ("example-n-test-zero", _example, ["--n-test", "0"], "--n-test"),
    ("example-finetune-lr-zero", _example, ["--finetune-lr", "0"], "--finetune-lr"),
    ("example-epochs-negative", _example, ["--epochs", "-2"], "--epochs"),
    ("example-threads-zero", _example, ["--threads", "0"], "--threads"),
]


@pytest.mark.parametrize("entry, argv, option", [c[1:] for c in ARGV], ids=[c[0] for c in ARGV])
def test_command_line_options_are_refused_when_parsed(entry, argv, option, capsys, tmp_path,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        entry(argv)
    assert info.value.code == 2
    assert option in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # nothing was built or written


def test_example_output_that_is_a_file_fails_before_any_work(tmp_path):
    from recon.tasks.example import run_example

    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--out .* is a file"):
        run_example("segmentation", "cityscapes", ["--out", str(tmp_path / "f")])


# ------------------------------------------------------------------ correct values
def test_nan_predictions_score_nan_never_a_plausible_number():
    target = (torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    pred = _with(target.clone(), NAN, (1, 0, 2, 2))
    for metric in (dice, iou):
        out = metric(pred, target)
        assert math.isnan(float(out[1])) and float(out[0]) == 1.0 == float(out[2])
    assert math.isnan(float(accuracy(_with(LOGITS, NAN), LABELS)))
    with pytest.warns(RuntimeWarning, match="NaN"):
        scores = task_scores("segmentation", _with(LOGITS, NAN), LABELS, 3)
    assert all(math.isnan(v) for v in scores.values()) and set(scores) == {"dice", "iou"}
    with pytest.warns(RuntimeWarning):
        scores = task_scores("classification", torch.full((4, 10), NAN), torch.zeros(4).long(), 10)
    assert all(math.isnan(v) for v in scores.values())


def test_a_diverging_pretraining_writes_no_checkpoint(tmp_path):
    ck = tmp_path / "net.pt"
    with pytest.raises(FloatingPointError):
        _pretrain(checkpoint=ck, config=CFG, epochs=2, loss=lambda z, s: z.sum() * NAN)
    assert not ck.exists()


def test_checkpoints_with_non_finite_weights_are_refused_on_load(tmp_path):
    torch.manual_seed(0)
    net = build_task_network(CFG)
    state = net.state_dict()
    state["outc.weight"] = state["outc.weight"] * NAN
    save_checkpoint({"config": CFG, "model": state}, tmp_path / "nan.pt")
    with pytest.raises(FloatingPointError, match=r"nan.pt.*outc.weight"):
        load_task_network(tmp_path / "nan.pt")


def test_save_converts_numpy_scalars_arrays_and_paths_so_load_accepts_them(tmp_path):
    meta = {"lr": np.float32(1e-3), "n": np.int64(4), "ok": np.bool_(True), "root": Path("/data"),
            "shape": (np.int32(2), 3), "arr": np.arange(3.0), "nested": [{"p": Path("a/b")}]}
    save_checkpoint({"metadata": meta}, tmp_path / "ck.pt")
    back = load_checkpoint(tmp_path / "ck.pt")["metadata"]
    assert back["lr"] == pytest.approx(1e-3) and type(back["lr"]) is float
    assert back["n"] == 4 and type(back["n"]) is int and back["ok"] is True
    assert back["root"] == "/data" and back["nested"] == [{"p": "a/b"}]
    assert back["shape"] == (2, 3) and torch.equal(back["arr"], torch.arange(3.0, dtype=torch.float64))
    assert plain_state({"t": (1, [2.0])}) == {"t": (1, [2.0])}


def _flip(path: Path, record: str) -> None:
    """Flip one bit inside the stored bytes of the zip record ``record`` (not its header)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record))
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x04
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("record", ["data/0", "data.pkl"])
def test_flipped_bytes_inside_a_record_are_detected_by_both_loaders(tmp_path, record):
    ck = tmp_path / "ck.pt"
    save_checkpoint({"w": torch.arange(1000.0), "note": "x" * 50}, ck)
    _flip(ck, record)
    with pytest.raises(CorruptCheckpointError, match=rf"ck.pt.*{record}.*CRC-32"):
        load_checkpoint(ck)
    res = Result(theta={"a": torch.arange(1000.0)}, x=None, history=__import__(
        "bilevel").History(), success=True, message="ok", n_iter=0)
    res.save(str(tmp_path / "res.pt"))
    _flip(tmp_path / "res.pt", record)
    with pytest.raises(BilevelCorrupt, match="res.pt"):
        Result.load(str(tmp_path / "res.pt"))
    assert CorruptCheckpointError is BilevelCorrupt and issubclass(BilevelCorrupt, ValueError)


def test_settings_differences_treat_tuples_lists_and_numpy_numbers_as_equal():
    assert settings_differences({"betas": (0.5, 0.99), "n": 4}, {"betas": [0.5, 0.99],
                                                                 "n": np.int64(4)}) == []
    assert settings_differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}},
                                ignore=["a.c"]) == []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        diffs = check_resume("p", {"lr": 1.0}, {"lr": 2.0}, accept_changes=True)
    assert diffs == ["lr: 1.0 (saved) != 2.0 (now)"] and "changes accepted" in str(seen[0].message)
