"""Pretraining of task networks (checkpoints, resume, CLI) and the two examples' --quick runs."""
import importlib.util
import json
import os
import time

import pytest
import torch

from recon.tasks import SegmentationLoss
from recon.tasks.pretrain import build_task_network, load_task_network, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = {"kind": "unet", "in_channels": 1, "num_classes": 3, "base_channels": 2, "depth": 1}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n=12):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 1, 8, 8, generator=g), "label": torch.randint(0, 3, (n, 8, 8), generator=g)}


def _net():
    torch.manual_seed(0)
    return build_task_network(CFG)


def test_resumed_pretraining_repeats_the_uninterrupted_run(tmp_path):
    data, loss = _data(), SegmentationLoss({"ce": 1.0, "dice": 1.0})
    full = _net()
    h_full = pretrain(full, data, loss, epochs=3, batch_size=5, progress=False)
    ck = tmp_path / "ck" / "net.pt"
    part = _net()
    pretrain(part, data, loss, epochs=2, batch_size=5, checkpoint=ck, config=CFG, progress=False)
    resumed = _net()
    h_res = pretrain(resumed, data, loss, epochs=3, batch_size=5, checkpoint=ck, config=CFG, progress=False)
    assert h_res["loss"] == pytest.approx(h_full["loss"], rel=1e-5)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert sorted(os.listdir(ck.parent)) == ["net.pt"]        # no temporary file left behind
    net, state = load_task_network(ck)
    assert state["epoch"] == 3 and not net.training
    assert torch.equal(net.outc.weight, resumed.outc.weight)


def _running_stats(net):
    return [t.clone() for k, t in net.state_dict().items() if "running_" in k]


def test_pretraining_ends_with_the_batchnorm_statistics_of_its_final_weights(tmp_path):
    from recon.models.batchnorm import recompute_batchnorm

    data, loss, ck = _data(), SegmentationLoss(), tmp_path / "net.pt"
    net = _net()
    pretrain(net, data, loss, epochs=2, batch_size=5, lr=1e-2, checkpoint=ck, config=CFG,
             progress=False)
    trained = _running_stats(net)
    probe = _net()
    probe.load_state_dict(net.state_dict())
    assert recompute_batchnorm(probe, data["image"], 5)
    for a, b in zip(trained, _running_stats(probe)):  # already exact: a second pass agrees
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    saved, state = load_task_network(ck)
    assert state["batchnorm_recomputed"] is True
    for a, b in zip(trained, _running_stats(saved)):
        assert torch.equal(a, b)
    # a checkpoint of the last epoch written before the statistics were (interrupted there)
    # gets them on resume, and the weights do not move
    state["batchnorm_recomputed"] = False
    for k in [k for k in state["model"] if k.endswith("running_mean")]:
        state["model"][k] = torch.full_like(state["model"][k], 7.0)
    torch.save(state, ck)
    again = _net()
    pretrain(again, data, loss, epochs=2, batch_size=5, lr=1e-2, checkpoint=ck, config=CFG,
             progress=False)
    assert torch.equal(again.outc.weight, net.outc.weight)
    for a, b in zip(trained, _running_stats(again)):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    assert load_task_network(ck)[1]["batchnorm_recomputed"] is True


def test_recompute_batchnorm_takes_tensors_and_refuses_a_bad_batch_size():
    from recon.models.batchnorm import recompute_batchnorm

    x = 3.0 + 2.0 * torch.randn(10, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    bn = torch.nn.BatchNorm2d(2).eval()
    assert recompute_batchnorm(bn, x, batch_size=10)
    assert torch.allclose(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(bn.running_var, x.transpose(0, 1).reshape(2, -1).var(dim=1), atol=1e-5)
    assert not bn.training and bn.momentum == 0.1
    assert not recompute_batchnorm(torch.nn.Conv2d(2, 2, 1), x, batch_size=4)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        recompute_batchnorm(bn, x, batch_size=0)


def test_pretrain_named_errors(tmp_path):
    data = _data()
    ck = tmp_path / "net.pt"
    pretrain(_net(), data, SegmentationLoss(), epochs=1, checkpoint=ck, config=CFG, progress=False)
    other = dict(CFG, base_channels=4)
    with pytest.raises(ValueError, match=r"config.base_channels: 2 \(saved\) != 4 \(now\)"):
        pretrain(build_task_network(other), data, SegmentationLoss(), epochs=2, checkpoint=ck,
                 config=other, progress=False)
    with pytest.raises(ValueError, match="same positive number"):
        pretrain(_net(), {"image": data["image"], "label": data["label"][:3]}, SegmentationLoss(), progress=False)
    with pytest.raises(ValueError, match="kind"):
        build_task_network({"kind": "vgg"})
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a task-network checkpoint"):
        load_task_network(tmp_path / "other.pt")


def test_pretrain_command_line_writes_a_checkpoint_and_resumes(tmp_path, capsys):
    from recon.tasks.cli import main
    argv = ["pretrain", "--task", "classification", "--epochs", "1", "--n-train", "32",
            "--n-test", "16", "--batch-size", "16", "--no-progress", "--out", str(tmp_path / "c.pt")]
    out = main(argv)
    assert out["config"]["kind"] == "resnet18" and len(out["loss"]) == 1
    assert 0.0 <= out["clean_test"]["accuracy"] <= 1.0
    again = main(argv[:3] + ["--epochs", "2"] + argv[5:])
    assert len(again["loss"]) == 2 and again["loss"][0] == out["loss"][0]
    assert '"clean_test"' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["pretrain", "--task", "classification", "--source", "cityscapes", "--out", "x.pt"])


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script", ["stanford_dogs", "cityscapes"])
def test_example_quick_runs(script, tmp_path, capsys):
    mod = _load(script, f"examples/{script}.py")
    out = mod.main(["--quick", "--no-progress", "--threads", "1", "--out", str(tmp_path)])
    rows = out["results"]["0.3"]
    assert [r["route"] for r in rows][:3] == ["T* on clean", "T* on noisy", "TV, MSE-learned θ"]
    assert len(rows) == 6 and all("theta" in r for r in rows[2:])
    saved = json.loads((tmp_path / "table.json").read_text())
    assert saved["results"]["0.3"][0]["route"] == "T* on clean"
    assert os.path.getsize(tmp_path / "samples_sigma0.3.png") > 0
    assert "T* on noisy" in capsys.readouterr().out
    # the stage file keeps copies of the 4 sample images and logits, not views of the test batch
    for stage in torch.load(tmp_path / "stages.pt", weights_only=True)["done"].values():
        for key in ("x", "logits"):
            t = stage[key]
            assert len(t) == 4 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
