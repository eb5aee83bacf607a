"""The examples' --root route: noisy samples streamed from a real on-disk data set (a tiny
Stanford Dogs tree) and θ learned over all of them by MinibatchBilevel with a task loss."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from recon.tasks import ClassificationLoss, TaskLoss, TaskOperator
from recon.tasks.minibatch import NoisyImages, learn_theta_minibatch, task_dataset

from test_task_data import _write_dogs


def test_noisy_images_are_seeded_per_index_and_float64(tmp_path):
    ds = NoisyImages(task_dataset("classification", "stanford-dogs", "train", str(_write_dogs(tmp_path)),
                                  size=16), 0.1, seed=3)
    a, b = ds[1], ds[1]
    assert len(ds) == 2 and a["index"] == 1 and a["y"].dtype == torch.float64
    assert torch.equal(a["y"], b["y"]) and not torch.equal(a["y"], ds[0]["y"])
    assert float((a["y"] - a["image"]).std()) == pytest.approx(0.1, rel=0.3)
    with pytest.raises(ValueError, match="sigma must be a finite number"):
        NoisyImages(ds.data, -1.0)


def test_theta_is_learned_over_the_streamed_data_set_with_a_task_loss(tmp_path):
    torch.set_num_threads(1)
    root = str(_write_dogs(tmp_path))
    train = NoisyImages(task_dataset("classification", "stanford-dogs", "train", root, size=16), 0.2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    outer = TaskLoss(TaskOperator(net), ClassificationLoss())
    path = str(tmp_path / "mb.pt")
    start = {"log_weight": torch.tensor(-4.0, dtype=torch.float64),
             "log_smoothing": torch.tensor(-4.0, dtype=torch.float64)}
    res, sec = learn_theta_minibatch(outer, train, start=start, epochs=2, batch_size=2, checkpoint=path)
    assert res.n_iter == 2 and res.message.startswith("maximum number of epochs (2)")
    assert abs(float(res.theta["log_weight"]) + 4.0) > 1e-3  # θ moved
    again, _ = learn_theta_minibatch(outer, train, start=start, epochs=2, batch_size=2, checkpoint=path)
    assert again.n_iter == 2  # resumed from the finished checkpoint: no new steps
