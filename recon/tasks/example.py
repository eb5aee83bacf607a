"""The driver behind ``examples/cityscapes.py`` and ``examples/stanford_dogs.py``.

``run_example(task, source, argv)`` pretrains (or loads, or resumes) ``T*`` on clean data, then
for every noise level ``σ`` builds seeded noisy copies ``y = x + σn`` of a small training set
(θ is learned on it) and of a held-out test set (every row is scored on it), and runs the rows
of :func:`recon.tasks.experiment.run_noise_level`. It returns and writes ``table.json``, a
``samples_sigma<σ>.png`` per noise level (input / prediction per row) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..scripts import SMOKE_RUN, apply_quick, help_parser
from .cli import task_loss, task_scores
from .data import default_network_config, load_task_data
from .experiment import run_noise_level
from .pretrain import build_task_network, pretrain

__all__ = ["run_example", "parse_args", "format_table", "gap_recovered"]

FINETUNE = {"unet": ["up2", "up3", "outc"], "resnet18": ["layer4", "fc"], "resnet50": ["layer4.2", "fc"]}


def parse_args(source: str, argv: Optional[Sequence[str]], doc: str) -> argparse.Namespace:
    """Command-line options shared by both examples (``--quick``: smoke run, < 1 minute, whose
    settings :func:`recon.scripts.apply_quick` applies; ``args.notes`` holds what it reports)."""
    ap = help_parser(doc)
    ap.add_argument("--root", default=None, help=f"local {source} copy (default: the stand-in)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--n-train", type=int, default=100, help="images θ is learned on")
    ap.add_argument("--n-test", type=int, default=500, help="held-out images every row is scored on")
    ap.add_argument("--n-pretrain", type=int, default=None, help="clean images T* is trained on")
    ap.add_argument("--epochs", type=int, default=None, help="pretraining epochs")
    ap.add_argument("--iters", type=int, default=10, help="HOAG outer iterations per route")
    ap.add_argument("--tolerances", type=float, nargs="+", default=[1e-3, 1e-5])
    ap.add_argument("--finetune-lr", type=float, default=1e-4, help="Adam step of the fine-tuned layers")
    ap.add_argument("--checkpoint", default=None, help="T* checkpoint (default OUT/task_net.pt)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run (< 1 minute) in runs/quick/ (its numbers are not meaningful)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.notes = []
    if args.quick:
        args.notes = apply_quick(ap, args, argv, {"sigmas": [0.3], "n_train": 8, "n_test": 32,
                                                  "iters": 3, "n_pretrain": 96, "epochs": 1})
    return args


def _pretrained(task: str, source: str, args, progress: bool):
    cfg = default_network_config(task, source)
    if args.quick and cfg["kind"] == "unet":
        cfg["base_channels"] = 4
    torch.manual_seed(0)
    net = build_task_network(cfg)
    data = load_task_data(task, source, "train", args.n_pretrain, root=args.root)
    info = pretrain(net, data, task_loss(task), epochs=args.epochs, batch_size=16, lr=2e-3,
                    checkpoint=args.checkpoint, config=cfg, progress=progress)
    return net.eval(), cfg, info


def _splits(task, source, args):
    train_all = load_task_data(task, source, "train", None if source != "standin" or task != "segmentation"
                               else args.n_train, root=args.root, seed=7)
    g = torch.Generator().manual_seed(7)
    pick = torch.randperm(len(train_all["label"]), generator=g)[:args.n_train]
    train = {k: v[pick] for k, v in train_all.items()}
    test = load_task_data(task, source, "test", args.n_test, root=args.root)
    n = min(args.n_test, len(test["label"]))
    return train, {k: v[:n] for k, v in test.items()}


def _noisy(data: Dict[str, torch.Tensor], sigma: float, seed: int) -> Dict[str, torch.Tensor]:
    from ..data.standins import add_gaussian_noise
    clean = data["image"].double()
    return {"image": clean, "label": data["label"], "y": add_gaussian_noise(clean, sigma, seed)}


def gap_recovered(rows: List[Dict[str, Any]], metric: str, route: str) -> float:
    """``(m_route − m_noisy) / (m_clean − m_noisy)``: the fraction of the clean-minus-noisy gap of
    the task metric ``m`` that a route recovers (1: as good as clean images)."""
    m = {r["route"]: r[metric] for r in rows}
    gap = m["T* on clean"] - m["T* on noisy"]
    return float("nan") if gap == 0 else (m[route] - m["T* on noisy"]) / gap


def format_table(results: Dict[str, List[Dict[str, Any]]], metrics: Sequence[str]) -> str:
    """Rows = routes, columns = metric per noise level (the reference's table layout)."""
    sigmas = list(results)
    routes = [r["route"] for r in results[sigmas[0]]]
    head = f"{'':<48}" + "".join(f"{f'{m} σ={s}':>14}" for s in sigmas for m in metrics)
    lines = [head]
    for i, route in enumerate(routes):
        lines.append(f"{route:<48}" + "".join(f"{results[s][i][m]:>14.4f}" for s in sigmas for m in metrics))
    return "\n".join(lines)


def summary_text(out: Dict[str, Any], metric: str) -> str:
    """An example's table, the fraction of the clean-minus-noisy ``metric`` gap each route
    recovers at the highest σ, and where the results were written (text to print)."""
    lines = [*out["args"].get("notes", []), out["table"], f"fraction of the clean-minus-noisy {metric} gap recovered at the highest σ:"]
    lines += [f"  {route:<48}{frac:>8.2f}" for route, frac in out["gap_recovered_at_highest_sigma"].items()]
    lines.append(f"{out['seconds']:.0f} s; wrote {out['args']['out']}/table.json and samples_sigma*.png")
    if out["args"].get("quick"):
        lines.append(SMOKE_RUN)
    return "\n".join(lines)


def run_example(task: str, source: str, argv: Optional[Sequence[str]] = None,
                doc: str = "") -> Dict[str, Any]:
    """Run one example end to end (module docstring); returns the JSON-ready result dict."""
    args = parse_args(source, argv, doc or __doc__)
    if args.root is None:
        source = "standin"
    args.epochs = args.epochs if args.epochs is not None else (12 if task == "segmentation" else 5)
    args.out = Path(args.out or (f"runs/quick/{task}_{source}" if args.quick else f"outputs/{task}_{source}"))
    args.checkpoint = args.checkpoint or str(args.out / "task_net.pt")
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    progress, t0 = not args.no_progress, time.perf_counter()
    net, cfg, info = _pretrained(task, source, args, progress)
    train, test = _splits(task, source, args)
    k, loss = cfg["num_classes"], task_loss(task)
    score = lambda logits, labels: task_scores(task, logits, labels, k)  # noqa: E731
    results, samples = {}, {}
    for i, sigma in enumerate(args.sigmas):
        rows, imgs = run_noise_level(net, _noisy(train, sigma, 100 + i), _noisy(test, sigma, 200 + i),
                                     loss, score, finetune=FINETUNE[cfg["kind"]],
                                     tolerances=args.tolerances, max_iter=args.iters,
                                     finetune_lr=args.finetune_lr, progress=progress)
        results[str(sigma)], samples[sigma] = rows, imgs
        _write_json(args.out / "table.json", {"partial": True, "results": results})
        _save_samples(args.out / f"samples_sigma{sigma:g}.png", imgs, test["label"][:4], task)
    metrics = ["dice", "iou"] if task == "segmentation" else ["accuracy", "top5"]
    table = format_table(results, metrics)
    top = str(args.sigmas[-1])
    out = {"task": task, "source": source, "network": cfg, "pretrain": info, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results, "seconds": time.perf_counter() - t0,
        "gap_recovered_at_highest_sigma": {r["route"]: gap_recovered(results[top], metrics[0], r["route"])
                                           for r in results[top][2:]}}
    _write_json(args.out / "table.json", out)
    return {**out, "table": table}


def _write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _save_samples(path: Path, imgs, labels, task: str, k: int = 2) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bilevel.history import save_figure
    routes = list(imgs)
    seg = task == "segmentation"
    cols = 2 * k if seg else k
    fig, axes = plt.subplots(len(routes), cols, figsize=(2.0 * cols, 2.0 * len(routes)), squeeze=False)
    for i, route in enumerate(routes):
        x, logits = imgs[route]
        for j in range(k):
            im = x[j].clamp(0, 1)
            ax = axes[i, 2 * j if seg else j]
            ax.imshow(im[0] if im.shape[0] == 1 else im.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            if seg:
                axes[i, 2 * j + 1].imshow(logits[j].argmax(0), cmap="tab20", vmin=0, vmax=19,
                                          interpolation="nearest")
            else:
                ax.set_title(f"pred {int(logits[j].argmax())} / true {int(labels[j])}", fontsize=9)
        axes[i, 0].set_ylabel(route.replace(" (", "\n("), fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, str(path))
    plt.close(fig)
