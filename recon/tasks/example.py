"""The driver behind ``examples/cityscapes.py`` and ``examples/stanford_dogs.py``.

``run_example(task, source, argv)`` pretrains (or loads, or resumes) ``T*`` on clean data, then
for every noise level ``σ`` builds seeded noisy copies ``y = x + σn`` of a small training set
(θ is learned on it) and of a held-out test set (every row is scored on it), and runs the rows
of :func:`recon.tasks.experiment.run_noise_level`. It returns and writes ``table.json``, a
``samples_sigma<σ>.png`` per noise level (input / prediction per row) and prints the table.
Every option is checked before any work. The run is made of stages (pretraining epochs, then
one per noise level and route) kept on disk as they finish, so that a rerun of the same command
continues at the first unfinished one; a rerun with other settings is refused with the list of
differences (``--restart`` starts over).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from ..scripts import SMOKE_RUN, help_parser
from ..checkpoint import ResumeMismatchError
from ..io import atomic_write
from .cli import data_settings, task_loss, task_scores
from ..adaptive_tv import AdaptiveTVDenoising
from ..learned_experts import LearnedFieldOfExperts
from .data import default_network_config, load_task_data
from .experiment import ManyImages, run_noise_level
from .summary import (comparisons, format_interval, format_intervals, format_table, gap_intervals,
                      gap_recovered, label_width, mean_rows, paired_differences)
from .pretrain import (build_task_network, check_pretraining_resume, pretrain,
                       pretraining_settings)
from .stages import Stages, network_digest

__all__ = ["run_example", "parse_args", "format_table", "gap_recovered", "summary_text"]

#: the field of experts of ``--experts``: 8 filters of 3×3 (8·9 + 8 + 1 = 81 hyperparameters);
#: 24 filters of 5×5 (625) cost 0.8 s per Hessian-vector product on 100 scenes of 64² (one
#: thread), too slow for the examples' time budget
EXPERTS = (8, 3)
#: the network of ``--adaptive``: 8 hidden channels of 7×7 kernels and a 1×1 output layer
#: (8·49 + 8 + 8 + 2 = 410 hyperparameters for gray images), log-weights within ±2 of the
#: learned TV log-weight (a factor e² ≈ 7.4 either way)
ADAPTIVE = dict(hidden=8, kernel_size=7, out_kernel_size=1, log_range=2.0)
ADAPTIVE_ITERS = 100
#: ``--adaptive``: the training images of its routes (minibatches, ``recon.tasks.experiment.
#: ManyImages``), the passes over them, and the fraction of further images held out to pick θ
ADAPTIVE_IMAGES, ADAPTIVE_EPOCHS, ADAPTIVE_VAL_FRACTION = 1000, 10, 0.1
FINETUNE = {"unet": ["up2", "up3", "outc"], "resnet18": ["layer4", "fc"], "resnet50": ["layer4.2", "fc"]}


def default_threads() -> int:
    """``$OMP_NUM_THREADS`` when it is set to a positive int (a user's own thread budget), else
    2."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else 2


def parse_args(source: str, argv: Optional[Sequence[str]], doc: str) -> argparse.Namespace:
    """Command-line options shared by both examples (``--quick``: smoke run, < 1 minute, in ``runs/quick/``;
    options given on the command line are kept).

    Every number is checked when parsed (status 2 naming the option), before any work."""
    from ..training.argtypes import float_in, int_at_least

    pos, nonneg = int_at_least(1), int_at_least(0)
    positive = float_in(0.0, strict_low=True)
    ap = help_parser(doc)
    ap.add_argument("--root", default=None, help=f"local {source} copy (default: the stand-in)")
    ap.add_argument("--sigmas", type=positive, nargs="+", default=None,
                    help="noise levels (default 0.3, the highest of the reference's; --quick: 0.3)")
    ap.add_argument("--n-train", type=pos, default=None, help="images θ is learned on (100; --quick: 8)")
    ap.add_argument("--n-test", type=pos, default=None,
                    help="held-out images every row is scored on (500, or all 450 test digits "
                         "of the classification stand-in; --quick: 32)")
    ap.add_argument("--n-pretrain", type=pos, default=None,
                    help="clean images T* is trained on (default: the stand-in's 1000 generated "
                         "scenes or 1347 training digits, or the whole training split of --root; "
                         "--quick: 96)")
    ap.add_argument("--epochs", type=nonneg, default=None,
                    help="pretraining epochs of T* (segmentation 12, classification 5; --quick: 1)")
    ap.add_argument("--iters", type=pos, default=None,
                    help="cap on the outer (QuasiNewton) iterations of a route; a loop that stops "
                         "at the cap is marked not converged (100; --quick: 3)")
    ap.add_argument("--seeds", type=pos, default=None,
                    help="seeds 0..S-1: each redraws the training images, the generated test "
                         "scenes and both noise draws; paired differences get 95 %% t-intervals "
                         "(segmentation 1, classification 3, so that a default run takes under 15 minutes "
                         "on 2 CPU cores; --seeds 3 for the documented intervals; --quick: 1)")
    ap.add_argument("--experts", action="store_true",
                    help="two more rows: a learned field of experts (recon.learned_experts, 8 "
                         "learned 3x3 filters: 81 hyperparameters) learned for the MSE and for "
                         "the task; a rerun of a finished run with --experts adds only these rows")
    ap.add_argument("--experts-iters", type=pos, default=20,
                    help="cap on the outer iterations of each field-of-experts route (20)")
    ap.add_argument("--adaptive", action="store_true",
                    help="two more rows: adaptive TV (recon.adaptive_tv, TV weights per pixel "
                         "predicted from the noisy image by a small CNN: 410 hyperparameters for "
                         "gray images) learned for the MSE and for the task; a rerun of a "
                         "finished run with --adaptive adds only these rows")
    ap.add_argument("--adaptive-images", type=nonneg, default=None,
                    help="training images of the adaptive-TV routes, learned in minibatches of 50 "
                         "with 10 %% more images held out to keep the best epoch's θ "
                         f"({ADAPTIVE_IMAGES}; --quick: 16); 0: learned in one batch on the "
                         "--n-train images like the TV rows (where 410 θ fit the noise draw)")
    ap.add_argument("--adaptive-epochs", type=pos, default=None,
                    help=f"passes over those images ({ADAPTIVE_EPOCHS}; --quick: 1)")
    ap.add_argument("--adaptive-iters", type=pos, default=None,
                    help="with --adaptive-images 0: cap on the outer iterations of each "
                         f"adaptive-TV route ({ADAPTIVE_ITERS}; --quick: 3)")
    ap.add_argument("--tolerances", type=float_in(0.0, 1.0, strict_low=True, strict_high=True),
                    nargs="+", default=[1e-3, 1e-5],
                    help="relative inner and CG accuracies of the task routes, one row each "
                         "(1e-3 1e-5, as in the reference)")
    ap.add_argument("--finetune-lr", type=positive, default=1e-4,
                    help="Adam step of the fine-tuned layers (1e-4)")
    ap.add_argument("--checkpoint", default=None, help="T* checkpoint (default OUT/task_net.pt)")
    ap.add_argument("--out", default=None,
                    help="output folder (default outputs/<task>_<source>; --quick: runs/quick/...)")
    ap.add_argument("--threads", type=pos, default=default_threads(),
                    help="torch threads ($OMP_NUM_THREADS if set, else 2); T* is pretrained in "
                         "float32, so its weights, and every row after it, depend on this number: "
                         "the documented tables pretrain T* with --threads 1")
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run (< 1 minute) in runs/quick/ (its numbers are not meaningful); "
                         "options given still apply")
    ap.add_argument("--restart", action="store_true",
                    help="start over: pretrain T* again and recompute every row (by default a "
                         "rerun continues where the last one stopped, with the same settings)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.notes = []
    return args


def _network_config(task: str, source: str, args) -> Dict[str, Any]:
    cfg = default_network_config(task, source)
    if args.quick and cfg["kind"] == "unet":
        cfg["base_channels"] = 4
    return cfg


#: the pretraining settings of the examples (those of ``python -m recon.tasks pretrain``)
PRETRAIN = {"lr": 2e-3, "batch_size": 16, "weight_decay": 0.0, "seed": 0}


def _pretrained(task: str, source: str, cfg, args, progress: bool, on_stage):
    data = load_task_data(task, source, "train", args.n_pretrain, root=args.root)
    torch.manual_seed(0)
    net = build_task_network(cfg)
    hook = None if on_stage is None else (lambda epoch, _loss: on_stage(f"pretrain epoch {epoch}"))
    info = pretrain(net, data, task_loss(task), epochs=args.epochs, checkpoint=args.checkpoint,
                    config=cfg, progress=progress, resume=not args.restart, callback=hook,
                    metadata=data_settings(task, source, args.root, None, args.n_pretrain),
                    **PRETRAIN)
    return net.eval(), info


def _check_pretraining_epochs(checkpoint, state: Dict[str, Any], epochs: int) -> None:
    """Resume only the pretraining of this run (``epochs`` planned, interrupted before the
    end): a checkpoint trained for another number of epochs is refused (it would be trained on,
    or used over-trained, and the file overwritten)."""
    done, target = int(state.get("epoch", 0)), state.get("target_epochs")
    if done == epochs or (done < epochs and target in (None, epochs)):
        return
    planned = f"planned for {target}" if target not in (None, done) else "finished"
    raise ResumeMismatchError(
        f"{str(checkpoint)!r} holds a pretraining of {done} epochs ({planned}); this run asks "
        f"for --epochs {epochs}. Pass --epochs {done} to use it as it is, --restart to pretrain "
        f"anew, or another --checkpoint; `python -m recon.tasks pretrain --epochs {epochs} "
        f"--checkpoint {checkpoint}` trains it on")


def _check_resumes(task: str, source: str, cfg, args) -> "Stages":
    """The resume rule for the pretraining checkpoint and the stages, before any work."""
    if Path(args.checkpoint).is_file() and not args.restart:
        state = check_pretraining_resume(args.checkpoint, pretraining_settings(
            cfg, n_samples=None, metadata=data_settings(task, source, args.root, None,
                                                        args.n_pretrain), **PRETRAIN),
            ignore=["n_samples"])
        _check_pretraining_epochs(args.checkpoint, state, args.epochs)
    return Stages(args.out / "stages.pt", {
        "task": task, "source": source, "root": args.root, "sigmas": args.sigmas,
        "n_train": args.n_train, "n_test": args.n_test, "iters": args.iters,
        "tolerances": args.tolerances, "finetune_lr": args.finetune_lr, "network": cfg,
        "experts_iters": args.experts_iters, "adaptive_iters": args.adaptive_iters,
        "adaptive_images": args.adaptive_images, "adaptive_epochs": args.adaptive_epochs},
        args.restart)


def _splits(task, source, args, seed: int = 0):
    """The training images θ is learned on and the held-out test images of seed ``seed``."""
    train_all = load_task_data(task, source, "train", None if source != "standin" or task != "segmentation"
                               else args.n_train, root=args.root, seed=7 + seed)
    g = torch.Generator().manual_seed(7 + seed)
    pick = torch.randperm(len(train_all["label"]), generator=g)[:args.n_train]
    train = {k: v[pick] for k, v in train_all.items()}
    test = load_task_data(task, source, "test", args.n_test, root=args.root, seed=seed)
    n = min(args.n_test, len(test["label"]))
    return train, {k: v[:n] for k, v in test.items()}


def _noisy(data: Dict[str, torch.Tensor], sigma: float, seed: int) -> Dict[str, torch.Tensor]:
    from ..data.standins import add_gaussian_noise
    clean = data["image"].double()
    return {"image": clean, "label": data["label"], "y": add_gaussian_noise(clean, sigma, seed)}


def summary_text(out: Dict[str, Any], metric: str) -> str:
    """An example's table, the paired differences of the task metric at the highest σ, the
    fraction of the clean-minus-noisy ``metric`` gap each route recovers there (mean over the
    seeds, with its 95 % interval), and where the results were written (text to print)."""
    top = str(max(out["args"]["sigmas"]))
    iv = (out.get("intervals") or {}).get(top, {})
    lines = [*out["args"].get("notes", []), out["table"]]
    if iv.get("differences"):
        lines += format_intervals(iv["differences"], metric, top)
    lines.append(f"fraction of the clean-minus-noisy {metric} gap recovered at the highest σ "
                 f"({top}):")
    w = label_width(out["gap_recovered_at_highest_sigma"])
    for route, frac in out["gap_recovered_at_highest_sigma"].items():
        gap = iv.get("gaps", {}).get(route)
        lines.append(f"  {route:<{w}} " + (format_interval(gap, 2) if gap and gap["n"] > 1 else f"{frac:.2f}"))
    if any(frac != frac for frac in out["gap_recovered_at_highest_sigma"].values()):  # nan
        lines.append("  (nan: T* is not better on clean than on noisy images there, so there is "
                     "no gap to recover)")
    lines.append(f"{out['seconds']:.0f} s; wrote {out['args']['out']}/table.json and samples_sigma*.png")
    if out["args"].get("quick"):
        lines.append(SMOKE_RUN)
    if out.get("stages_reused"):
        lines.append(f"({out['stages_reused']} finished stages of an earlier run reused from "
                     f"{out['args']['out']}/stages.pt; --restart recomputes them)")
    return "\n".join(lines)


def _prepare(task: str, source: str, argv, doc: str) -> argparse.Namespace:
    """Parsed, completed and checked arguments (before any work)."""
    from bilevel.history import check_writable

    args = parse_args(source, argv, doc or __doc__)
    defaults = (dict(sigmas=[0.3], n_train=8, n_test=32, iters=3, n_pretrain=96, epochs=1, seeds=1,
                     adaptive_iters=3, adaptive_images=16, adaptive_epochs=1)
                if args.quick else dict(sigmas=[0.3], n_train=100, n_test=500, iters=100,
                                        seeds=1 if task == "segmentation" else 3,
                                        adaptive_iters=ADAPTIVE_ITERS, adaptive_images=ADAPTIVE_IMAGES,
                                        adaptive_epochs=ADAPTIVE_EPOCHS))
    for key, value in defaults.items():  # an option given on the command line is kept
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.epochs = args.epochs if args.epochs is not None else (12 if task == "segmentation" else 5)
    args.out = Path(args.out or (f"runs/quick/{task}_{source if args.root else 'standin'}"
                                 if args.quick else f"outputs/{task}_{source if args.root else 'standin'}"))
    args.checkpoint = args.checkpoint or str(args.out / "task_net.pt")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {str(args.out)!r} is a file; the results need a folder")
    check_writable(args.checkpoint, "--checkpoint")
    return args


def run_example(task: str, source: str, argv: Optional[Sequence[str]] = None,
                doc: str = "", on_stage: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Run one example end to end (module docstring); returns the JSON-ready result dict.

    A rerun with the same options continues where the last one stopped: the pretraining at
    its last finished epoch, the rows at the first unfinished (noise level, route) stage
    (``OUT/stages.pt``); other settings are refused with the list of differences
    (``--restart`` starts over). ``on_stage(name)`` is called after each finished stage
    (``"pretrain epoch 1"``, ``"sigma 0.3: T* on clean"``, ...) once it is on disk."""
    args = _prepare(task, source, argv, doc)
    if args.root is None:
        source = "standin"
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    progress, t0 = not args.no_progress, time.perf_counter()
    cfg = _network_config(task, source, args)
    stages = _check_resumes(task, source, cfg, args)
    channels = _splits(task, source, args)[0]["image"].shape[1]  # data errors before pretraining
    many0 = _many_images(task, source, args, 0) if args.adaptive else None  # ditto
    net, info = _pretrained(task, source, cfg, args, progress, on_stage)
    stages.bind_network(network_digest(net))
    lower = {"experts": LearnedFieldOfExperts(*EXPERTS) if args.experts else None,
             "adaptive": AdaptiveTVDenoising(channels, **ADAPTIVE) if args.adaptive else None}
    per_seed = [_run_seed(seed, task, source, args, net, cfg, stages, lower, progress, on_stage,
                          many0 if seed == 0 else None) for seed in range(args.seeds)]
    return _finish(task, source, args, cfg, info, per_seed, stages.reused, t0)


def _run_seed(seed, task, source, args, net, cfg, stages, lower, progress, on_stage, many=None):
    """``{str(σ): rows}`` of one seed (its data, its noise; stages of earlier runs reused);
    ``many``: this seed's :func:`_many_images`, if already loaded."""
    k, loss = cfg["num_classes"], task_loss(task)
    score = lambda logits, labels: task_scores(task, logits, labels, k)  # noqa: E731
    train, test = _splits(task, source, args, seed)
    results = {}
    if many is None and lower["adaptive"] is not None:
        many = _many_images(task, source, args, seed)
    for i, sigma in enumerate(args.sigmas):
        def finished(route, stage, sigma=sigma):
            name = stages.add(sigma, route, stage, seed)
            if on_stage is not None:
                on_stage(name)
        rows, imgs = run_noise_level(net, _noisy(train, sigma, 100 + i + 1000 * seed),
                                     _noisy(test, sigma, 200 + i + 1000 * seed),
                                     loss, score, finetune=FINETUNE[cfg["kind"]],
                                     tolerances=args.tolerances, max_iter=args.iters,
                                     finetune_lr=args.finetune_lr, progress=progress,
                                     done=stages.of(sigma, seed), on_stage=finished,
                                     experts_max_iter=args.experts_iters,
                                     adaptive_max_iter=args.adaptive_iters,
                                     adaptive_many=_noisy_many(many, lower["adaptive"], sigma,
                                                               i, seed, args), **lower)
        results[str(sigma)] = rows
        _write_json(args.out / "table.json", {"partial": True, "seed": seed, "results": results})
        if seed == 0:
            _save_samples(args.out / f"samples_sigma{sigma:g}.png", imgs, test["label"][:4], task)
    return results


def _many_images(task, source, args, seed: int):
    """``(train, val)`` clean images of the ``--adaptive`` routes (``None`` with
    ``--adaptive-images 0``): ``--adaptive-images`` training-split images and
    ``ADAPTIVE_VAL_FRACTION`` as many more to pick θ (generated scenes of seed ``seed``; a data
    set with fewer images is split in the same ratio)."""
    if not args.adaptive_images:
        return None
    n_val = max(1, round(ADAPTIVE_VAL_FRACTION * args.adaptive_images))
    data = load_task_data(task, source, "train", args.adaptive_images + n_val, root=args.root,
                          seed=5000 + seed)
    m = len(data["label"])
    n_val = max(1, round(m * n_val / (args.adaptive_images + n_val)))
    if m - n_val < 1:
        raise ValueError(f"--adaptive-images: the training split has {m} images, too few to "
                         f"hold out any for choosing θ")
    return ({k: v[:m - n_val] for k, v in data.items()}, {k: v[m - n_val:] for k, v in data.items()})


def _noisy_many(many, inner, sigma, i, seed, args):
    """The :class:`recon.tasks.experiment.ManyImages` of noise level ``sigma`` (or ``None``)."""
    if many is None:
        return None
    train, val = many
    return ManyImages(inner, _noisy(train, sigma, 300 + i + 1000 * seed),
                      _noisy(val, sigma, 400 + i + 1000 * seed), epochs=args.adaptive_epochs)


def _finish(task, source, args, cfg, info, per_seed, reused, t0) -> Dict[str, Any]:
    """The result dict (also written to ``OUT/table.json``) and the printed table: the rows
    (means over the seeds), the per-seed rows, and per σ the paired differences and gap
    fractions with their intervals (:mod:`recon.tasks.summary`)."""
    metrics = ["dice", "iou"] if task == "segmentation" else ["accuracy", "top5"]
    sigmas = [str(s) for s in args.sigmas]
    results = {s: mean_rows([seed[s] for seed in per_seed], metrics) for s in sigmas}
    intervals = {}
    for s in sigmas:
        rows = [seed[s] for seed in per_seed]
        pairs = comparisons([r["route"] for r in rows[0]])
        intervals[s] = {"metric": metrics[0], "differences": paired_differences(rows, metrics[0], pairs),
                        "gaps": gap_intervals(rows, metrics[0])}
    top = str(max(args.sigmas))
    out = {"task": task, "source": source, "network": cfg, "pretrain": info, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results, "seconds": time.perf_counter() - t0, "stages_reused": reused,
        "gap_recovered_at_highest_sigma": {r: iv["mean"] for r, iv in intervals[top]["gaps"].items()},
        "intervals": intervals,
        "per_seed": per_seed if len(per_seed) > 1 else None}
    _write_json(args.out / "table.json", out)
    return {**out, "table": format_table(results, metrics)}


def _write_json(path: Path, obj) -> None:
    """Write JSON atomically (:func:`recon.io.atomic_write`)."""
    with atomic_write(path, "w") as handle:
        handle.write(json.dumps(obj, indent=1))


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
