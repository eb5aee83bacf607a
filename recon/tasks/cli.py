"""Command line of :mod:`recon.tasks` (``python -m recon.tasks --help``).

::

    python -m recon.tasks pretrain --task segmentation --source standin --epochs 8 --out runs/unet.pt
    python -m recon.tasks pretrain --task classification --source stanford-dogs --root /data/dogs \\
        --out runs/resnet50.pt

``pretrain`` trains the default network of :func:`recon.tasks.data.default_network_config` on the
clean training split, writing the checkpoint atomically after every epoch; running the same
command again resumes (``--restart`` starts over). It prints the per-epoch loss and the clean
test metric.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ..scripts import plain_text
from .data import SOURCES, TASKS, default_network_config, load_task_data

__all__ = ["main", "task_loss", "task_scores"]


def task_loss(task: str, ignore_index: int = 255):
    """The default pretraining / upper loss: CE + soft Dice (segmentation) or CE (classification)."""
    from .losses import ClassificationLoss, SegmentationLoss
    if task == "segmentation":
        return SegmentationLoss({"ce": 1.0, "dice": 1.0}, ignore_index=ignore_index)
    return ClassificationLoss()


def task_scores(task: str, logits, labels, n_classes: int) -> Dict[str, float]:
    """``{"dice", "iou"}`` (class means, ignore index 255) or ``{"accuracy", "top5"}``.

    Logits holding NaN or inf have no prediction (``argmax`` of NaN is class 0): every score
    is then NaN, with a ``RuntimeWarning``, never a plausible number."""
    import math
    import warnings

    import torch

    from .metrics import classification_accuracy, confusion_matrix, segmentation_scores, top_k_accuracy
    names = ("dice", "iou") if task == "segmentation" else ("accuracy", "top5")
    if not bool(torch.isfinite(logits).all()):
        warnings.warn(f"{task} logits hold NaN or infinite values; every score is NaN",
                      RuntimeWarning, stacklevel=2)
        return {name: math.nan for name in names}
    if task == "segmentation":
        sc = segmentation_scores(confusion_matrix(logits, labels, n_classes))
        return {"dice": sc["mean_dice"], "iou": sc["mean_iou"]}
    return {"accuracy": classification_accuracy(logits, labels), "top5": top_k_accuracy(logits, labels, 5)}


def data_settings(task: str, source: str, root, size, n_train) -> Dict[str, Any]:
    """The data settings a pretraining checkpoint records (and a resume compares)."""
    return {"task": task, "source": source, "root": None if root is None else str(root),
            "size": size, "n_train": n_train}


def _pretrain(args: argparse.Namespace) -> Dict[str, Any]:
    import torch
    from .pretrain import (build_task_network, check_pretraining_resume, predict, pretrain,
                           pretraining_settings)

    torch.set_num_threads(args.threads)
    cfg = default_network_config(args.task, args.source)
    if args.base_channels is not None:
        cfg["base_channels"] = args.base_channels
    if args.arch is not None:
        cfg["kind"] = args.arch
    meta = data_settings(args.task, args.source, args.root, args.size, args.n_train)
    if args.out.is_file() and not args.restart:  # the resume rule before the data are read
        check_pretraining_resume(args.out, pretraining_settings(
            cfg, args.lr, args.batch_size, 0.0, args.seed, None, meta), ignore=["n_samples"])
    # every file and data error before the first epoch: the test split is read now
    train = load_task_data(args.task, args.source, "train", args.n_train, args.size, args.root, args.seed)
    test = load_task_data(args.task, args.source, "test", args.n_test, args.size, args.root, args.seed)
    torch.manual_seed(args.seed)
    net = build_task_network(cfg)
    hist = pretrain(net, train, task_loss(args.task), epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed, checkpoint=args.out, resume=not args.restart,
                    config=cfg, progress=not args.no_progress,
                    metadata=meta)
    scores = task_scores(args.task, predict(net, test["image"]), test["label"], cfg["num_classes"])
    return {"checkpoint": str(args.out), "config": cfg, "loss": hist["loss"], "clean_test": scores,
            "seconds": hist["seconds"]}


def _parser() -> argparse.ArgumentParser:
    from ..training.argtypes import float_above, int_at_least

    pos, nonneg, rate = int_at_least(1), int_at_least(0), float_above(0.0, strict=True)
    ap = argparse.ArgumentParser(prog="python -m recon.tasks", description=plain_text(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="train the task network T* on clean data")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--source", default="standin",
                   choices=sorted({s for v in SOURCES.values() for s in v}))
    p.add_argument("--root", default=None, help="folder of a local Cityscapes / Stanford Dogs copy")
    p.add_argument("--out", type=Path, required=True, help="checkpoint file (.pt)")
    p.add_argument("--epochs", type=nonneg, default=8)
    p.add_argument("--batch-size", type=pos, default=16)
    p.add_argument("--lr", type=rate, default=2e-3)
    p.add_argument("--size", type=pos, default=None)
    p.add_argument("--n-train", type=pos, default=None)
    p.add_argument("--n-test", type=pos, default=None)
    p.add_argument("--base-channels", type=pos, default=None, help="U-Net width")
    p.add_argument("--arch", choices=("resnet18", "resnet50"), default=None)
    p.add_argument("--seed", type=nonneg, default=0)
    p.add_argument("--threads", type=pos, default=1)
    p.add_argument("--restart", action="store_true",
                   help="start over, overwriting an existing checkpoint (a rerun with other "
                        "settings is refused otherwise)")
    p.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv`` and run the sub-command; returns its result dict (also printed as JSON).

    Every option is checked before any work (status 2 naming it); rerunning with the same
    ``--out`` continues that pretraining only with the same settings (else the differences
    are listed and nothing is trained; ``--restart`` starts over)."""
    from bilevel.history import check_writable

    ap = _parser()
    args = ap.parse_args(argv)
    if args.source != "standin" and args.root is None:
        ap.error(f"--source {args.source} needs --root")
    if args.source == "standin" and args.root is not None:
        ap.error(f"--root {args.root!r} is read only for a real data set: give --source "
                 f"{' or '.join(s for s in SOURCES[args.task] if s != 'standin')} too (without "
                 f"it the generated stand-in is used)")
    if args.source not in SOURCES[args.task]:
        ap.error(f"--source for {args.task} must be one of {SOURCES[args.task]}")
    kind = default_network_config(args.task, args.source)["kind"]
    if args.base_channels is not None and kind != "unet":
        ap.error(f"--base-channels sets the U-Net width; the {args.task} network is a {kind}")
    if args.arch is not None and kind == "unet":
        ap.error("--arch chooses the classifier; the segmentation network is a U-Net")
    try:
        check_writable(args.out, "--out")
    except (TypeError, ValueError) as exc:
        ap.error(str(exc))
    out = _pretrain(args)
    print(json.dumps(out, indent=1))  # the command line's report (not library code)
    return out
