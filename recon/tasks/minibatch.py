"""Task-adapted θ over a whole real training set, in minibatches (the examples' ``--root`` route).

:func:`recon.tasks.example.run_example` learns θ on ``--n-train`` images in one batch
(:class:`bilevel.QuasiNewton`).
With a real data set on disk (Cityscapes' 2975 training images, Stanford Dogs' 12000),
:func:`add_minibatch_route` adds, per noise level σ, the row
``TV, task-learned θ (minibatch, whole training set)``: θ learned by
:class:`bilevel.MinibatchBilevel` (Adam, cosine schedule) for the task loss ``L(T*(x̂(θ)), s)``
over every training image — read from disk one at a time, noisy copy ``y_i = x_i + σ n_i`` with
``n_i`` seeded by ``(seed, i)`` — from the MSE-learned θ of the table, scored on the same
held-out test set as the other rows.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from bilevel import MinibatchBilevel, Result
from bilevel.minibatch import IndexedDataset

from ..problems import TVDenoising
from .experiment import BOUNDS, denoise, theta0

__all__ = ["NoisyImages", "task_dataset", "learn_theta_minibatch", "add_minibatch_route"]

ROUTE = "TV, task-learned θ (minibatch, whole training set)"


class NoisyImages(Dataset):
    """``{"image": x_i, "label": s_i, "y": x_i + σ n_i, "index": i}`` (float64 images) over a data
    set of ``{"image", "label"}`` dicts or a dict of tensors; ``n_i ~ N(0, I)`` seeded by
    ``seed·1_000_003 + i``, so sample ``i`` is the same whenever it is read."""

    def __init__(self, data: Any, sigma: float, seed: int = 0):
        if not (isinstance(sigma, (int, float)) and sigma >= 0 and sigma != float("inf")):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        self.data = data if isinstance(data, IndexedDataset) else IndexedDataset(data)
        self.sigma, self.seed = float(sigma), int(seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = self.data[i]
        clean = torch.as_tensor(item["image"]).double()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        noise = torch.randn(clean.shape, generator=g, dtype=torch.float64)
        return {"image": clean, "label": item["label"], "y": clean + self.sigma * noise,
                "index": item["index"]}


def task_dataset(task: str, source: str, split: str, root: Optional[str] = None, size=None):
    """The data set behind :func:`recon.tasks.data.load_task_data`, unstacked: the real data
    sets read their images from disk one item at a time; the stand-ins are a dict of tensors."""
    from .data import default_size, load_task_data
    if source == "standin":
        return load_task_data(task, source, split, root=root, size=size)
    size = default_size(task, source) if size is None else size
    if source == "cityscapes":
        from ..data.cityscapes import CityscapesSegmentation
        size = (size, 2 * size) if isinstance(size, int) else tuple(size)
        return CityscapesSegmentation(root, "train" if split == "train" else "val", size)
    from ..data.stanford_dogs import StanfordDogs
    return StanfordDogs(root, split, int(size if isinstance(size, int) else size[0]))


def learn_theta_minibatch(outer: nn.Module, train: Dataset, *, start: Optional[Mapping[str, Tensor]] = None,
                          epochs: int = 2, batch_size: int = 16, lr: float = 0.1,
                          progress: bool = False, checkpoint: Optional[str] = None):
    """:class:`bilevel.MinibatchBilevel` on ``TVDenoising`` with the upper loss ``outer`` over the
    data set ``train`` (samples with ``"y"``, ``"image"``, ``"label"``, ``"index"``), from ``start``
    (default :func:`recon.tasks.experiment.theta0`); resumes from ``checkpoint`` when it exists.
    Returns ``(Result, seconds)``."""
    th0 = theta0() if start is None else {k: v.detach().clone().double() for k, v in start.items()}
    loop = MinibatchBilevel(TVDenoising(), outer, optimizer="adam", lr=lr, epochs=epochs,
                            batch_size=batch_size, bounds=BOUNDS, progress=progress,
                            checkpoint=checkpoint)
    resume = Result.load(checkpoint) if checkpoint is not None and os.path.isfile(checkpoint) else None
    t0 = time.perf_counter()
    res = loop.run(th0, train, resume=resume)
    return res, time.perf_counter() - t0


def add_minibatch_route(out: Dict[str, Any], epochs: int = 2, batch_size: int = 16,
                        lr: float = 0.1) -> Dict[str, Any]:
    """Add :data:`ROUTE` to every noise level of an example's result ``out`` (module docstring);
    rewrites ``table.json`` and returns ``out`` with the new table."""
    from ..data.standins import add_gaussian_noise
    from .cli import task_loss, task_scores
    from .summary import format_table, gap_recovered
    from .losses import TaskLoss
    from .operator import TaskOperator
    from .pretrain import load_task_network, predict
    task, source, args = out["task"], out["source"], out["args"]
    net, _ = load_task_network(args["checkpoint"])
    k = out["network"]["num_classes"]
    test = task_dataset(task, source, "test", args["root"])
    test = {key: torch.stack([torch.as_tensor(test[i][key]) for i in range(min(args["n_test"], len(test)))])
            for key in ("image", "label")} if not isinstance(test, Mapping) else test
    out_dir = Path(args["out"])
    for i, sigma in enumerate(args["sigmas"]):
        rows = out["results"][str(sigma)]
        mse = next(r for r in rows if r["route"] == "TV, MSE-learned θ")
        start = mse.get("theta") or mse["theta_per_seed"][0]  # several seeds: seed 0's θ
        train = NoisyImages(task_dataset(task, source, "train", args["root"]), sigma, seed=100 + i)
        res, sec = learn_theta_minibatch(
            TaskLoss(TaskOperator(net), task_loss(task)), train,
            start={n: torch.tensor(v, dtype=torch.float64) for n, v in start.items()}, epochs=epochs,
            batch_size=batch_size, lr=lr, progress=not args.get("no_progress", False),
            checkpoint=str(out_dir / f"minibatch_sigma{sigma:g}.pt"))
        y = add_gaussian_noise(test["image"].double(), sigma, 200 + i)
        logits = predict(net, denoise(res.theta, y).float())
        rows.append({"route": ROUTE, **task_scores(task, logits, test["label"], k),
                     "theta": {n: float(v) for n, v in res.theta.items()}, "samples": len(train),
                     "minibatch_message": res.message, "seconds": round(sec, 2)})
    metrics = ["dice", "iou"] if task == "segmentation" else ["accuracy", "top5"]
    top = str(args["sigmas"][-1])
    out["gap_recovered_at_highest_sigma"] = {r["route"]: gap_recovered(out["results"][top], metrics[0], r["route"])
                                             for r in out["results"][top][2:]}
    out.pop("table", None)
    tmp = out_dir / "table.json.tmp"  # atomic: temporary file, then rename
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, out_dir / "table.json")
    out["table"] = format_table(out["results"], metrics)
    return out
